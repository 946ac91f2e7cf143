"""The GPT-4 judge's settings: each key of its `judge` section, defaults, prices.

Light (no HTTP client): the plan reads these for its cost estimate.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from sacpo_steps.evaluation.judges.base import CRITERIA
from sacpo_steps.evaluation.judges.openai_prompts import (
    EXPLAIN_INSTRUCTION,
    FORMATS,
    TEMPLATE_SETS,
    load_template,
    packaged_template,
)
from sacpo_steps.evaluation.judges.settings import BackendSettings, CostBasis, setting

BACKEND = "openai"
#: USD per 1M (input, output) tokens, used when the config gives no price
DEFAULT_PRICES = {"gpt-4-0125-preview": (10.0, 30.0)}
#: `max_tokens` when the config gives none: the scores line alone needs ~10 tokens
DEFAULT_MAX_TOKENS = {"scores": 16, "scores+explain": 1024, "verdict": 1024}

_NON_BLANK = {"type": "string", "pattern": r"\S"}
_TEMPLATES = {
    "type": ["object", "null"], "additionalProperties": False,
    "properties": {c: {"type": ["string", "null"], "minLength": 1, "pattern": r"\S"}
                   for c in CRITERIA},
}


def _drop_unset(templates: dict[str, str | None]) -> dict[str, str]:
    """A criterion set to null uses the packaged template, as one not named."""
    return {c: p for c, p in templates.items() if p is not None}


@dataclass(frozen=True)
class OpenAIJudgeConfig(BackendSettings):
    BACKEND: ClassVar[str] = BACKEND

    """The `judge` config section as this backend reads it (field = config key)."""

    model: str = setting("gpt-4-0125-preview", "The judge model (paper: gpt-4-0125-preview)",
                         **_NON_BLANK)
    base_url: str | None = setting(None, "Server URL of an OpenAI-compatible API (vLLM, "
                                   "llama.cpp, Ollama)", default_doc="OpenAI's",
                                   type=["string", "null"])
    api_key_env: str = setting("OPENAI_API_KEY", "Name of the environment variable that holds "
                               "the API key, never the key itself", **_NON_BLANK)
    format: str = setting("scores", "scores: a first line with two scores from 0 to 10 "
                          "(`Scores: A=7 B=4`, or the paper's `7 4`); verdict: "
                          "[[A]]/[[B]]/[[tie]]", type="string", enum=list(FORMATS))
    templates: dict[str, str] | None = setting(
        None, "The prompt template per criterion: the name of a packaged set ("
        + ", ".join(TEMPLATE_SETS) + "; `v2` and `legacy` are earlier defaults, kept byte "
        "for byte so their cached replies stay valid, see docs/judge-protocol.md) or your "
        "own file (relative to the config's folder, else the working directory) with "
        "{question}, {answer_a} and {answer_b} once each and an optional leading "
        "`=== system ===` section; the "
        "template's hash enters the cache key, and editing your file reruns only that "
        "criterion's judge jobs", default_doc="the packaged set `default`",
        convert=_drop_unset, **_TEMPLATES)
    explain: bool = setting(False, "Format scores: ask for reasons after the scores line "
                            "(the default max_tokens is then 1024)", type="boolean")
    retry_errors: bool = setting(False, "On a rerun, ask again the judgments whose cached "
                                 "reply is an error or unparseable (false: a rerun sends "
                                 "nothing)", type="boolean")
    temperature: float = setting(0.7, "Sampling temperature, as in the paper", type="number",
                                 minimum=0)
    max_tokens: int | None = setting(None, "Reply length limit in tokens",
                                     default_doc="16 for the scores line alone, 1024 with "
                                     "explain or format verdict",
                                     type=["integer", "null"], minimum=1)
    timeout: float = setting(120.0, "Seconds per request", type="number", exclusiveMinimum=0)
    concurrency: int = setting(8, "Requests in flight per judge job", type="integer",
                               minimum=1)
    max_retries: int = setting(6, "Retries of one request on 429, 5xx, 408/409, timeouts and "
                               "connection errors, with backoff (the only retries)",
                               type="integer", minimum=0)
    parse_retries: int = setting(2, "New requests for an unparseable reply before it is an "
                                 "error", type="integer", minimum=0)
    backoff_base: float = setting(1.0, "Full-jitter backoff: a retry waits up to "
                                  "min(backoff_max, backoff_base * 2**retry) seconds",
                                  type="number", minimum=0)
    backoff_max: float = setting(60.0, "Longest backoff in seconds", type="number",
                                 exclusiveMinimum=0)
    cache: str | None = setting(None, "JSONL reply cache shared by judge jobs (the workflow "
                                "sets one per judge model); null keeps replies in memory "
                                "only, so a rerun pays again", type=["string", "null"],
                                job_only=True)
    price_input_per_1m: float | None = setting(
        None, "USD per 1M input tokens, for the cost estimate and the usage file",
        default_doc="10 for gpt-4-0125-preview, else unknown", type=["number", "null"],
        minimum=0)
    price_output_per_1m: float | None = setting(
        None, "USD per 1M output tokens", default_doc="30 for gpt-4-0125-preview, else "
        "unknown", type=["number", "null"], minimum=0)

    def validated(self, where: str) -> OpenAIJudgeConfig:
        """Resolve `max_tokens` here, so readers of it see the cap that is sent."""
        return self if self.max_tokens is not None else replace(
            self, max_tokens=self.output_cap())

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

    def template_hashes(self, criterion: str) -> dict[str, str]:
        """{criterion: sha256} of the packaged template the judge renders for `criterion`
        (its `Template.sha256`, as the usage file and the cache keys give it), or {}
        when it renders the user's own file (an input of the job instead)."""
        name = (self.templates or {}).get(criterion)
        if name is not None and name not in TEMPLATE_SETS:
            return {}
        return {criterion: packaged_template(criterion, self.format, name).sha256}

    def cost_basis(self, criterion: str) -> CostBasis:
        """One judgment's fixed part: the criterion's template and the user suffix, the
        reply cap and the prices, as the judge applies them."""
        template = load_template(criterion, self.format, (self.templates or {}).get(criterion))
        price_in, price_out = self.prices()
        return CostBasis(model=self.model,
                         template_chars=len(template.text) + len(self.user_suffix()),
                         output_tokens=self.output_cap(), price_input_per_1m=price_in,
                         price_output_per_1m=price_out)
