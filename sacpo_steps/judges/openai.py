"""The GPT-4 judge: any OpenAI-compatible chat-completions server, cached and concurrent.

One request per (comparison, attempt), sent with the official `openai` client
(AsyncOpenAI) to `POST {base_url}/chat/completions`, so the same code talks to
OpenAI, vLLM, llama.cpp's server or Ollama. The client's own retries are off
(`max_retries=0`): every retry happens here, in one loop, and is counted.

Raw replies go to the cache (see `cache.py`) and are parsed on read, so a
parser or threshold change costs no call. A reply that cannot be parsed is
asked again (a fresh sample) up to `parse_retries` times and then becomes an
"error" verdict, never a tie.

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
from dataclasses import asdict, dataclass, field, fields
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
#: keys of the judge section that belong to the judge step, not to this backend
#: a server asking to wait longer than this is not waited for (the retry still counts)
MAX_RETRY_AFTER_S = 600.0

# the whole first non-empty line, nothing else: "Scores: A=7 B=4"
SCORES_LINE = re.compile(r"Scores: A=(10|[1-9]) B=(10|[1-9])")
VERDICT_TOKEN = re.compile(r"\[\[(A|B|tie)\]\]")
_PLACEHOLDER = re.compile(r"\{(question|answer_a|answer_b)\}")
_TOKEN_VERDICT = {"A": "first", "B": "second", "tie": "tie"}


# --- prompts and parsing -------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """A judge prompt file; `sha256` (of its text) enters every cache key."""

    criterion: str
    format: str
    text: str
    sha256: str

    def render(self, question: str, first: str, second: str) -> str:
        # one pass, so an answer that contains "{answer_b}" is not substituted again
        values = {"question": question, "answer_a": first, "answer_b": second}
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.text)


def load_template(criterion: str, fmt: str) -> Template:
    """The packaged prompt `prompts/<criterion>_<format>.txt`."""
    if criterion not in CRITERIA:
        raise InputError(f"unknown criterion {criterion!r} (known: {CRITERIA})",
                         field="criterion")
    if fmt not in FORMATS:
        raise InputError(f"must be one of {FORMATS}, got {fmt!r}", field="judge.format")
    name = f"{criterion}_{fmt}.txt"
    text = resources.files("sacpo_steps.judges").joinpath("prompts", name).read_text(
        encoding="utf-8")
    for placeholder in ("question", "answer_a", "answer_b"):
        if text.count("{" + placeholder + "}") != 1:
            raise InputError(f"needs exactly one {{{placeholder}}}", path=name)
    return Template(criterion, fmt, text, hashlib.sha256(text.encode("utf-8")).hexdigest())


@dataclass(frozen=True)
class Parsed:
    """A reply read under one format: a verdict, or the reason there is none."""

    verdict: str | None
    detail: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None


def parse_scores(text: str) -> Parsed:
    """The first non-empty line must be exactly `Scores: A=<1-10> B=<1-10>`."""
    first = next((line.strip() for line in text.splitlines() if line.strip()), None)
    if first is None:
        return Parsed(None, reason="empty reply")
    match = SCORES_LINE.fullmatch(first)
    if match is None:
        return Parsed(None, reason=f"first line is not 'Scores: A=<1-10> B=<1-10>': "
                                   f"{first[:80]!r}")
    a, b = int(match.group(1)), int(match.group(2))
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
    temperature: float = 0.7
    max_tokens: int = 1024
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
        return made

    def prices(self) -> tuple[float | None, float | None]:
        default_in, default_out = DEFAULT_PRICES.get(self.model, (None, None))
        return (self.price_input_per_1m if self.price_input_per_1m is not None else default_in,
                self.price_output_per_1m if self.price_output_per_1m is not None
                else default_out)


_POSITIVE = {"max_tokens", "timeout", "concurrency", "backoff_max"}
_OPTIONAL = {"base_url", "cache", "price_input_per_1m", "price_output_per_1m"}


def _check_value(key: str, value: Any, default: Any) -> Any:
    where = f"judge.{key}"
    if value is None and key in _OPTIONAL:
        return None
    if key in {"model", "base_url", "api_key_env", "format", "cache"}:
        if not isinstance(value, str):
            raise InputError(f"expected a string, got {value!r}", field=where)
        return value
    if isinstance(default, int) and not isinstance(default, bool):
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
        self.templates = {c: load_template(c, config.format) for c in CRITERIA}
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
        """Everything that can change the reply; not base_url (same model, other route)."""
        template = self.templates[request.criterion]
        material = {
            "backend": BACKEND, "model": self.config.model, "template": template.sha256,
            "criterion": request.criterion, "question": request.question,
            "first": request.first_answer, "second": request.second_answer,
            "temperature": self.config.temperature, "max_tokens": self.config.max_tokens,
            "repetition": request.repetition, "attempt": attempt,
        }
        blob = json.dumps(material, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    # -- one HTTP request, with the only retry loop -------------------------------------

    def _backoff(self, retry: int) -> float:
        cfg = self.config
        return self._rng.uniform(0.0, min(cfg.backoff_max, cfg.backoff_base * 2 ** retry))

    async def _request(self, client: openai.AsyncOpenAI, sem: asyncio.Semaphore,
                       prompt: str) -> dict[str, Any] | _Failure:
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
                        model=cfg.model, messages=[{"role": "user", "content": prompt}],
                        temperature=cfg.temperature, max_tokens=cfg.max_tokens,
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
                        return _Failure(f"status_{status}", self.mask(message))
                except openai.APIError as exc:
                    return _Failure("bad_response", self.mask(str(exc)))
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
        cfg = self.config
        prompt = self.templates[request.criterion].render(
            request.question, request.first_answer, request.second_answer)
        reasons: list[str] = []
        entry: dict[str, Any] | None = None
        for attempt in range(cfg.parse_retries + 1):
            key = self.cache_key(request, attempt)
            entry = self.cache.get(key)
            cached = entry is not None
            if entry is None:
                if attempt > 0:
                    self._stats.retries["unparseable"] += 1
                fetched = await self._request(client, sem, prompt)
                if isinstance(fetched, _Failure):
                    self._stats.errors[fetched.cause] += 1
                    return JudgeReply("error", fetched.message, {
                        "reason": f"no reply: {fetched.cause}", "attempt": attempt,
                        "reasons": reasons})
                entry = await self._store(key, {
                    "model": cfg.model, "criterion": request.criterion,
                    "template": self.templates[request.criterion].sha256,
                    "repetition": request.repetition, "attempt": attempt, **fetched})
            else:
                self._stats.cache_hits += 1
                usage = entry.get("usage") or {}
                self._stats.cached_prompt_tokens += int(usage.get("prompt_tokens", 0))
                self._stats.cached_completion_tokens += int(usage.get("completion_tokens", 0))
            parsed = parse_reply(cfg.format, entry["raw"])
            if parsed.verdict is not None:
                return JudgeReply(parsed.verdict, entry["raw"], {
                    **parsed.detail, "attempt": attempt, "cached": cached, "key": key,
                    "finish_reason": entry.get("finish_reason")})
            reasons.append(parsed.reason or "unparseable")
        self._stats.errors["unparseable"] += 1
        assert entry is not None
        return JudgeReply("error", entry["raw"], {
            "reason": f"unparseable after {cfg.parse_retries + 1} attempts: {reasons[-1]}",
            "attempts": cfg.parse_retries + 1, "reasons": reasons,
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
            "settings": {k: settings[k] for k in ("base_url", "temperature", "max_tokens",
                                                  "timeout", "concurrency", "max_retries",
                                                  "parse_retries", "cache")},
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
