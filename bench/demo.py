"""Time the demo: a full run from an empty results/, a no-op rerun, and each job's start-up.

Start-up = process start to the first training step (sft, align) or the first
generated batch (generate), read from the jobs' logs. Usage:

    python bench/demo.py [--cores 2] [--configfile config/config.yaml] [--keep]

It deletes results/ and logs/ first (unless --keep), so run it in a clone you
do not mind resetting.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STARTUP = re.compile(r"startup: first (training step|batch generated) ([0-9.]+) s")


def run(cmd: list[str]) -> float:
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cores", default="all")
    parser.add_argument("--configfile")
    parser.add_argument("--keep", action="store_true", help="do not delete results/ first")
    args = parser.parse_args()
    base = [sys.executable, "-m", "snakemake", "--cores", str(args.cores)]
    if args.configfile:
        base += ["--configfile", args.configfile]
    if not args.keep:
        for folder in ("results", "logs"):
            shutil.rmtree(ROOT / folder, ignore_errors=True)
    full = run(base)
    noop = run(base)

    startups = []
    for log in sorted((ROOT / "logs").rglob("*.log")):
        match = STARTUP.search(log.read_text(errors="replace"))
        if match:
            startups.append((str(log.relative_to(ROOT / "logs")), float(match.group(2))))
    print("| measurement | value | goal |")
    print("|---|---|---|")
    print(f"| full demo from empty results/ | {full:.1f} s | <= 300 s |")
    print(f"| no-op rerun | {noop:.2f} s | <= 3 s |")
    if startups:
        values = [s for _, s in startups]
        print(f"| job start-up, median of {len(values)} jobs | {statistics.median(values):.2f} s"
              " | <= 4 s |")
        print(f"| job start-up, max | {max(values):.2f} s | |")
    print()
    print("| job (log) | start-up s |")
    print("|---|---|")
    for name, seconds in startups:
        print(f"| {name} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
