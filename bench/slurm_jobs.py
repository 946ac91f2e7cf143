"""How many SLURM submissions a run makes, with and without the SLURM profile's job groups.

Why (issue 14): every SLURM submission waits in the queue on its own, and the paper's
run has some 300 short cluster jobs (judging, generation). `profiles/slurm/config.yaml`
groups them (`groups:`, `group-components:`); this script measures what that buys and
what it costs, from two dry runs of the same config through the SLURM executor
(`snakemake -n --executor slurm` prints each group job with its members; nothing is
submitted, no SLURM is needed):

- "without grouping": the profile minus its `groups` and `group-components`;
- "with the profile's groups": the profile as it is.

For each it prints the cluster jobs (the non-local ones), the SLURM submissions they
make (a group job counts once), and the critical path: the longest chain of
submissions from the first to the last, counted in submissions (each one a queue
wait) and in summed declared runtime (minutes of walltime asked for, `-t`). A group's
runtime is what Snakemake asks SLURM for: its jobs stacked in layers as wide as the
constraints allow (`--cores`, the profile's `resources:`, the judge's API slots),
layers summed (snakemake.resources.GroupResources.basic_layered, called on the
parsed jobs). Local jobs (the workflow's `localrules:`, and `all`) run on the login
node: they take no submission and no time in the chain.

Usage:

    python bench/slurm_jobs.py [--configfile config/paper.yaml] [--profile profiles/slurm]
                               [--cores 16] [--keep DIR]

`--cores` is the `--cores` of the submitting snakemake (the README uses `all`, the
login node's cores): it also caps how many jobs of a group run side by side. Missing
API keys of the config's judge are set to a dummy value for the dry run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: profile keys that make the groups; "without grouping" drops them
GROUP_KEYS = ("groups", "group-components")
#: environment variables a dry run of a config with an API judge or hub models needs
DUMMY_ENV = ("OPENAI_API_KEY",)

GROUP_LINE = re.compile(r"^(?:\[[^\]]*\] )?Group job (\S+) \(jobs in lexicogr\. order\):$")
RULE_LINE = re.compile(r"^( *)(?:local)?(?:rule|checkpoint) (\w[\w.-]*):$")
FIELD_LINE = re.compile(r"^ +(\w+): (.*)$")


@dataclass
class Job:
    rule: str
    group: int | None = None  # index of its group job in the dry run, or None
    jobid: int = -1
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    threads: int = 1
    resources: dict[str, int] = field(default_factory=dict)


def parse_dry_run(output: str) -> tuple[list[Job], dict[int, str]]:
    """The jobs of a dry run and the names of its group jobs (by index)."""
    jobs: list[Job] = []
    groups: dict[int, str] = {}
    current: Job | None = None
    group: int | None = None
    for line in output.splitlines():
        if match := GROUP_LINE.match(line):
            group = len(groups)
            groups[group] = match.group(1)
            current = None
            continue
        if match := RULE_LINE.match(line):
            member = bool(match.group(1))
            if not member:
                group = None
            current = Job(match.group(2), group if member else None)
            jobs.append(current)
            continue
        if current is not None and (match := FIELD_LINE.match(line)):
            key, value = match.groups()
            if key == "input":
                current.inputs = value.split(", ")
            elif key == "output":
                current.outputs = value.split(", ")
            elif key == "jobid":
                current.jobid = int(value)
            elif key == "threads":
                current.threads = int(value)
            elif key == "resources":
                for item in value.split(", "):
                    name, _, val = item.partition("=")
                    if val.isdigit():
                        current.resources[name] = int(val)
        elif line and not line.startswith(" "):
            current = None
    return jobs, groups


def local_rules() -> set[str]:
    """The rule names of the workflow's `localrules:` directives."""
    names: set[str] = set()
    rules = sorted((ROOT / "workflow" / "rules").glob("*.smk"))
    for path in [ROOT / "workflow" / "Snakefile", *rules]:
        text = path.read_text(encoding="utf-8")
        for block in re.findall(r"^localrules:[ \t]*\n((?:[ \t]+[\w, \t]*\n)+)", text, re.M):
            names.update(n for n in re.split(r"[\s,]+", block) if n)
    return names


