"""Time the merge step against mergekit and against the I/O floor, on a 271M Llama.

Two random float32 Llama models (hidden 1024, intermediate 2816, 16 layers, vocab
32000, untied embeddings), each saved in 4 shards of about 300 MB, are merged at
q = 0.25, 0.5, 0.75 by (1) our step, in one process; (2) mergekit, one
`mergekit-yaml` run per q (when installed); (3) the I/O floor: a script that reads
both parents once and writes three outputs of the same size. Usage:

    python bench/merge.py [--workdir DIR] [--keep] [--no-mergekit] [--repeat N]

The page cache cannot be dropped here: every method runs after a warm-up read of
the parents, so all see warm caches. With --repeat N the methods run in N
interleaved rounds and the table shows the median wall time (on a shared machine
one run can be off by 2x). Wall time and peak RSS come from
`/usr/bin/time -v` when present (else getrusage of the child); `sync` runs between
methods so one method's write-back does not land in the next one's time.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QS = (0.25, 0.5, 0.75)
SHARD_SIZE = "300MB"
GNU_TIME = Path("/usr/bin/time")
NEEDED_BYTES = (2 + 3) * 1.1e9 + 1e9  # two parents, three outputs, some margin

FLOOR_SCRIPT = r"""
import sys
from pathlib import Path

a, b, outs = Path(sys.argv[1]), Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]]
block = 16 << 20
buf_a, buf_b = bytearray(block), bytearray(block)
for out in outs:
    out.mkdir(parents=True)
for shard in sorted(a.glob("*.safetensors")):
    files = [open(out / shard.name, "wb") for out in outs]
    with open(shard, "rb") as fa, open(b / shard.name, "rb") as fb:
        while n := fa.readinto(buf_a):
            fb.readinto(buf_b)
            for f in files:
                f.write(memoryview(buf_a)[:n])
    for f in files:
        f.close()
"""


def make_model(out: Path, seed: int) -> None:
    """A random Llama saved by transformers itself, so the shard layout is the real one."""
    if (out / "model.safetensors.index.json").is_file():
        print(f"reusing {out}", file=sys.stderr)
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sacpo_steps.models.sft_checkpoint import train_tokenizer

    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                         num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=SHARD_SIZE)
    del model
    # check_model_dir wants a tokenizer; its size does not matter to the merge
    train_tokenizer(["a tokenizer for the merge benchmark"] * 4, vocab_size=300).save_pretrained(
        tmp)
    tmp.rename(out)


def measure(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one command, in a fresh child process."""
    if GNU_TIME.exists():
        cmd = [str(GNU_TIME), "-v", *cmd]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if found:
        rss_kib = int(found.group(1))
    else:  # kilobytes on Linux; the largest child so far, hence one fresh child per method
        rss_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, rss_kib / 1024


def warm_up(folders: list[Path]) -> None:
    """Read every parent file once, so every method starts from the same warm cache."""
    buf = bytearray(16 << 20)
    for folder in folders:
        for f in sorted(folder.iterdir()):
            with open(f, "rb") as fh:
                while fh.readinto(buf):
                    pass


def clean(paths: list[Path]) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)
    os.sync()


def run_ours(a: Path, b: Path, work: Path) -> tuple[float, float]:
    outs = [work / f"ours_q{q}" for q in QS]
    cmd = [sys.executable, "-m", "sacpo_steps", "merge", "--a", str(a), "--b", str(b)]
    for q, out in zip(QS, outs, strict=True):
        cmd += ["--q", str(q), "--out", str(out)]
    result = measure(cmd)
    clean(outs)
    return result


def run_import_torch(a: Path, b: Path, work: Path) -> tuple[float, float]:
    """What ours pays before reading a byte and the floor script does not."""
    return measure([sys.executable, "-c", "import torch, safetensors"])


