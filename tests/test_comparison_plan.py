"""The comparison section: what the plan refuses, and the jobs it asks for."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from sacpo_steps.plan import PlanError, load_plan
from tests.helpers import copy_workflow, dry_run, write_config

ROOT = Path(__file__).resolve().parent.parent


def comparison_config() -> dict:
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text(encoding="utf-8"))
    extra = yaml.safe_load((ROOT / "config" / "comparison.yaml").read_text(encoding="utf-8"))
    cfg["models"].update(extra["models"])
    cfg["comparison"] = extra["comparison"]
    cfg["seeds"] = [0, 1]
    return cfg


def test_the_comparison_config_plans_matched_searches_and_one_comparison_job():
    plan = load_plan(comparison_config())
    assert plan.matched_models == ["safedpo-0", "safedpo-2", "safedpo-10", "bso-2", "bso-10"]
    inputs = plan.matched_inputs("bso-2", 1)
    assert inputs["a"].endswith("seed-1/models/dpo_h")
    assert inputs["b"].endswith("seed-1/models/dpo_h.dpo_s-0.01")
    assert inputs["table"].endswith("seed-1/tables/winrate.csv")
    assert inputs["battles"].endswith("seed-1/tables/battles.csv")
    assert len(plan.comparison_matched()) == 10  # 5 models x 2 seeds
    assert len(plan.comparison_card_dirs()) == 2 * (len(plan.nodes) + len(plan.merges))
    outputs = plan.final_outputs([], [])
    assert any(o.endswith("/comparison/frontier.png") for o in outputs)
    assert any(o.endswith("/comparison/matched.md") for o in outputs)


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c["methods"].update(X=["nope"]), "comparison.methods.X: unknown model 'nope'"),
    (lambda c: c["methods"].update(X=["dpo_h"]), "already a model of method 'DPO(H)'"),
    (lambda c: c["match"].update(over_safe="dpo_h"), "comparison.match.over_safe"),
    (lambda c: c["match"].update(over_safe="p-sacpo-0.5"), "not a stage-2"),
    (lambda c: c["match"].update(models=["safedpo-7"]), "comparison.match.models"),
])
def test_bad_comparison_sections_are_refused_naming_the_key(change, message):
    cfg = comparison_config()
    change(cfg["comparison"])
    with pytest.raises(PlanError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_plan(copy.deepcopy(cfg))


def test_without_a_comparison_nothing_changes():
    cfg = comparison_config()
    del cfg["comparison"]
    plan = load_plan(cfg)
    assert plan.comparison is None and plan.matched_models == []
    assert not any("/comparison/" in o for o in plan.final_outputs([], []))


@pytest.mark.slow  # a dry run through Snakemake
def test_the_matched_search_runs_the_target_search_with_its_settings(tmp_path):
    """Both search rules take their shared params and arguments from one definition
    (workflow/rules/common.smk): with a target and a comparison in one config, a matched
    search's command is the target search's with only the target flags swapped."""
    workdir = copy_workflow(tmp_path / "wf")
    cfg = yaml.safe_load((workdir / "config" / "comparison.yaml").read_text(encoding="utf-8"))
    cfg["target"] = {"over_safe": "dpo_h.dpo_s-0.01", "value": 0.8, "lambda_bar": 10}
    output, _ = dry_run(workdir, "-p", "--configfile",
                        str(write_config(workdir / "config" / "both.yaml", cfg)))
    commands = [line.strip() for line in output.splitlines()
                if "python -m sacpo_steps target_search" in line]
    seed1 = [c for c in commands if "/seed-1/" in c]
    target = [c for c in seed1 if "--target " in c]
    matched = [c for c in seed1 if "--target-model bso-2 " in c]
    assert len(target) == len(matched) == 1, commands

    def flags(command: str, drop: set[str]) -> list[str]:
        words = command.split(" > ")[0].split()
        pairs = [(w, words[i + 1] if i + 1 < len(words) else "") for i, w in enumerate(words)]
        kept = [f"{w} {v}" for w, v in pairs if w.startswith("--") and w not in drop]
        return [k for k in kept if not k.startswith(("--out-json", "--out-md"))]

    target_only = {"--target", "--tolerance", "--lambda-bar", "--measure"}
    matched_only = {"--target-from", "--target-model", "--match-battles", "--tolerance",
                    "--measure"}
    assert flags(target[0], target_only) == flags(matched[0], matched_only)
    assert "--measure harmlessness_winrate" in matched[0]
    assert "--measure harmlessness_winrate" in target[0]  # the schema's default measure
    for flag in ("--judges", "--generation", "--rounds 1000", "--seed 1", "--threads"):
        assert flag in matched[0], flag
