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
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Annotation
from matplotlib.transforms import Bbox

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.fileio import atomic_output, read_json, setup_logging
from sacpo_steps.core.schema import default_of

log = logging.getLogger("sacpo.figures")

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "*")
FORMATS = ("png", "svg")
REFERENCE_GID = "reference"
NOT_FINITE_GID = "not-finite"
LABEL_GID = "point-label"
SEEDS_GID = "seeds"  # per-seed points: gid "seeds:<family>" (scatter) or "seeds" (chart)
MARKER_SIZE = 7.0  # points, main markers
SEED_MARKER_SIZE = 3.5  # points, faint per-seed markers
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


def _style(i: int) -> tuple[str, str]:
    return MARKERS[i % len(MARKERS)], f"C{i % 10}"


def _extend_styles(styles: dict[str, tuple[str, str]],
                   families: Sequence[str]) -> dict[str, tuple[str, str]]:
    """`styles` plus a style for each family it lacks, never one already in use.

    Restarting at the first style for the newcomers would give two families one look.
    """
    out = dict(styles)
    used = set(out.values())
    i = 0
    for family in sorted(set(families) - set(out)):
        # 12 markers x 10 colours: 60 distinct pairs before any repeats
        while _style(i) in used and i < len(MARKERS) * 10:
            i += 1
        out[family] = _style(i)
        used.add(out[family])
        i += 1
    return out


def family_styles(families: Sequence[str], first: str | None = None) -> dict[str, tuple[str, str]]:
    """(marker, colour) per family: `first` (the baseline's family), then sorted names.

    Computed once from every figure's families, so a family looks the same everywhere;
    each family gets its own (marker, colour) pair, as in the paper's Figure 2.
    """
    order = sorted(set(families) - {first})
    if first is not None and first in families:
        order.insert(0, first)
    return {f: _style(i) for i, f in enumerate(order)}


@dataclass(frozen=True)
class PointLabel:
    """A label to write next to the data point (x, y)."""

    x: float
    y: float
    text: str
    colour: str = "black"


def _point_labels(points: pd.DataFrame,
                  styles: dict[str, tuple[str, str]]) -> list[PointLabel]:
    """One label per family and exact point: coinciding models share "0.01, 0.1, 0.3".

    The label takes the family's colour, so a merged label at a point shared by
    several families still says whose it is.
    """
    merged: dict[tuple[str, float, float], list[str]] = {}
    for row in points.itertuples(index=False):
        if row.label:
            merged.setdefault((row.family, float(row.x), float(row.y)), []).append(row.label)
    return [PointLabel(x, y, ", ".join(dict.fromkeys(texts)), styles[family][1])
            for (family, x, y), texts in merged.items()]


def _markers(ax: Axes) -> list[tuple[float, float, float]]:
    """(x, y, size in points) of every marker drawn in `ax`, in display coordinates."""
    out = []
    for line in ax.lines:
        if line.get_marker() in (None, "", "None", " ") or not line.get_visible():
            continue
        xy = ax.transData.transform(np.column_stack([line.get_xdata(), line.get_ydata()]))
        out += [(float(x), float(y), float(line.get_markersize())) for x, y in xy
                if np.isfinite(x) and np.isfinite(y)]
    return out


def _errorbar_segments(ax: Axes) -> list[np.ndarray]:
    """Error-bar segments in display coordinates: a label across one is avoided if it can."""
    out = []
    for container in ax.containers:
        for collection in getattr(container, "lines", (None, None, ()))[2] or ():
            out += [ax.transData.transform(np.asarray(seg)) for seg in collection.get_segments()
                    if len(seg) == 2]
    return out


def _overlap(a: Bbox, b: Bbox) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _crosses(segment: np.ndarray, box: Bbox) -> bool:
    """Whether the segment meets the box (Liang-Barsky clipping)."""
    (x0, y0), (x1, y1) = segment
    dx, dy = x1 - x0, y1 - y0
    lo, hi = 0.0, 1.0
    for p, q in ((-dx, x0 - box.x0), (dx, box.x1 - x0), (-dy, y0 - box.y0), (dy, box.y1 - y0)):
        if p == 0:
            if q < 0:
                return False
        else:
            t = q / p
            if p < 0:
                lo = max(lo, t)
            else:
                hi = min(hi, t)
            if lo > hi:
                return False
    return True


def _square(angle: float) -> tuple[float, float]:
    """Direction `angle` (degrees) scaled onto the unit square: its box edge, not its
    centre, sits at the chosen gap from the point."""
    c, s = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
    return c / max(abs(c), abs(s)), s / max(abs(c), abs(s))


