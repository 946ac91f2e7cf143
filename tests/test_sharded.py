"""The paper's sharded stage 1, proven on CPU: `accelerate launch` with the project's
config/accelerate/fsdp.yaml (FSDP2 full shard, transformer-layer wrap, full state dict
on save) and 2 processes over gloo; and config/accelerate/deepspeed_zero3.yaml the same
way when DeepSpeed is installed.

The tested accelerate configs are the project's files with `mixed_precision: no` (no
bf16 on CPU); nothing else in them changes. The device is set outside them, because
accelerate's multi-process launchers ignore the file's `use_cpu`: FSDP runs get
ACCELERATE_USE_CPU=true (a CPU process group over gloo) and DeepSpeed runs TRL's
`ddp_backend: gloo` (DeepSpeed itself falls back to its CPU accelerator).

accelerate 1.15 never turns FSDP on for a CPU run: at the end of `AcceleratorState`'s
init it makes a GPU-like distributed type FSDP, but leaves `MULTI_CPU` alone, so the
same launch would silently train plain data parallel. The launched processes therefore
run this module (`-m tests.test_sharded align ...`), which makes, for `MULTI_CPU`
only, the assignments accelerate makes on GPUs (`_fsdp_on_cpu`), adds a probe callback
(sharding facts, reference log-probs, logged losses, and a copy of the scratch folder
once checkpoint-3 is complete on every rank), then runs `python -m sacpo_steps align`
itself: the align step, TRL, accelerate's FSDP2 preparation and the checkpoint and
final saves are the cluster's code.

The runs are shared by the tests and started together by one module fixture (a launch
is mostly imports, so they overlap well): a 2-process FSDP run; a second 2-process job
on the copy of its scratch folder at checkpoint-3 (what a job killed right after that
checkpoint leaves; a real SIGKILL of a one-process job is tests/test_resume.py), which
must resume; the FSDP run in one process with the same global batch (in this process);
a 2-process LoRA run; a 2-process DeepSpeed ZeRO-3 run. A separate killed job would
cost one more launch (about 15 s of wall time here, measured).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sacpo_steps.core.schema import ACCELERATE_CONFIGS
from sacpo_steps.training.node import NodeSettings
from tests.helpers import PROMPT_TEMPLATE, TEXTS

ROOT = Path(__file__).resolve().parent.parent
PROBE_ENV = "SACPO_TEST_PROBE"  # folder the probe writes rank<r>.json into
SNAPSHOT_ENV = "SACPO_TEST_SNAPSHOT"  # "<step>:<folder>": copy the scratch folder there
WAIT_ENV = "SACPO_TEST_WAIT_FOR"  # a folder to wait for (after the imports) before training

# 8 distinct pairs, 2 per prompt: another order of the data changes every step's loss
PAIRS = [{"prompt": p, "chosen": TEXTS[i][1], "rejected": TEXTS[(i + k) % len(TEXTS)][1]}
         for k in (1, 2) for i, (p, _) in enumerate(TEXTS)]
STEPS = 6  # 8 pairs, global batch 4: 2 steps per epoch, 3 epochs
SAVE_STEPS = 3  # a checkpoint in the middle of epoch 2: the resumed run skips one batch
TRAINING = {"learning_rate": 1e-2, "num_train_epochs": 3, "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 1, "max_length": 64, "warmup_steps": 0.0,
            "logging_steps": 1, "save_steps": SAVE_STEPS, "gradient_checkpointing": True}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}

# Tolerances (float32 on CPU). One process with per-device batch 4 trains on the same 4
# examples per step as two processes with 2 each: accelerate's seeded sampler gives
# every process count the same permutation, and with 2 processes rank r takes batches
# r, r + 2, ... of 2. What differs is float summation order (two half-batch gradients
# averaged by the reduce-scatter against one whole-batch gradient; padding to each
# half's longest row), which Adam turns into weight differences far below one step
# (lr 1e-2; the 6 steps move weights by up to 3.5e-2). Measured: losses within 2e-7
# relative, weights within 6.7e-6. A resumed run repeats the uninterrupted run's
# arithmetic exactly (measured difference 0).
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-4
WEIGHT_ATOL_RESUME = 1e-6


# ---- running the align step ---------------------------------------------------------------

def cpu_config(name: str, dest: Path) -> Path:
    """The project's accelerate config `name` without bf16, and nothing else changed."""
    cfg = yaml.safe_load((ACCELERATE_CONFIGS / f"{name}.yaml").read_text(encoding="utf-8"))
    cfg["mixed_precision"] = "no"
    dest.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return dest


