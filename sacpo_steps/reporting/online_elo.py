"""The paper's online Elo (the `elo` step's `paper` mode, for comparison only), and
the checks that mark its rows invalid where the multiplicative rescale is meaningless.

Kept apart from the Bradley-Terry fit: it depends on the order of battles and on its
start value. Why the rescale is bounded by 2: the `sacpo_steps.reporting.elo` module doc.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

from sacpo_steps.core.errors import InputError
from sacpo_steps.evaluation.stats import stream_seed
from sacpo_steps.reporting.bradley_terry import (
    POOLED,
    Criterion,
    competition_ranks,
    criteria,
    separation,
)

log = logging.getLogger("sacpo.elo")  # the elo step's logger: its lines keep their name

# the largest factor (and 1 / it the smallest) by which the multiplicative rescale may
# stretch the raw ratings before a criterion's rows are invalid (elo module doc: why 2)
PAPER_MAX_RESCALE = 2.0
# steps whose battle indices are gathered at once (bounds memory)
_BLOCK = 4096


def paper_elo(
    battles: pd.DataFrame,
    anchor: str = "sft",
    trials: int = 50,
    passes: int = 10,
    k: float = 32.0,
    start: float = 1200.0,
    seed: int = 0,
    *,
    fit: str = POOLED,
) -> pd.DataFrame:
    """The paper's online Elo (compatibility mode), per criterion.

    Per trial: ratings reset to `start`; `passes` passes, each over a fresh shuffle of
    all valid battles, updating online with factor `k`; the trial's final ratings are
    multiplied so the anchor is 1000. Rating = mean over trials, trial_std = their std
    (ddof=0), as the reference code reports. Errors are left out (the reference code
    counted them as ties). Criteria and trials run as parallel chains in numpy. Rows
    the rescale makes meaningless are invalid (`_paper_invalid_reasons`).
    """
    for name, value in (("trials", trials), ("passes", passes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"must be a positive integer, got {value!r}", field=name)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"must be a non-negative integer, got {seed!r}", field="seed")
    if not (math.isfinite(k) and k > 0 and math.isfinite(start) and start > 0):
        raise InputError(f"K and start must be positive, got {k!r}, {start!r}",
                         field="k" if not (math.isfinite(k) and k > 0) else "start")
    crits = criteria(battles, anchor, fit)
    final = _online_elo(crits, trials, passes, float(k), float(start), seed)
    frames = []
    for crit, raw in zip(crits, final, strict=True):
        with np.errstate(divide="ignore", invalid="ignore"):
            ratings = raw * (1000.0 / raw[:, [crit.anchor]])
        ratings[:, crit.anchor] = 1000.0
        mean, std = ratings.mean(axis=0), ratings.std(axis=0)
        reasons = _paper_invalid_reasons(crit, raw, mean)
        invalid = np.array([bool(r) for r in reasons])
        for i in np.flatnonzero(invalid):
            log.warning("%s / %s: paper-mode Elo not reported: %s", crit.label,
                        crit.models[i], reasons[i])
        mean = np.where(invalid, np.nan, mean)
        frames.append(pd.DataFrame({
            "criterion": crit.name, "mode": "paper", "model": crit.models, "rating": mean,
            "rank": competition_ranks(mean), "n": crit.n, "errors": crit.errors,
            "status": np.where(invalid, "invalid", "finite"),
            "trial_std": np.where(invalid, np.nan, std), "valid": ~invalid,
            "invalid_reason": reasons,
        }))
    return pd.concat(frames, ignore_index=True)


def _paper_invalid_reasons(crit: Criterion, raw: np.ndarray, rescaled: np.ndarray,
                           status: np.ndarray | None = None) -> list[str]:
    """Per model, why its paper-mode rating cannot be reported ("" when it can).

    Every row of the criterion is invalid when, in any trial, the rescale (x 1000 /
    anchor's raw rating) flips signs (anchor <= 0) or stretches the raw ratings by a
    factor outside [1 / PAPER_MAX_RESCALE, PAPER_MAX_RESCALE] (elo module doc: why 2).
    Otherwise a model's row is invalid when its Bradley-Terry rating is not finite
    (`status`, from `separation` on the same battles; computed when None): its online
    rating then keeps moving as long as the passes go on; or when its order against
    another model differs between the mean raw ratings and the reported ones (the mean
    over trials of differently scaled trials need not keep the order).
    """
    m = len(crit.models)
    anchor_name = crit.models[crit.anchor]
    anchor_raw = raw[:, crit.anchor]
    bad = anchor_raw <= 0
    if bad.any():
        reason = (f"baseline {anchor_name!r} has a raw online rating <= 0 "
                  f"(min {anchor_raw.min():.1f}) in {int(bad.sum())} of {len(anchor_raw)} "
                  f"trials, so the multiplicative rescale to 1000 flips signs and order")
        return [reason] * m
    factor = 1000.0 / anchor_raw
    outside = (factor > PAPER_MAX_RESCALE) | (factor < 1.0 / PAPER_MAX_RESCALE)
    if outside.any():
        reason = (f"the multiplicative rescale to 1000 multiplies the raw online ratings by "
                  f"{factor.min():.2f} to {factor.max():.2f} (baseline {anchor_name!r} raw "
                  f"{anchor_raw.min():.1f} to {anchor_raw.max():.1f}), outside "
                  f"[{1.0 / PAPER_MAX_RESCALE:g}, {PAPER_MAX_RESCALE:g}] in "
                  f"{int(outside.sum())} of {len(anchor_raw)} trials: it stretches every "
                  f"gap to the baseline by that factor")
        return [reason] * m
    if status is None:
        status = separation(crit.pair_scores()[None], crit.anchor)[0][0]
    raw_mean = raw.mean(axis=0)
    flipped = ((raw_mean[:, None] - raw_mean[None, :])
               * (rescaled[:, None] - rescaled[None, :])) < 0
    reasons = []
    for i in range(m):
        parts = []
        if status[i] == 1:
            parts.append(f"its Bradley-Terry rating is +inf (it never loses to {anchor_name!r}'s "
                         "group), so its online rating only grows with the passes")
        elif status[i] == -1:
            parts.append(f"its Bradley-Terry rating is -inf (it never wins against "
                         f"{anchor_name!r}'s group), so its online rating only falls with "
                         "the passes")
        elif status[i] == 2:
            parts.append(f"its Bradley-Terry rating is undetermined (not comparable with "
                         f"{anchor_name!r})")
        others = [crit.models[j] for j in np.flatnonzero(flipped[i])]
        if others and i != crit.anchor:
            parts.append(f"the multiplicative rescale reverses its order against {others}")
        reasons.append("; ".join(parts))
    return reasons


def _online_elo(crits: list[Criterion], trials: int, passes: int, k: float, start: float,
                seed: int) -> list[np.ndarray]:
    """Final ratings (trials, models) per criterion; each (criterion, trial) is one chain.

    The updates are sequential within a chain, so the loop runs over steps and each
    step updates every chain at once. A chain with fewer battles than the longest
    pads its passes with K=0 steps, which change nothing.
    """
    width = max(len(c.models) for c in crits)
    n_chains = len(crits) * trials
    ratings = np.full(n_chains * width, start)
    offsets = (np.arange(n_chains) * width).reshape(len(crits), trials)
    length = max(len(c.a) for c in crits)
    rngs = [stream_seed(seed, "paper_elo", *c.stream) for c in crits]
    log10_over = math.log(10.0) / 400.0
    block = _BLOCK
    for _ in range(passes):
        orders = [rng.permuted(np.broadcast_to(np.arange(len(c.a)), (trials, len(c.a))), axis=1)
                  for c, rng in zip(crits, rngs, strict=True)]
        for lo in range(0, length, block):
            hi = min(lo + block, length)
            ia = np.empty((hi - lo, n_chains), dtype=np.intp)
            ib = np.empty_like(ia)
            target = np.zeros((hi - lo, n_chains))  # k * score
            kk = np.zeros((hi - lo, n_chains))
            for c, (crit, order) in enumerate(zip(crits, orders, strict=True)):
                cols = slice(c * trials, (c + 1) * trials)
                n = len(crit.a)
                ia[:, cols], ib[:, cols] = offsets[c] + 0, offsets[c] + 1  # K=0 padding
                real = max(0, min(hi, n) - lo)
                if real:
                    sel = order[:, lo:lo + real].T
                    ia[:real, cols] = offsets[c] + crit.a[sel]
                    ib[:real, cols] = offsets[c] + crit.b[sel]
                    target[:real, cols] = k * crit.score[sel]
                    kk[:real, cols] = k
            for t in range(hi - lo):
                a_idx, b_idx = ia[t], ib[t]
                ra, rb = ratings[a_idx], ratings[b_idx]
                # expected score of a = 1 / (1 + 10 ** ((rb - ra) / 400))
                delta = target[t] - kk[t] / (1.0 + np.exp((rb - ra) * log10_over))
                ratings[a_idx] = ra + delta
                ratings[b_idx] = rb - delta
    out = []
    for c, crit in enumerate(crits):
        chains = ratings.reshape(len(crits), trials, width)[c]
        out.append(chains[:, :len(crit.models)].copy())
    return out

