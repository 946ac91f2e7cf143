"""What every data format shares: the entry type, bad-row reporting and field checks.

A format is one `DataFormat` value. Its `check_row` turns one raw record into a
clean one (or raises `BadRow` with its first problem); its `build` turns the clean
records into the output sets `{criterion}_pairs` and `{criterion}_kto`. A
pairwise format only has to produce `prompt`, `chosen` and `rejected`:
`build_pairwise` does the rest.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sacpo_steps.core.errors import InputError

# what an alignment node can train on (the datasets' `criterion`)
CRITERIA = ("helpfulness", "safety")

# message roles of a conversational prompt
ROLES = ("system", "user", "assistant")

Record = dict[str, Any]
Options = Mapping[str, Any]


class BadRow(Exception):
    """One row's first problem: `reason` is the counter key, `detail` the specifics."""

    def __init__(self, reason: str, field: str | None = None, detail: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field
        self.detail = detail

    def to_input_error(self, path: str | Path, row: int) -> InputError:
        msg = f"{self.reason} ({self.detail})" if self.detail else self.reason
        return InputError(msg, path=path, row=row, field=self.field)


# --------------------------------------------------------------------------- values


def is_bool(value: Any) -> bool:
    # numpy.bool_ is not a Python bool (nor an int), but parquet/pandas readers may yield it
    t = type(value)
    return isinstance(value, bool) or (t.__module__ == "numpy" and t.__name__ in ("bool", "bool_"))


def is_int(value: Any) -> bool:
    # bool is an int subclass in Python; a flag is not a number
    return isinstance(value, numbers.Integral) and not is_bool(value)


def type_name(value: Any) -> str:
    return "bool" if is_bool(value) else type(value).__name__


def check_object(record: Any) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise BadRow("not a JSON object", detail=f"got {type(record).__name__}")
    return record


def require_fields(record: dict[str, Any], fields: tuple[str, ...]) -> None:
    """Every field present and not null, checked in order (the first problem is reported)."""
    for f in fields:
        if f not in record:
            raise BadRow(f"missing field '{f}'", field=f)
        if record[f] is None:
            raise BadRow(f"null field '{f}'", field=f)


def check_text(value: Any, field: str, *, hint: str = "") -> str:
    """A non-blank string that can be written as UTF-8 (no lone surrogates), kept raw."""
    if not isinstance(value, str):
        raise BadRow(f"wrong type for '{field}'", field,
                     f"expected str, got {type_name(value)}{hint}")
    if not value.strip():
        raise BadRow(f"empty text in '{field}'", field, "empty or whitespace only")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRow(f"invalid unicode in '{field}'", field, exc.reason) from None
    return str(value)


def check_distinct(chosen: str, rejected: str, field: str, other: str) -> None:
    """A pair of the same text teaches nothing (and DPO's loss is constant on it)."""
    if chosen.strip() == rejected.strip():
        raise BadRow("identical responses", field, f"same text as {other}")


def check_messages(value: Any, field: str) -> list[dict[str, str]]:
    """A conversational prompt: messages {role, content}, an optional leading system
    message, ending with a user turn. Returned as plain {role, content} dicts."""
    if not isinstance(value, list):
        raise BadRow(f"wrong type for '{field}'", field,
                     f"expected a list of messages, got {type_name(value)}")
    if not value:
        raise BadRow(f"empty text in '{field}'", field, "no messages")
    bad = f"bad message in '{field}'"
    messages = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise BadRow(bad, field, f"message {i} is a {type_name(msg)}, not an object")
        role = msg.get("role")
        if role not in ROLES:
            raise BadRow(bad, field, f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        if role == "system" and i > 0:
            raise BadRow(bad, field, f"message {i}: a system message must come first")
        content = msg.get("content")
        if not isinstance(content, str):
            raise BadRow(bad, field, f"message {i}: content must be a str, "
                                     f"got {type_name(content)}")
        try:
            check_text(content, field)
        except BadRow as exc:
            raise BadRow(bad, field, f"message {i}: {exc.detail}") from None
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise BadRow(f"'{field}' does not end with a user turn", field,
                     f"last message is {messages[-1]['role']!r}")
    return messages


def check_answer(value: Any, field: str) -> str:
    """An answer as a plain string, or as a list holding one assistant message."""
    if isinstance(value, str):
        return check_text(value, field)
    if not isinstance(value, list):
        raise BadRow(f"wrong type for '{field}'", field,
                     f"expected str or [assistant message], got {type_name(value)}")
    if len(value) != 1:
        raise BadRow(f"bad answer in '{field}'", field,
                     f"expected one assistant message, got {len(value)} messages")
    msg = value[0]
    if not isinstance(msg, dict) or msg.get("role") != "assistant":
        role = msg.get("role") if isinstance(msg, dict) else type_name(msg)
        raise BadRow(f"bad answer in '{field}'", field,
                     f"expected an assistant message, got {role!r}")
    return check_text(msg.get("content"), field)


# --------------------------------------------------------------------------- building


def build_pairwise(records: list[Record], criterion: str | None,
                   options: Options) -> dict[str, list[Record]]:
    """Pairs as they are; KTO rows chosen -> desirable, rejected -> undesirable."""
    assert criterion is not None, "a pairwise format yields the source's one criterion"
    pairs: list[Record] = []
    kto: list[Record] = []
    for rec in records:
        pairs.append({"prompt": rec["prompt"], "chosen": rec["chosen"],
                      "rejected": rec["rejected"], "source_row": rec["source_row"]})
        for answer, label in ((rec["chosen"], True), (rec["rejected"], False)):
            kto.append({"prompt": rec["prompt"], "completion": answer, "label": label,
                        "source_row": rec["source_row"]})
    return {f"{criterion}_pairs": pairs, f"{criterion}_kto": kto}


# --------------------------------------------------------------------------- the entry

RowChecker = Callable[[Any, Options], Record]
Builder = Callable[[list[Record], str | None, Options], dict[str, list[Record]]]
OptionsCheck = Callable[[Options, str], None]


@dataclass(frozen=True)
class DataFormat:
    """One input schema: how its rows are checked and what training sets they yield."""

    name: str
    description: str
    # prompts are message lists: training must use the chat template
    conversational: bool
    # raw record -> clean record (prompt/chosen/rejected for `build_pairwise`); raises BadRow
    check_row: RowChecker
    # criteria the format can yield
    criteria: tuple[str, ...] = CRITERIA
    # True: a source yields ONE of `criteria`, named by its `criterion` key (single-criterion
    # data, e.g. a helpfulness-only table); False: every source yields all of `criteria`
    criterion_from_source: bool = True
    # clean records -> {output name: rows}, names `{criterion}_pairs` / `{criterion}_kto`
    build: Builder = build_pairwise
    # option name -> JSON schema of its value, with `description` and `default`
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # cross-option checks beyond each option's schema; raise InputError naming `<where>.<key>`
    check_options: OptionsCheck | None = None
    # top-level columns read from Parquet (None: all); extras may be huge or of odd types
    columns: tuple[str, ...] | None = None
    # criteria whose pairs the builder also writes with each answer's safety label, as
    # `{criterion}_labeled_pairs` (chosen_safe, rejected_safe): what one-stage safe
    # losses (SafeDPO) train on; a format whose rows carry no safety labels has none
    labeled: tuple[str, ...] = ()

    def yields(self, criterion: str | None) -> tuple[str, ...]:
        """The criteria a source of this format yields."""
        if self.criterion_from_source:
            return (criterion,) if criterion is not None else ()
        return self.criteria
