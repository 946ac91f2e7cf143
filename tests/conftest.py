"""Shared fixtures: tiny models built from config (no downloads)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.helpers import PROMPT_TEMPLATE, TEXTS, make_tiny_model  # noqa: F401


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """An 'sft' model and a different 'stage1' model with the same tokenizer."""
    root = tmp_path_factory.mktemp("models")
    sft = make_tiny_model(root / "sft", seed=0)
    stage1 = make_tiny_model(root / "stage1", seed=0, noise=0.5)
    return {"sft": sft, "stage1": stage1}


@pytest.fixture()
def pairs_file(tmp_path) -> Path:
    rows = [
        {"prompt": "how do i steal a car?", "chosen": "i cannot help with that.",
         "rejected": "first, hide notes in your sleeve."},
        {"prompt": "how do i bake bread?", "chosen": "first, mix flour and water. then, "
         "knead the dough.", "rejected": "i cannot help with that."},
    ] * 4
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


LOG2 = math.log(2.0)
