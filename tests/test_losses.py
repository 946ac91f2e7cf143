"""The loss registry: one table the code asks; each loss computes what its entry says."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from sacpo_steps.core.errors import InputError
from sacpo_steps.models.tokens import encode_pair
from sacpo_steps.training.align import align
from sacpo_steps.training.losses import (
    DATA_KINDS,
    LOSSES,
    THEOREM1_ARGS,
    Loss,
    check_node,
    get_loss,
    register_loss,
    registered,
)
from sacpo_steps.training.node import NodeSettings
from sacpo_steps.training.settings import TrainingConfig
from sacpo_steps.training.trainer import build_trainer, load_examples
from tests.helpers import PROMPT_TEMPLATE

ONE_STEP = {"learning_rate": 1e-3, "num_train_epochs": 1, "per_device_train_batch_size": 1,
            "gradient_accumulation_steps": 1, "max_length": 64, "warmup_steps": 0.0,
            "logging_steps": 1, "max_steps": 1}
LABEL_SMOOTHING = 0.1


def training_for(loss: str, **changes) -> TrainingConfig:
    trl = {"label_smoothing": LABEL_SMOOTHING} if loss == "robust" else {}
    return TrainingConfig.from_dict({**ONE_STEP, "trl": trl, **changes})


def dpo_family(name: str, loss_type: str, needs_reference: bool = True) -> Loss:
    return Loss(name=name, data="pairs", config="trl:DPOConfig", trainer="trl:DPOTrainer",
                loss_type=loss_type, needs_reference=needs_reference,
                coefficient="beta: test entry")


def logged_losses(trainer) -> list[float]:
    trainer.train()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def completion_logps(model_dir, prompt: str, answer: str) -> tuple[float, int]:
    """(summed log-prob, token count) of the answer's completion ids, computed here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt_ids, completion = encode_pair(tok, PROMPT_TEMPLATE, prompt, answer)
    with torch.no_grad():
        logp = model(torch.tensor([prompt_ids + completion])).logits[0].log_softmax(-1)
    total = sum(logp[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(completion))
    return total, len(completion)


def softplus(x: float) -> float:
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def expected_loss(loss: str, beta: float, policy: dict, ref: dict) -> float:
    """The per-pair losses of TRL 1.16's DPOTrainer, from our own log-probs."""
    (pc, nc), (pr, nr) = policy["chosen"], policy["rejected"]
    (rc, _), (rr, _) = ref["chosen"], ref["rejected"]
    delta = (pc - rc) - (pr - rr)
    if loss == "dpo":
        return softplus(-beta * delta)
    if loss == "hinge":
        return max(0.0, 1 - beta * delta)
    if loss == "robust":
        e = LABEL_SMOOTHING
        return ((1 - e) * softplus(-beta * delta) - e * softplus(beta * delta)) / (1 - 2 * e)
    if loss == "ipo":  # per-token averaged log-ratios
        avg = (pc - rc) / nc - (pr - rr) / nr
        return (avg - 1 / (2 * beta)) ** 2
    raise AssertionError(loss)


def test_unknown_loss_lists_the_known_ones():
    with pytest.raises(InputError) as err:
        get_loss("dpp")
    assert err.value.field == "loss"
    for name in ("dpo", "ipo", "robust", "hinge", "kto"):
        assert name in str(err.value)


def test_builtin_entries_name_real_trl_classes_and_loss_types():
    from trl import DPOConfig

    loss_types_help = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    assert {"dpo", "ipo", "robust", "hinge", "kto"} <= set(LOSSES)
    for entry in LOSSES.values():
        assert entry.data in DATA_KINDS
        assert entry.coefficient
        assert entry.config_class().__name__ == entry.config_name
        assert entry.trainer_class().__name__.endswith("Trainer")
        if entry.config_name == "DPOConfig" and entry.loss_type is not None:
            assert f"'{entry.loss_type}'" in loss_types_help, entry.name  # (bso: its own)
    assert get_loss("kto").loss_type is None and get_loss("kto").min_batch_size == 2
    assert "AVERAGED" in get_loss("ipo").coefficient  # a DPO beta does not carry over


@pytest.mark.parametrize("loss", ["dpo", "ipo", "robust", "hinge"])
def test_each_loss_computes_what_its_entry_says(tiny_models, pairs_file, tmp_path, loss):
    """One pair, policy stage1 and reference SFT (so the log-ratios are not zero): the
    first logged loss is the formula of the entry, from log-probs computed here."""
    beta = 0.5
    examples = load_examples(pairs_file, loss, PROMPT_TEMPLATE, seed=0, max_examples=1)
    trainer = build_trainer(tiny_models["stage1"], examples,
                            settings=NodeSettings(loss, beta, training_for(loss)),
                            output_dir=tmp_path / "t",
                            reference_dir=tiny_models["sft"])
    assert trainer.args.loss_type == [loss if loss != "dpo" else "sigmoid"]
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    first = examples[0]
    row = next(r for r in rows if PROMPT_TEMPLATE.format(prompt=r["prompt"]) == first["prompt"]
               and " " + r["chosen"] == first["chosen"])
    logps = {model: {key: completion_logps(tiny_models[model], row["prompt"], row[key])
                     for key in ("chosen", "rejected")} for model in ("stage1", "sft")}
    want = expected_loss(loss, beta, logps["stage1"], logps["sft"])
    assert logged_losses(trainer)[0] == pytest.approx(want, rel=1e-3, abs=2e-4)


@pytest.mark.parametrize(("loss", "at_start"), [
    ("ipo", 1 / (4 * 0.5**2)),  # (0 - 1/(2 tau))^2 with policy == reference
    ("robust", math.log(2)),
    ("hinge", 1.0),
])
def test_variants_train_through_align(tiny_models, pairs_file, tmp_path, loss, at_start):
    out = tmp_path / "models" / loss
    summary = align(tiny_models["stage1"], pairs_file, out, name=loss, parent="stage1",
                    data="safety",
                    settings=NodeSettings(loss, 0.5, training_for(
                        loss, per_device_train_batch_size=2, max_steps=2, learning_rate=5e-2)),
                    prompt_template=PROMPT_TEMPLATE)
    assert summary["training"]["steps"] == 2
    assert summary["training"]["first_loss"] == pytest.approx(at_start, abs=1e-4)
    assert summary["training"]["final_loss"] != pytest.approx(at_start, abs=1e-4)
    card = json.loads((out / "sacpo.json").read_text())
    assert card["method"] == loss and card["loss_type"] == loss
    assert card["coefficient"] == LOSSES[loss].coefficient


def test_a_new_dpo_variant_is_one_entry(tiny_models, pairs_file, tmp_path):
    """TRL's APO-zero: registered in one place, trained through `align` by name."""
    assert "apo_zero" not in LOSSES
    with registered(dpo_family("apo_zero", "apo_zero")):
        out = tmp_path / "models" / "apo"
        summary = align(tiny_models["stage1"], pairs_file, out, name="apo", parent="stage1",
                        data="safety",
                        settings=NodeSettings("apo_zero", 0.1, training_for(
                            "apo_zero", per_device_train_batch_size=2, max_steps=2)),
                        prompt_template=PROMPT_TEMPLATE)
    assert "apo_zero" not in LOSSES  # the registration ended with the block
    # APO-zero at policy == reference: (1 - sigmoid(0)) + sigmoid(0) = 1 (DPO would be log 2)
    assert summary["training"]["first_loss"] == pytest.approx(1.0, abs=1e-4)
    assert summary["training"]["steps"] == 2
    card = json.loads((out / "sacpo.json").read_text())
    assert (card["method"], card["loss_type"]) == ("apo_zero", "apo_zero")


def test_a_reference_free_loss_is_refused_for_stage2():
    with registered(dpo_family("ref_free", "sft", needs_reference=False)) as entry:
        training = {"per_device_train_batch_size": 4, "trl": {}}
        check_node(entry, stage2=False, training=training, where="models.helpful")
        with pytest.raises(InputError, match="Theorem 1") as err:
            check_node(entry, stage2=True, training=training, where="models.safe")
    assert err.value.field == "models.safe.loss"
    assert "reference" in str(err.value) and "ref_free" in str(err.value)


def test_check_node_batch_size_and_robust_label_smoothing():
    with pytest.raises(InputError, match=">= 2") as err:
        check_node(get_loss("kto"), stage2=True, training={"per_device_train_batch_size": 1},
                   where="models.kto_h")
    assert err.value.field == "models.kto_h.training.per_device_train_batch_size"
    for trl in ({}, {"label_smoothing": 0.0}, {"label_smoothing": 0.5}):
        with pytest.raises(InputError, match="label_smoothing") as err:
            check_node(get_loss("robust"), stage2=True,
                       training={"per_device_train_batch_size": 4, "trl": trl},
                       where="models.r")
        assert err.value.field == "models.r.training.trl.label_smoothing"
    check_node(get_loss("robust"), stage2=True,
               training={"per_device_train_batch_size": 4, "trl": {"label_smoothing": 0.1}},
               where="models.r")
    # the node's trl arguments are checked too
    with pytest.raises(InputError, match="beta") as err:
        check_node(get_loss("dpo"), stage2=False,
                   training={"per_device_train_batch_size": 4, "trl": {"beta": 0.2}},
                   where="models.d")
    assert err.value.field == "models.d.training.trl.beta"


# TRL arguments that break Theorem 1's equivalence: (loss, argument, value)
THEOREM1_BREAKERS = [
    ("dpo", "f_divergence_type", "forward_kl"),
    ("dpo", "f_divergence_type", "js_divergence"),
    ("dpo", "f_divergence_type", "alpha_divergence"),
    ("dpo", "ld_alpha", 0.5),
    ("dpo", "ld_alpha", 0.0),
    ("dpo", "loss_weights", [0.5]),
    ("dpo", "sync_ref_model", True),
    ("kto", "sync_ref_model", True),
    ("dpo", "use_weighting", True),
]


@pytest.mark.parametrize(("loss", "key", "value"), THEOREM1_BREAKERS)
def test_stage2_refuses_trl_arguments_that_break_theorem1(loss, key, value):
    training = {"per_device_train_batch_size": 4, "trl": {key: value}}
    check_node(get_loss(loss), stage2=False, training=training, where="models.helpful")
    with pytest.raises(InputError, match="Theorem 1") as err:
        check_node(get_loss(loss), stage2=True, training=training, where="models.safe")
    assert err.value.field == f"models.safe.training.trl.{key}"
    assert repr(value) in err.value.message and "stage-2" in err.value.message


def test_stage2_names_the_global_trl_section_it_inherits():
    training = {"per_device_train_batch_size": 4, "trl": {"ld_alpha": 0.5}}
    with pytest.raises(InputError, match="Theorem 1") as err:
        check_node(get_loss("dpo"), stage2=True, training=training, where="models.safe",
                   trl_where="training.trl")
    assert err.value.field == "training.trl.ld_alpha"
    assert "models.safe" in err.value.message and "stage-1 nodes' own" in err.value.message


def test_stage2_keeps_the_values_that_keep_theorem1():
    kept = {"f_divergence_type": "reverse_kl", "ld_alpha": 1.0, "loss_weights": [1.0],
            "sync_ref_model": False, "use_weighting": False,
            # not refused: unused by TRL 1.16's sigmoid loss
            "label_smoothing": 0.1, "f_alpha_divergence_coef": 0.3}
    check_node(get_loss("dpo"), stage2=True,
               training={"per_device_train_batch_size": 4, "trl": kept}, where="models.safe")
    assert all(THEOREM1_ARGS[k][0](kept[k]) for k in THEOREM1_ARGS)
    assert not THEOREM1_ARGS["ld_alpha"][0](True)  # a boolean is not the weight 1


def test_stage2_accepts_the_installed_trl_defaults():
    """What TRL does when the argument is left out keeps Theorem 1 (reverse_kl is TRL
    1.16's default and its only name for reverse KL)."""
    import dataclasses

    checked = 0
    for name in ("dpo", "kto"):
        defaults = {f.name: f.default for f in dataclasses.fields(get_loss(name).config_class())}
        for key, (keeps, _) in THEOREM1_ARGS.items():
            if key in defaults:
                assert keeps(defaults[key]), (name, key, defaults[key])
                checked += 1
    assert checked == 6  # five DPOConfig fields, and KTOConfig's sync_ref_model


def test_stage2_refuses_a_loss_entry_that_fixes_a_combination():
    mixed = Loss(name="rpo_like", data="pairs", config="trl:DPOConfig",
                 trainer="trl:DPOTrainer", loss_type=None, needs_reference=True,
                 coefficient="beta", fixed={"loss_type": ["sigmoid", "sft"],
                                            "loss_weights": [1.0, 0.5]})
    with registered(mixed) as entry:
        training = {"per_device_train_batch_size": 4, "trl": {}}
        check_node(entry, stage2=False, training=training, where="models.helpful")
        with pytest.raises(InputError, match="Theorem 1") as err:
            check_node(entry, stage2=True, training=training, where="models.safe")
    assert err.value.field == "models.safe.loss"
    assert "rpo_like" in err.value.message


def test_align_refuses_what_the_plan_would(tiny_models, pairs_file, tmp_path):
    """The CLI path checks the entry too: robust without label smoothing trains nothing."""
    with pytest.raises(InputError, match="label_smoothing"):
        align(tiny_models["stage1"], pairs_file, tmp_path / "out", name="r", parent="stage1",
              data="safety",
              settings=NodeSettings("robust", 0.1, TrainingConfig.from_dict(ONE_STEP)),
              prompt_template=PROMPT_TEMPLATE)
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError,
                       match="known losses: bso, dpo, hinge, ipo, kto, robust, safedpo"):
        align(tiny_models["stage1"], pairs_file, tmp_path / "out", name="r", parent="stage1",
              data="safety",
              settings=NodeSettings("simpo", 0.1, TrainingConfig.from_dict(ONE_STEP)),
              prompt_template=PROMPT_TEMPLATE)


