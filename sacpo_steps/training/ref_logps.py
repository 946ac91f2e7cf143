"""The reference pass of an alignment node, computed once and shared by every node that
agrees on it.

SACPO's stage 2 is a sweep: several nodes share their parent (the reference), their
data and their tokenization, and differ only in beta/lambda. With TRL's
`precompute_ref_log_probs` each of them would run the same forward pass of the
reference over the same rows. This step runs it once per (reference model, dataset,
loss, reference settings: `training.settings.REFERENCE_FIELDS`) and writes the result;
the align step of each node reads it and runs no reference forward at all.

The values are TRL's own: the step builds the node's TRL trainer on the reference
model and lets its precompute pass run, then stores the columns it added (the loss
registry's `ref_columns`) in row order, each row with a key of its token ids. A node
reading the file checks that its own tokenized rows have the same keys in the same
order, so a file of other rows or other tokenization fails loudly instead of training
on wrong references. The file is JSON: float32 values survive the round trip exactly.

The reading side subclasses the loss's TRL trainer and overrides its precompute
method, `_precompute_ref_logps(dataset, name, batch_size)` (TRL 1.16, pinned), and
while the trainer is built it replaces two module functions of the trainer's module:
`hash_module` (TRL hashes every weight of the reference to key its own cache: a
minute for a 7B model) and `create_model_from_path` (under FSDP TRL loads a copy of
the reference only for its precompute pass). tests/test_ref_logps.py checks that a
node reading the file makes zero reference forwards and trains to the same weights.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.fileio import atomic_output, setup_logging
from sacpo_steps.core.lineage import file_input, make_record, model_input
from sacpo_steps.training.losses import Loss, get_loss
from sacpo_steps.training.settings import TrainingConfig

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
        from dataclasses import asdict

        from sacpo_steps.training.settings import REFERENCE_FIELDS

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
        from sacpo_steps.core.lineage import library_versions

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

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if name != "train":
            return super(cls, self)._precompute_ref_logps(dataset, name, batch_size)
        log.info("reference log-probs of %d rows read from %s (no reference forward)",
                 len(dataset), table.path)
        return table.attach(dataset, needed)

    cls = type(f"{trainer_class.__name__}CachedReference", (trainer_class,),
               {"_precompute_ref_logps": _precompute_ref_logps,
                "__module__": __name__})
    return cls


@contextlib.contextmanager
def no_reference_model(trainer_class: type) -> Iterator[None]:
    """While the trainer is built: no hash of the reference weights and no reference copy.

    Both exist only for TRL's own precompute pass, which a cached file replaces. The
    functions are looked up in the module that defines the TRL trainer (TRL 1.16).
    """
    base = next(c for c in trainer_class.__mro__ if c.__module__.startswith("trl."))
    module = sys.modules[base.__module__]
    saved = {name: getattr(module, name) for name in ("hash_module", "create_model_from_path")}

    def no_copy(*args, **kwargs):  # only the reference is built from a path (policy given)
        return None

    module.hash_module = lambda _module: "cached-reference-log-probs"
    module.create_model_from_path = no_copy
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def reference_key_spec(loss: str, training: dict[str, Any], prompt_template: str
                       ) -> dict[str, Any]:
    """What a node's reference pass depends on besides the reference model and the rows."""
    from sacpo_steps.training.settings import REFERENCE_FIELDS

    return {"loss": loss, "prompt_template": prompt_template,
            "training": {k: training[k] for k in REFERENCE_FIELDS if k in training}}


def compute(reference_dir: str | Path, data_path: str | Path, out: str | Path, *,
            spec: dict[str, Any], scratch_dir: str | Path | None = None,
            threads: int | None = None) -> dict[str, Any]:
    """Run TRL's precompute pass of the spec's loss on the reference; write the columns.

    `spec`: reference, data, loss, prompt_template, seed and the reference settings of
    `training` (the rest takes the schema's defaults; it does not touch this pass).
    Every process of a multi-GPU launch takes part (TRL gathers the rows); rank 0
    writes. `scratch_dir` is the folder the processes share (needed with several).
    """
    from sacpo_steps.models.folders import check_model_dir, set_threads
    from sacpo_steps.models.tokens import PromptCap
    from sacpo_steps.training.align import build_trainer, load_examples, process_rank

    started = time.monotonic()
    rank, world = process_rank()
    if world > 1 and not scratch_dir:
        raise InputError(f"{world} processes need --scratch-dir, a folder they all share",
                         field="scratch_dir")
    entry: Loss = get_loss(spec["loss"])
    if not entry.ref_columns:
        raise InputError(f"loss {entry.name!r} reads no reference log-probs", field="loss")
    training = TrainingConfig.from_dict({**spec.get("training", {}),
                                         "precompute_ref_log_probs": True})
    reference_dir = check_model_dir(reference_dir, role=f"reference model '{spec['reference']}'")
    set_threads(threads)
    lineage = make_record("ref_logps", settings=spec, inputs={
        "reference": model_input(reference_dir, spec["reference"]),
        "data": file_input(data_path)})
    set_threads(threads)
    cap = PromptCap(training.max_prompt_length)
    tokenizer = None
    if cap.max_prompt_length:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(reference_dir)
    examples = load_examples(data_path, entry, spec["prompt_template"], int(spec["seed"]),
                             training.max_examples, tokenizer=tokenizer, prompt_cap=cap)
    with contextlib.ExitStack() as stack:
        work = Path(scratch_dir) if scratch_dir else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="sacpo-ref-")))
        # beta does not enter the reference pass; any valid value builds the trainer
        trainer = build_trainer(reference_dir, examples, loss=entry, beta=1.0,
                                training=training, output_dir=work, seed=int(spec["seed"]))
        dataset = trainer.train_dataset
        missing = [c for c in entry.ref_columns if c not in dataset.column_names]
        if missing:
            raise InputError(f"TRL's precompute pass added no {missing} (settings: "
                             f"{spec.get('training')}); loss {entry.name!r} needs them",
                             field="loss")
        record = {
            "format": FORMAT,
            "spec": spec,
            "record": lineage,
            "columns": list(entry.ref_columns),
            "keys": row_keys(dataset),
            "values": [[float(v) for v in dataset[c]] for c in entry.ref_columns],
        }
        if trainer.accelerator.is_main_process:
            with atomic_output(out) as tmp:
                tmp.write_text(json.dumps(record), encoding="utf-8")
        seconds = time.monotonic() - started
        if world > 1:
            trainer.accelerator.end_training()
    log.info("reference log-probs of %d rows (%s) from '%s' written to %s (%.1f s)",
             len(record["keys"]), ", ".join(record["columns"]), spec["reference"], out, seconds)
    return {"rows": len(record["keys"]), "columns": record["columns"], "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sacpo_steps ref_logps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-dir", required=True, help="the nodes' parent model")
    parser.add_argument("--data", required=True, help="the JSONL file the nodes train on")
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--spec", required=True,
                        help="JSON: reference, data, loss, prompt_template, seed, training")
    parser.add_argument("--scratch-dir", help="a folder every process of the job shares")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--log")
    args = parser.parse_args(argv)
    setup_logging(args.log)
    spec = json.loads(args.spec)
    from sacpo_steps.training.align import skip_unused_imports

    hidden = skip_unused_imports(TrainingConfig.from_dict(spec.get("training", {})))
    if hidden:
        log.info("not imported (the node does not use them): %s", ", ".join(hidden))
    compute(args.reference_dir, args.data, args.out, spec=spec,
            scratch_dir=args.scratch_dir, threads=args.threads)