# candidate directions, most preferred first: up-right (as before), right, up, ...
_DIRECTIONS = tuple(_square(a) for a in (45, 0, 90, -45, 135, 180, -90, -135, 22.5, 67.5,
                                         -22.5, -67.5, 157.5, 112.5, -157.5, -112.5))
_RINGS = 40


def place_labels(ax: Axes, labels: Sequence[PointLabel], *, fontsize: float = 7.0,
                 pad_pt: float = 1.5) -> list[Annotation]:
    """Write `labels` next to their points so that no two overlap and none covers a marker.

    Deterministic and greedy: the layout is drawn first (call this last, after titles,
    legends and notes), then each label, most crowded point first, takes the first
    free spot on rings of growing distance around its point (16 directions per ring)
    that stays inside the axes, clear of every marker, every placed label and every
    placed leader line; crossing an error bar costs a little. A label that is not
    right next to its point gets a thin leader line to it. Labels are left out of the
    layout, so placing them cannot move the axes.
    """
    fig = ax.get_figure(root=True)
    if not labels:
        return []
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    px_per_pt = renderer.points_to_pixels(1.0)
    pad = pad_pt * px_per_pt
    area = ax.get_window_extent(renderer).padded(-1.0)
    markers = [Bbox.from_bounds(x - s * px_per_pt / 2 - pad, y - s * px_per_pt / 2 - pad,
                                s * px_per_pt + 2 * pad, s * px_per_pt + 2 * pad)
               for x, y, s in _markers(ax)]
    bars = _errorbar_segments(ax)
    anchors = [ax.transData.transform((label.x, label.y)) for label in labels]
    radius = MARKER_SIZE * px_per_pt / 2

    def crowding(i: int) -> tuple:
        near = sum(np.hypot(*(anchors[i] - (m.x0 + m.width / 2, m.y0 + m.height / 2)))
                   < 40 * px_per_pt for m in markers)
        return (-near, labels[i].x, labels[i].y, labels[i].text)

    placed: list[Bbox] = []
    leaders: list[np.ndarray] = []
    out = []
    for i in sorted(range(len(labels)), key=crowding):
        label, (px, py) = labels[i], anchors[i]
        probe = ax.annotate(label.text, (label.x, label.y), fontsize=fontsize,
                            ha="center", va="center")
        extent = probe.get_window_extent(renderer)
        probe.remove()
        half_w, half_h = extent.width / 2 + pad, extent.height / 2 + pad
        best = None
        for ring in range(_RINGS):
            gap = radius + pad + ring * max(extent.height, 4 * px_per_pt) * 0.75
            for rank, (ux, uy) in enumerate(_DIRECTIONS):
                cx, cy = px + ux * (half_w + gap), py + uy * (half_h + gap)
                box = Bbox.from_extents(cx - half_w, cy - half_h, cx + half_w, cy + half_h)
                if not (area.x0 <= box.x0 and box.x1 <= area.x1 and area.y0 <= box.y0
                        and box.y1 <= area.y1):
                    continue
                leader = ring > 0
                segment = np.array([[cx, cy], [px, py]])
                if (any(_overlap(box, other) for other in placed)
                        or any(_overlap(box, m) for m in markers)
                        or any(_crosses(s, box) for s in leaders)
                        or (leader and any(_crosses(segment, other) for other in placed))):
                    continue
                cost = ring + 2.0 * sum(_crosses(s, box) for s in bars) + rank / 100
                if best is None or cost < best[0]:
                    best = (cost, cx, cy, box, leader, segment)
            if best is not None and best[0] < ring + 1:
                break  # no later ring can beat it
        if best is None:
            log.warning("no free place for label %r: drawn on its point", label.text)
            best = (0.0, px, py, Bbox.from_extents(px, py, px, py), False, None)
        _, cx, cy, box, leader, segment = best
        arrow = (dict(arrowstyle="-", color=label.colour, linewidth=0.5, alpha=0.8,
                      shrinkA=0.0, shrinkB=MARKER_SIZE / 2) if leader else None)
        annotation = ax.annotate(
            label.text, (label.x, label.y),
            xytext=((cx - px) / px_per_pt, (cy - py) / px_per_pt), textcoords="offset points",
            ha="center", va="center", fontsize=fontsize, color=label.colour,
            arrowprops=arrow, gid=LABEL_GID)
        annotation.set_in_layout(False)
        placed.append(box)
        if leader:
            leaders.append(segment)
        out.append(annotation)
    return out


