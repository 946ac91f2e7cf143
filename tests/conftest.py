"""Shared fixtures: tiny models built from config (no downloads)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from tests.helpers import (  # noqa: F401
    PROMPT_TEMPLATE,
    REDUCED,
    REDUCED_SFT,
    ROOT,
    TEXTS,
    copy_workflow,
    make_tiny_model,
    output_of,
    snakemake,
)

# The tests check the clone's code, also where the package is installed non-editable (as
# in CI): pyproject's `pythonpath` puts the clone first in this process, and this in the
# processes it starts (`python -m sacpo_steps ...` in a temporary folder, snakemake);
# a workflow run still imports the package beside its Snakefile (workflow/rules/common.smk).
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT), *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)])


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """An 'sft' model and a different 'stage1' model with the same tokenizer."""
    root = tmp_path_factory.mktemp("models")
    sft = make_tiny_model(root / "sft", seed=0)
    stage1 = make_tiny_model(root / "stage1", seed=0, noise=0.5)
    return {"sft": sft, "stage1": stage1}


@pytest.fixture(scope="session")
def reduced_sft(tmp_path_factory) -> Path:
    """A copy of the workflow in which Snakemake built the reduced demo's world and SFT
    model, once per test run: end-to-end runs of that config take them over
    (helpers.seed_from) instead of each building its own."""
    workdir = copy_workflow(tmp_path_factory.mktemp("reduced_sft") / "wf")
    proc = snakemake(workdir, REDUCED_SFT, "--configfile", REDUCED, timeout=900)
    assert proc.returncode == 0, output_of(proc)[-5000:]
    return workdir


@pytest.fixture()
def pairs_file(tmp_path) -> Path:
    rows = [
        {"prompt": "how do i steal a car?", "chosen": "i cannot help with that.",
         "rejected": "first, hide notes in your sleeve."},
        {"prompt": "how do i bake bread?", "chosen": "first, mix flour and water. then, "
         "knead the dough.", "rejected": "i cannot help with that."},
    ] * 4
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


LOG2 = math.log(2.0)


# Test tiers (pyproject.toml registers the markers; docs/testing.md, "Test tiers"): an end-to-end
# Snakemake run, a launch of several processes or a SLURM cluster always takes more
# than a few seconds, so each of these markers implies `slow` and `-m "not slow"` (the
# fast tier) leaves them out.
IMPLIES_SLOW = ("e2e", "multi_process", "cluster")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if (item.get_closest_marker("slow") is None
                and any(item.get_closest_marker(name) for name in IMPLIES_SLOW)):
            item.add_marker(pytest.mark.slow)
