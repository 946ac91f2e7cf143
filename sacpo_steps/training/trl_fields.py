"""The fields of TRL's config classes, so `training.trl` is checked without TRL.

Importing TRL takes seconds, and the plan runs on every Snakemake call, so the field
lists of the registered losses' TRL config classes are stored in `trl_fields.json`
and regenerated after a TRL upgrade with

    python -m sacpo_steps.training.losses --write-trl-fields

(a test compares the file with the installed TRL). A `trl:` argument TRL would
reject, or one the pipeline sets itself, is refused at plan time.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
from collections.abc import Mapping
from functools import cache
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.imports import import_object
from sacpo_steps.training.settings import PIPELINE_SET

if TYPE_CHECKING:
    from sacpo_steps.training.losses import Loss

log = logging.getLogger("sacpo.training_config")  # the name the warning always had

TRL_FIELDS_PATH = Path(__file__).resolve().parent / "trl_fields.json"
WRITE_COMMAND = "python -m sacpo_steps.training.losses --write-trl-fields"

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


@cache
def _read_trl_fields(path: str) -> dict[str, Any]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    try:
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

    return {
        "trl_version": version("trl"),
        "transformers_version": version("transformers"),
        "regenerate": WRITE_COMMAND,
        "configs": {path: sorted(f.name for f in dataclasses.fields(import_object(path)))
                    for path in sorted(set(configs))},
    }


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


def write(configs: list[str], path: str | Path = TRL_FIELDS_PATH) -> dict[str, Any]:
    """Write the field lists of the installed TRL's `configs` ("module:Class") to `path`."""
    data = installed_trl_fields(configs)
    Path(path).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    _read_trl_fields.cache_clear()
    return data
