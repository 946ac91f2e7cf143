"""A killed align job resumes from its last checkpoint; nothing finished-looking is left."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

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


def test_sigkill_then_rerun_resumes(tiny_models, pairs_file, tmp_path):
    """The job reads the shared reference pass (as every stage-2 node of a sweep does);
    the rerun attaches it again and resumes."""
    from sacpo_steps import ref_logps

    table = tmp_path / "ref_logps.json"
    key = ref_logps.reference_key_spec("dpo", SPEC["training"], PROMPT_TEMPLATE)
    ref_logps.compute(tiny_models["stage1"], pairs_file, table,
                      spec={"reference": "stage1", "data": "safety", **key, "seed": 0})
    out = tmp_path / "models" / "stage2"
    checkpoints = tmp_path / "scratch" / "stage2-abc"
    cmd = align_cmd(tiny_models["stage1"], pairs_file, out, checkpoints, table)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            done = [p for p in checkpoints.glob("checkpoint-*")
                    if (p / "trainer_state.json").is_file()]
            if done or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "training finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
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
