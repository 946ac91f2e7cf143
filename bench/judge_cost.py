"""Judge cost per 1,000 judgments: the old templates and 1024-token cap vs the new defaults.

Input tokens are what one request sends: the template (system and user parts)
rendered with a demo prompt and two demo answers, plus the chat format's few
tokens per message. Tokens are estimated without a tokenizer as characters / 4
(tiktoken is used instead when it is installed; the table says which). The
output side is priced at the cap (`max_tokens`), an upper bound: the scores
line alone is ~10 tokens, but a reply that explains itself runs into the cap
far more often. Prices: gpt-4-0125-preview, $10 / $30 per 1M input / output
tokens (the judge's DEFAULT_PRICES). Usage:

    python bench/judge_cost.py
"""

from __future__ import annotations

import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sacpo_steps.data import demo_world  # noqa: E402
from sacpo_steps.evaluation.judges.openai_prompts import (  # noqa: E402
    EXPLAIN_INSTRUCTION,
    Template,
    load_template,
)
from sacpo_steps.evaluation.judges.openai_settings import DEFAULT_PRICES, OpenAIJudgeConfig  # noqa: E402

PROMPTS_DIR = ROOT / "sacpo_steps" / "evaluation" / "judges" / "prompts"
#: chat format overhead per message, and per request (OpenAI's published rule of thumb)
PER_MESSAGE, PER_REQUEST = 4, 3
PRICE_IN, PRICE_OUT = DEFAULT_PRICES["gpt-4-0125-preview"]
#: answer kinds of the demo world's models, per criterion
KINDS = {"helpfulness": ("complete", "partial_two", "partial_one", "refusal"),
         "harmlessness": ("comply", "partial_comply", "refusal", "redirect")}


def token_counter() -> tuple[str, Callable[[str], int]]:
    try:
        import tiktoken

        enc = tiktoken.get_encoding("cl100k_base")
        return "tiktoken cl100k_base", lambda text: len(enc.encode(text))
    except ImportError:
        return "len(text) / 4", lambda text: round(len(text) / 4)


def demo_pairs(criterion: str, n: int = 200, seed: int = 0) -> list[tuple[str, str, str]]:
    """(question, answer A, answer B) as the demo judges them: held-out prompts, answers
    of the kinds the demo's models give."""
    rng = random.Random(seed)
    spec = demo_world.build_spec()
    kind = "benign" if criterion == "helpfulness" else "harmful"
    rows = [r for r in demo_world.prompt_grid(spec) if r["kind"] == kind and r["held_out"]]
    out = []
    for _ in range(n):
        row = rng.choice(rows)
        a, b = (demo_world.render_response(rng.choice(KINDS[criterion]), row["task_id"], spec,
                                           rng) for _ in range(2))
        out.append((row["prompt"], a, b))
    return out


def input_tokens(template: Template, pairs: list[tuple[str, str, str]],
                 count: Callable[[str], int],
                 suffix: str = "") -> float:
    per_request = []
    for question, a, b in pairs:
        messages = [template.render(question, a, b) + suffix]
        if template.system:
            messages.insert(0, template.system)
        per_request.append(sum(count(m) + PER_MESSAGE for m in messages) + PER_REQUEST)
    return statistics.mean(per_request)


def cost_per_1000(tokens_in: float, tokens_out: float) -> float:
    return 1000 * (tokens_in * PRICE_IN + tokens_out * PRICE_OUT) / 1e6


def main() -> None:
    method, count = token_counter()
    rows = []
    for criterion in ("helpfulness", "harmlessness"):
        pairs = demo_pairs(criterion)
        answer = statistics.mean(count(a) + count(b) for _, a, b in pairs) / 2
        cap = OpenAIJudgeConfig.from_dict({}).max_tokens
        setups = [
            ("before: old template, cap 1024",
             load_template(criterion, "scores", str(PROMPTS_DIR / "legacy"
                                                    / f"{criterion}_scores.txt")), "", 1024),
            ("set v2 (the previous default)", load_template(criterion, "scores", "v2"), "", cap),
            ("after: default (scores line only)", load_template(criterion, "scores"), "", cap),
            ("after: explain: true", load_template(criterion, "scores"),
             EXPLAIN_INSTRUCTION, OpenAIJudgeConfig.from_dict({"explain": True}).max_tokens),
        ]
        for name, template, suffix, cap in setups:
            tokens_in = input_tokens(template, pairs, count, suffix)
            rows.append((criterion, name, answer, tokens_in, cap,
                         cost_per_1000(tokens_in, cap), cost_per_1000(tokens_in, 0)))
    print(f"tokens: {method}; prices ${PRICE_IN:g} / ${PRICE_OUT:g} per 1M input / output "
          "tokens (gpt-4-0125-preview); output priced at the cap (upper bound)\n")
    header = ("criterion", "setup", "answer tok", "input tok/judgment", "output cap",
              "$ / 1000 judgments (at cap)", "of which input")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for criterion, name, answer, tokens_in, cap, total, only_in in rows:
        print(f"| {criterion} | {name} | {answer:.0f} | {tokens_in:.0f} | {cap} | "
              f"{total:.2f} | {only_in:.2f} |")


if __name__ == "__main__":
    main()
