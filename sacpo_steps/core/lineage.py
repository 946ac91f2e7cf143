"""What made each artifact: records, fingerprints, and the checks consumers run.

Every artifact the pipeline makes carries a *record*: the step and its code version,
the settings, each input's fingerprint, the library versions and the kernel settings
of the process. Model folders keep it in their `sacpo.json` (key `record`); a
reference log-probs file inside itself; generation and battle files in a sidecar
`<file>.record.json` beside them, so the files themselves stay as they were.

A record's fingerprint is a hash of the record. A model the pipeline made is
fingerprinted from its own record, which holds its parent's fingerprint, so a 7B
model costs one small JSON read; a model without a record (a download, a local
folder, a folder made before records existed) is fingerprinted from its file list,
sizes and the first and last MiB of each file, which tells apart two models of one
architecture without reading their weights.

Library upgrades rerun nothing by themselves (a TRL patch release would otherwise
retrain a 7B sweep): the records say which versions made what, `python -m
sacpo_steps lineage <folder>` reports what is stale, trainer checkpoints of other
versions are not resumed, and `reproducibility.rerun_on_library_change: true` makes
the versions part of every job's params instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.fileio import atomic_output
from sacpo_steps.core.provenance import source_hash
from sacpo_steps.core.reproducibility import runtime_record
from sacpo_steps.steps import module_of

log = logging.getLogger("sacpo.lineage")

FORMAT = 1
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate")
SIDECAR = ".record.json"
MODEL_RECORD_FILE = "sacpo.json"
SAMPLE_BYTES = 1 << 20
#: steps that load torch anyway: their records also say which kernels torch chose
TORCH_STEPS = frozenset({"sft_checkpoint", "ref_logps", "align", "merge", "generate"})
#: files of a model folder that describe it rather than make it up
NOT_CONTENT = frozenset({MODEL_RECORD_FILE, "README.md"})


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that shape the numbers (no imports)."""
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sampled_fingerprint(folder: str | Path) -> str:
    """File names, sizes and the first and last MiB of each file of a model folder."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or rel.parts[0].startswith(".") or rel.as_posix() in NOT_CONTENT:
            continue
        size = path.stat().st_size
        digest.update(f"{rel.as_posix()}\0{size}\0".encode())
        with open(path, "rb") as f:
            digest.update(f.read(SAMPLE_BYTES))
            if size > 2 * SAMPLE_BYTES:
                f.seek(size - SAMPLE_BYTES)
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()[:32]


def make_record(step: str, *, settings: Any, inputs: dict[str, dict[str, Any]],
                name: str | None = None) -> dict[str, Any]:
    """The record of an artifact made now by `step`, with its fingerprint. `name` (the
    model's name in the plan) is recorded but is not part of the fingerprint."""
    runtime = runtime_record(measure_torch=step in TORCH_STEPS)
    measured = runtime.pop("measured")
    record = {"format": FORMAT, "step": step, "name": name,
              "code": source_hash(module_of(step)),
              "settings": settings, "inputs": inputs, "libraries": library_versions(),
              "runtime": runtime, "measured": measured}
    record["fingerprint"] = fingerprint_of(record)
    return record


def fingerprint_of(record: dict[str, Any]) -> str:
    """A record's fingerprint: everything in it but names and places (the model's and its
    inputs' names in the plan, where the inputs lie: a renamed node or a copied results
    tree keeps its fingerprints; a name is not the content), what was measured of the
    machine (torch's kernel choice, the GPU: a rerun elsewhere under the same settings is
    the same artifact), and the fingerprint itself."""
    content = {k: v for k, v in record.items()
               if k not in ("fingerprint", "output", "measured", "name")}
    content["inputs"] = {role: {k: v for k, v in spec.items() if k not in ("path", "name")}
                         for role, spec in record.get("inputs", {}).items()}
    return _digest(content)


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two records of one artifact, in words (for logs)."""
    found = []
    for role in sorted(set(old.get("inputs", {})) | set(new.get("inputs", {}))):
        a, b = old.get("inputs", {}).get(role, {}), new.get("inputs", {}).get(role, {})
        key_a = a.get("fingerprint") or a.get("sha256")
        key_b = b.get("fingerprint") or b.get("sha256")
        if key_a != key_b:
            label = f" '{b.get('name')}'" if b.get("name") else ""
            found.append(f"input {role}{label} is now {str(key_b)[:12]} (was {str(key_a)[:12]})")
    for part, words in (("code", "the step's code"), ("settings", "the settings"),
                        ("libraries", "the library versions"), ("runtime", "the kernel settings")):
        if old.get(part) != new.get(part):
            found.append(f"{words} changed")
    return found or ["the records differ"]


def model_record(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MODEL_RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8")).get("record")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise InputError(f"unreadable model record: {exc}", path=path) from None
    return record if isinstance(record, dict) and record.get("fingerprint") else None


def model_fingerprint(folder: str | Path) -> tuple[str, str]:
    """(fingerprint, how): from the model's record, or sampled from its files."""
    record = model_record(folder)
    if record is not None:
        return record["fingerprint"], "record"
    return sampled_fingerprint(folder), "files"


def model_input(folder: str | Path, name: str) -> dict[str, Any]:
    fingerprint, how = model_fingerprint(folder)
    return {"name": name, "path": str(folder), "fingerprint": fingerprint, "from": how}


def file_input(path: str | Path) -> dict[str, Any]:
    """A file input: its record's fingerprint where it has a sidecar, else its hash."""
    if not Path(path).is_file():
        raise InputError("input file not found", path=path)
    record = read_sidecar(path)
    if record is not None:
        return {"path": str(path), "fingerprint": record["fingerprint"], "from": "record"}
    return {"path": str(path), "sha256": file_sha256(path)}


# ---- sidecars of file artifacts (generations, battles) ----

def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR)


