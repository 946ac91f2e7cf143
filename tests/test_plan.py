"""Config validation and plan expansion (`sacpo_steps.plan`), directly and through Snakemake.

Every bad config must be refused before any job runs, with a message that names
the config path of the offending field.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from sacpo_steps.core.errors import InputError
from sacpo_steps.evaluation.judges.openai_settings import OpenAIJudgeConfig
from sacpo_steps.evaluation.judges.registry import backend_settings
from sacpo_steps.plan import Node, Plan, PlanError, load_plan
from sacpo_steps.training.settings import TrainingConfig
from tests.helpers import copy_workflow

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = yaml.safe_load((ROOT / "config" / "config.yaml").read_text(encoding="utf-8"))


def openai_settings(section: dict) -> OpenAIJudgeConfig:
    """The openai judge's settings for a judge section, read as a judge job reads it."""
    return backend_settings({**section, "backend": "openai"}, job=True)


def demo() -> dict[str, Any]:
    return copy.deepcopy(DEMO_CONFIG)


def names_field(message: str, path: str) -> bool:
    """The message reports `path` as a field: `path:` at a line start or after a space."""
    return re.search(rf"(^|\s){re.escape(path)}:", message, flags=re.M) is not None


# ---- bad inputs ----------------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """A mutation that sets config[a][b]... = value for a dotted path (model names may hold
    dots, so the path is split on '/')."""

    def mutate(cfg: dict) -> None:
        *parents, last = path.split("/")
        node = cfg
        for key in parents:
            node = node[key]
        node[last] = value

    return mutate


def _delete(key: str) -> Callable[[dict], None]:
    def mutate(cfg: dict) -> None:
        del cfg[key]

    return mutate


def _add_models(**models: dict) -> Callable[[dict], None]:
    def mutate(cfg: dict) -> None:
        cfg["models"].update(copy.deepcopy(models))

    return mutate


def _families(**families: list[str]) -> Callable[[dict], None]:
    return _families_under("families", **families)


def _families_under(pairs: str, **families: list[str]) -> Callable[[dict], None]:
    """`evaluation.families` with `evaluation.pairs: <pairs>`."""
    def mutate(cfg: dict) -> None:
        cfg["evaluation"].update(pairs=pairs, families=copy.deepcopy(families))

    return mutate


# (id, mutation, field path the message must name, further substrings of the message)
BAD_CASES = [
    ("unknown-top-level-key", _set("optimiser", {"lr": 1}), "(top level)", ["optimiser"]),
    ("unknown-key-in-model", _set("models/dpo_h/betta", 0.1), "models.dpo_h", ["betta"]),
    ("beta-string", _set("models/dpo_h/beta", "0.1"), "models.dpo_h.beta", ["number"]),
    ("models-list", _set("models", ["dpo_h"]), "models", ["object"]),
    ("beta-zero", _set("models/dpo_h/beta", 0), "models.dpo_h.beta", []),
    ("beta-negative", _set("models/dpo_h/beta", -1), "models.dpo_h.beta", []),
    ("stage2-beta-zero", _set("models/dpo_h.dpo_s-1.0/beta", 0.0),
     "models.dpo_h.dpo_s-1.0.beta", []),
    ("loss-unknown", _set("models/dpo_h/loss", "ppo"), "models.dpo_h.loss", ["ppo"]),
    ("parent-unknown", _set("models/dpo_h.dpo_s-0.1/parent", "dpo_x"),
     "models.dpo_h.dpo_s-0.1.parent", ["dpo_x"]),
    ("data-unknown", _set("models/dpo_h/data", "harmlessness"), "models.dpo_h.data",
     ["harmlessness"]),
    ("dataset-source-unknown", _set("datasets/safety/source", "pku"), "datasets.safety.source",
     ["pku"]),
    ("cycle", _add_models(a={"parent": "b", "data": "safety", "loss": "dpo", "beta": 0.1},
                          b={"parent": "a", "data": "safety", "loss": "dpo", "beta": 0.1}),
     "models", ["cycle", "a -> b -> a"]),
    ("self-parent", _add_models(a={"parent": "a", "data": "safety", "loss": "dpo", "beta": 0.1}),
     "models", ["cycle", "a -> a"]),
    ("model-named-like-sft",
     _add_models(sft={"parent": "dpo_h", "data": "safety", "loss": "dpo", "beta": 0.1}),
     "models.sft", ["sft"]),
    ("kto-batch-1", _add_models(kto_h={"parent": "sft", "data": "helpfulness", "loss": "kto",
                                       "beta": 0.1,
                                       "training": {"per_device_train_batch_size": 1}}),
     "models.kto_h.training.per_device_train_batch_size", ["kto", ">= 2"]),
    ("robust-without-label-smoothing",
     _add_models(r={"parent": "sft", "data": "helpfulness", "loss": "robust", "beta": 0.1}),
     "models.r.training.trl.label_smoothing", ["robust"]),
    ("trl-argument-unknown", _set("models/dpo_h/training", {"trl": {"label_smothing": 0.1}}),
     "models.dpo_h.training.trl.label_smothing", ["label_smoothing"]),
    ("trl-argument-set-by-the-pipeline", _set("models/dpo_h/training", {"trl": {"beta": 0.5}}),
     "models.dpo_h.training.trl.beta", []),
    ("trl-argument-removed", _set("training/trl", {"max_prompt_length": 128}),
     "models.dpo_h.training.trl.max_prompt_length", ["training.max_prompt_length"]),
    # stage 2 (parent aligned): TRL arguments that break Theorem 1's equivalence
    ("stage2-f-divergence-not-reverse-kl",
     _set("models/dpo_h.dpo_s-0.1/training", {"trl": {"f_divergence_type": "forward_kl"}}),
     "models.dpo_h.dpo_s-0.1.training.trl.f_divergence_type",
     ["Theorem 1", "reverse-KL", "reverse_kl"]),
    ("stage2-ld-alpha", _set("models/dpo_h.dpo_s-0.1/training", {"trl": {"ld_alpha": 0.5}}),
     "models.dpo_h.dpo_s-0.1.training.trl.ld_alpha", ["Theorem 1", "summed"]),
    ("stage2-loss-weights",
     _set("models/dpo_h.dpo_s-0.1/training", {"trl": {"loss_weights": [2.0]}}),
     "models.dpo_h.dpo_s-0.1.training.trl.loss_weights", ["Theorem 1", "loss alone"]),
    ("stage2-sync-ref-model",
     _set("models/dpo_h.dpo_s-0.1/training", {"trl": {"sync_ref_model": True}}),
     "models.dpo_h.dpo_s-0.1.training.trl.sync_ref_model", ["Theorem 1", "reference"]),
    # the global section reaches every node without its own `trl:`; stage 1 takes it
    ("stage2-inherits-global-trl", _set("training/trl", {"f_divergence_type": "js_divergence"}),
     "training.trl.f_divergence_type", ["Theorem 1", "models.dpo_h.dpo_s-0.01", "inherits"]),
    ("training-old-and-new-name", _set("training/epochs", 2), "training.epochs",
     ["num_train_epochs"]),
    ("judge-key-of-another-backend", _set("evaluation/judge", {"backend": "rule",
                                                                "reward_model": "x"}),
     "evaluation.judge.reward_model", ["score_model"]),
    ("judge-key-unknown", _set("evaluation/judge", {"backend": "openai", "model": "gpt-4",
                                                     "temperatur": 0.1}),
     "evaluation.judge.temperatur", ["temperature"]),
    ("prompt-set-judge-key-of-another-backend",
     _set("evaluation/prompt_sets/red_team/judge", {"cost_model": "x"}),
     "evaluation.prompt_sets.red_team.judge.cost_model", ["score_model"]),
    ("node-training-unknown-key", _set("models/dpo_h/training", {"learning_rte": 1e-4}),
     "models.dpo_h.training", ["learning_rte"]),
    # YAML reads `1e-4` (no dot) as a string: a node's override must be typed too
    ("node-training-wrong-type", _set("models/dpo_h/training", {"learning_rate": "1e-4"}),
     "models.dpo_h.training.learning_rate", ["number"]),
    ("default-training-unknown-key", _set("training/epoch", 1), "training", ["epoch"]),
    ("prompt-template-without-placeholder", _set("prompt_template", "USER: {query} ASSISTANT:"),
     "prompt_template", ["{query}", "prompt\\"]),
    ("missing-evaluation", _delete("evaluation"), "(top level)", ["evaluation", "required"]),
    ("missing-models", _delete("models"), "(top level)", ["models", "required"]),
    ("baseline-unknown", _set("evaluation/baseline", "gpt"), "evaluation.baseline", ["gpt"]),
    ("prompt-set-judge-unknown-key",
     _set("evaluation/prompt_sets/red_team/judge", {"bakend": "rule"}),
     "evaluation.prompt_sets.red_team.judge.bakend", ["backend"]),
    ("prompt-set-judge-bad-backend",
     _set("evaluation/prompt_sets/red_team/judge", {"backend": "gpt"}),
     "evaluation.prompt_sets.red_team.judge.backend", ["gpt"]),
    ("target-over-safe-unknown",
     _set("target", {"over_safe": "nope", "value": 0.9}), "target.over_safe", ["nope"]),
    ("target-safe-rate-with-a-pairwise-judge",
     lambda c: (_set("target", {"over_safe": "dpo_h.dpo_s-0.01", "value": 0.9,
                                "measure": "safe_rate"})(c),
                _set("evaluation/judge", {"backend": "openai", "model": "gpt-4"})(c))[-1],
     "target.measure", ["safe_rate", "openai", "red_team"]),
    ("target-value-above-1",
     _set("target", {"over_safe": "dpo_h.dpo_s-0.01", "value": 1.5}), "target.value", []),
    # merge nodes
    ("merge-q-above-1", _add_models(m={"parents": ["dpo_h", "dpo_h.dpo_s-0.01"], "q": 1.5}),
     "models.m.q", ["1.5"]),
    ("merge-q-missing", _add_models(m={"parents": ["dpo_h", "dpo_h.dpo_s-0.01"]}),
     "models.m.q", ["q"]),
    ("merge-one-parent", _add_models(m={"parents": ["dpo_h"], "q": 0.5}), "models.m.parents",
     []),
    ("merge-parent-unknown", _add_models(m={"parents": ["dpo_h", "nope"], "q": 0.5}),
     "models.m.parents[1]", ["nope"]),
    ("merge-same-parents", _add_models(m={"parents": ["dpo_h", "dpo_h"], "q": 0.5}),
     "models.m.parents", ["same"]),
    ("merge-with-loss", _add_models(m={"parents": ["dpo_h", "sft"], "q": 0.5, "loss": "dpo"}),
     "models.m", ["loss"]),
    ("align-missing-beta", _add_models(m={"parent": "sft", "data": "safety", "loss": "dpo"}),
     "models.m", ["beta"]),
    ("global-batch-mismatch",
     _add_models(m={"parent": "sft", "data": "safety", "loss": "dpo", "beta": 0.1,
                    "training": {"global_batch_size": 64}, "resources": {"gpu": 8}}),
     "models.m.training.global_batch_size", ["64", "gpu 8"]),
    # evaluation.pairs: families
    ("families-unknown-model", _families(fig3=["dpo_h", "dpo_h.dpo_s-0.02"]),
     "evaluation.families.fig3", ["dpo_h.dpo_s-0.02", "unknown"]),
    # under all_pairs and vs_baseline families only group the Elo fits, checked alike
    ("families-unknown-model-all-pairs",
     _families_under("all_pairs", fig3=["dpo_h", "dpo_h.dpo_s-0.02"]),
     "evaluation.families.fig3", ["dpo_h.dpo_s-0.02", "unknown"]),
    ("families-unknown-model-vs-baseline", _families_under("vs_baseline", fig5=["p-sacpo-9"]),
     "evaluation.families.fig5", ["p-sacpo-9", "unknown"]),
    ("families-named-pooled", _families_under("all_pairs", pooled=["dpo_h"]),
     "evaluation.families.pooled", ["every battle"]),
    ("families-only-the-baseline", _families(fig3=["sft"]),
     "evaluation.families.fig3", ["only the baseline 'sft'"]),
    ("pairs-families-without-families", _set("evaluation/pairs", "families"),
     "evaluation.families", ["pairs: families"]),
    ("families-empty-family", _families(fig3=[]),
     "evaluation.families.fig3", []),
    ("families-model-twice", _families(fig3=["dpo_h", "dpo_h"]),
     "evaluation.families.fig3", ["non-unique"]),
    # preference data formats (the data-format registry checks its own keys)
    ("source-format-unknown", _set("preference_sources/demo/format", "alpaca"),
     "preference_sources.demo.format", ["alpaca", "pku_saferlhf_30k"]),
    ("source-single-criterion-format-without-criterion",
     _set("preference_sources/demo", {"source": "local", "path": "x.jsonl",
                                      "format": "trl_preference"}),
     "preference_sources.demo.criterion", ["trl_preference"]),
    ("source-option-unknown",
     _set("preference_sources/demo", {"source": "demo", "format": "pku_saferlhf",
                                      "options": {"severity": 2}}),
     "preference_sources.demo.options.severity", ["min_severity"]),
    ("dataset-criterion-not-in-its-source",
     _set("preference_sources/demo", {"source": "local", "path": "x.jsonl",
                                      "format": "trl_preference", "criterion": "helpfulness"}),
     "datasets.safety.criterion", ["trl_preference", "helpfulness"]),
    ("conversational-data-without-chat-template",
     lambda c: (c["preference_sources"].update(
         chat={"source": "local", "path": "x.jsonl", "format": "trl_conversational",
               "criterion": "safety"}),
                c["datasets"].update(chat_safety={"source": "chat", "criterion": "safety"}),
                c["models"].update(m={"parent": "dpo_h", "data": "chat_safety", "loss": "dpo",
                                      "beta": 0.1})),
     "models.m.data", ["conversational", "prompt_template: chat"]),
    ("lineage-mixing-text-and-conversational",
     lambda c: (c.__setitem__("prompt_template", "chat"),
                c["preference_sources"].update(
                    chat={"source": "local", "path": "x.jsonl", "format": "hh_rlhf",
                          "criterion": "safety"}),
                c["datasets"].update(chat_safety={"source": "chat", "criterion": "safety"}),
                c["models"].update(m={"parent": "dpo_h", "data": "chat_safety",
                                      "loss": "dpo", "beta": 0.1})),
     "models.m.data", ["mixes text and conversational", "dpo_h: text", "m: conversational"]),
    ("baseline-as-parent",
     lambda cfg: (cfg.__setitem__("baselines", {"beaver": {"source": "local", "path": "x"}}),
                  cfg["models"].update(m={"parent": "beaver", "data": "safety",
                                          "loss": "dpo", "beta": 0.1})),
     "models.m.parent", ["beaver", "baseline"]),
]


@pytest.mark.parametrize(("mutate", "path", "fragments"),
                         [pytest.param(m, p, f, id=i) for i, m, p, f in BAD_CASES])
def test_bad_config_is_refused_naming_the_field(mutate, path, fragments):
    cfg = demo()
    mutate(cfg)
    with pytest.raises(PlanError) as info:
        load_plan(cfg, source="x.yaml")
    message = str(info.value)
    assert isinstance(info.value, InputError)
    assert names_field(message, path), f"{path!r} not named as a field in:\n{message}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_schema_errors_name_the_config_file():
    cfg = demo()
    cfg["models"]["dpo_h"]["beta"] = "high"
    with pytest.raises(PlanError, match=r"x\.yaml"):
        load_plan(cfg, source="x.yaml")


# ---- good inputs ---------------------------------------------------------------


def test_demo_config_expands_to_the_sacpo_chain():
    plan = load_plan(demo(), source="x.yaml")
    assert isinstance(plan, Plan)
    assert plan.sft == "sft"
    assert plan.baseline == "sft"
    stage2 = [f"dpo_h.dpo_s-{b}" for b in ("0.01", "0.1", "1.0")]
    merged = [f"p-sacpo-{q}" for q in ("0.25", "0.5", "0.75", "0.85", "0.9")]
    assert list(plan.nodes) == ["dpo_h", *stage2]
    assert plan.models == ["sft", "dpo_h", *stage2, *merged, "always_refuse"]
    assert {(m.parent_a, m.parent_b) for m in plan.merges.values()} == {
        ("dpo_h", "dpo_h.dpo_s-0.01")}
    for name in stage2:
        node = plan.nodes[name]
        assert (node.parent, node.data, node.loss) == ("dpo_h", "safety", "dpo")
        assert node.data_file == "pairs"
    assert plan.nodes["dpo_h.dpo_s-1.0"].beta == pytest.approx(1.0)
    assert plan.datasets["safety"] == {"source": "demo", "criterion": "safety"}


def test_defaults_are_filled_in_place():
    cfg = demo()
    del cfg["threads"]
    del cfg["stop_markers"]
    del cfg["evaluation"]["judge"]
    cfg.pop("seed", None)
    del cfg["demo_world"]
    plan = load_plan(cfg, source="x.yaml")
    assert cfg["threads"] == {"sft": 2, "align": 2, "generate": 1}
    assert cfg["stop_markers"] == ["USER:"]
    assert "seed" not in cfg and plan.seeds == (0,)  # no seed: one run with seed 0
    assert cfg["evaluation"]["judge"] == {"backend": "rule", "repetitions": 1}
    # the demo world rule reads every key, so a missing section must be filled too
    # no demo_world.seed: each seed builds its own world
    assert cfg["demo_world"] == {"n_sft_examples": 4000, "n_preference_pairs": 3000,
                                 "sensitive_tasks": False}
    assert cfg["preference_sources"]["demo"]["split"] == "train"
    assert cfg["preference_sources"]["demo"]["on_bad_row"] == "error"


def test_node_training_merges_defaults_and_overrides():
    cfg = demo()
    default_lr = cfg["training"]["learning_rate"]
    del cfg["training"]["max_length"]  # falls back to the schema default
    cfg["models"]["dpo_h"]["training"] = {"learning_rate": 1.0e-3, "max_examples": 8}
    plan = load_plan(cfg, source="x.yaml")
    own = plan.nodes["dpo_h"].training
    other = plan.nodes["dpo_h.dpo_s-0.1"].training
    assert own.learning_rate == 1.0e-3 and own.max_examples == 8
    assert other.learning_rate == default_lr != 1.0e-3
    assert other.max_examples is None
    assert own.max_length == other.max_length == 512
    assert own.per_device_train_batch_size == 32  # the config's default, not the schema's
    assert isinstance(own, TrainingConfig) and isinstance(other, TrainingConfig)


def test_children_come_after_parents_whatever_the_declaration_order():
    cfg = demo()
    cfg["models"] = {
        "c": {"parent": "b", "data": "safety", "loss": "dpo", "beta": 0.05},
        "b2": {"parent": "a", "data": "safety", "loss": "kto", "beta": 0.1},
        "b": {"parent": "a", "data": "safety", "loss": "dpo", "beta": 0.1},
        "a": {"parent": "sft", "data": "helpfulness", "loss": "dpo", "beta": 0.1},
    }
    plan = load_plan(cfg, source="x.yaml")
    order = list(plan.nodes)
    assert sorted(order) == ["a", "b", "b2", "c"]
    for name, node in plan.nodes.items():
        if node.parent != plan.sft:
            assert order.index(node.parent) < order.index(name)
    assert plan.models[0] == "sft"
    assert plan.nodes["b2"].data_file == "kto"


def test_lineage_lists_stages_oldest_first():
    cfg = demo()
    cfg["models"]["dpo_h.dpo_s-0.1.kto_s"] = {
        "parent": "dpo_h.dpo_s-0.1", "data": "safety", "loss": "kto", "beta": 0.2}
    plan = load_plan(cfg, source="x.yaml")
    chain = plan.lineage("dpo_h.dpo_s-0.1.kto_s")
    assert all(isinstance(node, Node) for node in chain)
    assert [n.name for n in chain] == ["dpo_h", "dpo_h.dpo_s-0.1", "dpo_h.dpo_s-0.1.kto_s"]
    assert [n.parent for n in chain] == ["sft", "dpo_h", "dpo_h.dpo_s-0.1"]
    assert [n.name for n in plan.lineage("dpo_h")] == ["dpo_h"]
    assert plan.lineage("sft") == []


def test_stage1_accepts_what_stage2_refuses_and_a_stage2_node_may_drop_the_global_trl():
    breaking = {"f_divergence_type": "alpha_divergence", "ld_alpha": 0.5,
                "loss_weights": [0.5], "sync_ref_model": True}
    cfg = demo()
    cfg["training"]["trl"] = breaking
    for spec in cfg["models"].values():
        if spec.get("parent") not in (None, "sft"):  # stage 2: its own section replaces it
            spec["training"] = {"trl": {"f_divergence_type": "reverse_kl"}}
    plan = load_plan(cfg, source="x.yaml")
    assert plan.nodes["dpo_h"].training.trl == breaking
    assert plan.nodes["dpo_h.dpo_s-0.1"].training.trl == {"f_divergence_type": "reverse_kl"}


def test_sft_name_and_baseline_can_be_changed():
    cfg = demo()
    cfg["sft"]["name"] = "base"
    for spec in cfg["models"].values():
        if spec.get("parent") == "sft":
            spec["parent"] = "base"
    cfg["evaluation"]["baseline"] = "dpo_h"
    plan = load_plan(cfg, source="x.yaml")
    assert plan.sft == "base"
    assert plan.baseline == "dpo_h"
    assert plan.models[0] == "base"


# ---- through Snakemake ---------------------------------------------------------

SNAKEMAKE_CASES = [
    ("beta-string", _set("models/dpo_h.dpo_s-0.1/beta", "0.1"), "models.dpo_h.dpo_s-0.1.beta"),
    ("parent-unknown", _set("models/dpo_h/parent", "base"), "models.dpo_h.parent"),
    ("unknown-key", _set("evaluation/judge_model", "gpt"), "evaluation"),
    ("judge-key-of-another-backend",
     _set("evaluation/judge", {"backend": "rule", "reward_model": "x"}),
     "evaluation.judge.reward_model"),
    ("trl-argument-unknown", _set("models/dpo_h/training", {"trl": {"label_smothing": 0.1}}),
     "models.dpo_h.training.trl.label_smothing"),
]


@pytest.mark.parametrize(("mutate", "path"),
                         [pytest.param(m, p, id=i) for i, m, p in SNAKEMAKE_CASES])
def test_snakemake_refuses_a_bad_config_before_any_job(tmp_path, mutate, path):
    workdir = copy_workflow(tmp_path / "wf")
    cfg = demo()
    mutate(cfg)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--configfile", str(bad)],
        cwd=workdir, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert names_field(output, path), output
    assert "Job stats" not in output
    assert not (workdir / "results").exists()
    assert not (workdir / "logs").exists()


def test_merge_nodes_are_grouped_per_pair_and_ordered_after_parents():
    cfg = demo()
    cfg["models"] = {n: m for n, m in cfg["models"].items() if "parents" not in m}
    cfg["models"] = {
        "p-0.75": {"parents": ["dpo_h", "dpo_h.dpo_s-0.01"], "q": 0.75},
        "p-0.25": {"parents": ["dpo_h", "dpo_h.dpo_s-0.01"], "q": 0.25},
        "naive": {"parents": ["dpo_h", "dpo_s"], "q": 0.5},
        **cfg["models"],
        "dpo_s": {"parent": "sft", "data": "safety", "loss": "dpo", "beta": 0.01},
    }
    plan = load_plan(cfg, source="x.yaml")
    order = plan.order
    for merged in ("p-0.75", "p-0.25", "naive"):
        node = plan.merges[merged]
        assert all(order.index(p) < order.index(merged) for p in node.parents)
    groups = plan.merge_groups()
    assert sorted(n.q for n in groups["dpo_h+dpo_h.dpo_s-0.01"]) == [0.25, 0.75]
    assert [n.name for n in groups["dpo_h+dpo_s"]] == ["naive"]
    assert "naive" in plan.models and "naive" not in plan.nodes


def test_each_prompt_set_can_have_its_own_judge():
    from sacpo_steps.plan import judge_for

    cfg = demo()
    cfg["evaluation"]["judge"] = {"backend": "openai", "model": "gpt-4-0125-preview",
                                  "repetitions": 3, "temperature": 0.7}
    cfg["evaluation"]["prompt_sets"]["red_team"]["judge"] = {
        "backend": "score_model", "cost_model": "resources/models/cost"}
    cfg["evaluation"]["prompt_sets"]["helpfulness"]["judge"] = {"temperature": 0.0}
    load_plan(cfg, source="x.yaml")
    harmless = judge_for(cfg["evaluation"], "red_team")
    assert harmless == {"backend": "score_model", "cost_model": "resources/models/cost",
                        "repetitions": 3}  # openai's settings do not leak into it
    helpful = judge_for(cfg["evaluation"], "helpfulness")
    assert helpful["backend"] == "openai" and helpful["temperature"] == 0.0
    assert helpful["model"] == "gpt-4-0125-preview"


# ---- judged pairs and the judgment count -----------------------------------------


def test_all_pairs_and_vs_baseline_keep_the_baseline_on_the_opponent_side():
    cfg = demo()
    cfg["evaluation"]["baseline"] = "dpo_h.dpo_s-0.1"
    plan = load_plan(cfg, source="x.yaml")
    models = plan.models
    pairs = plan.judged_pairs()
    assert len(pairs) == len({frozenset(p) for p in pairs}) == len(models) * (len(models) - 1) // 2
    assert all(a != plan.baseline for a, _ in pairs)
    assert ("sft", "dpo_h") in pairs  # otherwise the model listed first is the candidate
    plan.pairs = "vs_baseline"
    assert plan.judged_pairs() == [(m, "dpo_h.dpo_s-0.1") for m in models
                                   if m != "dpo_h.dpo_s-0.1"]


def test_families_judge_each_family_and_every_member_against_the_baseline():
    cfg = demo()
    _families(chain=["sft", "dpo_h", "dpo_h.dpo_s-0.01", "dpo_h.dpo_s-0.1"],
              merges=["dpo_h", "dpo_h.dpo_s-0.01", "p-sacpo-0.5"])(cfg)
    plan = load_plan(cfg, source="x.yaml")
    pairs = plan.judged_pairs()
    expected = {frozenset(p) for p in [
        # chain: 4 models, 6 pairs (3 of them against sft)
        ("sft", "dpo_h"), ("sft", "dpo_h.dpo_s-0.01"), ("sft", "dpo_h.dpo_s-0.1"),
        ("dpo_h", "dpo_h.dpo_s-0.01"), ("dpo_h", "dpo_h.dpo_s-0.1"),
        ("dpo_h.dpo_s-0.01", "dpo_h.dpo_s-0.1"),
        # merges: 3 pairs, 1 new, plus p-sacpo-0.5 against the baseline
        ("dpo_h", "p-sacpo-0.5"), ("dpo_h.dpo_s-0.01", "p-sacpo-0.5"), ("p-sacpo-0.5", "sft")]}
    assert len(pairs) == len(expected) == 9
    assert {frozenset(p) for p in pairs} == expected
    assert all(b == "sft" for a, b in pairs if "sft" in (a, b))
    # in plan order: the same orientation as all_pairs
    plan_all = load_plan(demo(), source="x.yaml")
    assert set(pairs) <= set(plan_all.judged_pairs())
    assert plan.unjudged() == ["dpo_h.dpo_s-1.0", "p-sacpo-0.25", "p-sacpo-0.75",
                               "p-sacpo-0.85", "p-sacpo-0.9", "always_refuse"]


@pytest.mark.parametrize("pairs", ["all_pairs", "vs_baseline"])
def test_families_under_all_pairs_or_vs_baseline_only_group_the_elo_fits(pairs):
    families = {"chain": ["sft", "dpo_h", "dpo_h.dpo_s-0.01"], "merges": ["p-sacpo-0.5"]}
    plain = demo()
    plain["evaluation"]["pairs"] = pairs
    cfg = demo()
    _families_under(pairs, **families)(cfg)
    plan = load_plan(cfg, source="x.yaml")
    assert plan.pairs == pairs and plan.families == families
    # the judged pairs are those of the mode, as without families
    assert plan.judged_pairs() == load_plan(plain, source="x.yaml").judged_pairs()
    assert plan.unjudged() == []


def test_judgment_count_and_upper_bound_cost():
    from sacpo_steps.evaluation.judges.openai_prompts import load_template
    from sacpo_steps.plan.judgment_report import (
        CHARS_PER_TOKEN,
        estimated_cost,
        estimated_input_tokens,
        judgment_count,
        judgment_report,
    )

    assert judgment_count(126, 129, 3) == 126 * 129 * 2 * 3
    assert estimated_input_tokens(300, 512, 0) == 100 + 1024
    assert estimated_cost(1000, 2000, 100, 10.0, 30.0) == pytest.approx(1000 * 0.023)
    cfg = demo()
    _families(chain=["sft", "dpo_h", "dpo_h.dpo_s-0.01"])(cfg)
    cfg["evaluation"]["judge"] = {"backend": "openai", "model": "gpt-4-0125-preview",
                                  "repetitions": 3}
    cfg["evaluation"]["prompt_sets"]["red_team"]["judge"] = {"backend": "rule"}
    plan = load_plan(cfg, source="x.yaml")
    lines = judgment_report(plan, cfg["evaluation"], {
        "helpfulness": (10, "counted", 90), "red_team": (None, "unknown", 0)})
    text = "\n".join(lines)
    assert "3 distinct pairs, 2 of them against the baseline 'sft'" in lines[0]
    assert "helpfulness: 3 pairs x 10 prompts (counted) x 2 orders x 3 repetition(s) = 180" in text
    assert "red_team: 3 pairs x 2 orders x 3 repetition(s) = 18 judgments per prompt" in text
    assert "rule judge, no API cost" in text
    judge = openai_settings(cfg["evaluation"]["judge"])
    template = load_template("helpfulness", judge.format)
    tokens_in = -(-(len(template.text) + 90) // CHARS_PER_TOKEN) + 2 * 64
    usd = estimated_cost(180, int(tokens_in), judge.output_cap(), *judge.prices())
    assert f"<= {int(tokens_in):,} input tokens" in text
    assert f"<= {judge.output_cap():,} output tokens" in text  # the judge's own cap
    assert "total: 180 judgments for the prompt sets of known size, plus 18 per red_team" in text
    assert f"estimated cost <= ${usd:,.2f} for those sets (an upper bound" in text


def test_judgment_cost_follows_the_judge_settings():
    """The reply cap and the prompt come from the judge's config (format, explain)."""
    from sacpo_steps.evaluation.judges.openai_prompts import EXPLAIN_INSTRUCTION
    from sacpo_steps.plan.judgment_report import judgment_report

    cfg = demo()
    _families(chain=["sft", "dpo_h"])(cfg)
    texts = {}
    for explain in (False, True):
        cfg["evaluation"]["judge"] = {"backend": "openai", "model": "gpt-4-0125-preview",
                                      "explain": explain}
        plan = load_plan(copy.deepcopy(cfg), source="x.yaml")
        lines = judgment_report(plan, cfg["evaluation"], {
            "helpfulness": (5, "counted", 50), "red_team": (5, "counted", 50)})
        cap = openai_settings(cfg["evaluation"]["judge"]).output_cap()
        (line,) = [x for x in lines if x.startswith("  helpfulness:")]
        assert f"<= {cap:,} output tokens" in line
        texts[explain] = line
    tokens = {k: int(v.split("<= ")[1].split(" input")[0].replace(",", ""))
              for k, v in texts.items()}
    assert tokens[True] - tokens[False] == pytest.approx(len(EXPLAIN_INSTRUCTION) / 3, abs=1)
