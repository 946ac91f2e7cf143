"""How answers are sampled for one model, checked once.

The plan builds a `GenerationSettings` per (model, seed); the generate step (and the
target search) get it as JSON and rebuild it through the same constructor, so a step
run by hand refuses what the plan would. Light: the plan imports it on every call.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sacpo_steps.core.errors import InputError


def _positive_int(value: Any, field: str, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"must be an integer >= 1{' or null' if optional else ''}, got "
                         f"{value!r}", field=field)


@dataclass(frozen=True)
class GenerationSettings:
    """Greedy decoding settings: the prompt format (a `{prompt}` template or `chat`),
    the markers that end an answer, the answer's token budget, the batch, the seed and
    the prompt cap the model was trained under (`tokens.PromptCap`; None: no cap)."""

    prompt_template: str
    stop_markers: tuple[str, ...]
    max_new_tokens: int
    batch_size: int
    seed: int = 0
    max_prompt_length: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_template, str) or not self.prompt_template.strip():
            raise InputError(f"must be a non-empty string, got {self.prompt_template!r}",
                             field="prompt_template")
        markers = self.stop_markers
        if isinstance(markers, str) or not all(isinstance(m, str) and m for m in markers):
            raise InputError(f"must be a list of non-empty strings, got {markers!r}",
                             field="stop_markers")
        object.__setattr__(self, "stop_markers", tuple(markers))
        _positive_int(self.max_new_tokens, "max_new_tokens")
        _positive_int(self.batch_size, "batch_size")
        _positive_int(self.max_prompt_length, "max_prompt_length", optional=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InputError(f"must be an integer, got {self.seed!r}", field="seed")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "stop_markers": list(self.stop_markers)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "generation") -> GenerationSettings:
        """The settings of a step's JSON (as `to_dict` wrote them; `seed` may be absent)."""
        needed = ("prompt_template", "stop_markers", "max_new_tokens", "batch_size")
        missing = [key for key in needed if key not in data]
        if missing:
            raise InputError(f"missing keys {missing}", field=where)
        known = {*needed, "seed", "max_prompt_length"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown keys {unknown}", field=where)
        return cls(**data)
