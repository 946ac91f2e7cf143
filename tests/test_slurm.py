"""The reduced demo through a real one-node SLURM cluster, compared with a local run.

`tests/slurm/setup.sh` brings up munge, MariaDB, slurmdbd, slurmctld and slurmd (two
fake GPUs as gres), and the reduced demo runs through `snakemake --profile
tests/slurm/profile` (the SLURM executor plugin). The same config runs locally at the
same time, in another copy of the workflow. The test checks that:

- every non-local job went through SLURM (one SLURM log per job) and sacct reports
  each of them COMPLETED;
- the jobs of the model given `resources: {gpu: 1}` were allocated a GPU (sacct's
  AllocTRES) and the step that ran the rule saw CUDA_VISIBLE_DEVICES from the fake
  gres. Evidence without touching the steps: the test cluster's TaskProlog
  (tests/slurm/task_prolog.sh) prints every task's CUDA_VISIBLE_DEVICES into the
  job's SLURM log. The task of the inner `srun` step is the process that runs the
  job's snakemake, whose shell runs the step, so the step inherits that environment;
  torch on a CPU-only machine sees no CUDA device and the steps run on CPU;
- the win-rate table is byte-identical to the local run's, and so are the models'
  weights and all generations (the reduced demo's table is all ties, so it alone
  would hide a different training). Both runs give every job
  the same thread count (the config's `threads`, 1 per job; a SLURM job gets
  --cpus-per-task = threads and its inner snakemake keeps the rule's threads), and
  the steps are seeded, so nothing may differ.

Needs root and the Debian packages below (`.ci/run` installs them on CI); elsewhere it
is skipped with the reason. About 10 s of setup; the daemons are stopped by PID in the
fixture's finalizer, whatever happens.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT, Job, copy_workflow, dry_run, reduced_config, write_config

SLURM_DIR = ROOT / "tests" / "slurm"
SETUP = SLURM_DIR / "setup.sh"
TEARDOWN = SLURM_DIR / "teardown.sh"
PROFILE = SLURM_DIR / "profile"
STATE = Path(os.environ.get("SACPO_SLURM_STATE", "/tmp/sacpo-slurm-test"))
APT_PACKAGES = "slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
COMMANDS = ["munged", "munge", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld",
            "slurmd", "sbatch", "srun", "sacct", "sacctmgr", "scontrol", "squeue"]
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])

# The model whose jobs ask for a GPU (its own `resources:` apply to its align job and
# its generate jobs); all other jobs ask for none.
GPU_MODEL = "dpo_h.dpo_s-0.1"
# The workflow's local rules (workflow/rules/common.smk): the other planned jobs go to SLURM.
LOCAL_RULES = {"all", "winrate", "elo", "figures", "across_seeds", "figures_across_seeds"}
RUN_TIMEOUT = 600  # seconds, per snakemake run (killed with SIGKILL after that); ample on a
# loaded 2-core machine, where the run takes minutes, while a hung run still ends
CONFIG = "slurm_test.yaml"


def skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "SLURM test cluster: Linux only"
    if os.geteuid() != 0:
        return "SLURM test cluster: needs root to start munge, MariaDB and the SLURM daemons"
    missing = [c for c in COMMANDS if shutil.which(c, path=SEARCH_PATH) is None]
    if missing:
        if shutil.which("apt-get", path=SEARCH_PATH) is None:
            return (f"SLURM test cluster: {', '.join(missing)} not installed and no apt-get "
                    f"(needs the Debian packages {APT_PACKAGES})")
        return (f"SLURM test cluster: {', '.join(missing)} not installed; "
                f"run `apt-get install {APT_PACKAGES}` (.ci/run does)")
    return None


SKIP = skip_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]


def base_env() -> dict[str, str]:
    env = {**os.environ, "PATH": SEARCH_PATH, "PYTHON": sys.executable}
    # Only Slurm may set it: a value inherited from the caller would prove nothing.
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


# Secrets in the submitting shell reach every SLURM job (--export=ALL); none may be
# written to a SLURM log, a step log, results/ or .snakemake/.
CANARY = "sk-slurm-CANARY-7d2f1e"
SECRET_VARS = ("OPENAI_API_KEY", "HF_TOKEN")


def slurm_env() -> dict[str, str]:
    return {**base_env(), "SLURM_CONF": "/etc/slurm/slurm.conf",
            **dict.fromkeys(SECRET_VARS, CANARY)}


def slurm_test_config() -> dict:
    """The reduced demo with resources that fit the test node (2 CPUs here, small memory)."""
    cfg = reduced_config()
    small = {"mem_mb": 1000, "runtime": 15}
    cfg["resources"] = {"sft_checkpoint": dict(small), "generate": dict(small),
                        "align": {**small, "cpus_per_gpu": 1}}
    cfg["models"][GPU_MODEL]["resources"] = {"gpu": 1, "cpus_per_gpu": 1}
    return cfg


@dataclass
class Cluster:
    state: Path
    setup_s: float


@pytest.fixture(scope="module")
def cluster():
    try:
        started = time.monotonic()
        proc = subprocess.run(["timeout", "-s", "KILL", "120", "bash", str(SETUP), str(STATE)],
                              env=slurm_env(), capture_output=True, text=True, timeout=150)
        assert proc.returncode == 0, f"setup.sh failed:\n{proc.stdout}\n{proc.stderr}"
        yield Cluster(STATE, time.monotonic() - started)
    finally:
        subprocess.run(["timeout", "-s", "KILL", "60", "bash", str(TEARDOWN), str(STATE)],
                       env=slurm_env(), capture_output=True, timeout=90, check=False)


@dataclass
class Runs:
    planned: list[Job]
    slurm_dir: Path
    local_dir: Path
    slurm: subprocess.CompletedProcess
    local_rc: int
    local_output: str
    slurm_s: float
    local_s: float


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory) -> Runs:
    base = tmp_path_factory.mktemp("slurm_vs_local")
    slurm_dir = copy_workflow(base / "slurm")
    local_dir = copy_workflow(base / "local")
    for workdir in (slurm_dir, local_dir):
        write_config(workdir / CONFIG, slurm_test_config())
    _, planned = dry_run(slurm_dir, "--configfile", CONFIG)
    kill = ["timeout", "-s", "KILL", str(RUN_TIMEOUT)]
    snakemake = [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", CONFIG]
    # The local run goes on while SLURM runs the same DAG (each job has 1 thread), at a
    # low priority: the SLURM jobs come first, the local run fills the gaps between the
    # executor's status checks.
    local_log = base / "local_run.log"
    started, started_at = time.monotonic(), time.time()
    with open(local_log, "w", encoding="utf-8") as log:
        local = subprocess.Popen(["nice", "-n", "15", *kill, *snakemake], cwd=local_dir,
                                 env=base_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            slurm = subprocess.run([*kill, *snakemake, "--profile", str(PROFILE)],
                                   cwd=slurm_dir, env=slurm_env(), capture_output=True,
                                   text=True, timeout=RUN_TIMEOUT + 30)
            slurm_s = time.monotonic() - started
            local_rc = local.wait(timeout=RUN_TIMEOUT + 30)
            # the local run may have ended long before: its log's last write
            local_s = local_log.stat().st_mtime - started_at
        finally:
            if local.poll() is None:
                local.kill()
                local.wait()
    print(f"\nSLURM test: setup {cluster.setup_s:.1f} s, SLURM run {slurm_s:.1f} s, "
          f"local run {local_s:.1f} s (concurrent)")
    return Runs(planned, slurm_dir, local_dir, slurm, local_rc,
                local_log.read_text(encoding="utf-8"), slurm_s, local_s)


@pytest.fixture(scope="module")
def done(runs) -> Runs:
    out = runs.slurm.stdout + runs.slurm.stderr
    assert runs.slurm.returncode == 0, f"SLURM run failed:\n{out[-6000:]}"
    assert runs.local_rc == 0, f"local run failed:\n{runs.local_output[-6000:]}"
    return runs


@dataclass
class SlurmJob:
    rule: str
    wildcards: str
    jobid: str
    log: Path


def slurm_jobs(workdir: Path) -> list[SlurmJob]:
    """One per SLURM log: logs/slurm/rule_<rule>/<wildcards joined by _>/<jobid>.log."""
    logdir = workdir / "logs" / "slurm"
    jobs = []
    for path in sorted(logdir.rglob("*.log")):
        parts = path.relative_to(logdir).parts
        wildcards = parts[1] if len(parts) == 3 else ""
        jobs.append(SlurmJob(parts[0].removeprefix("rule_"), wildcards, path.stem, path))
    return jobs


def sacct(jobids: list[str]) -> dict[str, dict[str, str]]:
    """sacct's record of each job (the allocation, no steps)."""
    fields = ["JobIDRaw", "State", "ExitCode", "AllocTRES"]
    proc = subprocess.run(["timeout", "-s", "KILL", "20", "sacct", "-n", "-P", "-X",
                           "-j", ",".join(jobids), f"--format={','.join(fields)}"],
                          env=slurm_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    rows = [dict(zip(fields, line.split("|"), strict=True))
            for line in proc.stdout.splitlines() if line.strip()]
    return {row["JobIDRaw"]: row for row in rows}


TASK_LINE = re.compile(r"^sacpo-slurm-test task: job=(\d+) step=(\S+) "
                       r"CUDA_VISIBLE_DEVICES=(.*)$", re.MULTILINE)


def task_envs(log: Path) -> dict[str, str]:
    """Step id -> CUDA_VISIBLE_DEVICES that the TaskProlog printed for that step's task."""
    return {step: value for _, step, value in TASK_LINE.findall(log.read_text(errors="replace"))}


def matches(planned: Job, job: SlurmJob) -> bool:
    """The plugin names a job's log folder by its wildcard values joined by "_", in the
    job's own wildcard order (which differs between jobs of one rule): try every order."""
    return planned.rule == job.rule and job.wildcards in {
        "_".join(order) for order in itertools.permutations(planned.wildcards.values())}


def is_gpu_job(planned: Job) -> bool:
    model = planned.wildcards.get("aligned", planned.wildcards.get("model"))
    return planned.rule in ("align", "generate") and model == GPU_MODEL


def test_every_cluster_job_went_through_slurm_and_completed(done):
    jobs = slurm_jobs(done.slurm_dir)
    # one SLURM log per planned non-local job, and no other
    unmatched = [j for j in done.planned if j.rule not in LOCAL_RULES]
    assert len(unmatched) > 15
    for job in jobs:
        found = next((p for p in unmatched if matches(p, job)), None)
        assert found is not None, f"unplanned or repeated SLURM job {job}"
        unmatched.remove(found)
    assert not unmatched, "planned jobs that did not go through SLURM"
    records = sacct([j.jobid for j in jobs])
    for _ in range(20):  # slurmdbd records the end of a job asynchronously
        if all(records.get(j.jobid, {}).get("State") == "COMPLETED" for j in jobs):
            break
        time.sleep(0.5)
        records = sacct([j.jobid for j in jobs])
    not_completed = {(j.rule, j.wildcards, j.jobid): records.get(j.jobid) for j in jobs
                     if records.get(j.jobid, {}).get("State") != "COMPLETED"}
    assert not not_completed
    assert all(records[j.jobid]["ExitCode"] == "0:0" for j in jobs)
    # the jobs ran where the executor said: the step logs of the workflow are there too
    assert (done.slurm_dir / "logs/reduced-demo/seed-0/align" / f"{GPU_MODEL}.log").is_file()


def test_gpu_jobs_got_a_fake_gpu_and_saw_cuda_visible_devices(done):
    jobs = slurm_jobs(done.slurm_dir)
    records = sacct([j.jobid for j in jobs])
    gpu_planned = [p for p in done.planned if is_gpu_job(p)]
    assert len(gpu_planned) == 3  # its align job and 2 generate jobs
    for job in jobs:
        expect_gpu = any(matches(p, job) for p in gpu_planned)
        assert ("gres/gpu=1" in records[job.jobid]["AllocTRES"]) == expect_gpu, (
            job, records[job.jobid])
        envs = task_envs(job.log)
        # the batch script's task and the task of the srun step that ran the rule
        steps = {s: v for s, v in envs.items() if s.isdigit()}
        assert steps, f"no TaskProlog line for the srun step in {job.log}:\n{envs}"
        if expect_gpu:
            assert all(re.fullmatch(r"[01]", v) for v in steps.values()), (job.log, envs)
        else:
            assert not any(re.fullmatch(r"\d+", v) for v in envs.values()), (job.log, envs)


def test_win_rate_table_matches_the_local_run(done):
    name = Path("results", "reduced-demo", "seed-0", "tables", "winrate.csv")
    slurm_table = (done.slurm_dir / name).read_text(encoding="utf-8")
    local_table = (done.local_dir / name).read_text(encoding="utf-8")
    assert slurm_table == local_table, f"SLURM:\n{slurm_table}\nlocal:\n{local_table}"
    assert f"{GPU_MODEL}," in slurm_table


def test_weights_and_generations_match_the_local_run(done):
    """The reduced demo's table is all ties, so it alone would hide a different training:
    the aligned weights and every generation must be byte-identical too."""
    def outputs(workdir: Path) -> list[Path]:
        return sorted(p.relative_to(workdir) for pattern in
                      ("results/*/seed-*/models/*/*.safetensors",
                       "results/*/seed-*/generations/*/*.jsonl")
                      for p in workdir.glob(pattern))

    files = outputs(done.slurm_dir)
    assert files == outputs(done.local_dir)
    generate_jobs = [j for j in done.planned if j.rule == "generate"]
    assert len([f for f in files if f.suffix == ".jsonl"]) == len(generate_jobs) > 0
    differ = [str(f) for f in files
              if (done.slurm_dir / f).read_bytes() != (done.local_dir / f).read_bytes()]
    assert not differ


def test_secrets_in_the_environment_appear_in_no_slurm_output(done):
    """The canary API keys were in every job's environment: no file of the run, SLURM
    logs included, and nothing the run printed may contain them."""
    assert CANARY not in done.slurm.stdout + done.slurm.stderr
    files = [p for p in done.slurm_dir.rglob("*") if p.is_file()]
    assert any("slurm" in p.parts for p in files)  # the SLURM logs are among them
    leaked = [str(p) for p in files if CANARY.encode() in p.read_bytes()]
    assert not leaked