def _scatter(ax: Axes, points: pd.DataFrame, reference: tuple[float, float],
             xlabel: str, ylabel: str, styles: dict[str, tuple[str, str]],
             seed_points: pd.DataFrame | None = None) -> list[PointLabel]:
    """One errorbar series per family (label = family); returns the labels to place.

    `seed_points` (model, family, seed, x, y) are drawn small and faint in the family's
    style, without labels or legend entries. Labels are placed by `place_labels` once
    the figure is complete, because titles and notes still move the axes.
    """
    frames = [points, _reference_frame(reference)]
    if seed_points is not None and not seed_points.empty:
        frames.append(seed_points[["x", "y"]])
    xlim = _limits(pd.concat(frames), "x")
    ylim = _limits(pd.concat(frames), "y")
    ax.axvline(reference[0], linestyle="--", color="grey", linewidth=1, gid=REFERENCE_GID)
    ax.axhline(reference[1], linestyle="--", color="grey", linewidth=1, gid=REFERENCE_GID)
    families = set(points["family"])
    if seed_points is not None:
        families |= set(seed_points["family"])
    styles = _extend_styles(styles, sorted(families))
    for family in [f for f in styles if f in families]:
        marker, colour = styles[family]
        if seed_points is not None:
            seeds = seed_points[seed_points["family"] == family]
            if not seeds.empty:
                ax.plot(seeds["x"].to_numpy(dtype=float), seeds["y"].to_numpy(dtype=float),
                        linestyle="none", marker=marker, color=colour,
                        markersize=SEED_MARKER_SIZE, alpha=0.35, zorder=1.5,
                        label=f"_{SEEDS_GID}:{family}", gid=f"{SEEDS_GID}:{family}")
        part = points[points["family"] == family]
        if part.empty:
            continue
        x, y = part["x"].to_numpy(dtype=float), part["y"].to_numpy(dtype=float)
        ax.errorbar(
            x, y,
            xerr=_err(x, part["x_low"].to_numpy(dtype=float),
                      part["x_high"].to_numpy(dtype=float), xlim),
            yerr=_err(y, part["y_low"].to_numpy(dtype=float),
                      part["y_high"].to_numpy(dtype=float), ylim),
            fmt=marker, color=colour, markersize=MARKER_SIZE, capsize=2,
            elinewidth=0.8, alpha=0.9, label=family, gid=f"family:{family}")
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    # outside the axes: a legend inside could cover points or labels
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    ax.grid(alpha=0.2)
    return _point_labels(points, styles)


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


def _seed_key(value: object) -> str | int | None:
    """"all", an integer seed, or None (not a seed); CSV cells may be "3", 3 or 3.0."""
    text = str(value).strip()
    if text.lower() == "all":
        return "all"
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if np.isfinite(number) and number == int(number) else None


