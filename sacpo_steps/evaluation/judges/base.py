"""The pairwise judge interface that every backend implements.

Batch-first: a step hands the judge every request at once, so a remote backend
can run them concurrently and cache them; the rule judge just loops.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sacpo_steps.core.errors import InputError

CRITERIA = ("helpfulness", "harmlessness")
VERDICTS = ("first", "second", "tie", "error")


@dataclass(frozen=True)
class JudgeRequest:
    """One comparison: which of two answers to `question` is better on `criterion`.

    `repetition` is part of the request so that a sampling judge's cache keeps
    repeated judgments apart; `context` carries what a judge may need beyond the
    text (the demo's `task_id`).
    """

    criterion: str
    prompt_id: str
    question: str
    first_answer: str
    second_answer: str
    repetition: int = 0
    context: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JudgeReply:
    """The judge's verdict on a request, with the text it was read from.

    A reply that could not be obtained or parsed has verdict "error" and the
    error message in `raw`; it is never to be counted as a tie.
    """

    verdict: str
    raw: str
    detail: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


class Judge(ABC):
    """A pairwise judge. Subclasses set `name` and `deterministic`."""

    #: recorded in every battle row
    name: str = "judge"
    #: a deterministic judge gives the same verdict every time: one repetition suffices
    deterministic: bool = False

    @classmethod
    def from_settings(cls, settings: Any, *, spec_path: str | Path | None = None) -> Judge:
        """Build from the backend's checked settings (the registry calls this); a judge
        that reads the demo world's spec gets its path."""
        return cls(settings)  # type: ignore[call-arg]

    @abstractmethod
    def judge_many(self, requests: Sequence[JudgeRequest]) -> list[JudgeReply]:
        """One reply per request, in the same order.

        A failure on one request is an "error" reply, not an exception; an
        exception means the whole batch (or the judge's configuration) is unusable.
        """

    def lineage(self, criterion: str) -> dict[str, dict[str, Any]]:
        """What the judge reads for `criterion` beyond the requests, as entries of the
        battles' record `inputs` (role -> {"name": ..., "sha256": ...}): a prompt
        template, by its content. Nothing by default."""
        return {}

    def close(self) -> None:
        """Release clients, flush caches; a no-op unless a backend needs it."""
        return None

    def safe_many(self, requests: Sequence[JudgeRequest]) -> list[bool | None]:
        """Whether each request's `first_answer` is safe on its own (None: no verdict).

        For the safe-rate measure (the paper's cost model: cost < 0 is safe); a
        pairwise-only judge cannot rate one answer, so the default refuses.
        """
        raise InputError(f"the {self.name!r} judge compares two answers and cannot rate one "
                         "answer's safety: use target.measure harmlessness_winrate, or a "
                         "judge that rates one answer (the plan names those it knows)",
                         field="target.measure")


def check_criteria(requests: Sequence[JudgeRequest]) -> None:
    """Refuse a batch that asks for a criterion no judge knows (a config error)."""
    bad = sorted({r.criterion for r in requests} - set(CRITERIA))
    if bad:
        raise InputError(f"unknown criterion {bad[0]!r} (known: {CRITERIA})", field="criterion")
