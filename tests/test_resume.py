"""A killed align job resumes from its last checkpoint; nothing finished-looking is left."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from sacpo_steps.training.node import NodeSettings
from tests.helpers import PROMPT_TEMPLATE

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


SPEC = {"name": "stage2", "parent": "stage1", "data": "safety", "loss": "dpo", "beta": 0.1,
            "prompt_template": PROMPT_TEMPLATE, "seed": 0,
            "training": {"learning_rate": 1e-3, "num_train_epochs": 40,
                         "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                         "max_length": 64, "warmup_steps": 0.0, "logging_steps": 1,
                         "save_steps": 5}}


def align_cmd(parent, data, out, checkpoints, ref_logps):
    spec = SPEC
    return [sys.executable, "-m", "sacpo_steps", "align", "--parent-dir", str(parent),
            "--data", str(data), "--out", str(out), "--spec", json.dumps(spec),
            "--checkpoint-dir", str(checkpoints), "--threads", "1", "--ref-logps", str(ref_logps)]


@pytest.mark.slow
def test_sigkill_then_rerun_resumes(tiny_models, pairs_file, tmp_path):
    """The job reads the shared reference pass (as every stage-2 node of a sweep does);
    the rerun attaches it again and resumes."""
    from sacpo_steps.training import ref_logps, reference

    table = tmp_path / "ref_logps.json"
    key = reference.reference_key_spec("dpo", SPEC["training"], PROMPT_TEMPLATE)
    ref_logps.compute(tiny_models["stage1"], pairs_file, table,
                      spec={"reference": "stage1", "data": "safety", **key, "seed": 0})
    out = tmp_path / "models" / "stage2"
    checkpoints = tmp_path / "scratch" / "stage2-abc"
    cmd = align_cmd(tiny_models["stage1"], pairs_file, out, checkpoints, table)
    _kill_after_first_checkpoint(cmd, checkpoints)
    assert not out.exists()  # no folder that looks finished
    killed_at = max(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*")
                    if (p / "trainer_state.json").is_file())
    assert killed_at >= 5

    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    card = json.loads((out / "sacpo.json").read_text())
    assert card["training"]["resumed_from"].startswith("checkpoint-")
    assert int(card["training"]["resumed_from"].split("-")[1]) >= killed_at
    assert card["training"]["steps"] == 40 * 4  # 8 pairs / batch 2 = 4 steps per epoch
    assert card["reference_logps"] == str(table)
    assert "(no reference forward)" in rerun.stderr
    resumed_at = int(card["training"]["resumed_from"].split("-")[1])
    # throughput counts what this run trained: the steps after the checkpoint
    assert card["throughput"]["samples"] == 2 * (160 - resumed_at)  # pairs, batch 2
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not checkpoints.exists()  # finished: scratch removed
    assert sorted(p.name for p in out.parent.iterdir()) == ["stage2"]
    assert table.is_file()  # the shared file stays for the node's siblings


def _kill_after_first_checkpoint(cmd, checkpoints):
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if any((p / "trainer_state.json").is_file() for p in checkpoints.glob("checkpoint-*")):
                break
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "training finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_a_checkpoint_of_a_retrained_parent_is_not_resumed(tiny_models, pairs_file, tmp_path):
    """Stop stage 2 after a checkpoint, retrain stage 1 with another beta, rerun stage 2:
    no resume, the log says why, and the weights equal a fresh run's."""
    import torch
    from safetensors.torch import load_file

    from sacpo_steps.training.align import align
    from sacpo_steps.training.settings import TrainingConfig

    short = TrainingConfig.from_dict({**SPEC["training"], "num_train_epochs": 2,
                                      "save_steps": 0})
    stage1 = tmp_path / "models" / "stage1"

    def train_stage1(beta):
        shutil.rmtree(stage1, ignore_errors=True)
        align(tiny_models["sft"], pairs_file, stage1, name="stage1", parent="sft",
              data="helpfulness", settings=NodeSettings("dpo", beta, short),
              prompt_template=PROMPT_TEMPLATE)

    train_stage1(0.1)
    spec = {**SPEC, "training": {**SPEC["training"], "num_train_epochs": 15}}

    def stage2_cmd(out, checkpoints):
        return [sys.executable, "-m", "sacpo_steps", "align", "--parent-dir", str(stage1),
                "--data", str(pairs_file), "--out", str(out), "--spec", json.dumps(spec),
                "--checkpoint-dir", str(checkpoints), "--threads", "1"]

    out, checkpoints = tmp_path / "models" / "stage2", tmp_path / "scratch" / "stage2-abc"
    _kill_after_first_checkpoint(stage2_cmd(out, checkpoints), checkpoints)
    assert any(checkpoints.glob("checkpoint-*")) and not out.exists()

    train_stage1(0.5)  # the user fixed stage 1; the scratch folder's key did not change
    rerun = subprocess.run(stage2_cmd(out, checkpoints), cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "not resuming from" in rerun.stderr
    assert "input parent 'stage1' is now" in rerun.stderr
    card = json.loads((out / "sacpo.json").read_text())
    assert card["training"]["resumed_from"] is None
    assert card["record"]["inputs"]["parent"]["fingerprint"] == \
        json.loads((stage1 / "sacpo.json").read_text())["record"]["fingerprint"]

    fresh = tmp_path / "models" / "stage2-fresh"
    proc = subprocess.run(stage2_cmd(fresh, tmp_path / "scratch" / "fresh"), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = load_file(out / "model.safetensors"), load_file(fresh / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_other_library_versions_or_none_is_set_aside(tmp_path, caplog):
    from sacpo_steps.core import lineage
    from sacpo_steps.training.align import CHECKPOINT_RECORD, checkpoints_of

    record = lineage.make_record("align", settings={"beta": 0.1}, inputs={})
    folder = tmp_path / "scratch"
    (folder / "checkpoint-5").mkdir(parents=True)
    (folder / "checkpoint-5" / "trainer_state.json").write_text("{}")
    checkpoints_of(folder, record, owner=True)  # no record: made before records existed
    assert not (folder / "checkpoint-5").exists()
    assert "no lineage record" in caplog.text

    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "trainer_state.json").write_text("{}")
    checkpoints_of(folder, record, owner=True)  # the same model: kept
    assert (folder / "checkpoint-5").is_dir()

    upgraded = {**record, "libraries": {**record["libraries"], "trl": "9.9.9"}}
    upgraded["fingerprint"] = lineage.fingerprint_of(upgraded)
    checkpoints_of(folder, upgraded, owner=True)
    assert not (folder / "checkpoint-5").exists()
    assert "the library versions changed" in caplog.text
    assert json.loads((folder / CHECKPOINT_RECORD).read_text()) == upgraded


def test_other_ranks_wait_for_this_jobs_record_before_they_look_for_checkpoints(tmp_path):
    """A stale record from the parent's old training is there at once: the other ranks
    must not take it, but wait until rank 0 has set the old checkpoints aside."""
    import threading

    from sacpo_steps.core import lineage
    from sacpo_steps.training.align import CHECKPOINT_RECORD, checkpoints_of, last_checkpoint

    old = lineage.make_record("align", settings={"beta": 0.1}, inputs={})
    new = lineage.make_record("align", settings={"beta": 0.2}, inputs={})
    folder = tmp_path / "scratch"
    (folder / "checkpoint-5").mkdir(parents=True)
    (folder / "checkpoint-5" / "trainer_state.json").write_text("{}")
    (folder / CHECKPOINT_RECORD).write_text(json.dumps(old))
    seen = {}

    def other_rank():
        checkpoints_of(folder, new, owner=False)
        seen["checkpoint"] = last_checkpoint(folder)

    waiter = threading.Thread(target=other_rank)
    waiter.start()
    time.sleep(1.0)
    assert waiter.is_alive()  # the old record does not release it
    checkpoints_of(folder, new, owner=True)
    waiter.join(timeout=30)
    assert not waiter.is_alive() and seen["checkpoint"] is None
