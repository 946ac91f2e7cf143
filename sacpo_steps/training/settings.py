"""The `training` section of an alignment node, under TRL 1.16's own names.

Keys that TRL's configs also have carry TRL's names (`num_train_epochs`,
`per_device_train_batch_size`, `lr_scheduler_type`, `warmup_steps`); keys TRL
lacks are the project's own (`max_prompt_length`, `distributed`, `lora`,
`quantization`, `global_batch_size`, `max_examples`); `trl:` passes further
arguments to the loss's TRL config. Defaults live in ONE place, the config
schema's `$defs/training`; `TrainingConfig` has none of its own.

`trl:` is checked at plan time without importing TRL (seconds on every Snakemake
call): the fields of each TRL config class are listed in `trl_fields.json`,
regenerated after a TRL upgrade with

    python -m sacpo_steps.training.settings --write-trl-fields

(a test compares the file with the installed TRL).
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.schema import SCHEMA_PATH, load_config_schema  # noqa: F401

if TYPE_CHECKING:
    from sacpo_steps.training.losses import Loss

log = logging.getLogger("sacpo.training_config")

TRL_FIELDS_PATH = Path(__file__).resolve().parent / "trl_fields.json"
WRITE_COMMAND = "python -m sacpo_steps.training.settings --write-trl-fields"

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

# Fields of DPOConfig/KTOConfig in trl 0.19.1 and 0.29.1 (over transformers 4.57.6's
# TrainingArguments) that trl 1.16 / transformers 5 no longer have, found by diffing
# the dataclass fields of the old sources with the installed ones. Value: what to use
# instead, or None (removed, no replacement).
REMOVED: dict[str, str | None] = {
    "max_prompt_length": "training.max_prompt_length (the project's prompt cap: long prompts "
                         "keep their end, in training and at generation)",
    "max_completion_length": "training.max_length (prompt plus completion tokens)",
    "warmup_ratio": "training.warmup_steps (a number below 1 is a ratio of all steps)",
    "per_gpu_train_batch_size": "training.per_device_train_batch_size",
    "per_gpu_eval_batch_size": "trl.per_device_eval_batch_size",
    "no_cuda": "trl.use_cpu",
    "adafactor": "trl.optim: adafactor",
    "group_by_length": "trl.train_sampling_strategy: group_by_length",
    "include_inputs_for_metrics": "trl.include_for_metrics: [inputs]",
    "push_to_hub_model_id": "trl.hub_model_id",
    "push_to_hub_organization": "trl.hub_model_id (organization/name)",
    "push_to_hub_token": "trl.hub_token",
    "torchdynamo": "trl.torch_compile_backend",
    "use_liger_loss": "trl.use_liger_kernel",
    "fsdp_min_num_params": "training.distributed (the accelerate config) or trl.fsdp_config",
    "fsdp_transformer_layer_cls_to_wrap": "training.distributed (the accelerate config) or "
                                          "trl.fsdp_config",
    "rpo_alpha": "a loss entry whose `fixed` sets loss_type [sigmoid, sft] and loss_weights "
                 "[1, alpha] (sacpo_steps/training/losses.py)",
    "reference_free": None,
    "force_use_ref_model": None,
    "model_adapter_name": None,
    "ref_adapter_name": None,
    "ref_model_init_kwargs": None,
    "generate_during_eval": None,
    "label_pad_token_id": None,
    "padding_value": None,
    "is_encoder_decoder": None,
    "base_model_attribute_name": None,
    "tools": None,
    "use_logits_to_keep": None,
    "logging_dir": None,
    "overwrite_output_dir": None,
    "save_safetensors": None,
    "use_mps_device": None,
    "include_tokens_per_second": None,
    "fp16_backend": None,
    "fp16_opt_level": None,
    "half_precision_backend": None,
    "jit_mode_eval": None,
    "mp_parameters": None,
    "past_index": None,
    "ray_scope": None,
    "tpu_metrics_debug": None,
    "tpu_num_cores": None,
    "use_legacy_prediction_loop": None,
}


@dataclass
class TrainingConfig:
    """Hyper-parameters of one alignment stage; build it with `from_dict` (schema defaults).

    Field meanings and defaults: `$defs/training` in workflow/schemas/config.schema.yaml.
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


