"""The config schema file: the one home of every config default.

The plan validates configs against it and fills its defaults; a step whose command
line mirrors a config key takes that key's default from here (`default_of`), so a
default is never written twice. Light to import: steps and the plan read it.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

#: files a step reads at run time ship inside the package (a wheel carries them);
#: workflow/schemas/config.schema.yaml and config/accelerate/ are links to them
ASSETS = Path(__file__).resolve().parents[1] / "assets"  # sacpo_steps/assets
SCHEMA_PATH = ASSETS / "config.schema.yaml"
ACCELERATE_CONFIGS = ASSETS / "accelerate"


@cache
def _read(path: str) -> dict[str, Any]:
    import yaml

    # libyaml's parser where PyYAML has it (the same safe constructors and resolvers):
    # every Snakemake call reads the schema, and the pure-Python parser takes ~10x longer
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=loader)


def load_config_schema(path: str | Path = SCHEMA_PATH) -> dict[str, Any]:
    """The parsed config schema (cached; callers must not modify it)."""
    return _read(str(path))


def default_of(dotted: str, schema: dict[str, Any] | None = None) -> Any:
    """The schema default of a config key, e.g. `evaluation.winrate.bootstrap_rounds`."""
    node: Any = schema if schema is not None else load_config_schema()
    for part in dotted.split("."):
        node = node["properties"][part]
    if "default" not in node:
        raise KeyError(f"the config schema has no default for {dotted}")
    return node["default"]
