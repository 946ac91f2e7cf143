"""The `elo` step: Elo ratings per criterion from all-pairs battles (paper Figures 3-5).

Two estimates, both labelled in every output by the `mode` column:

- `bt` (recommended): Bradley-Terry maximum likelihood over every judged pair, ties
  counted as half a win for each side, errors left out; shifted so the anchor (SFT)
  is 1000. Intervals come from a bootstrap that resamples whole prompts (all their
  pairs, orders and repetitions move together, as in `stats.win_rates`).
- `paper` (compatibility only): the reference code's online Elo, start 1200, K=32,
  50 trials of 10 shuffled passes, each trial rescaled multiplicatively so the
  anchor is 1000, then averaged. It depends on the order of battles and on the
  arbitrary start value; keep it only to compare with the paper's figures. Its rows
  are marked invalid (`valid` False, `invalid_reason` says why, no rating):
  every row of a criterion when, in any trial, the anchor's raw online rating is
  <= 0 (the rescale would flip signs) or the rescale factor 1000 / raw anchor lies
  outside [1 / PAPER_MAX_RESCALE, PAPER_MAX_RESCALE] = [0.5, 2] (see below); one
  model's row when its Bradley-Terry rating is not finite (it never lost, or never
  won, against the anchor's group: its online rating then only grows with the
  number of passes), or when the rescale changes its order against another model
  relative to their mean raw ratings.

  Why a bound of 2 on the rescale factor f: multiplying every raw rating by f is an
  additive shift of the anchor to 1000 plus a stretch of every gap to the anchor by
  f (f r_i - 1000 = f (r_i - r_anchor)). On the Elo scale a gap d means odds
  10^(d/400), so a stretch by f raises the odds every reported gap implies to the
  power f. Up to f = 2 (or down to 1/2) the reported odds are at most squared (or
  square-rooted); beyond that the paper-mode numbers say more about the rescale
  than about the battles. Every trial starts the anchor at 1200 (f = 0.83); f = 2
  needs its raw rating to fall to 500, 700 points below the start. The case this
  catches and the <= 0 check does not: three models that beat SFT in all 780 battles
  each (130 prompts, 2 orders, 3 repetitions) leave SFT's raw rating at about 72,
  f = 13.8, and reported ratings near 21,800.

With battles against SFT only, BT Elo is a function of the win rate w:
Elo = 1000 + 400 log10(w / (1 - w)); it adds information only when models meet
each other.

Degenerate data: when a group of models never loses (or never wins) against the
rest, the BT maximum likelihood does not exist in finite numbers. We report the
limit: models in the anchor's strongly connected part of the "scored against" graph
get finite ratings (the MLE restricted to it), models that beat that part outright
get +inf, those beaten outright -inf, and those not comparable to the anchor NaN;
the `status` column says which ("finite", "+inf", "-inf", "undetermined").
Models with no valid battle path to the anchor at all are an InputError.

Fits per family: pooled, every model is fitted from every battle, so models shared by
several figures (SFT, an external baseline, the stage-1 model) carry several times as
many battles as the rest. The paper fits each figure's models from that figure's
battles only. With `families` (name -> models, `evaluation.families` of the config)
`family_elo_table` adds one fit per family from the battles whose two models are both
in the family or are the anchor (the anchor is always part of a family, it sets the
scale). Its rows carry `fit` = the family name, beside the pooled rows (`fit` =
"pooled", the same numbers as the elo table); each family draws its own random
streams, the pooled fit keeps the streams it has without families.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.fileio import atomic_output, setup_logging
from sacpo_steps.core.schema import default_of
from sacpo_steps.evaluation.stats import check_columns, load_battles
from sacpo_steps.reporting.bradley_terry import POOLED, bt_elo_bootstrap
from sacpo_steps.reporting.online_elo import PAPER_MAX_RESCALE, paper_elo

log = logging.getLogger("sacpo.elo")

ELO_COLUMNS = ("criterion", "mode", "model", "rating", "ci_low", "ci_high", "rank", "rank_low",
               "rank_high", "n", "errors", "status", "trial_std", "valid", "invalid_reason")
MODES = ("bt", "paper")
FAMILY_COLUMNS = ("criterion", "fit", *ELO_COLUMNS[1:])


def elo_table(
    battles: pd.DataFrame,
    anchor: str = "sft",
    mode: str = "both",
    rounds: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    paper_trials: int = 50,
    paper_passes: int = 10,
    *,
    fit: str = POOLED,
) -> pd.DataFrame:
    """The elo.csv table: one row per (criterion, mode, model), columns ELO_COLUMNS.

    `fit` names the battles given (a family's, for `family_elo_table`): it picks the
    random streams and the wording of messages, not the columns.
    """
    if mode not in (*MODES, "both"):
        raise InputError(f"must be one of bt, paper, both; got {mode!r}", field="mode")
    frames = []
    if mode in ("bt", "both"):
        frames.append(bt_elo_bootstrap(battles, anchor, rounds=rounds, seed=seed,
                                       confidence=confidence, fit=fit))
    if mode in ("paper", "both"):
        frames.append(paper_elo(battles, anchor, trials=paper_trials, passes=paper_passes,
                                seed=seed, fit=fit))
    table = pd.concat(frames, ignore_index=True).reindex(columns=list(ELO_COLUMNS))
    table["mode_order"] = table["mode"].map({m: i for i, m in enumerate(MODES)})
    table = table.sort_values(["criterion", "mode_order", "rank", "model"], kind="stable",
                              na_position="last")
    return table.drop(columns="mode_order").reset_index(drop=True)


def check_families(families: object, anchor: str) -> dict[str, list[str]]:
    """`families` as {name: [model, ...]}: names other than "pooled", at least one model
    other than the anchor each, no model twice. InputError naming `families.<name>`."""
    if not isinstance(families, dict):
        raise InputError(f"must map family names to lists of models, got "
                         f"{type(families).__name__}", field="families")
    out = {}
    for name, members in families.items():
        field = f"families.{name}"
        if not isinstance(name, str) or not name or name == POOLED:
            raise InputError(f"a family name must be a non-empty string other than "
                             f"{POOLED!r} (the label of the fit over every battle)", field=field)
        if (not isinstance(members, list) or not members
                or not all(isinstance(m, str) and m for m in members)):
            raise InputError(f"must be a non-empty list of model names, got {members!r}",
                             field=field)
        if len(set(members)) != len(members):
            raise InputError(f"lists a model twice: {members}", field=field)
        if set(members) <= {anchor}:
            raise InputError(f"needs a model other than the anchor {anchor!r}", field=field)
        out[name] = list(members)
    return out


def family_battles(battles: pd.DataFrame, members: Sequence[str], anchor: str) -> pd.DataFrame:
    """The battles of one family: both models among `members` or the anchor."""
    keep = {*members, anchor}
    return battles[battles["model_a"].isin(keep) & battles["model_b"].isin(keep)]


def family_elo_table(
    battles: pd.DataFrame,
    families: dict[str, list[str]],
    anchor: str = "sft",
    *,
    pooled: pd.DataFrame | None = None,
    **settings: object,
) -> pd.DataFrame:
    """The elo_families.csv table: the pooled fit and one fit per family, column `fit`.

    Columns FAMILY_COLUMNS (ELO_COLUMNS with `fit` after `criterion`). Each family is
    fitted by `elo_table` from `family_battles` only, with the same `settings` (mode,
    rounds, seed, ...). `pooled`: the pooled table when already computed (elo_step
    writes the same rows to elo.csv), else computed here. Rows are sorted by criterion,
    mode, fit (pooled first, then the families in the given order), rank.
    """
    families = check_families(families, anchor)
    check_columns(battles)
    seen = set(battles["model_a"]) | set(battles["model_b"])
    frames = [(elo_table(battles, anchor, **settings) if pooled is None else pooled)
              .assign(fit=POOLED)]
    for name, members in families.items():
        missing = [m for m in members if m not in seen]
        if missing:
            raise InputError(f"model(s) {missing} have no battles at all", field=f"families.{name}")
        part = family_battles(battles, members, anchor)
        frames.append(elo_table(part, anchor, fit=name, **settings).assign(fit=name))
    table = pd.concat(frames, ignore_index=True).reindex(columns=list(FAMILY_COLUMNS))
    fits = {f: i for i, f in enumerate([POOLED, *families])}
    table["order_mode"] = table["mode"].map({m: i for i, m in enumerate(MODES)})
    table["order_fit"] = table["fit"].map(fits)
    table = table.sort_values(["criterion", "order_mode", "order_fit", "rank", "model"],
                              kind="stable", na_position="last")
    return table.drop(columns=["order_mode", "order_fit"]).reset_index(drop=True)


def _fmt(x: float, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if math.isinf(x):
        return "+inf" if x > 0 else "-inf"
    return f"{x:.{digits}f}"


def _rank(r: pd.Series) -> str:
    if pd.isna(r["rank"]):
        return "n/a"
    text = str(int(r["rank"]))
    if not pd.isna(r["rank_low"]):
        text += f" [{int(r['rank_low'])}, {int(r['rank_high'])}]"
    return text


def _is_valid(row: pd.Series) -> bool:
    """A row without the `valid` column (older tables) counts as valid."""
    value = row.get("valid", True)
    return True if pd.isna(value) else bool(value)


def markdown_table(table: pd.DataFrame, confidence: float = 0.95) -> str:
    """Render elo.csv (or elo_families.csv: a `fit` column) as Markdown; `paper` rows
    show the spread over trials instead of a CI."""
    by_fit = "fit" in table.columns
    header = ["criterion", *(["fit"] if by_fit else []), "mode", "model", "rating",
              f"{confidence * 100:g}% interval", "rank [interval]", "n", "errors", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in table.iterrows():
        value = _fmt(r["rating"])
        if not _is_valid(r):
            value, interval = f"invalid: {r['invalid_reason']}", "n/a"
        elif r["mode"] == "paper":
            interval = f"± {_fmt(r['trial_std'])} (trial std)"
        else:
            interval = f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"
        cells = [r["criterion"], *([r["fit"]] if by_fit else []), r["mode"], r["model"], value,
                 interval, _rank(r), int(r["n"]), int(r["errors"]), r["status"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    note = ("\nmode `bt`: Bradley-Terry maximum likelihood (recommended), bootstrap over "
            "prompts. mode `paper`: the paper's online Elo, kept for comparison only; its "
            "rows are invalid (no number) when the baseline's raw online rating is <= 0, "
            f"when the multiplicative rescale to 1000 stretches the ratings by a factor "
            f"outside [{1 / PAPER_MAX_RESCALE:g}, {PAPER_MAX_RESCALE:g}] or would change the "
            "order of the models, or (one model) when its Bradley-Terry rating is not "
            "finite.\n")
    if by_fit:
        note += (f"fit `{POOLED}`: every battle (the rows of elo.md); any other fit: the "
                 "family of that name, fitted from the battles between its models and the "
                 "baseline only.\n")
    return "\n".join(lines) + "\n" + note


def _log_rows(table: pd.DataFrame) -> None:
    for _, r in table.iterrows():
        what = " / ".join(str(r[c]) for c in ("criterion", "fit", "mode", "model") if c in r)
        if not _is_valid(r):
            log.info("%s: invalid: %s", what, r["invalid_reason"])
            continue
        log.info("%s: Elo %s [%s, %s] (%s)", what, _fmt(r["rating"]), _fmt(r["ci_low"]),
                 _fmt(r["ci_high"]), r["status"])


def elo_step(
    battle_paths: Sequence[str | Path],
    out_csv: str | Path,
    out_md: str | Path,
    *,
    anchor: str = "sft",
    mode: str = "both",
    rounds: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    paper_trials: int = 50,
    paper_passes: int = 10,
    families: dict[str, list[str]] | None = None,
    out_families_csv: str | Path | None = None,
    out_families_md: str | Path | None = None,
) -> pd.DataFrame:
    """Compute Elo from battle files; write CSV and Markdown (all files or none).

    With `families`, also the per-family table (`family_elo_table`) to
    `out_families_csv` / `out_families_md`, which must then both be given (and only
    then). elo.csv stays the pooled table either way. Returns the pooled table.
    """
    outs = (out_families_csv, out_families_md)
    if families and not all(outs):
        raise InputError("families need --out-families-csv and --out-families-md",
                         field="out_families_csv")
    if not families and any(outs):
        raise InputError("--out-families-csv/--out-families-md need families",
                         field="families")
    if families:
        families = check_families(families, anchor)
    battles = load_battles(battle_paths)
    settings = {"mode": mode, "rounds": rounds, "seed": seed, "confidence": confidence,
                "paper_trials": paper_trials, "paper_passes": paper_passes}
    table = elo_table(battles, anchor, **settings)
    by_family = (family_elo_table(battles, families, anchor, pooled=table, **settings)
                 if families else None)
    with contextlib.ExitStack() as stack:
        paths = [out_csv, out_md, *(outs if by_family is not None else ())]
        tmp = [stack.enter_context(atomic_output(p)) for p in paths]
        table.to_csv(tmp[0], index=False)
        tmp[1].write_text(markdown_table(table, confidence), encoding="utf-8")
        if by_family is not None:
            by_family.to_csv(tmp[2], index=False)
            tmp[3].write_text(markdown_table(by_family, confidence), encoding="utf-8")
    _log_rows(table)
    if by_family is not None:
        _log_rows(by_family[by_family["fit"] != POOLED])
    return table


def _families_arg(text: str) -> dict[str, list[str]]:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"not JSON ({exc})", field="families") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sacpo_steps elo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--battles", nargs="+", required=True, help="battle JSONL files")
    p.add_argument("--anchor", default="sft", help="model fixed at 1000 (SFT)")
    p.add_argument("--mode", choices=[*MODES, "both"], default=default_of("evaluation.elo.mode"))
    p.add_argument("--rounds", type=int, default=default_of("evaluation.elo.bootstrap_rounds"),
                   help="bootstrap rounds (bt mode)")
    p.add_argument("--confidence", type=float, default=default_of("evaluation.elo.confidence"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--paper-trials", type=int, default=default_of("evaluation.elo.paper_trials"),
                   help="paper mode: trials")
    p.add_argument("--paper-passes", type=int, default=default_of("evaluation.elo.paper_passes"),
                   help="paper mode: shuffled passes per trial")
    p.add_argument("--families", default=None,
                   help='JSON {"name": [model, ...]}: one more fit per family, from the '
                        "battles among its models and the anchor (evaluation.families)")
    p.add_argument("--out-csv", required=True)
    p.add_argument("--out-md", required=True)
    p.add_argument("--out-families-csv", default=None,
                   help="with --families: pooled and per-family rows, column `fit`")
    p.add_argument("--out-families-md", default=None)
    p.add_argument("--log", default=None)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    setup_logging(args.log)
    families = _families_arg(args.families) if args.families is not None else None
    elo_step(args.battles, args.out_csv, args.out_md, anchor=args.anchor, mode=args.mode,
             rounds=args.rounds, seed=args.seed, confidence=args.confidence,
             paper_trials=args.paper_trials, paper_passes=args.paper_passes,
             families=families, out_families_csv=args.out_families_csv,
             out_families_md=args.out_families_md)


if __name__ == "__main__":
    main()
