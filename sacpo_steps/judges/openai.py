"""The GPT-4 judge: any OpenAI-compatible chat-completions server, cached and concurrent.

One request per (comparison, attempt), sent with the official `openai` client
(AsyncOpenAI) to `POST {base_url}/chat/completions`, so the same code talks to
OpenAI, vLLM, llama.cpp's server or Ollama. The client's own retries are off
(`max_retries=0`): every retry happens here, in one loop, and is counted.

Raw replies go to the cache (see `cache.py`) and are parsed on read, so a
parser or threshold change costs no call. A reply that cannot be parsed is
asked again (a fresh sample) up to `parse_retries` times and then becomes an
"error" verdict, never a tie. A request the server refuses for good (a 4xx
other than 401/403/404/408/409/429, or a malformed response) is cached as an
error too, so a rerun makes no request unless `retry_errors` is set, which
asks such judgments again (at new attempt numbers, keeping the old entries);
failures that waiting may cure (timeouts, 429, 5xx) are never cached.

Prompt templates are files (`prompts/<criterion>_<format>.txt`, or the user's
own through `judge.templates.<criterion>`); a template may start with a
`=== system ===` section sent as a system message before its `=== user ===`
section. The reply format `scores` reads the first non-empty line, which must
be `Scores: A=<s> B=<s>` (ours) or just `<s> <s>` (the paper's), each score a
number from 0 to 10 (decimals such as 8.5 accepted, as the paper's parser
reads floats).

The API key is read from the environment only and masked out of everything
this module writes or raises.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import math
import os
import random
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from typing import Any

import openai

from sacpo_steps.errors import InputError
from sacpo_steps.judges.base import (
    CRITERIA,
    Judge,
    JudgeReply,
    JudgeRequest,
    backend_settings,
    check_criteria,
)
from sacpo_steps.judges.cache import JudgeCache

log = logging.getLogger("sacpo.judge.openai")

BACKEND = "openai"
FORMATS = ("scores", "verdict")
#: USD per 1M (input, output) tokens, used when the config gives no price
DEFAULT_PRICES = {"gpt-4-0125-preview": (10.0, 30.0)}
#: a server asking to wait longer than this is not waited for (the retry still counts)
MAX_RETRY_AFTER_S = 600.0

#: a score from 0 to 10: a whole number or a decimal ("8.5"); not "07" nor "10.5"
_SCORE = r"(10(?:\.0+)?|\d(?:\.\d+)?)"
# the whole first non-empty line, nothing else: ours "Scores: A=7 B=4" ...
SCORES_LINE = re.compile(rf"Scores: A={_SCORE} B={_SCORE}")
# ... or the paper's: only the two scores, separated by white space ("8 3")
BARE_SCORES_LINE = re.compile(rf"{_SCORE}[ \t]+{_SCORE}")
#: `max_tokens` when the config gives none: the scores line alone needs ~10 tokens
DEFAULT_MAX_TOKENS = {"scores": 16, "scores+explain": 1024, "verdict": 1024}
#: appended to the user message with `explain: true` (format scores)
EXPLAIN_INSTRUCTION = ("\n\nAfter that first line, explain your scores in a few sentences: "
                       "for each reply, what raised or lowered its score.")
#: section markers of a template file (whole lines); without them the file is the user message
SYSTEM_MARKER, USER_MARKER = "=== system ===", "=== user ==="
VERDICT_TOKEN = re.compile(r"\[\[(A|B|tie)\]\]")
_PLACEHOLDER = re.compile(r"\{(question|answer_a|answer_b)\}")
_TOKEN_VERDICT = {"A": "first", "B": "second", "tie": "tie"}


# --- prompts and parsing -------------------------------------------------------------


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
    source: str = ""

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
    """The prompt at `path` (the config's `judge.templates.<criterion>`, relative to the
    working directory), else the packaged `prompts/<criterion>_<format>.txt`.

    Checked here: readable UTF-8 text, each placeholder exactly once in the user
    part and none in the system part; InputError names the config key and the path.
    """
    if criterion not in CRITERIA:
        raise InputError(f"unknown criterion {criterion!r} (known: {CRITERIA})",
                         field="criterion")
    if fmt not in FORMATS:
        raise InputError(f"must be one of {FORMATS}, got {fmt!r}", field="judge.format")
    where: dict[str, str | None]
    if path is None:
        name = f"{criterion}_{fmt}.txt"
        where = {"path": f"sacpo_steps/judges/prompts/{name}", "field": None}
        text = resources.files("sacpo_steps.judges").joinpath("prompts", name).read_text(
            encoding="utf-8")
    else:
        where = {"path": path, "field": f"judge.templates.{criterion}"}
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else f"not UTF-8 text ({exc})"
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
                    user=user, system=system, source=str(where["path"]))


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


# --- configuration -------------------------------------------------------------------


@dataclass(frozen=True)
class OpenAIJudgeConfig:
    """The `judge` config section as this backend reads it (field = config key)."""

    model: str = "gpt-4-0125-preview"
    #: None: the client's default (https://api.openai.com/v1)
    base_url: str | None = None
    #: name of the environment variable that holds the key (never the key itself)
    api_key_env: str = "OPENAI_API_KEY"
    format: str = "scores"
    #: criterion -> the user's own prompt template file (relative to the working
    #: directory); a criterion not named uses the packaged template
    templates: dict[str, str] | None = None
    #: format scores: ask for reasons after the scores line (and allow the tokens for them)
    explain: bool = False
    #: on a rerun, ask again the judgments whose cached replies are errors or unparseable
    retry_errors: bool = False
    temperature: float = 0.7
    #: None: DEFAULT_MAX_TOKENS (16 for the scores line alone, 1024 with reasons)
    max_tokens: int | None = None
    #: seconds per request
    timeout: float = 120.0
    #: requests in flight at once
    concurrency: int = 8
    #: retries of one request on 429, 5xx, 408/409, timeouts and connection errors
    max_retries: int = 6
    #: new samples asked for after an unparseable reply
    parse_retries: int = 2
    #: full-jitter backoff: uniform(0, min(backoff_max, backoff_base * 2**retry)) seconds
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    #: JSONL cache file; None keeps replies in memory only (a rerun pays again)
    cache: str | None = None
    #: USD per 1M tokens; None: DEFAULT_PRICES for known models, else no cost estimate
    price_input_per_1m: float | None = None
    price_output_per_1m: float | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> OpenAIJudgeConfig:
        """Validate the judge section; an unknown or mistyped key names `judge.<key>`."""
        known = {f.name: f for f in fields(cls)}
        values = {key: _check_value(key, value, known[key].default)
                  for key, value in backend_settings(config, set(known), "openai").items()}
        made = cls(**values)
        if made.format not in FORMATS:
            raise InputError(f"must be one of {FORMATS}, got {made.format!r}",
                             field="judge.format")
        for key in ("model", "api_key_env"):
            if not getattr(made, key).strip():
                raise InputError("must not be empty", field=f"judge.{key}")
        if made.max_tokens is None:  # resolved here: readers of `max_tokens` see the cap sent
            made = replace(made, max_tokens=made.output_cap())
        return made

    def output_cap(self) -> int:
        """The `max_tokens` sent: the config's, else the default for the format."""
        if self.max_tokens is not None:
            return self.max_tokens
        mode = "scores+explain" if self.format == "scores" and self.explain else self.format
        return DEFAULT_MAX_TOKENS[mode]

    def user_suffix(self) -> str:
        """Appended to every user message: the `explain` instruction (format scores), or ""."""
        return EXPLAIN_INSTRUCTION if self.explain and self.format == "scores" else ""

    def prices(self) -> tuple[float | None, float | None]:
        default_in, default_out = DEFAULT_PRICES.get(self.model, (None, None))
        return (self.price_input_per_1m if self.price_input_per_1m is not None else default_in,
                self.price_output_per_1m if self.price_output_per_1m is not None
                else default_out)


