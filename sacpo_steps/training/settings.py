"""The `training` section of an alignment node, under TRL 1.16's own names.

Keys that TRL's configs also have carry TRL's names (`num_train_epochs`,
`per_device_train_batch_size`, `lr_scheduler_type`, `warmup_steps`); keys TRL
lacks are the project's own (`max_prompt_length`, `distributed`, `lora`,
`quantization`, `global_batch_size`, `max_examples`); `trl:` passes further
arguments to the loss's TRL config. Defaults live in ONE place, the config
schema's `$defs/training`; `TrainingConfig` has none of its own.

`trl:` is checked against TRL's field lists (`trl_fields.py`) without importing TRL.
"""

from __future__ import annotations

import copy
import difflib
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from functools import cache
from typing import Any

from sacpo_steps.core import validation_cache
from sacpo_steps.core.errors import InputError
from sacpo_steps.core.schema import load_config_schema

log = logging.getLogger("sacpo.training_config")

#: old training key -> TRL's name (the old names work until the next release)
DEPRECATED = {
    "epochs": "num_train_epochs",
    "per_device_batch_size": "per_device_train_batch_size",
    "lr_scheduler": "lr_scheduler_type",
    "warmup_ratio": "warmup_steps",
}

#: training keys passed to the TRL config unchanged, under the same name
PASSED_AS_IS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "max_length",
    "precompute_ref_log_probs", "precompute_ref_batch_size", "bf16", "gradient_checkpointing",
    "logging_steps",
)

#: training keys that shape the reference pass (which rows, their tokens, the batches
#: and the dtype and loading of the reference model): nodes that agree on these, the
#: reference model and the data share one `ref_logps` job. `trl` is kept whole (it can
#: change tokenization, e.g. `truncation_mode`, or the sums, e.g. `ld_alpha`).
REFERENCE_FIELDS = (
    "max_length", "max_prompt_length", "max_examples", "per_device_train_batch_size",
    "precompute_ref_batch_size", "bf16", "quantization", "lora", "trl",
)

#: TRL fields the pipeline sets itself, and how a user sets them instead
PIPELINE_SET = {
    **{key: f"use training.{key}" for key in PASSED_AS_IS},
    "save_strategy": "use training.save_steps (0: no checkpoints)",
    "save_steps": "use training.save_steps",
    "beta": "use the node's `beta`",
    "loss_type": "use the node's `loss` (an entry of sacpo_steps/training/losses.py)",
    "seed": "use the config's `seed` / `seeds`",
    "data_seed": "use the config's `seed` / `seeds`",
    "output_dir": "the pipeline trains in the node's scratch folder",
    "logging_first_step": "the pipeline logs the first step (the model card's first_loss)",
    "save_total_limit": "the pipeline keeps one checkpoint, for resume",
    "save_only_model": "resume needs the optimizer state, so the pipeline saves it",
    "report_to": "training logs go to the job's log file",
    "dataloader_num_workers": "the pipeline loads data in the training process",
    "desirable_weight": "KTO's weights are set from the data's label counts",
    "undesirable_weight": "KTO's weights are set from the data's label counts",
}

