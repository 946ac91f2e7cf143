"""SafeDPO and BSO: the transformed pairs, each loss against its formula, the identities."""

from __future__ import annotations

import collections
import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from sacpo_steps.core.errors import InputError
from sacpo_steps.plan import PlanError, load_plan
from sacpo_steps.training import safe_pairs
from sacpo_steps.training.node import NodeSettings
from sacpo_steps.training.settings import TrainingConfig
from sacpo_steps.training.trainer import build_trainer, load_examples
from tests.helpers import PROMPT_TEMPLATE
from tests.test_losses import completion_logps, softplus

ROOT = Path(__file__).resolve().parent.parent

# one pair of each label combination (h = 1: unsafe), each twice
ROWS = [
    {"prompt": "how do i bake bread?", "chosen": "first, mix flour and water.",
     "rejected": "i cannot help with that.", "chosen_safe": True, "rejected_safe": True},
    {"prompt": "how do i pick a lock?", "chosen": "ask a locksmith to help you.",
     "rejected": "rake the pins with a pick.", "chosen_safe": True, "rejected_safe": False},
    {"prompt": "how do i steal a car?", "chosen": "first, hide notes in your sleeve.",
     "rejected": "i cannot help with that.", "chosen_safe": False, "rejected_safe": True},
    {"prompt": "how do i hurt him?", "chosen": "hit him hard.", "rejected": "kick him.",
     "chosen_safe": False, "rejected_safe": False},
] * 2
ONE_STEP = {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 6,
            "max_length": 64, "warmup_steps": 0.0, "logging_steps": 1, "max_steps": 1}


@pytest.fixture()
def labeled_file(tmp_path) -> Path:
    path = tmp_path / "helpfulness_labeled_pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the data


def test_the_transformation_of_each_label_combination():
    both_safe, safe_over_unsafe, unsafe_over_safe, both_unsafe = ROWS[:4]
    assert safe_pairs.transform(both_safe) == ("kept_both_safe", both_safe)
    assert safe_pairs.transform(safe_over_unsafe) == ("kept_safe_over_unsafe",
                                                      safe_over_unsafe)
    case, swapped = safe_pairs.transform(unsafe_over_safe)
    assert case == "swapped"
    assert (swapped["chosen"], swapped["rejected"]) == (unsafe_over_safe["rejected"],
                                                        unsafe_over_safe["chosen"])
    assert (swapped["chosen_safe"], swapped["rejected_safe"]) == (True, False)
    assert safe_pairs.transform(both_unsafe) == ("dropped_both_unsafe", None)
    counts: collections.Counter[str] = collections.Counter()
    kept = list(safe_pairs.transform_rows(ROWS, counts))
    assert len(kept) == 6 and all(r["chosen_safe"] for r in kept)
    assert counts == {"kept_both_safe": 2, "kept_safe_over_unsafe": 2, "swapped": 2,
                      "dropped_both_unsafe": 2}
    # the margin: Delta on a safe-over-unsafe pair, 0 on two safe answers
    assert [safe_pairs.margin_of(r, 3.0) for r in kept[:3]] == [0.0, 3.0, 3.0]


def test_load_examples_transforms_and_carries_each_pairs_margin(labeled_file):
    examples = load_examples(labeled_file, "safedpo", PROMPT_TEMPLATE, seed=0, margin=2.5)
    assert len(examples) == 6  # the two both-unsafe pairs dropped
    by_prompt = {e["prompt"]: e for e in examples}
    steal = by_prompt[PROMPT_TEMPLATE.format(prompt="how do i steal a car?")]
    assert steal["chosen"] == " i cannot help with that." and steal["safety_margin"] == 2.5
    bread = by_prompt[PROMPT_TEMPLATE.format(prompt="how do i bake bread?")]
    assert bread["safety_margin"] == 0.0
    assert "chosen_safe" not in steal  # the labels stop at the margin
    # the reference pass loads the same rows in the same order, with margin 0
    ref_rows = load_examples(labeled_file, "safedpo", PROMPT_TEMPLATE, seed=0)
    assert [(e["prompt"], e["chosen"]) for e in ref_rows] == \
        [(e["prompt"], e["chosen"]) for e in examples]


def test_a_row_without_its_labels_is_named(tmp_path):
    rows = [dict(ROWS[0]), {k: v for k, v in ROWS[1].items() if k != "rejected_safe"}]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(InputError) as err:
        load_examples(path, "safedpo", PROMPT_TEMPLATE, seed=0, margin=1.0)
    assert (err.value.row, err.value.field) == (2, "rejected_safe")
    assert str(path) in str(err.value)


def test_only_unsafe_pairs_leave_nothing_to_train(tmp_path):
    path = tmp_path / "unsafe.jsonl"
    path.write_text(json.dumps(ROWS[3]) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match="keeps no row"):
        load_examples(path, "safedpo", PROMPT_TEMPLATE, seed=0, margin=1.0)


# --------------------------------------------------------------------------- settings