@dataclass
class Measure:
    cluster_jobs: int
    submissions: int
    group_jobs: int
    chain_submissions: int
    chain_runtime: int
    chain_rules: list[str]
    longest_request: int


def dependencies(jobs: list[Job]) -> dict[int, set[int]]:
    """jobid -> the jobids whose outputs it reads."""
    producer = {out: job for job in jobs for out in job.outputs}
    return {job.jobid: {producer[f].jobid for f in job.inputs if f in producer} for job in jobs}


def group_request(members: list[Job], deps: dict[int, set[int]],
                  constraints: dict[str, int]) -> dict[str, int | str]:
    """What Snakemake asks SLURM for a group job of these jobs: its resources, as the
    submitting snakemake computes them (GroupResources.basic_layered) from the jobs in
    toposort levels, under the constraints (`_cores`: --cores, and --resources)."""
    from snakemake.resources import GroupResources, Resources

    class Stand:  # what basic_layered reads of a job
        pipe_group = None

        def __init__(self, job: Job):
            self.resources = {**job.resources, "_cores": job.threads}

    inside = {j.jobid for j in members}
    level: dict[int, int] = {}

    def depth(jobid: int) -> int:
        if jobid not in level:
            level[jobid] = 1 + max((depth(d) for d in deps[jobid] if d in inside), default=-1)
        return level[jobid]

    levels: dict[int, list[Stand]] = defaultdict(list)
    for job in members:
        levels[depth(job.jobid)].append(Stand(job))
    return GroupResources.basic_layered([levels[i] for i in sorted(levels)],
                                        Resources.from_mapping(constraints), run_local=False)


def measure(jobs: list[Job], groups: dict[int, str], constraints: dict[str, int]) -> Measure:
    local = local_rules()
    deps = dependencies(jobs)
    by_id = {job.jobid: job for job in jobs}

    def node(job: Job) -> tuple[str, int]:
        """A submission (a group job, or a cluster job alone) or a local job."""
        if job.group is not None:
            return ("group", job.group)
        return ("local" if job.rule in local or not job.outputs else "job", job.jobid)

    members: dict[tuple[str, int], list[Job]] = defaultdict(list)
    for job in jobs:
        members[node(job)].append(job)
    edges: dict[tuple[str, int], set[tuple[str, int]]] = defaultdict(set)
    for job in jobs:
        for dep in deps[job.jobid]:
            if node(by_id[dep]) != node(job):
                edges[node(job)].add(node(by_id[dep]))

    def runtime(key: tuple[str, int]) -> int:
        kind, _ = key
        if kind == "local":
            return 0
        if kind == "job":
            return members[key][0].resources.get("runtime", 0)
        return int(group_request(members[key], deps, constraints)["runtime"])

    @cache
    def longest(key: tuple[str, int]) -> tuple[int, int, tuple[str, ...]]:
        """(summed runtime, submissions, rules) of the longest chain ending in `key`,
        by runtime (then by submissions)."""
        best = max((longest(dep) for dep in edges[key]), default=(0, 0, ()))
        size = len(members[key])
        name = (f"{groups[key[1]]} ({size} job{'s' * (size > 1)})" if key[0] == "group"
                else members[key][0].rule)
        own = key[0] != "local"
        return (best[0] + runtime(key), best[1] + own, best[2] + ((name,) if own else ()))

    @cache
    def most_submissions(key: tuple[str, int]) -> int:
        return max((most_submissions(dep) for dep in edges[key]), default=0) + (
            key[0] != "local")

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    submissions = [key for key in members if key[0] != "local"]
    chain = max(longest(key) for key in members)
    return Measure(
        cluster_jobs=sum(len(members[key]) for key in submissions),
        submissions=len(submissions),
        group_jobs=sum(key[0] == "group" for key in submissions),
        chain_submissions=max(most_submissions(key) for key in members),
        chain_runtime=chain[0],
        chain_rules=list(chain[2]),
        longest_request=max(runtime(key) for key in submissions),
    )


