"""The `across_seeds` step: one table over every seed of an experiment.

Each seed's run is a full replicate (world, SFT, training, generation). The table
keeps every per-seed row (column `seed`) and adds one row per model and criterion
with `seed = "all"`: the mean of the per-seed values, and an interval that says
how much the result moves from seed to seed. With two or more seeds that is a
Student-t interval over the per-seed values (it contains the prompts' sampling
noise too, since every seed draws it); with a single seed there is nothing to
spread over, and the row keeps that seed's own bootstrap interval over prompts.
The `interval` column names which one a row carries. The per-family Elo tables
(elo_families.csv, with `evaluation.families`) are combined the same way, per fit.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.fileio import atomic_output, setup_logging
from sacpo_steps.core.schema import default_of

log = logging.getLogger("sacpo.across_seeds")

ALL = "all"
# summed over seeds in the across-seed row (counts); other numeric columns are averaged
WINRATE_SUMS = ("wins", "ties", "losses", "errors", "n", "empty_answers", "answers")
ELO_SUMS = ("n", "errors")


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with `df` degrees of freedom, by bisection
    on its CDF (Simpson's rule on the density): no scipy needed for one number."""
    log_norm = (math.lgamma((df + 1) / 2) - math.lgamma(df / 2)
                - 0.5 * math.log(df * math.pi))

    def cdf(x: float, steps: int = 2000) -> float:
        grid = np.linspace(0.0, x, steps + 1)
        density = np.exp(log_norm - (df + 1) / 2 * np.log1p(grid ** 2 / df))
        weights = np.ones(steps + 1)
        weights[1:-1:2], weights[2:-1:2] = 4, 2
        return 0.5 + float((weights * density).sum() * x / (3 * steps))

    low, high = 0.0, 1.0
    while cdf(high) < p:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


def t_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """Student-t interval of the mean of `values` (at least two)."""
    n = len(values)
    half = t_quantile(0.5 + confidence / 2, n - 1) * values.std(ddof=1) / math.sqrt(n)
    mean = values.mean()
    return float(mean - half), float(mean + half)


def _read(paths: Sequence[str | Path], seeds: Sequence[int], what: str) -> pd.DataFrame:
    if len(paths) != len(seeds):
        raise InputError(f"{len(paths)} {what} tables for {len(seeds)} seeds", field="seeds")
    frames = []
    for path, seed in zip(paths, seeds, strict=True):
        try:
            frame = pd.read_csv(path)
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise InputError(f"cannot read the {what} table: {exc}", path=path) from None
        frames.append(frame.assign(seed=str(seed)))
    return pd.concat(frames, ignore_index=True)


def combine(per_seed: pd.DataFrame, keys: Sequence[str], value: str, *, confidence: float,
            sums: Sequence[str] = ()) -> pd.DataFrame:
    """Per-seed rows plus one across-seed row per `keys` group (see the module doc).

    `value` is the estimate (win_rate or rating) whose interval is `ci_low`/`ci_high`.
    A non-finite per-seed value (an unbounded Elo) makes the across-seed value and
    interval non-finite too, rather than hiding the seed that diverged.
    """
    missing = [c for c in (*keys, value, "ci_low", "ci_high") if c not in per_seed.columns]
    if missing:
        raise InputError(f"missing column(s) {missing}", field="per-seed table")
    seeds = sorted(per_seed["seed"].unique(), key=int)
    rows = []
    for group_keys, group in per_seed.groupby(list(keys), sort=False, dropna=False):
        group_keys = group_keys if isinstance(group_keys, tuple) else (group_keys,)
        row: dict[str, object] = dict(zip(keys, group_keys, strict=True))
        values = group[value].to_numpy(dtype=float)
        row["seed"] = ALL
        row["seeds"] = len(group)
        if len(group) < len(seeds):
            log.warning("%s: present in %d of %d seeds", row, len(group), len(seeds))
        row[value] = float(values.mean())
        if len(values) >= 2 and np.isfinite(values).all():
            row["ci_low"], row["ci_high"] = t_interval(values, confidence)
            row["interval"] = f"t over {len(values)} seeds"
        elif len(values) >= 2:
            # an unbounded Elo (inf) or a row with no number (an invalid paper-mode Elo)
            row["ci_low"], row["ci_high"] = float("nan"), float("nan")
            row["interval"] = ("no value on some seed" if np.isnan(values).any()
                               else "not finite on some seed")
        else:
            row["ci_low"], row["ci_high"] = float(group["ci_low"].iloc[0]), \
                float(group["ci_high"].iloc[0])
            row["interval"] = "bootstrap over prompts (one seed)"
        row["seed_sd"] = float(values.std(ddof=1)) if len(values) >= 2 else float("nan")
        for col in per_seed.columns:
            if col in row or col in keys or col == "seed":
                continue
            series = group[col]
            if col in sums:
                row[col] = series.sum(min_count=1)
            elif pd.api.types.is_bool_dtype(series):
                row[col] = bool(series.all())
            elif pd.api.types.is_numeric_dtype(series):
                row[col] = float(series.mean())
            else:
                distinct = series.dropna().unique()
                row[col] = distinct[0] if len(distinct) == 1 else ";".join(map(str, distinct))
        rows.append(row)
    across = pd.DataFrame(rows)
    per_seed = per_seed.assign(seeds=1, interval="bootstrap over prompts")
    table = pd.concat([per_seed, across], ignore_index=True)
    order = ["seed", *keys]
    table = table[[*order, *[c for c in table.columns if c not in order]]]
    return table


