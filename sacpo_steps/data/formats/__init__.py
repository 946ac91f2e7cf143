"""Input data formats: ONE table (`FORMATS`) that the preference_data step and the plan ask.

A format is a `DataFormat` value (see `base`): whether its prompts are message
lists, which criteria it yields, its options, and its row checker and builder.
Adding one is a file and a line in `_BUILTIN` (or a `register_format` call);
nothing else branches on a format's name.

A preference source picks its format with three keys, checked by `check_source`:
`format` (default `DEFAULT_FORMAT`), `criterion` (for a single-criterion format:
which one its rows express) and `options` (the format's own settings).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sacpo_steps.core.errors import InputError
from sacpo_steps.data.formats import hh_rlhf, pku, trl
from sacpo_steps.data.formats.base import CRITERIA, BadRow, DataFormat

__all__ = [
    "CRITERIA",
    "DEFAULT_FORMAT",
    "FORMATS",
    "BadRow",
    "DataFormat",
    "SourceFormat",
    "check_source",
    "get_format",
    "register_format",
    "resolve_format",
]

DEFAULT_FORMAT = "pku_saferlhf_30k"

# format name -> entry; fill it through `register_format`
FORMATS: dict[str, DataFormat] = {}

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def register_format(entry: DataFormat, *, replace: bool = False) -> DataFormat:
    """Add `entry` to `FORMATS` (ValueError if the name is taken, unless `replace`)."""
    if not _NAME.match(entry.name):
        raise ValueError(f"format name {entry.name!r}: use lower-case letters, digits and _")
    if entry.name in FORMATS and not replace:
        raise ValueError(f"data format {entry.name!r} is already registered")
    if set(entry.labeled) - set(entry.criteria):
        raise ValueError(f"format {entry.name!r}: labeled {entry.labeled} must be among its "
                         f"criteria {entry.criteria}")
    if not entry.criteria or set(entry.criteria) - set(CRITERIA):
        raise ValueError(f"format {entry.name!r}: criteria must be among {CRITERIA}, "
                         f"not {entry.criteria}")
    for key, schema in entry.options.items():
        missing = {"description", "default"} - set(schema)
        if missing:
            raise ValueError(f"format {entry.name!r}, option {key!r}: needs {sorted(missing)}")
    FORMATS[entry.name] = entry
    return entry


_BUILTIN = (
    pku.PKU_SAFERLHF_30K,
    pku.PKU_SAFERLHF,
    trl.TRL_PREFERENCE,
    trl.TRL_CONVERSATIONAL,
    hh_rlhf.HH_RLHF,
)
for _entry in _BUILTIN:
    register_format(_entry)


def get_format(name: str, *, field: str | None = None) -> DataFormat:
    """The registered format `name`; an InputError (naming `field`) lists the known ones."""
    if not isinstance(name, str) or name not in FORMATS:
        known = ", ".join(sorted(FORMATS))
        raise InputError(f"unknown data format {name!r} (known: {known})", field=field)
    return FORMATS[name]


@dataclass(frozen=True)
class SourceFormat:
    """A source's checked format settings: what the step reads and the plan asks."""

    format: DataFormat
    # the one criterion of a single-criterion source; None when the format yields all
    criterion: str | None
    # every option of the format, defaults filled in
    options: dict[str, Any]

    @property
    def name(self) -> str:
        return self.format.name

    @property
    def conversational(self) -> bool:
        return self.format.conversational

    @property
    def criteria(self) -> tuple[str, ...]:
        """The criteria this source yields (a dataset on it must pick one of them)."""
        return self.format.yields(self.criterion)

    def output_names(self) -> list[str]:
        """The JSONL sets written (without `.jsonl`), pairs first, labelled pairs last."""
        return ([f"{c}_pairs" for c in self.criteria] + [f"{c}_kto" for c in self.criteria]
                + [f"{c}_labeled_pairs" for c in self.criteria if c in self.format.labeled])

    def cli_args(self) -> str:
        """`--format ... [--criterion ...] [--options JSON]`, shell-quoted, for the rule."""
        args = ["--format", self.format.name]
        if self.criterion is not None:
            args += ["--criterion", self.criterion]
        if self.options:
            args += ["--options", json.dumps(self.options, sort_keys=True)]
        return shlex.join(args)


def _key(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _check_criterion(fmt: DataFormat, criterion: Any, where: str) -> str | None:
    field = _key(where, "criterion")
    choices = ", ".join(fmt.criteria)
    if not fmt.criterion_from_source:
        if criterion is not None:
            raise InputError(f"format {fmt.name!r} yields every criterion ({choices}) from "
                             "each row; `criterion` does not apply to it", field=field)
        return None
    if criterion is None:
        raise InputError(f"format {fmt.name!r} yields one criterion per source: set "
                         f"`criterion` to one of {choices}", field=field)
    if criterion not in fmt.criteria:
        raise InputError(f"format {fmt.name!r} does not yield criterion {criterion!r} "
                         f"(it yields: {choices})", field=field)
    return str(criterion)


def _check_options(fmt: DataFormat, options: Any, where: str) -> dict[str, Any]:
    field = _key(where, "options")
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise InputError(f"expected a mapping of option -> value, got {type(options).__name__}",
                         field=field)
    known = ", ".join(sorted(fmt.options)) or "none"
    for key in options:
        if key not in fmt.options:
            raise InputError(f"unknown option {key!r} of format {fmt.name!r} (known: {known})",
                             field=f"{field}.{key}")
    if options:
        import jsonschema  # only needed when options are given

        for key, value in options.items():
            validator = jsonschema.Draft202012Validator(dict(fmt.options[key]))
            for err in validator.iter_errors(value):
                raise InputError(err.message, field=f"{field}.{key}")
    resolved = {key: options.get(key, schema["default"]) for key, schema in fmt.options.items()}
    if fmt.check_options is not None:
        fmt.check_options(resolved, field)
    return resolved


def resolve_format(format: str | None = None, criterion: str | None = None,
                   options: Mapping[str, Any] | None = None, *, where: str = "") -> SourceFormat:
    """Check a format name, criterion and options; InputErrors name `<where>.<key>`."""
    fmt = get_format(DEFAULT_FORMAT if format is None else format,
                     field=_key(where, "format"))
    return SourceFormat(
        format=fmt,
        criterion=_check_criterion(fmt, criterion, where),
        options=_check_options(fmt, options, where),
    )


def check_source(spec: Mapping[str, Any], where: str) -> SourceFormat:
    """Check a `preference_sources` entry's format keys (`format`, `criterion`, `options`).

    Other keys (where the data comes from) are not looked at. Raises InputError naming
    `<where>.<key>`; returns the resolved settings (conversational flag, criteria).
    """
    if not isinstance(spec, Mapping):
        raise InputError(f"expected a mapping, got {type(spec).__name__}", field=where)
    return resolve_format(spec.get("format"), spec.get("criterion"), spec.get("options"),
                          where=where)
