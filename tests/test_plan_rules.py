"""What the workflow's rules ask the plan (`Plan` methods that common.smk wraps): paths,
params, inputs and resources of each kind of job, tested without Snakemake."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from sacpo_steps.plan import load_plan, to_json

ROOT = Path(__file__).resolve().parent.parent
DEMO = yaml.safe_load((ROOT / "config" / "config.yaml").read_text(encoding="utf-8"))
PAPER = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text(encoding="utf-8"))


def plan_of(cfg: dict[str, Any]):
    return load_plan(copy.deepcopy(cfg), source="test.yaml")


@pytest.fixture(scope="module")
def demo():
    return plan_of(DEMO)


@pytest.fixture(scope="module")
def paper():
    return plan_of(PAPER)


def test_align_job_reads_its_parent_and_the_file_its_loss_needs(demo):
    child = "dpo_h.dpo_s-0.1"
    assert demo.align_parent_dir(child, 2) == "results/demo/seed-2/models/dpo_h"
    assert demo.align_data_dir(child, 2) == "results/demo/seed-2/data/demo"
    assert demo.align_data_file(child, 2) == "results/demo/seed-2/data/demo/safety_pairs.jsonl"
    spec = demo.align_spec(child, "2")
    assert spec["parent"] == "dpo_h" and spec["beta"] == 0.1 and spec["seed"] == 2
    assert spec["training"] == dataclasses.asdict(demo.nodes[child].training)
    assert json.loads(to_json(spec)) == spec


def test_a_kto_node_reads_the_labelled_rows():
    cfg = copy.deepcopy(DEMO)
    cfg["models"]["kto_s"] = {"parent": "dpo_h", "data": "safety", "loss": "kto", "beta": 0.1}
    plan = plan_of(cfg)
    assert plan.align_data_file("kto_s", 0).endswith("/safety_kto.jsonl")


def test_checkpoint_scratch_changes_with_any_setting_of_the_node(demo):
    cfg = copy.deepcopy(DEMO)
    cfg["models"]["dpo_h.dpo_s-0.1"]["beta"] = 0.2
    other = plan_of(cfg)
    child = "dpo_h.dpo_s-0.1"
    here = demo.align_checkpoint_dir(child, 0)
    assert here.startswith("scratch/demo/seed-0/align/dpo_h.dpo_s-0.1-")
    assert here != other.align_checkpoint_dir(child, 0)  # a changed beta never resumes
    assert here != demo.align_checkpoint_dir(child, 1)  # nor another seed's run
    assert here == demo.align_checkpoint_dir(child, "0")  # wildcards are strings


def test_launcher_uses_accelerate_only_with_several_gpus(paper):
    assert paper.launcher("dpo_h", 0) == "python -m sacpo_steps"
    assert paper.launcher("dpo_h", 1) == "python -m sacpo_steps"
    launch = paper.launcher("dpo_h", 8)
    assert launch.startswith("accelerate launch --num_processes 8")
    # found through the package, wherever it is installed (the wheel carries it)
    from sacpo_steps.core.schema import ACCELERATE_CONFIGS

    config = ACCELERATE_CONFIGS / "fsdp.yaml"
    assert f"--config_file {config} " in launch and config.is_file()


def test_resources_take_the_kind_defaults_then_the_node_own(paper):
    assert paper.resources("align", "dpo_h")["gpu"] == 8  # the node's own
    child = next(n for n in paper.nodes if n != "dpo_h" and paper.nodes[n].parent != "sft")
    assert paper.resources("align", child)["gpu"] == 2  # the kind's default
    assert paper.resources("align", child)["mem_mb"] == 200000
    assert paper.resources("merge") == {"mem_mb": 64000, "runtime": 60}


def schema_resource_defaults() -> dict[str, dict[str, Any]]:
    """{job kind: {key: default}} of the schema's `resources.<kind>`."""
    from sacpo_steps.core.schema import default_of, load_config_schema

    kinds = load_config_schema()["properties"]["resources"]["properties"]
    return {kind: {key: default_of(f"resources.{kind}.{key}") for key in spec["properties"]}
            for kind, spec in kinds.items()}


