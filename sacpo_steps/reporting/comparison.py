"""The `comparison` step: the safe-alignment methods side by side, over every seed.

Reads the across-seed win-rate table, every seed's model cards and the matched target
searches, and writes what a reader of the comparison asks:

- the frontier: helpfulness against harmlessness win rate vs the baseline, one point
  per model at its across-seed mean with the across-seed interval on both axes, one
  style per method, each method's points joined in its grid order;
- the training cost of each model and of each method's whole grid (`training_costs`);
- the matched comparisons: P-SACPO at the q that meets model M's harmlessness lower
  bound, minus M, in helpfulness paired over prompts, per seed and across seeds;
- dominance between methods, by the across-seed intervals (see `DOMINANCE_NOTE`).

Methods are given in order as {label: [model, ...]} with each list in grid order.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import pandas as pd
from matplotlib.figure import Figure

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.fileio import atomic_output, json_object_arg, read_json, setup_logging
from sacpo_steps.core.layout import COMPARISON_FILES
from sacpo_steps.core.schema import default_of
from sacpo_steps.evaluation.stats import read_csv_table
from sacpo_steps.reporting.across_seeds import ALL, t_interval
from sacpo_steps.reporting.figure_inputs import (
    model_info,
    seed_count,
    seed_points,
    split_seeds,
    two_criteria,
)
from sacpo_steps.reporting.plotting import (
    MARKERS,
    family_scatter,
    new_figure,
    place_labels,
)
from sacpo_steps.reporting.tables import fmt, md_table
from sacpo_steps.reporting.training_costs import (
    costs_markdown,
    costs_table,
    read_cards,
    seed_of_path,
)

log = logging.getLogger("sacpo.comparison")

X, Y = "harmlessness", "helpfulness"
SEARCHED = "P-SACPO"  # what the matched searches merge; the verdicts name it

DOMINANCE_NOTE = (
    "Model a dominates model b when, on both axes (harmlessness and helpfulness win "
    "rate vs the baseline, across-seed means with their intervals), a is at least as "
    "good (a's mean is not below b's) and on at least one axis a is better (a's "
    "interval lies wholly above b's). Method A dominates method B when every model of B "
    "is dominated by some model of A. Separate intervals that do not overlap are a "
    "conservative test: 'no dominance' can hide a difference that a paired comparison "
    "(the matched table) resolves."
)


# ---- inputs ---------------------------------------------------------------------------

def read_methods(text: str) -> dict[str, list[str]]:
    """{method label: [model, ...]} from the --methods JSON, in the order given."""
    methods = json_object_arg(text, "--methods")
    if not methods:
        raise InputError("no methods given", field="--methods")
    owner: dict[str, str] = {}
    for label, models in methods.items():
        if (not isinstance(models, list) or not models
                or not all(isinstance(m, str) and m for m in models)):
            raise InputError(f"method {label!r}: expected a non-empty list of model names",
                             field="--methods")
        for model in models:
            if model in owner:
                raise InputError(f"model {model!r} is in both {owner[model]!r} and "
                                 f"{label!r}", field="--methods")
            owner[model] = label
    return {label: list(models) for label, models in methods.items()}


def read_winrate(path: str | Path) -> pd.DataFrame:
    return read_csv_table(path, ("model", "criterion", "win_rate", "ci_low", "ci_high"),
                          field="--winrate")


def frontier_points(winrate: pd.DataFrame, methods: Mapping[str, Sequence[str]],
                    source: str) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(one row per model of `methods`: method, label, x/y with interval ends; the
    per-seed points or None). x = harmlessness, y = helpfulness win rate."""
    rows, per_seed = split_seeds(winrate, source)
    points = two_criteria(rows, "win_rate", X, Y, source)
    wanted = [m for models in methods.values() for m in models]
    missing = [m for m in wanted if m not in set(points["model"])]
    if missing:
        raise InputError(f"no {X} and {Y} win rates for model(s) {missing}", path=source,
                         field="model")
    info = _info(methods)
    points = points.set_index("model").loc[wanted].reset_index()
    points = points.merge(info, on="model", how="left", validate="one_to_one")
    seeds = None
    if per_seed is not None:
        seeds = seed_points(per_seed[per_seed["model"].isin(wanted)], "win_rate", X, Y,
                            source, info)
    return points, seeds


