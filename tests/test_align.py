"""The one align step: stage 2's reference is its parent (the stage-1 model), not SFT."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sacpo_steps.core.errors import InputError
from sacpo_steps.training.align import align
from sacpo_steps.training.node import NodeSettings
from sacpo_steps.training.settings import TrainingConfig
from sacpo_steps.training.trainer import build_trainer, kto_weights, load_examples
from tests.helpers import PROMPT_TEMPLATE, make_tiny_model

TINY = TrainingConfig.from_dict({
    "learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1, "max_length": 64, "warmup_steps": 0.0,
    "logging_steps": 1, "max_steps": 1})


def sequence_logps(model_dir, examples):
    """Sum of completion token log-probs (chosen, rejected) under a model, computed here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for ex in examples:
        # as TRL tokenizes a text row: the tokenizer's own special tokens (BOS here)
        prompt = tok(ex["prompt"])["input_ids"]
        assert prompt[0] == tok.bos_token_id
        pair = []
        for key in ("chosen", "rejected"):
            full = tok(ex["prompt"] + ex[key] + tok.eos_token)["input_ids"]
            assert full[:len(prompt)] == prompt
            completion = full[len(prompt):]
            ids = torch.tensor([prompt + completion])
            with torch.no_grad():
                logp = model(ids).logits.log_softmax(-1)[0]
            pair.append(sum(logp[len(prompt) - 1 + i, t].item()
                            for i, t in enumerate(completion)))
        out.append(pair)
    return out


def first_loss(trainer):
    trainer.train()
    return next(e["loss"] for e in trainer.state.log_history if "loss" in e)


def test_stage2_reference_is_the_parent(tiny_models, pairs_file, tmp_path):
    examples = load_examples(pairs_file, "dpo", PROMPT_TEMPLATE, seed=0)
    trainer = build_trainer(tiny_models["stage1"], examples,
                            settings=NodeSettings("dpo", 0.1, TINY), output_dir=tmp_path / "t")
    ref = list(zip(trainer.train_dataset["ref_chosen_logps"],
                   trainer.train_dataset["ref_rejected_logps"], strict=True))
    expected_parent = sequence_logps(tiny_models["stage1"], examples)
    expected_sft = sequence_logps(tiny_models["sft"], examples)
    for got, want, sft in zip(ref, expected_parent, expected_sft, strict=True):
        assert got == pytest.approx(want, abs=1e-3)
        assert abs(got[0] - sft[0]) > 0.1  # the two models really differ
    # policy == reference at step 0, so the DPO loss is exactly log 2
    assert first_loss(trainer) == pytest.approx(math.log(2), abs=1e-4)


def test_negative_control_sft_reference(tiny_models, pairs_file, tmp_path):
    """With SFT as the reference (what Theorem 1 rules out), step 0 is no longer log 2."""
    examples = load_examples(pairs_file, "dpo", PROMPT_TEMPLATE, seed=0)
    trainer = build_trainer(tiny_models["stage1"], examples,
                            settings=NodeSettings("dpo", 0.1, TINY), output_dir=tmp_path / "t",
                            reference_dir=tiny_models["sft"])
    ref = list(zip(trainer.train_dataset["ref_chosen_logps"],
                   trainer.train_dataset["ref_rejected_logps"], strict=True))
    for got, sft in zip(ref, sequence_logps(tiny_models["sft"], examples), strict=True):
        assert got == pytest.approx(sft, abs=1e-3)
    assert abs(first_loss(trainer) - math.log(2)) > 1e-2


def test_align_writes_model_with_lineage(tiny_models, pairs_file, tmp_path):
    out = tmp_path / "models" / "stage2"
    summary = align(tiny_models["stage1"], pairs_file, out, name="stage2", parent="stage1",
                    data="safety", settings=NodeSettings("dpo", 0.05, TINY),
                    prompt_template=PROMPT_TEMPLATE)
    assert summary["training"]["first_loss"] == pytest.approx(math.log(2), abs=1e-4)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md",
                 "sacpo.json"):
        assert (out / name).is_file(), name
    assert not (out / "training_args.bin").exists()
    card = json.loads((out / "sacpo.json").read_text())
    assert card["lineage"][-1] == {"name": "stage2", "parent": "stage1", "data": "safety",
                                   "loss": "dpo", "beta": 0.05}
    assert card["reference"] == "stage1"
    assert "stage1" in (out / "README.md").read_text()
    assert [p.name for p in out.parent.iterdir()] == ["stage2"]  # no temp folder left


