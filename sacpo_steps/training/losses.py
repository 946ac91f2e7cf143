"""The loss registry: every alignment loss the pipeline knows, in ONE table.

An entry says which preference file a node trains on, which TRL config and
trainer run it, TRL's `loss_type`, whether the loss keeps a reference model and
what the node's `beta` means for it. The plan, the rules and the align step ask
this table; none of them branches on a loss name. A new DPO variant is usually
one entry: the same TRL config and trainer with another `loss_type`.

Nothing heavy is imported here (the plan imports this module on every Snakemake
call): TRL classes are named by import path and imported only to train.

The `loss_type` values and the role of `beta` were read from TRL 1.16's
`DPOTrainer` (`trl/trainer/dpo_trainer.py`, the per-sequence losses) and
`KTOTrainer`. With Delta = (log pi/pi_ref)(chosen) - (log pi/pi_ref)(rejected),
each log-ratio summed over the completion tokens:
- sigmoid: -log sigmoid(beta * Delta)
- ipo: (Delta_avg - 1 / (2 beta))^2, Delta_avg from per-token AVERAGED log-ratios
- robust: ((1 - e) (-log sigmoid(beta Delta)) - e (-log sigmoid(-beta Delta))) / (1 - 2e),
  e = label_smoothing (TRL warns, but does not refuse, e outside [0, 0.5))
- hinge: max(0, 1 - beta * Delta)
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.imports import import_object
from sacpo_steps.training import safe_pairs
from sacpo_steps.training.settings import PIPELINE_SET
from sacpo_steps.training.trl_fields import (
    TRL_FIELDS_PATH,
    WRITE_COMMAND,
    check_trl_args,
    installed_trl_fields,
    trl_fields,
)
from sacpo_steps.training.trl_fields import write as write_field_lists


@dataclass(frozen=True)
class DataKind:
    """One shape of preference rows: the file `{criterion}_{name}.jsonl` of a dataset."""

    name: str
    answers: tuple[str, ...]  # answer-text fields, each rendered as a completion
    label: str | None = None  # a boolean field (desirable or not), if the kind has one
    flags: tuple[str, ...] = ()  # further boolean fields a loss's transformation reads


DATA_KINDS: dict[str, DataKind] = {
    "pairs": DataKind("pairs", answers=("chosen", "rejected")),
    "kto": DataKind("kto", answers=("completion",), label="label"),
    # helpfulness pairs with each answer's safety label (one-stage safe losses)
    "labeled_pairs": DataKind("labeled_pairs", answers=("chosen", "rejected"),
                              flags=safe_pairs.LABELS),
}

#: checks a node's merged `training` section; returns (field under `training`, problem)
TrainingCheck = Callable[[Mapping[str, Any]], "tuple[str, str] | None"]


@dataclass(frozen=True)
class Loss:
    """One registered loss (see the module docstring for what each TRL loss computes)."""

    name: str
    data: str  # a DATA_KINDS key: which file of the preference data folder it reads
    config: str  # TRL config class as "module:Class", imported only when training
    trainer: str  # TRL trainer class as "module:Class"
    loss_type: str | None  # TRL `loss_type` (DPO family, passed as [loss_type]); None: default
    needs_reference: bool  # keeps the parent as reference model (SACPO stage 2 requires it)
    coefficient: str  # what the node's `beta` means for this loss (docs and errors)
    fixed: Mapping[str, Any] = field(default_factory=dict)  # further TRL args always set
    #: the reference quantities the loss reads, as the TRL dataset columns its trainer's
    #: precompute pass adds (what a `ref_logps` job computes once for every node sharing
    #: the reference model, data and tokenization); empty for a reference-free loss
    ref_columns: tuple[str, ...] = ()
    min_batch_size: int = 1  # per_device_train_batch_size at least this
    check: TrainingCheck | None = None  # further plan-time checks of `training`
    #: what the node's `margin` means for this loss; None: the loss takes no margin. A
    #: loss with one reads the rows' `safety_margin` (margin * (h_l - h_w), trainer side)
    margin: str | None = None
    #: rows -> rows the loss trains on (SafeDPO's swap and drop), counting each case
    transform: Callable[[Iterable[dict[str, Any]], Any], Iterator[dict[str, Any]]] | None = None
    #: another loss whose reference pass this one reads: the same rows, trainer pass and
    #: columns, so nodes of both share one ref_logps job (None: its own)
    reference_loss: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "fixed", MappingProxyType(dict(self.fixed)))

    @property
    def reference_name(self) -> str:
        """The loss whose reference pass this one's nodes read (usually itself)."""
        return self.reference_loss or self.name

    @property
    def config_name(self) -> str:
        """The config class's name, the key of its field list in trl_fields.json."""
        return self.config.rpartition(":")[2]

    def config_class(self) -> type:
        return import_object(self.config)

    def trainer_class(self) -> type:
        return import_object(self.trainer)