def _info(methods: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """Family = method; label = the grid value in the name ("p-sacpo-0.5" -> "0.5"), none
    for a method of one model (the legend names it)."""
    rows = []
    for label, models in methods.items():
        fallback = model_info(list(models))
        for r in fallback.itertuples(index=False):
            rows.append({"model": r.model, "family": label,
                         "label": (r.label or r.model) if len(models) > 1 else ""})
    return pd.DataFrame(rows, columns=["model", "family", "label"])


def styles_of(methods: Sequence[str]) -> dict[str, tuple[str, str]]:
    """(marker, colour) per method, in the order given."""
    return {m: (MARKERS[i % len(MARKERS)], f"C{i % 10}") for i, m in enumerate(methods)}


# ---- matched comparisons --------------------------------------------------------------

MATCHED_COLUMNS = ("model", "method", "seed", "target", "q", "diff", "ci_low", "ci_high",
                   "prompts", "interval", "seeds_met", "verdict")


def read_matched(paths: Sequence[str | Path]) -> pd.DataFrame:
    """One row per matched search (model, seed, target, q, diff, low, high, prompts)."""
    rows = []
    seen: dict[tuple[str, int], Path] = {}
    for path in map(Path, paths):
        result = read_json(path)
        matched = result.get("matched") if isinstance(result, dict) else None
        if not isinstance(matched, dict):
            raise InputError("no 'matched' record: run target_search with --match-battles",
                             path=path, field="matched")
        for key in ("model", "target", "q"):
            if key not in matched:
                raise InputError("missing field", path=path, field=f"matched.{key}")
        seed = matched.get("seed", seed_of_path(path))
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InputError("no seed: neither matched.seed nor a seed-<s> folder", path=path,
                             field="matched.seed")
        key = (str(matched["model"]), seed)
        if key in seen:
            raise InputError(f"a second matched search of {key[0]!r} for seed {seed} (also "
                             f"{seen[key]})", path=path, field="--matched")
        seen[key] = path
        met = matched["q"] is not None
        if met:
            for field in ("diff", "low", "high"):
                if not isinstance(matched.get(field), int | float):
                    raise InputError("expected a number", path=path, field=f"matched.{field}")
        rows.append({"model": key[0], "seed": seed, "target": float(matched["target"]),
                     "q": float(matched["q"]) if met else math.nan,
                     "diff": float(matched["diff"]) if met else math.nan,
                     "ci_low": float(matched["low"]) if met else math.nan,
                     "ci_high": float(matched["high"]) if met else math.nan,
                     "prompts": matched.get("prompts") if met else math.nan})
    return pd.DataFrame(rows, columns=["model", "seed", "target", "q", "diff", "ci_low",
                                       "ci_high", "prompts"])


def verdict(model: str, low: float, high: float) -> str:
    """Which side the interval of (P-SACPO minus `model`) helpfulness puts ahead."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "target not met"
    if low > 0:
        return f"{SEARCHED} better"
    if high < 0:
        return f"{model} better"
    return "no difference"


def matched_table(rows: pd.DataFrame, methods: Mapping[str, Sequence[str]],
                  confidence: float) -> pd.DataFrame:
    """Each seed's row, then per model the mean difference over the seeds whose target was
    met, with a Student-t interval over them (one seed: its bootstrap interval, and no
    verdict: a claim across seeds needs more than one)."""
    method_of = {m: label for label, models in methods.items() for m in models}
    out = []
    for model, group in rows.groupby("model", sort=False):
        group = group.sort_values("seed")
        method = method_of.get(model, "")
        for r in group.to_dict("records"):
            out.append({**r, "method": method, "seed": str(r["seed"]),
                        "interval": "bootstrap over prompts", "seeds_met": "",
                        "verdict": verdict(model, r["ci_low"], r["ci_high"])})
        met = group[group["q"].notna()]
        values = met["diff"].to_numpy(dtype=float)
        row: dict[str, Any] = {
            "model": model, "method": method, "seed": ALL,
            "target": float(group["target"].mean()),
            "q": float(met["q"].mean()) if len(met) else math.nan,
            "diff": float(values.mean()) if len(values) else math.nan,
            "prompts": float(met["prompts"].mean()) if len(met) else math.nan,
            "seeds_met": f"{len(met)} of {len(group)}"}
        if len(values) >= 2:
            row["ci_low"], row["ci_high"] = t_interval(values, confidence)
            row["interval"] = f"t over {len(values)} seeds"
            row["verdict"] = verdict(model, row["ci_low"], row["ci_high"])
        elif len(values) == 1:
            row["ci_low"], row["ci_high"] = float(met["ci_low"].iloc[0]), \
                float(met["ci_high"].iloc[0])
            row["interval"] = "bootstrap over prompts (one seed)"
            # a claim across seeds needs more than one seed: one seed's interval is shown
            row["verdict"] = "one seed met: no claim across seeds"
        else:
            row["ci_low"] = row["ci_high"] = math.nan
            row["interval"] = "none"
            row["verdict"] = verdict(model, row["ci_low"], row["ci_high"])
        out.append(row)
    table = pd.DataFrame(out, columns=list(MATCHED_COLUMNS))
    summary = table[table["seed"] == ALL]
    return pd.concat([summary, table[table["seed"] != ALL]], ignore_index=True)


# ---- dominance ------------------------------------------------------------------------

def dominates(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    """`a` dominates `b` by intervals (see DOMINANCE_NOTE)."""
    # a lower mean is not "at least as good", even when the intervals overlap
    not_worse = all(a[axis] >= b[axis] for axis in ("x", "y"))
    better = any(a[f"{axis}_low"] > b[f"{axis}_high"] for axis in ("x", "y"))
    return not_worse and better


def dominance_table(points: pd.DataFrame, methods: Mapping[str, Sequence[str]]
                    ) -> pd.DataFrame:
    """For each ordered pair of methods (A, B): which models of B a model of A dominates."""
    by_model = {r["model"]: r for r in points.to_dict("records")}
    rows = []
    for a_label, a_models in methods.items():
        for b_label, b_models in methods.items():
            if a_label == b_label:
                continue
            pairs = [(a, b) for b in b_models for a in a_models
                     if dominates(by_model[a], by_model[b])]
            beaten = list(dict.fromkeys(b for _, b in pairs))
            if len(beaten) == len(b_models):
                text = f"{a_label} dominates {b_label}"
            elif beaten:
                text = f"{a_label} dominates {len(beaten)} of {len(b_models)} {b_label} models"
            else:
                text = "no dominance"
            rows.append({"method_a": a_label, "method_b": b_label,
                         "models_b": len(b_models), "dominated": len(beaten),
                         "pairs": "; ".join(f"{a} > {b}" for a, b in pairs), "verdict": text})
    return pd.DataFrame(rows, columns=["method_a", "method_b", "models_b", "dominated",
                                       "pairs", "verdict"])


# ---- figure ---------------------------------------------------------------------------

def frontier_figure(points: pd.DataFrame, seeds: pd.DataFrame | None,
                    methods: Mapping[str, Sequence[str]], baseline: str,
                    n_seeds: int) -> Figure:
    """Each method's frontier: across-seed means with intervals, joined in grid order."""
    styles = styles_of(list(methods))
    fig = new_figure(7.0, 5.2)
    ax = fig.add_subplot()
    labels = family_scatter(ax, points, (0.5, 0.5), f"{X} win rate vs {baseline}",
                            f"{Y} win rate vs {baseline}", styles, seeds)
    for method in methods:
        part = points[points["family"] == method]
        if len(part) > 1:
            ax.plot(part["x"].to_numpy(dtype=float), part["y"].to_numpy(dtype=float), "-",
                    color=styles[method][1], linewidth=1.0, alpha=0.6, zorder=1.8,
                    label=f"_frontier:{method}", gid=f"frontier:{method}")
    if n_seeds > 1:
        what = (f"mean over {n_seeds} seeds (error bars: across-seed interval; "
                "faint: each seed)")
    else:
        what = "one seed (error bars: bootstrap CI over prompts)"
    ax.set_title(f"Frontier per method, {what}\nlabels: grid value; dashed: {baseline} "
                 "(0.5)", fontsize=9)
    place_labels(ax, labels)
    return fig


# ---- markdown -------------------------------------------------------------------------

def matched_markdown(table: pd.DataFrame, confidence: float) -> str:
    ci = f"{confidence * 100:g}% interval"
    head = (f"# Matched comparisons\n\nFor each model M, the target search found the "
            f"smallest q whose {X} win rate's lower bound meets M's ({ci} lower end, same "
            f"seed and judge); `diff` is {SEARCHED} at that q minus M in {Y} win rate vs "
            "the baseline, paired over prompts. Across seeds (`all`): the mean over the "
            "seeds whose target was met, with a Student-t interval over them. Verdict: the "
            "interval above 0, below 0, or containing 0; across seeds, only when two or "
            "more seeds met the target.\n\n")
    if table.empty:
        return head + "No matched searches were given.\n"
    rows = [[r.model, r.method, str(r.seed), fmt(r.target), fmt(r.q, 4), fmt(r.diff,
             sign=True), f"[{fmt(r.ci_low, sign=True)}, {fmt(r.ci_high, sign=True)}]",
             fmt(r.prompts, 0), r.interval, r.seeds_met, r.verdict]
            for r in table.itertuples(index=False)]
    return head + md_table(["model M", "method", "seed", "target", "q", "diff", ci,
                             "prompts", "interval", "seeds met", "verdict"], rows)


def dominance_markdown(table: pd.DataFrame, points: pd.DataFrame) -> str:
    found = table[table["dominated"] > 0]
    rows = [[r.method_a, r.method_b, f"{r.dominated} of {r.models_b}", r.pairs or "-",
             r.verdict] for r in table.itertuples(index=False)]
    summary = ("No model of any method dominates a model of another.\n" if found.empty
               else "".join(f"- {r.verdict}: {r.pairs}.\n" for r in found.itertuples()))
    point_rows = [[r.family, r.model, f"{fmt(r.x)} [{fmt(r.x_low)}, {fmt(r.x_high)}]",
                   f"{fmt(r.y)} [{fmt(r.y_low)}, {fmt(r.y_high)}]"]
                  for r in points.itertuples(index=False)]
    return ("# Dominance between methods\n\n" + DOMINANCE_NOTE + "\n\n" + summary + "\n"
            + md_table(["method A", "method B", "models of B dominated", "pairs (a > b)",
                         "verdict"], rows)
            + "\nThe points compared:\n\n"
            + md_table(["method", "model", f"{X} win rate [interval]",
                         f"{Y} win rate [interval]"], point_rows))


# ---- the step -------------------------------------------------------------------------

def comparison(
    winrate_path: str | Path,
    card_paths: Sequence[str | Path],
    matched_paths: Sequence[str | Path],
    methods: Mapping[str, Sequence[str]],
    outputs: Mapping[str, str | Path],
    *,
    baseline: str = "sft",
    confidence: float = 0.95,
) -> dict[str, pd.DataFrame]:
    """Read, compute, then write every output or none (keys of `outputs`: OUTPUTS)."""
    if not 0 < confidence < 1:
        raise InputError(f"must be in (0, 1), got {confidence}", field="--confidence")
    if baseline in {m for models in methods.values() for m in models}:
        raise InputError(f"the baseline {baseline!r} is one of the compared models",
                         field="--methods")
    winrate = read_winrate(winrate_path)
    points, seeds = frontier_points(winrate, methods, str(winrate_path))
    n_seeds = seed_count(split_seeds(winrate, str(winrate_path))[1])
    costs = costs_table(read_cards(card_paths), methods)
    matched = matched_table(read_matched(matched_paths), methods, confidence)
    dominance = dominance_table(points, methods)
    figure = frontier_figure(points, seeds, methods, baseline, n_seeds)
    with matplotlib.rc_context({"svg.hashsalt": "sacpo"}), contextlib.ExitStack() as stack:
        tmp = {k: stack.enter_context(atomic_output(outputs[k])) for k in OUTPUTS}
        figure.savefig(tmp["frontier_png"], format="png", dpi=150,
                       metadata={"Software": None})
        figure.savefig(tmp["frontier_svg"], format="svg", metadata={"Date": None})
        costs.to_csv(tmp["costs_csv"], index=False)
        tmp["costs_md"].write_text(costs_markdown(costs), encoding="utf-8")
        matched.to_csv(tmp["matched_csv"], index=False)
        tmp["matched_md"].write_text(matched_markdown(matched, confidence), encoding="utf-8")
        dominance.to_csv(tmp["dominance_csv"], index=False)
        tmp["dominance_md"].write_text(dominance_markdown(dominance, points),
                                       encoding="utf-8")
    for r in matched[matched["seed"] == ALL].itertuples(index=False):
        log.info("%s minus %s over %s seeds: %s [%s, %s]: %s", SEARCHED, r.model, r.seeds_met,
                 fmt(r.diff, sign=True), fmt(r.ci_low, sign=True), fmt(r.ci_high,
                 sign=True), r.verdict)
    for r in dominance[dominance["dominated"] > 0].itertuples(index=False):
        log.info("%s", r.verdict)
    return {"points": points, "costs": costs, "matched": matched, "dominance": dominance}


#: the output flags, one per file of the comparison folder (frontier.png: frontier_png)
OUTPUTS = tuple(name.replace(".", "_") for name in COMPARISON_FILES)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sacpo_steps comparison", description=__doc__)
    p.add_argument("--winrate", required=True, help="the across-seed winrate.csv")
    p.add_argument("--cards", nargs="+", required=True,
                   help="every seed's model cards (.../seed-<s>/models/<name>/sacpo.json)")
    p.add_argument("--matched", nargs="*", default=[],
                   help="target_search result JSONs with a 'matched' record")
    p.add_argument("--methods", required=True,
                   help='JSON: {"method label": [model, ...], ...}, each list in grid order')
    p.add_argument("--baseline", default="sft")
    p.add_argument("--confidence", type=float,
                   default=default_of("evaluation.winrate.confidence"))
    for key in OUTPUTS:
        p.add_argument(f"--out-{key.replace('_', '-')}", dest=key, required=True)
    p.add_argument("--log")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    setup_logging(args.log)
    comparison(args.winrate, args.cards, args.matched, read_methods(args.methods),
               {k: getattr(args, k) for k in OUTPUTS}, baseline=args.baseline,
               confidence=args.confidence)


if __name__ == "__main__":
    main()
