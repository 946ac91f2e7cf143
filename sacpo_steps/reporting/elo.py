"""The `elo` step: Elo ratings per criterion from all-pairs battles (paper Figures 3-5).

Two estimates, both labelled in every output by the `mode` column:

- `bt` (recommended): Bradley-Terry maximum likelihood over every judged pair, ties
  counted as half a win for each side, errors left out; shifted so the anchor (SFT)
  is 1000. Intervals come from a bootstrap that resamples whole prompts (all their
  pairs, orders and repetitions move together, as in `stats.win_rates`).
- `paper` (compatibility only): the reference code's online Elo, start 1200, K=32,
  50 trials of 10 shuffled passes, each trial rescaled multiplicatively so the
  anchor is 1000, then averaged. It depends on the order of battles and on the
  arbitrary start value; keep it only to compare with the paper's figures. Its rows
  are marked invalid (`valid` False, `invalid_reason` says why, no rating):
  every row of a criterion when, in any trial, the anchor's raw online rating is
  <= 0 (the rescale would flip signs) or the rescale factor 1000 / raw anchor lies
  outside [1 / PAPER_MAX_RESCALE, PAPER_MAX_RESCALE] = [0.5, 2] (see below); one
  model's row when its Bradley-Terry rating is not finite (it never lost, or never
  won, against the anchor's group: its online rating then only grows with the
  number of passes), or when the rescale changes its order against another model
  relative to their mean raw ratings.

  Why a bound of 2 on the rescale factor f: multiplying every raw rating by f is an
  additive shift of the anchor to 1000 plus a stretch of every gap to the anchor by
  f (f r_i - 1000 = f (r_i - r_anchor)). On the Elo scale a gap d means odds
  10^(d/400), so a stretch by f raises the odds every reported gap implies to the
  power f. Up to f = 2 (or down to 1/2) the reported odds are at most squared (or
  square-rooted); beyond that the paper-mode numbers say more about the rescale
  than about the battles. Every trial starts the anchor at 1200 (f = 0.83); f = 2
  needs its raw rating to fall to 500, 700 points below the start. The case this
  catches and the <= 0 check does not: three models that beat SFT in all 780 battles
  each (130 prompts, 2 orders, 3 repetitions) leave SFT's raw rating at about 72,
  f = 13.8, and reported ratings near 21,800.

With battles against SFT only, BT Elo is a function of the win rate w:
Elo = 1000 + 400 log10(w / (1 - w)); it adds information only when models meet
each other.

Degenerate data: when a group of models never loses (or never wins) against the
rest, the BT maximum likelihood does not exist in finite numbers. We report the
limit: models in the anchor's strongly connected part of the "scored against" graph
get finite ratings (the MLE restricted to it), models that beat that part outright
get +inf, those beaten outright -inf, and those not comparable to the anchor NaN;
the `status` column says which ("finite", "+inf", "-inf", "undetermined").
Models with no valid battle path to the anchor at all are an InputError.

Fits per family: pooled, every model is fitted from every battle, so models shared by
several figures (SFT, an external baseline, the stage-1 model) carry several times as
many battles as the rest. The paper fits each figure's models from that figure's
battles only. With `families` (name -> models, `evaluation.families` of the config)
`family_elo_table` adds one fit per family from the battles whose two models are both
in the family or are the anchor (the anchor is always part of a family, it sets the
scale). Its rows carry `fit` = the family name, beside the pooled rows (`fit` =
"pooled", the same numbers as the elo table); each family draws its own random
streams, the pooled fit keeps the streams it has without families.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.fileio import atomic_output, setup_logging
from sacpo_steps.core.schema import default_of
from sacpo_steps.evaluation.stats import (
    SCORE_A,
    check_bootstrap_args,
    check_columns,
    load_battles,
    prompt_keys,
    stream_seed,
)

log = logging.getLogger("sacpo.elo")

ELO_COLUMNS = ("criterion", "mode", "model", "rating", "ci_low", "ci_high", "rank", "rank_low",
               "rank_high", "n", "errors", "status", "trial_std", "valid", "invalid_reason")
MODES = ("bt", "paper")
POOLED = "pooled"  # `fit` of the rows fitted from every battle
FAMILY_COLUMNS = ("criterion", "fit", *ELO_COLUMNS[1:])
# paper mode: the largest factor (and 1 / it the smallest) by which the multiplicative
# rescale may stretch the raw ratings before a criterion's rows are invalid (module doc)
PAPER_MAX_RESCALE = 2.0
_TOL = 1e-10
_MAX_NEWTON = 100
# paper mode: steps whose battle indices are gathered at once (bounds memory)
_BLOCK = 4096


@dataclass(frozen=True)
class _Criterion:
    """Valid battles of one criterion as integer arrays over its sorted models."""

    name: str
    models: list[str]
    anchor: int
    a: np.ndarray  # model index of side a, per valid battle
    b: np.ndarray
    score: np.ndarray  # 1 / 0.5 / 0 from side a
    prompt: np.ndarray  # prompt index, per valid battle
    n_prompts: int
    n: np.ndarray  # valid battles per model
    errors: np.ndarray  # failed judgments per model
    fit: str = POOLED  # which battles: all, or one family's

    @property
    def stream(self) -> tuple[str, ...]:
        """Names of its random streams: the pooled fit keeps the ones it had before
        families existed; each family gets its own."""
        return (self.name,) if self.fit == POOLED else (self.name, self.fit)

    @property
    def label(self) -> str:
        """For messages: the criterion, and the family when this is a family fit."""
        return self.name if self.fit == POOLED else f"{self.name} (family {self.fit})"

    def pair_scores(self, weights: np.ndarray | None = None) -> np.ndarray:
        """W[i, j] = (weighted) points i scored against j; a tie gives 0.5 each way."""
        m = len(self.models)
        w = np.ones(len(self.a)) if weights is None else weights
        flat = np.bincount(self.a * m + self.b, weights=w * self.score, minlength=m * m)
        flat += np.bincount(self.b * m + self.a, weights=w * (1.0 - self.score), minlength=m * m)
        return flat.reshape(m, m)

    def prompt_pair_scores(self) -> np.ndarray:
        """Per prompt, the flattened pair-score matrix (n_prompts, m*m), for the bootstrap."""
        m = len(self.models)
        cells = self.n_prompts * m * m
        ab = self.prompt * m * m + self.a * m + self.b
        ba = self.prompt * m * m + self.b * m + self.a
        flat = np.bincount(ab, weights=self.score, minlength=cells)
        flat += np.bincount(ba, weights=1.0 - self.score, minlength=cells)
        return flat.reshape(self.n_prompts, m * m)


def _criteria(battles: pd.DataFrame, anchor: str, fit: str = POOLED) -> list[_Criterion]:
    """Split the table per criterion, drop errors, and check every model reaches the anchor."""
    check_columns(battles)
    if battles.empty:
        raise InputError("no battles", field="battles" if fit == POOLED else f"families.{fit}")
    out = []
    keys = prompt_keys(battles)
    for name, group in battles.groupby("criterion", sort=True):
        models = sorted(set(group["model_a"]) | set(group["model_b"]))
        index = {m: i for i, m in enumerate(models)}
        if anchor not in index:
            where = (f"criterion {name!r}" if fit == POOLED
                     else f"criterion {name!r} of family {fit!r}")
            raise InputError(f"anchor {anchor!r} has no battles in {where}", field="anchor")
        a_all = group["model_a"].map(index).to_numpy(dtype=np.int64)
        b_all = group["model_b"].map(index).to_numpy(dtype=np.int64)
        error = (group["outcome"] == "error").to_numpy()
        errors = np.bincount(a_all[error], minlength=len(models))
        errors += np.bincount(b_all[error], minlength=len(models))
        valid = ~error
        if int(error.sum()):
            log.warning("%s: %d failed judgments left out of the Elo fit",
                        name if fit == POOLED else f"{name} (family {fit})", int(error.sum()))
        prompt_codes, prompt_names = pd.factorize(keys.loc[group.index].to_numpy()[valid],
                                                   sort=True)
        a, b = a_all[valid], b_all[valid]
        crit = _Criterion(
            name=str(name), models=models, anchor=index[anchor], a=a, b=b,
            score=group["outcome"][valid].map(SCORE_A).to_numpy(dtype=float),
            prompt=np.asarray(prompt_codes, dtype=np.int64), n_prompts=len(prompt_names),
            n=np.bincount(a, minlength=len(models)) + np.bincount(b, minlength=len(models)),
            errors=errors, fit=fit)
        _check_connected(crit)
        out.append(crit)
    return out


def _check_connected(crit: _Criterion) -> None:
    m = len(crit.models)
    played = np.zeros((m, m), dtype=bool)
    played[crit.a, crit.b] = played[crit.b, crit.a] = True
    seen, frontier = {crit.anchor}, [crit.anchor]
    while frontier:
        i = frontier.pop()
        for j in np.flatnonzero(played[i]):
            if int(j) not in seen:
                seen.add(int(j))
                frontier.append(int(j))
    lost = [crit.models[i] for i in range(m) if i not in seen]
    if lost:
        raise InputError(f"models {lost} have no valid battles linking them to the anchor "
                         f"{crit.models[crit.anchor]!r} in criterion {crit.name!r}"
                         f"{'' if crit.fit == POOLED else f' of family {crit.fit!r}'}; their Elo "
                         "is not defined", field="battles")


def _closure(adjacency: np.ndarray) -> np.ndarray:
    """Reflexive-transitive closure of a batch of boolean adjacency matrices (R, m, m)."""
    m = adjacency.shape[-1]
    reach = adjacency | np.eye(m, dtype=bool)
    for _ in range(max(1, math.ceil(math.log2(m))) + 1):
        f = reach.astype(np.float32)
        nxt = (f @ f) > 0
        if np.array_equal(nxt, reach):
            break
        reach = nxt
    return reach


def _log_lik(w: np.ndarray, theta: np.ndarray) -> np.ndarray:
    diff = theta[:, :, None] - theta[:, None, :]
    return -(w * np.logaddexp(0.0, -diff)).sum(axis=(1, 2))


def _separation(w: np.ndarray, anchor: int) -> tuple[np.ndarray, np.ndarray]:
    """Where the BT maximum likelihood is finite, for a batch of pair tables (R, m, m).

    Returns (status, core): status 0 finite (in the anchor's strongly connected part of
    the "scored against" graph, `core`), 1 +inf (reaches that part but is never reached
    back: it never loses to it), -1 -inf (the reverse), 2 undetermined.
    """
    rounds, m, _ = w.shape
    reach = _closure(w > 0)
    up, down = reach[:, :, anchor], reach[:, anchor, :]
    core = up & down
    status = np.full((rounds, m), 2, dtype=np.int8)
    status[core] = 0
    status[up & ~down] = 1
    status[down & ~up] = -1
    return status, core


def _fit_batch(w: np.ndarray, anchor: int) -> tuple[np.ndarray, np.ndarray]:
    """BT log-strengths (natural log-odds units, anchor = 0) for a batch of pair tables.

    Returns (theta, status) with status as `_separation` says, and theta set to
    +-inf / NaN accordingly. Newton steps with step halving, all resamples at once.
    """
    rounds, m, _ = w.shape
    status, core = _separation(w, anchor)
    w = w * (core[:, :, None] & core[:, None, :])
    total = w + np.swapaxes(w, 1, 2)
    free = core.copy()
    free[:, anchor] = False
    eye = np.eye(m, dtype=bool)
    theta = np.zeros((rounds, m))
    ll = _log_lik(w, theta)
    converged = False
    for _ in range(_MAX_NEWTON):
        # tanh form of the logistic: no overflow for far-apart strengths
        p = 0.5 * (1.0 + np.tanh(0.5 * (theta[:, :, None] - theta[:, None, :])))
        grad = np.where(free, (w - total * p).sum(axis=2), 0.0)
        h = total * p * (1.0 - p)
        info = np.where(eye, h.sum(axis=2)[:, :, None], -h)
        # fixed parameters (anchor, non-core models) get an identity row and a zero step
        fixed = ~free
        info = np.where(fixed[:, :, None] | fixed[:, None, :], 0.0, info)
        info = np.where(eye & fixed[:, :, None], 1.0, info)
        step = np.linalg.solve(info, grad[:, :, None])[:, :, 0]
        scale = np.ones(rounds)
        for _ in range(60):
            candidate = theta + scale[:, None] * step
            ll_new = _log_lik(w, candidate)
            worse = ll_new < ll - 1e-12 * (1.0 + np.abs(ll))
            if not worse.any():
                break
            scale[worse] /= 2
        theta, ll = candidate, ll_new
        if np.max(np.abs(scale[:, None] * step), initial=0.0) < _TOL:
            converged = True
            break
    if not converged:
        log.warning("Bradley-Terry fit stopped after %d Newton steps before tolerance %g",
                    _MAX_NEWTON, _TOL)
    theta = np.where(status == 1, np.inf, np.where(status == -1, -np.inf, theta))
    theta = np.where(status == 2, np.nan, theta)
    return theta, status


_STATUS = {0: "finite", 1: "+inf", -1: "-inf", 2: "undetermined"}


def _ranks(ratings: np.ndarray) -> np.ndarray:
    """Competition ranks (1 = best) along the last axis; NaN ratings get NaN ranks."""
    better = (ratings[..., None, :] > ratings[..., :, None]).sum(axis=-1)
    return np.where(np.isnan(ratings), np.nan, 1.0 + better)


def _to_elo(theta: np.ndarray, anchor_rating: float, scale: float, base: float) -> np.ndarray:
    return anchor_rating + theta * (scale / math.log(base))


def _check_scale(anchor_rating: float, scale: float, base: float) -> None:
    if not math.isfinite(anchor_rating):
        raise InputError(f"must be finite, got {anchor_rating!r}", field="anchor_rating")
    if not (math.isfinite(scale) and scale > 0):
        raise InputError(f"must be positive, got {scale!r}", field="scale")
    if not (math.isfinite(base) and base > 1):
        raise InputError(f"must be greater than 1, got {base!r}", field="base")


def _point_rows(crit: _Criterion, theta: np.ndarray, status: np.ndarray,
                anchor_rating: float, scale: float, base: float) -> pd.DataFrame:
    rating = _to_elo(theta, anchor_rating, scale, base)
    for i in np.flatnonzero(status != 0):
        log.warning("%s / %s: Bradley-Terry rating is %s (%s)", crit.label, crit.models[i],
                    _STATUS[int(status[i])],
                    "it never loses to the anchor's group" if status[i] == 1 else
                    "it never wins against the anchor's group" if status[i] == -1 else
                    "not comparable with the anchor")
    return pd.DataFrame({
        "criterion": crit.name, "mode": "bt", "model": crit.models, "rating": rating,
        "rank": _ranks(rating), "n": crit.n, "errors": crit.errors,
        "status": [_STATUS[int(s)] for s in status], "valid": True, "invalid_reason": "",
    })


def bt_elo(
    battles: pd.DataFrame,
    anchor: str = "sft",
    anchor_rating: float = 1000.0,
    scale: float = 400.0,
    base: float = 10.0,
    *,
    fit: str = POOLED,
) -> pd.DataFrame:
    """Bradley-Terry maximum-likelihood Elo per criterion, the anchor at `anchor_rating`.

    Columns: criterion, mode ("bt"), model, rating, rank, n (valid battles), errors,
    status. Ties are half a win each way; errors are left out.
    """
    _check_scale(anchor_rating, scale, base)
    frames = []
    for crit in _criteria(battles, anchor, fit):
        theta, status = _fit_batch(crit.pair_scores()[None], crit.anchor)
        frames.append(_point_rows(crit, theta[0], status[0], anchor_rating, scale, base))
    return pd.concat(frames, ignore_index=True)


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval with linear interpolation, kept exact when an end is infinite.

    NaN resamples (rating undetermined there) are left out.
    """
    x = np.sort(values[~np.isnan(values)])
    if not len(x):
        return float("nan"), float("nan")
    alpha = 1.0 - confidence
    out = []
    for q in (alpha / 2, 1 - alpha / 2):
        pos = q * (len(x) - 1)
        lo, hi = x[math.floor(pos)], x[math.ceil(pos)]
        frac = pos - math.floor(pos)
        if lo == hi or frac == 0.0:
            out.append(float(lo))
        elif np.isinf(lo) or np.isinf(hi):
            # any positive weight on an infinite end makes the interpolation infinite
            out.append(float(lo) if np.isinf(lo) else float(hi))
        else:
            out.append(float(lo + (hi - lo) * frac))
    return out[0], out[1]


