"""Does the demo reproduce the paper's pattern? Run it on several seeds and check.

For each seed, the demo config is copied with every seed changed (world, training,
generation, bootstrap) and run in its own working copy of the workflow. The
claims checked, per seed, from results/tables/winrate.csv:

1. DPO(H)'s helpfulness win rate vs SFT has its 95% interval above 0.5.
2. For the smallest beta/lambda, DPO(H)->DPO(S)'s harmlessness win rate is above
   DPO(H)'s, with non-overlapping 95% intervals.
3. Harmlessness falls as beta/lambda grows (at most one inversion).

Usage: python bench/demo_seeds.py [--seeds 0 1 2] [--cores 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml
from workcopy import ROOT, fresh_copy


def stage2_models(config: dict, stage1: str) -> list[tuple[float, str]]:
    """Stage-2 children of `stage1`, sorted by their coefficient beta/lambda."""
    return sorted((spec["beta"], name) for name, spec in config["models"].items()
                  if spec["parent"] == stage1)


def run_seed(seed: int, base: dict, workdir: Path, cores: str) -> tuple[pd.DataFrame, float]:
    work = fresh_copy(workdir / f"seed{seed}")
    config = copy.deepcopy(base)
    config["seed"] = seed
    config.setdefault("demo_world", {})["seed"] = seed
    (work / "seed.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", cores,
                           "--configfile", "seed.yaml"], cwd=work, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"seed {seed}: snakemake failed (see {work}/logs)")
    return pd.read_csv(work / "results/tables/winrate.csv"), time.monotonic() - start


def check(table: pd.DataFrame, config: dict, stage1: str) -> dict[str, bool]:
    rows = table.set_index(["model", "criterion"])
    helpful = rows.loc[(stage1, "helpfulness")]
    children = stage2_models(config, stage1)
    safest = rows.loc[(children[0][1], "harmlessness")]
    harm_stage1 = rows.loc[(stage1, "harmlessness")]
    harmless = [rows.loc[(name, "harmlessness")]["win_rate"] for _, name in children]
    inversions = sum(1 for a, b in zip(harmless, harmless[1:], strict=False) if b > a)
    return {
        "dpo_h_helpful_ci_above_0.5": bool(helpful["ci_low"] > 0.5),
        "smallest_beta_harmless_above_dpo_h": bool(safest["ci_low"] > harm_stage1["ci_high"]),
        "harmless_falls_with_beta(<=1 inversion)": inversions <= 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cores", default="all")
    parser.add_argument("--config", default=str(ROOT / "config/config.yaml"))
    parser.add_argument("--stage1", default="dpo_h")
    parser.add_argument("--workdir", help="where the per-seed copies go (default: a temp dir)")
    args = parser.parse_args()
    base = yaml.safe_load(Path(args.config).read_text())
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sacpo-seeds-"))

    rows, verdicts = [], {}
    for seed in args.seeds:
        table, seconds = run_seed(seed, base, workdir, args.cores)
        verdicts[seed] = check(table, base, args.stage1)
        for _, r in table.iterrows():
            rows.append({"seed": seed, "model": r["model"], "criterion": r["criterion"],
                         "win_rate": r["win_rate"], "ci": f"[{r['ci_low']:.3f}, "
                         f"{r['ci_high']:.3f}]", "n": int(r["n"])})
        print(f"seed {seed}: {seconds:.0f} s", file=sys.stderr)

    print("| seed | model | criterion | win rate | 95% CI | n |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['model']} | {r['criterion']} | {r['win_rate']:.3f} | "
              f"{r['ci']} | {r['n']} |")
    print()
    claims = list(next(iter(verdicts.values())))
    print("| claim | " + " | ".join(f"seed {s}" for s in verdicts) + " |")
    print("|---|" + "---|" * len(verdicts))
    for claim in claims:
        cells = " | ".join("yes" if verdicts[s][claim] else "NO" for s in verdicts)
        print(f"| {claim} | {cells} |")
    if not all(all(v.values()) for v in verdicts.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
