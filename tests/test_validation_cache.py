"""Remembered validations: a config that passed is not checked again; anything new is."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import yaml

from sacpo_steps.core import validation_cache
from sacpo_steps.core.errors import InputError
from sacpo_steps.plan import PlanError, validate_config
from sacpo_steps.training.settings import TrainingConfig

ROOT = Path(__file__).resolve().parent.parent
DEMO = yaml.safe_load((ROOT / "config" / "config.yaml").read_text(encoding="utf-8"))


@pytest.fixture
def cache_file(tmp_path):
    path = tmp_path / ".snakemake" / "sacpo_steps" / "validated.json"
    validation_cache.use(path)
    yield path
    validation_cache.use(None)


def count_checks(monkeypatch) -> list[int]:
    """Count the schema checks the loader runs (the jsonschema validator's)."""
    from sacpo_steps.plan import loading

    calls = [0]
    real = loading._check_against_schema

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "_check_against_schema", counted)
    return calls


def test_a_passed_config_is_checked_once_and_still_gets_its_defaults(cache_file, monkeypatch):
    calls = count_checks(monkeypatch)
    first = validate_config(copy.deepcopy(DEMO))
    validation_cache.use(cache_file)  # a new Snakemake call: the file read afresh
    second = validate_config(copy.deepcopy(DEMO))
    assert calls[0] == 1 and cache_file.is_file()
    assert second == first and "resources" in second  # defaults filled both times


def test_an_edited_config_is_checked_again(cache_file, monkeypatch):
    calls = count_checks(monkeypatch)
    validate_config(copy.deepcopy(DEMO))
    edited = copy.deepcopy(DEMO)
    edited["models"]["dpo_h.dpo_s-0.01"]["beta"] = 0.05
    validate_config(edited)
    assert calls[0] == 2


def test_an_invalid_config_is_refused_every_time(cache_file):
    bad = copy.deepcopy(DEMO)
    bad["models"]["dpo_h.dpo_s-0.01"]["beta"] = "high"
    for _ in range(2):
        with pytest.raises(PlanError, match="models.dpo_h.dpo_s-0.01.beta"):
            validate_config(copy.deepcopy(bad))
    assert not cache_file.exists()  # only successes are remembered


def test_training_settings_remembered_but_a_bad_value_still_refused(cache_file, monkeypatch):
    from sacpo_steps.training import settings

    good = TrainingConfig.from_dict({"learning_rate": 1e-4})
    validation_cache.use(cache_file)
    monkeypatch.setattr(settings, "_training_validator", lambda: pytest.fail("checked again"))
    assert TrainingConfig.from_dict({"learning_rate": 1e-4}) == good
    monkeypatch.undo()
    with pytest.raises(InputError, match="training.learning_rate"):
        TrainingConfig.from_dict({"learning_rate": -1.0})


def test_without_a_cache_file_nothing_is_written_or_skipped(tmp_path, monkeypatch):
    validation_cache.use(None)
    calls = count_checks(monkeypatch)
    validate_config(copy.deepcopy(DEMO))
    validate_config(copy.deepcopy(DEMO))
    assert calls[0] == 2


def test_a_corrupt_or_read_only_cache_file_only_costs_a_check(cache_file, monkeypatch):
    cache_file.parent.mkdir(parents=True)
    cache_file.write_text("{not json", encoding="utf-8")
    calls = count_checks(monkeypatch)
    validate_config(copy.deepcopy(DEMO))
    assert calls[0] == 1
    if sys.platform != "win32":
        cache_file.unlink()
        cache_file.parent.chmod(0o500)
        try:
            validation_cache.use(cache_file)
            validate_config(copy.deepcopy(DEMO))  # cannot write: no error
        finally:
            cache_file.parent.chmod(0o700)
