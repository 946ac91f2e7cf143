"""Pairwise judges behind one interface, chosen by the config's `judge.backend`.

Backends are imported only when chosen, so the rule judge never pulls in an
HTTP client, nor torch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sacpo_steps.errors import InputError
from sacpo_steps.judges.base import CRITERIA, VERDICTS, Judge, JudgeReply, JudgeRequest

__all__ = [
    "CRITERIA",
    "VERDICTS",
    "BACKENDS",
    "Judge",
    "JudgeReply",
    "JudgeRequest",
    "make_judge",
]


def _make_rule(config: dict[str, Any], spec_path: str | Path | None) -> Judge:
    from sacpo_steps.judges.rule import RuleJudge

    if spec_path is None:
        raise InputError("the rule judge needs the demo world's spec file (--spec)",
                         field="judge.backend")
    return RuleJudge.from_file(spec_path)


def _make_openai(config: dict[str, Any], spec_path: str | Path | None) -> Judge:
    # imported here: only this backend needs the `openai` client
    from sacpo_steps.judges.openai import OpenAIJudge

    return OpenAIJudge.from_config(config)


def _make_score_model(config: dict[str, Any], spec_path: str | Path | None) -> Judge:
    # imported here: only this backend needs torch and transformers
    from sacpo_steps.judges.score_model import ScoreModelJudge

    return ScoreModelJudge.from_config(config)


# backend name -> factory(config, spec_path)
BACKENDS: dict[str, Callable[[dict[str, Any], str | Path | None], Judge]] = {
    "rule": _make_rule,
    "openai": _make_openai,
    "score_model": _make_score_model,
}


def make_judge(config: dict[str, Any], *, spec_path: str | Path | None = None) -> Judge:
    """Build the judge that `config` (the config's `judge` section) names."""
    if not isinstance(config, dict):
        raise InputError(f"expected a mapping, got {type(config).__name__}", field="judge")
    backend = config.get("backend")
    if backend not in BACKENDS:
        known = ", ".join(sorted(BACKENDS))
        raise InputError(f"unknown judge backend {backend!r} (known: {known})",
                         field="judge.backend")
    return BACKENDS[backend](config, spec_path)
