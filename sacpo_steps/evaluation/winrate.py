"""The `winrate` step: the table of win rates against the baseline (paper Table 3).

The CSV always carries every column (including position consistency and the
paper's mean and std over judge repetitions); the Markdown shows the last two
only with --extra-columns, so that tables rendered before keep their layout.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from sacpo_steps.core.fileio import atomic_output, setup_logging
from sacpo_steps.core.schema import default_of
from sacpo_steps.evaluation.stats import load_battles, win_rates

log = logging.getLogger("sacpo.winrate")


def _fmt(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3f}"


def _words(x: float) -> str:
    return "n/a" if x is None or pd.isna(x) else f"{x:.1f}"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|")


def _mean_std(mean: float, std: float) -> str:
    # a single repetition has no spread: show the mean alone rather than a fake "± 0"
    if std is None or math.isnan(std):
        return _fmt(mean)
    return f"{_fmt(mean)} ± {_fmt(std)}"


def markdown_table(table: pd.DataFrame, confidence: float = 0.95,
                   extra_columns: bool = False) -> str:
    """Render the win-rate table as Markdown, interval as "[lo, hi]".

    `extra_columns` adds position consistency and the paper's "mean ± std" over
    judge repetitions (std with ddof=0).
    """
    header = ["model", "criterion", "wins", "ties", "losses", "errors", "win rate",
              f"{confidence * 100:g}% interval", "n"]
    # battles written before the judge step flagged empty answers have no counts
    has_empty = "answers" in table.columns and bool(table["answers"].notna().any())
    if has_empty:
        header.append("empty answers")
    has_words = "mean_words" in table.columns and bool(table["mean_words"].notna().any())
    if has_words:
        header.append("words (model / baseline)")
    if extra_columns:
        header += ["position consistency", "mean ± std (reps)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table.itertuples(index=False):
        cells = [_cell(r.model), _cell(r.criterion), r.wins, r.ties, r.losses, r.errors,
                 _fmt(r.win_rate), f"[{_fmt(r.ci_low)}, {_fmt(r.ci_high)}]", r.n]
        if has_empty:
            cells.append("n/a" if pd.isna(r.answers) else f"{r.empty_answers}/{r.answers}")
        if has_words:
            cells.append(f"{_words(r.mean_words)} / {_words(r.baseline_mean_words)}")
        if extra_columns:
            cells += [_fmt(r.position_consistency), _mean_std(r.rep_mean, r.rep_std)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _answers(battles: pd.DataFrame) -> pd.DataFrame:
    """One row per (criterion, prompt set, prompt, model) with its answer's flags, read
    from both sides of the battles (columns absent in older files count as missing)."""
    sides = []
    for s in ("a", "b"):
        side = pd.DataFrame({
            "criterion": battles["criterion"], "prompt_set": battles["prompt_set"],
            "prompt_id": battles["prompt_id"], "model": battles[f"model_{s}"],
            "empty": battles.get(f"empty_{s}"), "words": battles.get(f"words_{s}")})
        sides.append(side)
    return pd.concat(sides).drop_duplicates(["criterion", "prompt_set", "prompt_id", "model"])


def add_answer_stats(table: pd.DataFrame, battles: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Per row: its model's empty answers over the prompts of its criterion
    (`empty_answers`/`answers`, from the judge step's flags) and the mean answer length
    in words of the model and of the baseline on the same prompts (`mean_words`,
    `baseline_mean_words`): safety tuning shortens answers and judges favour long ones,
    so a win rate is read beside the lengths. NA where the battles carry no flags."""
    answers = _answers(battles)
    flagged = answers.dropna(subset=["empty"])
    counts = flagged.groupby(["model", "criterion"])["empty"].agg(["sum", "size"])
    words = answers.dropna(subset=["words"]).groupby(["model", "criterion"])["words"].mean()
    empty, total, mean_words, base_words = [], [], [], []
    for r in table.itertuples(index=False):
        found = (r.model, r.criterion) in counts.index
        empty.append(int(counts.loc[(r.model, r.criterion), "sum"]) if found else pd.NA)
        total.append(int(counts.loc[(r.model, r.criterion), "size"]) if found else pd.NA)
        mean_words.append(float(words[(r.model, r.criterion)])
                          if (r.model, r.criterion) in words.index else float("nan"))
        base_words.append(float(words[(baseline, r.criterion)])
                          if (baseline, r.criterion) in words.index else float("nan"))
    return table.assign(empty_answers=empty, answers=total, mean_words=mean_words,
                        baseline_mean_words=base_words)


def winrate_table(
    battle_paths: Sequence[str | Path],
    baseline: str,
    out_csv: str | Path,
    out_md: str | Path,
    *,
    rounds: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    extra_columns: bool = False,
    out_battles: str | Path | None = None,
) -> pd.DataFrame:
    """Compute win rates from battle files; write CSV and Markdown (both or neither).

    `out_battles` also writes every judgment in long form (one CSV, the single table
    all statistics derive from), with an `error` flag column. Each row also counts
    its model's empty answers and the mean answer lengths (from the battles' flags).
    """
    battles = load_battles(battle_paths)
    table = win_rates(battles, baseline, rounds=rounds, confidence=confidence, seed=seed)
    table = add_answer_stats(table, battles, baseline)
    text = markdown_table(table, confidence, extra_columns=extra_columns)
    with contextlib.ExitStack() as stack:
        tmp_csv = stack.enter_context(atomic_output(out_csv))
        tmp_md = stack.enter_context(atomic_output(out_md))
        table.to_csv(tmp_csv, index=False)
        tmp_md.write_text(text, encoding="utf-8")
        if out_battles is not None:
            tmp_battles = stack.enter_context(atomic_output(out_battles))
            battles.assign(error=battles["outcome"] == "error").to_csv(tmp_battles,
                                                                       index=False)
    for r in table.itertuples(index=False):
        log.info("%s / %s: win rate %s [%s, %s] (n=%d, errors=%d)", r.model, r.criterion,
                 _fmt(r.win_rate), _fmt(r.ci_low), _fmt(r.ci_high), r.n, r.errors)
    return table


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sacpo_steps winrate", description=__doc__)
    p.add_argument("--battles", nargs="+", required=True, help="battle JSONL files")
    p.add_argument("--baseline", required=True, help="model name of the baseline (SFT)")
    p.add_argument("--rounds", type=int, default=default_of("evaluation.winrate.bootstrap_rounds"),
                   help="bootstrap rounds")
    p.add_argument("--confidence", type=float,
                   default=default_of("evaluation.winrate.confidence"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-csv", required=True)
    p.add_argument("--out-md", required=True)
    p.add_argument("--extra-columns", action="store_true",
                   help="add position consistency and mean ± std over repetitions to the "
                        "Markdown table")
    p.add_argument("--out-battles", default=None,
                   help="also write all judgments in long form (CSV)")
    p.add_argument("--log", default=None)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    setup_logging(args.log)
    winrate_table(args.battles, args.baseline, args.out_csv, args.out_md,
                  rounds=args.rounds, confidence=args.confidence, seed=args.seed,
                  extra_columns=args.extra_columns, out_battles=args.out_battles)


if __name__ == "__main__":
    main()