def align_job(world: dict, name: str, *, training: dict | None = None,
              distributed: str = "fsdp", scratch: Path | None = None) -> dict:
    """Where a run writes, and its spec."""
    root = world["root"] / name
    training = {**TRAINING, **(training or {})}
    if distributed == "deepspeed_zero3":
        training["trl"] = {"ddp_backend": "gloo"}  # the CPU's process group (GPUs: nccl)
    return {"name": name, "out": root / "models" / name, "scratch": scratch or root / "scratch",
            "distributed": distributed,
            "spec": {"name": name, "parent": "sft", "data": "helpfulness", "loss": "dpo",
                     "beta": 0.1, "training": training, "prompt_template": PROMPT_TEMPLATE,
                     "seed": 0}}


def new_probe_folder(job: dict) -> Path:
    folder = job["out"].parent.parent / f"probe-{time.monotonic_ns()}"
    folder.mkdir(parents=True)
    return folder


def read_probes(folder: Path) -> dict:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in folder.glob("rank*.json")}


def accelerate(world: dict, distributed: str, step_args: list[str], *, probe: Path,
               env_extra: dict[str, str] | None = None, timeout: int = 300
               ) -> subprocess.CompletedProcess:
    """`accelerate launch` with 2 processes of a step (this module's entry point)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
           "--config_file", str(world["configs"][distributed]),
           "--main_process_port", "0", "-m", "tests.test_sharded", *step_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "TQDM_DISABLE": "1", PROBE_ENV: str(probe), **(env_extra or {})}
    env.pop("ACCELERATE_USE_CPU", None)
    if distributed == "fsdp":
        # accelerate's multi-GPU launcher ignores the config's use_cpu: this is what
        # gives the processes one CPU (gloo) process group
        env["ACCELERATE_USE_CPU"] = "true"
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def launch(world: dict, job: dict, *, snapshot: Path | None = None,
           wait_for: Path | None = None, timeout: int = 300,
           extra: list[str] | None = None) -> dict:
    """The align step under `accelerate launch` with 2 processes, probed."""
    probe = new_probe_folder(job)
    env = {}
    if snapshot:
        env[SNAPSHOT_ENV] = f"{SAVE_STEPS}:{snapshot}"
    if wait_for:
        env[WAIT_ENV] = str(wait_for)
    started = time.monotonic()
    proc = accelerate(world, job["distributed"], [
        "align", "--parent-dir", str(world["parent"]), "--data", str(world["data"]),
        "--out", str(job["out"]), "--spec", json.dumps(job["spec"]),
        "--checkpoint-dir", str(job["scratch"]), "--threads", "1", *(extra or [])],
        probe=probe, env_extra=env, timeout=timeout)
    return {**job, "proc": proc, "probe": read_probes(probe),
            "seconds": time.monotonic() - started}


def launch_cached(world: dict) -> dict:
    """The shared reference pass under the same launch (2 processes, FSDP), then a
    2-process align job reading its file: a stage-2 sweep's path on the cluster."""
    job = align_job(world, "cached")
    table = job["out"].parent.parent / "ref_logps.json"
    key = {k: job["spec"][k] for k in ("loss", "prompt_template", "seed", "training")}
    spec = {"reference": "sft", "data": "helpfulness", **key}
    proc = accelerate(world, "fsdp", [
        "ref_logps", "--reference-dir", str(world["parent"]), "--data", str(world["data"]),
        "--out", str(table), "--spec", json.dumps(spec),
        "--scratch-dir", str(table.with_suffix(".scratch")), "--threads", "1"],
        probe=new_probe_folder(job))
    if proc.returncode != 0:
        return {**job, "proc": proc, "probe": {}, "table": table}
    return {**launch(world, job, extra=["--ref-logps", str(table)]), "table": table,
            "ref_proc": proc}


