"""Typed judge settings: each key's type, default and help in one dataclass field.

A backend's settings are a frozen dataclass whose fields are made by `setting()`:
the default lives in the field, the help and a JSON-schema fragment (type, enum,
bounds) in its metadata. From that one place come the config check that names
`judge.<key>` (`check_value`), the config schema (`field_schema`) and the values a
judge runs with. Light on purpose: the plan imports this on every Snakemake call.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any, ClassVar

from sacpo_steps.core.errors import InputError

_TYPE_WORDS = {"string": "a string", "integer": "an integer", "number": "a number",
               "boolean": "true or false", "object": "a mapping", "null": "null"}


def setting(default: Any, help: str, *, default_doc: str | None = None,
            convert: Callable[[Any], Any] | None = None, job_only: bool = False,
            schema_default: bool = False, **schema: Any) -> Any:
    """A settings field: `default`, a one-line `help`, and its JSON-schema `schema`
    (type, enum, minimum, ...).

    `default_doc` words the default where its value does not say it (None = "the
    server's own URL"); `convert` normalizes a checked value; `job_only` marks a
    key the workflow sets for a job (a cache path), never one the config holds;
    `schema_default` lets the config schema write the default into the config.
    """
    metadata = {"help": help, "schema": schema, "default_doc": default_doc,
                "convert": convert, "job_only": job_only, "schema_default": schema_default}
    if isinstance(default, dict | list):
        raise TypeError("a mutable default needs a default factory; use None instead")
    return dataclasses.field(default=default, metadata=metadata)


def setting_fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    """The settings of a dataclass by name, in declaration order."""
    return {f.name: f for f in dataclasses.fields(cls)}


def _describe_types(types: list[str]) -> str:
    words = [_TYPE_WORDS[t] for t in types if t != "null"] or ["null"]
    return " or ".join(words)


def _is_type(value: Any, name: str) -> bool:
    if name == "null":
        return value is None
    if name == "boolean":
        return isinstance(value, bool)
    if name == "string":
        return isinstance(value, str)
    if name == "object":
        return isinstance(value, dict)
    if isinstance(value, bool):
        return False
    if name == "integer":
        return isinstance(value, int)
    if name == "number":
        return isinstance(value, int | float) and math.isfinite(value)
    raise ValueError(f"unsupported schema type {name!r}")


def check_schema(schema: dict[str, Any], value: Any, where: str) -> None:
    """Check `value` against the subset of JSON Schema settings use; InputError names
    `where` (and the sub-key of a mapping)."""
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else list(types)
        if not any(_is_type(value, t) for t in types):
            raise InputError(f"expected {_describe_types(types)}, got {value!r}", field=where)
    if value is None:
        return
    if "enum" in schema and value not in schema["enum"]:
        raise InputError(f"must be one of {tuple(schema['enum'])}, got {value!r}", field=where)
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            bound = schema["minimum"]
            text = "non-negative" if bound == 0 else f"at least {bound}"
            raise InputError(f"must be {text}, got {value!r}", field=where)
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            bound = schema["exclusiveMinimum"]
            text = "positive" if bound == 0 else f"greater than {bound}"
            raise InputError(f"must be {text}, got {value!r}", field=where)
        if "maximum" in schema and value > schema["maximum"]:
            raise InputError(f"must be at most {schema['maximum']}, got {value!r}",
                             field=where)
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or (
                "pattern" in schema and not re.search(schema["pattern"], value)):
            raise InputError(f"expected a non-empty string, got {value!r}", field=where)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key, item in value.items():
            if key not in props:
                if schema.get("additionalProperties", True) is False:
                    raise InputError(f"unknown key (known: {', '.join(props)})",
                                     field=f"{where}.{key}")
                continue
            check_schema(props[key], item, f"{where}.{key}")


def check_value(f: dataclasses.Field[Any], value: Any, where: str) -> Any:
    """One setting's value, checked against its field's schema and normalized."""
    check_schema(f.metadata.get("schema", {}), value, where)
    convert = f.metadata.get("convert")
    return convert(value) if convert is not None and value is not None else value


def default_text(f: dataclasses.Field[Any]) -> str:
    """The default as the config would write it, or its `default_doc`."""
    if f.metadata.get("default_doc"):
        return str(f.metadata["default_doc"])
    value = f.default
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def field_schema(f: dataclasses.Field[Any], *, prefix: str = "",
                 with_default: bool = True) -> dict[str, Any]:
    """The JSON schema of one setting: its type and bounds, a description that says the
    default, and `default` itself only where the field asks for it (`schema_default`):
    a default the schema writes into the config would enter every judge job's params.
    """
    out = dict(f.metadata.get("schema", {}))
    help_text = f.metadata.get("help", "").rstrip(".")
    if prefix and help_text[1:2].islower():  # "openai: the judge model", not "...: The"
        help_text = help_text[0].lower() + help_text[1:]
    sep = ": " if f.metadata.get("default_doc") else " "
    out["description"] = f"{prefix}{help_text} (default{sep}{default_text(f)})."
    if with_default and f.metadata.get("schema_default"):
        out["default"] = f.default
    return out


class BackendSettings:
    """Base of a backend's settings dataclass: `BACKEND` names its registry entry. A
    judge section becomes one through `registry.backend_settings` (the one reader of
    judge sections), which checks each key against every backend's settings."""

    BACKEND: ClassVar[str] = ""


@dataclasses.dataclass(frozen=True)
class ProtocolSettings:
    """Keys of every judge section that the judge step and the workflow read, whatever
    the backend: the judging protocol, not any judge's own settings."""

    backend: str = setting("rule", "Which judge (one of the backends below)",
                           schema_default=True, type="string")
    repetitions: int = setting(1, "Judgments per pair and order (paper: 3); a deterministic "
                               "judge makes one", schema_default=True, type="integer",
                               minimum=1)
    max_error_rate: float = setting(0.05, "A judge job fails when a larger share of its "
                                    "judgments are errors", type="number", minimum=0,
                                    maximum=1)
    parallel_jobs: int = setting(4, "Judge jobs at once against an API, each with its own "
                                 "requests in flight", type="integer", minimum=1)


#: the protocol keys, common to every backend
PROTOCOL_KEYS = frozenset(setting_fields(ProtocolSettings))


@dataclasses.dataclass(frozen=True)
class NoSettings:
    """The settings of a backend that has none of its own (the rule judge)."""


@dataclasses.dataclass(frozen=True)
class CostBasis:
    """What one judgment of a paid backend costs at most, for the plan's estimate:
    the characters sent besides the question and both answers (template and
    instructions), the reply cap in tokens, and the prices (None: unknown)."""

    model: str
    template_chars: int
    output_tokens: int
    price_input_per_1m: float | None
    price_output_per_1m: float | None