def write_sidecar(path: str | Path, record: dict[str, Any]) -> None:
    """Write the record of the finished file `path`, with the file's own hash."""
    full = {**record, "output": {"sha256": file_sha256(path)}}
    with atomic_output(sidecar_path(path)) as tmp:
        tmp.write_text(json.dumps(full, indent=1) + "\n", encoding="utf-8")


def drop_sidecar(path: str | Path) -> None:
    """Before a step rewrites `path`: its old record must not describe the new file."""
    sidecar_path(path).unlink(missing_ok=True)


def read_sidecar(path: str | Path) -> dict[str, Any] | None:
    """The record of `path`, checked against the file; None when it has none.

    A record whose file hash differs describes another file (it was edited, or a
    copy of another run's output was put in its place): refused, naming both."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        record = json.loads(side.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"unreadable record: {exc}", path=side) from None
    if not isinstance(record, dict) or not record.get("fingerprint"):
        raise InputError("not a record (no fingerprint)", path=side, field="fingerprint")
    # a record of another format was fingerprinted another way: it cannot be checked here
    if not isinstance(record.get("inputs", {}), dict) or (
            record.get("format") == FORMAT and record["fingerprint"] != fingerprint_of(record)):
        raise InputError("the record was edited after it was written (its fingerprint does "
                         "not match its content)", path=side, field="fingerprint")
    output = record.get("output")
    recorded = output.get("sha256") if isinstance(output, dict) else None
    if recorded != file_sha256(path):
        raise InputError(f"does not describe {path}: the file changed after it was made "
                         "(its hash differs from the record's); rerun the step that makes "
                         "it", path=side, field="output.sha256")
    return record


# ---- what is stale ----

def stale_reasons(record: dict[str, Any] | None, *, current: dict[str, str | None]
                  ) -> list[str]:
    """Why an artifact's record no longer matches this installation and its inputs."""
    if record is None:
        return ["no record (made before records existed, or not by the pipeline)"]
    reasons = []
    theirs = record.get("libraries", {})
    changed = [f"{k} {theirs.get(k)} -> {current.get(k)}" for k in LIBRARIES
               if theirs.get(k) != current.get(k)]
    if changed:
        reasons.append("libraries changed: " + ", ".join(changed))
    for role, spec in record.get("inputs", {}).items():
        path = spec.get("path")
        if not path:
            continue
        if not Path(path).exists():
            reasons.append(f"input {role} missing at {path} (run the report from the folder "
                           "Snakemake ran in)")
            continue
        if Path(path).is_dir():
            now = model_fingerprint(path)[0]
            if now != spec.get("fingerprint"):
                reasons.append(f"input {role} ({path}) changed since")
        elif "sha256" in spec or "fingerprint" in spec:
            now_input = file_input(path)
            if any(now_input.get(k) != spec.get(k) for k in ("sha256", "fingerprint")):
                reasons.append(f"input {role} ({path}) changed since")
    return reasons


