"""Every use of a private or internal name of TRL or transformers, in one place.

The pipeline pins TRL 1.16 and relies on a few things TRL does not promise to keep:

- `_precompute_ref_logps(dataset, name, batch_size)`, the method of the DPO and KTO
  trainers that runs the reference pass: the shared reference pass overrides it to
  read the log-probs a `ref_logps` job computed once;
- `hash_module` and `create_model_from_path`, module functions of the trainers'
  modules: while a trainer with cached reference log-probs is built they are
  replaced, since they exist only for TRL's own pass (hashing every reference weight
  takes a minute for a 7B model; under FSDP TRL loads a reference copy);
- `_total_train_tokens`, the running token count some trainers keep (the training
  throughput reads it, and falls back to the logged `num_tokens`);
- `_set_signature_columns_if_needed` / `_signature_columns` and the preference
  collator's fixed output: a per-row value (SafeDPO's and BSO's safety margin) reaches
  the loss only if the column is kept and collated (`with_row_column`);
- the DPO trainer's forward convention (`fused_lm_head=True` returns per-token
  `log_probs`, zero outside the completion) and its metric store `_metrics`, for a
  loss TRL has no `loss_type` for (`sequence_logps`, `log_metric`);
- how the DPO and KTO trainers tokenize a row (`encode_text`, `encode_conversation`,
  `split_completion`): the prompt and completion ids the pipeline computes for
  generation, prompt caps and checks must be TRL's own, so that a model is sampled
  on exactly the ids it was trained on (`tokens.py` renders rows and calls these).

`CONTRACT` lists each of them; `contract_problems()` checks the installed libraries
and names the library version and the symbol that moved (tests/test_trl_adapter.py).
After a TRL upgrade, that test says what to adapt here, and only here.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

#: the TRL version these names were read from
TRL_TESTED = "1.16.0"

#: TRL's trainers whose reference pass the pipeline shares
REFERENCE_TRAINERS = ("trl.trainer.dpo_trainer:DPOTrainer", "trl.trainer.kto_trainer:KTOTrainer")

PRECOMPUTE_METHOD = "_precompute_ref_logps"
PRECOMPUTE_PARAMETERS = ("self", "dataset", "name", "batch_size")
REFERENCE_LOADERS = ("hash_module", "create_model_from_path")
TOKEN_COUNT = "_total_train_tokens"
SIGNATURE_METHOD = "_set_signature_columns_if_needed"
SIGNATURE_ATTRIBUTE = "_signature_columns"
FUSED_HEAD = "trl.trainer.utils:add_fused_lm_head"
#: inputs of a DPO batch that are not the model's (TRL's `_compute_loss` drops the same)
NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")


@dataclass(frozen=True)
class Dependency:
    """One private name the pipeline uses: where it lives and what for."""

    library: str
    symbol: str  # "module:attribute" or "module:Class.method"
    why: str

    def problem(self) -> str | None:
        """None if the installed library still has it; else what changed."""
        module_name, _, attribute = self.symbol.partition(":")
        where = f"{self.library} {_installed(self.library)}: {self.symbol}"
        try:
            target: Any = import_module(module_name)
        except ImportError as exc:
            return f"{where}: module not importable ({exc}); needed for {self.why}"
        for part in attribute.split("."):
            if not hasattr(target, part):
                return f"{where} is missing; needed for {self.why}"
            target = getattr(target, part)
        if attribute.endswith("." + PRECOMPUTE_METHOD):
            found = tuple(inspect.signature(target).parameters)
            if found[:len(PRECOMPUTE_PARAMETERS)] != PRECOMPUTE_PARAMETERS:
                return (f"{where} takes {found}, the pipeline calls it with "
                        f"{PRECOMPUTE_PARAMETERS}; needed for {self.why}")
        return None


def _installed(library: str) -> str:
    try:
        return version(library)
    except PackageNotFoundError:
        return "(not installed)"


CONTRACT: tuple[Dependency, ...] = (
    *(Dependency("trl", f"{path}.{PRECOMPUTE_METHOD}", "the shared reference pass")
      for path in REFERENCE_TRAINERS),
    *(Dependency("trl", f"{path.partition(':')[0]}:{name}",
                 "building a trainer on cached reference log-probs")
      for path in REFERENCE_TRAINERS for name in REFERENCE_LOADERS),
    Dependency("trl", f"trl.trainer.dpo_trainer:DPOTrainer.{SIGNATURE_METHOD}",
               "a per-row column (the safety margin) kept in the batches"),
    Dependency("trl", FUSED_HEAD, "the per-token log-probs of a loss computed here (BSO)"),
    Dependency("trl", "trl.trainer.dpo_trainer:DataCollatorForPreference",
               "the preference batches a per-row column is added to"),
)


def contract_problems() -> list[str]:
    """What of `CONTRACT` the installed libraries no longer have (empty: all there)."""
    return [p for p in (d.problem() for d in CONTRACT) if p]


# --- the reference pass -------------------------------------------------------------------


def with_reference_pass(trainer_class: type, compute: Callable[[Any, Any, str, int], Any],
                        *, module: str) -> type:
    """`trainer_class` whose reference pass is `compute(trainer, dataset, name,
    batch_size)`; `compute` may call `original_reference_pass` to fall back."""

    def _precompute_ref_logps(self, dataset, name, batch_size):
        return compute(self, dataset, name, batch_size)

    return type(f"{trainer_class.__name__}CachedReference", (trainer_class,),
                {PRECOMPUTE_METHOD: _precompute_ref_logps, "__module__": module})


def original_reference_pass(trainer: Any, dataset: Any, name: str, batch_size: int) -> Any:
    """TRL's own reference pass of `trainer` (the method `with_reference_pass` replaced)."""
    original = getattr(super(type(trainer), trainer), PRECOMPUTE_METHOD)
    return original(dataset, name, batch_size)


