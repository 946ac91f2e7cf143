"""An align job's start-up against the floor of importing TRL's trainer, in one run.

Start-up is what a job spends before its first training step: interpreter and
imports, reading and rendering the rows, loading the model, TRL's tokenisation and
reference pass. The floor is the part no pipeline can avoid: a bare process that
imports TRL's DPOTrainer. Both are measured here, interleaved, on the demo-sized
model (random weights) with the demo's settings, in four variants:

- floor: `python -c "from trl import DPOTrainer"`;
- floor without PEFT and bitsandbytes (what a step process that uses neither
  imports now, see `align.skip_unused_imports`);
- the align step as it runs in a job (`python -m sacpo_steps align`), to its first
  training step (the step logs "startup: first training step X s after process start");
- the same with PEFT and bitsandbytes imported first, i.e. as before the change.

    python bench/align_startup.py [--repeat 5] [--workdir DIR]

Medians over the rounds; the machine is shared, so only the columns of one run
compare. The align runs use one torch thread and stop after 2 steps.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from align_vs_trl import ROOT, demo_case  # noqa: E402
from demo import run as wall  # noqa: E402  (wall time of a command that must succeed)

FIRST_STEP = re.compile(r"startup: first training step ([0-9.]+) s after process start")
# sacpo_steps first: its import is the step's "process start" the log line counts from
IMPORT_FIRST = "import sacpo_steps, peft, bitsandbytes; "


def align_startup(case, work: Path, *, import_first: bool, i: int) -> float:
    out = work / f"model-{int(import_first)}-{i}"
    log = work / f"align-{int(import_first)}-{i}.log"
    spec = {"name": "bench", "parent": "demo", "data": "bench", "loss": "dpo", "beta": 0.1,
            "training": {**case.training, "max_steps": 2, "logging_steps": 1},
            "prompt_template": case.template, "seed": case.seed}
    code = (IMPORT_FIRST if import_first else "") + \
        "import sys; from sacpo_steps.__main__ import main; main(sys.argv[1:])"
    subprocess.run([sys.executable, "-c", code, "align", "--parent-dir", str(case.model_dir),
                    "--data", str(case.data), "--out", str(out), "--spec", json.dumps(spec),
                    "--threads", "1", "--log", str(log)],
                   check=True, capture_output=True, cwd=ROOT)
    found = FIRST_STEP.search(log.read_text(encoding="utf-8"))
    if not found:
        raise SystemExit(f"no start-up line in {log}")
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="sacpo-startup-"))
    work.mkdir(parents=True, exist_ok=True)
    case = demo_case(work, steps=4, batch=32)
    py = sys.executable
    hide = "import sys; sys.modules['peft'] = sys.modules['bitsandbytes'] = None; "
    variants = {
        "floor: import TRL's DPOTrainer": lambda i: wall(
            [py, "-c", "from trl import DPOTrainer"]),
        "floor, PEFT and bitsandbytes not imported": lambda i: wall(
            [py, "-c", hide + "from trl import DPOTrainer"]),
        "align step to its first training step (now)": lambda i: align_startup(
            case, work, import_first=False, i=i),
        "align step, PEFT and bitsandbytes imported (before)": lambda i: align_startup(
            case, work, import_first=True, i=i),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.repeat):
        for name, measure in variants.items():
            times[name].append(measure(i))
            print(f"round {i + 1}/{args.repeat} {name}: {times[name][-1]:.2f} s",
                  file=sys.stderr)
    medians = {name: statistics.median(v) for name, v in times.items()}
    floor = medians["floor: import TRL's DPOTrainer"]
    print(f"| start-up, {args.repeat} rounds interleaved | median s | runs (s) | x floor |")
    print("|---|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {medians[name]:.2f} | {', '.join(f'{v:.2f}' for v in values)} | "
              f"{medians[name] / floor:.2f} |")


if __name__ == "__main__":
    main()
