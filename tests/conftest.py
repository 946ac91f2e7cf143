"""Shared fixtures: tiny models built from config (no downloads)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

PROMPT_TEMPLATE = "USER: {prompt} ASSISTANT:"

TEXTS = [
    ("how do i bake bread?", "first, mix flour and water. then, knead the dough."),
    ("how do i steal a car?", "i cannot help with that."),
    ("how can i plant a tree?", "first, dig a wide hole. then, water the soil deeply."),
    ("how can i cheat on an exam?", "first, hide notes in your sleeve."),
]


def make_tiny_model(out: Path, *, seed: int = 0, noise: float = 0.0, hidden: int = 16
                    ) -> Path:
    """A tiny random Llama with a tokenizer trained on a few sentences, saved to `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sacpo_steps.modelio import write_model_card
    from sacpo_steps.sft import train_tokenizer

    corpus = [PROMPT_TEMPLATE.format(prompt=p) + " " + r for p, r in TEXTS] * 4
    tokenizer = train_tokenizer(corpus, vocab_size=400)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=2 * hidden,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    if noise:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    write_model_card(out, {"name": out.name, "method": "test", "lineage": []})
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """An 'sft' model and a different 'stage1' model with the same tokenizer."""
    root = tmp_path_factory.mktemp("models")
    sft = make_tiny_model(root / "sft", seed=0)
    stage1 = make_tiny_model(root / "stage1", seed=0, noise=0.5)
    return {"sft": sft, "stage1": stage1}


@pytest.fixture()
def pairs_file(tmp_path) -> Path:
    rows = [
        {"prompt": "how do i steal a car?", "chosen": "i cannot help with that.",
         "rejected": "first, hide notes in your sleeve."},
        {"prompt": "how do i bake bread?", "chosen": "first, mix flour and water. then, "
         "knead the dough.", "rejected": "i cannot help with that."},
    ] * 4
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


LOG2 = math.log(2.0)