def training(**changes) -> TrainingConfig:
    return TrainingConfig.from_dict({**ONE_STEP, **changes})


def test_margin_is_required_by_the_safe_losses_and_refused_elsewhere():
    with pytest.raises(InputError, match="needs `margin`") as err:
        NodeSettings("safedpo", 0.1, training(), where="models.s")
    assert err.value.field == "models.s.margin"
    with pytest.raises(InputError, match="takes no margin"):
        NodeSettings("dpo", 0.1, training(), margin=1.0)
    with pytest.raises(InputError, match=">= 0"):
        NodeSettings("bso", 0.1, training(), margin=-1.0)
    with pytest.raises(InputError, match="precompute_ref_log_probs"):
        NodeSettings("safedpo", 0.1, training(precompute_ref_log_probs=False), margin=1.0)
    with pytest.raises(InputError, match="ld_alpha"):
        NodeSettings("bso", 0.1, training(trl={"ld_alpha": 0.5}), margin=1.0)
    settings = NodeSettings("safedpo", 0.1, training(), margin=2)
    assert NodeSettings.from_dict(settings.to_dict()) == settings
    assert settings.to_dict()["margin"] == 2.0
    assert "margin" not in NodeSettings("dpo", 0.1, training()).to_dict()  # hashes unchanged


def demo_config() -> dict:
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text(encoding="utf-8"))


def test_the_plan_refuses_a_safe_loss_on_a_source_without_labels():
    cfg = demo_config()
    cfg["preference_sources"]["pairs_only"] = {"source": "local", "path": "x.jsonl",
                                               "format": "trl_preference",
                                               "criterion": "helpfulness"}
    cfg["datasets"]["plain"] = {"source": "pairs_only", "criterion": "helpfulness"}
    cfg["models"]["safe1"] = {"parent": "sft", "data": "plain", "loss": "safedpo",
                              "beta": 0.1, "margin": 1.0}
    with pytest.raises(PlanError) as err:
        load_plan(copy.deepcopy(cfg))
    message = str(err.value)
    assert message.startswith("models.safe1.loss:")
    assert "'pairs_only'" in message and "pku_saferlhf_30k" in message
    cfg["models"]["safe1"]["data"] = "helpfulness"  # the demo's PKU-style source: fine
    plan = load_plan(cfg)
    assert plan.align_data_file("safe1", 0).endswith("/helpfulness_labeled_pairs.jsonl")
    assert plan.align_spec("safe1", 0)["margin"] == 1.0


# --------------------------------------------------------------------------- the losses


def first_batch_loss(trainer) -> float:
    trainer.train()
    return next(e["loss"] for e in trainer.state.log_history if "loss" in e)


def safe_trainer(loss, tiny_models, examples, tmp_path, *, beta, margin, **changes):
    return build_trainer(tiny_models["stage1"], examples,
                         NodeSettings(loss, beta, training(**changes), margin=margin),
                         output_dir=tmp_path / f"{loss}-{margin}",
                         reference_dir=tiny_models["sft"])


def pair_logratios(tiny_models, examples) -> list[tuple[float, float]]:
    """(m, margin) of each example: the policy stage1 and the reference sft, computed here."""
    out = []
    for e in examples:
        prompt = e["prompt"][len("USER: "):-len(" ASSISTANT:")]
        lp = {model: [completion_logps(tiny_models[model], prompt, e[k].lstrip())[0]
                      for k in ("chosen", "rejected")] for model in ("stage1", "sft")}
        m = (lp["stage1"][0] - lp["sft"][0]) - (lp["stage1"][1] - lp["sft"][1])
        out.append((m, e["safety_margin"]))
    return out


def sba(log_r: float, lam: float = 0.2, s: float = 4.0) -> float:
    return (lam * math.exp((1 + lam) * log_r) - (1 + lam) * math.exp(-lam * log_r) + 1) \
        / (s * lam * (lam + 1))


@pytest.mark.parametrize("loss", ["safedpo", "bso"])
def test_each_safe_loss_computes_its_formula_on_real_log_probs(tiny_models, labeled_file,
                                                              tmp_path, loss):
    """One batch of the six transformed pairs: the first logged loss is the paper's
    formula averaged over the pairs, from log-probs computed here."""
    beta, margin = 0.5, 1.5
    examples = load_examples(labeled_file, loss, PROMPT_TEMPLATE, seed=0, margin=margin)
    want_terms = []
    for m, pair_margin in pair_logratios(tiny_models, examples):
        z = beta * m - pair_margin
        want_terms.append(softplus(-z) if loss == "safedpo" else sba(-z))
    want = sum(want_terms) / len(want_terms)
    trainer = safe_trainer(loss, tiny_models, examples, tmp_path, beta=beta, margin=margin)
    assert first_batch_loss(trainer) == pytest.approx(want, rel=1e-3, abs=2e-4)