def test_a_job_of_each_kind_gets_the_schema_default_resources(demo):
    """The demo sets no `resources:`: each planned job (the SFT build and hub downloads,
    every align and ref_logps job, every merge, every generation) gets its kind's
    defaults, which live in the config schema alone (the rules pass none)."""
    defaults = schema_resource_defaults()
    assert "resources" not in DEMO
    assert set(defaults) == {"sft_checkpoint", "align", "merge", "generate"}
    for kind, keys in defaults.items():
        assert {"mem_mb", "runtime"} <= set(keys), kind
    assert {"gpu", "cpus_per_gpu"} <= set(defaults["align"])
    assert demo.resources("sft_checkpoint") == defaults["sft_checkpoint"]
    for node in demo.nodes:
        assert demo.resources("align", node) == defaults["align"], node
    assert demo.ref_logps_jobs
    for reference, key in demo.ref_logps_jobs:
        reader = demo.ref_logps_consumer(reference, key)
        assert demo.resources("align", reader) == defaults["align"], reader
    assert demo.merges
    for merge in demo.merges:
        assert demo.resources("merge", merge) == defaults["merge"], merge
    generated = [m for m in demo.models
                 if demo.baselines.get(m, {}).get("source") != "constant"]
    assert "sft" in generated and len(generated) > len(demo.nodes)
    for model in generated:
        assert demo.resources("generate", model) == defaults["generate"], model


def test_a_kind_or_node_that_sets_some_resources_keeps_the_other_defaults(paper):
    defaults = schema_resource_defaults()
    child = "dpo_h.dpo_s-0.1"
    # the paper sets gpu and mem_mb of align jobs, dpo_h its own gpu: the rest is default
    assert paper.resources("align", child) == {**defaults["align"], "gpu": 2, "mem_mb": 200000}
    assert paper.resources("align", "dpo_h") == {**defaults["align"], "gpu": 8,
                                                 "mem_mb": 200000}
    assert paper.resources("merge")["runtime"] == defaults["merge"]["runtime"]
    assert paper.resources("sft_checkpoint")["mem_mb"] == defaults["sft_checkpoint"]["mem_mb"]


def test_merge_rules_are_named_after_their_pair_not_their_position(demo):
    rules = demo.merge_rules()
    assert list(rules) == ["merge_dpo_h__dpo_h_dpo_s_0_01"]
    cfg = copy.deepcopy(DEMO)
    # a new pair listed FIRST must not rename the existing pair's rule
    cfg["models"] = {"naive": {"parents": ["dpo_h", "dpo_h.dpo_s-1.0"], "q": 0.5},
                     **cfg["models"]}
    renamed = plan_of(cfg).merge_rules()
    assert set(renamed) == {"merge_dpo_h__dpo_h_dpo_s_0_01", "merge_dpo_h__dpo_h_dpo_s_1_0"}
    assert [n.q for n in renamed["merge_dpo_h__dpo_h_dpo_s_0_01"]] == [
        n.q for n in rules["merge_dpo_h__dpo_h_dpo_s_0_01"]]


def test_merge_rule_names_stay_distinct_when_names_differ_only_in_punctuation():
    cfg = copy.deepcopy(DEMO)
    cfg["models"]["dpo_h-x"] = {"parent": "sft", "data": "helpfulness", "loss": "dpo",
                                "beta": 0.1}
    cfg["models"]["dpo_h.x"] = {"parent": "sft", "data": "helpfulness", "loss": "dpo",
                                "beta": 0.1}
    cfg["models"]["m1"] = {"parents": ["sft", "dpo_h-x"], "q": 0.5}
    cfg["models"]["m2"] = {"parents": ["sft", "dpo_h.x"], "q": 0.5}
    names = list(plan_of(cfg).merge_rules())
    assert len(set(names)) == len(names) == 3
    assert all(n.isidentifier() for n in names)


def test_hub_downloads_are_described_by_content(paper):
    keys = paper.paths.hub_models()
    sft_key = next(k for k, name in keys.items() if name == "sft")
    assert paper.hub_download(sft_key) == {
        "repo_id": "PKU-Alignment/alpaca-7b-reproduced", "revision": "main",
        "convert_bin": False}
    dataset = next(iter(paper.paths.hub_datasets()))
    assert paper.dataset_download(dataset) == {"repo_id": "PKU-Alignment/PKU-SafeRLHF-30K",
                                               "revision": "main"}


def test_a_built_sft_depends_on_its_seed_a_linked_one_does_not(demo):
    assert demo.sft_spec(3)["seed"] == 3
    assert "seed" not in demo.sft_spec(None)
    assert demo.sft_spec(None)["prompt_template"] == DEMO["prompt_template"]


