"""Time the statistics on a synthetic all-pairs battle table (about 100k battles).

The table: 10 models by default (one is "sft"), every pair, 2 criteria, prompts x 2 orders x
3 repetitions; outcomes drawn from a Bradley-Terry model with 10% ties and 1%
errors. Timed: reading the JSONL, win rates vs SFT with their bootstrap, BT Elo
with its bootstrap, and the paper's online Elo on its own. Prints a Markdown table.

Usage: python bench/stats.py [--models 10] [--prompts N] [--rounds 1000] [--seed 0]
                             [--skip-paper]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sacpo_steps.evaluation.stats import load_battles, win_rates  # noqa: E402
from sacpo_steps.reporting.bradley_terry import bt_elo, bt_elo_bootstrap  # noqa: E402
from sacpo_steps.reporting.online_elo import paper_elo  # noqa: E402

CRITERIA = ("helpfulness", "harmlessness")


def model_names(n_models: int) -> list[str]:
    return ["sft", *[f"m{i}" for i in range(1, n_models)]]


def synthetic_battles(n_prompts: int, seed: int, n_models: int = 10) -> pd.DataFrame:
    """All pairs x criteria x prompts x orders x repetitions, vectorised."""
    rng = np.random.default_rng(seed)
    names = model_names(n_models)
    pairs = list(combinations(range(n_models), 2))
    grid = np.array([(c, p, i, j, o, r) for c in range(len(CRITERIA)) for p in range(n_prompts)
                     for i, j in pairs for o in range(2) for r in range(3)])
    crit, prompt, a, b, order, rep = grid.T
    strength = rng.normal(0, 0.6, size=(len(CRITERIA), n_models))
    strength[:, 0] = 0.0
    p_a = 1 / (1 + np.exp(-(strength[crit, a] - strength[crit, b])))
    u = rng.random(len(grid))
    outcome = np.where(u < 0.1, "tie", np.where(rng.random(len(grid)) < p_a, "a_wins", "b_wins"))
    outcome = np.where(rng.random(len(grid)) < 0.01, "error", outcome)
    names = np.array(names)
    return pd.DataFrame({
        "criterion": np.array(CRITERIA)[crit], "prompt_set": "bench",
        "prompt_id": [f"p{k:04d}" for k in prompt], "model_a": names[a], "model_b": names[b],
        "order": np.where(order == 0, "a_first", "b_first"), "repetition": rep,
        "outcome": outcome, "judge": "synthetic", "raw": None,
    })


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=10, help="models, all pairs judged")
    parser.add_argument("--prompts", type=int, default=None,
                        help="prompts per criterion (default: about 100k battles in all)")
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-paper", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the 1% synthetic errors warn per model

    n_pairs = args.models * (args.models - 1) // 2
    if args.prompts is None:
        args.prompts = max(1, round(100_000 / (n_pairs * len(CRITERIA) * 2 * 3)))
    battles = synthetic_battles(args.prompts, args.seed, args.models)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "battles.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            for row in battles.to_dict(orient="records"):
                fh.write(json.dumps(row) + "\n")
        t_load, battles = timed(lambda: load_battles([path]))

    rows: list[tuple[str, float]] = [("load_battles (JSONL, validated)", t_load)]
    t_wr, _ = timed(lambda: win_rates(battles, "sft", rounds=1, seed=args.seed))
    rows.append(("win rates vs SFT, no bootstrap (1 round)", t_wr))
    t_wrb, _ = timed(lambda: win_rates(battles, "sft", rounds=args.rounds, seed=args.seed))
    rows.append((f"win rates vs SFT + bootstrap ({args.rounds} rounds)", t_wrb))
    t_bt, _ = timed(lambda: bt_elo(battles, "sft"))
    rows.append(("BT Elo, point estimate", t_bt))
    t_btb, _ = timed(lambda: bt_elo_bootstrap(battles, "sft", rounds=args.rounds,
                                              seed=args.seed))
    rows.append((f"BT Elo + bootstrap ({args.rounds} rounds)", t_btb))
    rows.append(("**win rates + BT Elo with bootstraps (goal < 10 s)**", t_wrb + t_btb))
    if not args.skip_paper:
        t_paper, _ = timed(lambda: paper_elo(battles, "sft", seed=args.seed))
        rows.append(("paper-mode online Elo (50 trials x 10 passes)", t_paper))

    vs_sft = int(((battles.model_a == "sft") | (battles.model_b == "sft")).sum())
    print(f"{len(battles)} battles ({vs_sft} against sft), {args.models} models, "
          f"{len(CRITERIA)} criteria, {args.prompts} prompts per criterion; "
          f"python {platform.python_version()}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs visible\n")
    print("| step | wall time (s) |")
    print("|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
