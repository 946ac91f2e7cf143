"""SafeDPO's safety-aware transformation of helpfulness pairs, and its per-pair margin.

Kim et al., "SafeDPO: A Simple Approach to Direct Preference Optimization with Enhanced
Safety" (arXiv 2505.20065; the equations as of v2, the ICLR 2026 version: v1's method
section could not be read here, its abstract describes the same ingredients). Each
helpfulness pair (y_w preferred to y_l) carries both answers' safety labels, h = 1 for
an unsafe answer. The transformation T keeps the helpfulness order unless safety
decides it:

    h_w h_l   pair after T
    0   0     kept          (helpfulness decides)
    0   1     kept          (the safe answer already wins)
    1   0     swapped       (the safe answer wins, though less helpful)
    1   1     dropped       (no safe answer to prefer)

After T the preferred answer is always safe, and the loss subtracts the margin
Delta * (h_l - h_w) inside DPO's sigmoid: Delta on a safe-over-unsafe pair, 0 on a
pair of two safe answers. BSO (arXiv 2605.12339) trains on the same transformed pairs
(`safety_trainers`).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from typing import Any

#: the labels a labelled pair carries (the preference_data step writes them): True = safe
LABELS = ("chosen_safe", "rejected_safe")
#: the per-pair margin the trainers read: Delta * (h_l - h_w) after the transformation
MARGIN = "safety_margin"


def transform(row: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """(what happened, the row after T or None when dropped); `h` = 1 - safe."""
    h_w, h_l = (not row["chosen_safe"]), (not row["rejected_safe"])
    if h_w and h_l:
        return "dropped_both_unsafe", None
    if h_w:
        swapped = {**row, "chosen": row["rejected"], "rejected": row["chosen"],
                   "chosen_safe": True, "rejected_safe": False}
        return "swapped", swapped
    return ("kept_safe_over_unsafe" if h_l else "kept_both_safe"), dict(row)


def transform_rows(rows: Iterable[dict[str, Any]], counts: collections.Counter[str] | None = None
                   ) -> Iterator[dict[str, Any]]:
    """T over `rows`, counting each case into `counts`."""
    for row in rows:
        case, out = transform(row)
        if counts is not None:
            counts[case] += 1
        if out is not None:
            yield out


def margin_of(row: dict[str, Any], delta: float) -> float:
    """Delta * (h_l - h_w) of a (transformed) row."""
    return float(delta) * (int(not row["rejected_safe"]) - int(not row["chosen_safe"]))
