"""Training settings under TRL's names: schema defaults, deprecated names, `trl:` passthrough."""

from __future__ import annotations

import dataclasses
import json
import logging
from importlib.metadata import version

import pytest

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.schema import load_config_schema
from sacpo_steps.training.losses import get_loss, write_trl_fields
from sacpo_steps.training.node import NodeSettings
from sacpo_steps.training.settings import (
    DEPRECATED,
    PASSED_AS_IS,
    PIPELINE_SET,
    TrainingConfig,
    migrate_training,
    training_defaults,
)
from sacpo_steps.training.trl_fields import REMOVED, check_trl_args, trl_fields


def schema_with(defaults: dict) -> dict:
    return {"$defs": {"training": {"properties": {k: {"default": v}
                                                  for k, v in defaults.items()}}}}


def test_defaults_come_from_the_schema_not_the_dataclass():
    names = [f.name for f in dataclasses.fields(TrainingConfig)]
    for f in dataclasses.fields(TrainingConfig):  # no second copy of the defaults
        assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    project = training_defaults(load_config_schema())
    fake = schema_with({**project, "num_train_epochs": 7, "max_length": 99})
    cfg = TrainingConfig.from_dict({"learning_rate": 0.5}, fake)
    assert cfg.learning_rate == 0.5
    assert (cfg.num_train_epochs, cfg.max_length) == (7, 99)  # the given schema's
    with pytest.raises(InputError, match="no default for \\['trl'\\]"):
        TrainingConfig.from_dict({}, schema_with({n: 1 for n in names if n != "trl"}))


def test_the_project_schema_has_every_key_with_a_default():
    props = load_config_schema()["$defs"]["training"]["properties"]
    assert set(props) == {f.name for f in dataclasses.fields(TrainingConfig)}
    cfg = TrainingConfig.from_dict({})
    assert cfg.trl == {} and cfg.warmup_steps == props["warmup_steps"]["default"]
    cfg.trl["x"] = 1  # a fresh copy: the cached schema is untouched
    assert TrainingConfig.from_dict({}).trl == {}


def test_deprecated_names_migrate_with_a_message():
    section = {"learning_rate": 1e-3, "epochs": 2, "per_device_batch_size": 8,
               "lr_scheduler": "constant", "warmup_ratio": 0}
    out, messages = migrate_training(section, "models.safe.training")
    assert out == {"learning_rate": 1e-3, "num_train_epochs": 2,
                   "per_device_train_batch_size": 8, "lr_scheduler_type": "constant",
                   "warmup_steps": 0.0}
    assert isinstance(out["warmup_steps"], float)  # a ratio, never a count of steps
    assert list(out) == ["learning_rate", *DEPRECATED.values()]  # order kept
    assert messages[0] == ("models.safe.training.epochs is deprecated: use num_train_epochs "
                           "(TRL's name); the old name works until the next release")
    assert len(messages) == 4 and "ratio of all steps" in messages[3]
    assert section["epochs"] == 2  # the input is not modified
    assert migrate_training({"num_train_epochs": 1}, "training") == ({"num_train_epochs": 1}, [])


def test_old_and_new_name_together_fail():
    with pytest.raises(InputError) as err:
        migrate_training({"epochs": 2, "num_train_epochs": 3}, "training")
    assert "epochs" in str(err.value) and "num_train_epochs" in str(err.value)
    assert err.value.field == "training.epochs"


def test_from_dict_accepts_old_names_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="sacpo.training_config"):
        cfg = TrainingConfig.from_dict({"epochs": 2, "warmup_ratio": 0.1})
    assert (cfg.num_train_epochs, cfg.warmup_steps) == (2, 0.1)
    assert "training.epochs is deprecated" in caplog.text


