"""Time a Snakemake call with nothing to do: this workflow's against a bare one's.

Every call of the workflow parses it (the plan, the rules, each step's source hash)
and checks every job of the DAG before it finds nothing to do; a bare Snakefile (one
rule, its output present) measures what Snakemake itself costs. Usage:

    python bench/noop_rerun.py [--configfile tests/configs/reduced_demo.yaml] [--runs 7]
    python bench/noop_rerun.py --work /tmp/noop --keep      # reuse a finished copy
    python bench/noop_rerun.py --configfile config/config.yaml --dry-run

It copies the workflow into `--work` (emptied first, unless --keep) and runs it once
to completion (the reduced demo: minutes of CPU), then runs the no-op call and the
bare one in turn (ours, bare, ours, ...) after a warm-up of each, and prints the wall
and CPU seconds of each (median, min, max) and the ratio of the medians; a ratio
counts only beside its bare run of the same call. `--breakdown` adds a third call in
turn, `snakemake --list-rules` of ours (the workflow parsed and the plan loaded and
hashed, no DAG), which splits our extra time into parsing and planning on one side and
the DAG's jobs and their checks on the other. `--dry-run` skips the real run and
times `snakemake -n` instead (the DAG of a workflow with everything to do: not a
no-op). The load average is printed before and after: a loaded machine inflates both.
"""

from __future__ import annotations

import argparse
import compileall
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workcopy import ROOT, fresh_copy  # noqa: E402

BARE_SNAKEFILE = """\
rule all:
    input: "out.txt"

rule make:
    output: "out.txt"
    shell: "touch {output}"
"""
DONE = ".noop_bench_done"  # in the copy: the run to completion succeeded


def snakemake(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        sys.exit(f"snakemake {' '.join(args)} failed in {cwd}:\n"
                 f"{(proc.stdout + proc.stderr)[-3000:]}")
    return proc


def timed(args: list[str], cwd: Path) -> tuple[float, float, str]:
    """(wall s, CPU s of the child, its output) of one call."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        sys.exit(f"snakemake {' '.join(args)} failed in {cwd}:\n"
                 f"{(proc.stdout + proc.stderr)[-3000:]}")
    return wall, cpu, proc.stdout + proc.stderr


def prepare(work: Path, configfile: str, cores: int, keep: bool, dry_run: bool) -> Path:
    ours = work / "workflow"
    reuse = keep and ((ours / DONE).is_file() or (dry_run and ours.is_dir()))
    if not reuse:
        fresh_copy(ours)
        shutil.copytree(ROOT / "tests" / "configs", ours / "tests" / "configs")
        if not dry_run:
            print(f"running {configfile} to completion in {ours} ...", flush=True)
            start = time.perf_counter()
            snakemake("--cores", str(cores), "--configfile", configfile, cwd=ours)
            print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
            (ours / DONE).touch()
    # bytecode, as an install or a first import writes it: where PYTHONDONTWRITEBYTECODE
    # is set, every call would compile the package again (Snakemake's own is compiled)
    compileall.compile_dir(ours / "sacpo_steps", quiet=1)
    bare = work / "bare"
    bare.mkdir(parents=True, exist_ok=True)
    (bare / "Snakefile").write_text(BARE_SNAKEFILE, encoding="utf-8")
    snakemake("--cores", "1", cwd=bare)
    return ours


def row(name: str, values: list[float]) -> str:
    return (f"| {name:<22} | {statistics.median(values):8.3f} | {min(values):8.3f} "
            f"| {max(values):8.3f} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configfile", default="tests/configs/reduced_demo.yaml",
                   help="the experiment to time, relative to the repository")
    p.add_argument("--work", type=Path, default=Path("/tmp/sacpo-noop-bench"),
                   help="folder for the copy of the workflow and the bare one")
    p.add_argument("--runs", type=int, default=7, help="timed calls of each")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each first")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--keep", action="store_true",
                   help="reuse the copy in --work when its run finished before")
    p.add_argument("--breakdown", action="store_true",
                   help="also time `snakemake --list-rules` of ours (parse and plan only)")
    p.add_argument("--dry-run", action="store_true",
                   help="time `snakemake -n` of a copy with nothing done, not a no-op")
    args = p.parse_args(argv)

    ours = prepare(args.work, args.configfile, args.cores, args.keep, args.dry_run)
    bare = args.work / "bare"
    ours_args = ["--cores", str(args.cores), "--configfile", args.configfile]
    if args.dry_run:
        ours_args.append("-n")
    bare_args = ["--cores", str(args.cores)]
    calls = [("ours", ours_args, ours), ("bare", bare_args, bare)]
    if args.breakdown:
        calls.append(("parse", ["--list-rules", "--configfile", args.configfile], ours))
    load_before = os.getloadavg()
    walls: dict[str, list[float]] = {name: [] for name, _, _ in calls}
    cpus: dict[str, list[float]] = {name: [] for name, _, _ in calls}
    for i in range(args.warmup + args.runs):
        for name, call, cwd in calls:
            wall, cpu, output = timed(call, cwd)
            if name != "parse" and not args.dry_run and "Nothing to be done" not in output:
                sys.exit(f"{name}: not a no-op:\n{output[-3000:]}")
            if i >= args.warmup:
                walls[name].append(wall)
                cpus[name].append(cpu)
    load_after = os.getloadavg()

    what = "snakemake -n (everything to do)" if args.dry_run else "no-op rerun"
    print(f"\n{what} of {args.configfile} vs a bare Snakefile; {args.runs} runs each "
          f"(after {args.warmup} warm-up), in turn")
    print(f"load average (1, 5, 15 min): before {load_before[0]:.2f} {load_before[1]:.2f} "
          f"{load_before[2]:.2f}, after {load_after[0]:.2f} {load_after[1]:.2f} "
          f"{load_after[2]:.2f}; {os.cpu_count()} CPUs\n")
    print("| seconds                |   median |      min |      max |")
    print("|------------------------|----------|----------|----------|")
    for name in walls:
        label = "ours --list-rules" if name == "parse" else name
        print(row(f"{label} wall", walls[name]))
        print(row(f"{label} CPU", cpus[name]))
    wall_ratio = statistics.median(walls["ours"]) / statistics.median(walls["bare"])
    cpu_ratio = statistics.median(cpus["ours"]) / statistics.median(cpus["bare"])
    ratios = [a / b for a, b in zip(walls["ours"], walls["bare"], strict=True)]
    paired = statistics.median(ratios)
    print(f"\nratio ours/bare: wall {wall_ratio:.2f}x (pairwise median {paired:.2f}x), "
          f"CPU {cpu_ratio:.2f}x")
    if len(ratios) >= 4:  # the spread of the pairs: how far one run's ratio is to trust
        low, _, high = statistics.quantiles(ratios, n=4)
        print(f"pairwise ratios: quartiles {low:.2f}x-{high:.2f}x, "
              f"range {min(ratios):.2f}x-{max(ratios):.2f}x over {len(ratios)} pairs")
    if args.breakdown:
        median = {name: statistics.median(values) for name, values in walls.items()}
        print(f"ours minus bare, wall medians: {median['ours'] - median['bare']:.3f} s = "
              f"parse and plan {median['parse'] - median['bare']:.3f} s "
              f"+ the DAG's jobs and checks {median['ours'] - median['parse']:.3f} s")


if __name__ == "__main__":
    main()
