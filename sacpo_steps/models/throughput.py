"""Throughput of a training or generation job: tokens/s, samples/s and, on a GPU, MFU.

Tokens are non-padding tokens (what the model really processed), so a run with
long padding does not look fast. Model FLOPs utilisation follows the usual
accounting: 6 x parameters per trained token (forward 2, backward 4; the LM head
counts, the input embedding, a table lookup, does not) plus 12 x layers x hidden x sequence
length for attention scores; activation recompute (gradient checkpointing) and
the reference pass are not counted, so MFU says how much of the GPU went into
useful training arithmetic. Generation counts 2 x parameters per token. The
peak is the GPU's dense bf16 rate from its data sheet (no sparsity).
"""

from __future__ import annotations

import math
from typing import Any

# Dense bf16 peak FLOP/s per GPU, by a substring of torch.cuda.get_device_name().
# SXM parts; PCIe/NVL variants of the same name have a lower clock (a best effort).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("L4", 121e12),
)


def peak_flops(device_name: str | None) -> float | None:
    """The dense bf16 peak of a GPU by its name; None for an unknown one (MFU not reported)."""
    if not device_name:
        return None
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


def flop_parameters(model: Any) -> int:
    """Parameters that cost FLOPs per token: all but the input embedding (a lookup);
    with tied embeddings the one matrix is the LM head, and counts."""
    params = {id(p): p.numel() for p in model.parameters()}
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    if output is None or output.weight is not embedding:
        params.pop(id(embedding), None)
    return sum(params.values())


def model_shape(model: Any) -> dict[str, int]:
    """FLOP parameters, layers and hidden size of a transformers model (PEFT too)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    return {"parameters": flop_parameters(model),
            "layers": int(getattr(config, "num_hidden_layers", 0) or 0),
            "hidden": int(getattr(config, "hidden_size", 0) or 0)}


def training_flops_per_token(shape: dict[str, int], seq_len: float) -> float:
    """6 N + 12 L d s: forward and backward of the policy, attention scores included."""
    return 6 * shape["parameters"] + 12 * shape["layers"] * shape["hidden"] * seq_len


def generation_flops_per_token(shape: dict[str, int], seq_len: float) -> float:
    """2 N + 2 L d s: one forward per new token, attending to the sequence so far."""
    return 2 * shape["parameters"] + 2 * shape["layers"] * shape["hidden"] * seq_len


def rates(*, tokens: float, samples: float, seconds: float, flops_per_token: float | None = None,
          gpus: int = 0, device_name: str | None = None) -> dict[str, Any]:
    """The record a job writes: tokens/s, samples/s, and MFU where the GPU's peak is known."""
    ok = seconds > 0 and math.isfinite(seconds)
    record: dict[str, Any] = {
        "tokens": int(tokens),
        "samples": int(samples),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2) if ok else None,
        "samples_per_s": round(samples / seconds, 3) if ok else None,
        "gpus": gpus,
        "device": device_name,
        "mfu": None,
    }
    peak = peak_flops(device_name) if gpus else None
    if ok and peak and flops_per_token:
        record["mfu"] = round(flops_per_token * tokens / seconds / (peak * gpus), 4)
    return record


def describe(record: dict[str, Any]) -> str:
    """One log line of a throughput record."""
    text = (f"{record['tokens']} tokens, {record['samples']} samples in {record['seconds']} s: "
            f"{record['tokens_per_s']} tokens/s, {record['samples_per_s']} samples/s")
    if record.get("gpus"):
        text += f" on {record['gpus']} x {record.get('device')}"
        text += f", MFU {record['mfu']:.1%}" if record.get("mfu") is not None else ", MFU n/a"
    return text


def cuda_device() -> tuple[int, str | None]:
    """(GPUs this process uses, 0 on CPU; the device's name)."""
    import torch

    if not torch.cuda.is_available():
        return 0, None
    return 1, torch.cuda.get_device_name(torch.cuda.current_device())
