"""The align step against a bare TRL DPOTrainer script: same model, data, settings, steps.

Why: `python -m sacpo_steps align` wraps TRL's `DPOTrainer` (row rendering, a dataset
folder on disk, a checkpoint folder, a model card, an atomic model folder). This
measures what the wrapper costs against the script a user would write by hand:
`DPOConfig` + `DPOTrainer` on the same rows. Usage:

    python bench/align_vs_trl.py [--repeat 3] [--steps 10] [--threads N] [--out FILE]
    python bench/align_vs_trl.py --gpu [--budget-s 480]   (default when CUDA is visible)
    python bench/align_vs_trl.py --self-test              (fast CPU check; exit 1 on failure)

Both sides run as subprocesses of this script, several rounds interleaved (ours first
in odd rounds, bare first in even ones), after one unmeasured `import trl`; the tables
show medians. Ours is `python -m sacpo_steps align` as the workflow rule runs it
(--checkpoint-dir, --threads; no --ref-logps, so TRL's own reference pass runs on both
sides) under a probe that only observes: `Trainer.train`'s result and log, each
optimizer step's wall time (a callback), each `generate` call's time, peak memory at
exit; it patches transformers when transformers is first imported, so it imports
nothing early (the align step keeps PEFT and bitsandbytes out of a non-LoRA process;
the bare script imports them, as TRL does). The bare side is a standalone script
written into the work folder: it loads the parent with the same dtype ("auto") and the
attention implementation the parent resolves to, passes the same TRL settings (beta,
lr, batch, accumulation, max_length, max_steps, scheduler, warm-up, precomputed
reference log-probs, seed, bf16, gradient checkpointing, logging), sets the same torch
threads (and one inter-op thread, as `set_threads` does), trains on the rows ours
renders (`align.load_examples`, same order) and saves the model. The probe reports
each side's attention, dtype and threads, and the two must match; with the same seed
the two trainings are the same computation (equal losses).

Numbers, same formula on both sides:
- wall s: the whole process (interpreter start to exit, model saved);
- train loop s: TRL's `train_runtime` (the reference pass is before it, in the
  trainer's constructor);
- tokens/s: training tokens / train loop s. Training tokens are counted from the
  tokenized rows as TRL builds them: per pair, min(len(prompt+chosen+EOS), max_length)
  + the same for rejected (non-padding tokens of the batches); every row is seen exactly
  once (rows = steps x batch x accumulation). TRL's own logged `num_tokens` (sum of the
  attention masks) must equal it;
- samples/s: pairs / train loop s;
- step s: median optimizer step; its ratio is the median of paired ratios (step k of
  round i is the same batch on both sides). "Best of rounds" sums each step's fastest
  round: other processes' load only adds time, so on a shared machine this is the
  least disturbed comparison of the loops;
- GPU: MFU = (6 N + 12 L H S) x tokens/s / peak dense bf16 FLOPS, N = parameters
  without the input embedding (LM head included), L layers, H hidden size, S mean
  sequence length; peak by device name (H100, H200 989e12; A100 312e12; others: n/a).
  Peak GB = torch.cuda.max_memory_allocated of the process.

CPU mode (no CUDA): the demo's model size (config/config.yaml `sft.build`) with random
weights, the demo's tokenizer trained on demo-world rows, the demo's `training`
settings and align threads (`threads.align`), float32. About 3 minutes with
--repeat 3 on 2 cores.

GPU mode (--gpu, fits about 8 minutes; --budget-s): (1) a 1B Llama (hidden 2048, 16
layers, intermediate 5632, 32 heads, vocab 32000) from config, random bf16 weights,
synthetic rows of 128 prompt + 384 completion tokens (single-token words), bf16, batch
16, gradient checkpointing; ours vs bare. (2) Generation tokens/s of the generate step
against bare `model.generate` on the same 128-token prompts (greedy, same batches;
new tokens = generated positions, the same on both sides). (3) Peak memory of a
7B-shaped model (hidden 4096, 32 layers, intermediate 11008) doing 3 DPO steps (batch
4) through the align step with `training.lora` (bf16 base) and with
`training.quantization: 4bit` (QLoRA); ours only, merged-model save included in wall.
Nothing is downloaded. The results file (--out, default
results/bench/align_vs_trl.json, plus the Markdown next to it as .md) is rewritten
after every measurement, so a run that is cut off still reports.

--self-test (about 45 s): the CPU comparison at 2 steps (1 round), the generation
comparison and one LoRA run of the align step (the 7B runs' path; QLoRA needs a GPU) on
the demo model, and the GPU mode's CPU-runnable parts (a bf16 Llama built from config
at a small size, fixed token lengths of the synthetic rows, the 1B and 7B parameter
counts on the meta device, the MFU formula); exits 1 if a side fails, a number is not
finite, or a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "results" / "bench" / "align_vs_trl.json"
GOAL = 0.95  # ours must reach this fraction of bare TRL's training tokens/s

SHAPE_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
            "max_position_embeddings": 2048}
SHAPE_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
            "max_position_embeddings": 2048}
#: a small shape of the same family, for the self-test of the GPU paths on CPU
SHAPE_TINY = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 32000,
              "max_position_embeddings": 128}

#: TRL settings both sides pass under the same names (the align step's PASSED_AS_IS)
SHARED_KEYS = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
               "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "max_length",
               "precompute_ref_log_probs", "precompute_ref_batch_size", "bf16",
               "gradient_checkpointing", "logging_steps")

#: what the probe says about each side's model and process (the first four must match)
FACTS = ("attn_implementation", "dtype", "threads", "interop_threads", "peft_imported",
         "bitsandbytes_imported")

# ---- the code the two sides run (written into the work folder) -------------------------

PROBE = r'''"""What each side of bench/align_vs_trl.py records about itself (observation only).

The trainer's result and log after `train`, the wall time of each optimizer step, the
time and new tokens of each `generate` call, the peak memory at exit; written as JSON
to the report file at exit. The patches are applied when transformers' own module is
first imported (`after_import`), so the probe imports nothing the step would not.
"""
import atexit
import importlib.abc
import importlib.util
import json
import resource
import sys
import time

REPORT = {"generate_s": 0.0, "new_tokens": 0, "generate_calls": 0, "step_s": []}
PATH = []


def start(path):
    PATH.append(path)
    atexit.register(_write, path)


def after_import(name, hook):
    """Call hook(module) right after module `name` is first imported."""

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            if spec is None or spec.loader is None:
                return spec
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                hook(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Finder())


def _cuda():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch
    return None


def _sync():
    torch = _cuda()
    if torch is not None:
        torch.cuda.synchronize()


def _model_facts(model):
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"attn_implementation": getattr(base.config, "_attn_implementation", None),
            "dtype": str(base.dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "peft_imported": "peft" in sys.modules and sys.modules["peft"] is not None,
            "bitsandbytes_imported": sys.modules.get("bitsandbytes") is not None}


def watch_steps(trainer):
    """Record the wall time of every optimizer step (a callback; it only reads the clock)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        began = None

        def on_step_begin(self, args, state, control, **kwargs):
            _sync()
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync()
            REPORT["step_s"].append(time.perf_counter() - self.began)

    trainer.add_callback(StepTimer())


