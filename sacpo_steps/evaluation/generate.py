"""Batched greedy generation on a prompt set, with the paper's answer truncation.

Prompt ids come from the one tokenization contract (`tokens.encode_prompt`), so
a model is sampled on the ids it was trained on (BOS included where the
tokenizer adds it), under the same prompt cap as training. The answer is
stripped, then cut at the first blank line or stop marker (a new user turn), as
in the paper's evaluation. Output rows follow the generations format:
prompt_id, prompt, answer, model. Empty answers are counted in the log.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from pathlib import Path
from typing import Any

from sacpo_steps import seconds_since_start
from sacpo_steps.core.errors import InputError
from sacpo_steps.core.fileio import json_object_arg, read_jsonl, setup_logging, write_jsonl
from sacpo_steps.core.lineage import (
    drop_sidecar,
    file_input,
    make_record,
    model_input,
    write_sidecar,
)
from sacpo_steps.evaluation.generation_settings import GenerationSettings
from sacpo_steps.models.folders import check_model_dir, set_threads
from sacpo_steps.models.throughput import (
    cuda_device,
    describe,
    generation_flops_per_token,
    model_shape,
    rates,
)
from sacpo_steps.models.tokens import PromptCap, encode_prompt

log = logging.getLogger("sacpo.generate")


def truncate_answer(text: str, stop_markers: list[str]) -> str:
    """Strip, then cut at the first blank line or stop marker; strip again.

    Stripping first matters: real Llama answers often start with a blank line
    before "Sure, ...", which would otherwise cut the whole answer away.
    Markers match exactly (list every casing in the config).
    """
    text = text.strip()
    cut = len(text)
    blank = re.search(r"\n[^\S\n]*\n", text)
    if blank:
        cut = blank.start()
    for marker in stop_markers:
        pos = text.find(marker)
        if pos != -1:
            cut = min(cut, pos)
    return text[:cut].strip()


def load_prompts(path: str | Path) -> list[dict[str, Any]]:
    rows = read_jsonl(path)
    if not rows:
        raise InputError("prompt set is empty", path=path)
    seen: set[str] = set()
    for i, row in enumerate(rows, start=1):
        for field in ("prompt_id", "prompt"):
            if not isinstance(row.get(field), str) or not row[field].strip():
                raise InputError("missing or empty text", path=path, row=i, field=field)
        if row["prompt_id"] in seen:
            raise InputError(f"duplicate prompt_id {row['prompt_id']!r}", path=path, row=i,
                             field="prompt_id")
        seen.add(row["prompt_id"])
    return rows


def generated_tokens(rows: list[list[int]], eos_id: int | None) -> int:
    """New tokens a batch really generated: each row up to its first end-of-sequence
    token (included); what follows is padding of the finished rows."""
    total = 0
    for tokens in rows:
        total += tokens.index(eos_id) + 1 if eos_id in tokens else len(tokens)
    return total


def generation_throughput(model: Any, new_tokens: int, prompts: int, seconds: float,
                          prompt_tokens: int) -> dict[str, Any]:
    """Generated tokens/s and prompts/s over the `generate` calls (tokenising, loading
    and decoding excluded) and, on a GPU, MFU at 2 x parameters per generated token
    (the prompts' prefill is not counted)."""

    gpus, device = cuda_device()
    flops = None
    if gpus:
        mean_len = (prompt_tokens + new_tokens / 2) / max(prompts, 1)
        flops = generation_flops_per_token(model_shape(model), mean_len)
    return rates(tokens=new_tokens, samples=prompts, seconds=seconds, flops_per_token=flops,
                 gpus=gpus, device_name=device)


def _encode_prompts(tokenizer: Any, prompts: list[dict[str, Any]], template: str,
                    cap: PromptCap, prompts_path: str | Path) -> list[list[int]]:
    """Each prompt's ids, as the model was trained on them (under its prompt cap)."""
    encoded: list[list[int]] = []
    for i, p in enumerate(prompts, start=1):
        text = cap.apply(tokenizer, template, p["prompt"])
        if text is None:
            raise InputError(f"the prompt template alone exceeds max_prompt_length "
                             f"{cap.max_prompt_length}", path=prompts_path, row=i,
                             field="training.max_prompt_length")
        encoded.append(encode_prompt(tokenizer, template, text))
    return encoded

def generate(
    model_dir: str | Path,
    prompts_path: str | Path,
    out_path: str | Path,
    *,
    model_name: str,
    prompt_template: str,
    stop_markers: list[str],
    max_new_tokens: int,
    batch_size: int,
    seed: int = 0,
    threads: int | None = None,
    max_prompt_length: int | None = None,
) -> dict[str, Any]:
    """Generate greedy answers for every prompt; return counts (answers, empty, truncated)."""
    check_model_dir(model_dir)
    prompts = load_prompts(prompts_path)
    started = time.monotonic()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    set_threads(threads)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    cap = PromptCap(max_prompt_length)
    encoded = _encode_prompts(tokenizer, prompts, prompt_template, cap, prompts_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to(device)
    model.eval()
    # Longest prompts first: batches of similar length waste less padding.
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    answers: dict[int, str] = {}
    first_token_logged = False
    new_token_count = 0
    generating_s = 0.0
    from tqdm import tqdm

    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=f"generate {model_name}", unit="batch"):
        # left padding, so every prompt ends where generation starts
        width = max(len(encoded[i]) for i in batch)
        ids = [[pad_id] * (width - len(encoded[i])) + encoded[i] for i in batch]
        mask = [[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in batch]
        input_ids = torch.tensor(ids, device=device)
        batch_started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids, attention_mask=torch.tensor(mask, device=device),
                do_sample=False, max_new_tokens=max_new_tokens,
                pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
            )
        if not first_token_logged:
            log.info("startup: first batch generated %.2f s after process start",
                     seconds_since_start())
            first_token_logged = True
        new_tokens = out[:, width:]
        new_token_count += generated_tokens(new_tokens.tolist(), tokenizer.eos_token_id)
        generating_s += time.perf_counter() - batch_started
        for i, tokens in zip(batch, new_tokens, strict=True):
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            answers[i] = truncate_answer(text, stop_markers)
    speed = generation_throughput(model, new_token_count, len(prompts), generating_s,
                                  sum(map(len, encoded)))
    log.info("throughput: %s", describe(speed))
    rows = [{"prompt_id": p["prompt_id"], "prompt": p["prompt"], "answer": answers[i],
             "model": model_name} for i, p in enumerate(prompts)]
    record = make_record("generate", settings={
        "model_name": model_name, "prompt_template": prompt_template,
        "stop_markers": stop_markers, "max_new_tokens": max_new_tokens,
        "batch_size": batch_size, "seed": seed, "max_prompt_length": max_prompt_length},
        inputs={"model": model_input(model_dir, model_name), "prompts": file_input(prompts_path)})
    drop_sidecar(out_path)
    n = write_jsonl(out_path, rows)
    write_sidecar(out_path, record)
    empty = [r["prompt_id"] for r in rows if not r["answer"]]
    counts = {"answers": n, "empty": len(empty), **cap.counts(), "throughput": speed}
    if empty:
        log.warning("%d of %d answers are empty after truncation (e.g. %s)", len(empty), n,
                    ", ".join(empty[:5]))
    log.info("%d answers by %s written to %s (%.1f s); empty answers: %d; prompts truncated "
             "to %s tokens: %d", n, model_name, out_path, time.monotonic() - started,
             len(empty), max_prompt_length, cap.truncated)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sacpo_steps generate", description=__doc__)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--spec", required=True,
                        help="JSON: prompt_template, stop_markers, max_new_tokens, "
                        "batch_size, seed, max_prompt_length")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--log")
    args = parser.parse_args(argv)
    setup_logging(args.log)
    settings = GenerationSettings.from_dict(json_object_arg(args.spec, "--spec"))
    generate(args.model_dir, args.prompts, args.out, model_name=args.model_name,
             threads=args.threads, **settings.to_dict())
