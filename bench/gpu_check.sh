#!/usr/bin/env bash
# GPU check: the reduced demo (tests/configs/reduced_demo.yaml) on one CUDA GPU with
# `training.bf16: true`, plus one QLoRA stage (`qlora_h`: DPO from SFT on helpfulness
# with `training.quantization: 4bit` and a LoRA adapter). Prints the device, each
# step's time, training and generation tokens/s and peak GPU memory, and whether the
# QLoRA stage changed the weights at all (on CPU its LoRA gradients came out zero).
#
#   bench/gpu_check.sh                 (PYTHON=... to pick the interpreter)
#
# Environment:
#   PYTHON              interpreter that has the project's packages (default: python)
#   SNAKEMAKE_ARGS      extra snakemake arguments (e.g. "--scheduler greedy" where pulp
#                       is not installed)
#   GPU_CHECK_ON_CPU=1  run the same script on a machine without a GPU (bf16 off, no
#                       QLoRA stage), to test the script itself; its numbers mean nothing
#
# After the demo, one align job (dpo_h) is rerun through `accelerate launch` with the
# FSDP config and one process: it cannot show multi-GPU speed, but it checks that the
# launcher, FSDP wrapping and the full-state-dict save work on a GPU.
#
# Self-contained: it copies the workflow into a fresh temporary folder (printed; kept
# for the logs), writes its own config there and runs snakemake there. Exits 2 at once
# when torch sees no CUDA device. The model is the demo's tiny Llama, so the numbers
# check that the GPU paths work; they are not a throughput benchmark.
#
# Where the numbers come from:
#   step time      wall time of each `python -m sacpo_steps` process (a sitecustomize
#                  probe put on PYTHONPATH records it at exit), imports included
#   train tok/s    TRL's cumulative `num_tokens` (last logged value) / `train_runtime`
#   gen tok/s      answer tokens (re-tokenised, after the cut at stop markers, so a lower
#                  bound of the tokens generated) / the step's own generation time
#   peak GPU mem   torch.cuda.max_memory_allocated / max_memory_reserved of each step
#                  (same probe), and the device's memory.used from nvidia-smi sampled
#                  every 200 ms (all processes, CUDA contexts included)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python}
ON_CPU=${GPU_CHECK_ON_CPU:-0}
export ON_CPU

# 1. Fail fast: a CUDA device, bf16, bitsandbytes.
"$PYTHON" - <<'EOF' || exit 2
import os
import sys

try:
    import torch
except ImportError as exc:
    sys.exit(f"gpu_check: cannot import torch ({exc})")
visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
if os.environ.get("ON_CPU") == "1":
    print(f"device: CPU (GPU_CHECK_ON_CPU=1: a test of the script; torch {torch.__version__})")
    sys.exit(0)
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: no CUDA device visible (torch {torch.__version__}, CUDA build: "
             f"{torch.version.cuda or 'none, a CPU build'}, CUDA_VISIBLE_DEVICES={visible}); "
             "nothing was run")
if not torch.cuda.is_bf16_supported():
    sys.exit(f"gpu_check: {torch.cuda.get_device_name(0)} does not support bf16")
try:
    import bitsandbytes  # noqa: F401  (the QLoRA stage needs it)
except Exception as exc:  # ImportError, or a bitsandbytes without CUDA support
    sys.exit(f"gpu_check: bitsandbytes unusable for the QLoRA stage ({exc})")