def split_seeds(table: pd.DataFrame, source: str) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(rows to plot, per-seed rows or None) of a table that may carry a `seed` column.

    With "all" rows (the across-seed summary) those are plotted and the integer-seed
    rows come back separately for the faint per-seed markers. A single seed without
    an "all" row is plotted as it is; several seeds without one are an error, since
    the across-seed interval is not ours to invent.
    """
    if "seed" not in table.columns:
        return table, None
    keys = table["seed"].map(_seed_key)
    bad = table.loc[keys.isna(), "seed"].unique().tolist()
    if bad:
        raise InputError(f"seed must be an integer or 'all', got {bad}", path=source,
                         field="seed")
    table = table.assign(seed=keys.astype(object))
    is_all = (keys == "all").to_numpy(dtype=bool)
    if not is_all.any():
        if keys.nunique() > 1:
            raise InputError(f"several seeds {sorted(keys.unique())} but no 'all' rows "
                             "(the across-seed summary)", path=source, field="seed")
        return table, None
    return table[is_all], table[~is_all]


def _seed_points(rows: pd.DataFrame | None, value: str, x_criterion: str, y_criterion: str,
                 source: str, info: pd.DataFrame | None) -> pd.DataFrame | None:
    """Per-seed (model, seed, x, y, family); a seed lacking a criterion is left out."""
    if rows is None or rows.empty:
        return None
    rows = rows[rows["criterion"].isin([x_criterion, y_criterion])]
    twice = rows[rows.duplicated(["model", "seed", "criterion"])]
    if not twice.empty:
        raise InputError("models listed twice for a seed and criterion: "
                         f"{sorted(set(twice['model']))}", path=source, field="model")
    wide = rows.pivot(index=["model", "seed"], columns="criterion", values=value)
    wide = wide.reindex(columns=[x_criterion, y_criterion]).astype(float)
    wide.columns = ["x", "y"]
    wide = wide[np.isfinite(wide.to_numpy()).all(axis=1)].reset_index()
    if wide.empty:
        return None
    meta = model_info(sorted(set(wide["model"])), info)
    return wide.merge(meta[["model", "family"]], on="model", how="left")


def _seed_count(rows: pd.DataFrame | None) -> int:
    return 0 if rows is None else int(rows["seed"].nunique())


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
    _check_columns(winrate, ("model", "criterion", "win_rate", "ci_low", "ci_high"), source)
    winrate, per_seed = split_seeds(winrate, source)
    points = _two_criteria(winrate, "win_rate", x_criterion, y_criterion, source)
    points = points[points["model"] != baseline]
    nan = float("nan")
    base = pd.DataFrame([{"model": baseline, "x": 0.5, "y": 0.5, "x_low": nan, "x_high": nan,
                          "y_low": nan, "y_high": nan}])
    points = _with_info(pd.concat([base, points], ignore_index=True), info)
    if per_seed is not None:
        per_seed = per_seed[per_seed["model"] != baseline]
    seeds = _seed_points(per_seed, "win_rate", x_criterion, y_criterion, source, info)
    styles = styles or family_styles(points["family"].tolist(), _family_of(points, baseline))
    fig = _new_figure(6.5, 5.0)
    ax = fig.add_subplot()
    labels = _scatter(ax, points, (0.5, 0.5), f"{x_criterion} win rate vs {baseline}",
                      f"{y_criterion} win rate vs {baseline}", styles, seeds)
    if _seed_count(per_seed) > 1:  # one seed's "all" row keeps its bootstrap CI
        title = (f"Win rate vs {baseline}, mean over {_seed_count(per_seed)} seeds "
                 "(error bars: across-seed interval; faint: each seed)")
    else:
        title = f"Win rate vs {baseline} (error bars: bootstrap CI over prompts)"
    ax.set_title(title, fontsize=9)
    place_labels(ax, labels)
    return fig


def _elo_rows(elo: pd.DataFrame, mode: str,
              source: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    """(all rows to plot, their `mode` rows, that mode's per-seed rows or None)."""
    _check_columns(elo, ("criterion", "mode", "model", "rating", "ci_low", "ci_high"), source)
    elo, per_seed = split_seeds(elo, source)
    rows = elo[elo["mode"] == mode]
    if rows.empty:
        raise InputError(f"no rows with mode {mode!r}", path=source, field="mode")
    if per_seed is not None:
        per_seed = _plottable(per_seed[per_seed["mode"] == mode])
    return elo, rows, per_seed


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
    """Figure 3: helpfulness vs harmlessness Elo (one `mode`), reference lines at the anchor.

    With a `seed` column the "all" rows are plotted and each seed's point is drawn faint.
    """
    _, rows, per_seed = _elo_rows(elo, mode, source)
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
    seeds = _seed_points(per_seed, "rating", x_criterion, y_criterion, source, info)
    styles = styles or family_styles(points["family"].tolist(), _family_of(points, anchor))
    fig = _new_figure(6.5, 5.0)
    ax = fig.add_subplot()
    labels = _scatter(ax, points, reference, f"{x_criterion} Elo", f"{y_criterion} Elo",
                      styles, seeds)
    if _seed_count(per_seed) > 1:  # one seed's "all" row keeps its bootstrap CI
        what = (f"{'Bradley-Terry' if mode == 'bt' else 'paper-mode online'} Elo, mean over "
                f"{_seed_count(per_seed)} seeds (across-seed interval; faint: each seed)")
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
    elo, rows, per_seed = _elo_rows(elo, mode, source)
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
        seeds = (pd.DataFrame(columns=["model", "rating"]) if per_seed is None
                 else per_seed[(per_seed["criterion"] == criterion)
                               & per_seed["model"].isin(part["model"])])
        row_of = dict(zip(part["model"], y, strict=True))
        span = part.rename(columns={"rating": "x", "ci_low": "x_low", "ci_high": "x_high"})
        span = pd.concat([span, pd.DataFrame({"x": compare[shown]}),
                          pd.DataFrame({"x": seeds["rating"].to_numpy(dtype=float)})])
        limits = _limits(span, "x")
        anchor_row = part[part["model"] == anchor]
        if not anchor_row.empty:
            ax.axvline(float(anchor_row["rating"].iloc[0]), linestyle="--", color="grey",
                       linewidth=1, gid=REFERENCE_GID)
        ax.errorbar(x, y, xerr=_err(x, part["ci_low"].to_numpy(dtype=float),
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
    styles = family_styles(meta["family"].tolist(), _family_of(meta, baseline))
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
