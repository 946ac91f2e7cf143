"""Figures 2 and 3 and the Elo chart: plotted values read back from the artists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from sacpo_steps.core.errors import InputError
from sacpo_steps.reporting import figure_inputs, figures, plotting

WINRATE = pd.DataFrame([
    # model, criterion, win_rate, ci_low, ci_high
    ("dpo_h", "helpfulness", 0.79, 0.72, 0.85), ("dpo_h", "harmlessness", 0.49, 0.41, 0.57),
    ("dpo_h.dpo_s-0.01", "helpfulness", 0.63, 0.55, 0.70),
    ("dpo_h.dpo_s-0.01", "harmlessness", 0.79, 0.73, 0.86),
    ("dpo_h.dpo_s-0.1", "helpfulness", 0.73, 0.66, 0.80),
    ("dpo_h.dpo_s-0.1", "harmlessness", 0.57, 0.50, 0.65),
    ("p_sacpo-0.5", "helpfulness", 0.79, 0.73, 0.84),
    ("p_sacpo-0.5", "harmlessness", 0.65, 0.58, 0.72),
], columns=["model", "criterion", "win_rate", "ci_low", "ci_high"])

INFO = pd.DataFrame([
    ("sft", "SFT", ""), ("dpo_h", "DPO(H)", "0.1"),
    ("dpo_h.dpo_s-0.01", "DPO(H)->DPO(S)", "0.01"), ("dpo_h.dpo_s-0.1", "DPO(H)->DPO(S)", "0.1"),
    ("p_sacpo-0.5", "P-SACPO", "q=0.5"),
], columns=["model", "family", "label"])


def elo_rows() -> pd.DataFrame:
    rows = []
    values = {  # model: (helpfulness, harmlessness) ratings
        "sft": (1000.0, 1000.0), "dpo_h": (1180.0, 995.0), "dpo_h.dpo_s-0.01": (1060.0, 1190.0),
        "dpo_h.dpo_s-0.1": (1120.0, 1050.0), "p_sacpo-0.5": (1175.0, 1100.0)}
    for model, (help_, harm) in values.items():
        for criterion, value in (("helpfulness", help_), ("harmlessness", harm)):
            width = 0.0 if model == "sft" else 30.0
            rows.append({"criterion": criterion, "mode": "bt", "model": model, "rating": value,
                         "ci_low": value - width, "ci_high": value + width * 1.5,
                         "status": "finite", "trial_std": np.nan})
            rows.append({"criterion": criterion, "mode": "paper", "model": model,
                         "rating": value * 1.1 if model != "sft" else 1000.0, "ci_low": np.nan,
                         "ci_high": np.nan, "status": "finite", "trial_std": 20.0})
    return pd.DataFrame(rows)


def series(ax, family: str) -> tuple[np.ndarray, np.ndarray, ErrorbarContainer]:
    """(x, y, container) of the errorbar series labelled `family`."""
    for container in ax.containers:
        if isinstance(container, ErrorbarContainer) and container.get_label() == family:
            line = container.lines[0]
            return np.asarray(line.get_xdata()), np.asarray(line.get_ydata()), container
    raise AssertionError(f"no series {family!r}; have {[c.get_label() for c in ax.containers]}")


def bar_ends(container: ErrorbarContainer) -> tuple[np.ndarray, np.ndarray]:
    """(x ends, y ends) of the error bars, each (n, 2): [low, high] per point."""
    xcol, ycol = container.lines[2]
    xs = np.array([[seg[0][0], seg[1][0]] for seg in xcol.get_segments()])
    ys = np.array([[seg[0][1], seg[1][1]] for seg in ycol.get_segments()])
    return np.sort(xs, axis=1), np.sort(ys, axis=1)


def reference_lines(ax) -> list:
    return [line for line in ax.lines if line.get_gid() == plotting.REFERENCE_GID]


def expected_points(table: pd.DataFrame, value: str, models: list[str]) -> pd.DataFrame:
    wide = table.pivot(index="model", columns="criterion", values=[value, "ci_low", "ci_high"])
    return wide.loc[models]


def test_figure2_points_error_bars_reference_lines_and_labels():
    fig = figures.winrate_figure(WINRATE, INFO)
    ax = fig.axes[0]
    expected = expected_points(WINRATE, "win_rate", ["dpo_h.dpo_s-0.01", "dpo_h.dpo_s-0.1"])
    x, y, container = series(ax, "DPO(H)->DPO(S)")
    np.testing.assert_allclose(x, expected[("win_rate", "helpfulness")])
    np.testing.assert_allclose(y, expected[("win_rate", "harmlessness")])
    xs, ys = bar_ends(container)
    np.testing.assert_allclose(xs[:, 0], expected[("ci_low", "helpfulness")])
    np.testing.assert_allclose(xs[:, 1], expected[("ci_high", "helpfulness")])
    np.testing.assert_allclose(ys[:, 0], expected[("ci_low", "harmlessness")])
    np.testing.assert_allclose(ys[:, 1], expected[("ci_high", "harmlessness")])
    x, y, _ = series(ax, "P-SACPO")
    assert (x[0], y[0]) == (0.79, 0.65)
    x, y, _ = series(ax, "SFT")  # the baseline, not in the table, sits at (0.5, 0.5)
    assert (x[0], y[0]) == (0.5, 0.5)
    refs = reference_lines(ax)
    assert len(refs) == 2 and all(line.get_linestyle() == "--" for line in refs)
    assert sorted(tuple(np.unique(line.get_xdata() if i == 0 else line.get_ydata()))
                  for i, line in enumerate(refs)) == [(0.5,), (0.5,)]
    texts = {t.get_text() for t in ax.texts}
    assert {"0.01", "0.1", "q=0.5"} <= texts
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {
        "SFT", "DPO(H)", "DPO(H)->DPO(S)", "P-SACPO"}


def test_figure2_fallback_families_come_from_the_names():
    fig = figures.winrate_figure(WINRATE)
    ax = fig.axes[0]
    x, _, _ = series(ax, "dpo_h.dpo_s")
    assert list(x) == [0.63, 0.73]
    assert {"0.01", "0.1", "0.5"} <= {t.get_text() for t in ax.texts}
    series(ax, "sft")
    series(ax, "p_sacpo")


def test_figure2_needs_both_criteria():
    with pytest.raises(InputError, match="harmlessness"):
        figures.winrate_figure(WINRATE[WINRATE.criterion == "helpfulness"])


def test_figure3_uses_the_chosen_elo_mode_and_the_anchor_lines():
    table = elo_rows()
    fig = figures.elo_figure(table, INFO, mode="bt")
    ax = fig.axes[0]
    bt = table[table["mode"] == "bt"]
    expected = expected_points(bt, "rating", ["dpo_h.dpo_s-0.01", "dpo_h.dpo_s-0.1"])
    x, y, container = series(ax, "DPO(H)->DPO(S)")
    np.testing.assert_allclose(x, expected[("rating", "helpfulness")])
    np.testing.assert_allclose(y, expected[("rating", "harmlessness")])
    xs, ys = bar_ends(container)
    np.testing.assert_allclose(xs, expected[["ci_low", "ci_high"]].xs("helpfulness", axis=1,
                                                                       level=1))
    np.testing.assert_allclose(ys, expected[["ci_low", "ci_high"]].xs("harmlessness", axis=1,
                                                                       level=1))
    x, y, _ = series(ax, "SFT")
    assert (x[0], y[0]) == (1000.0, 1000.0)
    assert all(1000.0 in line.get_xdata() or 1000.0 in line.get_ydata()
               for line in reference_lines(ax))
    paper = figures.elo_figure(table, INFO, mode="paper").axes[0]
    x, _, _ = series(paper, "P-SACPO")
    assert x[0] == pytest.approx(1175.0 * 1.1)


def test_infinite_ratings_are_not_plotted_and_infinite_ci_ends_reach_the_edge():
    table = elo_rows()
    champ = (table["model"] == "dpo_h") & (table["criterion"] == "helpfulness")
    table.loc[champ & (table["mode"] == "bt"), ["rating", "ci_low", "ci_high"]] = np.inf
    open_end = ((table["model"] == "p_sacpo-0.5") & (table["criterion"] == "helpfulness")
                & (table["mode"] == "bt"))
    table.loc[open_end, "ci_high"] = np.inf
    fig = figures.elo_figure(table, INFO)
    ax = fig.axes[0]
    assert "DPO(H)" not in [c.get_label() for c in ax.containers]
    note = [t for t in fig.findobj() if getattr(t, "get_gid", lambda: None)()
            == figures.NOT_FINITE_GID]
    assert note and "dpo_h" in note[0].get_text()
    _, _, container = series(ax, "P-SACPO")
    xs, _ = bar_ends(container)
    assert xs[0, 1] == pytest.approx(ax.get_xlim()[1])


def invalid_paper_rows(table: pd.DataFrame, criterion: str, reason: str,
                       models: list[str] | None = None) -> pd.DataFrame:
    """Mark paper rows invalid as the elo step writes them (no rating, a reason)."""
    table = table.assign(valid=True, invalid_reason="")
    rows = (table["mode"] == "paper") & (table["criterion"] == criterion)
    if models is not None:
        rows &= table["model"].isin(models)
    table.loc[rows, ["rating", "trial_std"]] = np.nan
    table.loc[rows, "valid"] = False
    table.loc[rows, "status"] = "invalid"
    table.loc[rows, "invalid_reason"] = reason
    return table


def note_text(fig) -> str:
    notes = [t for t in fig.findobj() if getattr(t, "get_gid", lambda: None)()
             == figures.NOT_FINITE_GID]
    return notes[0].get_text() if notes else ""


def test_invalid_paper_rows_are_not_plotted(tmp_path: Path):
    reason = "baseline 'sft' has a raw online rating <= 0"
    table = invalid_paper_rows(elo_rows(), "helpfulness", reason)
    # read back from CSV, as the figures step does
    table.to_csv(tmp_path / "elo.csv", index=False)
    table = pd.read_csv(tmp_path / "elo.csv")
    fig = figures.elo_figure(table, INFO, mode="paper")
    ax = fig.axes[0]
    assert not ax.containers and "invalid" in ax.get_title()
    assert "not shown (invalid)" in note_text(fig) and "<= 0" in note_text(fig)
    # the bt figure is untouched; the chart overlays no invalid paper rating
    assert figures.elo_figure(table, INFO, mode="bt").axes[0].containers
    chart = figures.elo_chart(table, mode="bt")
    by_title = {ax.get_title(): ax for ax in chart.axes}
    assert not [line for line in by_title["helpfulness"].lines
                if line.get_gid() == "mode:paper"]
    assert [line for line in by_title["harmlessness"].lines if line.get_gid() == "mode:paper"]
    paper_chart = figures.elo_chart(table, mode="paper")
    helpful = {ax.get_title(): ax for ax in paper_chart.axes}["helpfulness"]
    assert not [t.get_text() for t in helpful.get_yticklabels()]
    assert "not shown (invalid)" in note_text(paper_chart)


def test_models_with_an_invalid_paper_rating_are_left_out_the_others_plotted():
    reason = "the multiplicative rescale reverses its order against ['dpo_h.dpo_s-0.1']"
    table = invalid_paper_rows(elo_rows(), "helpfulness", reason, ["p_sacpo-0.5"])
    fig = figures.elo_figure(table, INFO, mode="paper")
    labels = [c.get_label() for c in fig.axes[0].containers]
    assert "P-SACPO" not in labels and "DPO(H)->DPO(S)" in labels and "SFT" in labels
    assert "p_sacpo-0.5 (helpfulness: the multiplicative rescale" in note_text(fig)


def test_elo_chart_one_panel_per_criterion_sorted_with_intervals():
    table = elo_rows()
    fig = figures.elo_chart(table, mode="bt")
    assert [ax.get_title() for ax in fig.axes] == ["harmlessness", "helpfulness"]
    for ax in fig.axes:
        part = table[(table["mode"] == "bt") & (table.criterion == ax.get_title())]
        part = part.sort_values("rating")
        assert [t.get_text() for t in ax.get_yticklabels()] == part.model.tolist()
        x, y, container = series(ax, "bt")
        np.testing.assert_allclose(x, part.rating)
        xcol = container.lines[2][0]
        ends = np.sort(np.array([[s[0][0], s[1][0]] for s in xcol.get_segments()]), axis=1)
        np.testing.assert_allclose(ends, part[["ci_low", "ci_high"]].to_numpy())
        (ref,) = reference_lines(ax)
        assert set(ref.get_xdata()) == {1000.0}
        paper = [line for line in ax.lines if line.get_gid() == "mode:paper"]
        assert len(paper) == 1
        other = table[(table["mode"] == "paper") & (table.criterion == ax.get_title())]
        np.testing.assert_allclose(paper[0].get_xdata(),
                                   other.set_index("model").loc[part.model, "rating"])


def test_model_info_files(tmp_path: Path):
    as_dict = tmp_path / "models.json"
    as_dict.write_text(json.dumps({"a": {"family": "F", "label": "0.1"}, "b": "G"}))
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps([{"model": "a", "family": "F", "label": "0.1"},
                                   {"model": "b", "family": "G"}]))
    as_csv = tmp_path / "models.csv"
    as_csv.write_text("model,family,label\na,F,0.1\nb,G,\n")
    for path in (as_dict, as_list, as_csv):
        info = figure_inputs.read_model_info(path)
        meta = figure_inputs.model_info(["a", "b", "c-0.25"], info)
        assert meta.values.tolist() == [["a", "F", "0.1"], ["b", "G", ""], ["c-0.25", "c", "0.25"]]
    bad = tmp_path / "bad.csv"
    bad.write_text("name,family\na,F\n")
    with pytest.raises(InputError) as err:
        figure_inputs.read_model_info(bad)
    assert err.value.field == "model"
    twice = tmp_path / "twice.csv"
    twice.write_text("model,family\na,F\na,G\n")
    with pytest.raises(InputError, match="twice"):
        figure_inputs.read_model_info(twice)


def test_cli_writes_six_nontrivial_files_reproducibly(tmp_path: Path):
    winrate_csv, elo_csv = tmp_path / "winrate.csv", tmp_path / "elo.csv"
    WINRATE.to_csv(winrate_csv, index=False)
    elo_rows().to_csv(elo_csv, index=False)
    models = tmp_path / "models.csv"
    INFO.to_csv(models, index=False)
    out = tmp_path / "figures"
    args = ["--winrate", str(winrate_csv), "--elo", str(elo_csv), "--models", str(models),
            "--out-dir", str(out), "--log", str(tmp_path / "figures.log")]
    figures.main(args)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{n}.{ext}" for n in ("figure2", "figure3", "elo_chart")
                           for ext in ("png", "svg"))
    assert all((out / n).stat().st_size > 5000 for n in names)
    assert (out / "figure2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = (out / "figure2.svg").read_bytes()
    figures.main(args)
    assert (out / "figure2.svg").read_bytes() == first


def test_cli_failure_writes_nothing(tmp_path: Path):
    winrate_csv, elo_csv = tmp_path / "winrate.csv", tmp_path / "elo.csv"
    WINRATE.to_csv(winrate_csv, index=False)
    elo_rows().query("mode == 'paper'").to_csv(elo_csv, index=False)  # no bt rows
    out = tmp_path / "figures"
    with pytest.raises(InputError, match="mode"):
        figures.main(["--winrate", str(winrate_csv), "--elo", str(elo_csv),
                      "--out-dir", str(out)])
    assert not out.exists() or not list(out.iterdir())


# --- label placement -------------------------------------------------------------------

CROWDED = pd.DataFrame(
    # three models of one family and two of others exactly at (1.0, 0.975); a vertical
    # line of points at x = 1.0, some a hair apart
    [(m, c, v, v - 0.02, min(v + 0.02, 1.0))
     for m, (h, s) in {
         "dpo_h.dpo_s-0.01": (1.0, 0.975), "dpo_h.dpo_s-0.1": (1.0, 0.975),
         "dpo_h.dpo_s-0.3": (1.0, 0.975), "p_sacpo-0.25": (1.0, 0.975),
         "dpo_h": (1.0, 0.975), "dpo_h.dpo_s-1.0": (1.0, 0.4583),
         "p_sacpo-0.5": (1.0, 0.4583), "p_sacpo-0.75": (1.0, 0.4625),
         "p_sacpo-0.9": (1.0, 0.47), "dpo_s-0.1": (1.0, 0.725), "dpo_s-0.2": (1.0, 0.74),
         "dpo_s-0.3": (1.0, 0.755), "dpo_s-0.4": (0.99, 0.74)}.items()
     for c, v in (("helpfulness", h), ("harmlessness", s))],
    columns=["model", "criterion", "win_rate", "ci_low", "ci_high"])

CROWDED_INFO = pd.DataFrame(
    [("sft", "SFT", ""), ("dpo_h", "DPO(H)", "beta=0.1"), ("p_sacpo-0.25", "P-SACPO", "q=0.25"),
     ("p_sacpo-0.5", "P-SACPO", "q=0.5"), ("p_sacpo-0.75", "P-SACPO", "q=0.75"),
     ("p_sacpo-0.9", "P-SACPO", "q=0.9")]
    + [(f"dpo_h.dpo_s-{b}", "DPO(H)->DPO(S)", b) for b in ("0.01", "0.1", "0.3", "1.0")]
    + [(f"dpo_s-{b}", "DPO(S)", f"beta={b}") for b in ("0.1", "0.2", "0.3", "0.4")],
    columns=["model", "family", "label"])


def label_geometry(fig, dpi: float) -> tuple[list, list, list]:
    """Draw at `dpi`; (label annotations, their boxes, marker boxes) in display units."""
    fig.set_dpi(dpi)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    labels = [t for t in ax.texts if t.get_gid() == plotting.LABEL_GID]
    # the text alone: an annotation's own extent takes in its leader line
    boxes = [Text.get_window_extent(t, renderer) for t in labels]
    markers = []
    for container in ax.containers:
        line = container.lines[0]
        half = renderer.points_to_pixels(line.get_markersize()) / 2
        for x, y in ax.transData.transform(np.column_stack([line.get_xdata(),
                                                            line.get_ydata()])):
            markers.append(Bbox.from_extents(x - half, y - half, x + half, y + half))
    return labels, boxes, markers


def assert_labels_clear(fig) -> int:
    """No label overlaps another label or any marker; each is next to its point or has a
    leader line ending at it. Checked at the screen and the saved resolution; returns
    the number of leader lines."""
    leaders = 0
    for dpi in (100, 150):
        labels, boxes, markers = label_geometry(fig, dpi)
        assert labels
        ax = fig.axes[0]
        renderer = fig.canvas.get_renderer()
        radius = renderer.points_to_pixels(plotting.MARKER_SIZE) / 2
        for i, (label, box) in enumerate(zip(labels, boxes, strict=True)):
            for j, other in enumerate(boxes):
                assert i == j or not box.overlaps(other), (label.get_text(),
                                                           labels[j].get_text())
            assert not any(box.overlaps(m) for m in markers), label.get_text()
            assert ax.get_window_extent(renderer).contains(*box.p0)
            assert ax.get_window_extent(renderer).contains(*box.p1)
            px, py = ax.transData.transform(label.xy)
            gap = max(box.x0 - px, 0, px - box.x1, box.y0 - py, py - box.y1)
            if label.arrow_patch is None:  # right next to the marker
                assert gap <= radius + renderer.points_to_pixels(4.0), label.get_text()
            else:  # the leader line ends at the marker's edge
                path = label.arrow_patch.get_path().transformed(
                    label.arrow_patch.get_transform())
                end = path.vertices[-1]
                assert np.hypot(*(end - (px, py))) <= radius + 1.0, label.get_text()
                leaders += dpi == 100
    return leaders


def test_labels_of_coinciding_and_collinear_points_do_not_overlap():
    fig = figures.winrate_figure(CROWDED, CROWDED_INFO)
    leaders = assert_labels_clear(fig)
    assert leaders >= 1  # the crowded line at x = 1.0 needs some
    texts = [t.get_text() for t in fig.axes[0].texts if t.get_gid() == plotting.LABEL_GID]
    # one label per family and point; each model's label appears exactly once
    assert "0.01, 0.1, 0.3" in texts and "q=0.5" in texts and "1.0" in texts
    parts = sorted(p for t in texts for p in t.split(", "))
    assert parts == sorted(CROWDED_INFO["label"][CROWDED_INFO["label"] != ""])
    # the label takes its family's colour
    _, _, container = series(fig.axes[0], "P-SACPO")
    colour = {t.get_text(): t.get_color() for t in fig.axes[0].texts}["q=0.25"]
    assert to_hex(colour) == to_hex(container.lines[0].get_color())


def test_labels_in_figure3_do_not_overlap_and_placement_is_deterministic():
    table = elo_rows()
    tie = table["model"].isin(["dpo_h.dpo_s-0.01", "dpo_h.dpo_s-0.1", "p_sacpo-0.5"])
    table.loc[tie & (table["criterion"] == "helpfulness"), "rating"] = 1100.0
    table.loc[tie & (table["criterion"] == "harmlessness"), "rating"] = 1100.0
    table["ci_low"], table["ci_high"] = table["rating"] - 20, table["rating"] + 20
    fig = figures.elo_figure(table, INFO)
    assert_labels_clear(fig)
    again = figures.elo_figure(table, INFO)
    assert ([(t.get_text(), t.xyann) for t in fig.axes[0].texts]
            == [(t.get_text(), t.xyann) for t in again.axes[0].texts])


def test_place_labels_keeps_clear_of_every_marker():
    fig = Figure(figsize=(3, 3))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ys = np.linspace(0.0, 1.0, 12)
    ax.plot(np.zeros_like(ys), ys, "o", markersize=plotting.MARKER_SIZE)
    ax.set_xlim(-1, 1)
    ax.set_ylim(-0.1, 1.1)
    labels = [plotting.PointLabel(0.0, y, f"point {i}") for i, y in enumerate(ys)]
    placed = plotting.place_labels(ax, labels)
    assert len(placed) == len(labels)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(t, renderer) for t in placed]
    half = renderer.points_to_pixels(plotting.MARKER_SIZE) / 2
    dots = [Bbox.from_extents(x - half, y - half, x + half, y + half)
            for x, y in ax.transData.transform(np.column_stack([np.zeros_like(ys), ys]))]
    for i, box in enumerate(boxes):
        assert not any(box.overlaps(b) for j, b in enumerate(boxes) if j != i)
        assert not any(box.overlaps(d) for d in dots)


# --- family styles -------------------------------------------------------------------


def test_every_family_has_its_own_style_the_same_in_every_figure():
    families = [f"family {i}" for i in range(25)]
    styles = plotting.family_styles(families, "family 7")
    assert len(set(styles.values())) == len(families)
    assert styles["family 7"] == (plotting.MARKERS[0], "C0")
    # a family the given styles lack gets a style nobody else has
    extended = plotting._extend_styles(styles, [*families, "newcomer"])
    assert extended["newcomer"] not in styles.values()
    table = elo_rows()
    meta = figure_inputs.model_info(sorted(set(table["model"])), INFO)
    shared = plotting.family_styles(meta["family"].tolist(), "SFT")
    seen = {}
    for fig in (figures.winrate_figure(WINRATE, INFO, styles=shared),
                figures.elo_figure(table, INFO, styles=shared),
                figures.winrate_figure(WINRATE, INFO), figures.elo_figure(table, INFO)):
        ax = fig.axes[0]
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend == ["SFT", "DPO(H)", "DPO(H)->DPO(S)", "P-SACPO"]
        for family in legend:
            line = series(ax, family)[2].lines[0]
            style = (line.get_marker(), to_hex(line.get_color()))
            assert style == (shared[family][0], to_hex(shared[family][1]))
            assert seen.setdefault(family, style) == style
    assert len(set(seen.values())) == len(seen)


# --- across seeds --------------------------------------------------------------------


def seeded(table: pd.DataFrame, value: str, keys: list[str]) -> pd.DataFrame:
    """Per-seed rows (seeds 0..2, value shifted by seed) plus "all" rows (their mean and
    an interval of +-2 standard deviations), as the across-seed step writes them."""
    rows = []
    for seed in range(3):
        rows.append(table.assign(seed=seed, **{value: table[value] + 0.01 * (seed - 1)
                                               * (100 if value == "rating" else 1)}))
    per_seed = pd.concat(rows, ignore_index=True)
    summary = per_seed.groupby(keys, sort=False)[value].agg(["mean", "std"]).reset_index()
    all_rows = table.merge(summary, on=keys).assign(seed="all")
    all_rows[value] = all_rows["mean"]
    all_rows["ci_low"] = all_rows["mean"] - 2 * all_rows["std"]
    all_rows["ci_high"] = all_rows["mean"] + 2 * all_rows["std"]
    return pd.concat([per_seed, all_rows.drop(columns=["mean", "std"])], ignore_index=True)


def test_figure2_across_seeds_plots_all_rows_and_faint_seed_points(tmp_path: Path):
    table = seeded(WINRATE, "win_rate", ["model", "criterion"])
    table.to_csv(tmp_path / "winrate.csv", index=False)
    table = pd.read_csv(tmp_path / "winrate.csv")  # seeds come back as text
    fig = figures.winrate_figure(table, INFO)
    ax = fig.axes[0]
    all_rows = table[table["seed"] == "all"]
    expected = expected_points(all_rows, "win_rate", ["dpo_h.dpo_s-0.01", "dpo_h.dpo_s-0.1"])
    x, y, container = series(ax, "DPO(H)->DPO(S)")
    np.testing.assert_allclose(x, expected[("win_rate", "helpfulness")])
    np.testing.assert_allclose(y, expected[("win_rate", "harmlessness")])
    xs, ys = bar_ends(container)
    np.testing.assert_allclose(xs, expected[["ci_low", "ci_high"]].xs("helpfulness", axis=1,
                                                                       level=1))
    np.testing.assert_allclose(ys, expected[["ci_low", "ci_high"]].xs("harmlessness", axis=1,
                                                                       level=1))
    (faint,) = [line for line in ax.lines if line.get_gid() == "seeds:DPO(H)->DPO(S)"]
    per_seed = table[table["seed"] != "all"]
    wide = per_seed[per_seed["model"].str.startswith("dpo_h.dpo_s")].pivot(
        index=["model", "seed"], columns="criterion", values="win_rate")
    got = sorted(zip(faint.get_xdata(), faint.get_ydata(), strict=True))
    want = sorted(zip(wide["helpfulness"], wide["harmlessness"], strict=True))
    np.testing.assert_allclose(got, want)
    main = container.lines[0]
    assert faint.get_marker() == main.get_marker()
    assert to_hex(faint.get_color()) == to_hex(main.get_color())
    assert faint.get_markersize() < main.get_markersize() and faint.get_alpha() < 0.5
    # per-seed points: no labels, no legend entries
    assert sorted(t.get_text() for t in ax.texts) == ["0.01", "0.1", "0.1", "q=0.5"]
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {
        "SFT", "DPO(H)", "DPO(H)->DPO(S)", "P-SACPO"}
    assert "3 seeds" in ax.get_title()
    assert_labels_clear(fig)


def test_seed_column_without_all_rows():
    one_seed = WINRATE.assign(seed=0)
    ax = figures.winrate_figure(one_seed, INFO).axes[0]
    x, _, _ = series(ax, "DPO(H)->DPO(S)")
    assert list(x) == [0.63, 0.73]
    assert not [line for line in ax.lines if str(line.get_gid()).startswith("seeds")]
    two_seeds = pd.concat([WINRATE.assign(seed=0), WINRATE.assign(seed=1)])
    with pytest.raises(InputError, match="'all'"):
        figures.winrate_figure(two_seeds, INFO)
    with pytest.raises(InputError, match="seed"):
        figures.winrate_figure(WINRATE.assign(seed="first"), INFO)


def test_elo_across_seeds_uses_the_all_rows(tmp_path: Path):
    table = seeded(elo_rows(), "rating", ["criterion", "mode", "model"])
    table.to_csv(tmp_path / "elo.csv", index=False)
    table = pd.read_csv(tmp_path / "elo.csv")
    all_bt = table[(table["seed"] == "all") & (table["mode"] == "bt")]
    ax = figures.elo_figure(table, INFO).axes[0]
    expected = expected_points(all_bt, "rating", ["dpo_h.dpo_s-0.01", "dpo_h.dpo_s-0.1"])
    x, y, container = series(ax, "DPO(H)->DPO(S)")
    np.testing.assert_allclose(x, expected[("rating", "helpfulness")])
    np.testing.assert_allclose(y, expected[("rating", "harmlessness")])
    xs, _ = bar_ends(container)
    np.testing.assert_allclose(xs, expected[["ci_low", "ci_high"]].xs("helpfulness", axis=1,
                                                                       level=1))
    (faint,) = [line for line in ax.lines if line.get_gid() == "seeds:P-SACPO"]
    assert sorted(faint.get_xdata()) == pytest.approx([1174.0, 1175.0, 1176.0])
    chart = figures.elo_chart(table, mode="bt")
    for ax in chart.axes:
        part = all_bt[all_bt["criterion"] == ax.get_title()].sort_values("rating")
        x, _, _ = series(ax, "bt")
        np.testing.assert_allclose(x, part["rating"])
        (dots,) = [line for line in ax.lines if line.get_gid() == plotting.SEEDS_GID]
        assert len(dots.get_xdata()) == 3 * len(part)
    # through the CLI, as the pipeline runs it
    winrate_csv = tmp_path / "winrate.csv"
    seeded(WINRATE, "win_rate", ["model", "criterion"]).to_csv(winrate_csv, index=False)
    out = tmp_path / "figures"
    figures.main(["--winrate", str(winrate_csv), "--elo", str(tmp_path / "elo.csv"),
                  "--out-dir", str(out)])
    assert len(list(out.iterdir())) == 6


def test_the_step_writes_exactly_the_files_it_is_given(tmp_path):
    """The rule passes its declared outputs; a name the step does not draw is refused
    before anything is written."""
    win, elo = tmp_path / "winrate.csv", tmp_path / "elo.csv"
    WINRATE.to_csv(win, index=False)
    elo_rows().to_csv(elo, index=False)
    wanted = [tmp_path / "out" / "figure2.svg", tmp_path / "out" / "elo_chart.png"]
    written = figures.figures_step(win, elo, wanted)
    assert sorted(written) == sorted(wanted) and all(p.is_file() for p in wanted)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["elo_chart.png",
                                                                    "figure2.svg"]
    with pytest.raises(InputError, match="not a figure this step draws"):
        figures.figures_step(win, elo, [tmp_path / "other" / "figure4.png"])
    assert not (tmp_path / "other").exists()