props = torch.cuda.get_device_properties(0)
print(f"device: {props.name}, {props.total_memory / 2**30:.1f} GiB, capability "
      f"{props.major}.{props.minor}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"bitsandbytes {bitsandbytes.__version__}; CUDA_VISIBLE_DEVICES={visible}")
EOF

# 2. A copy of the workflow and its config.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sacpo-gpu-check.XXXXXX")
echo "work folder: $WORK"
for part in Snakefile workflow config profiles sacpo_steps tests/configs environment.yml; do
    mkdir -p "$WORK/$(dirname "$part")"
    cp -r "$ROOT/$part" "$WORK/$part"
done
find "$WORK" -name __pycache__ -prune -exec rm -rf {} +

"$PYTHON" - "$WORK" <<'EOF'
import os
import sys
from pathlib import Path

import yaml

work = Path(sys.argv[1])
cfg = yaml.safe_load((work / "tests/configs/reduced_demo.yaml").read_text(encoding="utf-8"))
cfg["experiment"] = "gpu-check"
cfg["training"]["bf16"] = os.environ.get("ON_CPU") != "1"
if os.environ.get("ON_CPU") != "1":  # bitsandbytes' CPU 4-bit path fails on these shapes
    cfg["models"]["qlora_h"] = {
        "parent": "sft", "data": "helpfulness", "loss": "dpo", "beta": 0.1,
        "training": {"quantization": "4bit", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
    }
# One GPU per GPU-capable job; `--resources gpu=1` below runs them one at a time, so
# each step's time and memory are its own.
cfg["resources"] = {kind: {"gpu": 1, "cpus_per_gpu": 1}
                    for kind in ("sft_checkpoint", "align", "generate")}
(work / "gpu_check.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
EOF

# 3. The probe: each sacpo_steps process appends its wall time and CUDA peaks at exit.
mkdir -p "$WORK/probe"
cat >"$WORK/probe/sitecustomize.py" <<'EOF'
"""gpu_check probe: at exit, a sacpo_steps process appends its wall time and CUDA use."""
import atexit
import json
import os
import sys
import time

_STARTED = time.monotonic()


def _report():
    args = sys.argv[1:]
    if "sacpo_steps" not in (sys.argv[0] if sys.argv else "") or "--out" not in args[:-1]:
        return  # not a step (snakemake itself, a --help)
    out = args[args.index("--out") + 1]
    record = {"step": args[0] if args else "?", "out": out,
              "wall_s": round(time.monotonic() - _STARTED, 2), "cuda": False}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        record.update(cuda=True, device=torch.cuda.get_device_name(0),
                      peak_allocated_mib=round(torch.cuda.max_memory_allocated() / 2**20, 1),
                      peak_reserved_mib=round(torch.cuda.max_memory_reserved() / 2**20, 1))
    with open(os.environ["SACPO_GPU_PROBE"], "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


atexit.register(_report)
EOF
export PYTHONPATH="$WORK/probe${PYTHONPATH:+:$PYTHONPATH}"
export SACPO_GPU_PROBE="$WORK/probe/steps.jsonl"

SMI_PID=""
stop_smi() { if [[ -n $SMI_PID ]]; then kill "$SMI_PID" 2>/dev/null || true; fi; }
trap stop_smi EXIT
if command -v nvidia-smi >/dev/null; then
    gpu=${CUDA_VISIBLE_DEVICES:-0}
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 \
        -i "${gpu%%,*}" >"$WORK/probe/nvidia-smi.csv" 2>/dev/null &
    SMI_PID=$!
fi

# 4. The run.
started=$SECONDS
set +e
# shellcheck disable=SC2086  # SNAKEMAKE_ARGS is a list of words
(cd "$WORK" && "$PYTHON" -m snakemake --cores "$(nproc)" --resources gpu=1 -p --keep-going \
    --configfile gpu_check.yaml ${SNAKEMAKE_ARGS:-} >"$WORK/snakemake.log" 2>&1)
rc=$?
set -e
wall=$((SECONDS - started))
stop_smi
SMI_PID=""
if ((rc != 0)); then
    echo "gpu_check: snakemake failed (exit $rc) after ${wall}s; last lines of $WORK/snakemake.log:"
    tail -n 40 "$WORK/snakemake.log"
fi
echo "snakemake: ${wall}s wall, exit $rc"

# 5. dpo_h again, through `accelerate launch` with the FSDP config (one process): the
# command snakemake printed (-p), with the launcher, output and scratch folder swapped.
FSDP_RC=-
align_cmd=$(grep -m1 -E "python -m sacpo_steps align .*--out results/models/dpo_h " \
    "$WORK/snakemake.log" || true)
align_cmd=${align_cmd#*Shell command: }
if [[ $ON_CPU == 1 ]]; then
    echo "fsdp launch: skipped on CPU"
elif [[ -z $align_cmd ]]; then
    echo "fsdp launch: skipped (no dpo_h align command in the snakemake log)"
else
    fsdp_cmd=${align_cmd/python -m sacpo_steps/accelerate launch --num_processes 1 --config_file config\/accelerate\/fsdp.yaml -m sacpo_steps}
    fsdp_cmd=${fsdp_cmd/--out results\/models\/dpo_h /--out fsdp_check\/dpo_h }
    fsdp_cmd=$(sed -E 's#--checkpoint-dir [^ ]+#--checkpoint-dir fsdp_check/scratch#; s# > logs/[^ ]+ 2>&1# > fsdp_check/align.log 2>\&1#' <<<"$fsdp_cmd")
    mkdir -p "$WORK/fsdp_check"
    started=$SECONDS
    set +e
    (cd "$WORK" && PATH="$(dirname "$(command -v "$PYTHON")"):$PATH" bash -c "$fsdp_cmd")
    FSDP_RC=$?
    set -e
    echo "fsdp launch: exit $FSDP_RC after $((SECONDS - started))s (log: $WORK/fsdp_check/align.log)"
    if ((FSDP_RC != 0)); then tail -n 30 "$WORK/fsdp_check/align.log"; fi
fi

# 6. The report (also for a failed run: whatever finished).
"$PYTHON" - "$WORK" <<'EOF'
import json
import re
import sys
from pathlib import Path

work = Path(sys.argv[1])
probe = work / "probe" / "steps.jsonl"
records = [json.loads(line) for line in probe.read_text().splitlines()] if probe.exists() else []
records = [r for r in records if r.get("out")]


def last(pattern, text):
    found = re.findall(pattern, text)
    return float(found[-1]) if found else None


def train_stats(log):
    """TRL's train_runtime and last cumulative num_tokens from a step's log."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return (last(r"'train_runtime': '([\d.]+)'", text),
            last(r"'num_tokens': '([\d.e+]+)'", text))


def gen_stats(out):
    """Answer tokens and the step's own time ("... written to X (N s)") of one generation."""
    path = work / out
    model, prompt_set = path.parent.name, path.stem
    log = work / "logs" / "generate" / model / f"{prompt_set}.log"
    seconds = last(r"written to .* \(([\d.]+) s\)", log.read_text()) if log.exists() else None
    if not path.exists() or not (work / "results" / "models" / model).is_dir():
        return None, seconds
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "results" / "models" / model)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sum(len(tok(r["answer"], add_special_tokens=False)["input_ids"]) for r in rows), seconds


def fmt(value, spec):
    return format(value, spec) if value is not None else "-"


print()
print(f"{'step':<44} {'device':<6} {'wall s':>7} {'run s':>7} {'tok/s':>9} "
      f"{'peak alloc MiB':>15} {'peak resv MiB':>14}")
for r in records:
    name = f"{r['step']} {r['out'].removeprefix('results/')}"
    run_s = tok_s = None
    if r["step"] in ("align", "sft_checkpoint"):
        if r["step"] == "align" and r["out"].startswith("fsdp_check/"):
            log = work / "fsdp_check" / "align.log"
        elif r["step"] == "align":
            log = work / "logs" / "align" / f"{Path(r['out']).name}.log"
        else:
            log = next((work / "logs" / "sft_checkpoint").glob("*.log"), Path("-"))
        run_s, tokens = train_stats(log)
        if run_s and tokens:
            tok_s = tokens / run_s
    elif r["step"] == "generate":
        tokens, run_s = gen_stats(r["out"])
        if run_s and tokens:
            tok_s = tokens / run_s
    print(f"{name[:44]:<44} {'cuda' if r['cuda'] else 'cpu':<6} {r['wall_s']:>7.1f} "
          f"{fmt(run_s, '7.2f'):>7} {fmt(tok_s, '9.0f'):>9} "
          f"{fmt(r.get('peak_allocated_mib'), '15.1f'):>15} "
          f"{fmt(r.get('peak_reserved_mib'), '14.1f'):>14}")
print("run s: align/sft = TRL train_runtime (tok/s over TRL's num_tokens); generate = the "
      "step's own time incl. model load (tok/s over answer tokens, a lower bound)")

smi = work / "probe" / "nvidia-smi.csv"
if smi.exists():
    used = [int(v) for v in smi.read_text().split() if v.strip().isdigit()]
    if used:
        print(f"nvidia-smi memory.used: peak {max(used)} MiB, idle {min(used)} MiB "
              f"({len(used)} samples, all processes on the device)")

for model, folder in (("dpo_h", "results/models/dpo_h"), ("qlora_h", "results/models/qlora_h"),
                      ("dpo_h via fsdp launch", "fsdp_check/dpo_h")):
    card = work / folder / "sacpo.json"
    if card.exists():
        t = json.loads(card.read_text())["training"]
        print(f"{model}: bf16={t['bf16']} quantization={t['quantization']} steps={t['steps']} "
              f"train_runtime_s={t['train_runtime_s']} loss {t['first_loss']} -> "
              f"{t['final_loss']}")
qlora, sft = work / "results/models/qlora_h", work / "results/models/sft"
if qlora.exists() and sft.exists():
    from safetensors.torch import load_file

    def weights(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    a, b = weights(qlora), weights(sft)
    diff = max(((a[k].float() - b[k].float()).abs().max().item() for k in a.keys() & b.keys()
                if a[k].shape == b[k].shape), default=float("nan"))
    print(f"QLoRA stage: max |qlora_h - sft| over the weights = {diff:.3g} "
          f"({'changed' if diff > 0 else 'UNCHANGED: zero LoRA update'})")
if (work / "results/tables/winrate.md").exists():
    print()
    print((work / "results/tables/winrate.md").read_text())
EOF
if [[ $FSDP_RC != - && $FSDP_RC != 0 ]]; then exit "$FSDP_RC"; fi
exit "$rc"
