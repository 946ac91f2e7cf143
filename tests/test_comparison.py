"""The comparison step: frontier figure, costs, matched comparisons and dominance."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from sacpo_steps.core.errors import InputError
from sacpo_steps.reporting.across_seeds import combine, t_interval
from sacpo_steps.reporting.comparison import (
    OUTPUTS,
    comparison,
    dominance_table,
    dominates,
    main,
    matched_table,
    read_matched,
    read_methods,
)
from sacpo_steps.reporting.training_costs import costs_table, read_cards

METHODS = {"DPO(H)": ["dpo_h"], "SACPO": ["dpo_h.dpo_s-0.1", "dpo_h.dpo_s-0.01"],
           "P-SACPO": ["p-sacpo-0.5", "p-sacpo-0.9"], "SafeDPO": ["safedpo-0.1"]}
# (harmlessness, helpfulness) per model on seed 0; later seeds add small offsets
WIN = {"dpo_h": (0.35, 0.85), "dpo_h.dpo_s-0.1": (0.90, 0.70),
       "dpo_h.dpo_s-0.01": (0.95, 0.62), "p-sacpo-0.5": (0.40, 0.84),
       "p-sacpo-0.9": (0.85, 0.72), "safedpo-0.1": (0.70, 0.60), "always_refuse": (0.9, 0.1)}


def _winrate(tmp_path, seeds=(0, 1, 2)):
    rows = []
    for seed in seeds:
        for model, (harm, help_) in WIN.items():
            for criterion, value in (("harmlessness", harm), ("helpfulness", help_)):
                value += 0.01 * seed
                rows.append({"seed": str(seed), "model": model, "criterion": criterion,
                             "win_rate": value, "ci_low": value - 0.03,
                             "ci_high": value + 0.03})
    table = combine(pd.DataFrame(rows), ["model", "criterion"], "win_rate", confidence=0.95)
    path = tmp_path / "tables" / "winrate.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    return path


def _align(name, parent, steps, seconds, ref, lineage=()):
    return {"name": name, "method": "dpo",
            "lineage": [*lineage, {"name": name, "parent": parent, "loss": "dpo"}],
            "reference": parent, "reference_logps": ref,
            "training": {"steps": steps, "train_runtime_s": seconds}}


def _cards(tmp_path, seeds=(0, 1), drop=()):
    """sft -> dpo_h -> dpo_h.dpo_s-*; merges of dpo_h and dpo_h.dpo_s-0.01; sft ->
    safedpo-0.1 without a shared reference file. Seed s trains 10 s longer per run."""
    paths = []
    for seed in seeds:
        root = tmp_path / f"seed-{seed}" / "models"
        ref = f"results/x/seed-{seed}/ref_logps"
        h = _align("dpo_h", "sft", 10, 5.0 + 10 * seed, f"{ref}/sft/helpfulness.json")
        cards = [
            {"name": "sft", "method": "sft", "lineage": [], "training": {"epochs": 1}},
            h,
            _align("dpo_h.dpo_s-0.1", "dpo_h", 20, 8.0 + 10 * seed,
                   f"{ref}/dpo_h/safety.json", h["lineage"]),
            _align("dpo_h.dpo_s-0.01", "dpo_h", 20, 9.0 + 10 * seed,
                   f"{ref}/dpo_h/safety.json", h["lineage"]),
            *[{"name": f"p-sacpo-{q}", "method": "merge", "lineage": h["lineage"],
               "merge": {"parent_a": "dpo_h", "parent_b": "dpo_h.dpo_s-0.01", "q": q}}
              for q in (0.5, 0.9)],
            _align("safedpo-0.1", "sft", 12, 7.0 + 10 * seed, None),
        ]
        for card in cards:
            if card["name"] in drop:
                continue
            path = root / card["name"] / "sacpo.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(card))
            paths.append(path)
    return paths


def _matched(tmp_path, model, seed, q, diff, half=0.02, target=0.5, name=None):
    payload = {"target": target, "met": q is not None, "q": q, "matched": {
        "model": model, "seed": seed, "target": target, "q": q,
        "diff": diff, "low": None if q is None else diff - half,
        "high": None if q is None else diff + half, "prompts": None if q is None else 100}}
    path = tmp_path / f"seed-{seed}" / "target" / (name or f"{model}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    return path


def _outputs(tmp_path):
    suffix = {"frontier_png": "png", "frontier_svg": "svg"}
    return {k: tmp_path / "out" / f"{k}.{suffix.get(k, k.rsplit('_', 1)[1])}"
            for k in OUTPUTS}


# ---- costs ----------------------------------------------------------------------------

def test_costs_count_the_runs_from_sft_each_once_and_average_over_seeds(tmp_path):
    costs = costs_table(read_cards(_cards(tmp_path)), METHODS).set_index("model")
    h = costs.loc["dpo_h"]
    assert (h.runs, h.merges, h.optimizer_steps, h.reference_passes) == (1, 0, 10, 1)
    assert h.train_seconds == pytest.approx(10.0)  # mean of 5 and 15
    s = costs.loc["dpo_h.dpo_s-0.1"]  # DPO(H) + stage 2
    assert (s.runs, s.optimizer_steps, s.reference_passes) == (2, 30, 2)
    assert s.train_seconds == pytest.approx((5 + 8 + 15 + 18) / 2)
    grid = costs.loc["all 2 models"].set_index("method").loc["SACPO"]
    assert (grid.runs, grid.optimizer_steps, grid.reference_passes) == (3, 50, 2)
    p = costs.loc["p-sacpo-0.5"]  # both parents, and the merge itself
    assert (p.runs, p.merges, p.optimizer_steps, p.reference_passes) == (2, 1, 30, 2)
    pgrid = costs.loc["all 2 models"].set_index("method").loc["P-SACPO"]
    assert (pgrid.runs, pgrid.merges) == (2, 2)
    d = costs.loc["safedpo-0.1"]
    assert (d.runs, d.reference_passes, d.runs_without_ref_file) == (1, 0, 1)
    assert (costs["seeds"] == 2).all()


def test_costs_need_every_ancestors_card_but_not_the_sfts(tmp_path):
    costs = costs_table(read_cards(_cards(tmp_path, drop=("sft",))), METHODS)
    assert costs.set_index("model").loc["dpo_h", "runs"] == 1
    with pytest.raises(InputError, match=r"'dpo_h' \(an ancestor of 'dpo_h.dpo_s-0.1'\) "
                                         "for seed 0"):
        costs_table(read_cards(_cards(tmp_path / "b", drop=("dpo_h",))),
                    {"SACPO": METHODS["SACPO"]})


def test_card_errors_name_the_file_and_field(tmp_path):
    paths = _cards(tmp_path, seeds=(0,))
    bad = next(p for p in paths if p.parent.name == "dpo_h")
    card = json.loads(bad.read_text())
    del card["training"]["steps"]
    bad.write_text(json.dumps(card))
    with pytest.raises(InputError, match="optimizer steps") as err:
        costs_table(read_cards(paths), METHODS)
    assert err.value.path == str(bad) and err.value.field == "training.steps"
    outside = tmp_path / "elsewhere" / "sacpo.json"
    outside.parent.mkdir()
    outside.write_text(json.dumps({"name": "x"}))
    with pytest.raises(InputError, match="no seed-<s> folder"):
        read_cards([outside])
    with pytest.raises(InputError, match="given twice"):
        read_cards([paths[0], paths[0]])
    with pytest.raises(InputError, match="no model card of 'bso-x' for seed 0"):
        costs_table(read_cards(paths), {"BSO": ["bso-x"]})


# ---- matched --------------------------------------------------------------------------

def test_matched_across_seeds_is_a_t_interval_over_the_seeds_met(tmp_path):
    paths = [_matched(tmp_path, "safedpo-0.1", s, 0.6 + 0.1 * s, d)
             for s, d in enumerate((0.05, 0.07, 0.09))]
    paths += [_matched(tmp_path, "dpo_h.dpo_s-0.1", 0, 0.8, -0.05),
              _matched(tmp_path, "dpo_h.dpo_s-0.1", 1, 0.8, 0.01),
              _matched(tmp_path, "dpo_h.dpo_s-0.1", 2, None, None)]
    table = matched_table(read_matched(paths), METHODS, 0.95)
    summary = table[table["seed"] == "all"].set_index("model")
    s = summary.loc["safedpo-0.1"]
    low, high = t_interval(np.array([0.05, 0.07, 0.09]), 0.95)
    assert s["diff"] == pytest.approx(0.07) and (s.ci_low, s.ci_high) == (low, high)
    assert s.verdict == "P-SACPO better" and s.seeds_met == "3 of 3"
    assert s.method == "SafeDPO" and s.q == pytest.approx(0.7)
    t = summary.loc["dpo_h.dpo_s-0.1"]
    assert t.seeds_met == "2 of 3" and t.verdict == "no difference"
    per_seed = table[table["seed"] != "all"].set_index(["model", "seed"])
    assert per_seed.loc[("dpo_h.dpo_s-0.1", "0"), "verdict"] == "dpo_h.dpo_s-0.1 better"
    assert per_seed.loc[("dpo_h.dpo_s-0.1", "2"), "verdict"] == "target not met"
    assert list(table["seed"][:2]) == ["all", "all"]  # summaries first


def test_matched_with_one_seed_met_keeps_its_bootstrap_interval(tmp_path):
    paths = [_matched(tmp_path, "dpo_h", 0, 0.3, -0.1, half=0.05),
             _matched(tmp_path, "dpo_h", 1, None, None)]
    row = matched_table(read_matched(paths), METHODS, 0.95).iloc[0]
    assert (row.ci_low, row.ci_high) == pytest.approx((-0.15, -0.05))
    assert row.interval == "bootstrap over prompts (one seed)"
    assert row.verdict == "one seed met: no claim across seeds"
    none = matched_table(read_matched([_matched(tmp_path / "n", "dpo_h", 0, None, None)]),
                         METHODS, 0.95).iloc[0]
    assert none.verdict == "target not met" and none.seeds_met == "0 of 1"


def test_matched_input_errors(tmp_path):
    plain = tmp_path / "seed-0" / "search.json"
    plain.parent.mkdir()
    plain.write_text(json.dumps({"target": 0.5, "met": True, "q": 0.5}))
    with pytest.raises(InputError, match="no 'matched' record") as err:
        read_matched([plain])
    assert err.value.path == str(plain)
    a = _matched(tmp_path, "dpo_h", 0, 0.3, 0.0, name="a.json")
    b = _matched(tmp_path, "dpo_h", 0, 0.4, 0.0, name="b.json")
    with pytest.raises(InputError, match="second matched search of 'dpo_h' for seed 0"):
        read_matched([a, b])


# ---- dominance ------------------------------------------------------------------------

def _point(x, y, half=0.02):
    return {"x": x, "x_low": x - half, "x_high": x + half, "y": y, "y_low": y - half,
            "y_high": y + half}


def test_dominance_needs_a_mean_not_below_on_both_axes_and_a_separated_interval():
    assert dominates(_point(0.9, 0.8), _point(0.5, 0.8))  # better on x, equal on y
    assert not dominates(_point(0.9, 0.79), _point(0.5, 0.8))  # lower y mean: no
    assert not dominates(_point(0.52, 0.9), _point(0.5, 0.89))  # intervals overlap
    assert not dominates(_point(0.5, 0.5), _point(0.5, 0.5))


def test_dominance_table_per_method_pair():
    points = pd.DataFrame([{"model": m, **p} for m, p in {
        "a1": _point(0.9, 0.8), "a2": _point(0.5, 0.9), "b1": _point(0.5, 0.7),
        "b2": _point(0.4, 0.85), "c1": _point(0.95, 0.95)}.items()])
    methods = {"A": ["a1", "a2"], "B": ["b1", "b2"], "C": ["c1"]}
    table = dominance_table(points, methods).set_index(["method_a", "method_b"])
    assert table.loc[("A", "B"), "verdict"] == "A dominates B"
    assert table.loc[("A", "B"), "pairs"] == "a1 > b1; a2 > b1; a2 > b2"
    assert table.loc[("C", "A"), "verdict"] == "C dominates A"
    assert table.loc[("B", "A"), "verdict"] == "no dominance"
    assert table.loc[("A", "C"), "dominated"] == 0


# ---- the step -------------------------------------------------------------------------

def test_step_writes_every_output_and_draws_each_method_in_grid_order(tmp_path):
    winrate = _winrate(tmp_path)
    matched = [_matched(tmp_path, "safedpo-0.1", s, 0.7, 0.05 + 0.01 * s) for s in (0, 1, 2)]
    outputs = _outputs(tmp_path)
    result = comparison(winrate, _cards(tmp_path, seeds=(0, 1, 2)), matched, METHODS, outputs)
    assert all(p.is_file() and p.stat().st_size > 0 for p in outputs.values())
    points = result["points"]
    assert list(points["model"]) == [m for ms in METHODS.values() for m in ms]
    merge = points.set_index("model").loc["p-sacpo-0.9"]
    assert (merge.x, merge.y) == pytest.approx((0.86, 0.73))  # the mean over seeds 0-2
    assert merge.label == "0.9" and points.set_index("model").loc["dpo_h", "label"] == ""
    assert "always_refuse" not in set(points["model"])
    assert "P-SACPO better" in outputs["matched_md"].read_text()
    assert "| SACPO | all 2 models | 3.0 |" in outputs["costs_md"].read_text()
    assert "Model a dominates model b" in outputs["dominance_md"].read_text()
    assert pd.read_csv(outputs["costs_csv"]).shape[0] == 1 + 3 + 3 + 1
    svg = outputs["frontier_svg"].read_text()
    assert all(f"frontier:{m}" in svg for m in ("SACPO", "P-SACPO"))
    assert "frontier:DPO(H)" not in svg  # one model: nothing to join


def test_frontier_lines_follow_the_grid_order(tmp_path):
    from sacpo_steps.reporting.comparison import frontier_figure, frontier_points

    methods = {"P-SACPO": ["p-sacpo-0.9", "p-sacpo-0.5"], "DPO(H)": ["dpo_h"]}
    table = pd.read_csv(_winrate(tmp_path))
    points, seeds = frontier_points(table, methods, "w")
    fig = frontier_figure(points, seeds, methods, "sft", 3)
    ax = fig.axes[0]
    line = next(x for x in ax.lines if x.get_gid() == "frontier:P-SACPO")
    assert list(line.get_xdata()) == pytest.approx([0.86, 0.41])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["P-SACPO", "DPO(H)"]


def test_missing_model_or_column_is_an_input_error_naming_the_file(tmp_path):
    winrate = _winrate(tmp_path)
    outputs = _outputs(tmp_path)
    with pytest.raises(InputError, match=r"model\(s\) \['bso-x'\]") as err:
        comparison(winrate, _cards(tmp_path), [], {**METHODS, "BSO": ["bso-x"]}, outputs)
    assert err.value.path == str(winrate)
    assert not (tmp_path / "out").exists()
    pd.read_csv(winrate).drop(columns="ci_low").to_csv(winrate, index=False)
    with pytest.raises(InputError, match="missing columns"):
        comparison(winrate, _cards(tmp_path / "c"), [], METHODS, outputs)


@pytest.mark.parametrize("text,message", [
    ("{not json", "not valid JSON"),
    ("{}", "no methods"),
    ('{"A": []}', "non-empty list"),
    ('{"A": ["m"], "B": ["m"]}', "in both 'A' and 'B'"),
])
def test_methods_flag_errors(text, message):
    with pytest.raises(InputError, match=message) as err:
        read_methods(text)
    assert err.value.field == "--methods"


def test_cli_runs_as_a_step_and_exits_2_on_bad_input(tmp_path):
    winrate = _winrate(tmp_path)
    cards = _cards(tmp_path, seeds=(0, 1, 2))
    outputs = _outputs(tmp_path)
    args = ["--winrate", str(winrate), "--cards", *map(str, cards),
            "--methods", json.dumps(METHODS), "--baseline", "sft",
            *[x for k, p in outputs.items() for x in (f"--out-{k.replace('_', '-')}", str(p))]]
    main(args)  # in-process: no --matched at all is fine
    assert "No matched searches" in outputs["matched_md"].read_text()
    bad = json.dumps({**METHODS, "BSO": ["bso-x"]})
    proc = subprocess.run([sys.executable, "-m", "sacpo_steps", "comparison",
                           *[bad if a == json.dumps(METHODS) else a for a in args]],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "bso-x" in proc.stderr and str(winrate) in proc.stderr
    assert "Traceback" not in proc.stderr