def _robust_label_smoothing(training: Mapping[str, Any]) -> tuple[str, str] | None:
    value = (training.get("trl") or {}).get("label_smoothing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 0.5:
        return ("trl.label_smoothing",
                f"loss 'robust' needs training.trl.label_smoothing in (0, 0.5), the assumed "
                f"probability that a preference label is flipped (the Robust DPO paper uses "
                f"0.1; 0 would be plain DPO); got {value!r}")
    return None


LOSSES: dict[str, Loss] = {}


def register_loss(loss: Loss, *, replace: bool = False) -> Loss:
    """Add an entry to the table (a programming error raises ValueError)."""
    if not loss.name or not loss.name.replace("_", "").isalnum():
        raise ValueError(f"loss name {loss.name!r}: letters, digits and '_' only")
    if loss.name in LOSSES and not replace:
        raise ValueError(f"loss {loss.name!r} is already registered (replace=True to override)")
    if loss.data not in DATA_KINDS:
        raise ValueError(f"loss {loss.name!r}: data {loss.data!r} is not one of "
                         f"{sorted(DATA_KINDS)}")
    for path in (loss.config, loss.trainer):
        module, sep, name = path.partition(":")
        if not (module and sep and name):
            raise ValueError(f"loss {loss.name!r}: {path!r} is not 'module:Class'")
    if loss.ref_columns and not loss.needs_reference:
        raise ValueError(f"loss {loss.name!r}: ref_columns without a reference model")
    if loss.reference_loss is not None:
        other = LOSSES.get(loss.reference_loss)
        if other is None or (other.data, other.transform, other.ref_columns) != \
                (loss.data, loss.transform, loss.ref_columns):
            raise ValueError(f"loss {loss.name!r}: reference_loss {loss.reference_loss!r} "
                             "must be registered first, with the same data, transformation "
                             "and reference columns")
    if loss.margin is not None and loss.transform is None:
        raise ValueError(f"loss {loss.name!r}: a margin without a transformation (its "
                         "rows would carry no safety labels)")
    if loss.min_batch_size < 1:
        raise ValueError(f"loss {loss.name!r}: min_batch_size must be >= 1")
    # `fixed` may set TRL's loss_type itself (e.g. a weighted combination) only when
    # the entry's `loss_type` is None; every other pipeline-set field stays the pipeline's
    clash = sorted(k for k in loss.fixed
                   if k in PIPELINE_SET and not (k == "loss_type" and loss.loss_type is None))
    if clash:
        raise ValueError(f"loss {loss.name!r}: `fixed` sets {clash}, which the pipeline sets")
    LOSSES[loss.name] = loss
    return loss


@contextlib.contextmanager
def registered(loss: Loss) -> Iterator[Loss]:
    """Register `loss` for the duration of a `with` block (tests), then restore the table."""
    before = LOSSES.get(loss.name)
    register_loss(loss, replace=True)
    try:
        yield loss
    finally:
        if before is None:
            LOSSES.pop(loss.name, None)
        else:
            LOSSES[loss.name] = before


def get_loss(name: str | Loss) -> Loss:
    """The entry of `name` (an entry passes through); unknown names list the known ones."""
    if isinstance(name, Loss):
        return name
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}",
                         field="loss") from None