@cache
def _read_trl_fields(path: str) -> dict[str, Any]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    try:
        from importlib.metadata import version

        installed = version("trl")
    except Exception:  # no TRL here (a planning-only environment): nothing to compare
        installed = None
    if installed and installed != data["trl_version"]:
        log.warning("%s lists TRL %s's fields but TRL %s is installed; regenerate it: %s",
                    Path(path).name, data["trl_version"], installed, WRITE_COMMAND)
    return data


def trl_fields(path: str | Path = TRL_FIELDS_PATH) -> dict[str, Any]:
    """The stored field lists: {"trl_version", "configs": {"trl:DPOConfig": [...], ...}}."""
    return _read_trl_fields(str(path))


def installed_trl_fields(configs: list[str]) -> dict[str, Any]:
    """The field lists of the installed TRL config classes (imports TRL)."""
    import dataclasses
    from importlib.metadata import version

    from sacpo_steps.training.losses import import_object

    return {
        "trl_version": version("trl"),
        "transformers_version": version("transformers"),
        "regenerate": WRITE_COMMAND,
        "configs": {path: sorted(f.name for f in dataclasses.fields(import_object(path)))
                    for path in sorted(set(configs))},
    }


def write_trl_fields(path: str | Path = TRL_FIELDS_PATH) -> dict[str, Any]:
    """Regenerate trl_fields.json for the config classes of every registered loss."""
    from sacpo_steps.training.losses import LOSSES

    data = installed_trl_fields([loss.config for loss in LOSSES.values()])
    Path(path).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    _read_trl_fields.cache_clear()
    return data


def check_trl_args(trl: Any, loss: Loss, where: str) -> None:
    """Refuse `training.trl` arguments TRL would reject or the pipeline sets itself.

    Unknown fields (with close matches), fields the pipeline or the loss entry sets
    (with the training key to use), and fields TRL removed (with their replacement).
    A config class missing from trl_fields.json (a custom registered one) gets only
    the last two checks.
    """
    if not isinstance(trl, Mapping):
        raise InputError(f"must be a mapping of TRL config arguments, got {type(trl).__name__}",
                         field=where)
    known = trl_fields()["configs"].get(loss.config)
    for key in trl:
        field_name = f"{where}.{key}"
        if key in PIPELINE_SET:
            raise InputError(f"{key} is set by the pipeline: {PIPELINE_SET[key]}",
                             field=field_name)
        if key in loss.fixed:
            raise InputError(f"{key} is fixed by loss {loss.name!r} to {loss.fixed[key]!r}",
                             field=field_name)
        if known is not None and key in known and not key.startswith("_"):
            continue
        if key in REMOVED:
            instead = REMOVED[key]
            raise InputError(f"{key} was removed from TRL; "
                             + (f"use {instead}" if instead else "removed, no replacement"),
                             field=field_name)
        if known is not None:
            close = difflib.get_close_matches(key, [k for k in known if not k.startswith("_")],
                                              n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise InputError(f"{key} is not an argument of TRL's {loss.config_name}{hint}",
                             field=field_name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sacpo_steps.training.settings",
        description="Regenerate or check trl_fields.json (the TRL config fields `trl:` "
        "may set) from the installed TRL.")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write-trl-fields", action="store_true",
                       help=f"write {TRL_FIELDS_PATH.name} from the installed TRL")
    group.add_argument("--check-trl-fields", action="store_true",
                       help=f"exit 1 if {TRL_FIELDS_PATH.name} differs from the installed TRL")
    args = parser.parse_args(argv)
    if args.write_trl_fields:
        data = write_trl_fields()
        print(f"wrote {TRL_FIELDS_PATH} (TRL {data['trl_version']}: "
              f"{', '.join(data['configs'])})")
        return
    from sacpo_steps.training.losses import LOSSES

    stored = trl_fields()
    current = installed_trl_fields([loss.config for loss in LOSSES.values()])
    if stored["configs"] != current["configs"]:
        raise SystemExit(f"{TRL_FIELDS_PATH.name} is stale; run: {WRITE_COMMAND}")
    print(f"{TRL_FIELDS_PATH.name} matches TRL {current['trl_version']}")


if __name__ == "__main__":
    main()
