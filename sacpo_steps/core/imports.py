"""Classes named by import path ("module:Class"), imported only when used.

The registries (losses, judge backends) name TRL's and the judges' classes this way,
so that planning, which runs on every Snakemake call, imports none of them.
"""

from __future__ import annotations

import importlib
from typing import Any


def import_object(path: str) -> Any:
    """`"trl:DPOConfig"` -> the class (the import happens here, when it is used)."""
    module, sep, name = path.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"an import path is 'module:Name', got {path!r}")
    return getattr(importlib.import_module(module), name)
