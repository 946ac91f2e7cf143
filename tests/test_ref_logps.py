"""The shared reference pass: one `ref_logps` job per (reference, data, settings).

A node reading the file must make zero reference forwards and train to exactly the
weights it reaches with TRL's own precompute pass (float32, CPU); a file of other
rows, settings or losses is refused; the plan gives sweep siblings one job.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from sacpo_steps.core.errors import InputError
from sacpo_steps.plan import load_plan
from sacpo_steps.training import ref_logps, reference
from sacpo_steps.training.align import align
from sacpo_steps.training.node import NodeSettings
from sacpo_steps.training.settings import TrainingConfig
from tests.helpers import PROMPT_TEMPLATE, TEXTS, reduced_config

SETTINGS = {"learning_rate": 1e-2, "num_train_epochs": 1, "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 1, "max_length": 64, "warmup_steps": 0.0,
            "logging_steps": 1, "max_steps": 2, "precompute_ref_log_probs": True}


def write_rows(path, loss):
    """8 distinct rows of the loss's data kind (pairs, or labelled completions)."""
    rows = []
    for i, (prompt, answer) in enumerate(TEXTS * 2):
        other = TEXTS[(i + 1) % len(TEXTS)][1]
        prompt = f"{prompt} ({i})"
        if loss == "kto":
            rows.append({"prompt": prompt, "completion": answer if i % 2 else other,
                         "label": bool(i % 2)})
        else:
            rows.append({"prompt": prompt, "chosen": answer, "rejected": other})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def spec_for(loss, training, seed=0):
    key = reference.reference_key_spec(loss, training, PROMPT_TEMPLATE)
    return {"reference": "stage1", "data": "d", **key, "seed": seed}


class Counter:
    """Counts calls of a TRL trainer method or module function, calling through."""

    def __init__(self, monkeypatch, owner, name):
        self.calls = 0
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


def train(parent, data, out, loss, training, **kwargs):
    return align(parent, data, out, name="child", parent="stage1", data="d",
                 settings=NodeSettings(loss, 0.1, TrainingConfig.from_dict(training)),
                 prompt_template=PROMPT_TEMPLATE, seed=0, **kwargs)


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_a_child_reads_the_file_makes_no_reference_forward_and_trains_the_same(
        loss, tiny_models, tmp_path, monkeypatch):
    import trl.trainer.dpo_trainer as dpo_module
    import trl.trainer.kto_trainer as kto_module

    module, trainer = (kto_module, kto_module.KTOTrainer) if loss == "kto" \
        else (dpo_module, dpo_module.DPOTrainer)
    data = write_rows(tmp_path / "rows.jsonl", loss)
    table = tmp_path / "ref.json"
    done = ref_logps.compute(tiny_models["stage1"], data, table, spec=spec_for(loss, SETTINGS))
    assert done["rows"] == 8

    forwards = Counter(monkeypatch, trainer, "compute_ref_log_probs")
    hashes = Counter(monkeypatch, module, "hash_module")
    own = train(tiny_models["stage1"], data, tmp_path / "own", loss, SETTINGS)
    assert forwards.calls > 0 and hashes.calls == 1  # the check can see a reference pass

    forwards.calls = hashes.calls = 0
    cached = train(tiny_models["stage1"], data, tmp_path / "cached", loss, SETTINGS,
                   ref_logps=table)
    assert forwards.calls == 0, "a node reading the file ran a reference forward"
    assert hashes.calls == 0, "TRL hashed the reference weights although nothing reads it"

    a = load_file(tmp_path / "own" / "model.safetensors")
    b = load_file(tmp_path / "cached" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ from TRL's own pass"
    assert cached["training"]["first_loss"] == own["training"]["first_loss"]
    assert cached["reference_logps"] == str(table)
    card = json.loads((tmp_path / "cached" / "sacpo.json").read_text())
    assert card["throughput"]["tokens"] > 0 and card["throughput"]["tokens_per_s"] > 0


def test_the_file_holds_trls_own_values(tiny_models, tmp_path):
    from sacpo_steps.training.trainer import build_trainer, load_examples

    data = write_rows(tmp_path / "rows.jsonl", "dpo")
    table = tmp_path / "ref.json"
    ref_logps.compute(tiny_models["stage1"], data, table, spec=spec_for("dpo", SETTINGS))
    examples = load_examples(data, "dpo", PROMPT_TEMPLATE, seed=0)
    trainer = build_trainer(tiny_models["stage1"], examples,
                            settings=NodeSettings("dpo", 0.1, TrainingConfig.from_dict(SETTINGS)),
                            output_dir=tmp_path / "t")
    stored = json.loads(table.read_text())
    assert stored["columns"] == ["ref_chosen_logps", "ref_rejected_logps"]
    for j, column in enumerate(stored["columns"]):
        assert stored["values"][j] == list(trainer.train_dataset[column])
    assert stored["keys"] == reference.row_keys(trainer.train_dataset)


def test_a_file_of_other_rows_settings_or_loss_is_refused(tiny_models, tmp_path):
    data = write_rows(tmp_path / "rows.jsonl", "dpo")
    table = tmp_path / "theirs.json"
    ref_logps.compute(tiny_models["stage1"], data, table, spec=spec_for("dpo", SETTINGS))
    edited = tmp_path / "edited.jsonl"  # the same rows, one answer changed
    edited.write_text(data.read_text().replace("knead the dough", "knead the bread", 1))
    with pytest.raises(InputError, match="other tokens") as err:
        train(tiny_models["stage1"], edited, tmp_path / "x", "dpo", SETTINGS, ref_logps=table)
    assert "theirs.json" in str(err.value) and "row " in str(err.value)
    assert not (tmp_path / "x").exists()

    # TRL truncates when it batches: a file of another max_length has the same row keys
    shorter = tmp_path / "short.json"
    ref_logps.compute(tiny_models["stage1"], data, shorter,
                      spec=spec_for("dpo", {**SETTINGS, "max_length": 24}))
    with pytest.raises(InputError, match="training.max_length = 24, the node trains with 64"):
        train(tiny_models["stage1"], data, tmp_path / "v", "dpo", SETTINGS, ref_logps=shorter)

    fewer = tmp_path / "few.jsonl"
    fewer.write_text("".join(data.read_text().splitlines(keepends=True)[:6]))
    with pytest.raises(InputError, match="holds 8 rows but the node trains on 6"):
        train(tiny_models["stage1"], fewer, tmp_path / "y", "dpo", SETTINGS,
              ref_logps=table)

    kto_rows = write_rows(tmp_path / "kto.jsonl", "kto")
    kto_table = tmp_path / "kto.json"
    ref_logps.compute(tiny_models["stage1"], kto_rows, kto_table, spec=spec_for("kto", SETTINGS))
    with pytest.raises(InputError, match="computed for loss 'kto'"):
        train(tiny_models["stage1"], data, tmp_path / "z", "dpo", SETTINGS, ref_logps=kto_table)

    broken = tmp_path / "broken.json"
    broken.write_text('{"format": 1, "columns": [')
    with pytest.raises(InputError, match="broken.json.*not a reference log-probs file"):
        reference.ReferenceTable(broken)
    with pytest.raises(InputError, match="not found"):
        reference.ReferenceTable(tmp_path / "absent.json")
    with pytest.raises(InputError, match="precompute_ref_log_probs"):
        train(tiny_models["stage1"], data, tmp_path / "w", "dpo",
              {**SETTINGS, "precompute_ref_log_probs": False}, ref_logps=table)


def test_a_killed_job_leaves_no_file(tiny_models, tmp_path, monkeypatch):
    data = write_rows(tmp_path / "rows.jsonl", "dpo")
    out = tmp_path / "ref.json"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ref_logps, "row_keys", killed)
    with pytest.raises(KeyboardInterrupt):
        ref_logps.compute(tiny_models["stage1"], data, out, spec=spec_for("dpo", SETTINGS))
    assert list(tmp_path.glob("*ref.json*")) == []


