"""The reduced demo through a real one-node SLURM cluster, compared with a local run.

`tests/slurm/setup.sh` brings up munge, MariaDB, slurmdbd, slurmctld and slurmd (two
fake GPUs as gres), and the reduced demo runs through `snakemake --profile
tests/slurm/profile` (the SLURM executor plugin). The same config runs locally at the
same time, in another copy of the workflow. The test checks that:

- every non-local job went through SLURM, once, and sacct reports each SLURM job
  COMPLETED (a group job: each of its jobs as a completed step too);
- the profile's job grouping happened (tests/slurm/profile, as profiles/slurm): the
  judge jobs went in 2 group jobs of 4, the 2 generations of each model in one, so
  SLURM saw fewer submissions than jobs; the training jobs (align, ref_logps,
  sft_checkpoint) each went alone;
- the jobs of the model given `resources: {gpu: 1}` were allocated a GPU (sacct's
  AllocTRES; its two generations, grouped, one GPU: they run one after the other)
  and the step that ran the rule saw CUDA_VISIBLE_DEVICES from the fake
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
import yaml

from tests.helpers import (
    ROOT,
    Job,
    copy_workflow,
    dry_run,
    reduced_config,
    seed_from,
    write_config,
)

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
# Rules the test profile groups (rule -> group name); training jobs must go alone.
GROUPS = yaml.safe_load((PROFILE / "config.yaml").read_text(encoding="utf-8"))["groups"]
TRAINING_RULES = {"align", "ref_logps", "sft_checkpoint"}
RUN_TIMEOUT = 900  # seconds, per snakemake run (killed with SIGKILL after that); ample on a
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
pytestmark = [pytest.mark.cluster, pytest.mark.e2e,
              pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]


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
    planned_gpus: dict[tuple[str, frozenset], int]
    slurm_dir: Path
    local_dir: Path
    slurm: subprocess.CompletedProcess
    local_rc: int
    local_output: str
    slurm_s: float
    local_s: float


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory, reduced_sft) -> Runs:
    base = tmp_path_factory.mktemp("slurm_vs_local")
    slurm_dir = copy_workflow(base / "slurm")
    local_dir = copy_workflow(base / "local")
    for workdir in (slurm_dir, local_dir):
        write_config(workdir / CONFIG, slurm_test_config())
    plan_output, planned = dry_run(slurm_dir, "--configfile", CONFIG)
    # SLURM builds everything; the local run, only the reference for the outputs, takes
    # over the test run's demo world and SFT model (resources are no params: the same jobs)
    seed_from(reduced_sft, local_dir)
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
    return Runs(planned, gpus_of(plan_output), slurm_dir, local_dir, slurm, local_rc,
                local_log.read_text(encoding="utf-8"), slurm_s, local_s)


@pytest.fixture(scope="module")
def done(runs) -> Runs:
    out = runs.slurm.stdout + runs.slurm.stderr
    assert runs.slurm.returncode == 0, f"SLURM run failed:\n{out[-6000:]}"
    assert runs.local_rc == 0, f"local run failed:\n{runs.local_output[-6000:]}"
    return runs


def gpus_of(output: str) -> dict[tuple[str, frozenset], int]:
    """(rule, wildcards) -> the `gpu` resource of each job block of a dry run."""
    gpus = {}
    for block in output.split("\nrule ")[1:]:
        rule = block.split(":", 1)[0]
        fields = dict(re.findall(r"^    (\w+): (.*)$", block, re.MULTILINE))
        wildcards = dict(kv.split("=", 1) for kv in fields.get("wildcards", "").split(", ") if kv)
        gpu = re.search(r"(?:^|, )gpu=(\d+)", fields.get("resources", ""))
        gpus[(rule, frozenset(wildcards.items()))] = int(gpu.group(1)) if gpu else 0
    return gpus


@dataclass
class SlurmJob:
    """One SLURM submission: a job alone (logs/slurm/rule_<rule>/<wildcards>/<id>.log)
    or a group job (logs/slurm/group_<group>_<rules>/<id>.log), and the jobs it ran."""

    folder: str
    jobid: str
    log: Path
    targets: list[tuple[str, dict[str, str]]]

    @property
    def is_group(self) -> bool:
        return self.folder.startswith("group_")

    @property
    def rules(self) -> set[str]:
        return {rule for rule, _ in self.targets}


def target_jobs(log: Path) -> list[tuple[str, dict[str, str]]]:
    """The jobs a SLURM job ran: the `--target-jobs rule:name=value,...` of the snakemake
    it started (the first `Command:` line of its log)."""
    for line in log.read_text(errors="replace").splitlines():
        if "--target-jobs " in line:
            args = line.split("--target-jobs ", 1)[1].split()
            specs = itertools.takewhile(lambda arg: not arg.startswith("--"), args)
            return [(rule, dict(kv.split("=", 1) for kv in wildcards.split(",") if kv))
                    for rule, _, wildcards in (spec.partition(":") for spec in specs)]
    return []


def slurm_jobs(workdir: Path) -> list[SlurmJob]:
    logdir = workdir / "logs" / "slurm"
    return [SlurmJob(path.relative_to(logdir).parts[0], path.stem, path, target_jobs(path))
            for path in sorted(logdir.rglob("*.log"))]


def sacct(jobids: list[str], steps: bool = False) -> dict[str, dict[str, str]]:
    """sacct's record of each job (the allocation; with steps, its steps too: <id>.<n>)."""
    fields = ["JobIDRaw" if not steps else "JobID", "State", "ExitCode", "AllocTRES"]
    proc = subprocess.run(["timeout", "-s", "KILL", "20", "sacct", "-n", "-P",
                           *([] if steps else ["-X"]),
                           "-j", ",".join(jobids), f"--format={','.join(fields)}"],
                          env=slurm_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    rows = [dict(zip(fields, line.split("|"), strict=True))
            for line in proc.stdout.splitlines() if line.strip()]
    return {row[fields[0]]: row for row in rows}


def sacct_settled(jobids: list[str], done, steps: bool = False) -> dict[str, dict[str, str]]:
    """sacct's records once `done(records)` holds (slurmdbd records the end of a job
    asynchronously), or the last ones after 10 s."""
    records = sacct(jobids, steps)
    for _ in range(20):
        if done(records):
            break
        time.sleep(0.5)
        records = sacct(jobids, steps)
    return records


TASK_LINE = re.compile(r"^sacpo-slurm-test task: job=(\d+) step=(\S+) "
                       r"CUDA_VISIBLE_DEVICES=(.*)$", re.MULTILINE)


def task_envs(log: Path) -> dict[str, str]:
    """Step id -> CUDA_VISIBLE_DEVICES that the TaskProlog printed for that step's task."""
    return {step: value for _, step, value in TASK_LINE.findall(log.read_text(errors="replace"))}


def matches(planned: Job, target: tuple[str, dict[str, str]]) -> bool:
    return (planned.rule, planned.wildcards) == target


def is_gpu_job(planned: Job) -> bool:
    model = planned.wildcards.get("aligned", planned.wildcards.get("model"))
    return planned.rule in ("align", "generate") and model == GPU_MODEL


def cluster_jobs(runs: Runs) -> list[Job]:
    return [j for j in runs.planned if j.rule not in LOCAL_RULES]


def test_every_cluster_job_went_through_slurm_and_completed(done):
    jobs = slurm_jobs(done.slurm_dir)
    # every planned non-local job ran in exactly one SLURM job, and no other job ran
    unmatched = cluster_jobs(done)
    assert len(unmatched) > 15
    for job in jobs:
        assert job.targets, f"no --target-jobs in {job.log}"
        for target in job.targets:
            found = next((p for p in unmatched if matches(p, target)), None)
            assert found is not None, f"unplanned or repeated job {target} in {job.log}"
            unmatched.remove(found)
    assert not unmatched, "planned jobs that did not go through SLURM"
    ids = [j.jobid for j in jobs]
    records = sacct_settled(ids, lambda r: all(r.get(i, {}).get("State") == "COMPLETED"
                                               for i in ids))
    not_completed = {(j.folder, j.jobid): records.get(j.jobid) for j in jobs
                     if records.get(j.jobid, {}).get("State") != "COMPLETED"}
    assert not not_completed
    assert all(records[i]["ExitCode"] == "0:0" for i in ids)
    # a group job runs each of its jobs as its own srun step: all of them completed
    groups = [j for j in jobs if j.is_group]
    assert groups

    def steps_of(records, job):
        return [r for key, r in records.items() if re.fullmatch(rf"{job.jobid}\.\d+", key)]

    steps = sacct_settled([j.jobid for j in groups], lambda r: all(
        len(steps_of(r, j)) == len(j.targets)
        and all(s["State"] == "COMPLETED" for s in steps_of(r, j)) for j in groups),
        steps=True)
    for job in groups:
        assert [s["State"] for s in steps_of(steps, job)] == ["COMPLETED"] * len(job.targets), (
            job.folder, job.jobid, steps_of(steps, job))
    # the jobs ran where the executor said: the step logs of the workflow are there too
    assert (done.slurm_dir / "logs/reduced-demo/seed-0/align" / f"{GPU_MODEL}.log").is_file()


def test_short_jobs_went_in_groups_and_training_jobs_alone(done):
    jobs = slurm_jobs(done.slurm_dir)
    planned = cluster_jobs(done)
    assert len(jobs) < len(planned)
    for job in jobs:
        if job.is_group:
            # a group job holds only grouped rules, and is named after its group
            assert job.rules <= set(GROUPS), (job.folder, job.targets)
            (rule,) = job.rules
            assert job.folder.startswith("group_") and job.folder.endswith(f"_{rule}")
        else:
            assert len(job.targets) == 1 and job.folder == f"rule_{job.targets[0][0]}"
            assert job.rules.isdisjoint(GROUPS), (job.folder, job.targets)
    # training jobs: one submission each
    for rule in TRAINING_RULES & {p.rule for p in planned}:
        alone = [j for j in jobs if j.rules == {rule}]
        assert all(not j.is_group and len(j.targets) == 1 for j in alone)
        assert len(alone) == sum(p.rule == rule for p in planned) > 0, rule
    # judges: 8 jobs in 2 group jobs of 4 (group-components: judges: 4)
    judges = [j for j in jobs if j.rules == {"judge"}]
    assert sorted(len(j.targets) for j in judges) == [4, 4]
    assert all(j.folder == "group_judges_judge" for j in judges)
    # generations: one group job per model, with both prompt sets
    generations = [j for j in jobs if j.rules == {"generate"}]
    models = {p.wildcards["model"] for p in planned if p.rule == "generate"}
    assert len(generations) == len(models) > 1
    for job in generations:
        (model,) = {w["model"] for _, w in job.targets}
        assert sorted(w["prompt_set"] for _, w in job.targets) == ["helpfulness", "red_team"]
        assert job.folder == f"group_gen-{model}-seed0_generate"


def test_gpu_jobs_got_a_fake_gpu_and_saw_cuda_visible_devices(done):
    jobs = slurm_jobs(done.slurm_dir)
    records = sacct([j.jobid for j in jobs])

    def gpus(planned: Job) -> int:
        return done.planned_gpus[(planned.rule, frozenset(planned.wildcards.items()))]

    gpu_planned = [p for p in done.planned if gpus(p) > 0]
    assert len([p for p in gpu_planned if is_gpu_job(p)]) == 3  # its align and 2 generate jobs
    # besides: the reference pass its align job reads (ref_logps takes the GPUs of the
    # node reading it with the most)
    assert all(p.rule == "ref_logps" for p in gpu_planned if not is_gpu_job(p))
    for job in jobs:
        gpu_targets = [t for t in job.targets if any(matches(p, t) for p in gpu_planned)]
        expect_gpu = bool(gpu_targets)
        assert not expect_gpu or len(gpu_targets) == len(job.targets), job
        # one GPU also for a group of 2 generations: they run one after the other
        assert ("gres/gpu=1" in records[job.jobid]["AllocTRES"]) == expect_gpu, (
            job, records[job.jobid])
        envs = task_envs(job.log)
        # the batch script's task and the tasks of the srun steps that ran the rules
        steps = {s: v for s, v in envs.items() if s.isdigit()}
        assert len(steps) == len(job.targets), f"TaskProlog lines in {job.log}:\n{envs}"
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
