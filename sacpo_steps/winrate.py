"""The `winrate` step: the table of win rates against the baseline (paper Table 3)."""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from sacpo_steps.fileio import atomic_output, setup_logging
from sacpo_steps.stats import load_battles, win_rates

log = logging.getLogger("sacpo.winrate")


def _fmt(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3f}"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|")


def markdown_table(table: pd.DataFrame, confidence: float = 0.95) -> str:
    """Render the win-rate table as Markdown, interval as "[lo, hi]"."""
    header = ["model", "criterion", "wins", "ties", "losses", "errors", "win rate",
              f"{confidence * 100:g}% interval", "n"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table.itertuples(index=False):
        cells = [_cell(r.model), _cell(r.criterion), r.wins, r.ties, r.losses, r.errors,
                 _fmt(r.win_rate), f"[{_fmt(r.ci_low)}, {_fmt(r.ci_high)}]", r.n]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def winrate_table(
    battle_paths: Sequence[str | Path],
    baseline: str,
    out_csv: str | Path,
    out_md: str | Path,
    *,
    rounds: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Compute win rates from battle files; write CSV and Markdown (both or neither)."""
    table = win_rates(load_battles(battle_paths), baseline, rounds=rounds,
                      confidence=confidence, seed=seed)
    text = markdown_table(table, confidence)
    with atomic_output(out_csv) as tmp_csv, atomic_output(out_md) as tmp_md:
        table.to_csv(tmp_csv, index=False)
        tmp_md.write_text(text, encoding="utf-8")
    for r in table.itertuples(index=False):
        log.info("%s / %s: win rate %s [%s, %s] (n=%d, errors=%d)", r.model, r.criterion,
                 _fmt(r.win_rate), _fmt(r.ci_low), _fmt(r.ci_high), r.n, r.errors)
    return table


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sacpo_steps winrate", description=__doc__)
    p.add_argument("--battles", nargs="+", required=True, help="battle JSONL files")
    p.add_argument("--baseline", required=True, help="model name of the baseline (SFT)")
    p.add_argument("--rounds", type=int, default=1000, help="bootstrap rounds")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-csv", required=True)
    p.add_argument("--out-md", required=True)
    p.add_argument("--log", default=None)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    setup_logging(args.log)
    winrate_table(args.battles, args.baseline, args.out_csv, args.out_md,
                  rounds=args.rounds, confidence=args.confidence, seed=args.seed)


if __name__ == "__main__":
    main()