_POSITIVE = {"max_tokens", "timeout", "concurrency", "backoff_max"}
_OPTIONAL = {"base_url", "cache", "price_input_per_1m", "price_output_per_1m", "max_tokens",
             "templates"}
_INTEGER = {"max_tokens", "concurrency", "max_retries", "parse_retries"}


def _check_value(key: str, value: Any, default: Any) -> Any:
    where = f"judge.{key}"
    if value is None and key in _OPTIONAL:
        return None
    if key == "templates":
        if not isinstance(value, dict):
            raise InputError(f"expected a mapping of criterion to template file, got {value!r}",
                             field=where)
        for criterion, path in value.items():
            if criterion not in CRITERIA:
                raise InputError(f"unknown criterion (known: {', '.join(CRITERIA)})",
                                 field=f"{where}.{criterion}")
            if path is not None and (not isinstance(path, str) or not path.strip()):
                raise InputError(f"expected a template file path, got {path!r}",
                                 field=f"{where}.{criterion}")
        return {c: p for c, p in value.items() if p is not None}
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise InputError(f"expected true or false, got {value!r}", field=where)
        return value
    if key in {"model", "base_url", "api_key_env", "format", "cache"}:
        if not isinstance(value, str):
            raise InputError(f"expected a string, got {value!r}", field=where)
        return value
    if key in _INTEGER:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"expected an integer, got {value!r}", field=where)
    elif isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value):
        raise InputError(f"expected a number, got {value!r}", field=where)
    if value < 0 or (key in _POSITIVE and value == 0):
        raise InputError(f"must be {'positive' if key in _POSITIVE else 'non-negative'}, "
                         f"got {value!r}", field=where)
    return value