@contextlib.contextmanager
def no_reference_loading(trainer_class: type) -> Iterator[None]:
    """While a trainer is built: no hash of the reference weights and no reference copy.

    The functions are looked up in the module that defines the TRL trainer class.
    """
    base = next(c for c in trainer_class.__mro__ if c.__module__.startswith("trl."))
    module = sys.modules[base.__module__]
    saved = {name: getattr(module, name) for name in REFERENCE_LOADERS}

    def no_copy(*args, **kwargs):  # only the reference is built from a path (policy given)
        return None

    module.hash_module = lambda _module: "cached-reference-log-probs"
    module.create_model_from_path = no_copy
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def with_row_column(trainer_class: type, column: str, *, module: str) -> type:
    """`trainer_class` whose batches carry the dataset's float column `column` as a
    tensor. TRL keeps only its signature columns and its preference collator builds a
    fixed set of tensors, so a per-row value would not reach the loss otherwise. The
    column is added after TRL's own reference pass, which does not need it."""
    import torch  # deferred: the plan imports this module; only training builds trainers

    def _set_signature_columns_if_needed(self):
        getattr(super(cls, self), SIGNATURE_METHOD)()
        columns = getattr(self, SIGNATURE_ATTRIBUTE)
        if column not in columns:
            columns.append(column)

    def __init__(self, *args, **kwargs):
        super(cls, self).__init__(*args, **kwargs)
        collate = self.data_collator

        def collate_with_column(examples):
            batch = collate(examples)
            batch[column] = torch.tensor([float(e[column]) for e in examples],
                                         dtype=torch.float32)
            return batch

        self.data_collator = collate_with_column

    cls = type(trainer_class.__name__, (trainer_class,),
               {"__init__": __init__, SIGNATURE_METHOD: _set_signature_columns_if_needed,
                "__module__": module, "__doc__": trainer_class.__doc__})
    return cls


def sequence_logps(trainer: Any, model: Any, inputs: dict[str, Any]) -> tuple[Any, Any]:
    """(chosen, rejected) log-probs of a DPO batch under `model`, each summed over its
    completion tokens, computed as TRL's DPO loss computes them (its fused LM head);
    the batch's reference columns are left to the caller."""
    completion_mask = inputs["completion_mask"]
    model_kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
    model_kwargs["use_cache"] = False
    labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
    outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
    seq_len = completion_mask.size(1) - 1  # the shifted completion mask's length
    logps = outputs.log_probs[:, -seq_len:].sum(dim=1)
    if trainer.model.training:  # the throughput's token count, as TRL keeps it
        tokens = trainer.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum()
        setattr(trainer, TOKEN_COUNT, (getattr(trainer, TOKEN_COUNT, 0) or 0) + int(tokens))
    return logps.chunk(2, dim=0)  # the batch is [chosen..., rejected...]


def log_metric(trainer: Any, name: str, value: float) -> None:
    """Add a value to what the trainer logs at its next logging step (TRL's store)."""
    mode = "train" if trainer.model.training else "eval"
    trainer._metrics[mode][name].append(float(value))


def train_tokens(trainer: Any) -> int | None:
    """The trainer's running count of trained (non-padding) tokens, where it keeps one."""
    return getattr(trainer, TOKEN_COUNT, None)


# --- how TRL tokenizes a row ---------------------------------------------------------------


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """A plain-text prompt as TRL tokenizes it: `tokenizer(text=...)`, with the
    tokenizer's own special-token defaults (a Llama tokenizer adds BOS, GPT-2 none)."""
    return list(tokenizer(text=text)["input_ids"])


def encode_conversation(tokenizer: Any, messages: list[dict[str, str]], *,
                        generation_prompt: bool) -> list[int]:
    """A conversation as TRL tokenizes it: the tokenizer's chat template."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=generation_prompt)
    return list(out["input_ids"])


def completion_text(tokenizer: Any, completion: str) -> str:
    """A plain-text completion as TRL trains on it: with the EOS token appended (a chat
    template ends the turn itself)."""
    return completion if completion.endswith(tokenizer.eos_token) else \
        completion + tokenizer.eos_token


def split_completion(prompt_ids: list[int], full_ids: list[int]) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids): the completion starts where the ids of the prompt
    and of prompt + completion diverge, as in TRL's DPO and KTO trainers."""
    n = 0
    for a, b in zip(prompt_ids, full_ids, strict=False):
        if a != b:
            break
        n += 1
    return prompt_ids[:n], full_ids[n:]
