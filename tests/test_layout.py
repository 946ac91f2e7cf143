"""The folder layout: experiments side by side, seeds, shared downloads keyed by content."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from sacpo_steps.core.layout import Layout, SeedError, config_seeds, hub_key, url_key
from sacpo_steps.plan import PlanError, load_plan, resolve_extends

ROOT = Path(__file__).resolve().parent.parent


def config(name: str = "config/config.yaml") -> dict:
    return yaml.safe_load((ROOT / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("cfg, seeds", [
    ({}, (0,)), ({"seed": 3}, (3,)), ({"seeds": [0, 1, 2]}, (0, 1, 2)), ({"seeds": [5]}, (5,)),
])
def test_a_scalar_seed_is_a_one_element_list(cfg, seeds):
    assert config_seeds(cfg) == seeds


@pytest.mark.parametrize("cfg, message", [
    ({"seed": 0, "seeds": [1]}, "give one of them"),
    ({"seeds": []}, "non-empty list"),
    ({"seeds": [0, 0]}, "lists a seed twice"),
    ({"seeds": [-1]}, "non-negative"),
    ({"seeds": [True]}, "non-negative integers"),
])
def test_bad_seeds_are_refused(cfg, message):
    with pytest.raises(SeedError, match=message):
        config_seeds(cfg)


def test_the_plan_refuses_seed_and_seeds_together():
    cfg = config()
    cfg["seeds"] = [0, 1]
    cfg["seed"] = 0
    with pytest.raises(PlanError, match="seed and seeds"):
        load_plan(cfg, source="x.yaml")
    del cfg["seed"]
    assert load_plan(cfg, source="x.yaml").seeds == (0, 1)


def test_everything_of_a_seed_lives_under_the_experiment_and_seed():
    cfg = config()
    cfg["experiment"] = "exp-a"
    cfg["demo_world"].pop("seed", None)  # the world follows the run's seed
    load_plan(cfg)
    layout = Layout.from_config(cfg)
    for path in (layout.model_dir("dpo_h", 2), layout.model_dir("sft", 2),
                 layout.world_dir(2), layout.data_dir("demo", 2),
                 layout.generation("dpo_h", "red_team", 2),
                 layout.battle("red_team", "dpo_h", "sft", 2),
                 layout.seed_table("winrate.csv", 2), layout.seed_figure("figure2.png", 2),
                 layout.target("search.json", 2), layout.prompt_set_file("red_team", 2),
                 layout.preference_table("demo", 2)):
        assert path.startswith("results/exp-a/seed-2/"), path
    assert layout.table("winrate.csv") == "results/exp-a/tables/winrate.csv"
    assert layout.figure("figure2.png") == "results/exp-a/figures/figure2.png"
    assert layout.log("align", "dpo_h", 2) == "logs/exp-a/seed-2/align/dpo_h.log"
    assert layout.log("across_seeds", "x", None) == "logs/exp-a/across_seeds/x.log"
    assert layout.scratch(2) == "scratch/exp-a/seed-2"
    # the default keeps the wildcard for the rules
    assert layout.model_dir("dpo_h") == "results/exp-a/seed-{seed}/models/dpo_h"


def test_a_pinned_world_is_shared_by_the_seeds():
    cfg = config()
    cfg["demo_world"]["seed"] = 7
    layout = Layout.from_config(cfg)
    assert layout.world_dir(0) == layout.world_dir(1) == f"results/{cfg['experiment']}/demo_world"
    assert layout.world_seed_for(3) == 7
    cfg["demo_world"].pop("seed")
    layout = Layout.from_config(cfg)
    assert layout.world_dir(1) != layout.world_dir(0)
    assert layout.world_seed_for(3) == 3


def test_downloads_are_shared_and_keyed_by_content_not_by_name():
    paper = config("config/paper.yaml")
    load_plan(paper)
    other = copy.deepcopy(paper)
    other["experiment"] = "other"
    other["sft"]["name"] = "alpaca"  # another name for the same snapshot
    a, b = Layout.from_config(paper), Layout.from_config(other)
    assert a.model_dir("sft") == b.model_dir("alpaca") == \
        "resources/models/PKU-Alignment--alpaca-7b-reproduced@main"
    assert a.model_dir("beaver-7b-v1.0") == "resources/models/PKU-Alignment--beaver-7b-v1.0@main"
    assert a.preference_table("pku") == b.preference_table("pku") == \
        "resources/datasets/PKU-Alignment--PKU-SafeRLHF-30K@main"
    assert a.prompt_set_file("red_team") == b.prompt_set_file("red_team")
    assert a.prompt_set_file("red_team").startswith("resources/prompts/")
    assert a.prompt_set_file("red_team").endswith("/red_team.jsonl")  # the judge reads the stem
    # a pinned revision or a conversion is another snapshot
    assert hub_key("org/m", "abc123") != hub_key("org/m", "main") != \
        hub_key("org/m", "main", convert_bin=True)
    assert url_key({"url": "u", "prompt_field": "p"}) != url_key({"url": "v", "prompt_field": "p"})
    assert set(a.hub_models().values()) == {"sft", "beaver-7b-v1.0"}


def test_a_constant_baseline_has_no_model_folder():
    cfg = config()
    cfg["baselines"] = {"refuse": {"source": "constant", "answer": "i cannot help with that."}}
    load_plan(cfg)
    layout = Layout.from_config(cfg)
    assert layout.constant_models() == ["refuse"]
    with pytest.raises(ValueError, match="constant"):
        layout.model_dir("refuse")


@pytest.mark.parametrize("baseline, message", [
    ({"source": "constant"}, r"needs \['answer'\]"),
    ({"source": "constant", "answer": "no", "repo_id": "x/y"}, r"\['repo_id'\] do not apply"),
    ({"source": "hub"}, r"needs \['repo_id'\]"),
    ({"source": "local"}, r"needs \['path'\]"),
    ({"source": "hub", "repo_id": "x/y", "answer": "no"}, r"\['answer'\] do not apply"),
])
def test_baseline_keys_are_checked_at_plan_time(baseline, message):
    cfg = config()
    cfg["baselines"] = {"b": baseline}
    with pytest.raises(PlanError, match=rf"baselines\.b: .*{message}"):
        load_plan(cfg, source="x.yaml")


def test_demo_seeds_is_the_default_demo_on_three_seeds():
    cfg = resolve_extends(config("config/demo-seeds.yaml"), ROOT)
    plan = load_plan(cfg)
    assert plan.seeds == (0, 1, 2) and cfg["experiment"] == "demo-seeds"
    default = config()
    load_plan(default)  # fills the same defaults
    assert {k: v for k, v in cfg.items() if k not in ("experiment", "seeds")} == \
        {k: v for k, v in default.items() if k != "experiment"}


def test_extends_merges_mappings_and_refuses_cycles_and_missing_files(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(
        {"experiment": "a", "training": {"learning_rate": 1, "epochs": 2}, "seeds": [0]}))
    cfg = resolve_extends({"extends": "base.yaml", "training": {"epochs": 3}, "seeds": [4]},
                          tmp_path)
    assert cfg == {"experiment": "a", "training": {"learning_rate": 1, "epochs": 3},
                   "seeds": [4]}
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(PlanError, match="extends itself"):
        resolve_extends({"extends": "loop.yaml"}, tmp_path)
    with pytest.raises(PlanError, match="cannot read nowhere.yaml"):
        resolve_extends({"extends": "nowhere.yaml"}, tmp_path)


def test_extends_resolves_against_the_config_files_own_folder_first(tmp_path):
    """A user's folder outside the clone: `extends: base.yaml` names the file beside the
    config, and that file's own `extends:` is relative to its folder; a path found only
    under the clone's root (`config/config.yaml`) still resolves there."""
    clone, mine = tmp_path / "clone", tmp_path / "mine"
    (clone / "config").mkdir(parents=True)
    (mine / "shared").mkdir(parents=True)
    (clone / "config" / "demo.yaml").write_text(yaml.safe_dump({"experiment": "demo",
                                                               "seeds": [0], "a": 1}))
    (mine / "shared" / "base.yaml").write_text(yaml.safe_dump(
        {"extends": "middle.yaml", "experiment": "base"}))
    (mine / "shared" / "middle.yaml").write_text(yaml.safe_dump(
        {"extends": "config/demo.yaml", "b": 2}))
    cfg = resolve_extends({"extends": "shared/base.yaml", "seeds": [3]}, clone, mine)
    assert cfg == {"experiment": "base", "seeds": [3], "a": 1, "b": 2}
    # the same name beside the config wins over the clone's
    (mine / "config").mkdir()
    (mine / "config" / "demo.yaml").write_text(yaml.safe_dump({"experiment": "mine"}))
    assert resolve_extends({"extends": "config/demo.yaml"}, clone, mine) == \
        {"experiment": "mine"}
    assert resolve_extends({"extends": "config/demo.yaml"}, clone)["experiment"] == "demo"
