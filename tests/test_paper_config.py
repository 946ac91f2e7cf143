"""config/paper.yaml: every Table 3 model is a node, with the paper's parents and coefficients."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from sacpo_steps.plan import load_plan
from tests.helpers import ROOT, copy_workflow, dry_run, job_counts, snakemake

STAGE2 = [0.01, 0.025, 0.05, 0.1]


@pytest.fixture(scope="module")
def paper():
    cfg = yaml.safe_load((ROOT / "config/paper.yaml").read_text())
    return cfg, load_plan(cfg, source="config/paper.yaml")


def test_paper_plan_holds_table3(paper):
    cfg, plan = paper
    assert len(plan.nodes) == 19 and len(plan.merges) == 6
    stage1 = {"dpo_h": ("helpfulness", "dpo", 0.1), "kto_h": ("helpfulness", "kto", 0.1),
              "dpo_s": ("safety", "dpo", 0.01)}
    for name, (data, loss, beta) in stage1.items():
        node = plan.nodes[name]
        assert (node.parent, node.data, node.loss, node.beta) == ("sft", data, loss, beta)
        assert node.resources["gpu"] == 8 and node.training.global_batch_size == 256
    chains = {("dpo_h", "safety", "dpo"), ("dpo_h", "safety", "kto"), ("kto_h", "safety", "dpo"),
              ("dpo_s", "helpfulness", "dpo")}
    found = {}
    for node in plan.nodes.values():
        if node.parent != "sft":
            found.setdefault((node.parent, node.data, node.loss), []).append(node.beta)
            assert node.training.global_batch_size == 64
            gpus = cfg["resources"]["align"]["gpu"]
            assert 16 * gpus * 2 == 64
    assert set(found) == chains
    assert all(sorted(b) == STAGE2 for b in found.values())
    p_sacpo = sorted((m.q, m.parent_a, m.parent_b) for m in plan.merges.values()
                     if m.name.startswith("p-sacpo"))
    assert p_sacpo == [(q, "dpo_h", "dpo_h.dpo_s-0.01") for q in (0.25, 0.5, 0.75)]
    naive = sorted((m.q, m.parent_a, m.parent_b) for m in plan.merges.values()
                   if m.name.startswith("naive"))
    assert naive == [(q, "dpo_h", "dpo_s") for q in (0.25, 0.5, 0.75)]
    assert list(plan.baselines) == ["beaver-7b-v1.0"]
    assert plan.baselines["beaver-7b-v1.0"]["repo_id"] == "PKU-Alignment/beaver-7b-v1.0"
    training = cfg["training"]
    assert (training["learning_rate"], training["num_train_epochs"], training["max_length"],
            training["per_device_train_batch_size"], training["gradient_accumulation_steps"],
            training["bf16"]) == (2e-5, 3, 512, 16, 2, True)
    assert cfg["prompt_template"] == "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"


def paper_pairs() -> list[tuple[str, str]]:
    cfg = yaml.safe_load((ROOT / "config/paper.yaml").read_text())
    return load_plan(cfg, source="config/paper.yaml").judged_pairs()


def test_paper_judges_the_pairs_within_the_figures_families(paper):
    cfg, plan = paper
    families = cfg["evaluation"]["families"]
    assert cfg["evaluation"]["pairs"] == "families" and len(families) == 5
    chains: dict[tuple, set[str]] = {}
    for node in plan.nodes.values():
        if node.parent != "sft":
            chains.setdefault((node.parent, node.data, node.loss), set()).add(node.name)
    assert len(chains) == 4
    for (parent, _, _), members in chains.items():  # Figures 3 and 4: one family per chain
        assert sum(set(f) == {"sft", "beaver-7b-v1.0", parent, *members}
                   for f in families.values()) == 1
    merges = next(f for f in families.values() if "p-sacpo-0.5" in f)
    assert set(merges) == {"sft", "beaver-7b-v1.0", "dpo_h", "dpo_s", "dpo_h.dpo_s-0.01",
                           *plan.merges}
    pairs = plan.judged_pairs()
    unordered = {frozenset(p) for p in pairs}
    expected = set()
    for members in families.values():
        expected |= {frozenset((a, b)) for i, a in enumerate(members) for b in members[i + 1:]}
    assert unordered == expected  # sft is in every family: the baseline pairs are in there
    assert len(pairs) == len(unordered) == 126  # not all 27 * 26 / 2 = 351 pairs
    assert all(b == "sft" for a, b in pairs if "sft" in (a, b))
    assert plan.unjudged() == []
    # two models of different figures are never judged against each other
    assert frozenset(("dpo_h.kto_s-0.1", "kto_h.dpo_s-0.1")) not in unordered


@pytest.mark.parametrize("config_file", sorted(p.name for p in (ROOT / "config").glob("*.yaml")))
def test_every_recipe_loads_against_trl(config_file):
    """Every node's training section becomes a real TRL config, built by the align step's
    own code (recipes must not rot)."""
    from sacpo_steps.training.trainer import trl_config

    cfg = yaml.safe_load((ROOT / "config" / config_file).read_text())
    plan = load_plan(cfg, source=config_file)
    assert plan.nodes
    for node in plan.nodes.values():
        # bf16 needs a GPU to build TrainingArguments; everything else as the recipe says
        training = dataclasses.replace(node.training, bf16=False)
        weights = (1.0, 1.0) if node.data_file == "kto" else None
        args = trl_config(dataclasses.replace(node.settings, training=training),
                          output_dir="/tmp/unused", kto_weights=weights)
        assert args.beta == node.beta
        assert args.num_train_epochs == training.num_train_epochs
        assert args.per_device_train_batch_size == training.per_device_train_batch_size


@pytest.mark.slow
def test_paper_dry_run_plans_every_model(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    work = copy_workflow(tmp_path)
    output, jobs = dry_run(work, "--configfile", "config/paper.yaml")
    counts = job_counts(output)
    assert counts["align"] == 19
    # one reference pass per (reference model, dataset, loss): 3 for the stage-1 nodes,
    # 4 for the 16 stage-2 children (each sweep of 4 siblings shares one)
    assert counts["ref_logps"] == 7
    readers = {}
    for job in jobs:
        if job.rule == "align":
            ref = next(p for p in job.inputs if "/ref_logps/" in p)
            readers.setdefault(ref, []).append(job.wildcards["aligned"])
    assert sorted(len(v) for v in readers.values()) == [1, 1, 1, 4, 4, 4, 4]
    assert sum(v for k, v in counts.items() if k.startswith("merge_")) == 2  # one job per pair
    models = 1 + 19 + 6 + 1  # SFT, aligned, merged, beaver
    assert counts["generate"] == 2 * models
    pairs = paper_pairs()
    assert counts["judge"] == 2 * len(pairs)
    judged = {(j.wildcards["prompt_set"], j.wildcards["model"], j.wildcards["opponent"])
              for j in jobs if j.rule == "judge"}
    assert judged == {(ps, a, b) for ps in ("helpfulness", "red_team") for a, b in pairs}
    # the count and the cost bound are printed before any judge request
    assert "judge requests (evaluation.pairs: families): 126 distinct pairs" in output
    assert ("helpfulness: 126 pairs x 129 prompts (expected_prompts in the config, not "
            "fetched yet) x 2 orders x 3 repetition(s) = 97,524 judgments") in output
    assert "red_team: 126 pairs x 83 prompts" in output and "= 62,748 judgments" in output
    assert "total: 160,272 judgments; estimated cost <= $" in output
    # the SFT and beaver are hub snapshots, shared under resources/ by what they are
    assert counts["download_model"] == 2 and "sft_checkpoint" not in counts
    assert "resources/models/PKU-Alignment--alpaca-7b-reproduced@main" in output
    generated = {j.wildcards["model"] for j in jobs if j.rule == "generate"}
    assert {"sft", "beaver-7b-v1.0", "p-sacpo-0.5", "naive-merge-0.25",
            "dpo_s.dpo_h-0.1"} <= generated
    assert "dpo_h.dpo_s-0.3" not in output  # nothing of the demo leaks in


def test_paper_run_without_api_key_stops_before_any_job(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    work = copy_workflow(tmp_path)
    proc = snakemake(work, "-n", "--configfile", "config/paper.yaml")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "evaluation.judge.api_key_env" in out and "OPENAI_API_KEY" in out
    assert "Job stats" not in out and not (work / "results").exists()
