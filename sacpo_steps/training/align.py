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
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.fileio import atomic_output, read_jsonl, setup_logging
from sacpo_steps.core.lineage import differences, file_input, make_record, model_input
from sacpo_steps.models.folders import (
    check_model_dir,
    read_lineage,
    set_threads,
    startup_callback,
    write_model_card,
)
from sacpo_steps.models.throughput import (
    cuda_device,
    describe,
    model_shape,
    rates,
    training_flops_per_token,
)
from sacpo_steps.models.tokens import PromptCap, prompt_problem, render_completion, render_prompt
from sacpo_steps.training.losses import DATA_KINDS, Loss, check_node, get_loss
from sacpo_steps.training.settings import PASSED_AS_IS, TrainingConfig

log = logging.getLogger("sacpo.align")

def load_examples(path: str | Path, loss: str | Loss, prompt_template: str, seed: int,
                  max_examples: int | None = None, *, tokenizer: Any = None,
                  prompt_cap: PromptCap | None = None) -> list[dict[str, Any]]:
    """Read the rows of the loss's data kind, rendered by the tokenization contract.

    Pairs (prompt/chosen/rejected) or labelled rows (prompt/completion/label), as
    `losses.DATA_KINDS` says. A prompt is text, or (with `prompt_template: chat`)
    a conversation: a list of {role, content} turns ending with the user's.
    `tokens.render_prompt`/`render_completion` shape each row as TRL will tokenize
    it, so training sees the same prompt ids as generation. With a `prompt_cap`
    (and the parent's tokenizer) long prompts keep their end, and a prompt that
    cannot fit is dropped and counted. Rows are shuffled with the seed: KTO's
    trainer samples sequentially and shuffles nothing itself.
    """
    kind = DATA_KINDS[get_loss(loss).data]
    rows = read_jsonl(path)
    if not rows:
        raise InputError("preference data is empty", path=path)
    examples = []
    for i, row in enumerate(rows, start=1):
        prompt = row.get("prompt")
        if not isinstance(prompt, list) and (not isinstance(prompt, str) or not prompt.strip()):
            raise InputError("missing or empty text", path=path, row=i, field="prompt")
        problem = prompt_problem(prompt_template, prompt)
        if problem:
            raise InputError(problem, path=path, row=i, field="prompt")
        for field in kind.answers:
            if not isinstance(row.get(field), str) or not row[field].strip():
                raise InputError("missing or empty text", path=path, row=i, field=field)
        if kind.label and not isinstance(row.get(kind.label), bool):
            raise InputError(f"{kind.label} must be true or false", path=path, row=i,
                             field=kind.label)
        if prompt_cap is not None:
            prompt = prompt_cap.apply(tokenizer, prompt_template, prompt)
            if prompt is None:
                continue
        example: dict[str, Any] = {"prompt": render_prompt(prompt_template, prompt)}
        for field in kind.answers:
            example[field] = render_completion(prompt_template, row[field])
        if kind.label:
            example[kind.label] = row[kind.label]
        examples.append(example)
    if not examples:
        raise InputError("no example fits training.max_prompt_length", path=path,
                         field="training.max_prompt_length")
    random.Random(seed).shuffle(examples)
    if max_examples:
        examples = examples[:max_examples]
    return examples


def kto_weights(examples: list[dict[str, Any]]) -> tuple[float, float]:
    """Desirable weight 1, undesirable n_desirable / n_undesirable (as in the paper)."""
    n_desirable = sum(1 for e in examples if e["label"])
    n_undesirable = len(examples) - n_desirable
    if n_desirable == 0 or n_undesirable == 0:
        raise InputError(f"KTO needs both labels; got {n_desirable} desirable and "
                         f"{n_undesirable} undesirable rows", field="label")
    return 1.0, n_desirable / n_undesirable


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


def trl_config(loss: str | Loss, training: TrainingConfig, *, beta: float,
               output_dir: str | Path, seed: int = 0,
               kto_weights: tuple[float, float] | None = None) -> Any:
    """The loss's TRL config object: the settings the pipeline maps itself, the entry's
    `loss_type` and `fixed` arguments, then `training.trl` (checked at plan time), and for
    labelled rows the KTO class weights (desirable, undesirable)."""
    entry = get_loss(loss)
    extra = {**entry.fixed, **training.trl}
    if kto_weights is not None:
        extra.update(desirable_weight=kto_weights[0], undesirable_weight=kto_weights[1])
    return entry.config_class()(
        output_dir=str(output_dir),
        **{key: getattr(training, key) for key in PASSED_AS_IS},
        beta=beta,
        logging_first_step=True,
        save_strategy="steps" if training.save_steps > 0 else "no",
        save_steps=training.save_steps if training.save_steps > 0 else 500,
        save_total_limit=1,
        save_only_model=False,
        report_to=[],
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        **({"loss_type": [entry.loss_type]} if entry.loss_type else {}),
        **extra,
    )