def observe_train(trainer, result):
    logs = trainer.state.log_history
    tokens = [e["num_tokens"] for e in logs if "num_tokens" in e]
    losses = [e["loss"] for e in logs if "loss" in e]
    REPORT.update(train_runtime=result.metrics.get("train_runtime"),
                  steps=trainer.state.global_step,
                  num_tokens_logged=tokens[-1] if tokens else None,
                  first_loss=losses[0] if losses else None,
                  final_loss=losses[-1] if losses else None,
                  **_model_facts(trainer.model))
    _write(PATH[0])  # now too: a process killed while saving still reports its training


def _patch_trainer(module):
    original = module.Trainer.train

    def train(self, *args, **kwargs):
        watch_steps(self)
        result = original(self, *args, **kwargs)
        observe_train(self, result)
        return result

    module.Trainer.train = train


def _patch_generation(module):
    original = module.GenerationMixin.generate

    def generate(self, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        _sync()
        started = time.perf_counter()
        out = original(self, *args, **kwargs)
        _sync()
        REPORT["generate_s"] += time.perf_counter() - started
        seqs = getattr(out, "sequences", out)
        REPORT["new_tokens"] += int(seqs.shape[0] * (seqs.shape[1] - ids.shape[1]))
        REPORT["generate_calls"] += 1
        REPORT.update(_model_facts(self))
        return out

    module.GenerationMixin.generate = generate


def patch_train():
    after_import("transformers.trainer", _patch_trainer)


def patch_generate():
    after_import("transformers.generation.utils", _patch_generation)
def _write(path):
    REPORT["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch = _cuda()
    if torch is not None:
        REPORT["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        REPORT["peak_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved()
        REPORT["device"] = torch.cuda.get_device_name()
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(REPORT, fh)
'''

OURS_RUNNER = r'''"""`python -m sacpo_steps <step> ...` under the bench's probe (observes only)."""
import runpy
import sys

import bench_probe

report, what, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
bench_probe.start(report)
if what == "train":
    bench_probe.patch_train()
elif what == "generate":
    bench_probe.patch_generate()
sys.argv = ["sacpo_steps", *argv]
runpy.run_module("sacpo_steps", run_name="__main__", alter_sys=True)
'''

BARE_DPO = r'''"""A bare TRL DPO run: DPOConfig + DPOTrainer on the given rows; the model saved."""
import json
import sys

import bench_probe

job = json.load(open(sys.argv[1], encoding="utf-8"))
bench_probe.start(job["report"])

import torch  # noqa: E402

if job["threads"]:
    torch.set_num_threads(job["threads"])
    torch.set_num_interop_threads(1)
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype="auto",
                                             attn_implementation=job["attn_implementation"])
with open(job["examples"], encoding="utf-8") as fh:
    examples = [json.loads(line) for line in fh]
args = DPOConfig(output_dir=job["out"] + "/.trainer", **job["config"])
trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples),
                     processing_class=tokenizer)
bench_probe.watch_steps(trainer)
result = trainer.train()
bench_probe.observe_train(trainer, result)
trainer.save_model(job["out"])
tokenizer.save_pretrained(job["out"])
'''

BARE_GENERATE = r'''"""Bare greedy generation: model.generate, left-padded, longest first."""
import json
import sys

import bench_probe

job = json.load(open(sys.argv[1], encoding="utf-8"))
bench_probe.start(job["report"])
bench_probe.patch_generate()  # times each generate call, as on the other side

import torch  # noqa: E402

if job["threads"]:
    torch.set_num_threads(job["threads"])
    torch.set_num_interop_threads(1)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
with open(job["prompts"], encoding="utf-8") as fh:
    prompts = [json.loads(line) for line in fh]
encoded = [tokenizer(text=job["template"].format(prompt=p["prompt"]))["input_ids"]
           for p in prompts]
device = "cuda" if torch.cuda.is_available() else "cpu"
model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype="auto",
                                             attn_implementation=job["attn_implementation"])