def _fmt(x: object, digits: int = 3) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "n/a"
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "+inf" if x > 0 else "-inf"
    return f"{x:.{digits}f}"


def _markdown(table: pd.DataFrame, keys: Sequence[str], value: str, label: str,
              confidence: float, digits: int) -> str:
    """Across-seed rows first (what a reader wants), then every seed's row."""
    ci = f"{confidence * 100:g}% interval"
    extra = ["words (model / baseline)"] if "mean_words" in table.columns else []
    header = [*keys, "seed", label, ci, "interval", *extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ranked = pd.concat([table[table["seed"] == ALL], table[table["seed"] != ALL]])
    for r in ranked.to_dict("records"):
        cells = [str(r[k]).replace("|", "\\|") for k in keys]
        cells += [str(r["seed"]), _fmt(r[value], digits),
                  f"[{_fmt(r['ci_low'], digits)}, {_fmt(r['ci_high'], digits)}]", r["interval"]]
        if extra:
            cells.append(f"{_fmt(r.get('mean_words'), 1)} / "
                         f"{_fmt(r.get('baseline_mean_words'), 1)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def across_seeds(
    seeds: Sequence[int],
    winrate: Sequence[str | Path],
    elo: Sequence[str | Path],
    out_winrate_csv: str | Path,
    out_winrate_md: str | Path,
    out_elo_csv: str | Path,
    out_elo_md: str | Path,
    *,
    confidence: float = 0.95,
    elo_families: Sequence[str | Path] = (),
    out_elo_families_csv: str | Path | None = None,
    out_elo_families_md: str | Path | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Combine the per-seed win-rate and Elo tables; write all files or none.

    With `elo_families` (per-seed elo_families.csv, in seed order) also their
    across-seed table, per (criterion, fit, mode, model), to both `out_elo_families_*`.
    """
    if not 0 < confidence < 1:
        raise InputError(f"must be in (0, 1), got {confidence}", field="confidence")
    family_outs = [p for p in (out_elo_families_csv, out_elo_families_md) if p is not None]
    if (len(family_outs) != 2) if elo_families else family_outs:
        raise InputError("per-family Elo tables and both of their outputs go together",
                         field="elo_families")
    win = combine(_read(winrate, seeds, "win-rate"), ["model", "criterion"], "win_rate",
                  confidence=confidence, sums=WINRATE_SUMS)
    win["ci_low"] = win["ci_low"].clip(lower=0.0)
    win["ci_high"] = win["ci_high"].clip(upper=1.0)
    elo_keys = ["criterion", "mode", "model"]
    elo_table = combine(_read(elo, seeds, "Elo"), elo_keys, "rating",
                        confidence=confidence, sums=ELO_SUMS)
    family_keys = ["criterion", "fit", "mode", "model"]
    families = (combine(_read(elo_families, seeds, "per-family Elo"), family_keys, "rating",
                        confidence=confidence, sums=ELO_SUMS) if elo_families else None)
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(atomic_output(p)) for p in
                 (out_winrate_csv, out_winrate_md, out_elo_csv, out_elo_md, *family_outs)]
        win.to_csv(files[0], index=False)
        files[1].write_text(_markdown(win, ["model", "criterion"], "win_rate", "win rate",
                                      confidence, 3), encoding="utf-8")
        elo_table.to_csv(files[2], index=False)
        files[3].write_text(_markdown(elo_table, elo_keys, "rating", "rating", confidence, 1),
                            encoding="utf-8")
        if families is not None:
            families.to_csv(files[4], index=False)
            files[5].write_text(_markdown(families, family_keys, "rating", "rating",
                                          confidence, 1), encoding="utf-8")
    for r in win[win["seed"] == ALL].itertuples(index=False):
        log.info("%s / %s over %d seed(s): win rate %s [%s, %s] (%s)", r.model, r.criterion,
                 r.seeds, _fmt(r.win_rate), _fmt(r.ci_low), _fmt(r.ci_high), r.interval)
    return win, elo_table


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sacpo_steps across_seeds", description=__doc__)
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--winrate", nargs="+", required=True, help="per-seed winrate.csv, in order")
    p.add_argument("--elo", nargs="+", required=True, help="per-seed elo.csv, in order")
    p.add_argument("--confidence", type=float,
                   default=default_of("evaluation.winrate.confidence"))
    p.add_argument("--out-winrate-csv", required=True)
    p.add_argument("--out-winrate-md", required=True)
    p.add_argument("--out-elo-csv", required=True)
    p.add_argument("--out-elo-md", required=True)
    p.add_argument("--elo-families", nargs="+", default=(),
                   help="per-seed elo_families.csv, in order (with evaluation.families)")
    p.add_argument("--out-elo-families-csv", default=None)
    p.add_argument("--out-elo-families-md", default=None)
    p.add_argument("--log", default=None)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    setup_logging(args.log)
    across_seeds(args.seeds, args.winrate, args.elo, args.out_winrate_csv, args.out_winrate_md,
                 args.out_elo_csv, args.out_elo_md, confidence=args.confidence,
                 elo_families=args.elo_families, out_elo_families_csv=args.out_elo_families_csv,
                 out_elo_families_md=args.out_elo_families_md)


if __name__ == "__main__":
    main()