def _where(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def check_node(loss: Loss, *, stage2: bool, training: Mapping[str, Any], where: str,
               trl_where: str | None = None) -> None:
    """Plan-time checks of one alignment node using `loss` (InputError names the field).

    `stage2`: the node's parent is itself an aligned model, so SACPO's Theorem 1
    applies: the node must align against its parent as the reference, with the TRL
    arguments that keep the equivalence (`THEOREM1_ARGS`). `training` is the node's
    merged training section (TRL names); `where` is the node's config path, e.g.
    "models.safe"; `trl_where` the config path its `trl:` section comes from, when
    not its own (the global "training.trl" it inherits).
    """
    if stage2 and not loss.needs_reference:
        raise InputError(
            f"loss {loss.name!r} trains without a reference model, but this node's parent is "
            "an aligned model: SACPO's stage 2 aligns against the stage-1 model as its "
            "reference (Theorem 1), so its loss must keep one. Use a loss with a reference "
            f"(e.g. {', '.join(sorted(n for n, e in LOSSES.items() if e.needs_reference))}).",
            field=_where(where, "loss"))
    batch = training.get("per_device_train_batch_size")
    if isinstance(batch, int) and batch < loss.min_batch_size:
        raise InputError(
            f"loss {loss.name!r} needs per_device_train_batch_size >= {loss.min_batch_size}, "
            f"got {batch}", field=_where(where, "training.per_device_train_batch_size"))
    if loss.check is not None:
        problem = loss.check(training)
        if problem:
            key, message = problem
            raise InputError(message, field=_where(where, f"training.{key}"))
    check_trl_args(training.get("trl") or {}, loss, _where(where, "training.trl"))
    if stage2:
        _check_theorem1_args(loss, training.get("trl") or {}, where, trl_where)


def _keeps_reverse_kl(value: Any) -> bool:
    return value == "reverse_kl"  # TRL 1.16's only name for it (a str field, its default)


def _keeps_summed_logps(value: Any) -> bool:
    # None: TRL sums the answer's token log-probs; 1: shared + 1 * tail, the same sum
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                             and value == 1)


def _keeps_pure_loss(value: Any) -> bool:
    return value is None or value == [1]  # TRL's own default: weight 1 for the one loss


def _is_off(value: Any) -> bool:
    return not value  # TRL acts on sync_ref_model and use_weighting only when truthy


#: TRL arguments whose value can break Theorem 1 in a stage-2 node: the stage-2 optimum
#: equals the stage-1 policy re-weighted by exp(lambda g / beta) only for a reverse-KL
#: penalty towards the fixed stage-1 model, and DPO reaches it exactly only with its
#: own loss on log-ratios summed over the answer's tokens.
#: {argument: (does this value keep the equivalence, why another value breaks it)}
THEOREM1_ARGS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "f_divergence_type": (_keeps_reverse_kl, (
        "Theorem 1 holds only for the reverse-KL penalty KL(pi || pi_ref); another "
        "f-divergence has another optimum, which is not the stage-1 model re-weighted by "
        "exp(lambda g / beta). Leave it out or set reverse_kl (TRL's default)")),
    "ld_alpha": (_keeps_summed_logps, (
        "LD-DPO down-weights the log-probs of the tokens past the shorter answer's length, "
        "but Theorem 1 is exact for DPO only on log-ratios summed over every token of the "
        "answer. Leave it out (null) or set 1 (no down-weighting)")),
    "loss_weights": (_keeps_pure_loss, (
        "it weighs a combination of TRL losses, but Theorem 1 holds for the node's loss "
        "alone (on the single loss the pipeline sets, a weight only rescales it: change "
        "learning_rate instead). Leave it out")),
    "use_weighting": (_is_off, (
        "WPO weighs each pair by the policy's own probability of its answers, so the loss "
        "is no longer DPO's on the preference data and its minimiser is not, as Theorem 1 "
        "needs, the stage-1 model re-weighted by exp(lambda g / beta). Leave it out or set "
        "false")),
    "sync_ref_model": (_is_off, (
        "TR-DPO moves the reference towards the policy during training, but Theorem 1 needs "
        "the stage-2 reference to stay the stage-1 model (the node's parent). Leave it out "
        "or set false")),
}


