"""Pinned kernels and fixed thread counts: set before torch loads, recorded, in the params."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from sacpo_steps.core import reproducibility
from sacpo_steps.plan import load_plan
from tests.helpers import PROMPT_TEMPLATE, ROOT, reduced_config

X86 = platform.machine().lower() in reproducibility.X86


@pytest.mark.skipif(not X86, reason="kernel pinning applies to x86-64 only")
def test_pinned_sets_every_library_but_keeps_what_the_user_set():
    env = {"SACPO_CPU_KERNELS": "pinned", "MKL_CBWR": "COMPATIBLE"}
    applied = reproducibility.apply(env)
    assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert env["OPENBLAS_CORETYPE"] == "Haswell"
    assert env["MKL_CBWR"] == "COMPATIBLE" and "MKL_CBWR" not in applied


def test_native_sets_nothing_and_gpu_determinism_sets_the_cublas_workspace():
    env = {"SACPO_CPU_KERNELS": "native"}
    assert reproducibility.apply(env) == {}
    env = {"SACPO_CPU_KERNELS": "native", "SACPO_GPU_DETERMINISTIC": "1"}
    assert reproducibility.apply(env) == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def test_job_env_refuses_an_unknown_setting():
    assert reproducibility.job_env({}) == {"SACPO_CPU_KERNELS": "pinned"}
    assert reproducibility.job_env({"cpu_kernels": "native", "gpu_deterministic": True}) == {
        "SACPO_CPU_KERNELS": "native", "SACPO_GPU_DETERMINISTIC": "1"}
    with pytest.raises(ValueError, match="cpu_kernels"):
        reproducibility.job_env({"cpu_kernels": "fast"})


def test_the_plan_fixes_thread_counts_only_when_pinned():
    cfg = reduced_config()
    cfg["threads"] = {"sft": 2, "align": 3, "generate": 1}
    plan = load_plan(cfg)
    assert plan.config["reproducibility"]["cpu_kernels"] == "pinned"  # the schema's default
    assert plan.torch_threads("align", 1) == 3  # Snakemake scaled it down to the cores
    cfg["reproducibility"] = {"cpu_kernels": "native"}
    assert load_plan(cfg).torch_threads("align", 1) == 1


def test_library_versions_enter_the_params_only_on_request():
    plan = load_plan(reduced_config())
    assert "libraries" not in plan.reproducibility
    cfg = reduced_config()
    cfg["reproducibility"] = {"rerun_on_library_change": True}
    libraries = load_plan(cfg).reproducibility["libraries"]
    assert set(libraries) >= {"torch", "transformers", "trl", "peft", "accelerate"}


def test_a_bad_setting_is_refused_at_plan_time():
    from sacpo_steps.plan import PlanError

    cfg = reduced_config()
    cfg["reproducibility"] = {"cpu_kernels": "fastest"}
    with pytest.raises(PlanError, match="reproducibility.cpu_kernels"):
        load_plan(cfg)


@pytest.mark.slow
@pytest.mark.skipif(not X86, reason="kernel pinning applies to x86-64 only")
@pytest.mark.parametrize("kernels", ["pinned", "native"])
def test_a_step_process_runs_and_records_the_kernels_asked_for(tiny_models, tmp_path, kernels):
    """`python -m sacpo_steps` applies the setting before torch loads: the generation
    record says which kernels torch used."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_id": "p1", "prompt": "how do i bake bread?"}) + "\n")
    out = tmp_path / "gen.jsonl"
    spec = {"prompt_template": PROMPT_TEMPLATE, "stop_markers": ["USER:"], "max_new_tokens": 4,
            "batch_size": 1}
    env = {k: v for k, v in os.environ.items()
           if k not in reproducibility.AVX2_MACHINE_ENV and not k.startswith("SACPO_")}
    env["SACPO_CPU_KERNELS"] = kernels
    proc = subprocess.run([sys.executable, "-m", "sacpo_steps", "generate", "--model-dir",
                           str(tiny_models["sft"]), "--model-name", "sft", "--prompts",
                           str(prompts), "--out", str(out), "--spec", json.dumps(spec),
                           "--threads", "1"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "gen.jsonl.record.json").read_text())
    runtime = record["runtime"]
    assert runtime["cpu_kernels"] == kernels
    assert record["measured"]["torch_threads"] == 1
    if kernels == "pinned":
        assert record["measured"]["torch_cpu_capability"] == "AVX2"
        assert runtime["env"] == reproducibility.PINNED_ENV
    else:
        assert runtime["env"] == {}


def test_the_entry_point_applies_the_setting_before_torch_or_numpy_loads():
    """torch reads ATEN_CPU_CAPABILITY lazily, but MKL and OpenBLAS read their variables
    when they load: `python -m sacpo_steps` must apply the setting first."""
    script = (
        "import sys\n"
        "import sacpo_steps.core.reproducibility as r\n"
        "real = r.apply\n"
        "def checked(*a, **k):\n"
        "    loaded = [m for m in ('torch', 'numpy') if m in sys.modules]\n"
        "    print('loaded before apply:', loaded)\n"
        "    return real(*a, **k)\n"
        "r.apply = checked\n"
        "from sacpo_steps.__main__ import main\n"
        "main(['align', '--help'])\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert "loaded before apply: []" in proc.stdout, proc.stdout + proc.stderr[-2000:]
