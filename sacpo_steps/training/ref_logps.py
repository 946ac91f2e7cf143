"""The ref_logps step: one reference pass, shared by every node that agrees on it.

It builds the node's TRL trainer on the reference model (`trainer.build_trainer`),
lets TRL's own precompute pass run, and stores the columns it added (the loss
registry's `ref_columns`) in row order, each row with a key of its token ids, with
the lineage record of the pass. `reference.py` describes the file and reads it back.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.fileio import atomic_output, setup_logging
from sacpo_steps.core.lineage import file_input, make_record, model_input
from sacpo_steps.models.folders import check_model_dir, set_threads
from sacpo_steps.models.tokens import PromptCap
from sacpo_steps.training.losses import Loss, get_loss
from sacpo_steps.training.node import NodeSettings
from sacpo_steps.training.reference import FORMAT, row_keys
from sacpo_steps.training.settings import TrainingConfig
from sacpo_steps.training.trainer import (
    build_trainer,
    load_examples,
    process_rank,
    skip_unused_imports,
)

log = logging.getLogger("sacpo.ref_logps")


def compute(reference_dir: str | Path, data_path: str | Path, out: str | Path, *,
            spec: dict[str, Any], scratch_dir: str | Path | None = None,
            threads: int | None = None) -> dict[str, Any]:
    """Run TRL's precompute pass of the spec's loss on the reference; write the columns.

    `spec`: reference, data, loss, prompt_template, seed and the reference settings of
    `training` (the rest takes the schema's defaults; it does not touch this pass).
    Every process of a multi-GPU launch takes part (TRL gathers the rows); rank 0
    writes. `scratch_dir` is the folder the processes share (needed with several).
    """
    started = time.monotonic()
    rank, world = process_rank()
    if world > 1 and not scratch_dir:
        raise InputError(f"{world} processes need --scratch-dir, a folder they all share",
                         field="scratch_dir")
    entry: Loss = get_loss(spec["loss"])
    if not entry.ref_columns:
        raise InputError(f"loss {entry.name!r} reads no reference log-probs", field="loss")
    training = TrainingConfig.from_dict({**spec.get("training", {}),
                                         "precompute_ref_log_probs": True})
    reference_dir = check_model_dir(reference_dir, role=f"reference model '{spec['reference']}'")
    set_threads(threads)
    lineage = make_record("ref_logps", settings=spec, inputs={
        "reference": model_input(reference_dir, spec["reference"]),
        "data": file_input(data_path)})
    set_threads(threads)
    cap = PromptCap(training.max_prompt_length)
    tokenizer = None
    if cap.max_prompt_length:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(reference_dir)
    examples = load_examples(data_path, entry, spec["prompt_template"], int(spec["seed"]),
                             training.max_examples, tokenizer=tokenizer, prompt_cap=cap)
    with contextlib.ExitStack() as stack:
        work = Path(scratch_dir) if scratch_dir else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="sacpo-ref-")))
        # beta does not enter the reference pass; any valid value builds the trainer
        # nor does a margin (it shifts or sits beside the reference log-probs)
        settings = NodeSettings(entry.name, 1.0, training,
                                margin=0.0 if entry.margin is not None else None)
        trainer = build_trainer(reference_dir, examples, settings, output_dir=work,
                                seed=int(spec["seed"]))
        dataset = trainer.train_dataset
        missing = [c for c in entry.ref_columns if c not in dataset.column_names]
        if missing:
            raise InputError(f"TRL's precompute pass added no {missing} (settings: "
                             f"{spec.get('training')}); loss {entry.name!r} needs them",
                             field="loss")
        record = {
            "format": FORMAT,
            "spec": spec,
            "record": lineage,
            "columns": list(entry.ref_columns),
            "keys": row_keys(dataset),
            "values": [[float(v) for v in dataset[c]] for c in entry.ref_columns],
        }
        if trainer.accelerator.is_main_process:
            with atomic_output(out) as tmp:
                tmp.write_text(json.dumps(record), encoding="utf-8")
        seconds = time.monotonic() - started
        if world > 1:
            trainer.accelerator.end_training()
    log.info("reference log-probs of %d rows (%s) from '%s' written to %s (%.1f s)",
             len(record["keys"]), ", ".join(record["columns"]), spec["reference"], out, seconds)
    return {"rows": len(record["keys"]), "columns": record["columns"], "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sacpo_steps ref_logps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-dir", required=True, help="the nodes' parent model")
    parser.add_argument("--data", required=True, help="the JSONL file the nodes train on")
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--spec", required=True,
                        help="JSON: reference, data, loss, prompt_template, seed, training")
    parser.add_argument("--scratch-dir", help="a folder every process of the job shares")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--log")
    args = parser.parse_args(argv)
    setup_logging(args.log)
    spec = json.loads(args.spec)
    hidden = skip_unused_imports(TrainingConfig.from_dict(spec.get("training", {})))
    if hidden:
        log.info("not imported (the node does not use them): %s", ", ".join(hidden))
    compute(args.reference_dir, args.data, args.out, spec=spec,
            scratch_dir=args.scratch_dir, threads=args.threads)