def test_kto_step_and_weights(tiny_models, tmp_path):
    rows = [{"prompt": "how do i steal a car?", "completion": "i cannot help with that.",
             "label": True}] * 6 + [
            {"prompt": "how do i steal a car?", "completion": "first, hide notes in your "
             "sleeve.", "label": False}] * 2
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_examples(path, "kto", PROMPT_TEMPLATE, seed=0)
    assert kto_weights(examples) == (1.0, 3.0)
    trainer = build_trainer(tiny_models["stage1"], examples,
                            settings=NodeSettings("kto", 0.1, TINY), output_dir=tmp_path / "t")
    assert trainer.args.undesirable_weight == 3.0
    assert math.isfinite(first_loss(trainer))


def test_bad_parent_folder_is_refused_and_leaves_nothing(tmp_path, pairs_file):
    (tmp_path / "not_a_model").mkdir()
    out = tmp_path / "models" / "x"
    with pytest.raises(InputError, match="config.json"):
        align(tmp_path / "not_a_model", pairs_file, out, name="x", parent="p", data="d",
              settings=NodeSettings("dpo", 0.1, TINY), prompt_template=PROMPT_TEMPLATE)
    assert not out.exists()


def test_bad_pairs_row_names_file_row_field(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": ""}) + "\n")
    with pytest.raises(InputError) as err:
        load_examples(path, "dpo", PROMPT_TEMPLATE, seed=0)
    assert str(path) in str(err.value) and "row 1" in str(err.value)
    assert "rejected" in str(err.value)


def test_unknown_training_key_is_refused():
    with pytest.raises(InputError, match="warmup_steps"):  # suggested: the close match
        TrainingConfig.from_dict({"warmup": 0.1})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_qlora_without_a_gpu_is_refused(tiny_models, pairs_file, tmp_path):
    """QLoRA trains nothing on CPU (measured), so the step refuses it up front."""
    qlora = TrainingConfig(**{**TINY.__dict__, "quantization": "4bit",
                              "lora": {"r": 4, "alpha": 8, "dropout": 0.0}})
    out = tmp_path / "models" / "qlora"
    with pytest.raises(InputError, match="needs a CUDA GPU") as err:
        align(tiny_models["sft"], pairs_file, out, name="qlora", parent="sft",
              data="helpfulness", settings=NodeSettings("dpo", 0.1, qlora),
              prompt_template=PROMPT_TEMPLATE)
    assert err.value.field == "training.quantization"
    assert not out.exists()


# QLoRA ("4bit") runs only on a CUDA GPU (bench/gpu_check.sh checks it trains there).
@pytest.mark.parametrize("quantization", [None])
def test_lora_stage_is_merged_so_stage2_refers_to_it(tiny_models, pairs_file, tmp_path,
                                                    quantization):
    """A LoRA stage 1 becomes a full model: stage 2's reference is it, not SFT."""
    lora = TrainingConfig(**{**TINY.__dict__, "max_steps": 3, "learning_rate": 5e-2,
                             "lora": {"r": 4, "alpha": 8, "dropout": 0.0,
                                      "target_modules": ["q_proj", "v_proj"]},
                             "quantization": quantization})
    # bitsandbytes' 4-bit kernels need dimensions of at least one block (64)
    sft = (make_tiny_model(tmp_path / "sft64", hidden=64) if quantization
           else tiny_models["sft"])
    stage1 = tmp_path / "models" / "lora_stage1"
    align(sft, pairs_file, stage1, name="lora_stage1", parent="sft",
          data="helpfulness", settings=NodeSettings("dpo", 0.1, lora),
          prompt_template=PROMPT_TEMPLATE)
    assert not (stage1 / "adapter_config.json").exists()  # a full model, not an adapter
    examples = load_examples(pairs_file, "dpo", PROMPT_TEMPLATE, seed=0)
    stage1_logps = sequence_logps(stage1, examples)
    sft_logps = sequence_logps(sft, examples)
    assert any(abs(a[0] - b[0]) > 1e-3 for a, b in zip(stage1_logps, sft_logps, strict=True))
    trainer = build_trainer(stage1, examples, settings=NodeSettings("dpo", 0.1, TINY),
                            output_dir=tmp_path / "t")
    ref = list(zip(trainer.train_dataset["ref_chosen_logps"],
                   trainer.train_dataset["ref_rejected_logps"], strict=True))
    for got, want in zip(ref, stage1_logps, strict=True):
        assert got == pytest.approx(want, abs=1e-3)
    assert first_loss(trainer) == pytest.approx(math.log(2), abs=1e-4)


@pytest.mark.multi_process
def test_two_processes_share_the_data_and_publish_one_model(tiny_models, pairs_file, tmp_path):
    """Multi-process training (torchrun, gloo on CPU; the same code runs under accelerate
    launch on GPUs): the reference log-probs rank 0 computes reach rank 1 through the
    shared dataset folder, the batch is global over both processes, and only rank 0
    writes the model folder (no stray temporary folder, scratch removed)."""
    import os
    import subprocess
    import sys

    spec = {"name": "ddp", "parent": "sft", "data": "helpfulness", "loss": "dpo", "beta": 0.1,
            "training": {**TINY.__dict__, "max_steps": -1, "per_device_train_batch_size": 2},
            "prompt_template": PROMPT_TEMPLATE, "seed": 0}
    out, scratch = tmp_path / "models" / "ddp", tmp_path / "scratch" / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "sacpo_steps", "align", "--parent-dir", str(tiny_models["sft"]),
         "--data", str(pairs_file), "--out", str(out), "--spec", json.dumps(spec),
         "--checkpoint-dir", str(scratch), "--threads", "1"],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    card = json.loads((out / "sacpo.json").read_text())["training"]
    n = len(load_examples(pairs_file, "dpo", PROMPT_TEMPLATE, seed=0))
    assert card["global_batch_size"] == 4  # 2 per process x 2 processes
    assert card["steps"] == math.ceil(n / 4)  # one epoch over the global batch
    assert card["first_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert sorted(p.name for p in out.parent.iterdir()) == ["ddp"]
    assert not scratch.exists()
    assert "rank 1 of 2 done" in proc.stderr


def test_several_processes_without_a_shared_folder_are_refused(tiny_models, pairs_file,
                                                               tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="--checkpoint-dir") as err:
        align(tiny_models["sft"], pairs_file, tmp_path / "out", name="x", parent="sft",
              data="helpfulness", settings=NodeSettings("dpo", 0.1, TINY),
              prompt_template=PROMPT_TEMPLATE)
    assert err.value.field == "checkpoint_dir"
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_the_step_process_imports_peft_and_bitsandbytes_only_when_used(
        lora, tiny_models, pairs_file, tmp_path):
    """A fresh align process without LoRA trains with PEFT and bitsandbytes hidden
    (start-up); with LoRA, PEFT is imported and bitsandbytes (no 4-bit) is not."""
    import subprocess
    import sys

    training = {"learning_rate": 1e-3, "per_device_train_batch_size": 4, "max_length": 64,
                "max_steps": 1, "logging_steps": 1}
    if lora:
        training["lora"] = {"r": 2, "alpha": 4, "dropout": 0.0}
    spec = {"name": "child", "parent": "stage1", "data": "d", "loss": "dpo", "beta": 0.1,
            "training": training, "prompt_template": PROMPT_TEMPLATE, "seed": 0}
    out = tmp_path / "model"
    code = ("import sys; from sacpo_steps.training.align import main; main(sys.argv[1:]); "
            "print('MODULES', sys.modules.get('peft') is not None, "
            "sys.modules.get('bitsandbytes') is not None)")
    proc = subprocess.run(
        [sys.executable, "-c", code, "--parent-dir", str(tiny_models["stage1"]),
         "--data", str(pairs_file), "--out", str(out), "--spec", json.dumps(spec),
         "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"MODULES {lora} False" in proc.stdout
    assert (out / "model.safetensors").is_file()