def bt_elo_bootstrap(
    battles: pd.DataFrame,
    anchor: str = "sft",
    rounds: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    anchor_rating: float = 1000.0,
    scale: float = 400.0,
    base: float = 10.0,
    *,
    fit: str = POOLED,
) -> pd.DataFrame:
    """BT Elo with percentile intervals from resampling whole prompts, and rank intervals.

    Each criterion (of each `fit`) draws from its own random stream. Rank interval: percentiles
    (lower / higher order statistic) of each model's rank over the resamples.
    """
    check_bootstrap_args(rounds, confidence, seed)
    _check_scale(anchor_rating, scale, base)
    frames = []
    for crit in _criteria(battles, anchor, fit):
        theta, status = _fit_batch(crit.pair_scores()[None], crit.anchor)
        table = _point_rows(crit, theta[0], status[0], anchor_rating, scale, base)
        per_prompt = crit.prompt_pair_scores()
        rng = stream_seed(seed, "elo", *crit.stream)
        m, p = len(crit.models), crit.n_prompts
        boot = np.empty((rounds, m))
        chunk = max(1, 2_000_000 // max(p, m * m))
        for start in range(0, rounds, chunk):
            k = min(chunk, rounds - start)
            idx = rng.integers(0, p, size=(k, p))
            counts = np.bincount((idx + p * np.arange(k)[:, None]).ravel(),
                                 minlength=k * p).reshape(k, p).astype(float)
            w = (counts @ per_prompt).reshape(k, m, m)
            boot[start:start + k] = _fit_batch(w, crit.anchor)[0]
        ratings = _to_elo(boot, anchor_rating, scale, base)
        ranks = _ranks(ratings)
        alpha = 1.0 - confidence
        undetermined = np.isnan(ratings).sum(axis=0)
        lows, highs, rank_lows, rank_highs = [], [], [], []
        for i, model in enumerate(crit.models):
            low, high = _interval(ratings[:, i], confidence)
            lows.append(low)
            highs.append(high)
            r = ranks[:, i][~np.isnan(ranks[:, i])]
            rank_lows.append(float(np.quantile(r, alpha / 2, method="lower"))
                             if len(r) else float("nan"))
            rank_highs.append(float(np.quantile(r, 1 - alpha / 2, method="higher"))
                              if len(r) else float("nan"))
            if undetermined[i]:
                log.warning("%s / %s: rating undetermined in %d of %d resamples, left out of "
                            "its interval", crit.label, model, int(undetermined[i]), rounds)
        table["ci_low"], table["ci_high"] = lows, highs
        table["rank_low"], table["rank_high"] = rank_lows, rank_highs
        frames.append(table)
    return pd.concat(frames, ignore_index=True)


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
    crits = _criteria(battles, anchor, fit)
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
            "rank": _ranks(mean), "n": crit.n, "errors": crit.errors,
            "status": np.where(invalid, "invalid", "finite"),
            "trial_std": np.where(invalid, np.nan, std), "valid": ~invalid,
            "invalid_reason": reasons,
        }))
    return pd.concat(frames, ignore_index=True)