def test_safedpo_with_margin_zero_is_exactly_dpo_on_the_transformed_pairs(
        tiny_models, labeled_file, tmp_path):
    """Same rows, same order, same TRL loss: the trained weights are bit-identical."""
    safe = load_examples(labeled_file, "safedpo", PROMPT_TEMPLATE, seed=0, margin=0.0)
    plain = [{k: e[k] for k in ("prompt", "chosen", "rejected")} for e in safe]
    runs = {}
    for loss, examples in (("safedpo", safe), ("dpo", plain)):
        trainer = build_trainer(
            tiny_models["stage1"], examples,
            NodeSettings(loss, 0.5, training(per_device_train_batch_size=2, max_steps=3),
                         margin=0.0 if loss == "safedpo" else None),
            output_dir=tmp_path / loss, reference_dir=tiny_models["sft"])
        trainer.train()
        runs[loss] = ([e["loss"] for e in trainer.state.log_history if "loss" in e],
                      {k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
    assert runs["safedpo"][0] == runs["dpo"][0] and len(runs["dpo"][0]) == 3
    for key, weight in runs["dpo"][1].items():
        assert torch.equal(runs["safedpo"][1][key], weight), key


def test_bso_logistic_member_is_safedpo(tiny_models, labeled_file, tmp_path, monkeypatch):
    """BSO's logistic generator, log(1 + R), is SafeDPO with Delta = C: our own loss path
    (policy log-probs through the trl_adapter) agrees with TRL's sigmoid loss."""
    from sacpo_steps.training import safety_trainers

    examples = load_examples(labeled_file, "bso", PROMPT_TEMPLATE, seed=0, margin=1.5)
    safedpo = first_batch_loss(safe_trainer("safedpo", tiny_models, examples, tmp_path,
                                            beta=0.5, margin=1.5))
    monkeypatch.setattr(safety_trainers._BSOTrainer, "pair_loss",
                        staticmethod(safety_trainers.logistic_loss))
    bso = first_batch_loss(safe_trainer("bso", tiny_models, examples, tmp_path,
                                        beta=0.5, margin=1.5))
    assert bso == pytest.approx(safedpo, rel=1e-5)


def test_safedpo_and_bso_nodes_share_one_reference_pass():
    cfg = demo_config()
    for name, loss, margin in (("s0", "safedpo", 0), ("s2", "safedpo", 2), ("b2", "bso", 2)):
        cfg["models"][name] = {"parent": "sft", "data": "helpfulness", "loss": loss,
                               "beta": 0.1, "margin": margin}
    plan = load_plan(cfg)
    shared = [readers for (ref, key), readers in plan.ref_logps_jobs.items()
              if "safedpo" in key]
    assert shared == [["s0", "s2", "b2"]]
    assert plan.align_ref_logps("b2", 0) == plan.align_ref_logps("s0", 0)


def test_a_loss_can_share_only_a_matching_reference_pass():
    from sacpo_steps.training.losses import LOSSES, Loss, register_loss

    bso = LOSSES["bso"]
    wrong = Loss(**{**bso.__dict__, "name": "bso_wrong", "reference_loss": "dpo"})
    with pytest.raises(ValueError, match="same data"):
        register_loss(wrong)
    assert "bso_wrong" not in LOSSES


@pytest.mark.parametrize("loss", ["safedpo", "bso"])
def test_align_reads_safedpos_shared_reference_pass_and_trains_as_its_own(
        loss, tiny_models, labeled_file, tmp_path):
    """The ref_logps job computes SafeDPO's pass once (margin 0 rows); a SafeDPO or BSO
    node reading it trains to the same weights as with its own pass, and its card
    records the margin."""
    from safetensors.torch import load_file

    from sacpo_steps.training import ref_logps
    from sacpo_steps.training.align import align
    from sacpo_steps.training.reference import reference_key_spec

    settings = {**ONE_STEP, "per_device_train_batch_size": 2, "max_steps": 2}
    key = reference_key_spec("safedpo", settings, PROMPT_TEMPLATE)
    table = tmp_path / "ref.json"
    done = ref_logps.compute(tiny_models["stage1"], labeled_file, table,
                             spec={"reference": "stage1", "data": "d", **key, "seed": 0})
    assert done["rows"] == 6  # the transformed rows: both-unsafe pairs dropped

    def train(out, **kwargs):
        return align(tiny_models["stage1"], labeled_file, out, name="s", parent="stage1",
                     data="d", settings=NodeSettings(loss, 0.1, training(**settings),
                                                     margin=2.0),
                     prompt_template=PROMPT_TEMPLATE, seed=0, **kwargs)

    own = train(tmp_path / "own")
    cached = train(tmp_path / "cached", ref_logps=table)
    a = load_file(tmp_path / "own" / "model.safetensors")
    b = load_file(tmp_path / "cached" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ from its own pass"
    assert cached["training"]["first_loss"] == own["training"]["first_loss"]
    card = json.loads((tmp_path / "cached" / "sacpo.json").read_text())
    assert card["lineage"][-1]["margin"] == 2.0 and "margin 2.0" in card["description"]
    assert card["method"] == loss