def sweep_config() -> dict:
    cfg = reduced_config()
    cfg["training"]["precompute_ref_log_probs"] = True
    cfg["models"]["dpo_h.dpo_s-1.0"] = {"parent": "dpo_h", "data": "safety", "loss": "dpo",
                                        "beta": 1.0, "training": {"learning_rate": 3e-4}}
    return cfg


def test_sweep_siblings_share_one_job_and_key_parts_split_it():
    plan = load_plan(sweep_config())
    jobs = plan.ref_logps_jobs
    assert sorted(jobs.values()) == [["dpo_h"],
                                     ["dpo_h.dpo_s-0.01", "dpo_h.dpo_s-0.1", "dpo_h.dpo_s-1.0"]]
    (reference, key), = [k for k, v in jobs.items() if len(v) == 3]
    assert reference == "dpo_h" and key.startswith("safety-dpo-")
    assert plan.align_ref_logps("dpo_h.dpo_s-1.0", 0) == [
        f"results/reduced-demo/seed-0/ref_logps/dpo_h/{key}.json"]
    spec = plan.ref_logps_spec(reference, key, 0)
    assert spec["reference"] == "dpo_h" and spec["data"] == "safety" and spec["seed"] == 0
    assert "learning_rate" not in spec["training"]  # not a key part: siblings still share

    for part, value in [("max_length", 80), ("max_prompt_length", 32), ("max_examples", 32),
                        ("bf16", True), ("precompute_ref_batch_size", 8),
                        ("per_device_train_batch_size", 8),
                        ("trl", {"truncation_mode": "keep_start"})]:
        cfg = sweep_config()
        cfg["models"]["dpo_h.dpo_s-1.0"]["training"][part] = value
        split = load_plan(cfg)
        assert split.ref_logps_key("dpo_h.dpo_s-1.0") != key, part
        assert split.ref_logps_key("dpo_h.dpo_s-0.1") == key, part

    cfg = sweep_config()
    cfg["models"]["dpo_h.dpo_s-1.0"]["training"]["precompute_ref_log_probs"] = False
    cfg["models"]["dpo_h.dpo_s-0.1"]["resources"] = {"gpu": 1}
    plan = load_plan(cfg)
    assert plan.align_ref_logps("dpo_h.dpo_s-1.0", 0) == []  # TRL keeps its reference
    assert plan.ref_logps_jobs[(reference, key)] == ["dpo_h.dpo_s-0.01", "dpo_h.dpo_s-0.1"]
    # the job runs with the stage's GPU resources: its reader with the most GPUs
    assert plan.ref_logps_consumer(reference, key) == "dpo_h.dpo_s-0.1"


def test_the_step_refuses_a_loss_without_reference_columns(tiny_models, tmp_path):
    from sacpo_steps.training.losses import Loss, registered

    free = Loss(name="reference_free", data="pairs", config="trl:DPOConfig",
                trainer="trl:DPOTrainer", loss_type="sigmoid", needs_reference=False,
                coefficient="test")
    data = write_rows(tmp_path / "rows.jsonl", "dpo")
    with registered(free), pytest.raises(InputError, match="reads no reference log-probs"):
        ref_logps.compute(tiny_models["stage1"], data, tmp_path / "r.json",
                          spec=spec_for("reference_free", copy.deepcopy(SETTINGS)))
