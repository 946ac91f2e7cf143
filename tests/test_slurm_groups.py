"""The SLURM profiles' job groups (issue 14), checked without SLURM.

profiles/slurm and tests/slurm/profile group the short jobs (judging; the generations
of one model) into group jobs, one SLURM submission each. Here: the groups name only
rules of the workflow, never a training rule or a local rule; every grouped rule takes
the group's only slot, so that a group's request covers its jobs run one after another
(the SLURM plugin's jobstep runs them so); and a dry run of the reduced demo through
the SLURM executor forms the expected group jobs, whose requests
(snakemake.resources.GroupResources, as bench/slurm_jobs.py computes them) add up the
members' runtime and take the largest member's memory and GPUs.
tests/test_slurm.py runs the groups through a real SLURM cluster.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from tests.helpers import REDUCED, ROOT, copy_workflow, dry_run

PROFILES = {"profiles/slurm": ROOT / "profiles" / "slurm",
            "tests/slurm/profile": ROOT / "tests" / "slurm" / "profile"}
#: GPU training (and building the SFT model): one allocation, walltime and requeue each
NEVER_GROUPED = {"align", "ref_logps", "sft_checkpoint"}


def profile(name: str) -> dict:
    return yaml.safe_load((PROFILES[name] / "config.yaml").read_text(encoding="utf-8"))


def bench():
    """bench/slurm_jobs.py as a module (its dry-run parser and group requests)."""
    spec = importlib.util.spec_from_file_location("slurm_jobs", ROOT / "bench" / "slurm_jobs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def local_rules() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "workflow" / "rules").glob("*.smk"):
        text = path.read_text(encoding="utf-8")
        for block in re.findall(r"^localrules:[ \t]*\n((?:[ \t]+[\w, \t]*\n)+)", text, re.M):
            names.update(n for n in re.split(r"[\s,]+", block) if n)
    return names


@pytest.fixture(scope="module")
def workflow_rules(tmp_path_factory) -> set[str]:
    """The rules of the demo, the reduced demo and the paper's config (all must have
    every grouped rule)."""
    work = copy_workflow(tmp_path_factory.mktemp("rules") / "wf")
    env = {**os.environ, "OPENAI_API_KEY": "sk-test-not-a-real-key"}
    found = []
    for args in ([], ["--configfile", REDUCED], ["--configfile", "config/paper.yaml"]):
        proc = subprocess.run([sys.executable, "-m", "snakemake", "--list-rules", *args],
                              cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        found.append({line.strip() for line in proc.stdout.splitlines()
                      if re.fullmatch(r"\s*\w[\w.-]*\s*", line)})
    return set.intersection(*found)


def test_local_rules_are_found():
    assert {"download_model", "winrate", "figures"} <= local_rules()


@pytest.mark.slow
@pytest.mark.parametrize("name", PROFILES)
def test_groups_name_cluster_rules_never_training_or_local_ones(name, workflow_rules):
    cfg = profile(name)
    groups = cfg["groups"]
    assert {"judge", "generate"} <= set(groups)
    assert set(groups) <= workflow_rules, set(groups) - workflow_rules
    assert not set(groups) & NEVER_GROUPED
    # a group holding a local rule would run entirely on the login node
    assert not set(groups) & local_rules()
    # every group has its number of jobs per submission, and nothing else has one
    assert set(cfg["group-components"]) == set(groups.values())
    assert all(isinstance(n, int) and n >= 1 for n in cfg["group-components"].values())


@pytest.mark.parametrize("name", PROFILES)
def test_every_grouped_job_takes_the_groups_only_slot(name):
    """Snakemake sizes a group as if jobs side by side shared it; the SLURM plugin runs
    them one after another. One slot per group (counted per submission), taken by each
    grouped job: one job per layer, so -t is the sum of the members' runtime."""
    cfg = profile(name)
    assert cfg["resources"]["group_slots"] == 1
    assert cfg["set-resource-scopes"]["group_slots"] == "local"
    assert {rule: cfg["set-resources"][rule]["group_slots"] for rule in cfg["groups"]} == (
        dict.fromkeys(cfg["groups"], 1))


def test_both_profiles_group_the_same_rules_the_same_way():
    slurm, test = profile("profiles/slurm"), profile("tests/slurm/profile")
    assert slurm["groups"] == test["groups"]
    for key in ("resources", "set-resource-scopes", "set-resources"):
        assert slurm[key] == test[key], key


def test_dry_run_of_the_reduced_demo_forms_the_group_jobs(tmp_path):
    work = copy_workflow(tmp_path / "wf")
    output, _ = dry_run(work, "--profile", "profiles/slurm", "--configfile", REDUCED)
    slurm_jobs = bench()
    jobs, groups = slurm_jobs.parse_dry_run(output)
    members: dict[int, list] = defaultdict(list)
    for job in jobs:
        if job.group is not None:
            members[job.group].append(job)
    cfg = profile("profiles/slurm")
    assert groups and set(members) == set(groups)
    # every judge and generate job is in a group job; nothing else is
    assert all((job.group is not None) == (job.rule in cfg["groups"]) for job in jobs)
    judges = [m for g, m in members.items() if groups[g] == "judges"]
    assert sorted(len(m) for m in judges) == [4, 4]  # the reduced demo's 8 judge jobs
    generations = {g: m for g, m in members.items() if groups[g].startswith("gen-")}
    assert sum(len(m) for m in generations.values()) == 10  # 5 models x 2 prompt sets
    for g, gen in generations.items():
        # one model, both prompt sets, named after the model
        (model,) = {job.outputs[0].split("/generations/")[1].split("/")[0] for job in gen}
        assert groups[g] == f"gen-{model}-seed0"
        assert sorted(Path(job.outputs[0]).stem for job in gen) == ["helpfulness", "red_team"]
    # what each group job asks for: its jobs in series
    deps = slurm_jobs.dependencies(jobs)
    constraints = slurm_jobs.submit_constraints(cfg, cores=2, judge_api=None)
    for g, group in members.items():
        request = slurm_jobs.group_request(group, deps, constraints)
        assert request["runtime"] == sum(job.resources["runtime"] for job in group), groups[g]
        assert request["mem_mb"] == max(job.resources["mem_mb"] for job in group)
        assert request.get("gpu", 0) == max(job.resources.get("gpu", 0) for job in group)
        assert request["_cores"] == max(job.threads for job in group)