@pytest.mark.parametrize(("loss", "key", "expected"), [
    ("dpo", "label_smothing", ["label_smoothing", "not an argument of TRL's DPOConfig"]),
    ("kto", "label_smoothing", ["not an argument of TRL's KTOConfig"]),
    ("dpo", "beta", ["set by the pipeline", "the node's `beta`"]),
    ("dpo", "loss_type", ["the node's `loss`"]),
    ("dpo", "per_device_train_batch_size", ["training.per_device_train_batch_size"]),
    ("dpo", "seed", ["`seed` / `seeds`"]),
    ("dpo", "output_dir", ["set by the pipeline"]),
    ("kto", "desirable_weight", ["label counts"]),
    ("dpo", "max_prompt_length", ["removed from TRL", "training.max_prompt_length"]),
    ("dpo", "warmup_ratio", ["removed from TRL", "training.warmup_steps"]),
    ("dpo", "reference_free", ["removed, no replacement"]),
    ("dpo", "_n_gpu", ["not an argument of TRL's DPOConfig"]),
])
def test_bad_trl_arguments_are_refused_by_name(loss, key, expected):
    with pytest.raises(InputError) as err:
        check_trl_args({key: 1}, get_loss(loss), "models.n.training.trl")
    assert err.value.field == f"models.n.training.trl.{key}"
    for text in expected:
        assert text in str(err.value)


def test_good_trl_arguments_pass():
    check_trl_args({"label_smoothing": 0.1, "max_grad_norm": 0.5, "optim": "adafactor"},
                   get_loss("dpo"), "training.trl")
    check_trl_args({"max_grad_norm": 0.5}, get_loss("kto"), "training.trl")
    with pytest.raises(InputError, match="mapping"):
        check_trl_args(["label_smoothing"], get_loss("dpo"), "training.trl")


def test_stored_trl_fields_equal_the_installed_trl(tmp_path):
    from trl import DPOConfig, KTOConfig

    stored = trl_fields()
    assert stored["trl_version"] == version("trl")
    for cls in (DPOConfig, KTOConfig):
        assert stored["configs"][f"trl:{cls.__name__}"] == sorted(
            f.name for f in dataclasses.fields(cls))
    # the generator writes the same lists
    fresh = write_trl_fields(tmp_path / "trl_fields.json")
    assert fresh["configs"] == stored["configs"]
    assert json.loads((tmp_path / "trl_fields.json").read_text())["configs"] == stored["configs"]


def test_the_tables_agree_with_trl():
    configs = trl_fields()["configs"]
    dpo, kto = set(configs["trl:DPOConfig"]), set(configs["trl:KTOConfig"])
    assert not set(REMOVED) & (dpo | kto)  # removed really means removed
    assert set(PIPELINE_SET) - {"desirable_weight", "undesirable_weight"} <= dpo
    assert set(PIPELINE_SET) <= kto
    training_keys = {f.name for f in dataclasses.fields(TrainingConfig)}
    assert set(PASSED_AS_IS) <= training_keys & dpo & kto
    assert not set(DEPRECATED) & training_keys


def test_trl_arguments_reach_the_trl_config(tiny_models, pairs_file, tmp_path):
    from sacpo_steps.training.trainer import build_trainer, load_examples
    from tests.helpers import PROMPT_TEMPLATE

    training = TrainingConfig.from_dict({
        "num_train_epochs": 1, "per_device_train_batch_size": 2, "max_length": 64,
        "max_steps": 1, "trl": {"label_smoothing": 0.2, "max_grad_norm": 0.25}})
    examples = load_examples(pairs_file, "robust", PROMPT_TEMPLATE, seed=0)
    trainer = build_trainer(tiny_models["sft"], examples,
                            settings=NodeSettings("robust", 0.1, training),
                            output_dir=tmp_path / "t")
    assert trainer.args.label_smoothing == 0.2
    assert trainer.args.max_grad_norm == 0.25
    assert trainer.args.loss_type == ["robust"]
    assert trainer.args.num_train_epochs == 1 and trainer.args.per_device_train_batch_size == 2
