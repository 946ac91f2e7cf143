"""The safety target search on the demo (`config/demo-target.yaml`), through Snakemake.

One real run of the demo world with dual-use requests: SFT, DPO(H), its over-safe child
(beta/lambda = 0.01), the SFT baseline's generations, then the search. The config's
target lies between DPO(H)'s and the over-safe model's harmlessness: the search must
find a merge whose interval meets it and which is more helpful than the over-safe
model. A second config asks for more than the over-safe model reaches: only the search
reruns, and it ends with the message naming the model to retrain.

The run is deployed, not copied: Snakemake runs the clone's workflow/Snakefile
(`-s`) in a temporary folder outside the repository that holds only the config
(`--directory`), the way a snakedeploy `module` sets it up, with the package the
Snakefile's clone holds.
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from tests.helpers import ROOT, dry_run, output_of, snakemake, write_config

CONFIG = "config/demo-target.yaml"
SEED0 = "results/demo-target/seed-0"
SEARCH = (f"{SEED0}/target/search.json", f"{SEED0}/target/search.md")
#: the clone's workflow, run from elsewhere
ENTRY = ("-s", str(ROOT / "workflow" / "Snakefile"))

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    base = tmp_path_factory.mktemp("target_demo")
    work = base / "my-experiment"  # the user's folder: only their config
    work.mkdir()
    shutil.copy2(ROOT / CONFIG, work / "demo-target.yaml")
    proc = snakemake(base, *ENTRY, "--directory", str(work), *SEARCH,
                     "--configfile", str(work / "demo-target.yaml"), timeout=1200)
    assert proc.returncode == 0, output_of(proc)[-6000:]
    # results, logs and caches went to the folder, nothing else was made there
    assert {p.name for p in work.iterdir() if not p.name.startswith(".")} <= {
        "demo-target.yaml", "results", "logs", "resources", "scratch"}
    assert (work / SEARCH[0]).is_file() and not (base / "results").exists()
    return work


def load(work, name="search.json"):
    return json.loads((work / SEED0 / "target" / name).read_text())


def test_target_between_the_two_models_is_met_with_more_help_than_the_over_safe(demo):
    cfg = yaml.safe_load((ROOT / CONFIG).read_text())
    target = cfg["target"]["value"]
    result = load(demo)
    by_q = {m["q"]: m for m in result["trace"]}
    reward_aligned, over_safe = by_q[0.0], by_q[1.0]
    # the target is strictly between the two ends' measured harmlessness
    assert reward_aligned["constraint"] < target < over_safe["constraint_low"]
    assert result["met"] and 0.0 < result["q"] < 1.0
    chosen = result["chosen"]
    assert chosen["q"] == result["q"] and chosen["constraint_low"] >= target
    # the most helpful feasible merge is more helpful than the over-safe model
    assert chosen["helpfulness"] > over_safe["helpfulness"]
    # every q below the chosen one that was tried misses the target (bisection)
    assert all(m["constraint_low"] < target for q, m in by_q.items() if q < result["q"])
    # ... and the gain, paired over prompts, is the difference of the two win rates
    gain, low, high = result["helpfulness_gain"]
    assert gain == pytest.approx(chosen["helpfulness"] - over_safe["helpfulness"], abs=1e-9)
    assert 0 < low <= gain <= high  # measured +0.122 [+0.077, +0.167]; > 0 on seeds 0-2
    assert result["lambda_approx"] == pytest.approx(result["q"] * cfg["target"]["lambda_bar"])
    md = (demo / SEARCH[1]).read_text()
    assert f"q = {result['q']:g} meets the target {target}" in md and "approximate" in md


def test_target_above_the_over_safe_model_names_the_model_to_retrain(demo, tmp_path):
    over = yaml.safe_load((ROOT / CONFIG).read_text())
    over["target"]["value"] = 0.99
    config = write_config(demo / "over_target.yaml", over)
    _, jobs = dry_run(demo, *ENTRY, *SEARCH, "--configfile", str(config))
    assert [j.rule for j in jobs] == ["target_search"]  # no training, no other evaluation
    proc = snakemake(demo, *ENTRY, *SEARCH, "--configfile", str(config), timeout=600)
    assert proc.returncode == 0, output_of(proc)[-6000:]
    result = load(demo)
    assert result["met"] is False and result["q"] is None
    assert [m["q"] for m in result["trace"]] == [1.0]  # q = 1 misses: nothing else to try
    assert result["trace"][0]["constraint_low"] < 0.99
    for text in (result["message"], (demo / SEARCH[1]).read_text(),
                 (demo / "logs/demo-target/seed-0/target_search/target_search.log").read_text()):
        assert "dpo_h.dpo_s-0.01" in text and "smaller beta/lambda" in text