def test_generation_spec_takes_a_baselines_own_prompt_format(paper):
    beaver = next(n for n, b in paper.baselines.items() if b.get("prompt_template"))
    spec = paper.generation_spec(beaver, 0)
    assert spec["prompt_template"] == paper.baselines[beaver]["prompt_template"]
    assert paper.generation_spec("sft", 0)["prompt_template"] == PAPER["prompt_template"]
    assert spec["max_prompt_length"] == 128  # the cap the models were trained under


def _capped(global_cap, **node_caps):
    """The demo plan with a global prompt cap and some nodes' own, and two merges: of two
    aligned nodes, and of that merge with a third node."""
    cfg = copy.deepcopy(DEMO)
    cfg["training"]["max_prompt_length"] = global_cap
    for name, cap in node_caps.items():
        cfg["models"][name]["training"] = {"max_prompt_length": cap}
    cfg["models"]["m1"] = {"parents": ["dpo_h.dpo_s-0.1", "dpo_h.dpo_s-1.0"], "q": 0.5}
    cfg["models"]["m2"] = {"parents": ["m1", "dpo_h.dpo_s-0.01"], "q": 0.5}
    return plan_of(cfg)


def test_generation_uses_each_models_own_prompt_cap():
    plan = _capped(64, **{"dpo_h.dpo_s-0.1": 48, "dpo_h.dpo_s-1.0": 40,
                          "dpo_h.dpo_s-0.01": 24})
    cap = {m: plan.generation_spec(m, 0)["max_prompt_length"] for m in plan.models}
    assert cap["dpo_h"] == 64  # no override: the global cap, merged into its training
    assert cap["dpo_h.dpo_s-0.1"] == 48 and cap["dpo_h.dpo_s-1.0"] == 40  # own override
    assert cap["m1"] == 40  # a merge: the smaller of its parents' caps
    assert cap["m2"] == 24  # a merge of a merge: min(min(48, 40), 24)
    assert cap["sft"] == 64  # the SFT and the external baselines: the global cap
    assert plan.baselines and all(cap[b] == 64 for b in plan.baselines)


def test_a_merge_of_a_cap_and_no_cap_takes_the_cap():
    plan = _capped(None, **{"dpo_h.dpo_s-1.0": 40})
    assert plan.prompt_cap("dpo_h.dpo_s-0.1") is None  # no cap anywhere
    assert plan.prompt_cap("m1") == 40  # min(no cap, 40)
    assert plan.prompt_cap("m2") == 40  # min(40, no cap)
    assert plan.prompt_cap("sft") is None
    both_free = _capped(None)
    assert both_free.prompt_cap("m2") is None


def test_target_search_generates_under_its_merge_parents_cap():
    cfg = copy.deepcopy(DEMO)
    cfg["training"]["max_prompt_length"] = 64
    cfg["models"]["dpo_h.dpo_s-0.01"]["training"] = {"max_prompt_length": 32}
    cfg["target"] = {"over_safe": "dpo_h.dpo_s-0.01", "value": 0.9}
    plan = plan_of(cfg)
    spec = plan.target_generation_spec(0)
    assert spec["max_prompt_length"] == 32  # min(dpo_h: 64, the over-safe node: 32)
    assert {**spec, "max_prompt_length": 64} == plan.generation_spec("sft", 0)


def test_rule_judge_reads_the_world_spec_and_has_no_cache(demo):
    inputs = demo.judge_inputs("dpo_h", "sft", "red_team", 1)
    assert inputs == {
        "candidate": "results/demo/seed-1/generations/dpo_h/red_team.jsonl",
        "baseline": "results/demo/seed-1/generations/sft/red_team.jsonl",
        "prompts": demo.paths.prompt_set_file("red_team", 1),
        "spec": f"{demo.paths.world_dir(1)}/spec.json",
    }
    assert demo.judge_cache("red_team") is None
    assert demo.required_env() == [] and demo.judge_api_slots() is None


def test_api_and_score_model_judges_name_their_inputs_env_and_cache(tmp_path):
    cfg = copy.deepcopy(DEMO)
    template = tmp_path / "harmless.txt"
    template.write_text("{question} {answer_a} {answer_b}")
    cfg["evaluation"]["judge"] = {"backend": "openai", "model": "gpt-4-0125-preview",
                                  "api_key_env": "MY_KEY", "parallel_jobs": 3,
                                  "templates": {"harmlessness": str(template)}}
    cfg["evaluation"]["prompt_sets"]["helpfulness"]["judge"] = {
        "backend": "score_model", "reward_model": "resources/models/reward"}
    plan = plan_of(cfg)
    assert plan.required_env() == ["MY_KEY"] and plan.judge_api_slots() == 3
    assert plan.judge_cache("red_team") == "resources/judge_cache/gpt-4-0125-preview.jsonl"
    assert plan.judge_cache("helpfulness") == "resources/judge_cache/score_model.jsonl"
    red = plan.judge_inputs("dpo_h", "sft", "red_team", 0)
    assert red["template_harmlessness"] == str(template) and "spec" not in red
    helpful = plan.judge_inputs("dpo_h", "sft", "helpfulness", 0)
    assert "resources/models/reward" in helpful.values()
    # a set's params carry only its own criterion's template (edits rerun only its jobs)
    assert plan.judge_settings("red_team")["templates"] == {"harmlessness": str(template)}
    assert "templates" not in plan.judge_settings("helpfulness")


