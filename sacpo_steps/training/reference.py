"""Reference log-probs computed once: the file, its checks, and a trainer that reads it.

SACPO's stage 2 is a sweep: several nodes share their parent (the reference), their
data and their tokenization, and differ only in beta/lambda. With TRL's
`precompute_ref_log_probs` each of them would run the same forward pass of the
reference over the same rows. The `ref_logps` step runs it once per (reference model,
dataset, loss, reference settings: `settings.REFERENCE_FIELDS`) and writes a file;
the align step of each node reads it here and runs no reference forward at all.

Each row of the file carries a key of its token ids. A node reading the file checks
that its own tokenized rows have the same keys in the same order, its settings and
its parent's fingerprint, so a file of other rows, tokenization or model fails loudly
instead of training on wrong references. The file is JSON: float32 values survive
the round trip exactly. The trainer hooks (TRL internals) are in `trl_adapter`;
tests/test_ref_logps.py checks that a node reading the file makes zero reference
forwards and trains to the same weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.lineage import library_versions
from sacpo_steps.models import trl_adapter
from sacpo_steps.training.settings import REFERENCE_FIELDS, TrainingConfig

log = logging.getLogger("sacpo.ref_logps")

FORMAT = 2  # 2: with the lineage record of the pass (format 1 files had none)


def row_keys(dataset: Any) -> list[str]:
    """A key per tokenized row: a hash of its token-id columns (`*_ids`, by name).

    For DPO: prompt, chosen and rejected ids; for KTO also the mismatched completion
    of the KL term, which depends on the row order within a batch.
    """
    columns = sorted(c for c in dataset.column_names if c.endswith("_ids"))
    if not columns:
        raise ValueError(f"no token-id columns in {dataset.column_names}")
    values = [dataset[c] for c in columns]
    keys = []
    for row in zip(*values, strict=True):
        blob = json.dumps(row, separators=(",", ":")).encode()
        keys.append(hashlib.sha256(blob).hexdigest()[:32])
    return keys


class ReferenceTable:
    """A `ref_logps` file, ready to be attached to a trainer's tokenized dataset."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError("reference log-probs file not found", path=self.path) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"not a reference log-probs file: {exc}", path=self.path) from None
        if isinstance(data, dict) and data.get("format") == 1:
            raise InputError("was made before reference files carried a lineage record "
                             "(format 1): nothing says which model it was computed on; rerun "
                             "its ref_logps job", path=self.path, field="format")
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InputError(f"not a reference log-probs file of format {FORMAT}",
                             path=self.path, field="format")
        for field in ("columns", "keys", "values"):
            if not isinstance(data.get(field), list):
                raise InputError("missing or not a list", path=self.path, field=field)
        self.columns: list[str] = data["columns"]
        self.keys: list[str] = data["keys"]
        self.values: list[list[float]] = data["values"]
        self.spec: dict[str, Any] = data.get("spec", {})
        record = data.get("record")
        self.record: dict[str, Any] = record if isinstance(record, dict) else {}
        inputs = self.record.get("inputs")
        if not isinstance(inputs, dict) or not isinstance(inputs.get("reference"), dict):
            raise InputError("has no lineage record of its reference model", path=self.path,
                             field="record.inputs.reference")
        if len(self.values) != len(self.columns) or any(
                len(v) != len(self.keys) for v in self.values):
            raise InputError("columns, keys and values disagree in length", path=self.path,
                             field="values")

    def check_settings(self, *, loss: str, training: TrainingConfig,
                       prompt_template: str) -> None:
        """Refuse a file computed under other reference settings than the node's.

        Row keys catch other rows and other tokenization, but TRL truncates to
        `max_length` only when it batches, so a file of another max_length (or dtype,
        or batch) has the same keys: its recorded settings are compared here.
        """
        theirs = self.spec
        if theirs.get("loss") != loss:
            raise InputError(f"was computed for loss {theirs.get('loss')!r}, the node trains "
                             f"with {loss!r}", path=self.path, field="spec.loss")
        if theirs.get("prompt_template") != prompt_template:
            raise InputError("was computed under another prompt_template", path=self.path,
                             field="spec.prompt_template")
        recorded = asdict(TrainingConfig.from_dict(theirs.get("training", {})))
        ours = asdict(training)
        for key in REFERENCE_FIELDS:
            if recorded[key] != ours[key]:
                raise InputError(f"was computed with training.{key} = {recorded[key]!r}, the "
                                 f"node trains with {ours[key]!r}", path=self.path,
                                 field=f"spec.training.{key}")

    def check_reference(self, parent: dict[str, Any]) -> None:
        """Refuse a file computed on another model than the node's parent.

        `parent` is the parent's lineage input (`lineage.model_input`). Names are not
        enough: two models may share a name across runs and a tokenizer across names,
        so the fingerprints are compared, and the error names both models.
        """
        theirs = self.record["inputs"]["reference"]
        if theirs.get("fingerprint") != parent["fingerprint"]:
            raise InputError(
                f"was computed on reference '{theirs.get('name')}' (fingerprint "
                f"{str(theirs.get('fingerprint'))[:12]}, {theirs.get('path')}), but the node's "
                f"parent is '{parent['name']}' (fingerprint {parent['fingerprint'][:12]}, "
                f"{parent['path']}): its log-probs are another model's; rerun the ref_logps "
                "job", path=self.path, field="record.inputs.reference")
        made_with, now = self.record.get("libraries", {}), library_versions()
        changed = {k: (v, now.get(k)) for k, v in made_with.items() if now.get(k) != v}
        if changed:
            log.warning("%s was computed under other library versions %s (made, now): "
                        "`python -m sacpo_steps lineage` lists what is stale", self.path,
                        changed)

    def attach(self, dataset: Any, needed: tuple[str, ...]) -> Any:
        """`dataset` with the reference columns added, after checking its rows are ours."""
        from datasets import Value

        missing = [c for c in needed if c not in self.columns]
        if missing:
            raise InputError(f"has no {missing} (it holds {self.columns}); it was computed "
                             "for another loss", path=self.path, field="columns")
        keys = row_keys(dataset)
        if len(keys) != len(self.keys):
            raise InputError(f"holds {len(self.keys)} rows but the node trains on {len(keys)}:"
                             " it was computed for other data or settings", path=self.path)
        for i, (ours, theirs) in enumerate(zip(keys, self.keys, strict=True), start=1):
            if ours != theirs:
                raise InputError(f"training row {i} has other tokens than the file's row {i}: "
                                 "it was computed for other data or tokenization settings",
                                 path=self.path, row=i)
        for name in needed:
            column = self.values[self.columns.index(name)]
            dataset = dataset.add_column(name, column, feature=Value("float32"))
        return dataset


def cached_reference_trainer(trainer_class: type, table: ReferenceTable,
                             needed: tuple[str, ...]) -> type:
    """The loss's TRL trainer class, reading its training rows' reference log-probs from
    `table` instead of computing them (an eval set, which the pipeline never passes,
    would still go through TRL's own pass)."""

    def reference_pass(trainer, dataset, name, batch_size):
        if name != "train":
            return trl_adapter.original_reference_pass(trainer, dataset, name, batch_size)
        log.info("reference log-probs of %d rows read from %s (no reference forward)",
                 len(dataset), table.path)
        return table.attach(dataset, needed)

    return trl_adapter.with_reference_pass(trainer_class, reference_pass, module=__name__)


def reference_key_spec(loss: str, training: dict[str, Any], prompt_template: str
                       ) -> dict[str, Any]:
    """What a node's reference pass depends on besides the reference model and the rows."""
    return {"loss": loss, "prompt_template": prompt_template,
            "training": {k: training[k] for k in REFERENCE_FIELDS if k in training}}
