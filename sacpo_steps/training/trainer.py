"""A TRL trainer for one alignment node, and the rows it trains on.

The align step (training) and the ref_logps step (the reference pass alone) build
their trainers here, so both tokenize, batch and load the reference exactly alike:
the registered loss names the TRL config and trainer, the node's settings fill the
config, and the parent is the initial policy and the reference.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.fileio import read_jsonl
from sacpo_steps.models import trl_adapter
from sacpo_steps.models.throughput import (
    cuda_device,
    model_shape,
    rates,
    training_flops_per_token,
)
from sacpo_steps.models.tokens import PromptCap, prompt_problem, render_completion, render_prompt
from sacpo_steps.training import safe_pairs
from sacpo_steps.training.losses import DATA_KINDS, Loss, get_loss
from sacpo_steps.training.node import NodeSettings
from sacpo_steps.training.reference import ReferenceTable, cached_reference_trainer
from sacpo_steps.training.settings import PASSED_AS_IS, TrainingConfig

log = logging.getLogger("sacpo.align")


def load_examples(path: str | Path, loss: str | Loss, prompt_template: str, seed: int,
                  max_examples: int | None = None, *, tokenizer: Any = None,
                  prompt_cap: PromptCap | None = None,
                  margin: float | None = None) -> list[dict[str, Any]]:
    """Read the rows of the loss's data kind, rendered by the tokenization contract.

    Pairs (prompt/chosen/rejected) or labelled rows (prompt/completion/label), as
    `losses.DATA_KINDS` says. A prompt is text, or (with `prompt_template: chat`)
    a conversation: a list of {role, content} turns ending with the user's.
    `tokens.render_prompt`/`render_completion` shape each row as TRL will tokenize
    it, so training sees the same prompt ids as generation. With a `prompt_cap`
    (and the parent's tokenizer) long prompts keep their end, and a prompt that
    cannot fit is dropped and counted. Rows are shuffled with the seed: KTO's
    trainer samples sequentially and shuffles nothing itself.

    A loss with a transformation (SafeDPO's reordering by safety labels) gets the
    transformed rows; one with a margin gets each row's `safety_margin` (`margin`,
    its node's Delta, times h_l - h_w; 0 when not given, as for its reference pass).
    """
    entry = get_loss(loss)
    kind = DATA_KINDS[entry.data]
    rows = read_jsonl(path)
    if not rows:
        raise InputError("preference data is empty", path=path)
    _check_flags(rows, kind.flags, path)
    if entry.transform is not None:
        counts: collections.Counter[str] = collections.Counter()
        rows = list(entry.transform(rows, counts))
        log.info("%s's transformation of %s: %s", entry.name, path,
                 ", ".join(f"{case} {n}" for case, n in sorted(counts.items())))
        if not rows:
            raise InputError(f"loss {entry.name!r} keeps no row of this data after its "
                             f"transformation ({dict(counts)})", path=path)
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
        if entry.margin is not None:
            example[safe_pairs.MARGIN] = safe_pairs.margin_of(row, margin or 0.0)
        examples.append(example)
    if not examples:
        raise InputError("no example fits training.max_prompt_length", path=path,
                         field="training.max_prompt_length")
    random.Random(seed).shuffle(examples)
    if max_examples:
        examples = examples[:max_examples]
    return examples


def _check_flags(rows: list[dict[str, Any]], flags: tuple[str, ...], path: str | Path) -> None:
    """The boolean fields a transformation reads, checked before it reorders the rows
    (so an error names the row of the file)."""
    for i, row in enumerate(rows, start=1):
        for flag in flags:
            if not isinstance(row.get(flag), bool):
                raise InputError(f"{flag} must be true or false (data with each answer's "
                                 "safety label, written by preference_data for sources "
                                 "that have them)", path=path, row=i, field=flag)


def kto_weights(examples: list[dict[str, Any]]) -> tuple[float, float]:
    """Desirable weight 1, undesirable n_desirable / n_undesirable (as in the paper)."""
    n_desirable = sum(1 for e in examples if e["label"])
    n_undesirable = len(examples) - n_desirable
    if n_desirable == 0 or n_undesirable == 0:
        raise InputError(f"KTO needs both labels; got {n_desirable} desirable and "
                         f"{n_undesirable} undesirable rows", field="label")
    return 1.0, n_desirable / n_undesirable


def trl_config(settings: NodeSettings, *, output_dir: str | Path, seed: int = 0,
               kto_weights: tuple[float, float] | None = None) -> Any:
    """The loss's TRL config object: the settings the pipeline maps itself, the entry's
    `loss_type` and `fixed` arguments, then `training.trl` (checked when the settings were
    built), and for labelled rows the KTO class weights (desirable, undesirable)."""
    entry, training = settings.entry, settings.training
    extra = {**entry.fixed, **training.trl}
    if kto_weights is not None:
        extra.update(desirable_weight=kto_weights[0], undesirable_weight=kto_weights[1])
    return entry.config_class()(
        output_dir=str(output_dir),
        **{key: getattr(training, key) for key in PASSED_AS_IS},
        beta=settings.beta,
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
    settings: NodeSettings,
    *,
    output_dir: str | Path,
    seed: int = 0,
    reference_dir: str | Path | None = None,
    ref_logps: str | Path | Any = None,  # a path, or an already read ReferenceTable
):
    """A TRL trainer whose policy starts from the parent and whose reference is the parent.

    `settings` (checked when built) name the loss, whose registry entry names the TRL
    config and trainer; the config gets the
    entry's `loss_type` and `fixed` arguments, `training.trl`, and the settings the
    pipeline maps itself. `reference_dir` overrides the reference (only for controls
    and tests: SACPO's stage 2 must use its parent, i.e. the stage-1 model).
    `ref_logps`: the parent's reference log-probs of these rows, computed once by the
    `ref_logps` step; the trainer then runs no reference forward.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry, training = settings.entry, settings.training
    args = trl_config(settings, output_dir=output_dir, seed=seed,
                      kto_weights=kto_weights(examples) if entry.data == "kto" else None)
    tokenizer = AutoTokenizer.from_pretrained(parent_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model_kwargs: dict[str, Any] = {"dtype": "auto"}
    if training.quantization == "4bit":  # with a lora adapter (TrainingConfig checks)
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

        lora = training.lora  # complete: TrainingConfig fills the schema's defaults
        peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"],
                                 lora_dropout=lora["dropout"],
                                 target_modules=lora["target_modules"], task_type="CAUSAL_LM")
    ref_model = None
    if reference_dir is not None:
        ref_model = AutoModelForCausalLM.from_pretrained(reference_dir, dtype="auto")
    dataset = shared_dataset(examples, Path(output_dir))
    trainer_class = entry.trainer_class()
    building = contextlib.nullcontext()
    if ref_logps is not None:
        if reference_dir is not None or not training.precompute_ref_log_probs:
            raise InputError("reference log-probs from a file need the parent as reference "
                             "and training.precompute_ref_log_probs", field="ref_logps")
        building = trl_adapter.no_reference_loading(trainer_class)
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


def training_throughput(trainer, result, *, start_step: int = 0) -> dict[str, Any]:
    """Tokens/s (non-padding, all processes), samples/s and, on a GPU, MFU of this run.

    TRL counts the attention-masked tokens it trains on (`num_tokens` in its logs, a
    running total over every process); a resumed run counts from its restart. Samples
    are training rows, as TRL counts them (a DPO pair is one: its chosen and rejected
    sequences are two); the MFU's sequence length is the sequences' mean length.
    """
    seconds = float(result.metrics.get("train_runtime", math.nan))
    tokens = trl_adapter.train_tokens(trainer)
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
