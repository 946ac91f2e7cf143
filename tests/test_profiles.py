"""The SLURM profile resolves both as a path and, once copied, by name; resources per node."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.helpers import ROOT, copy_workflow


def dry_run(work, *args, env=None):
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", *args], cwd=work,
                          capture_output=True, text=True, env=env, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow
def test_slurm_profile_by_path_and_by_name(tmp_path):
    work = copy_workflow(tmp_path / "wf")
    code, out = dry_run(work, "--profile", "profiles/slurm")
    assert code == 0, out
    home = tmp_path / "home"
    shutil.copytree(ROOT / "profiles/slurm", home / ".config/snakemake/slurm")
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    code, out = dry_run(work, "--profile", "slurm", env=env)
    assert code == 0, out


def test_workflow_profile_sets_no_default_resources():
    """A workflow profile's default-resources would wipe the user's cluster profile's."""
    cfg = yaml.safe_load((ROOT / "profiles/default/config.yaml").read_text())
    assert "default-resources" not in cfg and "resources" not in cfg


def test_stage1_and_stage2_get_their_own_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    work = copy_workflow(tmp_path / "wf")
    code, out = dry_run(work, "--configfile", "config/paper.yaml", "-p")
    assert code == 0, out
    blocks = out.split("\nrule ")
    gpus = {}
    for block in blocks:
        if not block.startswith("align:"):
            continue
        wildcards = block.split("wildcards: ")[1].splitlines()[0]
        model = dict(kv.split("=", 1) for kv in wildcards.split(", "))["aligned"]
        resources = block.split("resources: ")[1].splitlines()[0]
        gpus[model] = int(resources.split("gpu=")[1].split(",")[0])
    assert gpus["dpo_h"] == gpus["kto_h"] == gpus["dpo_s"] == 8
    assert gpus["dpo_h.dpo_s-0.01"] == gpus["dpo_s.dpo_h-0.1"] == 2
    assert "accelerate launch --num_processes 8" in out
