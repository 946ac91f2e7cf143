"""The `figures` step: the paper's Figure 2 (win rates), Figure 3 (Elo) and an Elo chart.

Figures are built on `matplotlib.figure.Figure` with an Agg canvas, never through
pyplot, so no global backend or figure registry is touched. Every plotting function
returns its Figure; tests read the plotted values back from the artists.

Model info (which family a model belongs to, and the short label written next to
its point) comes from a CSV (columns model, family[, label]) or a JSON file
({model: {"family": ..., "label": ...}}, {model: family} or a list of records).
Models it does not name fall back to: "<family>-<number>" -> family and label
the number (so "dpo_h.dpo_s-0.01" joins family "dpo_h.dpo_s" as "0.01"),
otherwise family = model name and no label.

Across seeds: a win-rate or Elo table may carry a `seed` column. Rows with an
integer seed are one seed's results; rows with seed "all" summarise the seeds
(value = mean, ci_low / ci_high = the across-seed interval). With such a column
the "all" rows are the plotted points and error bars, and each seed's point is
drawn small and faint in its family's style; without it nothing changes.

Point labels are placed by a small greedy placer (`place_labels`) so that they
never overlap each other or any marker; labels of one family at the same point
are merged ("0.01, 0.1, 0.3") and a label moved away from its point gets a thin
leader line to it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.fileio import atomic_output, setup_logging
from sacpo_steps.core.schema import default_of
from sacpo_steps.reporting.figure_inputs import (
    elo_rows,
    family_of,
    invalid_rows,
    model_info,
    plottable,
    read_model_info,
    require_columns,
    seed_count,
    seed_points,
    split_seeds,
    two_criteria,
    with_info,
)
from sacpo_steps.reporting.plotting import (
    REFERENCE_GID,
    SEED_MARKER_SIZE,
    SEEDS_GID,
    axis_limits,
    error_lengths,
    family_scatter,
    family_styles,
    new_figure,
    place_labels,
)

log = logging.getLogger("sacpo.figures")

FORMATS = ("png", "svg")
NOT_FINITE_GID = "not-finite"


def winrate_figure(
    winrate: pd.DataFrame,
    info: pd.DataFrame | None = None,
    *,
    baseline: str = "sft",
    x_criterion: str = "helpfulness",
    y_criterion: str = "harmlessness",
    source: str = "winrate table",
    styles: dict[str, tuple[str, str]] | None = None,
) -> Figure:
    """Figure 2: helpfulness vs harmlessness win rate against the baseline, with CIs.

    The baseline has no row in the win-rate table; it is drawn at (0.5, 0.5). With a
    `seed` column the "all" rows are the points (across-seed intervals) and each
    seed's point is drawn faint.
    """
    require_columns(winrate, ("model", "criterion", "win_rate", "ci_low", "ci_high"), source)
    winrate, per_seed = split_seeds(winrate, source)
    points = two_criteria(winrate, "win_rate", x_criterion, y_criterion, source)
    points = points[points["model"] != baseline]
    nan = float("nan")
    base = pd.DataFrame([{"model": baseline, "x": 0.5, "y": 0.5, "x_low": nan, "x_high": nan,
                          "y_low": nan, "y_high": nan}])
    points = with_info(pd.concat([base, points], ignore_index=True), info)
    if per_seed is not None:
        per_seed = per_seed[per_seed["model"] != baseline]
    seeds = seed_points(per_seed, "win_rate", x_criterion, y_criterion, source, info)
    styles = styles or family_styles(points["family"].tolist(), family_of(points, baseline))
    fig = new_figure(6.5, 5.0)
    ax = fig.add_subplot()
    labels = family_scatter(ax, points, (0.5, 0.5), f"{x_criterion} win rate vs {baseline}",
                            f"{y_criterion} win rate vs {baseline}", styles, seeds)
    if seed_count(per_seed) > 1:  # one seed's "all" row keeps its bootstrap CI
        title = (f"Win rate vs {baseline}, mean over {seed_count(per_seed)} seeds "
                 "(error bars: across-seed interval; faint: each seed)")
    else:
        title = f"Win rate vs {baseline} (error bars: bootstrap CI over prompts)"
    ax.set_title(title, fontsize=9)
    place_labels(ax, labels)
    return fig


def _not_finite_note(fig: Figure, rows: pd.DataFrame) -> None:
    """Say under the figure which models are not shown: rating not finite, or invalid."""
    invalid = invalid_rows(rows)
    bad = rows[~invalid & ~np.isfinite(rows["rating"].to_numpy(dtype=float))]
    parts = []
    if not bad.empty:
        text = ", ".join(f"{r.model} ({r.criterion}: {r.rating:+})" for r in bad.itertuples())
        log.warning("not plotted, rating not finite: %s", text)
        parts.append(f"not shown (rating not finite): {text}")
    if invalid.any():
        reasons = rows[invalid].groupby(["criterion", "invalid_reason"], sort=True)["model"]
        text = "; ".join(f"{', '.join(models)} ({criterion}: {reason})"
                         for (criterion, reason), models in reasons)
        log.warning("not plotted, rating invalid: %s", text)
        parts.append(f"not shown (invalid): {text}")
    if not parts:
        return
    width = int(fig.get_figwidth() * 16)
    fig.supxlabel(textwrap.fill(". ".join(parts), width), fontsize=6, gid=NOT_FINITE_GID)


def elo_figure(
    elo: pd.DataFrame,
    info: pd.DataFrame | None = None,
    *,
    anchor: str = "sft",
    mode: str = "bt",
    x_criterion: str = "helpfulness",
    y_criterion: str = "harmlessness",
    source: str = "elo table",
    styles: dict[str, tuple[str, str]] | None = None,
) -> Figure:
    """Figure 3: helpfulness vs harmlessness Elo (one `mode`), reference lines at the anchor.

    With a `seed` column the "all" rows are plotted and each seed's point is drawn faint.
    """
    _, rows, per_seed = elo_rows(elo, mode, source)
    both = rows[rows["criterion"].isin([x_criterion, y_criterion])]
    anchor_invalid = invalid_rows(both[both["model"] == anchor]).any()
    if anchor_invalid and set(both["criterion"]) == {x_criterion, y_criterion}:
        # the anchor's rating is invalid (paper mode), so is its whole criterion: an
        # empty figure that says why
        fig = new_figure(6.5, 5.0)
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.set_title("paper-mode online Elo (compatibility): invalid, not plotted", fontsize=9)
        _not_finite_note(fig, both)
        return fig
    points = with_info(two_criteria(plottable(rows), "rating", x_criterion, y_criterion,
                                    source), info)
    anchor_rows = points[points["model"] == anchor]
    if anchor_rows.empty:
        raise InputError(f"anchor {anchor!r} missing in criteria {x_criterion!r}, "
                         f"{y_criterion!r}", path=source, field="model")
    reference = (float(anchor_rows["x"].iloc[0]), float(anchor_rows["y"].iloc[0]))
    seeds = seed_points(per_seed, "rating", x_criterion, y_criterion, source, info)
    styles = styles or family_styles(points["family"].tolist(), family_of(points, anchor))
    fig = new_figure(6.5, 5.0)
    ax = fig.add_subplot()
    labels = family_scatter(ax, points, reference, f"{x_criterion} Elo",
                            f"{y_criterion} Elo", styles, seeds)
    if seed_count(per_seed) > 1:  # one seed's "all" row keeps its bootstrap CI
        what = (f"{'Bradley-Terry' if mode == 'bt' else 'paper-mode online'} Elo, mean over "
                f"{seed_count(per_seed)} seeds (across-seed interval; faint: each seed)")
    else:
        what = ("Bradley-Terry Elo, bootstrap CI" if mode == "bt"
                else "paper-mode online Elo (compatibility)")
    ax.set_title(f"{what}; {anchor} = {reference[0]:g}", fontsize=9)
    _not_finite_note(fig, rows[rows["criterion"].isin([x_criterion, y_criterion])])
    place_labels(ax, labels)  # last: the note above moves the axes
    return fig


def elo_chart(elo: pd.DataFrame, *, anchor: str = "sft", mode: str = "bt",
              source: str = "elo table") -> Figure:
    """Per criterion, every model's Elo with its interval, best at the top.

    The other mode, when the table has it, is overlaid as hollow markers for comparison.
    With a `seed` column the "all" rows are plotted and each seed's rating is a faint dot.
    """
    elo, rows, per_seed = elo_rows(elo, mode, source)
    criteria = sorted(rows["criterion"].unique())
    n_models = rows.groupby("criterion")["model"].nunique().max()
    fig = new_figure(4.2 * len(criteria), 1.2 + 0.35 * n_models)
    axes = fig.subplots(1, len(criteria), squeeze=False)[0]
    other = plottable(elo[(elo["mode"] != mode) & elo["mode"].isin(["bt", "paper"])])
    for ax, criterion in zip(axes, criteria, strict=True):
        part = plottable(rows[rows["criterion"] == criterion])
        part = part.sort_values(["rating", "model"], ascending=[True, False])
        x = part["rating"].to_numpy(dtype=float)
        y = np.arange(len(part), dtype=float)
        compare = other[other["criterion"] == criterion].set_index("model")
        compare = compare.reindex(part["model"])["rating"].to_numpy(dtype=float)
        shown = np.isfinite(compare)
        seeds = (pd.DataFrame(columns=["model", "rating"]) if per_seed is None
                 else per_seed[(per_seed["criterion"] == criterion)
                               & per_seed["model"].isin(part["model"])])
        row_of = dict(zip(part["model"], y, strict=True))
        span = part.rename(columns={"rating": "x", "ci_low": "x_low", "ci_high": "x_high"})
        span = pd.concat([span, pd.DataFrame({"x": compare[shown]}),
                          pd.DataFrame({"x": seeds["rating"].to_numpy(dtype=float)})])
        limits = axis_limits(span, "x")
        anchor_row = part[part["model"] == anchor]
        if not anchor_row.empty:
            ax.axvline(float(anchor_row["rating"].iloc[0]), linestyle="--", color="grey",
                       linewidth=1, gid=REFERENCE_GID)
        ax.errorbar(x, y, xerr=error_lengths(x, part["ci_low"].to_numpy(dtype=float),
                                             part["ci_high"].to_numpy(dtype=float), limits),
                    fmt="o", color="C0", capsize=3, label=mode, gid=f"mode:{mode}")
        if not seeds.empty:
            ax.plot(seeds["rating"].to_numpy(dtype=float), seeds["model"].map(row_of),
                    linestyle="none", marker="o", markersize=SEED_MARKER_SIZE, color="C0",
                    alpha=0.35, zorder=1.5, label="each seed", gid=SEEDS_GID)
        if shown.any():
            other_mode = "paper" if mode == "bt" else "bt"
            ax.plot(compare[shown], y[shown], linestyle="none", marker="o", fillstyle="none",
                    color="C1", label=f"{other_mode} (comparison)", gid=f"mode:{other_mode}")
        ax.set_yticks(y, part["model"].tolist(), fontsize=7)
        ax.set_xlim(*limits)
        ax.set_title(criterion, fontsize=9)
        ax.set_xlabel("Elo" if mode == "bt" else "Elo (paper mode)")
        ax.grid(axis="x", alpha=0.2)
        ax.legend(fontsize=7, loc="lower right")
    _not_finite_note(fig, rows)
    return fig


def figure_paths(names: Sequence[str], out: str | Path | Sequence[str | Path]
                 ) -> dict[tuple[str, str], Path]:
    """{(figure, format): path}: every figure in every format under a folder, or exactly
    the given files, each named `<figure>.<png|svg>` (the rule's declared outputs)."""
    if isinstance(out, (str, Path)):
        return {(n, fmt): Path(out) / f"{n}.{fmt}" for n in names for fmt in FORMATS}
    paths = {}
    for path in map(Path, out):
        name, fmt = path.stem, path.suffix.lstrip(".")
        if name not in names or fmt not in FORMATS:
            raise InputError(f"not a figure this step draws (figures: {', '.join(names)}; "
                             f"formats: {', '.join(FORMATS)})", path=path)
        paths[(name, fmt)] = path
    return paths


def save_figures(figures: dict[str, Figure], out: str | Path | Sequence[str | Path]
                 ) -> list[Path]:
    """Write the figures (see `figure_paths`); all files appear together or none does."""
    written = []
    # fixed SVG ids and no date: the same data gives the same file
    with matplotlib.rc_context({"svg.hashsalt": "sacpo"}), contextlib.ExitStack() as stack:
        for (name, fmt), final in figure_paths(list(figures), out).items():
            tmp = stack.enter_context(atomic_output(final))
            metadata = {"Date": None} if fmt == "svg" else {"Software": None}
            figures[name].savefig(tmp, format=fmt, dpi=150, metadata=metadata)
            written.append(final)
    return written


def _read_csv(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path=path)
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"not a readable CSV ({exc})", path=path) from None