def test_every_judged_pair_has_a_battle_file_per_prompt_set(demo):
    files = demo.battle_files(0)
    assert len(files) == 2 * len(demo.judged_pairs())
    assert "results/demo/seed-0/battles/red_team/dpo_h__vs__sft.jsonl" in files


def test_target_search_reads_both_parents_and_the_sets_judges():
    cfg = yaml.safe_load((ROOT / "config" / "demo-target.yaml").read_text(encoding="utf-8"))
    plan = load_plan(cfg, source="demo-target.yaml")
    over_safe = plan.nodes[plan.target["over_safe"]]
    inputs = plan.target_inputs(0)
    assert inputs["a"] == plan.model_dir(over_safe.parent, 0)
    assert inputs["b"] == plan.model_dir(over_safe.name, 0)
    assert len(inputs["prompts"]) == len(inputs["baseline"]) == 2
    assert set(plan.target_judges()) == {"helpfulness", "red_team"}


def test_final_outputs_cover_every_seed_and_the_across_seed_files():
    cfg = copy.deepcopy(DEMO)
    cfg["seeds"] = [0, 4]
    plan = plan_of(cfg)
    out = plan.final_outputs(["winrate.csv"], ["figure2.png"])
    assert out == ["results/demo/tables/winrate.csv", "results/demo/figures/figure2.png",
                   "results/demo/seed-0/tables/winrate.csv",
                   "results/demo/seed-0/figures/figure2.png",
                   "results/demo/seed-4/tables/winrate.csv",
                   "results/demo/seed-4/figures/figure2.png"]


def test_prompt_counts_come_from_the_file_or_the_config(tmp_path, monkeypatch):
    cfg = copy.deepcopy(PAPER)
    plan = plan_of(cfg)
    counts = plan.prompt_counts()
    helpful = cfg["evaluation"]["prompt_sets"]["helpfulness"]
    assert counts["helpfulness"][0] == helpful["expected_prompts"]
    monkeypatch.chdir(tmp_path)
    path = Path(plan.paths.prompt_set_file("helpfulness", 0))
    path.parent.mkdir(parents=True)
    path.write_text('{"prompt_id": "1", "prompt": "a"}\n{"prompt_id": "2", "prompt": "bb"}\n')
    count, source, longest = plan.prompt_counts()["helpfulness"]
    assert count == 2 and "counted in" in source and "the config expects" in source
    assert longest == len('{"prompt_id": "2", "prompt": "bb"}\n')


def test_preference_data_reads_a_subset_folder_with_its_format_flags(paper):
    assert paper.preference_format_args("pku") == "--format pku_saferlhf_30k"
    cfg = copy.deepcopy(PAPER)
    cfg["preference_sources"]["hh"] = {"source": "hub", "repo_id": "Anthropic/hh-rlhf",
                                       "revision": "abc", "format": "hh_rlhf",
                                       "criterion": "safety", "data_dir": "harmless-base"}
    cfg["prompt_template"] = "chat"
    cfg["datasets"]["hh_safety"] = {"source": "hh", "criterion": "safety"}
    cfg["models"] = {"hh_s": {"parent": "sft", "data": "hh_safety", "loss": "dpo",
                              "beta": 0.1}}
    cfg["baselines"] = {}
    cfg["evaluation"].pop("families", None)
    cfg["evaluation"]["pairs"] = "vs_baseline"
    plan = plan_of(cfg)
    assert plan.preference_input("hh", 0) == \
        "resources/datasets/Anthropic--hh-rlhf@abc/harmless-base"
    assert plan.preference_input("pku", 0) == plan.paths.preference_table("pku", 0)
    assert plan.preference_format_args("hh") == "--format hh_rlhf --criterion safety"
    assert plan.align_data_file("hh_s", 0).endswith("/data/hh/safety_pairs.jsonl")
