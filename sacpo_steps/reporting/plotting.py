"""Plotting primitives of the figures: the canvas, error bars, axis limits, one look
per model family, the per-family scatter, and the label placer.

Built on `matplotlib.figure.Figure` with an Agg canvas, never pyplot, so no global
backend or figure registry is touched. Artists carry gids so tests can read back
what was drawn.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Annotation
from matplotlib.transforms import Bbox

log = logging.getLogger("sacpo.figures")  # the figures step's logger: its lines keep their name

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "*")
REFERENCE_GID = "reference"
LABEL_GID = "point-label"
SEEDS_GID = "seeds"  # per-seed points: gid "seeds:<family>" (scatter) or "seeds" (chart)
MARKER_SIZE = 7.0  # points, main markers
SEED_MARKER_SIZE = 3.5  # points, faint per-seed markers


def new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas: pyplot's global state stays untouched."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def error_lengths(value: np.ndarray, low: np.ndarray, high: np.ndarray,
                  limits: tuple[float, float]) -> np.ndarray:
    """(2, n) error-bar lengths; missing CIs draw nothing, infinite ends reach the axis edge."""
    low = np.where(np.isneginf(low), limits[0], low)
    high = np.where(np.isposinf(high), limits[1], high)
    below = np.nan_to_num(value - low, nan=0.0)
    above = np.nan_to_num(high - value, nan=0.0)
    return np.clip(np.vstack([below, above]), 0.0, None)


def axis_limits(points: pd.DataFrame, axis: str, pad: float = 0.08) -> tuple[float, float]:
    """Padded limits that hold every finite value and CI end of `axis` (x or y)."""
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


def family_scatter(ax: Axes, points: pd.DataFrame, reference: tuple[float, float],
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
    xlim = axis_limits(pd.concat(frames), "x")
    ylim = axis_limits(pd.concat(frames), "y")
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
            xerr=error_lengths(x, part["x_low"].to_numpy(dtype=float),
                                part["x_high"].to_numpy(dtype=float), xlim),
            yerr=error_lengths(y, part["y_low"].to_numpy(dtype=float),
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
