"""The one alignment step of every stage: a registered loss from a parent model.

SACPO's stages differ only in their data, loss and coefficient: stage 1 aligns
the SFT model to helpfulness with beta; stage 2 starts from the stage-1 model
and uses it as the *reference* with coefficient beta/lambda (Theorem 1 of the
paper). So the parent is both the initial policy and the reference, and `beta`
is the node's own loss coefficient (for a stage-2 node, the paper's beta/lambda).
Losses (DPO, IPO, KTO, ...) are entries of `losses.LOSSES`; the training settings
are `training.settings.TrainingConfig`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.fileio import atomic_output, setup_logging
from sacpo_steps.core.lineage import differences, file_input, make_record, model_input
from sacpo_steps.models.folders import (
    check_model_dir,
    read_lineage,
    set_threads,
    startup_callback,
    write_model_card,
)
from sacpo_steps.models.throughput import describe
from sacpo_steps.models.tokens import PromptCap
from sacpo_steps.training.node import NodeSettings
from sacpo_steps.training.reference import ReferenceTable
from sacpo_steps.training.trainer import (
    build_trainer,
    load_examples,
    process_rank,
    save_merged_adapter,
    skip_unused_imports,
    training_throughput,
)

log = logging.getLogger("sacpo.align")


def last_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete `checkpoint-N` folder (a torn one has no trainer_state.json)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*")
            if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


CHECKPOINT_RECORD = "lineage.json"


def checkpoints_of(folder: Path, record: dict[str, Any], *, owner: bool) -> None:
    """Keep the trainer checkpoints in `folder` only if they were made for `record`.

    The folder is keyed by the node's settings and its parent's *name*: after the parent
    was retrained (or the data, the code or a library changed) a checkpoint there
    belongs to another model. Its lineage record (written when training starts) must
    match this job's, otherwise the folder is set aside and training starts fresh, and
    the log says why. Only the owner (rank 0) moves it; the other ranks wait until the
    folder holds THIS job's record, which the owner writes only after the stale folder
    is out of the way (renamed atomically, deleted last), so every rank sees the same
    checkpoints.
    """
    saved = folder / CHECKPOINT_RECORD
    if owner:
        stale = None
        if saved.is_file():
            old = _read_checkpoint_record(saved)
            if old.get("fingerprint") != record["fingerprint"]:
                stale = "; ".join(differences(old, record))
        elif folder.exists():
            stale = "it has no lineage record (made before records existed)"
        aside = None
        if stale is not None:
            found = last_checkpoint(folder)
            if found is not None:
                log.warning("not resuming from %s: it was made for another model: %s; "
                            "training starts fresh", found, stale)
            aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.stale-", dir=folder.parent))
            os.replace(folder, aside)
        if not saved.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_output(saved) as tmp:
                tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        return
    deadline = time.monotonic() + 600
    while True:  # the owner decides and writes this job's record first
        if saved.is_file() and _read_checkpoint_record(saved).get("fingerprint") == \
                record["fingerprint"]:
            return
        if time.monotonic() > deadline:
            raise InputError("rank 0 wrote no lineage record of this job into the checkpoint "
                             "folder within 600 s", path=folder)
        time.sleep(0.2)


def _read_checkpoint_record(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}  # being replaced, or torn: no record that matches
    return found if isinstance(found, dict) else {}


@contextlib.contextmanager
def _discarded_dir():
    """A throwaway folder for a non-zero rank's share of the save calls (they write
    nothing of the model; only rank 0 publishes)."""
    with tempfile.TemporaryDirectory(prefix="sacpo-rank-") as tmp:
        yield Path(tmp)


def align(
    parent_dir: str | Path,
    data_path: str | Path,
    out_dir: str | Path,
    *,
    name: str,
    parent: str,
    data: str,
    settings: NodeSettings,
    prompt_template: str,
    seed: int = 0,
    threads: int | None = None,
    reference_dir: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    ref_logps: str | Path | None = None,
) -> dict[str, Any]:
    """Train one alignment node and write its model folder atomically; return its summary.

    Trainer checkpoints go to `checkpoint_dir` (scratch, not a declared output, keyed
    by the node's parameters by the caller): a rerun of a killed job resumes from the
    last one; the model folder appears only once training has finished. `settings`
    were checked when built (the plan's, or the step's from its spec).
    """
    started = time.monotonic()
    loss, beta, training = settings.loss, settings.beta, settings.training
    rank, world = process_rank()
    if world > 1 and not checkpoint_dir:
        raise InputError(f"{world} processes need --checkpoint-dir, a folder they all share "
                         "(the trainer's state and the dataset cache live there)",
                         field="checkpoint_dir")
    parent_dir = check_model_dir(parent_dir, role=f"parent model '{parent}'")
    examples, cap = _rows(parent_dir, data_path, settings, prompt_template, seed)
    set_threads(threads)
    inputs, table = _inputs(parent_dir, parent, data_path, settings, prompt_template,
                            reference_dir=reference_dir, ref_logps=ref_logps)
    record = make_record("align", name=name, inputs=inputs, settings={
        "data": data, "loss": loss, "beta": beta, "training": asdict(training),
        "prompt_template": prompt_template, "seed": seed})
    log.info("prompt cap %s: %d of %d prompts truncated (start cut), %d dropped",
             cap.max_prompt_length, cap.truncated, cap.seen, cap.dropped)
    out_dir = Path(out_dir)
    # Every process trains and takes part in the save calls (FSDP gathers the weights
    # there); only rank 0 writes the model folder and moves it into place.
    publish = atomic_output(out_dir, is_dir=True) if rank == 0 else _discarded_dir()
    with publish as tmp:
        work_dir = Path(checkpoint_dir) if checkpoint_dir else tmp / ".trainer"
        if checkpoint_dir:
            checkpoints_of(work_dir, record, owner=rank == 0)
        trainer = build_trainer(parent_dir, examples, settings, output_dir=work_dir, seed=seed,
                                reference_dir=reference_dir, ref_logps=table)
        _check_one_job(trainer, world)
        trainer.add_callback(startup_callback(log))
        log.info("%d examples, loss %s, beta %g; reference: %s%s", len(examples), loss, beta,
                 parent if reference_dir is None else reference_dir,
                 f" (log-probs from {ref_logps})" if ref_logps else "")
        resume = last_checkpoint(work_dir)
        if resume:
            log.info("resuming from %s", resume)
        result = trainer.train(resume_from_checkpoint=resume)
        speed = training_throughput(trainer, result,
                                    start_step=int(resume.name.split("-")[-1]) if resume else 0)
        log.info("throughput: %s", describe(speed))
        _save_model(trainer, parent_dir, tmp, training)
        summary = _summary(trainer, result, name=name, parent=parent, data=data,
                           settings=settings, parent_dir=parent_dir,
                           prompt_template=prompt_template, seed=seed, examples=len(examples),
                           cap=cap, resume=resume, speed=speed, reference_dir=reference_dir,
                           ref_logps=ref_logps, record=record)
        if trainer.accelerator.is_main_process:
            write_model_card(tmp, summary)
    if checkpoint_dir and trainer.accelerator.is_main_process:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # finished: nothing to resume
    if world > 1:
        # close the process group: a rank exiting with it open could abort at exit
        # ("terminate called without an active exception", seen with gloo) and fail
        # a job whose model is already published
        trainer.accelerator.end_training()
    if rank == 0:
        log.info("aligned model '%s' written to %s (%.1f s)", name, out_dir,
                 time.monotonic() - started)
    else:
        log.info("rank %d of %d done (%.1f s)", rank, world, time.monotonic() - started)
    return summary


def _check_one_job(trainer: Any, world: int) -> None:
    """Refuse processes that do not form one job: e.g. `accelerate launch` on a machine
    without GPUs and without ACCELERATE_USE_CPU, where every process would train alone
    (1/N of the global batch) and rank 0 would publish its model as if nothing were
    wrong."""
    if trainer.accelerator.num_processes != world:
        raise InputError(f"launched as {world} processes, but the trainer sees "
                         f"{trainer.accelerator.num_processes}: they do not form one job "
                         "(no GPU visible? on CPU set ACCELERATE_USE_CPU=true)")


def _save_model(trainer: Any, parent_dir: Path, folder: Path, training: Any) -> None:
    """The trained model (a LoRA stage merged into full weights) and its tokenizer, without
    the trainer's scratch and arguments."""
    if training.lora:
        save_merged_adapter(trainer, parent_dir, folder, training)
    else:
        trainer.save_model(str(folder))
    trainer.processing_class.save_pretrained(folder)
    shutil.rmtree(folder / ".trainer", ignore_errors=True)
    (folder / "training_args.bin").unlink(missing_ok=True)


def _rows(parent_dir: Path, data_path: str | Path, settings: NodeSettings,
          prompt_template: str, seed: int) -> tuple[list[dict[str, Any]], PromptCap]:
    """The training rows (shuffled with the seed, capped) and the prompt cap's counts."""
    cap = PromptCap(settings.training.max_prompt_length)
    tokenizer = None
    if cap.max_prompt_length:  # only a cap needs the tokenizer before the trainer loads it
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(parent_dir)
    examples = load_examples(data_path, settings.entry, prompt_template, seed,
                             settings.training.max_examples, tokenizer=tokenizer,
                             prompt_cap=cap, margin=settings.margin)
    return examples, cap


def _inputs(parent_dir: Path, parent: str, data_path: str | Path, settings: NodeSettings,
            prompt_template: str, *, reference_dir: str | Path | None,
            ref_logps: str | Path | None) -> tuple[dict[str, Any], ReferenceTable | None]:
    """The lineage inputs of the job, and the shared reference file (checked against the
    node's settings and its parent) when it reads one."""
    table = None
    inputs = {"parent": model_input(parent_dir, parent), "data": file_input(data_path)}
    if ref_logps is not None:
        table = ReferenceTable(ref_logps)
        table.check_settings(loss=settings.entry.reference_name, training=settings.training,
                             prompt_template=prompt_template)
        table.check_reference(inputs["parent"])
        inputs["ref_logps"] = file_input(ref_logps)
    if reference_dir is not None:
        inputs["reference"] = model_input(reference_dir, Path(reference_dir).name)
    return inputs, table


def _summary(trainer: Any, result: Any, *, name: str, parent: str, data: str,
             settings: NodeSettings, parent_dir: Path, prompt_template: str, seed: int,
             examples: int, cap: PromptCap, resume: Path | None, speed: dict[str, Any],
             reference_dir: str | Path | None, ref_logps: str | Path | None,
             record: dict[str, Any]) -> dict[str, Any]:
    """The model card of a trained node: what it is, where it comes from, how it trained."""
    loss, beta, training, entry = settings.loss, settings.beta, settings.training, \
        settings.entry
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    stage = {"name": name, "parent": parent, "data": data, "loss": loss, "beta": beta}
    margin = ""
    if settings.margin is not None:  # SafeDPO's Delta, BSO's C
        stage["margin"] = settings.margin
        margin = f", margin {settings.margin}"
    return {
        "name": name,
        "method": loss,
        "loss_type": entry.loss_type,
        "coefficient": entry.coefficient,
        "description": (f"{loss.upper()} on '{data}' from '{parent}' (initial policy and "
                        f"reference), coefficient beta = {beta}{margin}."),
        "lineage": read_lineage(parent_dir).get("lineage", []) + [stage],
        "prompt_template": prompt_template,
        "reference": parent if reference_dir is None else str(reference_dir),
        "training": {
            **asdict(training), "seed": seed, "examples": examples,
            "prompt_cap": cap.counts(),
            "global_batch_size": training.per_device_train_batch_size
            * training.gradient_accumulation_steps * trainer.accelerator.num_processes,
            "steps": trainer.state.global_step,
            "resumed_from": resume.name if resume else None,
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "train_runtime_s": round(result.metrics.get("train_runtime", math.nan), 2),
        },
        "throughput": speed,
        "reference_logps": str(ref_logps) if ref_logps else None,
        "record": record,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sacpo_steps align", description=__doc__)
    parser.add_argument("--parent-dir", required=True)
    parser.add_argument("--data", required=True,
                        help="JSONL rows of the loss's data kind: pairs or labelled rows")
    parser.add_argument("--out", required=True)
    parser.add_argument("--spec", required=True,
                        help="JSON: name, parent, data, loss, beta, training, "
                        "prompt_template, seed")
    parser.add_argument("--checkpoint-dir",
                        help="scratch folder for trainer checkpoints (resume after a kill)")
    parser.add_argument("--ref-logps",
                        help="the parent's reference log-probs of these rows (ref_logps step)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--log")
    args = parser.parse_args(argv)
    setup_logging(args.log)
    spec = json.loads(args.spec)
    settings = NodeSettings.from_dict(spec)
    hidden = skip_unused_imports(settings.training)
    if hidden:
        log.info("not imported (the node does not use them): %s", ", ".join(hidden))
    align(args.parent_dir, args.data, args.out, name=spec["name"], parent=spec["parent"],
          data=spec["data"], settings=settings, prompt_template=spec["prompt_template"],
          seed=int(spec.get("seed", 0)),
          threads=args.threads, checkpoint_dir=args.checkpoint_dir, ref_logps=args.ref_logps)
