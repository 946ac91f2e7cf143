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

Settings are in `openai_settings.py`, prompt templates and reply parsing in
`openai_prompts.py`; their public names are importable from here too.

The API key is read from the environment only and masked out of everything
this module writes or raises.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import openai

from sacpo_steps.core.errors import InputError
from sacpo_steps.evaluation.judges.base import CRITERIA, JudgeReply, JudgeRequest
from sacpo_steps.evaluation.judges.batching import BatchStats, CachingJudge, cache_digest
from sacpo_steps.evaluation.judges.openai_prompts import (
    load_template,
    parse_reply,
)
from sacpo_steps.evaluation.judges.openai_settings import (
    BACKEND,
    OpenAIJudgeConfig,
)

log = logging.getLogger("sacpo.judge.openai")

#: a server asking to wait longer than this is not waited for (the retry still counts)
MAX_RETRY_AFTER_S = 600.0


@dataclass
class _Failure:
    """A request that got no reply after all retries (or a non-retryable status)."""

    cause: str
    message: str
    #: waiting would not help (a 4xx, a malformed response): cached as an error entry
    final: bool = False


@dataclass
class _Stats(BatchStats):
    requests: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    replies_without_usage: int = 0


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


class OpenAIJudge(CachingJudge):
    """Pairwise judge on an OpenAI-compatible chat-completions endpoint."""

    deterministic = False  # sampled at temperature > 0; repetitions are kept
    uncached_warning = ("no judge cache configured: replies are kept in memory only, "
                        "and a rerun pays for them again")
    _stats: _Stats

    def __init__(self, config: OpenAIJudgeConfig, *, api_key: str | None = None) -> None:
        self.config = config
        key = api_key if api_key is not None else os.environ.get(config.api_key_env, "")
        if not key.strip():
            raise InputError(f"the judge's API key is read from the environment variable "
                             f"{config.api_key_env}, which is not set or empty",
                             field="judge.api_key_env")
        self._api_key = key
        self.name = f"{BACKEND}:{config.model}"
        super().__init__(config.cache, _Stats(), log)
        own = config.templates or {}
        self.templates = {c: load_template(c, config.format, own.get(c)) for c in CRITERIA}
        #: criteria of the requests judged so far: the usage file names their templates only
        self._judged_criteria: set[str] = set()
        self.max_tokens = config.output_cap()
        #: appended to every user message (the `explain` instruction), "" for none
        self.suffix = config.user_suffix()
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
        return cache_digest(material)

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

    def _judge_batch(self, requests: Sequence[JudgeRequest]) -> list[JudgeReply]:
        """Judge concurrently; cached comparisons are answered without a request."""
        self._judged_criteria.update(r.criterion for r in requests)
        return asyncio.run(self._judge_all(requests))

    def _counts(self) -> dict[str, int]:
        return {"requests": self._stats.requests, "cache hits": self._stats.cache_hits}

    def lineage(self, criterion: str) -> dict[str, dict[str, Any]]:
        """The template rendered for `criterion`: its file (the packaged path or the
        config's) and the sha256 of its text, the hash in the cache keys and usage file."""
        template = self.templates[criterion]
        return {"template": {"name": template.source, "sha256": template.sha256}}

    # -- accounting ---------------------------------------------------------------------

    def usage(self) -> dict[str, Any]:
        """Requests, cache hits, retries by cause, errors, tokens and estimated cost.

        Cumulative since this judge was built (one judge per judge step). The templates
        are those of the criteria judged (a judge job judges one): each one's sha256, the
        file rendered (`template_files`) and the packaged set it belongs to
        (`template_sets`: `default`, `v2`, `legacy`; null for the user's own file).
        """
        s = self._stats
        price_in, price_out = self.config.prices()
        cost = None
        if price_in is not None and price_out is not None:
            cost = round((s.prompt_tokens * price_in + s.completion_tokens * price_out) / 1e6, 6)
        settings = asdict(self.config)
        used = {c: t for c, t in self.templates.items() if c in self._judged_criteria}
        return {
            "backend": BACKEND, "model": self.config.model, "format": self.config.format,
            "templates": {c: t.sha256 for c, t in used.items()},
            "template_files": {c: t.source for c, t in used.items()},
            "template_sets": {c: t.set_name for c, t in used.items()},
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
