"""Safe RLHF's score models on disk: the LlamaForScore format, read with plain torch.

Safe RLHF (PKU-Alignment/safe-rlhf) ships its preference models, e.g.
`PKU-Alignment/beaver-7b-v1.0-reward` and `-cost`, as a Llama backbone with a
linear score head read at the last token. This module loads that format with
plain transformers + torch (no safe-rlhf import, no remote code):

- `config.json`: a Llama config (`model_type: llama`) with `architectures`
  `LlamaForScore` (current safe-rlhf) or `LlamaModelForScore` (v1.0 era, the
  beaver-7b-v1.0 models), `score_dim` (1 here), the head's bias flag
  (`score_bias`, default true, or the older `bias`, default false),
  `score_type` (reward | cost | critic) and the normalizer fields
  `do_normalize`, `normalizer_type`, `mean`, `var`;
- safetensors weights: the backbone under the `model.` prefix (as
  LlamaForCausalLM stores it), `score_head.weight` (score_dim x hidden),
  optionally `score_head.bias`, and the normalizer buffers `normalizer.mean`,
  `normalizer.var`, `normalizer.count`.

score = score_head(last hidden state of the last non-padding token), with the
normalizer applied. A model folder's identity for the score cache is its
`fingerprint`. Pickled `.bin` checkpoints are refused: the workflow converts
them to safetensors by explicit opt-in. torch and transformers are imported
only when a model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sacpo_steps.core.errors import InputError
from sacpo_steps.models.folders import check_model_dir

log = logging.getLogger("sacpo.judge.score_model")

ARCHITECTURES = ("LlamaForScore", "LlamaModelForScore")
#: files whose bytes enter a model folder's fingerprint (weights: name, size, mtime)
FINGERPRINT_FILES = ("config.json", "model.safetensors.index.json", "tokenizer.json",
                     "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                     "added_tokens.json", "vocab.json", "merges.txt")
# safe-rlhf's normalizer: which function each score type uses, and its epsilon
_NORMALIZE_FUNCTION = {"reward": "affine", "cost": "scale", "critic": "identity"}
_NORMALIZE_EPS = 1e-8


@dataclass(frozen=True)
class ScoreHeadSpec:
    """What config.json says about the score head and its normalizer."""

    architecture: str
    score_type: str | None
    #: True/False as the config states it (score_bias, else bias); None: unstated
    bias: bool | None
    do_normalize: bool
    mean: list[float] | None
    var: list[float] | None
    max_position_embeddings: int | None


def read_score_config(folder: str | Path, *, role: str) -> ScoreHeadSpec:
    """Check that `folder` holds a safe-rlhf Llama score model for `role` (reward|cost)."""
    folder = Path(folder)
    where = f"judge.{role}_model"
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise InputError("config.json is not a JSON object", path=folder, field=where)
    archs = config.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if config.get("model_type") != "llama" or arch is None:
        raise InputError(f"not a Safe RLHF Llama score model: config.json has model_type "
                         f"{config.get('model_type')!r}, architectures {archs!r} (expected "
                         f"'llama' and one of {ARCHITECTURES})", path=folder, field=where)
    score_dim = config.get("score_dim", 1)
    if score_dim != 1:
        raise InputError(f"score_dim is {score_dim!r}; this judge compares one score per "
                         "answer (score_dim 1)", path=folder, field=where)
    score_type = config.get("score_type")
    if score_type is not None and score_type != role:
        raise InputError(f"config.json says score_type {score_type!r}, but judge.{role}_model "
                         f"must be a {role} model (are reward_model and cost_model swapped?)",
                         path=folder, field=where)
    bias = config.get("score_bias", config.get("bias"))
    normalizer = config.get("normalizer_type")
    if normalizer not in (None, "RunningMeanStd", "ExponentialMovingAverage"):
        raise InputError(f"unknown normalizer_type {normalizer!r}", path=folder, field=where)
    return ScoreHeadSpec(
        architecture=arch, score_type=score_type,
        bias=None if bias is None else bool(bias),
        do_normalize=bool(config.get("do_normalize", False)),
        mean=config.get("mean"), var=config.get("var"),
        max_position_embeddings=config.get("max_position_embeddings"))


def fingerprint(folder: str | Path) -> str:
    """Identity of a model folder for the cache: config, tokenizer and index bytes, and
    each weight file's name, size and mtime (hashing gigabytes of weights would cost
    more than it saves; a rewritten file gets a new mtime, so stale scores are not reused).
    """
    folder = Path(folder)
    material: dict[str, Any] = {"files": {}, "weights": []}
    for name in FINGERPRINT_FILES:
        path = folder / name
        if path.is_file():
            material["files"][name] = hashlib.sha256(path.read_bytes()).hexdigest()
    for path in sorted(folder.glob("*.safetensors")):
        stat = path.stat()
        material["weights"].append([path.name, stat.st_size, stat.st_mtime_ns])
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def read_tensors(folder: str | Path, names: Sequence[str]) -> dict[str, Any]:
    """The named tensors that the folder's safetensors files hold (absent names left out)."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name in weight_map:
                by_file.setdefault(weight_map[name], []).append(name)
        files = [(folder / f, wanted) for f, wanted in by_file.items()]
    else:
        files = [(p, list(names)) for p in sorted(folder.glob("*.safetensors"))]
    found: dict[str, Any] = {}
    for path, wanted in files:
        with safe_open(str(path), framework="pt") as fh:
            keys = set(fh.keys())
            for name in wanted:
                if name in keys and name not in found:
                    found[name] = fh.get_tensor(name)
    return found


