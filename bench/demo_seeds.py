"""Does the demo reproduce the paper's pattern on every seed? Run it and check each claim.

Runs `config/demo-seeds.yaml` (the default demo on several seeds, one DAG) in a fresh
working copy, then checks each claim per seed from the per-seed tables and battles,
and prints the across-seed rows. `--seeds 3 4` runs other seeds (the same config with
its seed list replaced); `--workdir DIR --no-run` checks a finished run again.

Claims (the paper's Figure 2 pattern, on the demo; 95% intervals):
1. DPO(H) helpfulness vs SFT: interval above 0.5, upper end at most 0.95 (not saturated).
2. The smallest beta/lambda child: harmlessness interval above DPO(H)'s (disjoint), and
   helpfulness below DPO(H)'s (paired over prompts: interval of the difference below 0).
3. Harmlessness falls as beta/lambda grows: at most one inversion of adjacent point
   estimates; the intervals at the two ends disjoint.
4. P-SACPO: harmlessness rises with q (at most one inversion), and at least one interior
   q has an interval disjoint from both parents'.
5. No rating of the unregularised BT fit is infinite.
6. The always-refuse row loses helpfulness to SFT (interval below 0.5) and loses
   harmlessness to the smallest beta/lambda child (its win rate against it below 0.5).

Usage: python bench/demo_seeds.py [--seeds 0 1 2] [--cores all] [--workdir DIR] [--no-run]
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml
from workcopy import ROOT, fresh_copy

sys.path.insert(0, str(ROOT))
from sacpo_steps.evaluation.stats import paired_difference, win_rates  # noqa: E402
from sacpo_steps.plan import resolve_extends  # noqa: E402

CONFIG = "config/demo-seeds.yaml"


def inversions(values: list[float], rising: bool) -> int:
    pairs = zip(values, values[1:], strict=False)
    return sum(1 for a, b in pairs if (b < a if rising else b > a))


def disjoint(a: pd.Series, b: pd.Series) -> bool:
    return bool(a["ci_low"] > b["ci_high"] or b["ci_low"] > a["ci_high"])


def roles(config: dict) -> dict:
    """Which models the claims talk about, read from the plan."""
    models = config["models"]
    stage1 = "dpo_h"
    children = sorted((spec["beta"], name) for name, spec in models.items()
                      if spec.get("parent") == stage1)
    safest = children[0][1]
    merges = sorted((spec["q"], name) for name, spec in models.items()
                    if spec.get("parents") == [stage1, safest])
    constants = [n for n, b in config.get("baselines", {}).items() if b["source"] == "constant"]
    return {"stage1": stage1, "children": children, "safest": safest, "merges": merges,
            "refuse": constants[0] if constants else None}


def check_seed(seed_dir: Path, config: dict, rounds: int = 1000) -> tuple[dict, dict]:
    """The claims on one seed: {claim: bool} and the numbers behind them."""
    r = roles(config)
    table = pd.read_csv(seed_dir / "tables/winrate.csv").set_index(["model", "criterion"])
    battles = pd.read_csv(seed_dir / "tables/battles.csv")
    elo = pd.read_csv(seed_dir / "tables/elo.csv")
    h1, s1 = table.loc[(r["stage1"], "helpfulness")], table.loc[(r["stage1"], "harmlessness")]
    safest_h = table.loc[(r["safest"], "harmlessness")]
    paired = paired_difference(battles, r["safest"], r["stage1"], "sft", "helpfulness",
                               rounds=rounds)
    child_harm = [table.loc[(name, "harmlessness")] for _, name in r["children"]]
    merge_harm = [table.loc[(name, "harmlessness")] for _, name in r["merges"]]
    interior = [name for (_, name), row in zip(r["merges"], merge_harm, strict=True)
                if disjoint(row, s1) and disjoint(row, safest_h)]
    bt = elo[elo["mode"] == "bt"]["rating"].astype(float)
    claims = {
        "1 DPO(H) helpfulness > 0.5, upper <= 0.95": bool(h1["ci_low"] > 0.5
                                                         and h1["ci_high"] <= 0.95),
        "2a smallest child harmlessness above DPO(H)": bool(safest_h["ci_low"] > s1["ci_high"]),
        "2b smallest child helpfulness below DPO(H) (paired)": paired["ci_high"] < 0,
        "3 harmlessness falls with beta/lambda": (
            inversions([x["win_rate"] for x in child_harm], rising=False) <= 1
            and disjoint(child_harm[0], child_harm[-1])),
        "4 P-SACPO harmlessness rises with q, interior q between parents": (
            inversions([x["win_rate"] for x in merge_harm], rising=True) <= 1
            and bool(interior)),
        "5 BT Elo finite": bool(len(bt) and bt.map(math.isfinite).all()),
    }
    numbers = {"paired helpfulness (smallest child - DPO(H))":
               f"{paired['difference']:+.3f} [{paired['ci_low']:+.3f}, {paired['ci_high']:+.3f}]",
               "interior q between parents": ", ".join(interior) or "none"}
    if r["refuse"]:
        refuse_h = table.loc[(r["refuse"], "helpfulness")]
        vs_child = win_rates(battles[battles["criterion"] == "harmlessness"], r["safest"],
                             rounds=rounds).set_index("model").loc[r["refuse"]]
        claims["6 always-refuse loses helpfulness to SFT and harmlessness to the child"] = bool(
            refuse_h["ci_high"] < 0.5 and vs_child["ci_high"] < 0.5)
        numbers["always-refuse harmlessness vs smallest child"] = (
            f"{vs_child['win_rate']:.3f} [{vs_child['ci_low']:.3f}, {vs_child['ci_high']:.3f}]")
    return claims, numbers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", help="default: the config's seeds")
    parser.add_argument("--cores", default="all")
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--workdir", help="the working copy (default: a temp dir)")
    parser.add_argument("--no-run", action="store_true", help="check a finished --workdir")
    args = parser.parse_args()
    config = resolve_extends(yaml.safe_load((ROOT / args.config).read_text()), ROOT)
    if args.seeds:
        config.pop("seed", None)
        config["seeds"] = args.seeds
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sacpo-seeds-"))
    if not args.no_run:
        work = fresh_copy(workdir)
        (work / "seeds.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", str(args.cores),
                               "--configfile", "seeds.yaml"], cwd=work, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"snakemake failed (see {work}/logs)")
        print(f"{len(config['seeds'])} seeds in one DAG: {time.monotonic() - start:.0f} s "
              f"(--cores {args.cores})\n")
    root = workdir / "results" / config["experiment"]
    seeds = config.get("seeds", [config.get("seed", 0)])

    across = pd.read_csv(root / "tables/winrate.csv", dtype={"seed": str})
    print("| model | criterion | " + " | ".join(f"seed {s}" for s in seeds)
          + " | across seeds (t interval) |")
    print("|---|---|" + "---|" * (len(seeds) + 1))
    for (model, criterion), group in across.groupby(["model", "criterion"], sort=False):
        cells = []
        for s in [*map(str, seeds), "all"]:
            row = group[group["seed"] == s].iloc[0]
            cells.append(f"{row['win_rate']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]")
        print(f"| {model} | {criterion} | " + " | ".join(cells) + " |")
    print()

    verdicts, numbers = {}, {}
    for s in seeds:
        verdicts[s], numbers[s] = check_seed(root / f"seed-{s}", config)
    print("| claim | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("|---|" + "---|" * len(seeds))
    for claim in verdicts[seeds[0]]:
        print(f"| {claim} | " + " | ".join("yes" if verdicts[s][claim] else "NO"
                                          for s in seeds) + " |")
    for key in numbers[seeds[0]]:
        print(f"| {key} | " + " | ".join(numbers[s][key] for s in seeds) + " |")
    if not all(all(v.values()) for v in verdicts.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
