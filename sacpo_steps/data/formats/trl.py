"""TRL's explicit-prompt preference format: `prompt`, `chosen`, `rejected`.

One source holds one criterion (named by the source). In the conversational variant
the prompt is a message list ending with a user turn (a leading system message and
earlier turns allowed) and each answer is one assistant message or a plain string;
the output keeps the prompt as messages and the answers as strings.
"""

from __future__ import annotations

from typing import Any

from sacpo_steps.data.formats.base import (
    DataFormat,
    Options,
    Record,
    check_answer,
    check_distinct,
    check_messages,
    check_object,
    check_text,
    require_fields,
)

FIELDS = ("prompt", "chosen", "rejected")


def check_text_row(record: Any, options: Options | None = None) -> Record:
    record = check_object(record)
    require_fields(record, FIELDS)
    hint = " (message lists need format trl_conversational)"
    out = {f: check_text(record[f], f, hint=hint if isinstance(record[f], list) else "")
           for f in FIELDS}
    check_distinct(out["chosen"], out["rejected"], "rejected", "chosen")
    return out


def check_conversational_row(record: Any, options: Options | None = None) -> Record:
    record = check_object(record)
    require_fields(record, FIELDS)
    out: Record = {"prompt": check_messages(record["prompt"], "prompt")}
    for f in ("chosen", "rejected"):
        out[f] = check_answer(record[f], f)
    check_distinct(out["chosen"], out["rejected"], "rejected", "chosen")
    return out


TRL_PREFERENCE = DataFormat(
    name="trl_preference",
    description="TRL preference format with explicit prompt: prompt, chosen, rejected (text)",
    conversational=False,
    check_row=check_text_row,
    columns=FIELDS,
)

TRL_CONVERSATIONAL = DataFormat(
    name="trl_conversational",
    description="TRL preference format, conversational: prompt = [{role, content}, ...] "
                "ending with a user turn; chosen/rejected = [assistant message] or str",
    conversational=True,
    check_row=check_conversational_row,
    columns=FIELDS,
)