# --- the judge -----------------------------------------------------------------------


@dataclass
class _Failure:
    """A request that got no reply after all retries (or a non-retryable status)."""

    cause: str
    message: str
    #: waiting would not help (a 4xx, a malformed response): cached as an error entry
    final: bool = False


@dataclass
class _Stats:
    judgments: int = 0
    requests: int = 0
    cache_hits: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    replies_without_usage: int = 0
    wall_s: float = 0.0


def _retry_after(headers: Any) -> float | None:
    """Seconds from `retry-after-ms` or `Retry-After` (seconds or an HTTP date)."""
    if headers is None:
        return None
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class OpenAIJudge(Judge):
    """Pairwise judge on an OpenAI-compatible chat-completions endpoint."""

    deterministic = False  # sampled at temperature > 0; repetitions are kept

    def __init__(self, config: OpenAIJudgeConfig, *, api_key: str | None = None) -> None:
        self.config = config
        key = api_key if api_key is not None else os.environ.get(config.api_key_env, "")
        if not key.strip():
            raise InputError(f"the judge's API key is read from the environment variable "
                             f"{config.api_key_env}, which is not set or empty",
                             field="judge.api_key_env")
        self._api_key = key
        self.name = f"{BACKEND}:{config.model}"
        self.cache = JudgeCache(config.cache)
        if config.cache is None:
            log.warning("no judge cache configured: replies are kept in memory only, "
                        "and a rerun pays for them again")
        own = config.templates or {}
        self.templates = {c: load_template(c, config.format, own.get(c)) for c in CRITERIA}
        self.max_tokens = config.output_cap()
        #: appended to every user message (the `explain` instruction), "" for none
        self.suffix = config.user_suffix()
        self._stats = _Stats()
        self._rng = random.Random()
        self._not_before = 0.0  # time.monotonic() before which no request starts (429)
        # replies waiting to be cached, and the task writing them (one event loop at a time)
        self._pending: list[tuple[str, dict[str, Any], asyncio.Future[dict[str, Any]]]] = []
        self._writer: asyncio.Future[None] | None = None
        for name in ("httpx2", "httpx"):
            # one INFO line per request would drown the step's log
            http_log = logging.getLogger(name)
            if http_log.level == logging.NOTSET:
                http_log.setLevel(logging.WARNING)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> OpenAIJudge:
        return cls(OpenAIJudgeConfig.from_dict(config))

    # -- secrets ------------------------------------------------------------------------

    def mask(self, text: str) -> str:
        """`text` with the API key replaced, for anything written, logged or raised."""
        if len(self._api_key) >= 4:
            text = text.replace(self._api_key, "***")
        return text

    # -- keys ---------------------------------------------------------------------------

    def cache_key(self, request: JudgeRequest, attempt: int) -> str:
        """Everything that can change the reply; not base_url (same model, other route).

        The template enters by its file's hash (system message included), so an
        unchanged template keeps its entries valid; the `explain` instruction enters
        only when it is sent, so keys without it are those of earlier versions.
        """
        template = self.templates[request.criterion]
        material = {
            "backend": BACKEND, "model": self.config.model, "template": template.sha256,
            "criterion": request.criterion, "question": request.question,
            "first": request.first_answer, "second": request.second_answer,
            "temperature": self.config.temperature, "max_tokens": self.max_tokens,
            "repetition": request.repetition, "attempt": attempt,
        }
        if self.suffix:
            material["explain"] = hashlib.sha256(self.suffix.encode("utf-8")).hexdigest()
        blob = json.dumps(material, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def messages(self, request: JudgeRequest) -> list[dict[str, str]]:
        """The chat messages of one comparison: the template's system message, if any,
        then the rendered user message."""
        template = self.templates[request.criterion]
        user = template.render(request.question, request.first_answer, request.second_answer)
        out = [{"role": "system", "content": template.system}] if template.system else []
        return [*out, {"role": "user", "content": user + self.suffix}]

    # -- one HTTP request, with the only retry loop -------------------------------------

    def _backoff(self, retry: int) -> float:
        cfg = self.config
        return self._rng.uniform(0.0, min(cfg.backoff_max, cfg.backoff_base * 2 ** retry))

    async def _request(self, client: openai.AsyncOpenAI, sem: asyncio.Semaphore,
                       messages: list[dict[str, str]]) -> dict[str, Any] | _Failure:
        cfg = self.config
        retry = 0
        while True:
            retry_after: float | None = None
            async with sem:
                # checked with a slot in hand: a 429 seen while waiting for it still counts
                while (wait := self._not_before - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                self._stats.requests += 1
                try:
                    response = await client.chat.completions.create(
                        model=cfg.model, messages=messages,  # type: ignore[arg-type]
                        temperature=cfg.temperature, max_tokens=self.max_tokens,
                        timeout=cfg.timeout)
                except openai.APITimeoutError as exc:  # before its base class
                    cause, message = "timeout", str(exc)
                except openai.APIConnectionError as exc:
                    cause, message = "connection", str(exc)
                except openai.APIStatusError as exc:
                    status, message = exc.status_code, str(exc)
                    if status in (401, 403):
                        raise InputError(f"the server refused the API key from "
                                         f"{cfg.api_key_env} ({status}): "
                                         f"{self.mask(message)}",
                                         field="judge.api_key_env") from None
                    if status == 404:
                        raise InputError(f"not found at {cfg.base_url or 'the default URL'} "
                                         f"(model {cfg.model!r}?): {self.mask(message)}",
                                         field="judge.model") from None
                    if status == 429 and getattr(exc, "code", None) == "insufficient_quota":
                        raise InputError(f"the account behind {cfg.api_key_env} has no quota "
                                         f"left: {self.mask(message)}",
                                         field="judge.api_key_env") from None
                    if status == 429:
                        cause = "rate_limit"
                        retry_after = _retry_after(exc.response.headers)
                    elif status >= 500:
                        cause = "server_error"
                    elif status in (408, 409):
                        cause = f"status_{status}"
                    else:  # 400, 422, ...: this request will not get better by waiting
                        return _Failure(f"status_{status}", self.mask(message), final=True)
                except openai.APIError as exc:
                    return _Failure("bad_response", self.mask(str(exc)), final=True)
                else:
                    return self._entry(response)
            if retry >= cfg.max_retries:
                return _Failure(cause, f"{self.mask(message)} (after {retry + 1} attempts)")
            self._stats.retries[cause] += 1
            if retry_after is not None:
                delay = min(retry_after, MAX_RETRY_AFTER_S)
                # the limit is the account's, not this request's: hold back every request
                self._not_before = max(self._not_before, time.monotonic() + delay)
            else:
                delay = self._backoff(retry)
            retry += 1
            await asyncio.sleep(delay)

    def _entry(self, response: Any) -> dict[str, Any]:
        """What the cache keeps of a completion: text (masked), finish reason, usage."""
        choices = getattr(response, "choices", None) or []
        message = getattr(choices[0], "message", None) if choices else None
        content = getattr(message, "content", None)
        usage = getattr(response, "usage", None)
        tokens = {
            "prompt_tokens": int(getattr(usage, "prompt_tokens", 0) or 0),
            "completion_tokens": int(getattr(usage, "completion_tokens", 0) or 0),
        }
        if usage is None:
            self._stats.replies_without_usage += 1
        self._stats.prompt_tokens += tokens["prompt_tokens"]
        self._stats.completion_tokens += tokens["completion_tokens"]
        return {
            "raw": self.mask(content if isinstance(content, str) else ""),
            "finish_reason": getattr(choices[0], "finish_reason", None) if choices else None,
            "response_model": getattr(response, "model", None),
            "usage": tokens,
        }

    # -- durable storage, batched ---------------------------------------------------------

    async def _store(self, key: str, entry: dict[str, Any]) -> dict[str, Any]:
        """Cache `entry` durably; returns once it is fsynced (with others that came along).

        Replies that arrive while a write is in progress are written together by the
        next one, off the event loop, so an fsync never stalls the requests.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._pending.append((key, entry, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_pending())
        return await done

    async def _write_pending(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                kept = await asyncio.to_thread(self.cache.put_many,
                                               [(key, entry) for key, entry, _ in batch])
            except BaseException as exc:  # the waiters raise it
                for _, _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                raise
            for (_, _, done), entry in zip(batch, kept, strict=True):
                if not done.done():
                    done.set_result(entry)

    # -- one judgment -------------------------------------------------------------------

    async def _judge(self, client: openai.AsyncOpenAI, sem: asyncio.Semaphore,
                     request: JudgeRequest) -> JudgeReply:
        """Walk the cached attempts of a comparison (0, 1, ...) until one parses; ask anew
        where the cache ends, at most `parse_retries + 1` times in this run.

        After an unparseable reply the next attempt is asked (up to attempt
        `parse_retries`); after a cached error entry, or past that attempt, only
        with `retry_errors`. A fresh failure ends the judgment (a permanent one is
        cached first).
        """
        cfg = self.config
        messages = self.messages(request)
        reasons: list[str] = []
        entry: dict[str, Any] | None = None  # the last attempt's entry
        last_attempt, asked, attempt = 0, 0, 0
        while True:
            key = self.cache_key(request, attempt)
            cached_entry = self.cache.get(key)
            if cached_entry is None:
                after_error = entry is not None and "error" in entry
                may_ask = asked <= cfg.parse_retries and (
                    cfg.retry_errors or (attempt <= cfg.parse_retries and not after_error))
                if not may_ask:
                    break
                if attempt > 0:
                    self._stats.retries["retry_errors" if after_error or attempt
                                        > cfg.parse_retries else "unparseable"] += 1
                asked += 1
                fetched = await self._request(client, sem, messages)
                if isinstance(fetched, _Failure):
                    self._stats.errors[fetched.cause] += 1
                    if fetched.final:  # a rerun will not ask again, unless retry_errors
                        await self._store(key, {
                            "model": cfg.model, "criterion": request.criterion,
                            "template": self.templates[request.criterion].sha256,
                            "repetition": request.repetition, "attempt": attempt,
                            "raw": "", "error": fetched.cause, "message": fetched.message})
                    return JudgeReply("error", fetched.message, {
                        "reason": f"no reply: {fetched.cause}", "attempt": attempt,
                        "cached": False, "reasons": reasons})
                entry = await self._store(key, {
                    "model": cfg.model, "criterion": request.criterion,
                    "template": self.templates[request.criterion].sha256,
                    "repetition": request.repetition, "attempt": attempt, **fetched})
                cached = False
            else:
                entry, cached = cached_entry, True
                self._stats.cache_hits += 1
                usage = entry.get("usage") or {}
                self._stats.cached_prompt_tokens += int(usage.get("prompt_tokens", 0))
                self._stats.cached_completion_tokens += int(usage.get("completion_tokens", 0))
            last_attempt, attempt = attempt, attempt + 1
            if "error" in entry:
                reasons.append(f"no reply: {entry['error']}")
                continue
            parsed = parse_reply(cfg.format, entry["raw"])
            if parsed.verdict is not None:
                return JudgeReply(parsed.verdict, entry["raw"], {
                    **parsed.detail, "attempt": last_attempt, "cached": cached, "key": key,
                    "finish_reason": entry.get("finish_reason")})
            reasons.append(parsed.reason or "unparseable")
        assert entry is not None
        if "error" in entry:  # a cached failure, not asked again (retry_errors is off)
            self._stats.errors[entry["error"]] += 1
            return JudgeReply("error", entry.get("message", ""), {
                "reason": reasons[-1], "attempt": last_attempt, "cached": True,
                "reasons": reasons})
        self._stats.errors["unparseable"] += 1
        return JudgeReply("error", entry["raw"], {
            "reason": f"unparseable after {attempt} attempts: {reasons[-1]}",
            "attempts": attempt, "reasons": reasons,
            "finish_reason": entry.get("finish_reason")})

    async def _judge_all(self, requests: Sequence[JudgeRequest]) -> list[JudgeReply]:
        cfg = self.config
        sem = asyncio.Semaphore(cfg.concurrency)
        # a client per event loop: its connection pool belongs to the loop that made it
        client = openai.AsyncOpenAI(api_key=self._api_key, base_url=cfg.base_url,
                                    max_retries=0, timeout=cfg.timeout)
        self._pending, self._writer = [], None
        tasks = [asyncio.ensure_future(self._judge(client, sem, r)) for r in requests]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            if self._writer is not None:
                # replies already paid for are written even when the batch fails
                await asyncio.gather(self._writer, return_exceptions=True)
            await client.close()

    def judge_many(self, requests: Sequence[JudgeRequest]) -> list[JudgeReply]:
        """Judge concurrently; cached comparisons are answered without a request."""
        check_criteria(requests)
        if not requests:
            return []
        self.cache.refresh()  # entries other judge jobs added since we started
        before = (self._stats.requests, self._stats.cache_hits)
        start = time.monotonic()
        try:
            replies = asyncio.run(self._judge_all(requests))
        finally:
            self._stats.wall_s += time.monotonic() - start
        self._stats.judgments += len(replies)
        errors = sum(r.verdict == "error" for r in replies)
        log.info("%d judgments: %d requests, %d cache hits, %d errors", len(replies),
                 self._stats.requests - before[0], self._stats.cache_hits - before[1], errors)
        return replies

    # -- accounting ---------------------------------------------------------------------

    def usage(self) -> dict[str, Any]:
        """Requests, cache hits, retries by cause, errors, tokens and estimated cost.

        Cumulative since this judge was built (one judge per judge step).
        """
        s = self._stats
        price_in, price_out = self.config.prices()
        cost = None
        if price_in is not None and price_out is not None:
            cost = round((s.prompt_tokens * price_in + s.completion_tokens * price_out) / 1e6, 6)
        settings = asdict(self.config)
        return {
            "backend": BACKEND, "model": self.config.model, "format": self.config.format,
            "templates": {c: t.sha256 for c, t in self.templates.items()},
            "template_files": {c: t.source for c, t in self.templates.items()},
            "settings": {**{k: settings[k] for k in ("base_url", "temperature", "timeout",
                                                     "concurrency", "max_retries",
                                                     "parse_retries", "cache", "explain",
                                                     "retry_errors")},
                         "max_tokens": self.max_tokens},
            "judgments": s.judgments, "requests": s.requests, "cached": s.cache_hits,
            "retries": dict(sorted(s.retries.items())),
            "errors": dict(sorted(s.errors.items())),
            "tokens": {"prompt": s.prompt_tokens, "completion": s.completion_tokens,
                       "total": s.prompt_tokens + s.completion_tokens},
            "cached_tokens": {"prompt": s.cached_prompt_tokens,
                              "completion": s.cached_completion_tokens},
            "replies_without_usage": s.replies_without_usage,
            "price_per_1m_tokens": {"input": price_in, "output": price_out},
            "cost_usd": cost,
            "cache_skipped_lines": self.cache.skipped,
            "wall_s": round(s.wall_s, 3),
        }

    def close(self) -> None:
        self.cache.close()