def _paper_invalid_reasons(crit: _Criterion, raw: np.ndarray, rescaled: np.ndarray,
                           status: np.ndarray | None = None) -> list[str]:
    """Per model, why its paper-mode rating cannot be reported ("" when it can).

    Every row of the criterion is invalid when, in any trial, the rescale (x 1000 /
    anchor's raw rating) flips signs (anchor <= 0) or stretches the raw ratings by a
    factor outside [1 / PAPER_MAX_RESCALE, PAPER_MAX_RESCALE] (module doc: why 2).
    Otherwise a model's row is invalid when its Bradley-Terry rating is not finite
    (`status`, from `_separation` on the same battles; computed when None): its online
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
        status = _separation(crit.pair_scores()[None], crit.anchor)[0][0]
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


def _online_elo(crits: list[_Criterion], trials: int, passes: int, k: float, start: float,
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


def elo_table(
    battles: pd.DataFrame,
    anchor: str = "sft",
    mode: str = "both",
    rounds: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    paper_trials: int = 50,
    paper_passes: int = 10,
    *,
    fit: str = POOLED,
) -> pd.DataFrame:
    """The elo.csv table: one row per (criterion, mode, model), columns ELO_COLUMNS.

    `fit` names the battles given (a family's, for `family_elo_table`): it picks the
    random streams and the wording of messages, not the columns.
    """
    if mode not in (*MODES, "both"):
        raise InputError(f"must be one of bt, paper, both; got {mode!r}", field="mode")
    frames = []
    if mode in ("bt", "both"):
        frames.append(bt_elo_bootstrap(battles, anchor, rounds=rounds, seed=seed,
                                       confidence=confidence, fit=fit))
    if mode in ("paper", "both"):
        frames.append(paper_elo(battles, anchor, trials=paper_trials, passes=paper_passes,
                                seed=seed, fit=fit))
    table = pd.concat(frames, ignore_index=True).reindex(columns=list(ELO_COLUMNS))
    table["mode_order"] = table["mode"].map({m: i for i, m in enumerate(MODES)})
    table = table.sort_values(["criterion", "mode_order", "rank", "model"], kind="stable",
                              na_position="last")
    return table.drop(columns="mode_order").reset_index(drop=True)


def check_families(families: object, anchor: str) -> dict[str, list[str]]:
    """`families` as {name: [model, ...]}: names other than "pooled", at least one model
    other than the anchor each, no model twice. InputError naming `families.<name>`."""
    if not isinstance(families, dict):
        raise InputError(f"must map family names to lists of models, got "
                         f"{type(families).__name__}", field="families")
    out = {}
    for name, members in families.items():
        field = f"families.{name}"
        if not isinstance(name, str) or not name or name == POOLED:
            raise InputError(f"a family name must be a non-empty string other than "
                             f"{POOLED!r} (the label of the fit over every battle)", field=field)
        if (not isinstance(members, list) or not members
                or not all(isinstance(m, str) and m for m in members)):
            raise InputError(f"must be a non-empty list of model names, got {members!r}",
                             field=field)
        if len(set(members)) != len(members):
            raise InputError(f"lists a model twice: {members}", field=field)
        if set(members) <= {anchor}:
            raise InputError(f"needs a model other than the anchor {anchor!r}", field=field)
        out[name] = list(members)
    return out


def family_battles(battles: pd.DataFrame, members: Sequence[str], anchor: str) -> pd.DataFrame:
    """The battles of one family: both models among `members` or the anchor."""
    keep = {*members, anchor}
    return battles[battles["model_a"].isin(keep) & battles["model_b"].isin(keep)]


def family_elo_table(
    battles: pd.DataFrame,
    families: dict[str, list[str]],
    anchor: str = "sft",
    *,
    pooled: pd.DataFrame | None = None,
    **settings: object,
) -> pd.DataFrame:
    """The elo_families.csv table: the pooled fit and one fit per family, column `fit`.

    Columns FAMILY_COLUMNS (ELO_COLUMNS with `fit` after `criterion`). Each family is
    fitted by `elo_table` from `family_battles` only, with the same `settings` (mode,
    rounds, seed, ...). `pooled`: the pooled table when already computed (elo_step
    writes the same rows to elo.csv), else computed here. Rows are sorted by criterion,
    mode, fit (pooled first, then the families in the given order), rank.
    """
    families = check_families(families, anchor)
    check_columns(battles)
    seen = set(battles["model_a"]) | set(battles["model_b"])
    frames = [(elo_table(battles, anchor, **settings) if pooled is None else pooled)
              .assign(fit=POOLED)]
    for name, members in families.items():
        missing = [m for m in members if m not in seen]
        if missing:
            raise InputError(f"model(s) {missing} have no battles at all", field=f"families.{name}")
        part = family_battles(battles, members, anchor)
        frames.append(elo_table(part, anchor, fit=name, **settings).assign(fit=name))
    table = pd.concat(frames, ignore_index=True).reindex(columns=list(FAMILY_COLUMNS))
    fits = {f: i for i, f in enumerate([POOLED, *families])}
    table["order_mode"] = table["mode"].map({m: i for i, m in enumerate(MODES)})
    table["order_fit"] = table["fit"].map(fits)
    table = table.sort_values(["criterion", "order_mode", "order_fit", "rank", "model"],
                              kind="stable", na_position="last")
    return table.drop(columns=["order_mode", "order_fit"]).reset_index(drop=True)


def _fmt(x: float, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if math.isinf(x):
        return "+inf" if x > 0 else "-inf"
    return f"{x:.{digits}f}"


def _rank(r: pd.Series) -> str:
    if pd.isna(r["rank"]):
        return "n/a"
    text = str(int(r["rank"]))
    if not pd.isna(r["rank_low"]):
        text += f" [{int(r['rank_low'])}, {int(r['rank_high'])}]"
    return text


def _is_valid(row: pd.Series) -> bool:
    """A row without the `valid` column (older tables) counts as valid."""
    value = row.get("valid", True)
    return True if pd.isna(value) else bool(value)


def markdown_table(table: pd.DataFrame, confidence: float = 0.95) -> str:
    """Render elo.csv (or elo_families.csv: a `fit` column) as Markdown; `paper` rows
    show the spread over trials instead of a CI."""
    by_fit = "fit" in table.columns
    header = ["criterion", *(["fit"] if by_fit else []), "mode", "model", "rating",
              f"{confidence * 100:g}% interval", "rank [interval]", "n", "errors", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in table.iterrows():
        value = _fmt(r["rating"])
        if not _is_valid(r):
            value, interval = f"invalid: {r['invalid_reason']}", "n/a"
        elif r["mode"] == "paper":
            interval = f"± {_fmt(r['trial_std'])} (trial std)"
        else:
            interval = f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"
        cells = [r["criterion"], *([r["fit"]] if by_fit else []), r["mode"], r["model"], value,
                 interval, _rank(r), int(r["n"]), int(r["errors"]), r["status"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    note = ("\nmode `bt`: Bradley-Terry maximum likelihood (recommended), bootstrap over "
            "prompts. mode `paper`: the paper's online Elo, kept for comparison only; its "
            "rows are invalid (no number) when the baseline's raw online rating is <= 0, "
            f"when the multiplicative rescale to 1000 stretches the ratings by a factor "
            f"outside [{1 / PAPER_MAX_RESCALE:g}, {PAPER_MAX_RESCALE:g}] or would change the "
            "order of the models, or (one model) when its Bradley-Terry rating is not "
            "finite.\n")
    if by_fit:
        note += (f"fit `{POOLED}`: every battle (the rows of elo.md); any other fit: the "
                 "family of that name, fitted from the battles between its models and the "
                 "baseline only.\n")
    return "\n".join(lines) + "\n" + note


def _log_rows(table: pd.DataFrame) -> None:
    for _, r in table.iterrows():
        what = " / ".join(str(r[c]) for c in ("criterion", "fit", "mode", "model") if c in r)
        if not _is_valid(r):
            log.info("%s: invalid: %s", what, r["invalid_reason"])
            continue
        log.info("%s: Elo %s [%s, %s] (%s)", what, _fmt(r["rating"]), _fmt(r["ci_low"]),
                 _fmt(r["ci_high"]), r["status"])


def elo_step(
    battle_paths: Sequence[str | Path],
    out_csv: str | Path,
    out_md: str | Path,
    *,
    anchor: str = "sft",
    mode: str = "both",
    rounds: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    paper_trials: int = 50,
    paper_passes: int = 10,
    families: dict[str, list[str]] | None = None,
    out_families_csv: str | Path | None = None,
    out_families_md: str | Path | None = None,
) -> pd.DataFrame:
    """Compute Elo from battle files; write CSV and Markdown (all files or none).

    With `families`, also the per-family table (`family_elo_table`) to
    `out_families_csv` / `out_families_md`, which must then both be given (and only
    then). elo.csv stays the pooled table either way. Returns the pooled table.
    """
    outs = (out_families_csv, out_families_md)
    if families and not all(outs):
        raise InputError("families need --out-families-csv and --out-families-md",
                         field="out_families_csv")
    if not families and any(outs):
        raise InputError("--out-families-csv/--out-families-md need families",
                         field="families")
    if families:
        families = check_families(families, anchor)
    battles = load_battles(battle_paths)
    settings = {"mode": mode, "rounds": rounds, "seed": seed, "confidence": confidence,
                "paper_trials": paper_trials, "paper_passes": paper_passes}
    table = elo_table(battles, anchor, **settings)
    by_family = (family_elo_table(battles, families, anchor, pooled=table, **settings)
                 if families else None)
    with contextlib.ExitStack() as stack:
        paths = [out_csv, out_md, *(outs if by_family is not None else ())]
        tmp = [stack.enter_context(atomic_output(p)) for p in paths]
        table.to_csv(tmp[0], index=False)
        tmp[1].write_text(markdown_table(table, confidence), encoding="utf-8")
        if by_family is not None:
            by_family.to_csv(tmp[2], index=False)
            tmp[3].write_text(markdown_table(by_family, confidence), encoding="utf-8")
    _log_rows(table)
    if by_family is not None:
        _log_rows(by_family[by_family["fit"] != POOLED])
    return table


def _families_arg(text: str) -> dict[str, list[str]]:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"not JSON ({exc})", field="families") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sacpo_steps elo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--battles", nargs="+", required=True, help="battle JSONL files")
    p.add_argument("--anchor", default="sft", help="model fixed at 1000 (SFT)")
    p.add_argument("--mode", choices=[*MODES, "both"], default=default_of("evaluation.elo.mode"))
    p.add_argument("--rounds", type=int, default=default_of("evaluation.elo.bootstrap_rounds"),
                   help="bootstrap rounds (bt mode)")
    p.add_argument("--confidence", type=float, default=default_of("evaluation.elo.confidence"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--paper-trials", type=int, default=default_of("evaluation.elo.paper_trials"),
                   help="paper mode: trials")
    p.add_argument("--paper-passes", type=int, default=default_of("evaluation.elo.paper_passes"),
                   help="paper mode: shuffled passes per trial")
    p.add_argument("--families", default=None,
                   help='JSON {"name": [model, ...]}: one more fit per family, from the '
                        "battles among its models and the anchor (evaluation.families)")
    p.add_argument("--out-csv", required=True)
    p.add_argument("--out-md", required=True)
    p.add_argument("--out-families-csv", default=None,
                   help="with --families: pooled and per-family rows, column `fit`")
    p.add_argument("--out-families-md", default=None)
    p.add_argument("--log", default=None)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    setup_logging(args.log)
    families = _families_arg(args.families) if args.families is not None else None
    elo_step(args.battles, args.out_csv, args.out_md, anchor=args.anchor, mode=args.mode,
             rounds=args.rounds, seed=args.seed, confidence=args.confidence,
             paper_trials=args.paper_trials, paper_passes=args.paper_passes,
             families=families, out_families_csv=args.out_families_csv,
             out_families_md=args.out_families_md)


if __name__ == "__main__":
    main()