def _resolve_device(name: str) -> str:
    """cpu or cuda; a config asking for cuda on a machine without one fails here, early."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device is cuda, but torch sees no CUDA device", field="judge.device")
    return name


class ScoreModel:
    """A safe-rlhf Llama score model: tokenizer and weights loaded on first use.

    A judge whose scores are all cached never loads either.
    """

    def __init__(self, folder: str | Path, *, role: str, dtype: str = "auto",
                 device: str = "auto", append_eos: bool = True,
                 max_length: int | None = None) -> None:
        where = f"judge.{role}_model"
        try:
            self.folder = check_model_dir(folder, role=f"{role} model")
        except InputError as exc:
            # the same message, naming the config key that points here
            raise InputError(str(exc), field=where) from None
        self.role = role
        self.spec = read_score_config(self.folder, role=role)
        self.fingerprint = fingerprint(self.folder)
        self.append_eos = append_eos
        self.max_length = max_length or self.spec.max_position_embeddings
        self.device = _resolve_device(device)
        #: auto: bfloat16 on cuda (as Safe RLHF evaluates), float32 on cpu
        self.dtype_name = dtype if dtype != "auto" else (
            "bfloat16" if self.device == "cuda" else "float32")
        self._tokenizer: Any = None
        self._backbone: Any = None
        self._head: tuple[Any, Any] | None = None  # (weight, bias) in float32
        self._normalize: tuple[str, Any, Any] | None = None  # (function, mean, std)
        self.forward_batches = 0

    # -- loading --------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.folder)
            if self.append_eos and self._tokenizer.eos_token_id is None:
                raise InputError("the tokenizer has no EOS token; set append_eos: false",
                                 path=self.folder, field="judge.append_eos")
        return self._tokenizer

    def _load(self) -> None:
        """Backbone through LlamaModel.from_pretrained (it strips the `model.` prefix),
        score head and normalizer straight from the safetensors files."""
        import torch
        from transformers import LlamaModel
        from transformers.utils import logging as hf_logging

        where = f"judge.{self.role}_model"
        start = time.monotonic()
        dtype = getattr(torch, self.dtype_name)
        verbosity = hf_logging.get_verbosity()
        bars = hf_logging.is_progress_bar_enabled()
        # its load report lists score_head.* as unexpected: we check the keys ourselves
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            backbone, info = LlamaModel.from_pretrained(
                self.folder, dtype=dtype, use_safetensors=True, output_loading_info=True,
                device_map=self.device)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        missing = sorted(info.get("missing_keys") or [])
        mismatched = sorted(str(k) for k in info.get("mismatched_keys") or [])
        if missing or mismatched:
            raise InputError(f"the backbone weights do not fit the config (missing: "
                             f"{missing[:5]}, mismatched: {mismatched[:5]}); expected a Llama "
                             "stored under the `model.` prefix", path=self.folder, field=where)
        other = sorted(k for k in info.get("unexpected_keys") or []
                       if not k.startswith(("score_head.", "normalizer.")))
        if other:
            log.warning("%s: ignoring weights outside the backbone and score head: %s",
                        self.folder, other[:5])
        backbone.eval()

        tensors = read_tensors(self.folder, ["score_head.weight", "score_head.bias",
                                             "normalizer.mean", "normalizer.var"])
        weight = tensors.get("score_head.weight")
        hidden = backbone.config.hidden_size
        if weight is None or tuple(weight.shape) != (1, hidden):
            shape = None if weight is None else tuple(weight.shape)
            raise InputError(f"score_head.weight is missing or not of shape (1, {hidden}) "
                             f"(found {shape})", path=self.folder, field=where)
        bias = tensors.get("score_head.bias")
        if self.spec.bias is False and bias is not None:
            log.warning("%s: config says the score head has no bias; ignoring score_head.bias "
                        "as safe-rlhf does", self.folder)
            bias = None
        elif self.spec.bias and bias is None:
            log.warning("%s: config says the score head has a bias, but the weights have "
                        "none: it is zero, as safe-rlhf initializes it", self.folder)
        device = self.device
        self._head = (weight.to(device=device, dtype=torch.float32),
                      None if bias is None else bias.to(device=device, dtype=torch.float32))
        if self.spec.do_normalize:
            # checkpoint buffers win over config.json, as in safe-rlhf's from_pretrained
            mean = tensors.get("normalizer.mean")
            var = tensors.get("normalizer.var")
            mean = torch.as_tensor(mean if mean is not None else self.spec.mean or [0.0])
            var = torch.as_tensor(var if var is not None else self.spec.var or [1.0])
            function = _NORMALIZE_FUNCTION.get(self.spec.score_type or "reward", "affine")
            self._normalize = (function, mean.float().to(device), var.float().sqrt().to(device))
        self._backbone = backbone
        log.info("%s model %s loaded (%s, %s) in %.1f s", self.role, self.folder,
                 self.dtype_name, device, time.monotonic() - start)

    # -- scoring --------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of one scored text: the tokenizer's own special tokens, then EOS."""
        tok = self.tokenizer
        ids = list(tok(text, add_special_tokens=True)["input_ids"])
        if self.append_eos and (not ids or ids[-1] != tok.eos_token_id):
            ids.append(tok.eos_token_id)
        return ids

    def score_ids(self, sequences: Sequence[Sequence[int]], batch_size: int) -> list[float]:
        """One score per sequence: the head on the hidden state of its last token.

        Right padding, so every real token keeps its position and (causal attention)
        never sees a pad; sequences are batched longest first to pad little.
        """
        import torch

        if not sequences:
            return []
        if self._backbone is None:
            self._load()
        assert self._head is not None
        device = self.device
        # what fills the padding is never seen by a real token; it only must be a valid id
        pad = self.tokenizer.pad_token_id
        if pad is None or pad >= self._backbone.config.vocab_size:
            pad = 0
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        scores: list[float] = [math.nan] * len(sequences)
        weight, bias = self._head
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(sequences[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, :len(sequences[i])] = torch.tensor(list(sequences[i]))
                mask[row, :len(sequences[i])] = 1
            ids, mask = ids.to(device), mask.to(device)
            with torch.inference_mode():
                hidden = self._backbone(input_ids=ids, attention_mask=mask).last_hidden_state
                last = hidden[torch.arange(len(chunk), device=device), mask.sum(dim=1) - 1]
                out = last.float() @ weight.T
                if bias is not None:
                    out = out + bias
                out = self._normalized(out)
            self.forward_batches += 1
            for row, i in enumerate(chunk):
                scores[i] = float(out[row, 0])
        return scores

    def _normalized(self, scores: Any) -> Any:
        if self._normalize is None:
            return scores
        function, mean, std = self._normalize
        if function == "affine":
            return (scores - mean) / (std + _NORMALIZE_EPS)
        if function == "scale":
            return scores / (std + _NORMALIZE_EPS)
        return scores

    @property
    def loaded(self) -> bool:
        return self._backbone is not None

    def close(self) -> None:
        self._backbone = None
        self._head = None