def _check_theorem1_args(loss: Loss, trl: Mapping[str, Any], where: str,
                         trl_where: str | None) -> None:
    """Refuse, for a stage-2 node, `trl:` arguments (or arguments the loss entry fixes)
    that break the equivalence of Theorem 1 (`THEOREM1_ARGS`)."""
    for key, value in loss.fixed.items():
        keeps, why = THEOREM1_ARGS.get(key, (None, ""))
        if keeps is not None and not keeps(value):
            raise InputError(f"loss {loss.name!r} fixes TRL's {key} to {value!r}, which a "
                             f"SACPO stage-2 node cannot use: {why}", field=_where(where, "loss"))
        if key == "loss_type" and isinstance(value, (list, tuple)) and len(value) > 1:
            raise InputError(f"loss {loss.name!r} combines the TRL losses {list(value)}, which "
                             "a SACPO stage-2 node cannot use: Theorem 1 holds for one loss "
                             "alone", field=_where(where, "loss"))
    own = trl_where is None
    for key, value in trl.items():
        keeps, why = THEOREM1_ARGS.get(key, (None, ""))
        if keeps is None or keeps(value):
            continue
        node = "this SACPO stage-2 node" if own else \
            f"SACPO stage-2 node {where}, which inherits this section,"
        hint = "" if own else "; set it in the stage-1 nodes' own training.trl instead"
        raise InputError(f"{value!r} is refused in {node} (its parent is an aligned model): "
                         f"{why}{hint}",
                         field=f"{trl_where or _where(where, 'training.trl')}.{key}")


# DPO's family reads the reference's log-probs of the chosen and the rejected answer,
# each summed over its tokens (IPO averages them itself, from the completion mask)
_DPO = {"data": "pairs", "config": "trl:DPOConfig", "trainer": "trl:DPOTrainer",
        "needs_reference": True, "ref_columns": ("ref_chosen_logps", "ref_rejected_logps")}

def _safe_loss_check(name: str) -> TrainingCheck:
    """The one-stage safe losses read precomputed reference log-probs (the margin enters
    through them or beside them) and are DPO's summed log-ratios: refuse the TRL
    arguments that change those (the ones Theorem 1 refuses for stage 2)."""
    def check(training: Mapping[str, Any]) -> tuple[str, str] | None:
        if not training.get("precompute_ref_log_probs", True):
            return ("precompute_ref_log_probs",
                    f"loss {name!r} reads the reference log-probs of each pair before "
                    "training (its margin shifts them): keep precompute_ref_log_probs true")
        for key, value in (training.get("trl") or {}).items():
            keeps, _why = THEOREM1_ARGS.get(key, (None, ""))
            if keeps is not None and not keeps(value):
                return (f"trl.{key}", f"loss {name!r} is defined on DPO's log-ratios summed "
                        f"over the answer's tokens with a reverse-KL penalty; {key}="
                        f"{value!r} changes that. Leave it out")
        return None
    return check


_SAFE = {**_DPO, "data": "labeled_pairs", "transform": safe_pairs.transform_rows}