def build_trainer(
    parent_dir: str | Path,
    examples: list[dict[str, Any]],
    *,
    loss: str | Loss,
    beta: float,
    training: TrainingConfig,
    output_dir: str | Path,
    seed: int = 0,
    reference_dir: str | Path | None = None,
    ref_logps: str | Path | Any = None,  # a path, or an already read ReferenceTable
):
    """A TRL trainer whose policy starts from the parent and whose reference is the parent.

    The loss's registry entry names the TRL config and trainer; the config gets the
    entry's `loss_type` and `fixed` arguments, `training.trl`, and the settings the
    pipeline maps itself. `reference_dir` overrides the reference (only for controls
    and tests: SACPO's stage 2 must use its parent, i.e. the stage-1 model).
    `ref_logps`: the parent's reference log-probs of these rows, computed once by the
    `ref_logps` step; the trainer then runs no reference forward.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = get_loss(loss)
    if not beta > 0:
        raise InputError(f"beta must be > 0, got {beta}", field="beta")
    check_node(entry, stage2=False, training=asdict(training), where="")
    args = trl_config(entry, training, beta=beta, output_dir=output_dir, seed=seed,
                      kto_weights=kto_weights(examples) if entry.data == "kto" else None)
    tokenizer = AutoTokenizer.from_pretrained(parent_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model_kwargs: dict[str, Any] = {"dtype": "auto"}
    if training.quantization == "4bit":
        if not training.lora:
            raise InputError("quantization '4bit' needs a `lora` adapter (QLoRA)",
                             field="training.quantization")
        import torch
        from transformers import BitsAndBytesConfig

        if not torch.cuda.is_available():
            # measured: on CPU bitsandbytes' 4-bit layers give zero LoRA gradients
            # through TRL (or fail on small shapes), so the stage would train nothing
            raise InputError("quantization '4bit' (QLoRA) needs a CUDA GPU; this job sees "
                             "none. Drop `quantization` or run the job on a GPU.",
                             field="training.quantization")
        compute = torch.bfloat16 if training.bf16 else torch.float32
        model_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(parent_dir, **model_kwargs)
    peft_config = None
    if training.lora:
        from peft import LoraConfig

        lora = training.lora
        peft_config = LoraConfig(r=lora.get("r", 16), lora_alpha=lora.get("alpha", 32),
                                 lora_dropout=lora.get("dropout", 0.05),
                                 target_modules=lora.get("target_modules", "all-linear"),
                                 task_type="CAUSAL_LM")
    ref_model = None
    if reference_dir is not None:
        ref_model = AutoModelForCausalLM.from_pretrained(reference_dir, dtype="auto")
    dataset = shared_dataset(examples, Path(output_dir))
    trainer_class = entry.trainer_class()
    building = contextlib.nullcontext()
    if ref_logps is not None:
        from sacpo_steps.training.ref_logps import (
            ReferenceTable,
            cached_reference_trainer,
            no_reference_model,
        )

        if reference_dir is not None or not training.precompute_ref_log_probs:
            raise InputError("reference log-probs from a file need the parent as reference "
                             "and training.precompute_ref_log_probs", field="ref_logps")
        building = no_reference_model(trainer_class)
        table = ref_logps if isinstance(ref_logps, ReferenceTable) else ReferenceTable(ref_logps)
        trainer_class = cached_reference_trainer(trainer_class, table, entry.ref_columns)
    with building:
        return trainer_class(model=model, ref_model=ref_model, args=args,
                             train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config)


def shared_dataset(examples: list[dict[str, Any]], folder: Path):
    """The examples as a Dataset on disk, in a folder every process of the job opens.

    TRL writes the reference log-probs (and its tokenised copies) to cache files next
    to the dataset's own: rank 0 writes them, the other ranks read them. An in-memory
    dataset would put them in each process's private temporary folder, where the other
    ranks cannot find them. Every process may build the folder; the first rename wins
    (the content is the same).
    """
    from datasets import Dataset, load_from_disk

    blob = json.dumps(examples, sort_keys=True, ensure_ascii=False).encode("utf-8")
    final = folder / f"dataset-{hashlib.sha256(blob).hexdigest()[:16]}"
    if not final.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{final.name}.tmp-{os.getpid()}"
        Dataset.from_list(examples).save_to_disk(str(tmp))
        try:
            os.rename(tmp, final)
        except OSError:  # another process renamed its copy first
            shutil.rmtree(tmp, ignore_errors=True)
    return load_from_disk(str(final))


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process, as the launcher (accelerate, torchrun) set them."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def _discarded_dir():
    """A throwaway folder for a non-zero rank's share of the save calls (they write
    nothing of the model; only rank 0 publishes)."""
    with tempfile.TemporaryDirectory(prefix="sacpo-rank-") as tmp:
        yield Path(tmp)


def save_merged_adapter(trainer, parent_dir: Path, out: Path, training: TrainingConfig) -> None:
    """Save a LoRA stage as a FULL model (adapter merged into the parent's weights).

    TRL's reference for a PEFT policy is the base with the adapter disabled. If a
    LoRA stage 1 were passed on as an adapter, stage 2's reference would silently be
    SFT; merging makes the stage-1 model an ordinary model that stage 2 starts from
    and refers to. A 4-bit (QLoRA) base is reloaded at full precision for the merge.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = out / ".adapter"
    state_dict = None
    if trainer.is_fsdp_enabled:
        # the weights are shards (DTensors) on every rank: gather the full state dict
        # (a collective, so every rank calls it; rank 0 receives it) and save that
        state_dict = trainer.accelerator.get_state_dict(trainer.model)
    if trainer.accelerator.is_main_process:
        trainer.model.save_pretrained(adapter_dir, state_dict=state_dict)
        base = AutoModelForCausalLM.from_pretrained(parent_dir, dtype="auto")
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        merged.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(adapter_dir, ignore_errors=True)


def align(
    parent_dir: str | Path,
    data_path: str | Path,
    out_dir: str | Path,
    *,
    name: str,
    parent: str,
    data: str,
    loss: str,
    beta: float,
    training: TrainingConfig,
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
    last one; the model folder appears only once training has finished.
    """
    started = time.monotonic()
    rank, world = process_rank()
    if world > 1 and not checkpoint_dir:
        raise InputError(f"{world} processes need --checkpoint-dir, a folder they all share "
                         "(the trainer's state and the dataset cache live there)",
                         field="checkpoint_dir")
    entry = get_loss(loss)
    check_node(entry, stage2=False, training=asdict(training), where="")
    parent_dir = check_model_dir(parent_dir, role=f"parent model '{parent}'")
    cap = PromptCap(training.max_prompt_length)
    tokenizer = None
    if cap.max_prompt_length:  # only a cap needs the tokenizer before the trainer loads it
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(parent_dir)
    examples = load_examples(data_path, entry, prompt_template, seed, training.max_examples,
                             tokenizer=tokenizer, prompt_cap=cap)
    set_threads(threads)
    table = None
    inputs = {"parent": model_input(parent_dir, parent), "data": file_input(data_path)}
    if ref_logps is not None:
        from sacpo_steps.training.ref_logps import ReferenceTable

        table = ReferenceTable(ref_logps)
        table.check_settings(loss=entry.name, training=training, prompt_template=prompt_template)
        table.check_reference(inputs["parent"])
        inputs["ref_logps"] = file_input(ref_logps)
    if reference_dir is not None:
        inputs["reference"] = model_input(reference_dir, Path(reference_dir).name)
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
        trainer = build_trainer(parent_dir, examples, loss=entry, beta=beta, training=training,
                                output_dir=work_dir, seed=seed,
                                reference_dir=reference_dir, ref_logps=table)
        if trainer.accelerator.num_processes != world:
            # e.g. `accelerate launch` on a machine without GPUs and without
            # ACCELERATE_USE_CPU: every process would train alone (1/N of the global
            # batch) and rank 0 would publish its model as if nothing were wrong
            raise InputError(f"launched as {world} processes, but the trainer sees "
                             f"{trainer.accelerator.num_processes}: they do not form one job "
                             "(no GPU visible? on CPU set ACCELERATE_USE_CPU=true)")
        trainer.add_callback(startup_callback(log))
        log.info("%d examples, loss %s, beta %g; reference: %s%s", len(examples), loss, beta,
                 parent if reference_dir is None else reference_dir,
                 f" (log-probs from {ref_logps})" if ref_logps else "")
        resume = last_checkpoint(work_dir)
        if resume:
            log.info("resuming from %s", resume)
        result = trainer.train(resume_from_checkpoint=resume)
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        speed = training_throughput(trainer, result,
                                    start_step=int(resume.name.split("-")[-1]) if resume else 0)
        log.info("throughput: %s", describe(speed))
        if training.lora:
            save_merged_adapter(trainer, parent_dir, tmp, training)
        else:
            trainer.save_model(str(tmp))
        trainer.processing_class.save_pretrained(tmp)
        shutil.rmtree(tmp / ".trainer", ignore_errors=True)
        resumed_from = resume.name if resume else None
        (tmp / "training_args.bin").unlink(missing_ok=True)
        stage = {"name": name, "parent": parent, "data": data, "loss": loss, "beta": beta}
        summary = {
            "name": name,
            "method": loss,
            "loss_type": entry.loss_type,
            "coefficient": entry.coefficient,
            "description": (f"{loss.upper()} on '{data}' from '{parent}' (initial policy and "
                            f"reference), coefficient beta = {beta}."),
            "lineage": read_lineage(parent_dir).get("lineage", []) + [stage],
            "prompt_template": prompt_template,
            "reference": parent if reference_dir is None else str(reference_dir),
            "training": {
                **asdict(training), "seed": seed, "examples": len(examples),
                "prompt_cap": cap.counts(),
                "global_batch_size": training.per_device_train_batch_size
                * training.gradient_accumulation_steps * trainer.accelerator.num_processes,
                "steps": trainer.state.global_step,
                "resumed_from": resumed_from,
                "first_loss": losses[0] if losses else None,
                "final_loss": losses[-1] if losses else None,
                "train_runtime_s": round(result.metrics.get("train_runtime", math.nan), 2),
            },
            "throughput": speed,
            "reference_logps": str(ref_logps) if ref_logps else None,
            "record": record,
        }
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


def training_throughput(trainer, result, *, start_step: int = 0) -> dict[str, Any]:
    """Tokens/s (non-padding, all processes), samples/s and, on a GPU, MFU of this run.

    TRL counts the attention-masked tokens it trains on (`num_tokens` in its logs, a
    running total over every process); a resumed run counts from its restart. Samples
    are training rows, as TRL counts them (a DPO pair is one: its chosen and rejected
    sequences are two); the MFU's sequence length is the sequences' mean length.
    """
    seconds = float(result.metrics.get("train_runtime", math.nan))
    tokens = getattr(trainer, "_total_train_tokens", None)  # TRL 1.16's running total
    if tokens is None:
        tokens = max((e["num_tokens"] for e in trainer.state.log_history if "num_tokens" in e),
                     default=0)
    rows = (trainer.state.global_step - start_step) * trainer.args.per_device_train_batch_size \
        * trainer.args.gradient_accumulation_steps * trainer.accelerator.num_processes
    if trainer.args.max_steps <= 0:  # the last batch of an epoch can be short
        rows = min(rows, math.ceil(len(trainer.train_dataset) * trainer.args.num_train_epochs))
    sequences = rows * (2 if "chosen_ids" in trainer.train_dataset.column_names else 1)
    gpus, device = cuda_device()
    shape = model_shape(trainer.accelerator.unwrap_model(trainer.model)) if gpus else None
    flops = training_flops_per_token(shape, tokens / max(sequences, 1)) if shape else None
    return rates(tokens=tokens, samples=rows, seconds=seconds, flops_per_token=flops,
                 gpus=gpus * trainer.accelerator.num_processes, device_name=device)


def skip_unused_imports(training: TrainingConfig) -> list[str]:
    """Keep PEFT and bitsandbytes out of a step process whose node uses neither.

    transformers and TRL import both whenever they are installed; bitsandbytes pulls
    in torch's compiler (measured here: 2 s of the 10 s TRL import, 0.7 s of the align
    step's start-up; bench/align_startup.py).
    A None entry in `sys.modules` makes `import` fail and `importlib.util.find_spec`
    report the package missing, which is what both libraries check. Only for a fresh
    step process (the CLI): in a process that later trains a LoRA node it would break.
    Returns the packages hidden.
    """
    wanted = {"peft": bool(training.lora), "bitsandbytes": bool(training.quantization)}
    hidden = [name for name, needed in wanted.items() if not needed and name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    return hidden


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
    training = TrainingConfig.from_dict(spec.get("training", {}))
    hidden = skip_unused_imports(training)
    if hidden:
        log.info("not imported (the node does not use them): %s", ", ".join(hidden))
    align(args.parent_dir, args.data, args.out, name=spec["name"], parent=spec["parent"],
          data=spec["data"], loss=spec["loss"], beta=float(spec["beta"]),
          training=training,
          prompt_template=spec["prompt_template"], seed=int(spec.get("seed", 0)),
          threads=args.threads, checkpoint_dir=args.checkpoint_dir, ref_logps=args.ref_logps)
