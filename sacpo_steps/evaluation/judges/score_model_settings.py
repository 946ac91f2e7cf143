"""The reward/cost-model judge's settings: each key of its `judge` section, and the
scored text's template.

Light (no torch): the plan reads these to know which model folders a judge job needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from sacpo_steps.core.errors import InputError
from sacpo_steps.evaluation.judges.settings import BackendSettings, setting

BACKEND = "score_model"
DEFAULT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{answer}"
DTYPES = ("auto", "float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
_PLACEHOLDER = re.compile(r"\{(prompt|answer)\}")
_FOLDER = {"type": ["string", "null"], "pattern": r"\S"}


@dataclass(frozen=True)
class ScoreModelJudgeConfig(BackendSettings):
    BACKEND: ClassVar[str] = BACKEND

    """The `judge` config section as this backend reads it (field = config key)."""

    reward_model: str | None = setting(
        None, "Local folder of a Safe RLHF reward model (helpfulness: higher wins), e.g. "
        "beaver-7b-v1.0-reward", default_doc="none, so helpfulness is not judged", **_FOLDER)
    cost_model: str | None = setting(
        None, "Local folder of a Safe RLHF cost model (harmlessness: lower wins), e.g. "
        "beaver-7b-v1.0-cost", default_doc="none, so harmlessness is not judged", **_FOLDER)
    template: str = setting(DEFAULT_TEMPLATE, "The scored text, with {prompt} and {answer} "
                            "once each", default_doc=f"Safe RLHF's, {DEFAULT_TEMPLATE!r}",
                            type="string", pattern=r"\S")
    append_eos: bool = setting(True, "Append the tokenizer's EOS token to the scored text, "
                               "as Safe RLHF does in training and in its arena",
                               type="boolean")
    batch_size: int = setting(8, "Answers per forward pass", type="integer", minimum=1)
    max_length: int | None = setting(None, "Longest scored text in tokens (a longer one is "
                                     "an error)",
                                     default_doc="the model's max_position_embeddings",
                                     type=["integer", "null"], minimum=1)
    dtype: str = setting("auto", "Weights' dtype; auto: bfloat16 on a GPU, float32 on CPU",
                         type="string", enum=list(DTYPES))
    device: str = setting("auto", "Where the models run; auto: cuda when available",
                          type="string", enum=list(DEVICES))
    cache: str | None = setting(None, "JSONL score cache shared by judge jobs (the workflow "
                                "sets it); null keeps scores in memory only, so a rerun "
                                "computes them again", type=["string", "null"],
                                pattern=r"\S", job_only=True)
    tie_tolerance: float = setting(0.0, "Scores at most this far apart tie (0: only equal "
                                   "scores)", type="number", minimum=0, convert=float)
    threads: int | None = setting(None, "Torch threads", default_doc="torch's default",
                                  type=["integer", "null"], minimum=1)

    def validated(self, where: str) -> ScoreModelJudgeConfig:
        """At least one model; a template with its two placeholders."""
        if self.reward_model is None and self.cost_model is None:
            raise InputError("the score_model judge needs reward_model (helpfulness) and/or "
                             "cost_model (harmlessness): local model folders",
                             field=f"{where}.reward_model")
        check_template(self.template, where=f"{where}.template")
        return self


def check_template(template: str, *, where: str = "judge.template") -> None:
    """A template with exactly one {prompt} and one {answer}, or InputError."""
    for name in ("prompt", "answer"):
        if template.count("{" + name + "}") != 1:
            raise InputError(f"needs exactly one {{{name}}}, got {template!r}", field=where)


def render(template: str, prompt: str, answer: str) -> str:
    """Fill the template in one pass, so an answer containing "{prompt}" stays as it is."""
    values = {"prompt": prompt, "answer": answer}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
