"""Validations that passed, remembered across Snakemake calls.

Every Snakemake call loads the plan; importing jsonschema and checking the config and
each node's training settings is a tenth of a no-op rerun. The workflow names a file
under .snakemake/ (`use`); the plan then skips the schema check of a value it checked
before, keyed by the value, the schema and the installed validator. Only successes are
remembered, so an error is always found afresh; steps run by hand use no file and
check everything.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

KEPT = 128  # the newest keys kept: a few configs and their nodes, each in a few versions

_file: Path | None = None
_keys: list[str] | None = None  # the file's keys, read once


def use(path: str | Path | None) -> None:
    """Remember passed validations in `path` (None: check every time)."""
    global _file, _keys
    _file = None if path is None else Path(path)
    _keys = None


@cache
def _validator_stamp() -> list[int] | None:
    """The installed jsonschema's size and time: a new validator checks afresh. Looked
    up once per process, not once per node."""
    spec = importlib.util.find_spec("jsonschema")
    stat = os.stat(spec.origin) if spec and spec.origin else None
    return [stat.st_size, stat.st_mtime_ns] if stat else None


def key(kind: str, value: Any, schema: Any) -> str | None:
    """The key of checking `value` against `schema`, or None when nothing is remembered."""
    if _file is None:
        return None
    digest = hashlib.sha256(kind.encode())
    for part in (value, schema, _validator_stamp()):
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _read() -> list[str]:
    global _keys
    if _keys is None:
        try:
            keys = json.loads(_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            keys = []
        _keys = [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []
    return _keys


def passed(cache_key: str | None) -> bool:
    """Whether this check passed before."""
    return cache_key is not None and cache_key in _read()


def remember(cache_key: str | None) -> None:
    """Record a check that passed (a read-only folder: nothing is kept)."""
    global _keys
    if cache_key is None or _file is None:
        return
    _keys = [k for k in _read() if k != cache_key][-(KEPT - 1):] + [cache_key]
    try:
        _file.parent.mkdir(parents=True, exist_ok=True)
        tmp = _file.with_name(f"{_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_keys), encoding="utf-8")
        tmp.replace(_file)
    except OSError:
        pass