def artifacts(root: str | Path) -> list[tuple[str, Path, dict[str, Any] | None]]:
    """(kind, path, record or None) of every artifact under `root`, sorted by path."""
    root = Path(root)
    found: list[tuple[str, Path, dict[str, Any] | None]] = []

    def skipped(path: Path) -> bool:  # leftovers of killed jobs, trainer scratch
        return any(part.startswith(".") or part.startswith("checkpoint-")
                   for part in path.relative_to(root).parts)

    for config in root.rglob("config.json"):
        folder = config.parent
        if skipped(folder) or not any(folder.glob("*.safetensors")):
            continue
        try:
            found.append(("model", folder, model_record(folder)))
        except InputError as exc:
            found.append(("model", folder, {"invalid": str(exc)}))
    for path in root.rglob("*.json"):
        if skipped(path):
            continue
        if path.parent.parent.name == "ref_logps" or path.parent.name == "ref_logps":
            try:
                record = json.loads(path.read_text(encoding="utf-8")).get("record")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                record = None
            found.append(("reference log-probs", path, record))
    for kind, folder, pattern in (("generation", "generations", "*.jsonl"),
                                  ("battles", "battles", "*__vs__*.jsonl")):
        for path in root.rglob(f"{folder}/**/{pattern}"):
            if path.name.endswith(".replies.jsonl") or skipped(path):
                continue
            try:
                found.append((kind, path, read_sidecar(path)))
            except InputError as exc:
                found.append((kind, path, {"invalid": str(exc)}))
    return sorted(found, key=lambda item: str(item[1]))


def report(root: str | Path) -> list[tuple[str, str, str]]:
    """(kind, path, status) of every artifact under `root`: `ok` or why it is stale."""
    current = library_versions()
    rows = []
    for kind, path, record in artifacts(root):
        if record is not None and "invalid" in record:
            reasons = [record["invalid"]]
        else:
            try:
                reasons = stale_reasons(record, current=current)
            except InputError as exc:
                reasons = [str(exc)]
        rows.append((kind, str(path), "; ".join(reasons) or "ok"))
    return rows


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="sacpo_steps lineage",
        description="Report which artifacts under a folder are stale: made by other library "
        "versions, from inputs that changed since, or without a record.")
    parser.add_argument("root", nargs="?", default="results",
                        help="folder to scan (default: results)")
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 1 when anything is not ok")
    args = parser.parse_args(argv)
    rows = report(args.root)
    if not rows:
        raise InputError("no artifacts found", path=args.root)
    width = max(len(kind) for kind, _, _ in rows)
    for kind, path, status in rows:
        print(f"{kind:<{width}}  {status:<4}  {path}" if status == "ok"
              else f"{kind:<{width}}  STALE {path}: {status}")
    stale = sum(status != "ok" for _, _, status in rows)
    print(f"{len(rows)} artifacts, {stale} stale; installed: "
          + ", ".join(f"{k} {v}" for k, v in library_versions().items()))
    if args.strict and stale:
        sys.exit(1)
