"""Anthropic HH-RLHF: two full transcripts per row, `chosen` and `rejected`.

A transcript is "\\n\\nHuman: ...\\n\\nAssistant: ..." turns. The prompt is the part
both transcripts share, up to and including their last "\\n\\nAssistant:"; the answers
are what follows it. Rows whose transcripts differ before that point are bad rows.
The prompt becomes a message list (Human -> user, Assistant -> assistant); turns and
answers are stripped of surrounding whitespace (the transcript's " " after each colon
and its blank-line separators are layout, not text).
"""

from __future__ import annotations

import os
import re
from typing import Any

from sacpo_steps.data.formats.base import (
    BadRow,
    DataFormat,
    Options,
    Record,
    check_distinct,
    check_object,
    check_text,
    require_fields,
)

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
FIELDS = ("chosen", "rejected")
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLE = {"Human": "user", "Assistant": "assistant"}


def _split(transcript: str, field: str) -> tuple[str, str]:
    """(prompt part up to and including the last Assistant marker, the answer after it)."""
    i = transcript.rfind(ASSISTANT)
    if i < 0:
        raise BadRow(f"no assistant turn in '{field}'", field,
                     "no '\\n\\nAssistant:' in the transcript")
    end = i + len(ASSISTANT)
    return transcript[:end], transcript[end:]


def _answer(text: str, field: str) -> str:
    if HUMAN in text:
        raise BadRow(f"'{field}' does not end with an assistant turn", field,
                     "a Human turn follows the last Assistant turn")
    return check_text(text.strip(), field)


def transcript_messages(prompt_part: str, field: str = "chosen") -> list[dict[str, str]]:
    """The turns before the final "\\n\\nAssistant:" as messages ending with a user turn."""
    parts = _TURN.split(prompt_part[: -len(ASSISTANT)])
    # parts = [text before the first marker, role, content, role, content, ...]
    if parts[0].strip() or len(parts) < 3 or parts[1] != "Human":
        raise BadRow(f"not a Human/Assistant transcript in '{field}'", field,
                     "expected it to start with '\\n\\nHuman:'")
    messages = []
    for role, content in zip(parts[1::2], parts[2::2], strict=True):
        if not content.strip():
            raise BadRow(f"empty turn in '{field}'", field,
                         f"turn {len(messages) + 1} ({role}) is empty")
        messages.append({"role": _ROLE[role], "content": content.strip()})
    if messages[-1]["role"] != "user":
        raise BadRow(f"'{field}' does not end with a user turn", field,
                     "two Assistant turns follow each other at the end")
    return messages


def check_row(record: Any, options: Options | None = None) -> Record:
    record = check_object(record)
    require_fields(record, FIELDS)
    chosen = check_text(record["chosen"], "chosen")
    rejected = check_text(record["rejected"], "rejected")
    prompt_c, answer_c = _split(chosen, "chosen")
    prompt_r, answer_r = _split(rejected, "rejected")
    if prompt_c != prompt_r:
        at = len(os.path.commonprefix([prompt_c, prompt_r]))
        raise BadRow("transcripts do not share the prompt", "rejected",
                     f"chosen and rejected differ from character {at + 1} on, before their last "
                     "'\\n\\nAssistant:'")
    out: Record = {
        "prompt": transcript_messages(prompt_c, "chosen"),
        "chosen": _answer(answer_c, "chosen"),
        "rejected": _answer(answer_r, "rejected"),
    }
    check_distinct(out["chosen"], out["rejected"], "rejected", "chosen")
    return out


HH_RLHF = DataFormat(
    name="hh_rlhf",
    description="Anthropic/hh-rlhf: chosen and rejected full transcripts "
                "('\\n\\nHuman: ...\\n\\nAssistant: ...'); JSONL, optionally gzipped",
    conversational=True,
    check_row=check_row,
    columns=FIELDS,
)
