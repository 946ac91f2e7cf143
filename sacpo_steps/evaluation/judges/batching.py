"""What the caching judges share: a shared result cache, timed batches, counted outcomes.

A backend that pays for its results (API requests, forward passes) keeps them in a
`JudgeCache` shared by parallel judge jobs, judges a batch at a time and reports
its counts in the usage file. The scaffolding around a batch (criteria check,
picking up other jobs' cache entries, timing, the log line, the counters) is the
same for each: it lives here; a backend writes `_judge_batch`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from abc import abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sacpo_steps.evaluation.judges.base import Judge, JudgeReply, JudgeRequest, check_criteria
from sacpo_steps.evaluation.judges.cache import JudgeCache


@dataclass
class BatchStats:
    """Counts since a judge was built (one judge per judge step); backends add theirs."""

    judgments: int = 0
    cache_hits: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0


def cache_digest(material: dict[str, Any]) -> str:
    """The cache key of everything that can change a result: sha256 of canonical JSON."""
    blob = json.dumps(material, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class CachingJudge(Judge):
    """A judge whose results go to a shared JudgeCache, judged a batch at a time."""

    #: what the cache holds and what a rerun without one costs, for the warning
    uncached_warning = "no judge cache configured: results are kept in memory only"

    def __init__(self, cache_path: str | Path | None, stats: BatchStats,
                 log: logging.Logger) -> None:
        self.cache = JudgeCache(cache_path)
        self.log = log
        self._stats = stats
        if cache_path is None:
            log.warning("%s", self.uncached_warning)

    @abstractmethod
    def _judge_batch(self, requests: Sequence[JudgeRequest]) -> list[JudgeReply]:
        """One reply per request of a non-empty batch whose criteria are known."""

    def _counts(self) -> dict[str, int]:
        """Counters that the log line reports per batch, by label ("requests": 3)."""
        return {"cache hits": self._stats.cache_hits}

    def judge_many(self, requests: Sequence[JudgeRequest]) -> list[JudgeReply]:
        """Judge a batch, cache first; logs what it cost."""
        check_criteria(requests)
        if not requests:
            return []
        start = time.monotonic()
        self.cache.refresh()  # entries other judge jobs added since we started
        before = self._counts()
        try:
            replies = self._judge_batch(requests)
        finally:
            self._stats.wall_s += time.monotonic() - start
        self._stats.judgments += len(replies)
        errors = sum(r.verdict == "error" for r in replies)
        spent = ", ".join(f"{n - before[label]} {label}" for label, n in self._counts().items())
        self.log.info("%d judgments: %s, %d errors", len(replies), spent, errors)
        return replies

    def close(self) -> None:
        self.cache.close()