def run_here(world: dict, job: dict) -> dict:
    """The align step in this process (one process, no launcher), probed the same way."""
    import sacpo_steps.training.align as align_step

    probe = new_probe_folder(job)
    spec = job["spec"]
    started = time.monotonic()
    proc = subprocess.CompletedProcess([], 0, "", "")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_FSDP",
                    "ACCELERATE_USE_DEEPSPEED"):
            mp.delenv(var, raising=False)
        mp.setattr(align_step, "build_trainer", _probed(align_step.build_trainer, probe))
        try:
            align_step.align(world["parent"], world["data"], job["out"], name=spec["name"],
                             parent=spec["parent"], data=spec["data"],
                             settings=NodeSettings.from_dict(spec),
                             prompt_template=spec["prompt_template"], seed=spec["seed"],
                             checkpoint_dir=job["scratch"])
        except Exception:  # reported by the tests that use this run
            import traceback

            proc = subprocess.CompletedProcess([], 1, "", traceback.format_exc())
    return {**job, "proc": proc, "probe": read_probes(probe),
            "seconds": time.monotonic() - started}


def uninterrupted(world: dict, snapshot: Path) -> dict:
    """The 2-process FSDP run. Once every rank has finished checkpoint-3, rank 0 copies
    the scratch folder to `snapshot`: what a job killed right then leaves behind."""
    try:
        return launch(world, align_job(world, "fsdp"), snapshot=snapshot)
    finally:
        if not snapshot.exists():  # tell the resuming job not to wait
            snapshot.with_name(snapshot.name + ".missing").touch()


def succeeded(run: dict) -> dict:
    proc = run["proc"]
    assert proc.returncode == 0, (proc.stdout[-3000:] + proc.stderr[-6000:])
    return run


def load_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def logged(run: dict, key: str = "loss") -> list[float]:
    return [e[key] for e in run["probe"][0]["log_history"] if key in e and "train_runtime"
            not in e]


# ---- shared runs ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tiny_models, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sharded")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    configs = {name: cpu_config(name, root / f"{name}-cpu.yaml")
               for name in ("fsdp", "deepspeed_zero3")}
    return {"root": root, "parent": tiny_models["sft"], "data": data, "configs": configs}


@pytest.fixture(scope="module")
def runs(world) -> dict:
    """Every run of this module, all at once: a launched job spends most of its time
    importing, the one-process run trains here meanwhile. A run that failed fails only
    the tests that use it."""
    from concurrent.futures import ThreadPoolExecutor

    snapshot = world["root"] / "resumed" / "scratch"
    jobs = {"fsdp": lambda: uninterrupted(world, snapshot),
            # a second job on the snapshot (a requeued job): it imports meanwhile, then
            # waits for the snapshot, then must resume from checkpoint-3
            "resumed": lambda: launch(world, align_job(world, "resumed", scratch=snapshot),
                                      wait_for=snapshot),
            "lora": lambda: launch(world, align_job(world, "lora", training={
                "lora": LORA, "save_steps": 0})),
            "cached": lambda: launch_cached(world)}
    if importlib.util.find_spec("deepspeed") is not None:
        jobs["zero3"] = lambda: launch(world, align_job(world, "zero3",
                                                        distributed="deepspeed_zero3"))
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        done = {"single": run_here(world, align_job(
            world, "single", training={"per_device_train_batch_size": 4})),
                "single_lora": run_here(world, align_job(
            world, "single_lora", training={"per_device_train_batch_size": 4, "lora": LORA,
                                            "save_steps": 0}))}
        done.update({name: future.result() for name, future in futures.items()})
    return done


