"""Win rates from battle tables, with bootstrap intervals over prompts.

The unit of resampling is the prompt: a prompt's orders and repetitions are
judgments of the same question and are not independent, so they move together.

Besides the pooled win rate, the table carries the paper's summary: the win rate
computed per judge repetition (pooled over orders and prompts), then mean and
standard deviation over repetitions. The std uses ddof=0, as the reference code
does (`np.std`); it is NaN with a single repetition.
"""

from __future__ import annotations

import logging
import numbers
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.fileio import read_jsonl

log = logging.getLogger("sacpo.stats")

ORDERS = ("a_first", "b_first")
OUTCOMES = ("a_wins", "b_wins", "tie", "error")
STR_COLUMNS = ("criterion", "prompt_id", "model_a", "model_b", "order", "outcome")
REQUIRED_COLUMNS = (*STR_COLUMNS, "repetition")
# empty_a/empty_b: the judge step's flags for an empty answer (None in older battle files)
# words_a/words_b: the answers' length in words (None in older battle files)
OPTIONAL_COLUMNS = ("prompt_set", "judge", "raw", "empty_a", "empty_b", "words_a", "words_b")
# identifies one judgment; the judge is left out so that two judges' battles are not pooled
BATTLE_KEY = ("criterion", "prompt_set", "prompt_id", "model_a", "model_b", "order", "repetition")
WIN_RATE_COLUMNS = ("model", "criterion", "wins", "ties", "losses", "errors", "n", "win_rate",
                    "ci_low", "ci_high", "position_consistency", "rep_mean", "rep_std")
# judgment -> score from side a's point of view; errors are not comparisons
SCORE_A = {"a_wins": 1.0, "b_wins": 0.0, "tie": 0.5}
# bootstrap index matrices are built in chunks of at most this many cells
_CHUNK_CELLS = 2_000_000


def _check_row(path: Path, lineno: int, row: dict[str, Any]) -> None:
    for field in STR_COLUMNS:
        if field not in row:
            raise InputError("missing field", path=path, row=lineno, field=field)
        if not isinstance(row[field], str):
            raise InputError(f"expected a string, got {type(row[field]).__name__}",
                             path=path, row=lineno, field=field)
    if row["order"] not in ORDERS:
        raise InputError(f"must be one of {ORDERS}, got {row['order']!r}",
                         path=path, row=lineno, field="order")
    if row["outcome"] not in OUTCOMES:
        raise InputError(f"must be one of {OUTCOMES}, got {row['outcome']!r}",
                         path=path, row=lineno, field="outcome")
    rep = row.get("repetition")
    if isinstance(rep, bool) or not isinstance(rep, int) or rep < 0:
        raise InputError(f"expected a non-negative integer, got {rep!r}",
                         path=path, row=lineno, field="repetition")
    if row["model_a"] == row["model_b"]:
        raise InputError(f"a model against itself ({row['model_a']!r})",
                         path=path, row=lineno, field="model_b")


def load_battles(paths: Sequence[str | Path] | str | Path) -> pd.DataFrame:
    """Read and validate battle JSONL files into one table.

    A judgment that appears twice (the same file given twice, or two judges'
    battles mixed) is an error, since it would be counted twice.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    if not paths:
        raise InputError("no battle files given", field="battles")
    records: list[dict[str, Any]] = []
    seen: dict[tuple[Any, ...], tuple[Path, int]] = {}
    for path in map(Path, paths):
        rows = read_jsonl(path)
        with open(path, encoding="utf-8") as fh:
            linenos = [i for i, line in enumerate(fh, start=1) if line.strip()]
        if not rows:
            raise InputError("no battles", path=path)
        for lineno, row in zip(linenos, rows, strict=True):
            _check_row(path, lineno, row)
            record = {c: row[c] for c in REQUIRED_COLUMNS}
            for c in OPTIONAL_COLUMNS:
                record[c] = row.get(c, "" if c == "prompt_set" else None)
            key = tuple(record[c] for c in BATTLE_KEY)
            if key in seen:
                first_path, first_line = seen[key]
                raise InputError(f"the same judgment already appears in {first_path} row "
                                 f"{first_line}", path=path, row=lineno)
            seen[key] = (path, lineno)
            records.append(record)
    frame = pd.DataFrame.from_records(records, columns=[*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS])
    frame["repetition"] = frame["repetition"].astype("int64")
    return frame


def check_bootstrap_args(rounds: object, confidence: object, seed: object) -> None:
    """Reject bad bootstrap settings early, naming the setting (shared by win rates and Elo)."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise InputError(f"must be a positive integer, got {rounds!r}", field="rounds")
    if (isinstance(confidence, bool) or not isinstance(confidence, numbers.Real)
            or not 0.0 < confidence < 1.0):
        raise InputError(f"must be between 0 and 1, got {confidence!r}", field="confidence")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"must be a non-negative integer, got {seed!r}", field="seed")


