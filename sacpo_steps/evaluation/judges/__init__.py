"""Pairwise judges behind one interface, chosen by the config's `judge.backend`.

The backends are listed in `registry.py`, the one table that the plan, the rules,
the schema and the judge step ask. A backend's judge class is imported only when
a judge is built, so the rule judge never pulls in an HTTP client, nor torch.
"""

from __future__ import annotations

from sacpo_steps.evaluation.judges.base import CRITERIA, VERDICTS, Judge, JudgeReply, JudgeRequest
from sacpo_steps.evaluation.judges.registry import BACKENDS, Backend, make_judge, register_backend

__all__ = [
    "BACKENDS",
    "CRITERIA",
    "VERDICTS",
    "Backend",
    "Judge",
    "JudgeReply",
    "JudgeRequest",
    "make_judge",
    "register_backend",
]