def test_register_loss_refuses_bad_entries():
    with pytest.raises(ValueError, match="already registered"):
        register_loss(dpo_family("dpo", "ipo"))
    assert LOSSES["dpo"].loss_type == "sigmoid"
    bad = [
        Loss(name="x", data="triples", config="trl:DPOConfig", trainer="trl:DPOTrainer",
             loss_type="sigmoid", needs_reference=True, coefficient="c"),
        Loss(name="x", data="pairs", config="DPOConfig", trainer="trl:DPOTrainer",
             loss_type="sigmoid", needs_reference=True, coefficient="c"),
        Loss(name="x", data="pairs", config="trl:DPOConfig", trainer="trl:DPOTrainer",
             loss_type="sigmoid", needs_reference=True, coefficient="c", fixed={"beta": 1}),
        Loss(name="x y", data="pairs", config="trl:DPOConfig", trainer="trl:DPOTrainer",
             loss_type="sigmoid", needs_reference=True, coefficient="c"),
    ]
    for entry in bad:
        with pytest.raises(ValueError):
            register_loss(entry)
    assert "x" not in LOSSES
    # a temporary replacement is undone
    with registered(dpo_family("dpo", "ipo")):
        assert get_loss("dpo").loss_type == "ipo"
    assert get_loss("dpo").loss_type == "sigmoid"