for _entry in (
    Loss(name="dpo", loss_type="sigmoid", **_DPO, coefficient=(
        "beta: DPO's KL coefficient, loss -log sigmoid(beta * Delta) with Delta the chosen "
        "minus rejected log-ratio to the reference (summed over tokens); for a SACPO stage-2 "
        "node it is the paper's beta/lambda.")),
    Loss(name="ipo", loss_type="ipo", **_DPO, coefficient=(
        "tau (TRL's beta): IPO's regulariser, loss (Delta_avg - 1/(2 tau))^2 on log-ratios "
        "AVERAGED over completion tokens; a DPO beta or beta/lambda does not carry over "
        "(smaller tau aims at a larger margin).")),
    Loss(name="robust", loss_type="robust", **_DPO, check=_robust_label_smoothing,
         coefficient=(
        "beta: the KL coefficient as in DPO; the label-flip rate e is training.trl."
        "label_smoothing in (0, 0.5); loss ((1-e) l(Delta) - e l(-Delta)) / (1-2e) with "
        "l(x) = -log sigmoid(beta x).")),
    Loss(name="hinge", loss_type="hinge", **_DPO, coefficient=(
        "beta: the inverse margin of SLiC's hinge loss max(0, 1 - beta * Delta): pairs whose "
        "summed log-ratio margin exceeds 1/beta stop contributing.")),
    Loss(name="kto", data="kto", config="trl:KTOConfig", trainer="trl:KTOTrainer",
         loss_type=None, needs_reference=True, min_batch_size=2,
         # the completion's summed log-prob, and that of the mismatched (KL) completion
         ref_columns=("ref_logps", "ref_KL_logps"), coefficient=(
        "beta: KTO's KL coefficient in sigmoid(beta * (log-ratio - z_ref)); desirable rows "
        "weigh 1, undesirable n_desirable/n_undesirable (set from the data).")),
    Loss(name="safedpo", **{**_SAFE, "trainer": "sacpo_steps.training.safety_trainers:"
                                                 "SafeDPOTrainer"},
         loss_type="sigmoid", check=_safe_loss_check("safedpo"), coefficient=(
        "beta: the KL coefficient as in DPO; loss -log sigmoid(beta * Delta - M) on "
        "helpfulness pairs reordered by safety (a safe answer always preferred, pairs of "
        "two unsafe answers dropped), M = margin * (h_l - h_w) (SafeDPO, arXiv 2505.20065)."),
         margin=("SafeDPO's safety margin >= 0, subtracted inside the sigmoid of each "
                 "safe-over-unsafe pair (not scaled by beta): 0 is DPO on the reordered "
                 "pairs; the paper sweeps 0-20 with beta 0.1.")),
    Loss(name="bso", **{**_SAFE, "trainer": "sacpo_steps.training.safety_trainers:"
                                             "BSOTrainer"},
         loss_type=None, check=_safe_loss_check("bso"), reference_loss="safedpo",
         coefficient=(
        "beta: the KL coefficient as in DPO; BSO's scaled Basu power loss (lambda 0.2, "
        "scale 4) on log R = -(beta * Delta - M), the same reordered pairs and margin M as "
        "SafeDPO (BSO, arXiv 2605.12339)."),
         margin=("BSO's C >= 0, the counterpart of SafeDPO's Delta: log R of a "
                 "safe-over-unsafe pair is -(beta * Delta - C).")),
):
    register_loss(_entry)


def write_trl_fields(path: str | Path = TRL_FIELDS_PATH) -> dict[str, Any]:
    """Regenerate trl_fields.json for the config classes of every registered loss."""
    return write_field_lists([loss.config for loss in LOSSES.values()], path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sacpo_steps.training.losses",
        description="Regenerate or check trl_fields.json (the TRL config fields `trl:` "
        "may set) from the installed TRL.")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write-trl-fields", action="store_true",
                       help=f"write {TRL_FIELDS_PATH.name} from the installed TRL")
    group.add_argument("--check-trl-fields", action="store_true",
                       help=f"exit 1 if {TRL_FIELDS_PATH.name} differs from the installed TRL")
    args = parser.parse_args(argv)
    if args.write_trl_fields:
        data = write_trl_fields()
        print(f"wrote {TRL_FIELDS_PATH} (TRL {data['trl_version']}: "
              f"{', '.join(data['configs'])})")
        return
    stored = trl_fields()
    current = installed_trl_fields([loss.config for loss in LOSSES.values()])
    if stored["configs"] != current["configs"]:
        raise SystemExit(f"{TRL_FIELDS_PATH.name} is stale; run: {WRITE_COMMAND}")
    print(f"{TRL_FIELDS_PATH.name} matches TRL {current['trl_version']}")


if __name__ == "__main__":
    main()