@pytest.fixture(scope="module")
def sharded(runs) -> dict:
    """Two processes, FSDP2 full shard, per-device batch 2: global batch 4."""
    return succeeded(runs["fsdp"])


@pytest.fixture(scope="module")
def single(runs) -> dict:
    """One process, per-device batch 4: the same global batch."""
    return succeeded(runs["single"])


@pytest.fixture(scope="module")
def resumed(runs) -> dict:
    return succeeded(runs["resumed"])


@pytest.fixture(scope="module")
def lora(runs) -> dict:
    """Two processes, FSDP, a LoRA adapter on q_proj and v_proj."""
    return succeeded(runs["lora"])


@pytest.fixture(scope="module")
def single_lora(runs) -> dict:
    return succeeded(runs["single_lora"])


@pytest.fixture(scope="module")
def zero3(runs) -> dict:
    """Two processes, DeepSpeed ZeRO-3 (parameters partitioned from the load on)."""
    if "zero3" not in runs:
        pytest.skip("DeepSpeed is not installed (pip install deepspeed): "
                    "config/accelerate/deepspeed_zero3.yaml is not tested here")
    return succeeded(runs["zero3"])


# ---- the tests -----------------------------------------------------------------------------

def test_tested_configs_are_the_projects_without_bf16(world):
    fsdp = yaml.safe_load((ACCELERATE_CONFIGS / "fsdp.yaml").read_text(encoding="utf-8"))
    assert fsdp["distributed_type"] == "FSDP" and fsdp["mixed_precision"] == "bf16"
    assert fsdp["fsdp_config"] == {**fsdp["fsdp_config"], "fsdp_version": 2,
                                   "fsdp_reshard_after_forward": True,  # FULL_SHARD
                                   "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                   "fsdp_state_dict_type": "FULL_STATE_DICT"}
    for name, tested in world["configs"].items():
        project = yaml.safe_load((ACCELERATE_CONFIGS / f"{name}.yaml").read_text("utf-8"))
        tested = yaml.safe_load(tested.read_text(encoding="utf-8"))
        assert {k for k in project.keys() | tested.keys()
                if project.get(k) != tested.get(k)} == {"mixed_precision"}, name


@pytest.mark.multi_process
def test_two_processes_really_shard_the_model(sharded):
    for rank in (0, 1):
        probe = sharded["probe"][rank]
        assert probe["distributed_type"] == "FSDP" and probe["fsdp_version"] == 2
        assert probe["processes"] == 2
        # every parameter is a DTensor sharded on dim 0; each rank holds about half
        assert probe["sharded_params"] == probe["params"] > 0
        assert probe["local_numel"] <= probe["full_numel"] / 2 + probe["params"]
        # the transformer layer is its own FSDP unit (transformer-based wrap)
        assert "FSDPLlamaDecoderLayer" in probe["fsdp_units"]
    assert "rank 1 of 2 done" in sharded["proc"].stderr


@pytest.mark.multi_process
def test_rank0_writes_one_ordinary_model_folder(sharded, world):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = sharded["out"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md",
                 "sacpo.json"):
        assert (out / name).is_file(), name
    assert not (out / "training_args.bin").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["fsdp"]  # nothing stray
    assert not sharded["scratch"].exists()
    card = json.loads((out / "sacpo.json").read_text())["training"]
    assert card["global_batch_size"] == 4 and card["steps"] == STEPS
    weights, parent = load_weights(out), load_weights(world["parent"])
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in parent.items()}
    assert max_abs_diff(weights, parent) > 1e-3  # it trained
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(PROMPT_TEMPLATE.format(prompt=TEXTS[0][0]), return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 5


@pytest.mark.multi_process
def test_reference_pass_under_fsdp_is_the_parent(sharded, world):
    """TRL reloads the reference from the parent's path under FSDP and shards it: the
    precomputed log-probs must be the parent's, and step 0 is exactly log 2."""
    from tests.test_align import sequence_logps

    probe = sharded["probe"][0]
    expected = sequence_logps(world["parent"], probe["examples"])
    for got, want in zip(probe["ref_logps"], expected, strict=True):
        assert got == pytest.approx(want, abs=1e-3)
    assert logged(sharded)[0] == pytest.approx(math.log(2), abs=1e-5)
    assert logged(sharded, "rewards/margins")[0] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.multi_process
def test_a_sharded_node_reading_the_shared_reference_pass_trains_the_same(runs, sharded):
    """The ref_logps step under the FSDP launch writes TRL's own values; a sharded align
    job reading them loads no reference copy, runs no reference forward, and trains
    the model the job with its own pass trains."""
    cached = succeeded(runs["cached"])
    stored = json.loads(cached["table"].read_text())
    own = sharded["probe"][0]["ref_logps"]
    assert [list(p) for p in zip(*stored["values"], strict=True)] == own
    assert cached["probe"][0]["ref_logps"] == own
    assert "(no reference forward)" in cached["proc"].stderr
    assert logged(cached) == logged(sharded)
    diff = max_abs_diff(load_weights(cached["out"]), load_weights(sharded["out"]))
    print(f"\nmax |w(file) - w(own pass)| = {diff:.3g}")
    assert diff < WEIGHT_ATOL_RESUME


@pytest.mark.multi_process
def test_one_process_and_two_shards_train_the_same_model(sharded, single):
    two, one = logged(sharded), logged(single)
    assert len(two) == len(one) == STEPS
    print(f"\nloss 1 process:  {one}\nloss 2 processes: {two}")
    assert two == pytest.approx(one, rel=LOSS_RTOL)
    assert len(set(round(x, 4) for x in two)) > 3  # the loss moves: the order matters
    diff = max_abs_diff(load_weights(sharded["out"]), load_weights(single["out"]))
    print(f"max |w(2 processes) - w(1 process)| = {diff:.3g}")
    assert diff < WEIGHT_ATOL
    assert single["probe"][0]["distributed_type"] == "NO"


@pytest.mark.multi_process
def test_interrupted_sharded_job_resumes_to_the_same_weights(sharded, resumed):
    left = sharded["probe"][0]["snapshot"]
    assert left["checkpoints"] == [f"checkpoint-{SAVE_STEPS}"]
    # FSDP's full state dicts of the model and of the sharded optimizer, gathered
    for name in ("pytorch_model_fsdp.bin", "optimizer.bin", "trainer_state.json",
                 "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth"):
        assert name in left["files"], name
    rerun = resumed
    card = json.loads((rerun["out"] / "sacpo.json").read_text())["training"]
    assert card["resumed_from"] == f"checkpoint-{SAVE_STEPS}" and card["steps"] == STEPS
    assert f"resuming from {rerun['scratch']}/checkpoint-{SAVE_STEPS}" in rerun["proc"].stderr
    # the log history: steps 1-3 restored from the checkpoint, 4-6 trained by the rerun
    assert logged(rerun) == pytest.approx(logged(sharded), rel=LOSS_RTOL)
    diff = max_abs_diff(load_weights(rerun["out"]), load_weights(sharded["out"]))
    print(f"\nmax |w(resumed) - w(uninterrupted)| = {diff:.3g}")
    assert diff < WEIGHT_ATOL_RESUME
    assert not rerun["scratch"].exists()


@pytest.mark.multi_process
def test_lora_under_fsdp_is_saved_merged(lora, single_lora, world):
    out = lora["out"]
    assert not (out / "adapter_config.json").exists()  # a full model, not an adapter
    assert lora["probe"][0]["distributed_type"] == "FSDP"
    weights, parent = load_weights(out), load_weights(world["parent"])
    assert weights.keys() == parent.keys()
    changed = {k for k in weights if (weights[k] - parent[k]).abs().max().item() > 1e-6}
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed), changed
    # the reference is the adapter-disabled parent: step 0 is log 2
    assert logged(lora)[0] == pytest.approx(math.log(2), abs=1e-5)
    # the adapter gathered from both ranks is the one a single process trains
    assert logged(lora) == pytest.approx(logged(single_lora), rel=LOSS_RTOL)
    diff = max_abs_diff(weights, load_weights(single_lora["out"]))
    print(f"\nmax |w(LoRA merged, 2 processes) - w(1 process)| = {diff:.3g}")
    assert diff < WEIGHT_ATOL