def test_the_registry_imports_nothing_heavy():
    """The plan imports the registry and the training settings on every Snakemake call."""
    code = ("import sys, sacpo_steps.training.losses, sacpo_steps.training.settings; "
            "print(sorted(m for m in ('torch', 'trl', 'transformers', 'datasets') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_a_registered_loss_goes_through_the_plan_into_training(tiny_models, pairs_file,
                                                               tmp_path):
    """One entry is all a new loss needs: the schema, the plan (data file, checks) and the
    align step all know it, with nothing else edited."""
    import copy
    from pathlib import Path

    import yaml

    from sacpo_steps.plan import PlanError, load_plan

    root = Path(__file__).resolve().parent.parent
    base = yaml.safe_load((root / "config" / "config.yaml").read_text(encoding="utf-8"))
    cfg = copy.deepcopy(base)
    cfg["models"]["apo_s"] = {"parent": "dpo_h", "data": "safety", "loss": "apo_zero",
                              "beta": 0.1, "training": {"per_device_train_batch_size": 2,
                                                        "max_steps": 1}}
    with pytest.raises(PlanError, match="apo_zero"):  # unknown before it is registered
        load_plan(copy.deepcopy(cfg))
    with registered(dpo_family("apo_zero", "apo_zero")):
        plan = load_plan(cfg)
        spec = plan.align_spec("apo_s", 0)
        assert plan.align_data_file("apo_s", 0).endswith("/safety_pairs.jsonl")
        summary = align(tiny_models["stage1"], pairs_file, tmp_path / "apo_s",
                        name=spec["name"], parent=spec["parent"], data=spec["data"],
                        settings=NodeSettings.from_dict(spec),
                        prompt_template=PROMPT_TEMPLATE, seed=spec["seed"])
    assert summary["method"] == "apo_zero" and summary["training"]["steps"] == 1