def run_mergekit(a: Path, b: Path, work: Path) -> tuple[float, float]:
    wall, rss, outs = 0.0, 0.0, []
    for q in QS:
        config = work / f"mergekit_q{q}.yml"
        config.write_text(
            "merge_method: linear\ndtype: float32\nparameters:\n  normalize: false\n"
            f"models:\n  - model: {a}\n    parameters:\n      weight: {1 - q}\n"
            f"  - model: {b}\n    parameters:\n      weight: {q}\n", encoding="utf-8")
        out = work / f"mergekit_q{q}"
        outs.append(out)
        w, r = measure([shutil.which("mergekit-yaml") or "mergekit-yaml", str(config), str(out)])
        wall, rss = wall + w, max(rss, r)
    clean(outs)
    return wall, rss


def run_floor(a: Path, b: Path, work: Path) -> tuple[float, float]:
    outs = [work / f"floor_{i}" for i in range(len(QS))]
    script = work / "floor.py"
    script.write_text(FLOOR_SCRIPT, encoding="utf-8")
    result = measure([sys.executable, str(script), str(a), str(b), *map(str, outs)])
    clean(outs)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where the models live (reused if present); "
                        "default: a new temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the parent models")
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of all methods")
    args = parser.parse_args()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    print(f"workdir {work}: {free / 1e9:.1f} GB free", file=sys.stderr)
    if free < NEEDED_BYTES:
        raise SystemExit(f"need about {NEEDED_BYTES / 1e9:.0f} GB free in {work}")
    a, b = work / "parent_a", work / "parent_b"
    try:
        for folder, seed in ((a, 0), (b, 1)):
            started = time.monotonic()
            make_model(folder, seed)
            print(f"{folder.name}: ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
        largest = max(f.stat().st_size for f in a.glob("*.safetensors")) / 2**20
        os.sync()  # write-back of freshly made parents must not land in the first method
        warm_up([a, b])
        methods = {"I/O floor (read 2, write 3)": run_floor,
                   "ours (one process, 3 q)": run_ours,
                   "(start-up share: python -c 'import torch')": run_import_torch}
        if args.no_mergekit:
            pass
        elif shutil.which("mergekit-yaml"):
            methods["mergekit 3 x mergekit-yaml"] = run_mergekit
        else:
            print("mergekit-yaml not found: skipping mergekit", file=sys.stderr)
        runs: dict[str, list[tuple[float, float]]] = {label: [] for label in methods}
        for round_ in range(1, args.repeat + 1):
            for label, method in methods.items():
                print(f"round {round_}: {label} ...", file=sys.stderr)
                runs[label].append(method(a, b, work))
        results = {label: (statistics.median(w for w, _ in r), max(m for _, m in r),
                           min(w for w, _ in r), max(w for w, _ in r))
                   for label, r in runs.items()}
        floor = results["I/O floor (read 2, write 3)"][0]
        print(f"\nparents: 2 x {len(list(a.glob('*.safetensors')))} shards, largest shard "
              f"{largest:.0f} MiB; {os.cpu_count()} CPUs; warm page cache; "
              f"{args.repeat} round(s), median wall\n")
        print("| method | wall s | peak RSS MiB | wall / floor | RSS / largest shard | "
              "wall min-max s |")
        print("|---|---:|---:|---:|---:|---:|")
        for label, (wall, rss, low, high) in results.items():
            print(f"| {label} | {wall:.1f} | {rss:,.0f} | {wall / floor:.2f} | "
                  f"{rss / largest:.2f} | {low:.1f}-{high:.1f} |")
        wall, rss = results["ours (one process, 3 q)"][:2]
        print(f"\ngoal wall <= 1.3 x floor: {'met' if wall <= 1.3 * floor else 'NOT met'} "
              f"({wall / floor:.2f} x)")
        print(f"goal peak RSS <= 1.5 x largest shard: "
              f"{'met' if rss <= 1.5 * largest else 'NOT met'} ({rss / largest:.2f} x)")
    finally:
        if not args.keep:
            for p in (a, b):
                shutil.rmtree(p, ignore_errors=True)
            if not args.workdir:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