def figures_step(
    winrate_path: str | Path,
    elo_path: str | Path,
    out: str | Path | Sequence[str | Path],
    *,
    models_path: str | Path | None = None,
    baseline: str = "sft",
    mode: str = "bt",
    x_criterion: str = "helpfulness",
    y_criterion: str = "harmlessness",
) -> list[Path]:
    """Render figure2, figure3 and elo_chart: PNG and SVG of each into a folder `out`,
    or exactly the files listed in `out` (the rule's declared outputs)."""
    info = read_model_info(models_path) if models_path is not None else None
    winrate = _read_csv(winrate_path)
    elo = _read_csv(elo_path)
    models = sorted({baseline, *winrate.get("model", []), *elo.get("model", [])})
    meta = model_info(models, info)
    styles = family_styles(meta["family"].tolist(), family_of(meta, baseline))
    figures = {
        "figure2": winrate_figure(winrate, info, baseline=baseline, x_criterion=x_criterion,
                                  y_criterion=y_criterion, source=str(winrate_path),
                                  styles=styles),
        "figure3": elo_figure(elo, info, anchor=baseline, mode=mode, x_criterion=x_criterion,
                              y_criterion=y_criterion, source=str(elo_path), styles=styles),
        "elo_chart": elo_chart(elo, anchor=baseline, mode=mode, source=str(elo_path)),
    }
    written = save_figures(figures, out)
    log.info("wrote %s", ", ".join(str(p) for p in written))
    return written


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sacpo_steps figures", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--winrate", required=True, help="winrate.csv from the winrate step")
    p.add_argument("--elo", required=True, help="elo.csv from the elo step")
    p.add_argument("--models", default=None, help="model info: CSV or JSON (model, family, "
                   "label); without it, families come from the model names")
    p.add_argument("--baseline", default="sft", help="the baseline / Elo anchor model")
    p.add_argument("--elo-mode", choices=["bt", "paper"],
                   default=default_of("evaluation.figures.elo_mode"),
                   help="which Elo to plot in figure3 and the chart")
    p.add_argument("--x-criterion", default=default_of("evaluation.figures.x_criterion"))
    p.add_argument("--y-criterion", default=default_of("evaluation.figures.y_criterion"))
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out-dir", help="write every figure as PNG and SVG here")
    out.add_argument("--out", nargs="+", help="write exactly these files, each named "
                     "<figure>.<png|svg> (figure2, figure3, elo_chart)")
    p.add_argument("--log", default=None)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    setup_logging(args.log)
    figures_step(args.winrate, args.elo, args.out or args.out_dir, models_path=args.models,
                 baseline=args.baseline, mode=args.elo_mode, x_criterion=args.x_criterion,
                 y_criterion=args.y_criterion)


if __name__ == "__main__":
    main()