model = model.to(device).eval()
order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
size = job["batch_size"]
answers = {}
for batch in [order[i:i + size] for i in range(0, len(order), size)]:
    width = max(len(encoded[i]) for i in batch)
    ids = [[pad] * (width - len(encoded[i])) + encoded[i] for i in batch]
    mask = [[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in batch]
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor(ids, device=device),
                             attention_mask=torch.tensor(mask, device=device),
                             do_sample=False, max_new_tokens=job["max_new_tokens"],
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    for i, tokens in zip(batch, out[:, width:]):
        answers[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
with open(job["out"], "w", encoding="utf-8") as fh:
    for i, p in enumerate(prompts):
        fh.write(json.dumps({"prompt_id": p["prompt_id"], "answer": answers[i]}) + "\n")
'''


# ---- cases: a parent model, its rows, the settings ---------------------------------------

@dataclass
class Case:
    """One training comparison: the parent folder, the rows and the settings of both sides."""

    name: str
    model_dir: Path
    data: Path  # raw rows (prompt/chosen/rejected) for the align step
    examples: Path  # the same rows rendered by align.load_examples, for the bare script
    template: str
    training: dict[str, Any]  # the full training section (schema defaults filled in)
    beta: float
    seed: int
    pairs: int  # rows = steps x batch x accumulation: each seen once
    tokens: int  # training tokens of those rows (see the module docstring)
    attn_implementation: str
    flop_params: int = 0  # parameters without the input embedding (MFU)
    layers: int = 0
    hidden: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def mean_seq_len(self) -> float:
        return self.tokens / (2 * self.pairs)


def resolved_attention(model_dir: Path) -> str:
    """The attention implementation `from_pretrained(model_dir, dtype="auto")` picks.

    Built on the meta device (no weights): the same resolution as the align step's load.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model.config._attn_implementation


def flop_params(model) -> int:
    """Parameters that cost FLOPs per token (the project's count, as in sacpo.json)."""
    from sacpo_steps.models.throughput import flop_parameters

    return flop_parameters(model)


def meta_param_counts(shape: dict[str, Any]) -> tuple[int, int]:
    """(all parameters, FLOP parameters) of a Llama of `shape`, built on the meta device."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **shape))
    return sum(p.numel() for p in model.parameters()), flop_params(model)


def flops_per_token(n_params: int, layers: int, hidden: int, seq_len: float) -> float:
    """Training FLOPs per token, by the formula the align step's MFU uses."""
    from sacpo_steps.models.throughput import training_flops_per_token

    return training_flops_per_token({"parameters": n_params, "layers": layers,
                                     "hidden": hidden}, seq_len)


def peak_flops(device_name: str | None) -> float | None:
    from sacpo_steps.models.throughput import peak_flops as gpu_peak

    return gpu_peak(device_name)


def mfu(tokens_per_s: float, case: Case, device_name: str | None) -> float | None:
    peak = peak_flops(device_name)
    if peak is None or not case.flop_params:
        return None
    return flops_per_token(case.flop_params, case.layers, case.hidden,
                           case.mean_seq_len) * tokens_per_s / peak


def build_llama(out: Path, tokenizer, shape: dict[str, Any], *, seed: int, dtype: str,
                device: str) -> tuple[int, int]:
    """A random Llama of `shape` saved as a parent folder (weights, tokenizer, card).

    Built on `device` (a 7B model initialises in seconds on a GPU), then cast to `dtype`.
    Returns (all parameters, FLOP parameters).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sacpo_steps.models.folders import write_model_card

    shape = dict(shape)
    shape["vocab_size"] = max(shape.get("vocab_size", 0), len(tokenizer))
    config = LlamaConfig(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, **shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.config.dtype = getattr(torch, dtype)  # what from_pretrained(dtype="auto") reads
    counts = sum(p.numel() for p in model.parameters()), flop_params(model)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    tokenizer.save_pretrained(tmp)
    write_model_card(tmp, {"name": out.name, "method": "random (benchmark)", "lineage": []})
    tmp.rename(out)
    return counts


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def training_tokens(tokenizer, examples: list[dict[str, Any]], max_length: int) -> int:
    """Non-padding tokens of the batches, counted as TRL tokenizes and truncates a row.

    TRL appends EOS to a text completion and splits prompt/completion where the ids of
    prompt and prompt+completion diverge, so len(prompt_ids) + len(chosen_ids) is the
    length of prompt+chosen+EOS; the collator keeps the first max_length ids.
    """
    eos = tokenizer.eos_token
    total = 0
    for ex in examples:
        for key in ("chosen", "rejected"):
            text = ex[key] if ex[key].endswith(eos) else ex[key] + eos
            total += min(len(tokenizer(text=ex["prompt"] + text)["input_ids"]), max_length)
    return total


def make_case(name: str, work: Path, model_dir: Path, rows: list[dict[str, Any]], template: str,
              training: dict[str, Any], *, beta: float, seed: int) -> Case:
    """Write the rows, render them as the align step does, count their tokens."""
    from dataclasses import asdict

    from transformers import AutoTokenizer

    from sacpo_steps.training.settings import TrainingConfig
    from sacpo_steps.training.trainer import load_examples

    full = asdict(TrainingConfig.from_dict(training))
    per_step = full["per_device_train_batch_size"] * full["gradient_accumulation_steps"]
    if len(rows) != full["max_steps"] * per_step:
        raise SystemExit(f"{name}: {len(rows)} rows, but steps x batch x accumulation = "
                         f"{full['max_steps'] * per_step}")
    data = write_rows(work / f"{name}-pairs.jsonl", rows)
    examples = load_examples(data, "dpo", template, seed)  # the project's rendering and order
    write_rows(work / f"{name}-examples.jsonl", examples)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_max = max(len(tokenizer(text=ex["prompt"])["input_ids"]) for ex in examples)
    if prompt_max >= full["max_length"]:
        raise SystemExit(f"{name}: a prompt of {prompt_max} tokens fills max_length; TRL would "
                         "drop it and the token count would be off")
    return Case(name=name, model_dir=model_dir, data=data,
                examples=work / f"{name}-examples.jsonl", template=template, training=full,
                beta=beta, seed=seed, pairs=len(rows),
                tokens=training_tokens(tokenizer, examples, full["max_length"]),
                attn_implementation=resolved_attention(model_dir))


def demo_threads() -> int:
    """The demo's align threads (config/config.yaml `threads.align`): what its jobs use."""
    import yaml

    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text(encoding="utf-8"))
    return int(config.get("threads", {}).get("align") or os.cpu_count() or 1)


def demo_case(work: Path, *, steps: int, batch: int, seed: int = 0) -> Case:
    """The demo's model size, tokenizer, prompt format and training settings; random weights."""
    import yaml

    from sacpo_steps.data.demo_world import WorldConfig, build_world
    from sacpo_steps.models.sft_checkpoint import train_tokenizer

    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text(encoding="utf-8"))
    template = config["prompt_template"]
    n = steps * batch * int(config["training"].get("gradient_accumulation_steps", 1))
    world = build_world(WorldConfig(seed=seed, n_sft_examples=1, n_preference_pairs=n))
    rows = []
    for r in world["preferences"]:
        better = r["better_response_id"]
        rows.append({"prompt": r["prompt"], "chosen": r[f"response_{better}"],
                     "rejected": r[f"response_{1 - better}"]})
    model_dir = work / "demo-parent"
    if not model_dir.is_dir():
        texts = [template.format(prompt=r["prompt"]) + " " + r[k] for r in rows
                 for k in ("chosen", "rejected")]
        tokenizer = train_tokenizer(texts, config["sft"]["build"]["tokenizer"]["vocab_size"])
        build_llama(model_dir, tokenizer, {**config["sft"]["build"]["model"], "vocab_size": 0},
                    seed=seed, dtype="float32", device="cpu")
    training = {**config["training"], "max_steps": steps, "per_device_train_batch_size": batch,
                "num_train_epochs": 1, "save_steps": 0,
                "logging_steps": min(int(config["training"].get("logging_steps", 10)), steps)}
    while steps % training["logging_steps"]:  # the last step must log TRL's num_tokens
        training["logging_steps"] -= 1
    return make_case("demo", work, model_dir, rows, template, training, beta=0.1, seed=seed)


def synthetic_tokenizer(seed: int = 0, n_words: int = 256):
    """A tokenizer in which each of `n_words` four-letter words is one token, and the words."""
    from sacpo_steps.models.sft_checkpoint import train_tokenizer

    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < n_words:
        words.add("".join(rng.choice(string.ascii_lowercase) for _ in range(4)))
    vocab = sorted(words)
    lines = [" ".join(rng.sample(vocab, min(64, len(vocab)))) for _ in range(8 * n_words // 16)]
    tokenizer = train_tokenizer(lines, vocab_size=2048)
    split = [w for w in vocab if len(tokenizer(text=w, add_special_tokens=False)["input_ids"]) != 1]
    if split:
        raise SystemExit(f"synthetic tokenizer: {len(split)} words are not one token ({split[:3]})")
    return tokenizer, vocab


def synthetic_rows(words: list[str], n: int, prompt_tokens: int, completion_tokens: int,
                   seed: int) -> list[dict[str, Any]]:
    """Rows whose prompt is `prompt_tokens` ids (BOS included) and whose completions are
    `completion_tokens` ids (EOS included) under the `{prompt}` template."""
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    return [{"prompt": text(prompt_tokens - 1), "chosen": text(completion_tokens - 1),
             "rejected": text(completion_tokens - 1)} for _ in range(n)]


def synthetic_case(name: str, work: Path, shape: dict[str, Any], training: dict[str, Any], *,
                   prompt_tokens: int, completion_tokens: int, device: str, dtype: str,
                   seed: int = 0, model_dir: Path | None = None) -> Case:
    """A random Llama of `shape` and synthetic rows of fixed token lengths."""
    tokenizer, words = synthetic_tokenizer(seed)
    model_dir = model_dir or work / f"{name}-parent"
    started = time.monotonic()
    build_llama(model_dir, tokenizer, shape, seed=seed, dtype=dtype, device=device)
    print(f"{name}: parent built in {time.monotonic() - started:.1f} s", file=sys.stderr)
    pairs = training["max_steps"] * training["per_device_train_batch_size"] * \
        training.get("gradient_accumulation_steps", 1)
    rows = synthetic_rows(words, pairs, prompt_tokens, completion_tokens, seed)
    case = make_case(name, work, model_dir, rows, "{prompt}", training, beta=0.1, seed=seed)
    case.flop_params = meta_param_counts(shape)[1]
    case.layers, case.hidden = shape["num_hidden_layers"], shape["hidden_size"]
    expected = pairs * 2 * (prompt_tokens + completion_tokens)
    if case.tokens != expected:
        case.problems.append(f"{name}: {case.tokens} training tokens, expected {expected}")
    return case


# ---- running the two sides ---------------------------------------------------------------

def side_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_process(cmd: list[str], *, log: Path, report: Path, timeout: float) -> dict[str, Any]:
    """Run one side; return its probe report plus rc and wall seconds."""
    report.unlink(missing_ok=True)
    started = time.monotonic()
    try:
        with open(log, "w", encoding="utf-8") as fh:
            proc = subprocess.run(cmd, cwd=report.parent, env=side_env(), stdout=fh,
                                  stderr=subprocess.STDOUT, timeout=max(timeout, 1))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timed out"
    wall = time.monotonic() - started
    data = json.loads(report.read_text(encoding="utf-8")) if report.is_file() else {}
    data.update(rc=rc, wall_s=wall, log=str(log))
    if rc != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-2500:]
        print(f"--- {log.name} (rc {rc}) ---\n{tail}", file=sys.stderr)
    return data


def write_scripts(work: Path) -> None:
    for name, text in (("bench_probe.py", PROBE), ("ours_runner.py", OURS_RUNNER),
                       ("bare_dpo.py", BARE_DPO), ("bare_generate.py", BARE_GENERATE)):
        (work / name).write_text(text, encoding="utf-8")


def align_spec(case: Case, training: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": f"bench-{case.name}", "parent": "bench-parent", "data": case.name,
            "loss": "dpo", "beta": case.beta, "training": training or case.training,
            "prompt_template": case.template, "seed": case.seed}


def run_ours(case: Case, work: Path, tag: str, threads: int, timeout: float,
             training: dict[str, Any] | None = None) -> dict[str, Any]:
    out, ckpt = work / f"ours-{tag}", work / f"ours-{tag}-checkpoints"
    cmd = [sys.executable, str(work / "ours_runner.py"), str(work / f"ours-{tag}.json"), "train",
           "align", "--parent-dir", str(case.model_dir), "--data", str(case.data),
           "--out", str(out), "--spec", json.dumps(align_spec(case, training)),
           "--checkpoint-dir", str(ckpt), "--threads", str(threads)]
    result = run_process(cmd, log=work / f"ours-{tag}.log", report=work / f"ours-{tag}.json",
                         timeout=timeout)
    card = out / "sacpo.json"
    if card.is_file():
        result["card_steps"] = json.loads(card.read_text(encoding="utf-8"))["training"]["steps"]
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(ckpt, ignore_errors=True)
    return result


def bare_config(case: Case) -> dict[str, Any]:
    """The DPOConfig arguments of the bare script: the same values ours passes TRL."""
    t = case.training
    return {**{key: t[key] for key in SHARED_KEYS}, "beta": case.beta, "loss_type": ["sigmoid"],
            "seed": case.seed, "data_seed": case.seed, "logging_first_step": True,
            "save_strategy": "no", "report_to": [], "dataloader_num_workers": 0}


def run_bare(case: Case, work: Path, tag: str, threads: int, timeout: float) -> dict[str, Any]:
    out = work / f"bare-{tag}"
    job = {"model_dir": str(case.model_dir), "examples": str(case.examples), "out": str(out),
           "config": bare_config(case), "attn_implementation": case.attn_implementation,
           "threads": threads, "report": str(work / f"bare-{tag}.json")}
    job_file = work / f"bare-{tag}-job.json"
    job_file.write_text(json.dumps(job), encoding="utf-8")
    result = run_process([sys.executable, str(work / "bare_dpo.py"), str(job_file)],
                         log=work / f"bare-{tag}.log", report=work / f"bare-{tag}.json",
                         timeout=timeout)
    shutil.rmtree(out, ignore_errors=True)
    return result


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def train_metrics(run: dict[str, Any], case: Case) -> dict[str, Any]:
    """The table's numbers of one run (None where the run gave none)."""
    train_s = run.get("train_runtime")
    ok = finite(train_s)  # reported once training ended (a failed save is a problem of its own)
    peak = run.get("peak_gpu_bytes")
    return {"wall_s": run["wall_s"], "train_s": train_s if ok else None,
            "tokens_per_s": case.tokens / train_s if ok else None,
            "samples_per_s": case.pairs / train_s if ok else None,
            "peak_gb": peak / 1e9 if peak else None, "final_loss": run.get("final_loss")}


def check_run(side: str, run: dict[str, Any], case: Case, steps: int) -> list[str]:
    problems = []
    if run.get("rc") != 0:
        return [f"{case.name} {side}: exit {run.get('rc')} (log {run.get('log')})"]
    if not finite(run.get("train_runtime")):
        problems.append(f"{case.name} {side}: train_runtime {run.get('train_runtime')!r}")
    if run.get("steps") != steps:
        problems.append(f"{case.name} {side}: {run.get('steps')} steps, expected {steps}")
    if run.get("num_tokens_logged") != case.tokens:
        problems.append(f"{case.name} {side}: TRL logged {run.get('num_tokens_logged')} "
                        f"training tokens, the bench counted {case.tokens}")
    loss = run.get("final_loss")
    if not (isinstance(loss, float) and math.isfinite(loss)):
        problems.append(f"{case.name} {side}: final loss {loss!r}")
    return problems


def median_of(values: list[Any]) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.median(vals) if vals else None


def compare_training(case: Case, work: Path, *, repeat: int, threads: int, deadline: float,
                     results: dict[str, Any], out: Path | None, device: str | None
                     ) -> dict[str, Any]:
    """Ours and bare in `repeat` interleaved rounds; medians, ratio and checks."""
    steps = case.training["max_steps"]
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "bare": []}
    entry = {"kind": "train", "case": case.name, "pairs": case.pairs, "tokens": case.tokens,
             "steps": steps, "training": case.training, "threads": threads,
             "attn_implementation": case.attn_implementation, "runs": runs,
             "problems": list(case.problems)}
    results["measurements"][case.name] = entry
    for i in range(repeat):
        order = ("ours", "bare") if i % 2 == 0 else ("bare", "ours")
        for side in order:
            left = deadline - time.monotonic()
            if left < 20:
                entry["problems"].append(f"{case.name}: out of time before round {i + 1} {side}")
                break
            print(f"{case.name} round {i + 1}/{repeat}: {side} ...", file=sys.stderr)
            fn = run_ours if side == "ours" else run_bare
            run = fn(case, work, f"{case.name}-{i}", threads, left - 10)
            run["metrics"] = train_metrics(run, case)
            runs[side].append(run)
            entry["problems"] += check_run(side, run, case, steps)
            print(f"  wall {run['wall_s']:.1f} s, train {run.get('train_runtime')} s",
                  file=sys.stderr)
        summarise_training(entry, case, device)
        if out:
            write_results(out, results)
    return entry


def summarise_training(entry: dict[str, Any], case: Case, device: str | None) -> None:
    steps_wanted = case.training["max_steps"]
    keys = ("wall_s", "train_s", "tokens_per_s", "samples_per_s", "peak_gb", "final_loss")
    medians = {side: {k: median_of([r["metrics"][k] for r in runs]) for k in keys}
               for side, runs in entry["runs"].items()}
    for side in medians:
        tps = medians[side]["tokens_per_s"]
        medians[side]["mfu"] = mfu(tps, case, device) if tps else None
        trains = [r["metrics"]["train_s"] for r in entry["runs"][side]
                  if r["metrics"]["train_s"]]
        medians[side]["train_s_range"] = [min(trains), max(trains)] if trains else None
    entry["median"] = medians
    ours, bare = medians["ours"], medians["bare"]
    entry["ratio"] = {k: (ours[k] / bare[k] if ours.get(k) and bare.get(k) else None)
                      for k in ("wall_s", "train_s", "tokens_per_s", "samples_per_s", "peak_gb",
                                "mfu")}
    # paired per-step ratio: both sides train on the same batches in the same order, so
    # step k of round i is the same work on both; the median ratio shrugs off bursts of
    # load from other processes that hit one side's loop and not the other's
    rounds = zip(entry["runs"]["ours"], entry["runs"]["bare"], strict=False)  # maybe cut off
    pairs = [o / b for ours_run, bare_run in rounds
             for o, b in zip(ours_run.get("step_s", [])[1:], bare_run.get("step_s", [])[1:],
                             strict=False)
             if o > 0 and b > 0]
    entry["step_ratio_median"] = statistics.median(pairs) if pairs else None
    for side, runs in entry["runs"].items():
        steps = [t for r in runs for t in r.get("step_s", [])[1:]]
        medians[side]["step_s"] = statistics.median(steps) if steps else None
        # best of rounds: each step's fastest round, summed (load from other processes
        # only ever adds time, so this is the least disturbed estimate of the loop)
        lists = [r["step_s"] for r in runs if r.get("rc") == 0 and r.get("step_s")]
        n = min((len(x) for x in lists), default=0)
        best = sum(min(x[k] for x in lists) for k in range(n)) if n == steps_wanted else None
        medians[side]["best_loop_s"] = best
        medians[side]["best_tokens_per_s"] = case.tokens / best if best else None
    entry["ratio"]["best_tokens_per_s"] = (
        medians["ours"]["best_tokens_per_s"] / medians["bare"]["best_tokens_per_s"]
        if medians["ours"]["best_tokens_per_s"] and medians["bare"]["best_tokens_per_s"]
        else None)
    facts = {}
    for side, runs in entry["runs"].items():
        for r in runs:
            if r.get("rc") == 0:
                facts.setdefault(side, {k: r.get(k) for k in FACTS})
    entry["facts"] = facts
    if len(facts) == 2 and any(facts["ours"][k] != facts["bare"][k] for k in FACTS[:4]):
        problem = f"{case.name}: the sides differ: ours {facts['ours']}, bare {facts['bare']}"
        if problem not in entry["problems"]:
            entry["problems"].append(problem)


def run_peft(case: Case, work: Path, label: str, extra: dict[str, Any], *, threads: int,
             deadline: float, results: dict[str, Any], out: Path | None) -> dict[str, Any]:
    """Ours only: a few DPO steps of the align step with LoRA / QLoRA; time and peak memory."""
    entry: dict[str, Any] = {"kind": "peft", "case": label, "training_extra": extra,
                             "pairs": case.pairs, "tokens": case.tokens, "problems": []}
    results["measurements"][label] = entry
    left = deadline - time.monotonic()
    if left < 30:
        entry["problems"].append(f"{label}: skipped, out of time")
    else:
        print(f"{label}: ours ...", file=sys.stderr)
        run = run_ours(case, work, label, threads, left - 10, {**case.training, **extra})
        run["metrics"] = train_metrics(run, case)
        entry["run"] = run
        entry["problems"] += check_run("ours", run, case, case.training["max_steps"])
    if out:
        write_results(out, results)
    return entry


def compare_generation(model_dir: Path, work: Path, prompts: list[str], *, template: str,
                       max_new_tokens: int, batch_size: int, threads: int, deadline: float,
                       results: dict[str, Any], out: Path | None, label: str = "generate"
                       ) -> dict[str, Any]:
    """The generate step against bare model.generate on the same prompts (greedy)."""
    rows = [{"prompt_id": f"p{i:04d}", "prompt": p} for i, p in enumerate(prompts)]
    prompts_path = write_rows(work / f"{label}-prompts.jsonl", rows)
    attn = resolved_attention(model_dir)
    entry: dict[str, Any] = {"kind": "generate", "prompts": len(rows),
                             "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                             "threads": threads, "runs": {}, "problems": []}
    results["measurements"][label] = entry
    for side in ("ours", "bare"):
        left = deadline - time.monotonic()
        if left < 20:
            entry["problems"].append(f"{label}: {side} skipped, out of time")
            continue
        print(f"{label}: {side} ...", file=sys.stderr)
        report, answers = work / f"{label}-{side}.json", work / f"{label}-{side}.jsonl"
        if side == "ours":
            spec = {"prompt_template": template, "stop_markers": [],
                    "max_new_tokens": max_new_tokens, "batch_size": batch_size, "seed": 0}
            cmd = [sys.executable, str(work / "ours_runner.py"), str(report), "generate",
                   "generate", "--model-dir", str(model_dir), "--model-name", "bench",
                   "--prompts", str(prompts_path), "--out", str(answers),
                   "--spec", json.dumps(spec), "--threads", str(threads)]
        else:
            job = {"model_dir": str(model_dir), "prompts": str(prompts_path), "out": str(answers),
                   "template": template, "max_new_tokens": max_new_tokens,
                   "batch_size": batch_size, "attn_implementation": attn, "threads": threads,
                   "report": str(report)}
            job_file = work / f"{label}-bare-job.json"
            job_file.write_text(json.dumps(job), encoding="utf-8")
            cmd = [sys.executable, str(work / "bare_generate.py"), str(job_file)]
        run = run_process(cmd, log=work / f"{label}-{side}.log", report=report, timeout=left - 10)
        ok = run.get("rc") == 0 and finite(run.get("generate_s")) and run.get("new_tokens")
        run["metrics"] = {"wall_s": run["wall_s"], "generate_s": run.get("generate_s") if ok
                          else None,
                          "tokens_per_s": run["new_tokens"] / run["generate_s"] if ok else None,
                          "peak_gb": (run["peak_gpu_bytes"] / 1e9
                                      if run.get("peak_gpu_bytes") else None)}
        entry["runs"][side] = run
        if not ok:
            entry["problems"].append(f"{label} {side}: exit {run.get('rc')}, "
                                     f"{run.get('new_tokens')} tokens (log {run['log']})")
    runs = entry["runs"]
    if all(s in runs and runs[s]["metrics"]["tokens_per_s"] for s in ("ours", "bare")):
        o, b = runs["ours"]["metrics"], runs["bare"]["metrics"]
        entry["ratio"] = {k: o[k] / b[k] if o[k] and b[k] else None
                          for k in ("wall_s", "generate_s", "tokens_per_s")}
        if runs["ours"]["new_tokens"] != runs["bare"]["new_tokens"]:
            entry["problems"].append(f"{label}: ours generated {runs['ours']['new_tokens']} "
                                     f"tokens, bare {runs['bare']['new_tokens']}")
    if out:
        write_results(out, results)
    return entry


# ---- results -----------------------------------------------------------------------------

def fmt(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def render_markdown(results: dict[str, Any]) -> str:
    lines = [f"align step vs bare TRL DPOTrainer ({results['mode']}; {results['device']}; "
             f"{results['versions']})", ""]
    for name, m in results["measurements"].items():
        if m["kind"] == "train" and "median" in m:
            gpu = results["gpu"]
            n = max(len(r) for r in m["runs"].values())
            lines += [f"**{name}**: {m['pairs']} pairs, {m['steps']} steps, {m['tokens']:,} "
                      f"training tokens; {m['threads']} thread(s); attention "
                      f"{m['attn_implementation']}; median of {n} round(s)", ""]
            head = "| side | wall s | train loop s | tokens/s | samples/s |"
            rule = "|---|---:|---:|---:|---:|"
            if gpu:
                head += " MFU | peak GB |"
                rule += "---:|---:|"
            lines += [head + " step s | train loop s min-max | final loss |",
                      rule + "---:|---:|---:|"]
            for side, label in (("ours", "ours (`sacpo_steps align`)"), ("bare", "bare TRL")):
                v = m["median"][side]
                rng = v["train_s_range"]
                row = (f"| {label} | {fmt(v['wall_s'], '.1f')} | {fmt(v['train_s'])} | "
                       f"{fmt(v['tokens_per_s'], ',.0f')} | {fmt(v['samples_per_s'], ',.1f')} |")
                if gpu:
                    row += f" {fmt(v['mfu'], '.1%')} | {fmt(v['peak_gb'], '.1f')} |"
                row += (f" {fmt(v['step_s'], '.3f')} | "
                        f"{fmt(rng[0]) if rng else '-'}-{fmt(rng[1]) if rng else '-'} | "
                        f"{fmt(v['final_loss'], '.6f')} |")
                lines.append(row)
            r = m["ratio"]
            row = (f"| ratio ours/bare | {fmt(r['wall_s'])} | {fmt(r['train_s'])} | "
                   f"{fmt(r['tokens_per_s'], '.3f')} | {fmt(r['samples_per_s'], '.3f')} |")
            if gpu:
                row += f" {fmt(r['mfu'], '.3f')} | {fmt(r['peak_gb'], '.2f')} |"
            lines += [row + f" {fmt(m.get('step_ratio_median'), '.3f')} | | |", "",
                      "step s: median wall time of an optimizer step (first step left out); "
                      "its ratio is the median of the paired ratios (same step, same round: "
                      "the same batch on both sides).", ""]
            if r["tokens_per_s"]:
                met = "met" if r["tokens_per_s"] >= GOAL else "NOT met"
                paired = m.get("step_ratio_median")
                lines += [f"goal tokens/s ours >= {GOAL} x bare: {met} "
                          f"({r['tokens_per_s']:.3f} x; per paired step: "
                          f"{fmt(1 / paired if paired else None, '.3f')} x)", ""]
            best = {side: m["median"][side].get("best_loop_s") for side in ("ours", "bare")}
            if all(best.values()):
                lines += [f"best of rounds (each step's fastest round, summed): ours "
                          f"{best['ours']:.2f} s, bare {best['bare']:.2f} s; tokens/s ours/bare "
                          f"= {r['best_tokens_per_s']:.3f}", ""]
            facts = m.get("facts", {})
            if facts:
                lines += ["sides: " + "; ".join(f"{side} {v}" for side, v in facts.items()), ""]
        elif m["kind"] == "generate" and m["runs"]:
            lines += [f"**{name}**: {m['prompts']} prompts, {m['max_new_tokens']} new tokens "
                      f"each (greedy), batch {m['batch_size']}", "",
                      "| side | wall s | generate s | new tokens/s | peak GB |",
                      "|---|---:|---:|---:|---:|"]
            for side, label in (("ours", "ours (`sacpo_steps generate`)"),
                                ("bare", "bare `model.generate`")):
                if side in m["runs"]:
                    v = m["runs"][side]["metrics"]
                    lines.append(f"| {label} | {fmt(v['wall_s'], '.1f')} | "
                                 f"{fmt(v['generate_s'])} | {fmt(v['tokens_per_s'], ',.0f')} | "
                                 f"{fmt(v['peak_gb'], '.1f')} |")
            if "ratio" in m:
                r = m["ratio"]
                lines.append(f"| ratio ours/bare | {fmt(r['wall_s'])} | {fmt(r['generate_s'])} "
                             f"| {fmt(r['tokens_per_s'], '.3f')} | |")
            lines.append("")
    peft = [(n, m) for n, m in results["measurements"].items() if m["kind"] == "peft"]
    if peft:
        lines += ["**LoRA / QLoRA through the align step** (ours only)", "",
                  "| run | wall s | train loop s | tokens/s | peak GB |",
                  "|---|---:|---:|---:|---:|"]
        for name, m in peft:
            v = m.get("run", {}).get("metrics", {})
            lines.append(f"| {name} | {fmt(v.get('wall_s'), '.1f')} | {fmt(v.get('train_s'))} "
                         f"| {fmt(v.get('tokens_per_s'), ',.0f')} | "
                         f"{fmt(v.get('peak_gb'), '.1f')} |")
        lines.append("")
    problems = [p for m in results["measurements"].values() for p in m.get("problems", [])]
    problems += results.get("problems", [])
    if problems:
        lines += ["Problems:", *[f"- {p}" for p in problems], ""]
    return "\n".join(lines)


def write_results(path: Path, results: dict[str, Any]) -> None:
    """The JSON and the Markdown next to it, replaced atomically (a cut-off run still reports)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    results["markdown"] = render_markdown(results)
    results["elapsed_s"] = round(time.monotonic() - results["_t0"], 1)
    for target, text in ((path, json.dumps({k: v for k, v in results.items() if k != "_t0"},
                                           indent=1, default=str)),
                         (path.with_suffix(".md"), results["markdown"])):
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, target)


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("torch", "transformers", "trl", "peft"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)


def warm_up() -> None:
    """Import the heavy libraries once, unmeasured: the first side should not pay cold caches."""
    subprocess.run([sys.executable, "-c", "import torch, transformers, trl, datasets, peft"],
                   env=side_env(), check=False, capture_output=True)


# ---- modes -------------------------------------------------------------------------------

def cpu_mode(args, work: Path, results: dict[str, Any]) -> None:
    deadline = results["_t0"] + args.budget_s
    case = demo_case(work, steps=args.steps or 10, batch=args.batch or 32)
    compare_training(case, work, repeat=args.repeat or 3, threads=args.threads,
                     deadline=deadline, results=results, out=args.out, device=None)


def gpu_mode(args, work: Path, results: dict[str, Any]) -> None:
    """1B ours vs bare; generation; 7B LoRA and QLoRA peak memory (most costly last)."""
    import torch

    deadline = results["_t0"] + args.budget_s
    device = torch.cuda.get_device_name()
    steps, batch = args.steps or 20, args.batch or 16
    training = {"learning_rate": 1e-6, "num_train_epochs": 1, "max_steps": steps,
                "per_device_train_batch_size": batch, "gradient_accumulation_steps": 1,
                "max_length": 512, "lr_scheduler_type": "cosine", "warmup_steps": 0,
                "precompute_ref_log_probs": True, "precompute_ref_batch_size": 2 * batch,
                "bf16": True, "gradient_checkpointing": True, "logging_steps": steps,
                "save_steps": 0}
    case = synthetic_case("llama-1b", work, SHAPE_1B, training, prompt_tokens=128,
                          completion_tokens=384, device="cuda", dtype="bfloat16")
    compare_training(case, work, repeat=args.repeat or 1, threads=args.threads,
                     deadline=deadline, results=results, out=args.out, device=device)
    _, words = synthetic_tokenizer()
    prompts = [r["prompt"] for r in synthetic_rows(words, 64, 128, 2, seed=1)]
    compare_generation(case.model_dir, work, prompts, template="{prompt}", max_new_tokens=128,
                       batch_size=32, threads=args.threads, deadline=deadline,
                       results=results, out=args.out)
    shutil.rmtree(case.model_dir, ignore_errors=True)
    if deadline - time.monotonic() < 120:
        results["problems"].append("7B LoRA/QLoRA skipped: under 120 s of the budget left")
        write_results(args.out, results)
        return
    small = {**training, "max_steps": 3, "per_device_train_batch_size": 4,
             "precompute_ref_batch_size": 4, "logging_steps": 3}
    big = synthetic_case("llama-7b", work, SHAPE_7B, small, prompt_tokens=128,
                         completion_tokens=384, device="cuda", dtype="bfloat16")
    lora = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
    for label, extra in (("7b-lora-bf16", {"lora": lora}),
                         ("7b-qlora-4bit", {"lora": lora, "quantization": "4bit"})):
        run_peft(big, work, label, extra, threads=args.threads, deadline=deadline,
                 results=results, out=args.out)


def self_test(args, work: Path, results: dict[str, Any]) -> list[str]:
    """A fast end-to-end run on CPU plus the GPU mode's CPU-runnable parts; the problems."""
    from sacpo_steps.training.settings import PASSED_AS_IS

    problems = []
    if set(PASSED_AS_IS) != set(SHARED_KEYS):
        problems.append(f"the align step passes {sorted(PASSED_AS_IS)} to TRL, the bare script "
                        f"{sorted(SHARED_KEYS)}: update SHARED_KEYS")
    deadline = results["_t0"] + args.budget_s
    case = demo_case(work, steps=2, batch=8)
    entry = compare_training(case, work, repeat=1, threads=args.threads, deadline=deadline,
                             results=results, out=args.out, device=None)
    problems += entry["problems"]
    for side in ("ours", "bare"):
        v = entry.get("median", {}).get(side, {})
        for key in ("wall_s", "train_s", "tokens_per_s", "samples_per_s"):
            if not finite(v.get(key)):
                problems.append(f"self-test: {side} {key} = {v.get(key)!r}")
    gen = compare_generation(case.model_dir, work, ["how do i bake bread?"] * 4 +
                             ["how can i plant a tree? tell me in detail"] * 4,
                             template=case.template, max_new_tokens=6, batch_size=4,
                             threads=args.threads, deadline=deadline, results=results,
                             out=args.out)
    problems += gen["problems"]
    if not gen.get("ratio", {}).get("tokens_per_s"):
        problems.append("self-test: no generation tokens/s ratio")
    # the 7B runs' path (ours with a LoRA adapter; QLoRA needs a GPU) on the demo model
    lora = run_peft(case, work, "demo-lora", {"lora": {"r": 4, "alpha": 8, "dropout": 0.0,
                                                        "target_modules": "all-linear"}},
                    threads=args.threads, deadline=deadline, results=results, out=args.out)
    problems += lora["problems"]
    if lora.get("run", {}).get("peft_imported") is not True:
        problems.append("self-test: the LoRA run did not import peft")
    # the GPU mode's construction on a small shape: bf16 weights, fixed token lengths
    tiny_training = {"max_steps": 1, "per_device_train_batch_size": 2,
                     "gradient_accumulation_steps": 1, "max_length": 32}
    tiny = synthetic_case("tiny", work, SHAPE_TINY, tiny_training, prompt_tokens=8,
                          completion_tokens=24, device="cpu", dtype="bfloat16")
    problems += tiny.problems
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tiny.model_dir, dtype="auto")
    if str(loaded.dtype) != "torch.bfloat16":
        problems.append(f"self-test: the bf16 parent loads as {loaded.dtype}")
    if flop_params(loaded) != tiny.flop_params:
        problems.append(f"self-test: FLOP parameters {flop_params(loaded)} vs meta "
                        f"{tiny.flop_params}")
    if loaded.config._attn_implementation != tiny.attn_implementation:
        problems.append(f"self-test: attention {loaded.config._attn_implementation} vs "
                        f"resolved {tiny.attn_implementation}")
    total_1b, flop_1b = meta_param_counts(SHAPE_1B)
    total_7b, _ = meta_param_counts(SHAPE_7B)
    if not (0.9e9 < total_1b < 1.2e9 and 6.5e9 < total_7b < 7.0e9):
        problems.append(f"self-test: shapes give {total_1b:,} and {total_7b:,} parameters")
    # MFU: 1B, 512-token sequences, 1e4 tokens/s on an H200
    case_1b = Case(name="1b", model_dir=work, data=work, examples=work, template="", training={},
                   beta=0.1, seed=0, pairs=1, tokens=1024, attn_implementation="",
                   flop_params=flop_1b, layers=16, hidden=2048)
    want = (6 * flop_1b + 12 * 16 * 2048 * 512) * 1e4 / 989e12
    got = mfu(1e4, case_1b, "NVIDIA H200")
    if got is None or abs(got - want) > 1e-12 or mfu(1e4, case_1b, "Some GPU") is not None:
        problems.append(f"self-test: MFU {got} (want {want}); unknown device must give None")
    results["self_test"] = {"tiny_tokens": tiny.tokens, "params_1b": total_1b,
                            "params_7b": total_7b, "mfu_1b_at_1e4_tok_s_h200": got}
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--gpu", action="store_true", help="GPU mode (default when CUDA is seen)")
    mode.add_argument("--cpu", action="store_true", help="CPU mode even when CUDA is seen")
    mode.add_argument("--self-test", action="store_true",
                      help="fast CPU check of the script; exit 1 on any problem")
    parser.add_argument("--repeat", type=int, help="interleaved rounds (CPU 3, GPU 1)")
    parser.add_argument("--steps", type=int, help="training steps (CPU 10, GPU 20)")
    parser.add_argument("--batch", type=int, help="per-device batch (CPU 32, GPU 16)")
    parser.add_argument("--threads", type=int,
                        help="torch threads of both sides (default: CPU the demo's "
                        "threads.align, GPU min(CPUs, 8))")
    parser.add_argument("--budget-s", type=float,
                        help="stop starting work after this many seconds (GPU 480)")
    parser.add_argument("--out", type=Path,
                        help=f"results JSON (and .md beside it); default {DEFAULT_OUT} "
                        "(self-test: align_vs_trl.self-test.json there)")
    parser.add_argument("--workdir", type=Path, help="default: a new temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    t0 = time.monotonic()
    gpu = False
    if not (args.cpu or args.self_test):
        import torch

        gpu = args.gpu or torch.cuda.is_available()
        if gpu and not torch.cuda.is_available():
            raise SystemExit("--gpu: torch sees no CUDA device")
    args.threads = args.threads or (min(os.cpu_count() or 1, 8) if gpu else demo_threads())
    args.budget_s = args.budget_s or (480 if gpu else 3600)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="align-vs-trl-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.out is None:
        args.out = DEFAULT_OUT.with_name("align_vs_trl.self-test.json") if args.self_test \
            else DEFAULT_OUT
    label = "self-test" if args.self_test else "gpu" if gpu else "cpu"
    device = platform.processor() or platform.machine()
    if gpu:
        import torch

        device = torch.cuda.get_device_name()
    results: dict[str, Any] = {"_t0": t0, "mode": label, "gpu": gpu,
                               "device": f"{device}, {os.cpu_count()} CPUs",
                               "versions": versions(), "argv": sys.argv[1:],
                               "measurements": {}, "problems": []}
    print(f"work folder {work}; results {args.out}", file=sys.stderr)
    write_scripts(work)
    if not args.self_test:
        warm_up()
    problems: list[str] = []
    try:
        if args.self_test:
            problems = self_test(args, work, results)
        elif gpu:
            gpu_mode(args, work, results)
        else:
            cpu_mode(args, work, results)
    finally:
        write_results(args.out, results)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(results["markdown"])
    print(f"total {time.monotonic() - t0:.0f} s; results in {args.out}", file=sys.stderr)
    if args.self_test:
        for p in dict.fromkeys(problems):
            print(f"FAILED: {p}")
        if problems:
            sys.exit(1)
        print("self-test passed")


if __name__ == "__main__":
    main()
