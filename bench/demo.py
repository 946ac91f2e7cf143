"""Time the demo: a full run from an empty results/, a no-op rerun, and each job's start-up.

Start-up = process start to the first training step (sft, align) or the first
generated batch (generate), read from the jobs' logs. Usage:

    python bench/demo.py [--cores 2] [--configfile config/config.yaml] [--keep]
    python bench/demo.py --baseline <commit> [--repeats 2]

It deletes results/ and logs/ first (unless --keep), so run it in a clone you
do not mind resetting. With --baseline, it instead runs the default demo of this
working tree and of <commit> in two fresh copies, alternating (baseline, current,
baseline, ...), and prints both wall times and their ratio: a time counts only
beside its baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STARTUP = re.compile(r"startup: first (training step|batch generated) ([0-9.]+) s")


def run(cmd: list[str], cwd: Path = ROOT) -> float:
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return elapsed


def commit_copy(commit: str, work: Path) -> Path:
    """The files of `commit` (git archive), in an empty folder."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT,
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(work, filter="data")
    return work


def versus_baseline(commit: str, cores: str, repeats: int) -> None:
    """The default demo of this tree vs of `commit`, from empty results, alternating."""
    sys.path.insert(0, str(ROOT / "bench"))
    from workcopy import fresh_copy

    root = Path(tempfile.mkdtemp(prefix="sacpo-demo-vs-"))
    copies = {f"baseline {commit}": commit_copy(commit, root / "baseline"),
              "current tree": fresh_copy(root / "current")}
    times: dict[str, list[float]] = {name: [] for name in copies}
    cmd = [sys.executable, "-m", "snakemake", "--cores", str(cores)]
    for i in range(repeats):
        for name, work in copies.items():
            for folder in ("results", "logs", ".snakemake", "scratch"):
                shutil.rmtree(work / folder, ignore_errors=True)
            times[name].append(run(cmd, cwd=work))
            print(f"run {i + 1}/{repeats} {name}: {times[name][-1]:.1f} s", file=sys.stderr)
    base, current = (statistics.median(v) for v in times.values())
    print("| demo (default config, empty results/) | runs | median wall time |")
    print("|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {', '.join(f'{v:.1f}' for v in values)} s | "
              f"{statistics.median(values):.1f} s |")
    print(f"| ratio current / baseline | | {current / base:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", default="all")
    parser.add_argument("--configfile")
    parser.add_argument("--keep", action="store_true", help="do not delete results/ first")
    parser.add_argument("--baseline", metavar="COMMIT",
                        help="time this tree's demo against COMMIT's, in fresh copies")
    parser.add_argument("--repeats", type=int, default=2, help="runs per copy (--baseline)")
    args = parser.parse_args()
    if args.baseline:
        versus_baseline(args.baseline, args.cores, args.repeats)
        return
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
