"""What one alignment node trains with, checked once: its loss, coefficient and settings.

The plan builds a `NodeSettings` for each node of the config; the align step gets it
as JSON (`to_dict`) and rebuilds it with `from_dict`, through the same constructor,
so a step run by hand refuses what the plan would. Nothing is checked twice on the
way: TRL's config receives `beta` and the settings as they were built here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sacpo_steps.core.errors import InputError
from sacpo_steps.training.losses import LOSSES, Loss, check_node, get_loss
from sacpo_steps.training.settings import TrainingConfig


@dataclass(frozen=True)
class NodeSettings:
    """A node's loss (a registered name), its coefficient `beta` (for a SACPO stage-2
    node, the paper's beta/lambda) and its training settings. `stage2`: the parent is
    itself an aligned model, so Theorem 1's conditions apply (`losses.check_node`).

    `where` and `trl_where` only place errors in the config (`models.safe`, and the
    `training.trl` section a node inherits); they are not part of the settings.
    """

    loss: str
    beta: float
    training: TrainingConfig
    stage2: bool = False
    margin: float | None = None  # a loss that takes one (SafeDPO's Delta, BSO's C)
    where: str = field(default="", compare=False, repr=False)
    trl_where: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        beta = self.beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
            raise InputError(f"must be a number > 0, got {beta!r}", field=self._at("beta"))
        object.__setattr__(self, "beta", float(beta))
        if not isinstance(self.training, TrainingConfig):
            raise TypeError(f"training must be a TrainingConfig, not {type(self.training)}")
        try:
            entry = get_loss(self.loss)
        except InputError as exc:
            raise InputError(exc.message, field=self._at("loss")) from None
        self._check_margin(entry)
        check_node(entry, stage2=self.stage2, training=asdict(self.training), where=self.where,
                   trl_where=self.trl_where)

    def _check_margin(self, entry: Loss) -> None:
        margin = self.margin
        if entry.margin is None:
            if margin is not None:
                raise InputError(f"loss {entry.name!r} takes no margin (losses with one: "
                                 f"{', '.join(margin_losses()) or 'none'})",
                                 field=self._at("margin"))
            return
        if margin is None:
            raise InputError(f"loss {entry.name!r} needs `margin`: {entry.margin}",
                             field=self._at("margin"))
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin < 0:
            raise InputError(f"must be a number >= 0, got {margin!r}", field=self._at("margin"))
        object.__setattr__(self, "margin", float(margin))

    def _at(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    @property
    def entry(self) -> Loss:
        """The loss's registry entry (its TRL config and trainer, data kind, reference)."""
        return get_loss(self.loss)

    def to_dict(self) -> dict[str, Any]:
        out = {"loss": self.loss, "beta": self.beta, "training": asdict(self.training),
               "stage2": self.stage2}
        if self.margin is not None:  # absent otherwise: older specs keep their hash
            out["margin"] = self.margin
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodeSettings:
        """The settings of a step's spec (as `to_dict` wrote them)."""
        missing = [key for key in ("loss", "beta") if key not in data]
        if missing:
            raise InputError(f"the node's spec has no {missing}", field=missing[0])
        return cls(loss=data["loss"], beta=data["beta"],
                   training=TrainingConfig.from_dict(data.get("training", {})),
                   stage2=bool(data.get("stage2", False)), margin=data.get("margin"))


def margin_losses() -> list[str]:
    """The registered losses that take a `margin`."""
    return sorted(name for name, entry in LOSSES.items() if entry.margin is not None)
