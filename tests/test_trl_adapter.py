"""TRL's private surface: all in `models/trl_adapter.py`, and still where it was.

The adapter's tokenization is checked against TRL's own trainers in test_tokens.py
(the ids a model is trained on equal the ids it is sampled from).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import types

import pytest

from sacpo_steps.core.provenance import PACKAGE_DIR
from sacpo_steps.models import trl_adapter
from sacpo_steps.models.trl_adapter import CONTRACT, Dependency

ADAPTER = PACKAGE_DIR / "models" / "trl_adapter.py"


@pytest.mark.parametrize("dependency", CONTRACT, ids=lambda d: d.symbol)
def test_the_installed_trl_still_has_each_private_name(dependency):
    assert dependency.problem() is None, dependency.problem()


def test_a_moved_name_is_reported_with_the_library_version_and_the_symbol():
    gone = Dependency("trl", "trl.trainer.dpo_trainer:DPOTrainer._gone_in_a_release", "a test")
    problem = gone.problem()
    assert problem is not None
    assert f"trl {importlib.metadata.version('trl')}" in problem
    assert "trl.trainer.dpo_trainer:DPOTrainer._gone_in_a_release" in problem
    assert "is missing" in problem
    no_module = Dependency("trl", "trl.no_such_module:thing", "a test").problem()
    assert no_module is not None and "trl.no_such_module:thing" in no_module


def test_a_changed_signature_of_the_reference_pass_is_reported(monkeypatch):
    import trl.trainer.dpo_trainer as dpo

    def moved(self, dataset, batch_size):  # a release that drops `name`
        return dataset

    monkeypatch.setattr(dpo.DPOTrainer, trl_adapter.PRECOMPUTE_METHOD, moved)
    dependency = next(d for d in CONTRACT if d.symbol.startswith("trl.trainer.dpo_trainer:")
                      and d.symbol.endswith(trl_adapter.PRECOMPUTE_METHOD))
    problem = dependency.problem()
    assert problem is not None and "takes ('self', 'dataset', 'batch_size')" in problem


def test_reference_loaders_are_restored_after_the_build():
    import trl.trainer.dpo_trainer as dpo
    from trl import DPOTrainer

    before = {n: getattr(dpo, n) for n in trl_adapter.REFERENCE_LOADERS}
    with trl_adapter.no_reference_loading(DPOTrainer):
        assert dpo.hash_module(None) == "cached-reference-log-probs"
        assert dpo.create_model_from_path("any/path") is None
    assert {n: getattr(dpo, n) for n in trl_adapter.REFERENCE_LOADERS} == before


def test_the_replaced_reference_pass_can_fall_back_to_trls_own():
    calls = []

    class Base:
        def _precompute_ref_logps(self, dataset, name, batch_size):
            calls.append(("trl", name))
            return dataset

    def cached(trainer, dataset, name, batch_size):
        if name != "train":
            return trl_adapter.original_reference_pass(trainer, dataset, name, batch_size)
        calls.append(("file", name))
        return dataset

    cls = trl_adapter.with_reference_pass(Base, cached, module=__name__)
    trainer = cls()
    trainer._precompute_ref_logps([], "train", 2)
    trainer._precompute_ref_logps([], "eval", 2)
    assert calls == [("file", "train"), ("trl", "eval")]


def test_the_token_count_is_read_only_where_a_trainer_keeps_one():
    assert trl_adapter.train_tokens(types.SimpleNamespace(_total_train_tokens=42)) == 42
    assert trl_adapter.train_tokens(types.SimpleNamespace()) is None


def _private_names() -> set[str]:
    names = {trl_adapter.PRECOMPUTE_METHOD, trl_adapter.TOKEN_COUNT,
             *trl_adapter.REFERENCE_LOADERS}
    assert all(isinstance(n, str) and n for n in names)
    return names


def test_no_other_module_touches_trls_private_names():
    """The names of the contract, and imports from TRL's internal modules, appear in
    the adapter only (a second user would escape the contract tests)."""
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, _private_names())) + r")\b")
    offenders = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if path == ADAPTER:
            continue
        text = path.read_text(encoding="utf-8")
        offenders += [f"{path.relative_to(PACKAGE_DIR)}: {m.group(1)}"
                      for m in pattern.finditer(text)]
        for node in ast.walk(ast.parse(text)):
            module = None
            if isinstance(node, ast.ImportFrom) and node.module:
                module = node.module
            elif isinstance(node, ast.Import):
                module = next((a.name for a in node.names if a.name.startswith("trl.")), None)
            if module and module.startswith("trl.") and module.split(".")[1] == "trainer":
                offenders.append(f"{path.relative_to(PACKAGE_DIR)}: imports {module}")
    assert not offenders, "TRL internals used outside models/trl_adapter.py:\n" + \
        "\n".join(offenders)
