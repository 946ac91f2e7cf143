"""Does the safety target search hold up across seeds? Run config/demo-target.yaml on
several seeds (world, training, generation and bootstrap seeds all changed) and print,
per seed: the two ends' measurements, the chosen q and its measurements, and the
helpfulness gain over the over-safe model, paired over prompts, with its 95% interval.

Claims checked per seed:
1. the target lies between DPO(H)'s harmlessness and the over-safe model's lower bound
   (else the seed's world does not pose the question: reported, not a failure);
2. the search meets it (the chosen q's lower bound >= the target);
3. the chosen merge is more helpful than the over-safe model, the paired interval of
   the gain excluding 0.

Usage: python bench/target_seeds.py [--seeds 0 1 2] [--cores 2] [--targets 0.5 0.6 0.7]
(wall s: the first target of a seed includes training; the others rerun only the search)
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from workcopy import ROOT, fresh_copy

CONFIG = "config/demo-target.yaml"


def outputs(config: dict, seed: int) -> list[str]:
    root = f"results/{config['experiment']}/seed-{seed}/target"
    return [f"{root}/search.json", f"{root}/search.md"]


def run_seed(seed: int, base: dict, targets: list[float], workdir: Path,
             cores: str) -> list[tuple[float, dict, float]]:
    """One working copy per seed; the first target trains everything, each further
    target reruns only the search (the models are cached)."""
    work = fresh_copy(workdir / f"seed{seed}")
    out = []
    for target in targets:
        config = copy.deepcopy(base)
        config.pop("seed", None)
        config["seeds"] = [seed]
        config["demo_world"].pop("seed", None)  # the world follows the seed
        config["target"]["value"] = target
        (work / "seed.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", cores,
                               *outputs(config, seed),
                               "--configfile", "seed.yaml"], cwd=work, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"seed {seed}, target {target}: snakemake failed (see {work}/logs)")
        result = json.loads((work / outputs(config, seed)[0]).read_text())
        out.append((target, result, time.monotonic() - start))
    return out


def fmt(m: dict, key: str) -> str:
    return f"{m[key]:.3f} [{m[key + '_low']:.3f}, {m[key + '_high']:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cores", default="2")
    parser.add_argument("--targets", type=float, nargs="+",
                        help="target values to search (default: the config's)")
    parser.add_argument("--workdir", type=Path, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args()
    base = yaml.safe_load((ROOT / CONFIG).read_text())
    targets = args.targets or [base["target"]["value"]]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sacpo-target-seeds-"))
    rows, claims = [], []
    for seed in args.seeds:
        for target, result, seconds in run_seed(seed, base, targets, workdir, args.cores):
            by_q = {m["q"]: m for m in result["trace"]}
            lo_end, hi_end = by_q.get(0.0), by_q[1.0]
            chosen, gain = result["chosen"], result.get("helpfulness_gain")
            posed = lo_end is not None and lo_end["constraint"] < target < hi_end["constraint_low"]
            rows.append(
                f"| {seed} | {target:g} | {fmt(lo_end, 'constraint') if lo_end else '-'} | "
                f"{fmt(hi_end, 'constraint')} | {fmt(hi_end, 'helpfulness')} | "
                f"{result['q'] if result['met'] else 'none'} | "
                f"{fmt(chosen, 'constraint') if chosen else '-'} | "
                f"{fmt(chosen, 'helpfulness') if chosen else '-'} | "
                + (f"{gain[0]:+.3f} [{gain[1]:+.3f}, {gain[2]:+.3f}]" if gain else "-")
                + f" | {len(result['trace'])} | {seconds:.0f} |")
            claims.append((seed, target, posed, bool(result["met"]),
                           bool(gain is not None and gain[1] > 0)))
    print(f"Target: harmlessness win rate vs SFT, 95% lower bound >= the target ({CONFIG}; "
          f"over-safe model {base['target']['over_safe']})\n")
    print("| seed | target | DPO(H) harmlessness (q = 0) | over-safe harmlessness (q = 1) | "
          "over-safe helpfulness | chosen q | harmlessness at q | helpfulness at q | "
          "helpfulness gain, paired | evaluations | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---:|---:|")
    print("\n".join(rows))
    print("\n| seed | target | target between the ends | target met | gain interval above 0 |")
    print("|---|---|---|---|---|")
    for seed, target, posed, met, gained in claims:
        print(f"| {seed} | {target:g} | {'yes' if posed else 'no'} | {'yes' if met else 'no'} | "
              f"{'yes' if gained else 'no'} |")
    print(f"\nruns kept in {workdir}")


if __name__ == "__main__":
    main()
