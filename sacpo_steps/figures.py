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
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sacpo_steps.errors import InputError
from sacpo_steps.fileio import atomic_output, read_json, setup_logging

log = logging.getLogger("sacpo.figures")

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "*")
FORMATS = ("png", "svg")
REFERENCE_GID = "reference"
NOT_FINITE_GID = "not-finite"
_NUMBER_SUFFIX = re.compile(r"^(?P<family>.+)-(?P<label>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")


def _fallback(model: str) -> tuple[str, str]:
    match = _NUMBER_SUFFIX.match(model)
    if match:
        return match["family"], match["label"]
    return model, ""


def read_model_info(path: str | Path) -> pd.DataFrame:
    """Read a model info file (CSV or JSON) into columns model, family, label."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path=path)
    if path.suffix.lower() == ".json":
        data = read_json(path)
        if isinstance(data, dict):
            records = [{"model": m, **(v if isinstance(v, dict) else {"family": v})}
                       for m, v in data.items()]
        elif isinstance(data, list) and all(isinstance(r, dict) for r in data):
            records = data
        else:
            raise InputError("expected an object or a list of objects", path=path)
        table = pd.DataFrame.from_records(records)
    else:
        try:
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
            raise InputError(f"not a readable CSV ({exc})", path=path) from None
    for column in ("model", "family"):
        if column not in table.columns:
            raise InputError("missing column", path=path, field=column)
    if "label" not in table.columns:
        table["label"] = ""
    table = table[["model", "family", "label"]].fillna("").astype(str)
    duplicated = table["model"][table["model"].duplicated()].tolist()
    if duplicated:
        raise InputError(f"models listed twice: {duplicated}", path=path, field="model")
    return table


def model_info(models: Sequence[str], info: pd.DataFrame | None = None) -> pd.DataFrame:
    """Family and label for each of `models`, from `info` where given, else the fallback."""
    known = {} if info is None else {r.model: (r.family, r.label)
                                     for r in info.itertuples(index=False)}
    missing = [m for m in models if m not in known]
    if info is not None and missing:
        log.warning("model info lacks %s: family taken from the name", missing)
    rows = [(m, *known.get(m, _fallback(m))) for m in models]
    return pd.DataFrame(rows, columns=["model", "family", "label"])


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _err(value: np.ndarray, low: np.ndarray, high: np.ndarray,
         limits: tuple[float, float]) -> np.ndarray:
    """(2, n) error-bar lengths; missing CIs draw nothing, infinite ends reach the axis edge."""
    low = np.where(np.isneginf(low), limits[0], low)
    high = np.where(np.isposinf(high), limits[1], high)
    below = np.nan_to_num(value - low, nan=0.0)
    above = np.nan_to_num(high - value, nan=0.0)
    return np.clip(np.vstack([below, above]), 0.0, None)


def _limits(points: pd.DataFrame, axis: str, pad: float = 0.08) -> tuple[float, float]:
    values = points[[axis, f"{axis}_low", f"{axis}_high"]].to_numpy(dtype=float).ravel()
    values = values[np.isfinite(values)]
    if not len(values):
        return 0.0, 1.0
    lo, hi = float(values.min()), float(values.max())
    span = hi - lo or max(abs(hi), 1.0) * 0.1
    return lo - pad * span, hi + pad * span


def family_styles(families: Sequence[str], first: str | None = None) -> dict[str, tuple[str, str]]:
    """(marker, colour) per family: `first` (the baseline's family), then sorted names.

    Computed once from every figure's families, so a family looks the same everywhere.
    """
    order = sorted(set(families) - {first})
    if first is not None and first in families:
        order.insert(0, first)
    return {f: (MARKERS[i % len(MARKERS)], f"C{i % 10}") for i, f in enumerate(order)}


def _scatter(ax: Axes, points: pd.DataFrame, reference: tuple[float, float],
             xlabel: str, ylabel: str, styles: dict[str, tuple[str, str]]) -> None:
    """One errorbar series per family (label = family), labels next to the points."""
    xlim = _limits(pd.concat([points, _reference_frame(reference)]), "x")
    ylim = _limits(pd.concat([points, _reference_frame(reference)]), "y")
    ax.axvline(reference[0], linestyle="--", color="grey", linewidth=1, gid=REFERENCE_GID)
    ax.axhline(reference[1], linestyle="--", color="grey", linewidth=1, gid=REFERENCE_GID)
    missing = sorted(set(points["family"]) - set(styles))
    styles = {**styles, **family_styles(missing)} if missing else styles
    for family in [f for f in styles if f in set(points["family"])]:
        marker, colour = styles[family]
        part = points[points["family"] == family]
        x, y = part["x"].to_numpy(dtype=float), part["y"].to_numpy(dtype=float)
        ax.errorbar(
            x, y,
            xerr=_err(x, part["x_low"].to_numpy(dtype=float),
                      part["x_high"].to_numpy(dtype=float), xlim),
            yerr=_err(y, part["y_low"].to_numpy(dtype=float),
                      part["y_high"].to_numpy(dtype=float), ylim),
            fmt=marker, color=colour, markersize=7, capsize=2,
            elinewidth=0.8, alpha=0.9, label=family, gid=f"family:{family}")
        for px, py, text in zip(x, y, part["label"], strict=True):
            if text:
                ax.annotate(text, (px, py), xytext=(4, 4), textcoords="offset points",
                            fontsize=7)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.2)


def _reference_frame(reference: tuple[float, float]) -> pd.DataFrame:
    nan = float("nan")
    return pd.DataFrame([{"x": reference[0], "y": reference[1], "x_low": nan, "x_high": nan,
                          "y_low": nan, "y_high": nan}])


def _two_criteria(table: pd.DataFrame, value: str, x_criterion: str,
                  y_criterion: str, source: str) -> pd.DataFrame:
    """Rows per model with x / y values and CI ends, from a long table with `criterion`."""
    for criterion in (x_criterion, y_criterion):
        if not (table["criterion"] == criterion).any():
            raise InputError(f"no rows for criterion {criterion!r}", path=source,
                             field="criterion")
    twice = table[table.duplicated(["model", "criterion"])]
    if not twice.empty:
        raise InputError(f"models listed twice for a criterion: {twice['model'].tolist()}",
                         path=source, field="model")
    parts = []
    for axis, criterion in (("x", x_criterion), ("y", y_criterion)):
        part = table[table["criterion"] == criterion].set_index("model")
        parts.append(pd.DataFrame({axis: part[value], f"{axis}_low": part["ci_low"],
                                   f"{axis}_high": part["ci_high"]}))
    both = pd.concat(parts, axis=1, join="outer")
    incomplete = both.index[both[["x", "y"]].isna().any(axis=1)].tolist()
    if incomplete:
        log.warning("not plotted (a criterion is missing or has no value): %s", incomplete)
    both = both.drop(index=incomplete)
    return both.rename_axis("model").reset_index()


def _with_info(points: pd.DataFrame, info: pd.DataFrame | None) -> pd.DataFrame:
    meta = model_info(points["model"].tolist(), info)
    return points.merge(meta, on="model", how="left", validate="one_to_one")


def _family_of(points: pd.DataFrame, model: str) -> str | None:
    match = points.loc[points["model"] == model, "family"]
    return str(match.iloc[0]) if len(match) else None


def _check_columns(table: pd.DataFrame, columns: Sequence[str], source: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"missing columns {missing}", path=source)


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

    The baseline has no row in the win-rate table; it is drawn at (0.5, 0.5).
    """
    _check_columns(winrate, ("model", "criterion", "win_rate", "ci_low", "ci_high"), source)
    points = _two_criteria(winrate, "win_rate", x_criterion, y_criterion, source)
    points = points[points["model"] != baseline]
    nan = float("nan")
    base = pd.DataFrame([{"model": baseline, "x": 0.5, "y": 0.5, "x_low": nan, "x_high": nan,
                          "y_low": nan, "y_high": nan}])
    points = _with_info(pd.concat([base, points], ignore_index=True), info)
    styles = styles or family_styles(points["family"].tolist(), _family_of(points, baseline))
    fig = _new_figure(6.5, 5.0)
    ax = fig.add_subplot()
    _scatter(ax, points, (0.5, 0.5), f"{x_criterion} win rate vs {baseline}",
             f"{y_criterion} win rate vs {baseline}", styles)
    ax.set_title(f"Win rate vs {baseline} (error bars: bootstrap CI over prompts)", fontsize=9)
    return fig


def _elo_rows(elo: pd.DataFrame, mode: str, source: str) -> pd.DataFrame:
    _check_columns(elo, ("criterion", "mode", "model", "rating", "ci_low", "ci_high"), source)
    rows = elo[elo["mode"] == mode]
    if rows.empty:
        raise InputError(f"no rows with mode {mode!r}", path=source, field="mode")
    return rows


def _invalid(rows: pd.DataFrame) -> np.ndarray:
    """Rows the elo step marked invalid (`valid` False: paper mode with a bad rescale)."""
    if "valid" not in rows.columns:
        return np.zeros(len(rows), dtype=bool)
    # read back from CSV the column may be bool, or text when some cells are empty
    valid = rows["valid"].map(lambda v: pd.isna(v) or str(v).strip().lower() in ("true", "1"))
    return ~valid.to_numpy(dtype=bool)


def _plottable(rows: pd.DataFrame) -> pd.DataFrame:
    """Valid rows with a finite rating."""
    return rows[~_invalid(rows) & np.isfinite(rows["rating"].to_numpy(dtype=float))]


def _not_finite_note(fig: Figure, rows: pd.DataFrame) -> None:
    """Say under the figure which models are not shown: rating not finite, or invalid."""
    invalid = _invalid(rows)
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
    """Figure 3: helpfulness vs harmlessness Elo (one `mode`), reference lines at the anchor."""
    rows = _elo_rows(elo, mode, source)
    both = rows[rows["criterion"].isin([x_criterion, y_criterion])]
    anchor_invalid = _invalid(both[both["model"] == anchor]).any()
    if anchor_invalid and set(both["criterion"]) == {x_criterion, y_criterion}:
        # the anchor's rating is invalid (paper mode), so is its whole criterion: an
        # empty figure that says why
        fig = _new_figure(6.5, 5.0)
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.set_title("paper-mode online Elo (compatibility): invalid, not plotted", fontsize=9)
        _not_finite_note(fig, both)
        return fig
    points = _with_info(_two_criteria(_plottable(rows), "rating", x_criterion, y_criterion,
                                      source), info)
    anchor_rows = points[points["model"] == anchor]
    if anchor_rows.empty:
        raise InputError(f"anchor {anchor!r} missing in criteria {x_criterion!r}, "
                         f"{y_criterion!r}", path=source, field="model")
    reference = (float(anchor_rows["x"].iloc[0]), float(anchor_rows["y"].iloc[0]))
    styles = styles or family_styles(points["family"].tolist(), _family_of(points, anchor))
    fig = _new_figure(6.5, 5.0)
    ax = fig.add_subplot()
    _scatter(ax, points, reference, f"{x_criterion} Elo", f"{y_criterion} Elo", styles)
    what = ("Bradley-Terry Elo, bootstrap CI" if mode == "bt"
            else "paper-mode online Elo (compatibility)")
    ax.set_title(f"{what}; {anchor} = {reference[0]:g}", fontsize=9)
    _not_finite_note(fig, rows[rows["criterion"].isin([x_criterion, y_criterion])])
    return fig


def elo_chart(elo: pd.DataFrame, *, anchor: str = "sft", mode: str = "bt",
              source: str = "elo table") -> Figure:
    """Per criterion, every model's Elo with its interval, best at the top.

    The other mode, when the table has it, is overlaid as hollow markers for comparison.
    """
    rows = _elo_rows(elo, mode, source)
    criteria = sorted(rows["criterion"].unique())
    n_models = rows.groupby("criterion")["model"].nunique().max()
    fig = _new_figure(4.2 * len(criteria), 1.2 + 0.35 * n_models)
    axes = fig.subplots(1, len(criteria), squeeze=False)[0]
    other = _plottable(elo[(elo["mode"] != mode) & elo["mode"].isin(["bt", "paper"])])
    for ax, criterion in zip(axes, criteria, strict=True):
        part = _plottable(rows[rows["criterion"] == criterion])
        part = part.sort_values(["rating", "model"], ascending=[True, False])
        x = part["rating"].to_numpy(dtype=float)
        y = np.arange(len(part), dtype=float)
        compare = other[other["criterion"] == criterion].set_index("model")
        compare = compare.reindex(part["model"])["rating"].to_numpy(dtype=float)
        shown = np.isfinite(compare)
        span = part.rename(columns={"rating": "x", "ci_low": "x_low", "ci_high": "x_high"})
        span = pd.concat([span, pd.DataFrame({"x": compare[shown]})])
        limits = _limits(span, "x")
        anchor_row = part[part["model"] == anchor]
        if not anchor_row.empty:
            ax.axvline(float(anchor_row["rating"].iloc[0]), linestyle="--", color="grey",
                       linewidth=1, gid=REFERENCE_GID)
        ax.errorbar(x, y, xerr=_err(x, part["ci_low"].to_numpy(dtype=float),
                                    part["ci_high"].to_numpy(dtype=float), limits),
                    fmt="o", color="C0", capsize=3, label=mode, gid=f"mode:{mode}")
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


def save_figures(figures: dict[str, Figure], out_dir: str | Path) -> list[Path]:
    """Write each figure as PNG and SVG; all files appear together or none does."""
    out_dir = Path(out_dir)
    written = []
    # fixed SVG ids and no date: the same data gives the same file
    with matplotlib.rc_context({"svg.hashsalt": "sacpo"}), contextlib.ExitStack() as stack:
        for name, fig in figures.items():
            for fmt in FORMATS:
                final = out_dir / f"{name}.{fmt}"
                tmp = stack.enter_context(atomic_output(final))
                metadata = {"Date": None} if fmt == "svg" else {"Software": None}
                fig.savefig(tmp, format=fmt, dpi=150, metadata=metadata)
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
    out_dir: str | Path,
    *,
    models_path: str | Path | None = None,
    baseline: str = "sft",
    mode: str = "bt",
    x_criterion: str = "helpfulness",
    y_criterion: str = "harmlessness",
) -> list[Path]:
    """Render figure2, figure3 and elo_chart (PNG and SVG) into `out_dir`."""
    info = read_model_info(models_path) if models_path is not None else None
    winrate = _read_csv(winrate_path)
    elo = _read_csv(elo_path)
    models = sorted({baseline, *winrate.get("model", []), *elo.get("model", [])})
    meta = model_info(models, info)
    styles = family_styles(meta["family"].tolist(), _family_of(meta, baseline))
    figures = {
        "figure2": winrate_figure(winrate, info, baseline=baseline, x_criterion=x_criterion,
                                  y_criterion=y_criterion, source=str(winrate_path),
                                  styles=styles),
        "figure3": elo_figure(elo, info, anchor=baseline, mode=mode, x_criterion=x_criterion,
                              y_criterion=y_criterion, source=str(elo_path), styles=styles),
        "elo_chart": elo_chart(elo, anchor=baseline, mode=mode, source=str(elo_path)),
    }
    written = save_figures(figures, out_dir)
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
    p.add_argument("--elo-mode", choices=["bt", "paper"], default="bt",
                   help="which Elo to plot in figure3 and the chart")
    p.add_argument("--x-criterion", default="helpfulness")
    p.add_argument("--y-criterion", default="harmlessness")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--log", default=None)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    setup_logging(args.log)
    figures_step(args.winrate, args.elo, args.out_dir, models_path=args.models,
                 baseline=args.baseline, mode=args.elo_mode, x_criterion=args.x_criterion,
                 y_criterion=args.y_criterion)


if __name__ == "__main__":
    main()