def check_columns(battles: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in battles.columns]
    if missing:
        raise InputError(f"battle table lacks columns {missing}", field="battles")


def prompt_keys(battles: pd.DataFrame) -> pd.Series:
    """One key per prompt (set and id): the unit every bootstrap resamples."""
    prompt_set = battles["prompt_set"] if "prompt_set" in battles.columns else ""
    if isinstance(prompt_set, pd.Series):
        prompt_set = prompt_set.fillna("").astype(str)
    return prompt_set + "\x1f" + battles["prompt_id"].astype(str)


def stream_seed(seed: int, *names: str) -> np.random.Generator:
    """A random stream per named group, so adding a group leaves the others' draws alone."""
    return np.random.default_rng([seed, zlib.crc32("\0".join(names).encode())])


def _group_seed(seed: int, model: str, criterion: str) -> np.random.Generator:
    # each (model, criterion) gets its own stream, so adding a model leaves others' CIs alone
    return stream_seed(seed, model, criterion)


def bootstrap_interval(
    prompt_scores: np.ndarray,
    prompt_counts: np.ndarray,
    rng: np.random.Generator,
    rounds: int,
    confidence: float,
) -> tuple[float, float]:
    """Percentile interval of sum(scores)/sum(counts) when prompts are resampled.

    `prompt_scores[i]` is prompt i's summed score (win 1, tie 0.5), `prompt_counts[i]`
    its number of valid judgments (> 0).
    """
    n_prompts = len(prompt_scores)
    chunk = max(1, _CHUNK_CELLS // n_prompts)
    rates = np.empty(rounds)
    for start in range(0, rounds, chunk):
        k = min(chunk, rounds - start)
        idx = rng.integers(0, n_prompts, size=(k, n_prompts))
        rates[start:start + k] = prompt_scores[idx].sum(axis=1) / prompt_counts[idx].sum(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(rates, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _position_consistency(valid: pd.DataFrame) -> float:
    """Share of (prompt, repetition) judged in both orders where both agree."""
    keys = ["prompt_key", "repetition", "model_a", "model_b"]
    by_order = []
    for order in ORDERS:
        part = valid[valid["order"] == order].set_index(keys)["outcome"]
        by_order.append(part[~part.index.duplicated()].rename(order))
    both = pd.concat(by_order, axis=1, join="inner")
    if both.empty:
        return float("nan")
    return float((both["a_first"] == both["b_first"]).mean())


def _per_repetition(valid: pd.DataFrame) -> tuple[float, float]:
    """Mean and std (ddof=0, as the paper) of the per-repetition win rates."""
    if valid.empty:
        return float("nan"), float("nan")
    scores = valid.groupby("repetition", sort=True)["score"].mean().to_numpy()
    std = float(np.std(scores)) if len(scores) > 1 else float("nan")
    return float(np.mean(scores)), std


def win_rates(
    battles: pd.DataFrame,
    baseline: str,
    rounds: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Win rate of every model against `baseline`, per criterion, with a bootstrap CI.

    win_rate = (wins + 0.5 ties) / n from the model's side, pooled over orders,
    repetitions and prompts; errors are counted but are not comparisons.
    """
    check_columns(battles)
    check_bootstrap_args(rounds, confidence, seed)

    df = battles.copy()
    if "prompt_set" not in df.columns:
        df["prompt_set"] = ""
    base_is_a = df["model_a"] == baseline
    base_is_b = df["model_b"] == baseline
    df = df[base_is_a | base_is_b].copy()
    if df.empty:
        raise InputError(f"no battles against the baseline {baseline!r}", field="baseline")
    skipped = len(battles) - len(df)
    if skipped:
        log.info("%d battles without the baseline %r ignored", skipped, baseline)
    flip = (df["model_a"] == baseline).to_numpy()
    df["model"] = np.where(flip, df["model_b"], df["model_a"])
    outcome = df["outcome"].to_numpy()
    win = np.where(flip, outcome == "b_wins", outcome == "a_wins")
    loss = np.where(flip, outcome == "a_wins", outcome == "b_wins")
    df["win"], df["tie"], df["loss"] = win, outcome == "tie", loss
    df["error"] = outcome == "error"
    df["score"] = win + 0.5 * df["tie"].to_numpy()
    df["prompt_key"] = prompt_keys(df)

    rows = []
    for (model, criterion), group in df.groupby(["model", "criterion"], sort=True):
        wins, ties = int(group["win"].sum()), int(group["tie"].sum())
        losses, errors = int(group["loss"].sum()), int(group["error"].sum())
        n = wins + ties + losses
        valid = group[~group["error"]]
        rate = low = high = float("nan")
        if n:
            rate = (wins + 0.5 * ties) / n
            per_prompt = valid.groupby("prompt_key", sort=True)["score"].agg(["sum", "count"])
            low, high = bootstrap_interval(
                per_prompt["sum"].to_numpy(dtype=float),
                per_prompt["count"].to_numpy(dtype=float),
                _group_seed(seed, model, criterion), rounds, confidence)
        rep_mean, rep_std = _per_repetition(valid)
        if errors:
            log.warning("%s / %s: %d judgments failed, left out of the win rate",
                        model, criterion, errors)
        rows.append({
            "model": model, "criterion": criterion, "wins": wins, "ties": ties,
            "losses": losses, "errors": errors, "n": n, "win_rate": rate,
            "ci_low": low, "ci_high": high,
            "position_consistency": _position_consistency(valid),
            "rep_mean": rep_mean, "rep_std": rep_std,
        })
    table = pd.DataFrame(rows, columns=list(WIN_RATE_COLUMNS))
    return table.sort_values(["criterion", "model"], kind="stable").reset_index(drop=True)


def prompt_scores(battles: pd.DataFrame, model: str, baseline: str,
                  criterion: str) -> pd.Series:
    """Mean score of `model` against `baseline` per prompt (win 1, tie 0.5, loss 0;
    pooled over orders and repetitions; errors left out), indexed by prompt key."""
    check_columns(battles)
    df = battles[battles["criterion"] == criterion]
    pair = df[((df["model_a"] == model) & (df["model_b"] == baseline))
              | ((df["model_a"] == baseline) & (df["model_b"] == model))]
    pair = pair[pair["outcome"] != "error"]
    if pair.empty:
        raise InputError(f"no {criterion} battles of {model!r} against {baseline!r}",
                         field="battles")
    model_is_a = (pair["model_a"] == model).to_numpy()
    outcome = pair["outcome"].to_numpy()
    score = np.where(outcome == "tie", 0.5,
                     np.where(model_is_a, outcome == "a_wins", outcome == "b_wins"))
    return pd.Series(score.astype(float), index=prompt_keys(pair).to_numpy()).groupby(
        level=0).mean()


def paired_difference(battles: pd.DataFrame, model: str, other: str, baseline: str,
                      criterion: str, *, rounds: int = 1000, confidence: float = 0.95,
                      seed: int = 0) -> dict[str, float]:
    """How much more often `model` beats the baseline than `other` does, paired by prompt:
    the mean over prompts of score(model) - score(other), with a bootstrap interval over
    prompts. Pairing removes the prompts' own difficulty, so it resolves differences that
    two separate win-rate intervals cannot."""
    check_bootstrap_args(rounds, confidence, seed)
    a = prompt_scores(battles, model, baseline, criterion)
    b = prompt_scores(battles, other, baseline, criterion)
    diff = (a - b).dropna().to_numpy()
    if not len(diff):
        raise InputError(f"{model!r} and {other!r} share no judged prompt", field="battles")
    rng = stream_seed(seed, "paired", model, other, criterion)
    means = np.empty(rounds)
    chunk = max(1, _CHUNK_CELLS // len(diff))
    for start in range(0, rounds, chunk):
        k = min(chunk, rounds - start)
        means[start:start + k] = diff[rng.integers(0, len(diff), size=(k, len(diff)))].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return {"difference": float(diff.mean()), "ci_low": float(low), "ci_high": float(high),
            "prompts": len(diff)}


def read_csv_table(path: str | Path, columns: Sequence[str], *, field: str,
                   dtype: dict[str, Any] | None = None) -> pd.DataFrame:
    """A CSV table a step reads (a win-rate or battle table), with the columns it needs:
    an InputError names the file (and the option `field` that gave it) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path=path, field=field)
    try:
        table = pd.read_csv(path, dtype=dtype)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"not a readable CSV ({exc})", path=path) from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"missing columns {missing}", path=path)
    return table