@pytest.mark.multi_process
def test_deepspeed_zero3_partitions_and_trains_the_same_model(zero3, single, world):
    for rank in (0, 1):
        probe = zero3["probe"][rank]
        assert probe["distributed_type"] == "DEEPSPEED" and probe["zero_stage"] == 3
        assert probe["processes"] == 2
        assert probe["sharded_params"] == probe["params"] > 0  # every parameter partitioned
        assert probe["local_numel"] <= probe["full_numel"] / 2 + probe["params"]
    out = zero3["out"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["zero3"]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not zero3["scratch"].exists()
    assert logged(zero3) == pytest.approx(logged(single), rel=LOSS_RTOL)  # log 2 first
    diff = max_abs_diff(load_weights(out), load_weights(single["out"]))
    print(f"\nmax |w(ZeRO-3, 2 processes) - w(1 process)| = {diff:.3g}")
    assert diff < WEIGHT_ATOL


def test_processes_that_do_not_form_one_job_are_refused(world, monkeypatch):
    """Launched as 2 processes but without a process group (what `accelerate launch`
    gives on a machine without GPUs unless ACCELERATE_USE_CPU is set): each would train
    alone on half the global batch, so the step refuses before training."""
    from sacpo_steps.core.errors import InputError
    from sacpo_steps.training.align import align
    from sacpo_steps.training.settings import TrainingConfig

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = world["root"] / "alone" / "models" / "alone"
    with pytest.raises(InputError, match="launched as 2 processes, but the trainer sees 1"):
        align(world["parent"], world["data"], out, name="alone", parent="sft",
              data="helpfulness",
              settings=NodeSettings("dpo", 0.1,
                                    TrainingConfig.from_dict({**TRAINING, "max_steps": 1})),
              prompt_template=PROMPT_TEMPLATE, checkpoint_dir=world["root"] / "alone" / "s")
    assert not out.exists() and not any(out.parent.iterdir())


# ---- inside the launched processes ---------------------------------------------------------

def _fsdp_on_cpu() -> None:
    """Let accelerate enable FSDP for a CPU (gloo) run, as it does for GPUs.

    At the end of `AcceleratorState.__init__`, accelerate turns a GPU-like distributed
    type into FSDP when the launcher asked for it, hands the state the plugin and
    copies the type to the `PartialState`; for `MULTI_CPU` it skips that. This does the
    same assignments afterwards, for a CPU run only.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if (self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None
                and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"):
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type

    AcceleratorState.__init__ = init


def _probe(trainer, examples: list[dict], folder: Path):
    """A callback that records sharding, the reference log-probs and the logged losses."""
    from transformers import TrainerCallback

    rank = int(os.environ.get("RANK", "0"))
    facts: dict = {}
    if rank == 0:
        data = trainer.train_dataset  # built from `examples`, in their order
        facts["examples"] = examples
        facts["ref_logps"] = [list(p) for p in zip(data["ref_chosen_logps"],
                                                    data["ref_rejected_logps"], strict=True)]

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            from accelerate.state import AcceleratorState
            from torch.distributed.fsdp import FSDPModule
            from torch.distributed.tensor import DTensor, Shard

            def sizes(p):  # (numel held by this rank, numel of the whole parameter)
                if isinstance(p, DTensor):  # FSDP2
                    return p.to_local().numel(), p.numel()
                if hasattr(p, "ds_numel"):  # DeepSpeed ZeRO-3
                    return p.ds_tensor.numel(), p.ds_numel
                return p.numel(), p.numel()

            acc = AcceleratorState()
            params = list(model.parameters())
            ds_plugin = getattr(acc, "deepspeed_plugin", None)
            facts.update(
                distributed_type=str(acc.distributed_type).split(".")[-1],
                fsdp_version=getattr(getattr(acc, "fsdp_plugin", None), "fsdp_version", None),
                zero_stage=getattr(ds_plugin, "zero_stage", None),
                processes=acc.num_processes, params=len(params),
                sharded_params=sum(1 for p in params
                                   if (isinstance(p, DTensor) and tuple(p.placements)
                                       == (Shard(0),))
                                   or sizes(p)[0] < sizes(p)[1]),
                local_numel=sum(sizes(p)[0] for p in params),
                full_numel=sum(sizes(p)[1] for p in params),
                fsdp_units=sorted({type(m).__name__ for m in model.modules()
                                   if isinstance(m, FSDPModule)}))

        def on_save(self, args, state, control, **kwargs):
            step, _, copy_to = os.environ.get(SNAPSHOT_ENV, "").partition(":")
            if step == str(state.global_step):
                import shutil

                import torch.distributed as dist

                dist.barrier()  # every rank has written its part of the checkpoint
                if rank == 0:
                    scratch, copy_to = Path(args.output_dir), Path(copy_to)
                    checkpoint = scratch / f"checkpoint-{step}"
                    facts["snapshot"] = {
                        "checkpoints": sorted(p.name for p in scratch.glob("checkpoint-*")),
                        "files": sorted(p.name for p in checkpoint.iterdir())}
                    shutil.copytree(scratch, copy_to.with_name(copy_to.name + ".tmp"))
                    os.rename(copy_to.with_name(copy_to.name + ".tmp"), copy_to)
                dist.barrier()  # nobody touches the scratch folder before the copy is done

        def on_train_end(self, args, state, control, **kwargs):
            facts["log_history"] = state.log_history
            (folder / f"rank{rank}.json").write_text(json.dumps(facts))

    return Probe()


def _probed(build, folder: Path):
    """`build_trainer` that adds the probe callback to the trainer it returns."""
    def build_and_probe(parent_dir, examples, settings, **kwargs):
        trainer = build(parent_dir, examples, settings, **kwargs)
        trainer.add_callback(_probe(trainer, examples, folder))
        return trainer

    return build_and_probe


def _launched_main(argv: list[str]) -> None:
    import sacpo_steps.training.align as align_step
    from sacpo_steps.__main__ import main

    _fsdp_on_cpu()
    if os.environ.get(WAIT_ENV):
        import trl  # noqa: F401  (the slow imports overlap the job this one waits for)

        folder, deadline = Path(os.environ[WAIT_ENV]), time.monotonic() + 280
        while not folder.exists():
            if (folder.with_name(folder.name + ".missing").exists()
                    or time.monotonic() > deadline):
                raise SystemExit(f"{folder} never appeared: nothing to resume from")
            time.sleep(0.1)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        # DeepSpeed's CPU accelerator would first compile its shared-memory allreduce
        # (a C++ extension, over a minute); gloo does the same collectives
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__ = {**deepspeed.ops.__compatible_ops__,
                                            "deepspeed_shm_comm": False}
    align_step.build_trainer = _probed(align_step.build_trainer,
                                       Path(os.environ[PROBE_ENV]))
    main(argv)


if __name__ == "__main__":
    _launched_main(sys.argv[1:])
