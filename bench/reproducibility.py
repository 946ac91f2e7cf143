"""Pinned kernels: what they cost, and whether the tables move when the machine changes.

Runs the demo from empty results in fresh copies of the workflow, in one run:

- pinned: the default (`reproducibility.cpu_kernels: pinned`);
- native: `cpu_kernels: native`, every library on the machine's fastest kernels;
- AVX2 machine: pinned, with MKL's dispatch capped at AVX2 too, i.e. this machine
  standing in for an older x86-64 one (`reproducibility.AVX2_MACHINE_ENV`).

Pinned and native alternate (`--repeats`), and the table prints each variant's wall
times, its tables' fingerprint (`python -m sacpo_steps fingerprint`) and the ratio
pinned / native. Pinning holds if the pinned and the AVX2-machine fingerprints are
equal. Usage:

    python bench/reproducibility.py [--cores 2] [--repeats 1] [--configfile FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from workcopy import fresh_copy  # noqa: E402

from sacpo_steps.core.reproducibility import AVX2_MACHINE_ENV, PINNED_ENV, cpu_flags, cpu_model  # noqa: E402
from sacpo_steps.reporting.fingerprint import fingerprint  # noqa: E402


def run_demo(work: Path, configfile: Path, cores: str, env: dict[str, str]) -> float:
    for folder in ("results", "logs", ".snakemake", "scratch"):
        shutil.rmtree(work / folder, ignore_errors=True)
    cmd = [sys.executable, "-m", "snakemake", "--cores", cores, "--configfile", str(configfile)]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True,
                          env={**os.environ, **env})
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"demo failed in {work}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", default="2")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--configfile", default="config/config.yaml")
    parser.add_argument("--no-avx2-machine", action="store_true",
                        help="time pinned against native only (no AVX2-machine run)")
    args = parser.parse_args()
    config = yaml.safe_load((ROOT / args.configfile).read_text(encoding="utf-8"))
    experiment = config["experiment"]
    root = Path(tempfile.mkdtemp(prefix="sacpo-repro-"))
    # the user's own settings would defeat the comparison
    clean = {k: "" for k in AVX2_MACHINE_ENV if k in os.environ}
    if clean:
        raise SystemExit(f"unset {', '.join(clean)} first: the bench sets them itself")
    variants = {}
    for name, kernels, env in (("pinned", "pinned", {}), ("native", "native", {}),
                               ("AVX2 machine (pinned)", "pinned",
                                {k: v for k, v in AVX2_MACHINE_ENV.items()
                                 if k not in PINNED_ENV})):
        work = fresh_copy(root / name.split()[0].lower())
        cfg = {**config, "reproducibility": {**config.get("reproducibility", {}),
                                             "cpu_kernels": kernels}}
        configfile = work / "bench-config.yaml"
        configfile.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        variants[name] = (work, configfile, env)
    times: dict[str, list[float]] = {name: [] for name in variants}
    prints: dict[str, set[str]] = {name: set() for name in variants}
    order = [("pinned", "native")[i % 2] for i in range(2 * args.repeats)]
    if not args.no_avx2_machine:
        order.append("AVX2 machine (pinned)")
    for i, name in enumerate(order, start=1):
        work, configfile, env = variants[name]
        times[name].append(run_demo(work, configfile, args.cores, env))
        prints[name].add(fingerprint(work / "results" / experiment)["fingerprint"])
        print(f"run {i}/{len(order)} {name}: {times[name][-1]:.1f} s", file=sys.stderr)
    print(f"machine: {cpu_model()}; {' '.join(cpu_flags())}")
    print(f"config: {args.configfile}, --cores {args.cores}\n")
    print("| variant | runs | median wall time | tables fingerprint |")
    print("|---|---|---|---|")
    for name, values in times.items():
        if not values:
            continue
        print(f"| {name} | {', '.join(f'{v:.1f}' for v in values)} s | "
              f"{statistics.median(values):.1f} s | {', '.join(sorted(prints[name]))} |")
    ratio = statistics.median(times["pinned"]) / statistics.median(times["native"])
    print(f"| ratio pinned / native | | {ratio:.3f} | |")
    if not args.no_avx2_machine:
        same = prints["pinned"] == prints["AVX2 machine (pinned)"] and len(prints["pinned"]) == 1
        print(f"\npinned tables {'equal' if same else 'DIFFER from'} the AVX2-machine tables")
    print(f"native tables {'equal' if prints['native'] == prints['pinned'] else 'differ'}; "
          f"pinned runs agree with each other: {len(prints['pinned']) == 1}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