def dry_run(profile: dict, configfile: Path, cores: int, workdir: Path) -> str:
    profile_dir = workdir / "profile"
    profile_dir.mkdir(parents=True)
    (profile_dir / "config.yaml").write_text(yaml.safe_dump(profile), encoding="utf-8")
    env = dict(os.environ)
    for name in DUMMY_ENV:
        env.setdefault(name, "dummy-for-a-dry-run")
    # the SLURM executor (from the profile) in a dry run: group jobs are printed as such
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(ROOT / "Snakefile"),
         "--profile", str(profile_dir), "--configfile", str(configfile),
         "--cores", str(cores), "--directory", str(workdir / "run")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.exit(f"dry run failed:\n{output[-4000:]}")
    return output


def judge_slots(configfile: Path) -> int | None:
    from sacpo_steps.plan import load_plan

    config = yaml.safe_load(configfile.read_text(encoding="utf-8"))
    return load_plan(config, source=str(configfile), base_dir=ROOT).judge_api_slots()


def submit_constraints(profile: dict, cores: int, judge_api: int | None) -> dict[str, int]:
    """The constraints a group's layers must fit, as in the submitting snakemake: --cores,
    --jobs, the profile's --resources, and the judge's API slots (workflow/rules/common.smk)."""
    constraints: dict[str, int] = {"_cores": cores, "_nodes": int(profile.get("jobs", 1))}
    constraints.update(profile.get("resources") or {})
    if judge_api:
        constraints.setdefault("judge_api", judge_api)
    return constraints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configfile", type=Path, default=ROOT / "config" / "paper.yaml")
    parser.add_argument("--profile", type=Path, default=ROOT / "profiles" / "slurm")
    parser.add_argument("--cores", type=int, default=16)
    parser.add_argument("--keep", type=Path, help="keep the dry runs' output in this folder")
    args = parser.parse_args()
    configfile = args.configfile.resolve()
    grouped = yaml.safe_load((args.profile / "config.yaml").read_text(encoding="utf-8"))
    plain = {k: v for k, v in grouped.items() if k not in GROUP_KEYS}

    slots = judge_slots(configfile)
    constraints = submit_constraints(grouped, args.cores, slots)

    results = {}
    with tempfile.TemporaryDirectory(prefix="slurm_jobs_") as tmp:
        for label, profile in (("without grouping", plain), ("with the profile's groups", grouped)):
            workdir = Path(tmp) / label.split()[0]
            output = dry_run(profile, configfile, args.cores, workdir)
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                (args.keep / f"{label.split()[0]}.txt").write_text(output, encoding="utf-8")
            results[label] = measure(*parse_dry_run(output), constraints)

    before, after = results.values()
    rows = [
        ("cluster jobs (non-local)", "cluster_jobs"),
        ("SLURM submissions", "submissions"),
        ("of which group jobs", "group_jobs"),
        ("longest chain of submissions (queue waits)", "chain_submissions"),
        ("critical path, summed declared runtime (min)", "chain_runtime"),
        ("longest walltime one submission asks for (min)", "longest_request"),
    ]
    def rel(path: Path) -> Path:
        path = path.resolve()
        return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path

    print(f"`{rel(configfile)}`, profile `{rel(args.profile)}`, --cores {args.cores}"
          + (f", judge API slots {slots}" if slots else "") + "\n")
    print(f"| | {' | '.join(results)} |")
    print("|---|" + "---:|" * len(results))
    for title, key in rows:
        print(f"| {title} | {getattr(before, key):,} | {getattr(after, key):,} |")
    print()
    for label, result in results.items():
        print(f"critical path {label}: {' -> '.join(result.chain_rules)}")


if __name__ == "__main__":
    main()
