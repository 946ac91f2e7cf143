"""The SFT checkpoint, built or linked (a hub SFT is the `download_model` step's).

- `local`: an existing model folder, checked and hard-linked into place.
- `build`: the offline demo: a byte-level BPE tokenizer trained on the demo corpus,
  a tiny Llama-style model created from config, SFT-trained with TRL's SFTTrainer.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.fileio import atomic_output, read_jsonl, setup_logging
from sacpo_steps.core.lineage import file_input, make_record, model_input, model_record
from sacpo_steps.models.folders import (
    LINEAGE_FILE,
    check_model_dir,
    link_or_copy_tree,
    set_threads,
    startup_callback,
    write_model_card,
)
from sacpo_steps.models.tokens import is_chat, render_completion, render_prompt

log = logging.getLogger("sacpo.sft_checkpoint")

#: Llama's special tokens (ids 0-2), plus a pad token Llama lacks
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
                  "pad_token": "<pad>"}
#: Llama's byte-fallback pieces: any character outside the vocabulary still round-trips
BYTE_PIECES = [f"<0x{i:02X}>" for i in range(256)]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A Llama-style tokenizer trained on the demo corpus, so the demo runs a 7B run's path.

    Like Llama-2's SentencePiece tokenizer as transformers loads it: BPE over
    words that carry their leading space as "\u2581", a "\u2581" prepended to the
    text, byte fallback, no normaliser, BOS added to every encoding. It is
    trained with `tokenizers` on whitespace-split words (so no piece spans two
    words, as in SentencePiece) and loaded as transformers' `LlamaTokenizer`.
    """
    import json as _json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"], byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first",
                                                 split=True)
    chars = {ch for text in texts for ch in text if ch.isprintable() or ch == "\n"}
    alphabet = sorted((chars | {"\u2581"}) - {" "})
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()) + BYTE_PIECES,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    model = _json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return LlamaTokenizer(vocab=model["vocab"], merges=merges, add_bos_token=True,
                          add_eos_token=False, legacy=False, **SPECIAL_TOKENS)


def load_sft_corpus(path: str | Path, template: str) -> list[dict[str, str]]:
    """Prompt-completion rows rendered by the one tokenization contract (`tokens.py`)."""
    rows = read_jsonl(path)
    if not rows:
        raise InputError("SFT corpus is empty", path=path)
    out = []
    for i, row in enumerate(rows, start=1):
        for field in ("prompt", "response"):
            if not isinstance(row.get(field), str) or not row[field].strip():
                raise InputError("missing or empty text", path=path, row=i, field=field)
        out.append({"prompt": render_prompt(template, row["prompt"]),
                    "completion": render_completion(template, row["response"])})
    return out


def build(spec: dict[str, Any], corpus: str | Path, out: Path, threads: int | None) -> None:
    """Train the demo's tokenizer and tiny SFT model into `out`."""
    import torch
    from datasets import Dataset, disable_caching
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    disable_caching()
    set_threads(threads)
    build_cfg = spec["build"]
    train_cfg = build_cfg["train"]
    seed = int(spec.get("seed", 0))
    if is_chat(spec["prompt_template"]):
        raise InputError("a built SFT model has no chat template: give `prompt_template` a "
                         "format string with {prompt}", field="prompt_template")
    rows = load_sft_corpus(corpus, spec["prompt_template"])
    tokenizer = train_tokenizer([r["prompt"] + r["completion"] for r in rows],
                                build_cfg["tokenizer"]["vocab_size"])
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **build_cfg["model"],
    )
    model = LlamaForCausalLM(config)
    log.info("tiny model: %.2fM parameters, vocab %d", model.num_parameters() / 1e6, len(tokenizer))
    with atomic_output(out, is_dir=True) as tmp:
        args = SFTConfig(
            output_dir=str(tmp / ".trainer"),
            num_train_epochs=train_cfg["epochs"],
            per_device_train_batch_size=train_cfg["per_device_batch_size"],
            gradient_accumulation_steps=train_cfg.get("gradient_accumulation_steps", 1),
            learning_rate=train_cfg["learning_rate"],
            lr_scheduler_type=train_cfg.get("lr_scheduler", "cosine"),
            warmup_steps=float(train_cfg.get("warmup_ratio", 0.0)),  # a float < 1 is a ratio
            max_length=train_cfg["max_length"],
            seed=seed,
            bf16=False,
            gradient_checkpointing=False,
            save_strategy="no",
            report_to=[],
            logging_steps=train_cfg.get("logging_steps", 20),
            dataloader_num_workers=0,
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer)
        trainer.add_callback(startup_callback(log))
        trainer.train()
        trainer.model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(tmp / ".trainer", ignore_errors=True)
        write_model_card(tmp, {
            "name": spec["name"],
            "method": "sft",
            "description": "Tiny Llama-style SFT model of the offline demo world.",
            "lineage": [],
            "prompt_template": spec["prompt_template"],
            "training": {"source": "build", **train_cfg, "model": build_cfg["model"],
                         "tokenizer": build_cfg["tokenizer"], "seed": seed,
                         "final_loss": _last_loss(trainer)},
            "record": make_record("sft_checkpoint", name=spec["name"],
                                  settings={k: v for k, v in spec.items() if k != "name"},
                                  inputs={"corpus": file_input(corpus)}),
        })


def _last_loss(trainer) -> float | None:
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return float(losses[-1]) if losses else None


def link_local(spec: dict[str, Any], out: Path) -> None:
    src = check_model_dir(spec["local"]["path"], role="local SFT model (sft.local.path)")
    with atomic_output(out, is_dir=True) as tmp:
        link_or_copy_tree(src, tmp)
        if model_record(src) is None:
            # a folder the pipeline did not make: its record names where it came from
            # (a new file, not a link, so the source folder is never written to)
            # (its model card stays the source's own)
            (tmp / LINEAGE_FILE).unlink(missing_ok=True)
            name = spec.get("name") or src.resolve().name
            # the folder's place is not its content: its fingerprint is in the inputs
            record = make_record("sft_checkpoint", name=name, settings={
                k: v for k, v in spec.items() if k not in ("name", "local")}, inputs={
                "source": model_input(src, name)})
            (tmp / LINEAGE_FILE).write_text(json.dumps(
                {"name": name, "method": "sft", "lineage": [], "record": record},
                indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sacpo_steps sft_checkpoint", description=__doc__)
    parser.add_argument("--spec", required=True, help="JSON: the config's `sft` section")
    parser.add_argument("--corpus", help="SFT corpus JSONL (source: build)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--log")
    args = parser.parse_args(argv)
    setup_logging(args.log)
    spec = json.loads(args.spec)
    start = time.monotonic()
    source = spec.get("source")
    if source == "build":
        if not args.corpus:
            raise InputError("source 'build' needs --corpus", field="sft.source")
        build(spec, args.corpus, Path(args.out), args.threads)
    elif source == "local":
        link_local(spec, Path(args.out))
    else:
        raise InputError(f"unknown source {source!r} (build | local; a hub SFT is the "
                         "download_model step's)", field="sft.source")
    log.info("sft checkpoint (%s) ready in %s after %.1f s", source, args.out,
             time.monotonic() - start)
