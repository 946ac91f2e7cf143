"""Text to token ids in ONE place, exactly as TRL 1.16 tokenizes training rows.

The tokenizer calls that mirror TRL are in `trl_adapter` (TRL's internals, one place);
this module renders rows and prompts and applies the prompt cap.

TRL tokenizes a plain-text row with `tokenizer(text=prompt)`, i.e. with the
tokenizer's own special-token defaults: a Llama tokenizer adds BOS, a GPT-2 one
adds nothing. A conversational row goes through `apply_chat_template(...,
add_generation_prompt=True)`. The completion starts where the ids of the prompt
and of prompt+completion diverge. Training (SFT build, align, the reference
pass), generation, target search and the theory check all build their prompt
ids here, so a model is sampled on exactly the ids it was trained on.

`prompt_template: chat` selects the tokenizer's chat template (the prompt is one
user turn, or a conversation given as a list of {role, content} turns ending with
the user's; the answer is one assistant turn); any other template is a format
string with `{prompt}` (a conversation cannot be written in it and is refused),
and the completion is the answer with one leading space.

The score-model judge is the exception: Safe RLHF's reward and cost models read
their own format (BOS + prompt + answer + EOS), built in `judges/score_model.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sacpo_steps.core.errors import InputError
from sacpo_steps.models import trl_adapter

#: the `prompt_template` value that selects the tokenizer's chat template
CHAT = "chat"

#: roles of a conversational prompt's turns
ROLES = ("system", "user", "assistant")

#: a prompt: plain text, or a conversation of {role, content} turns
Prompt = str | list[dict[str, str]]


def is_chat(template: str) -> bool:
    return template.strip() == CHAT


def conversation_problem(messages: Any) -> str | None:
    """What is wrong with a conversational prompt, or None if nothing is.

    A non-empty list of {role, content} turns with non-empty text, an optional
    leading system turn, ending with a user turn (the model answers it).
    """
    if not isinstance(messages, list) or not messages:
        return "a conversational prompt is a non-empty list of {role, content} turns"
    for i, turn in enumerate(messages, start=1):
        if not isinstance(turn, dict) or set(turn) != {"role", "content"}:
            return f"turn {i} must be an object with exactly `role` and `content`"
        if turn["role"] not in ROLES:
            return f"turn {i}: role {turn['role']!r} is not one of {', '.join(ROLES)}"
        if turn["role"] == "system" and i > 1:
            return f"turn {i}: a system turn may only come first"
        if not isinstance(turn["content"], str) or not turn["content"].strip():
            return f"turn {i}: content must be non-empty text"
    if messages[-1]["role"] != "user":
        return ("the last turn must be the user's (the model answers it), not "
                f"{messages[-1]['role']!r}")
    return None


def prompt_problem(template: str, prompt: Any) -> str | None:
    """Why `prompt` cannot be rendered with `template`, or None if it can."""
    if isinstance(prompt, list):
        if not is_chat(template):
            return (f"a conversational prompt (a list of turns) needs `prompt_template: {CHAT}`;"
                    f" the text template {template!r} formats one string")
        return conversation_problem(prompt)
    if not isinstance(prompt, str):
        return f"a prompt is text or a list of turns, not {type(prompt).__name__}"
    return None


def render_prompt(template: str, prompt: Prompt) -> str | list[dict[str, str]]:
    """The prompt as TRL receives it: templated text, or a conversation.

    A text prompt under the chat template becomes one user turn; a conversation
    (checked by `conversation_problem`) passes through, and only the chat template
    can render it (InputError otherwise).
    """
    problem = prompt_problem(template, prompt)
    if problem:
        raise InputError(problem, field="prompt")
    if isinstance(prompt, list):
        return [{"role": turn["role"], "content": turn["content"]} for turn in prompt]
    if is_chat(template):
        return [{"role": "user", "content": prompt}]
    return template.format(prompt=prompt)


def render_completion(template: str, answer: str) -> str | list[dict[str, str]]:
    """The answer as TRL receives it; plain text starts with one space, as sampled."""
    if is_chat(template):
        return [{"role": "assistant", "content": answer.strip()}]
    return " " + answer.strip()


def _ids(tokenizer: Any, rendered: str | list[dict[str, str]], *,
         generation_prompt: bool) -> list[int]:
    if isinstance(rendered, list):
        return trl_adapter.encode_conversation(tokenizer, rendered,
                                               generation_prompt=generation_prompt)
    return trl_adapter.encode_text(tokenizer, rendered)


def encode_prompt(tokenizer: Any, template: str, prompt: Prompt) -> list[int]:
    """The prompt ids a model is trained on and sampled from (special tokens included)."""
    return _ids(tokenizer, render_prompt(template, prompt), generation_prompt=True)


def encode_pair(tokenizer: Any, template: str, prompt: Prompt,
                answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) split exactly as TRL's DPO/KTO trainers split a row.

    TRL appends the EOS token to a plain-text completion (a chat template ends
    the turn itself), tokenizes prompt and prompt+completion, and lets the
    completion start where the two diverge.
    """
    prompt_ids = encode_prompt(tokenizer, template, prompt)
    rendered = render_prompt(template, prompt)
    completion = render_completion(template, answer)
    if isinstance(completion, str):
        completion = trl_adapter.completion_text(tokenizer, completion)
    full = _ids(tokenizer, rendered + completion, generation_prompt=False)
    return trl_adapter.split_completion(prompt_ids, full)


@dataclass
class PromptCap:
    """`training.max_prompt_length`: prompts longer than this many ids keep their end.

    TRL 1.16 takes text rows and truncates only from the end of the whole
    sequence, so the cap is applied to the prompt TEXT before TRL sees it: the
    start of the user's prompt is cut at a token boundary until the templated
    prompt (special tokens included) fits. A prompt whose template alone does not
    fit is dropped. The same cap is applied at generation.

    A conversational prompt (a list of turns) is never shortened: cutting its
    start would drop the system turn or earlier turns the last one refers to, so
    a conversation that does not fit is dropped (counted in `dropped`).
    """

    max_prompt_length: int | None
    truncated: int = 0
    dropped: int = 0
    seen: int = 0

    def apply(self, tokenizer: Any, template: str, prompt: Prompt) -> Prompt | None:
        """The prompt to use (text maybe shortened), or None if it cannot fit."""
        self.seen += 1
        cap = self.max_prompt_length
        if not cap:
            return prompt
        if tokenizer is None:
            raise ValueError("a prompt cap needs the model's tokenizer")
        if len(encode_prompt(tokenizer, template, prompt)) <= cap:
            return prompt
        if isinstance(prompt, list):
            self.dropped += 1
            return None
        offsets = tokenizer(prompt, add_special_tokens=False,
                            return_offsets_mapping=True)["offset_mapping"]
        starts = [start for start, _ in offsets]
        # the fewest leading tokens of the user's prompt to drop so that it fits
        lo, hi = 1, len(starts)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(encode_prompt(tokenizer, template, prompt[starts[mid]:].lstrip())) <= cap:
                hi = mid
            else:
                lo = mid + 1
        kept = prompt[starts[lo]:].lstrip() if lo < len(starts) else ""
        if not kept or len(encode_prompt(tokenizer, template, kept)) > cap:
            self.dropped += 1
            return None
        self.truncated += 1
        return kept

    def counts(self) -> dict[str, Any]:
        return {"max_prompt_length": self.max_prompt_length, "prompts": self.seen,
                "truncated": self.truncated, "dropped": self.dropped}