@dataclass(frozen=True)
class TrainingConfig:
    """Hyper-parameters of one alignment stage; build it with `from_dict` (schema defaults).

    Field meanings and defaults: `$defs/training` in workflow/schemas/config.schema.yaml.
    Checked once, when built: every value against the schema (an InputError names
    `training.<key>`); a `lora` section gets the schema's defaults for what it leaves out.
    """

    learning_rate: float
    num_train_epochs: float
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    max_length: int
    max_prompt_length: int | None  # the project's prompt cap (tokens.PromptCap)
    lr_scheduler_type: str
    warmup_steps: float  # an integer: steps; a number below 1: a ratio of all steps
    precompute_ref_log_probs: bool
    precompute_ref_batch_size: int | None
    bf16: bool
    gradient_checkpointing: bool
    logging_steps: int
    max_steps: int
    save_steps: int  # checkpoint every N steps for resume (0: no checkpoints)
    distributed: str  # accelerate config used when the job has several GPUs
    lora: dict[str, Any] | None  # {r, alpha, dropout, target_modules}
    quantization: str | None  # "4bit": QLoRA
    global_batch_size: int | None  # declared; the plan checks it adds up
    max_examples: int | None  # use only the first N (shuffled) examples
    trl: dict[str, Any]  # further arguments of the loss's TRL config

    def __post_init__(self) -> None:
        values = asdict(self)
        key = validation_cache.key("training", values, load_config_schema()["$defs"]["training"])
        if not validation_cache.passed(key):
            for err in _training_validator().iter_errors(values):
                path = ".".join(str(p) for p in err.absolute_path)
                raise InputError(err.message,
                                 field=f"training.{path}" if path else "training")
            validation_cache.remember(key)
        if self.lora is not None:
            object.__setattr__(self, "lora", {**lora_defaults(), **self.lora})
        if self.quantization and not self.lora:
            raise InputError(f"quantization {self.quantization!r} needs a `lora` adapter "
                             "(QLoRA)", field="training.quantization")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], schema: Mapping[str, Any] | None = None
                  ) -> TrainingConfig:
        """Settings from a config section; missing keys take the schema's defaults.

        Deprecated names are renamed (with a logged warning). `schema` is the whole
        config schema (default: the project's), read only when a key is missing.
        """
        data, messages = migrate_training(dict(data), "training")
        for message in messages:
            log.warning("%s", message)
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
            said = ", ".join(f"{k} (did you mean {h[0]}?)" if h else k for k, h in hints.items())
            raise InputError(f"unknown training setting(s): {said}", field="training")
        missing = [k for k in known if k not in data]
        values = copy.deepcopy(dict(data))
        if missing:
            defaults = training_defaults(schema if schema is not None else load_config_schema())
            absent = [k for k in missing if k not in defaults]
            if absent:
                raise InputError(f"the schema's $defs/training has no default for {absent}",
                                 field="training")
            values.update({k: defaults[k] for k in missing})
        return cls(**values)


@cache
def _training_validator() -> Any:
    import jsonschema  # only to build a config; the steps' --help stays fast

    return jsonschema.Draft202012Validator(load_config_schema()["$defs"]["training"])


def lora_defaults() -> dict[str, Any]:
    """The LoRA settings a `lora:` section leaves out, from the schema (r, alpha, ...)."""
    props = load_config_schema()["$defs"]["training"]["properties"]["lora"]["properties"]
    return {key: copy.deepcopy(spec["default"]) for key, spec in props.items()
            if "default" in spec}


def training_defaults(schema: Mapping[str, Any]) -> dict[str, Any]:
    """`{key: default}` of `$defs/training` in the config schema (fresh copies)."""
    props = schema["$defs"]["training"]["properties"]
    return {key: copy.deepcopy(spec["default"]) for key, spec in props.items()
            if "default" in spec}


def migrate_training(section: Mapping[str, Any], where: str) -> tuple[dict[str, Any], list[str]]:
    """`section` with deprecated names renamed (order kept), and one message per rename.

    `where` is the section's config path (e.g. "models.safe.training"). Both an old
    name and its new one given is an InputError naming both.
    """
    out: dict[str, Any] = {}
    messages = []
    for key, value in section.items():
        new = DEPRECATED.get(key)
        if new is None:
            out[key] = value
            continue
        if new in section:
            raise InputError(f"both {key} (deprecated) and {new} are given; keep only {new}",
                             field=f"{where}.{key}")
        note = " (a number below 1 is a ratio of all steps, as warmup_ratio was)" \
            if key == "warmup_ratio" else ""
        if key == "warmup_ratio" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # an integer warmup_steps counts steps, a ratio does not
        out[new] = value
        messages.append(f"{where}.{key} is deprecated: use {new} (TRL's name){note}; the old "
                        "name works until the next release")
    return out, messages
