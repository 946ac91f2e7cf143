"""The GPT-4 judge's prompts and replies: template files, rendering, reply parsing.

Prompt templates are files: the packaged sets (`prompts/<criterion>_<format>.txt`,
the default, and the earlier defaults under a name, `prompts/<name>/...`), or the
user's own; `judge.templates.<criterion>` names a packaged set or a file. A
template may start with a `=== system ===` section sent as a system message before
its `=== user ===` section. The reply format `scores` reads the first non-empty
line, which must be `Scores: A=<s> B=<s>` (ours) or just `<s> <s>` (the paper's),
each score a number from 0 to 10 (decimals such as 8.5 accepted, as the paper's
parser reads floats); the format `verdict` reads the last `[[A]]`, `[[B]]` or `[[tie]]`.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from sacpo_steps.core.errors import InputError
from sacpo_steps.evaluation.judges.base import CRITERIA

FORMATS = ("scores", "verdict")
#: a score from 0 to 10: a whole number or a decimal ("8.5"); not "07" nor "10.5"
_SCORE = r"(10(?:\.0+)?|\d(?:\.\d+)?)"
# the whole first non-empty line, nothing else: ours "Scores: A=7 B=4" ...
SCORES_LINE = re.compile(rf"Scores: A={_SCORE} B={_SCORE}")
# ... or the paper's: only the two scores, separated by white space ("8 3")
BARE_SCORES_LINE = re.compile(rf"{_SCORE}[ \t]+{_SCORE}")
#: appended to the user message with `explain: true` (format scores)
EXPLAIN_INSTRUCTION = ("\n\nAfter that first line, explain your scores in a few sentences: "
                       "for each reply, what raised or lowered its score.")
#: section markers of a template file (whole lines); without them the file is the user message
SYSTEM_MARKER, USER_MARKER = "=== system ===", "=== user ==="
VERDICT_TOKEN = re.compile(r"\[\[(A|B|tie)\]\]")
_PLACEHOLDER = re.compile(r"\{(question|answer_a|answer_b)\}")
_TOKEN_VERDICT = {"A": "first", "B": "second", "tie": "tie"}
#: the packaged template sets a `judge.templates.<criterion>` value may name instead of a
#: file: name -> its folder under prompts/ ("" for the defaults). A set never changes once
#: it has a name (its files' hashes are in the judge cache keys); when the default
#: changes, its old files are kept byte for byte under a new name.
TEMPLATE_SETS = {
    # helpfulness on nine factors as in the paper, harmlessness on the red-team
    # categories, 0-10, system message
    "default": "",
    # the defaults of a4aaf44 (0-10, system message; helpfulness on six aspects and told
    # that safety must not change its scores)
    "v2": "v2",
    # the first templates (1-10, user message only, harmlessness alone)
    "legacy": "legacy",
}
DEFAULT_SET = "default"
PACKAGE_PROMPTS = "sacpo_steps/evaluation/judges/prompts"


@dataclass(frozen=True)
class Template:
    """A judge prompt file; `sha256` (of its whole text) enters every cache key.

    `user` is the user message with the placeholders {question}, {answer_a} and
    {answer_b}; `system` the system message, or None (then only a user message is
    sent, as with the legacy templates).
    """

    criterion: str
    format: str
    text: str
    sha256: str
    user: str = ""
    system: str | None = None
    #: the file rendered: a packaged file as `sacpo_steps/evaluation/judges/prompts/...`,
    #: or the path the config gives
    source: str = ""
    #: the packaged set it comes from (`default`, `v2`, `legacy`), None for the user's file
    set_name: str | None = None

    def render(self, question: str, first: str, second: str) -> str:
        """The user message for one comparison."""
        # one pass, so an answer that contains "{answer_b}" is not substituted again
        values = {"question": question, "answer_a": first, "answer_b": second}
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.user or self.text)


def split_template(text: str) -> tuple[str | None, str]:
    """(system, user) of a template file; a file without a leading system marker is all user."""
    lines = text.splitlines(keepends=True)
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None or lines[first].strip() != SYSTEM_MARKER:
        return None, text
    for i in range(first + 1, len(lines)):
        if lines[i].strip() == USER_MARKER:
            system = "".join(lines[first + 1:i]).strip()
            return system or None, "".join(lines[i + 1:]).strip("\n") + "\n"
    raise ValueError(f"a {SYSTEM_MARKER!r} section needs a {USER_MARKER!r} line after it")


def load_template(criterion: str, fmt: str, path: str | None = None) -> Template:
    """The template that `path` (the config's `judge.templates.<criterion>`) selects: the
    name of a packaged set (`default`, `v2`, `legacy`: its `<criterion>_<format>.txt`),
    or a file relative to the working directory; None is the default set.

    Checked here: readable UTF-8 text, each placeholder exactly once in the user
    part and none in the system part; InputError names the config key and the path.
    A value that is both a set name and an existing file is refused as ambiguous.
    """
    if criterion not in CRITERIA:
        raise InputError(f"unknown criterion {criterion!r} (known: {CRITERIA})",
                         field="criterion")
    if fmt not in FORMATS:
        raise InputError(f"must be one of {FORMATS}, got {fmt!r}", field="judge.format")
    where: dict[str, str | None]
    set_name: str | None = None
    if path is None or path in TEMPLATE_SETS:
        set_name = path or DEFAULT_SET
        if path is not None and os.path.exists(path):
            raise InputError(f"{path!r} names both a packaged template set and a file in the "
                             f"working directory: write ./{path} for the file",
                             path=path, field=f"judge.templates.{criterion}")
        name = f"{criterion}_{fmt}.txt"
        parts = [p for p in (TEMPLATE_SETS[set_name], name) if p]
        where = {"path": "/".join([PACKAGE_PROMPTS, *parts]), "field": None}
        text = resources.files("sacpo_steps.evaluation.judges").joinpath(
            "prompts", *parts).read_text(encoding="utf-8")
    else:
        where = {"path": path, "field": f"judge.templates.{criterion}"}
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else f"not UTF-8 text ({exc})"
            if isinstance(exc, FileNotFoundError):
                reason += (f" (not a packaged template set either: "
                           f"{', '.join(TEMPLATE_SETS)})")
            raise InputError(f"cannot read the {criterion} judge template: {reason}",
                             **where) from None
    try:
        system, user = split_template(text)
    except ValueError as exc:
        raise InputError(str(exc), **where) from None
    for placeholder in ("question", "answer_a", "answer_b"):
        token = "{" + placeholder + "}"
        if user.count(token) != 1:
            raise InputError(f"the template needs exactly one {token} in its user message, "
                             f"found {user.count(token)}", **where)
        if system is not None and token in system:
            raise InputError(f"{token} belongs in the user message, not the system message",
                             **where)
    return Template(criterion, fmt, text, hashlib.sha256(text.encode("utf-8")).hexdigest(),
                    user=user, system=system, source=str(where["path"]), set_name=set_name)


@cache
def packaged_template(criterion: str, fmt: str, set_name: str | None = None) -> Template:
    """The packaged template of `criterion` and `fmt` in set `set_name` (None: the default
    set), as `load_template` reads it, read once per process (packaged files do not
    change while it runs): the workflow hashes it for every judge job it plans."""
    if set_name is not None and set_name not in TEMPLATE_SETS:
        raise ValueError(f"no packaged template set {set_name!r} (known: "
                         f"{', '.join(TEMPLATE_SETS)})")
    return load_template(criterion, fmt, set_name)


@dataclass(frozen=True)
class Parsed:
    """A reply read under one format: a verdict, or the reason there is none."""

    verdict: str | None
    detail: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None


def _score(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() else value


def parse_scores(text: str) -> Parsed:
    """The first non-empty line must be `Scores: A=<0-10> B=<0-10>` or `<0-10> <0-10>`.

    Nothing else on that line; a first line that is not a scores line (a preamble,
    markdown, a score out of range) is unparseable, never a tie.
    """
    first = next((line.strip() for line in text.splitlines() if line.strip()), None)
    if first is None:
        return Parsed(None, reason="empty reply")
    match = SCORES_LINE.fullmatch(first) or BARE_SCORES_LINE.fullmatch(first)
    if match is None:
        return Parsed(None, reason=f"first line is neither 'Scores: A=<0-10> B=<0-10>' nor "
                                   f"'<0-10> <0-10>': {first[:80]!r}")
    a, b = _score(match.group(1)), _score(match.group(2))
    verdict = "first" if a > b else "second" if b > a else "tie"
    return Parsed(verdict, {"scores": {"A": a, "B": b}})


def parse_verdict(text: str) -> Parsed:
    """The last well-formed `[[A]]`, `[[B]]` or `[[tie]]` token decides.

    The last one, because a judge may quote a token while explaining.
    """
    tokens = VERDICT_TOKEN.findall(text)
    if not tokens:
        return Parsed(None, reason="no [[A]], [[B]] or [[tie]] token" if text.strip()
                      else "empty reply")
    return Parsed(_TOKEN_VERDICT[tokens[-1]], {"token": f"[[{tokens[-1]}]]"})


def parse_reply(fmt: str, text: str) -> Parsed:
    if fmt == "scores":
        return parse_scores(text)
    if fmt == "verdict":
        return parse_verdict(text)
    raise ValueError(f"unknown format {fmt!r}")
