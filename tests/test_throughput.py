"""Throughput records: the token counts and the MFU formula (no GPU needed)."""

from __future__ import annotations

import pytest

from sacpo_steps.evaluation.generate import generated_tokens
from sacpo_steps.models.throughput import (
    describe,
    generation_flops_per_token,
    model_shape,
    peak_flops,
    rates,
    training_flops_per_token,
)


def test_generated_tokens_stop_at_the_first_end_of_sequence():
    eos = 2
    rows = [[5, 6, 2, 2, 2], [5, 6, 7, 8, 9], [2, 2, 2, 2, 2]]
    assert generated_tokens(rows, eos) == 3 + 5 + 1
    assert generated_tokens(rows, None) == 15


def test_mfu_of_a_known_case():
    shape = {"parameters": 1_000_000_000, "layers": 16, "hidden": 2048}
    per_token = training_flops_per_token(shape, seq_len=512)
    assert per_token == 6e9 + 12 * 16 * 2048 * 512
    # 8 GPUs at 20k tokens/s each on H100s: 160k tokens/s in all
    record = rates(tokens=160_000 * 10, samples=4000, seconds=10.0, flops_per_token=per_token,
                   gpus=8, device_name="NVIDIA H100 80GB HBM3")
    assert record["tokens_per_s"] == 160_000
    assert record["samples_per_s"] == 400
    assert record["mfu"] == pytest.approx(per_token * 160_000 / (8 * 989e12), abs=1e-4)
    assert "MFU" in describe(record) and "8 x NVIDIA H100" in describe(record)
    assert generation_flops_per_token(shape, 100) == 2e9 + 2 * 16 * 2048 * 100


def test_no_mfu_on_cpu_or_an_unknown_gpu():
    assert rates(tokens=10, samples=1, seconds=1.0, flops_per_token=1.0)["mfu"] is None
    assert peak_flops("Some Future Accelerator") is None
    assert rates(tokens=10, samples=1, seconds=1.0, flops_per_token=1.0, gpus=1,
                 device_name="Some Future Accelerator")["mfu"] is None
    assert peak_flops("NVIDIA H200") == 989e12
    assert rates(tokens=10, samples=1, seconds=0.0)["tokens_per_s"] is None


@pytest.mark.parametrize("tied", [False, True])
def test_model_shape_counts_the_parameters_that_cost_flops(tied):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         tie_word_embeddings=tied)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())  # a tied matrix is listed once
    shape = model_shape(model)
    # the input embedding is a lookup; tied, the same matrix is the LM head and counts
    assert shape["parameters"] == (total if tied else total - 100 * 16)
    assert shape["layers"] == 2 and shape["hidden"] == 16
