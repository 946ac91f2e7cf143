"""The reference pass before and after the shared `ref_logps` rule, in one run.

Before, every align job with `precompute_ref_log_probs` ran its own reference pass
(TRL's precompute), so a stage-2 sweep of N siblings ran N identical passes; now one
`ref_logps` job per (parent, data, loss, reference settings) runs it and the align
jobs read the file. This script trains the align nodes of a config (their upstream
included) in two fresh copies of the workflow, the baseline commit's and this
tree's, one after the other on the same machine, and reads from the logs and
Snakemake's metadata:

- how many reference passes ran and how long they took (inside align jobs: TRL's
  progress bar "Computing reference log probs ... [mm:ss<"; as jobs: their wall time);
- the align jobs' summed wall time, and with the ref_logps jobs;
- for the paper config (a dry run of each copy): reference passes planned.

    python bench/ref_pass.py [--baseline COMMIT] [--configfile config/config.yaml]
                             [--cores 2] [--rounds 2] [--workdir DIR]

Wall times of jobs come from `.snakemake/metadata` (start and end of each output).
With --cores 2 two jobs can overlap, so the sums are job time, not elapsed time;
the elapsed time of the whole run is printed too. With --rounds N the two copies
run N times from empty results, alternating which goes first, and the table shows
per-round values (a shared machine's load moves single runs by 2x).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import commit_copy  # noqa: E402
from workcopy import fresh_copy  # noqa: E402

DEFAULT_BASELINE = "a3dcee9"  # the last commit before the ref_logps rule
TQDM = re.compile(r"Computing reference log probs for train dataset: 100%[^\[]*\[(\d+):(\d+)<")


def snakemake(work: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=work,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"snakemake {' '.join(args)} failed in {work}")
    return proc


def job_seconds(work: Path, output: str) -> float:
    """Wall time of the job that wrote `output`, from Snakemake's metadata."""
    name = base64.urlsafe_b64encode(output.encode()).decode()
    record = json.loads((work / ".snakemake" / "metadata" / name).read_text())
    return float(record["endtime"]) - float(record["starttime"])


def tqdm_seconds(log: Path) -> float | None:
    found = TQDM.findall(log.read_text(encoding="utf-8", errors="replace"))
    if not found:
        return None
    minutes, seconds = found[-1]
    return 60 * int(minutes) + int(seconds)


def measure(work: Path, config: str, cores: int) -> dict:
    cfg = yaml.safe_load((work / config).read_text())
    experiment, seed = cfg["experiment"], cfg.get("seed", 0)
    nodes = [n for n, spec in cfg["models"].items() if "parents" not in spec]
    seed_dir = f"results/{experiment}/seed-{seed}"
    targets = [f"{seed_dir}/models/{n}" for n in nodes]
    started = time.monotonic()
    snakemake(work, *targets, "--cores", str(cores), "--configfile", config)
    elapsed = time.monotonic() - started
    logs = work / "logs" / experiment / f"seed-{seed}"
    align = {n: job_seconds(work, f"{seed_dir}/models/{n}") for n in nodes}
    inside = {n: tqdm_seconds(logs / "align" / f"{n}.log") for n in nodes}
    ref_jobs = {}
    for path in sorted((work / seed_dir / "ref_logps").glob("*/*.json")):
        rel = str(path.relative_to(work))
        ref_jobs[rel] = job_seconds(work, rel)
    return {"align": align, "inside": inside, "ref_jobs": ref_jobs, "elapsed": elapsed}


def planned_passes(work: Path) -> dict[str, int]:
    """Reference passes the paper config plans: ref_logps jobs, or align jobs that
    precompute (all of them, in the paper's config)."""
    env_cmd = ["-n", "--configfile", "config/paper.yaml", "--quiet", "rules"]
    proc = subprocess.run([sys.executable, "-m", "snakemake", *env_cmd], cwd=work,
                          capture_output=True, text=True,
                          env={**os.environ, "OPENAI_API_KEY": "sk-dry-run"})
    counts = {}
    for line in (proc.stdout + proc.stderr).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] in ("align", "ref_logps"):
            counts[parts[0]] = int(parts[1])
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default=DEFAULT_BASELINE)
    parser.add_argument("--configfile", default="config/config.yaml")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--report", type=Path,
                        help="print the table of a finished run's ref_pass.json, run nothing")
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="sacpo-ref-pass-"))
    copies = {f"before ({args.baseline})": commit_copy(args.baseline, root / "before"),
              "after (this tree)": fresh_copy(root / "after")}
    rounds: dict[str, list[dict]] = {name: [] for name in copies}
    if args.report:
        saved = json.loads(args.report.read_text())
        report(saved["rounds"], saved["paper"], args)
        return
    for i in range(args.rounds):
        order = list(copies) if i % 2 == 0 else list(copies)[::-1]
        for name in order:
            work = copies[name]
            for folder in ("results", "logs", ".snakemake", "scratch"):
                shutil.rmtree(work / folder, ignore_errors=True)
            print(f"round {i + 1}/{args.rounds}, {name}: training the align nodes of "
                  f"{args.configfile} ...", file=sys.stderr)
            rounds[name].append(measure(work, args.configfile, args.cores))
            print(json.dumps(rounds[name][-1], indent=1), file=sys.stderr)
    paper = {name: planned_passes(work) for name, work in copies.items()}
    (root / "ref_pass.json").write_text(json.dumps({"rounds": rounds, "paper": paper}))

    report(rounds, paper, args)


def report(rounds: dict[str, list[dict]], paper: dict[str, dict[str, int]], args) -> None:
    copies = list(rounds)

    def per_round(name, fn, fmt="{:.1f}"):
        values = [fn(r) for r in rounds[name]]
        text = ", ".join(fmt.format(v) for v in values)
        return f"{text} (median {fmt.format(statistics.median_low(values))})" \
            if len(values) > 1 and len(set(values)) > 1 else \
            (fmt.format(values[0]) if len(set(values)) == 1 else text)

    def passes_inside(r):
        return sum(v or 0 for v in r["inside"].values())

    def job_sum(r):
        return sum(r["align"].values()) + sum(r["ref_jobs"].values())

    n_rounds = len(rounds[copies[0]])
    print(f"| {args.configfile}, --cores {args.cores}, {n_rounds} round(s) | "
          + " | ".join(copies) + " |")
    print("|---|" + "---|" * len(copies))

    def row(label, fn, fmt="{:.1f}"):
        print(f"| {label} | " + " | ".join(per_round(n, fn, fmt) for n in copies) + " |")

    row("align jobs", lambda r: len(r["align"]), "{:d}")
    row("reference passes run", lambda r: sum(v is not None for v in r["inside"].values())
        + len(r["ref_jobs"]), "{:d}")
    row("... inside align jobs (s, TRL's progress bar)", passes_inside, "{:.0f}")
    row("... as ref_logps jobs (s, job wall time)", lambda r: sum(r["ref_jobs"].values()))
    row("align jobs' wall time, summed (s)", lambda r: sum(r["align"].values()))
    row("align + ref_logps jobs, summed (s)", job_sum)
    row("elapsed, whole run up to the aligned models (s)", lambda r: r["elapsed"])
    print("| paper dry run: align jobs / reference passes planned | " + " | ".join(
        f"{p.get('align', 0)} / {p.get('ref_logps', p.get('align', 0))}"
        for p in paper.values()) + " |")
    before, after = (statistics.median(job_sum(r) for r in rounds[n]) for n in copies)
    print(f"| ratio after / before (median align + ref_logps job time) | | "
          f"{after / before:.3f} |")


if __name__ == "__main__":
    main()
