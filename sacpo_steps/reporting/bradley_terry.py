"""Bradley-Terry Elo: the battles per criterion as arrays, the maximum-likelihood fit
(with its limits when a group never loses or never wins) and the prompt bootstrap.

The `elo` step's `bt` mode (the recommended one); `online_elo` reads the same
per-criterion arrays. Method and degenerate cases: the `sacpo_steps.reporting.elo`
module doc.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sacpo_steps.core.errors import InputError
from sacpo_steps.evaluation.stats import (
    SCORE_A,
    check_bootstrap_args,
    check_columns,
    prompt_keys,
    stream_seed,
)

log = logging.getLogger("sacpo.elo")  # the elo step's logger: its lines keep their name

POOLED = "pooled"  # `fit` of the rows fitted from every battle
_TOL = 1e-10
_MAX_NEWTON = 100


@dataclass(frozen=True)
class Criterion:
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


def criteria(battles: pd.DataFrame, anchor: str, fit: str = POOLED) -> list[Criterion]:
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
        crit = Criterion(
            name=str(name), models=models, anchor=index[anchor], a=a, b=b,
            score=group["outcome"][valid].map(SCORE_A).to_numpy(dtype=float),
            prompt=np.asarray(prompt_codes, dtype=np.int64), n_prompts=len(prompt_names),
            n=np.bincount(a, minlength=len(models)) + np.bincount(b, minlength=len(models)),
            errors=errors, fit=fit)
        _check_connected(crit)
        out.append(crit)
    return out


def _check_connected(crit: Criterion) -> None:
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


def separation(w: np.ndarray, anchor: int) -> tuple[np.ndarray, np.ndarray]:
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

    Returns (theta, status) with status as `separation` says, and theta set to
    +-inf / NaN accordingly. Newton steps with step halving, all resamples at once.
    """
    rounds, m, _ = w.shape
    status, core = separation(w, anchor)
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


def competition_ranks(ratings: np.ndarray) -> np.ndarray:
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


def _point_rows(crit: Criterion, theta: np.ndarray, status: np.ndarray,
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
        "rank": competition_ranks(rating), "n": crit.n, "errors": crit.errors,
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
    for crit in criteria(battles, anchor, fit):
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
    for crit in criteria(battles, anchor, fit):
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
        ranks = competition_ranks(ratings)
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

