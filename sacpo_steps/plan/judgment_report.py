"""Before any judge request: how many judgments a run makes and, for judges that call
a paid API, an upper bound on what they cost (printed by the workflow at start-up)."""

from __future__ import annotations

import math
from typing import Any

from sacpo_steps.plan import Plan

#: characters per token assumed for the judge template and prompts: conservative for
#: English text (GPT-4's tokenizers average about 4), so token counts are overestimated
CHARS_PER_TOKEN = 3.0
ORDERS = 2  # every pair is judged with each answer first


def judgment_count(n_pairs: int, n_prompts: int, repetitions: int) -> int:
    """Judgments of one prompt set: pairs x prompts x 2 orders x repetitions."""
    return n_pairs * n_prompts * ORDERS * repetitions


def estimated_input_tokens(template_chars: int, max_new_tokens: int, prompt_chars: int = 0
                           ) -> int:
    """Upper-bound input tokens of one judgment: the template and the question at
    CHARS_PER_TOKEN, plus both answers at the generation cap (`max_new_tokens`)."""
    return math.ceil((template_chars + prompt_chars) / CHARS_PER_TOKEN) + 2 * max_new_tokens


def estimated_cost(judgments: int, input_tokens: int, max_tokens: int,
                   price_input_per_1m: float, price_output_per_1m: float) -> float:
    """USD for `judgments` requests of `input_tokens` in and at most `max_tokens` out."""
    return judgments * (input_tokens * price_input_per_1m
                        + max_tokens * price_output_per_1m) / 1e6


def judgment_report(plan: Plan, evaluation: dict[str, Any],
                    prompts: dict[str, tuple[int | None, str, int]]) -> list[str]:
    """Lines saying how many judgments the run makes and, for openai judges, an upper
    bound on their cost. `prompts[name]` = (prompt count or None, where it comes from,
    longest prompt in characters, 0 if unknown). Every seed judges its own answers."""
    seeds = len(plan.seeds)
    pairs = plan.judged_pairs()
    n_pairs = len(pairs)
    vs_base = sum(1 for _, opponent in pairs if opponent == plan.baseline)
    max_new = evaluation["generation"]["max_new_tokens"]
    lines = [f"judge requests (evaluation.pairs: {plan.pairs}): {n_pairs} distinct pairs, "
             f"{vs_base} of them against the baseline {plan.baseline!r}"]
    unjudged = plan.unjudged()
    if unjudged:
        lines.append(f"  not in any pair, so neither generated nor judged: {unjudged}")
    total, per_prompt, cost, priced, unpriced = 0, [], 0.0, False, False
    for name, ps in evaluation["prompt_sets"].items():
        judge = plan.judge(name)
        reps = judge.protocol.repetitions
        count, source, prompt_chars = prompts[name]
        head = f"  {name}: {n_pairs} pairs x "
        tail = f"{ORDERS} orders x {reps} repetition(s)"
        if seeds > 1:
            tail += f" x {seeds} seeds"
        if count is None:
            n = judgment_count(n_pairs, 1, reps) * seeds
            per_prompt.append(f"{n:,} per {name} prompt")
            text = f"{head}{tail} = {n:,} judgments per prompt (prompt count {source})"
        else:
            n = judgment_count(n_pairs, count, reps) * seeds
            total += n
            text = f"{head}{count} prompts ({source}) x {tail} = {n:,} judgments"
        basis = judge.cost(ps["criterion"])
        if basis is None:
            lines.append(f"{text}; {judge.backend.name} judge, no API cost")
            continue
        tokens_in = estimated_input_tokens(basis.template_chars, max_new, prompt_chars)
        tokens_out, model = basis.output_tokens, basis.model
        price_in, price_out = basis.price_input_per_1m, basis.price_output_per_1m
        if price_in is None or price_out is None:
            unpriced = True
            text += (f"; {model}: no price known (set price_input_per_1m and "
                     f"price_output_per_1m), no cost estimate")
        else:
            usd = estimated_cost(n, tokens_in, tokens_out, price_in, price_out)
            if count is not None:
                cost, priced = cost + usd, True
            text += (f"; {model}: <= {tokens_in:,} input tokens x ${price_in:g}/1M + "
                     f"<= {tokens_out:,} output tokens x ${price_out:g}/1M per judgment "
                     f"-> <= ${usd:,.2f}{' per prompt' if count is None else ''}")
        lines.append(text)
    if not per_prompt:
        summary = f"  total: {total:,} judgments"
    elif total:
        summary = (f"  total: {total:,} judgments for the prompt sets of known size, plus "
                   f"{', '.join(per_prompt)} (count unknown until the set exists)")
    else:
        summary = (f"  total: {', '.join(per_prompt)} (prompt counts unknown until the sets "
                   f"exist)")
    if priced:
        summary += f"; estimated cost <= ${cost:,.2f}"
        if per_prompt:
            summary += " for those sets"
        if unpriced:
            summary += ", without the judges of unknown price"
        bound = (f"an upper bound: both answers at the max_new_tokens cap ({max_new}), every "
                 f"reply at max_tokens, the template")
        if all(p[2] for p in prompts.values()):
            bound += f" and the longest question at {CHARS_PER_TOKEN:g} characters per token"
        else:
            bound += (f" at {CHARS_PER_TOKEN:g} characters per token; the question text is "
                      f"not counted until the prompts are fetched")
        summary += f" ({bound})"
    lines.append(summary)
    return lines
