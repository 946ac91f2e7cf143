"""Across-seed tables, the paired comparison over prompts, and the constant baseline."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from sacpo_steps.core.errors import InputError
from sacpo_steps.evaluation import constant_answers, stats, winrate
from sacpo_steps.reporting import across_seeds


@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (30, 2.0423)])
def test_t_quantiles_match_the_tables(df, expected):
    assert across_seeds.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)


def winrate_csv(path, rows):
    cols = ["model", "criterion", "wins", "ties", "losses", "errors", "n", "win_rate", "ci_low",
            "ci_high", "mean_words", "baseline_mean_words"]
    pd.DataFrame(rows, columns=cols).to_csv(path, index=False)
    return path


def elo_csv(path, rows):
    cols = ["criterion", "mode", "model", "rating", "ci_low", "ci_high", "n", "errors", "valid"]
    pd.DataFrame(rows, columns=cols).to_csv(path, index=False)
    return path


def run(tmp_path, seeds, win_rows, elo_rows):
    win = [winrate_csv(tmp_path / f"w{s}.csv", r) for s, r in zip(seeds, win_rows, strict=True)]
    elo = [elo_csv(tmp_path / f"e{s}.csv", r) for s, r in zip(seeds, elo_rows, strict=True)]
    outs = [tmp_path / n for n in ("w.csv", "w.md", "e.csv", "e.md")]
    return (*across_seeds.across_seeds(seeds, win, elo, *outs), outs)


def test_the_across_seed_row_is_the_mean_with_a_t_interval_over_seeds(tmp_path):
    rates = [0.60, 0.70, 0.80]
    win_rows = [[("dpo_h", "helpfulness", 10, 2, 8, 0, 20, r, r - 0.1, r + 0.1, 20.0 + i, 10.0)]
                for i, r in enumerate(rates)]
    elo_rows = [[("helpfulness", "bt", "dpo_h", 1000 + 10 * i, 990, 1030, 40, 0, True)]
                for i in range(3)]
    win, elo, outs = run(tmp_path, [0, 1, 2], win_rows, elo_rows)
    assert list(win["seed"]) == ["0", "1", "2", "all"]
    row = win[win["seed"] == "all"].iloc[0]
    assert row["win_rate"] == pytest.approx(0.70)
    half = 4.302653 * np.std(rates, ddof=1) / math.sqrt(3)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((0.70 - half, 0.70 + half), abs=1e-5)
    assert row["wins"] == 30 and row["n"] == 60  # counts add up over seeds
    assert row["mean_words"] == pytest.approx(21.0)
    assert row["interval"] == "t over 3 seeds" and row["seeds"] == 3
    erow = elo[elo["seed"] == "all"].iloc[0]
    assert erow["rating"] == pytest.approx(1010.0) and erow["n"] == 120
    written = pd.read_csv(outs[0], dtype={"seed": str})
    assert list(written["seed"]) == ["0", "1", "2", "all"]
    md = outs[1].read_text()
    assert md.index("| all |") < md.index("| 0 |")  # the across-seed rows come first
    assert "t over 3 seeds" in md and "21.0 / 10.0" in md


def test_one_seed_keeps_its_bootstrap_interval_and_intervals_stay_in_0_1(tmp_path):
    win, _, _ = run(tmp_path, [4], [[("m", "harmlessness", 1, 0, 0, 0, 1, 0.9, 0.8, 0.97, 5, 5)]],
                    [[("harmlessness", "bt", "m", 1000, 990, 1010, 2, 0, True)]])
    row = win[win["seed"] == "all"].iloc[0]
    assert (row["ci_low"], row["ci_high"]) == (0.8, 0.97)
    assert row["interval"].startswith("bootstrap over prompts")
    win, _, _ = run(tmp_path, [0, 1], [[("m", "h", 1, 0, 0, 0, 1, r, r, r, 1, 1)]
                                       for r in (0.99, 0.5)],
                    [[("h", "bt", "m", 1000, 990, 1010, 2, 0, True)]] * 2)
    row = win[win["seed"] == "all"].iloc[0]
    assert 0.0 <= row["ci_low"] and row["ci_high"] <= 1.0


def test_an_infinite_rating_on_one_seed_is_not_hidden(tmp_path):
    _, elo, _ = run(tmp_path, [0, 1], [[("m", "h", 1, 0, 0, 0, 1, 0.5, 0.4, 0.6, 1, 1)]] * 2,
                    [[("h", "bt", "m", r, 990, 1010, 2, 0, True)] for r in (1000, math.inf)])
    row = elo[elo["seed"] == "all"].iloc[0]
    assert math.isinf(row["rating"]) and math.isnan(row["ci_low"])
    assert row["interval"] == "not finite on some seed"
    _, elo, _ = run(tmp_path, [0, 1], [[("m", "h", 1, 0, 0, 0, 1, 0.5, 0.4, 0.6, 1, 1)]] * 2,
                    [[("h", "paper", "m", r, None, None, 2, 0, r is not None)]
                     for r in (1000, None)])
    row = elo[elo["seed"] == "all"].iloc[0]
    assert row["interval"] == "no value on some seed" and math.isnan(row["ci_high"])


def test_a_missing_table_is_an_input_error_and_writes_nothing(tmp_path):
    win = [winrate_csv(tmp_path / "w0.csv", [("m", "h", 1, 0, 0, 0, 1, 0.5, 0.4, 0.6, 1, 1)])]
    elo = [tmp_path / "missing.csv"]
    outs = [tmp_path / n for n in ("w.csv", "w.md", "e.csv", "e.md")]
    with pytest.raises(InputError, match="missing.csv"):
        across_seeds.across_seeds([0], win, elo, *outs)
    assert not any(p.exists() for p in outs)
    with pytest.raises(InputError, match="2 win-rate tables for 1 seeds"):
        across_seeds.across_seeds([0], win * 2, elo, *outs)


def test_per_family_elo_tables_are_combined_per_fit(tmp_path):
    win = [winrate_csv(tmp_path / f"w{s}.csv", [("m", "h", 1, 0, 0, 0, 1, 0.5, 0.4, 0.6, 1, 1)])
           for s in (0, 1)]
    elo = [elo_csv(tmp_path / f"e{s}.csv", [("h", "bt", "m", 1000 + 20 * s, 990, 1030, 4, 0, True)])
           for s in (0, 1)]
    cols = ["criterion", "fit", "mode", "model", "rating", "ci_low", "ci_high", "n", "errors",
            "valid"]
    families = []
    for s in (0, 1):
        path = tmp_path / f"f{s}.csv"
        pd.DataFrame([("h", "pooled", "bt", "m", 1000 + 20 * s, 990, 1030, 4, 0, True),
                      ("h", "fig3", "bt", "m", 1100 + 40 * s, 1050, 1150, 2, 0, True)],
                     columns=cols).to_csv(path, index=False)
        families.append(path)
    outs = [tmp_path / n for n in ("w.csv", "w.md", "e.csv", "e.md", "f.csv", "f.md")]
    _, elo_table = across_seeds.across_seeds([0, 1], win, elo, *outs[:4], elo_families=families,
                                             out_elo_families_csv=outs[4],
                                             out_elo_families_md=outs[5])
    table = pd.read_csv(outs[4], dtype={"seed": str})
    across = table[table["seed"] == "all"].set_index("fit")
    assert across.loc["pooled", "rating"] == pytest.approx(1010.0)
    assert across.loc["fig3", "rating"] == pytest.approx(1120.0)
    assert across.loc["fig3", "n"] == 4 and across.loc["pooled", "n"] == 8
    # the pooled rows agree with the Elo table's across-seed row
    assert elo_table[elo_table["seed"] == "all"]["rating"].iloc[0] == pytest.approx(1010.0)
    assert outs[5].read_text().startswith("| criterion | fit | mode | model | seed | rating |")
    # the tables and their two outputs go together
    with pytest.raises(InputError) as err:
        across_seeds.across_seeds([0, 1], win, elo, *outs[:4], elo_families=families)
    assert err.value.field == "elo_families"


# ---- the paired comparison -------------------------------------------------------


def battles(outcomes: dict[str, list[str]]) -> pd.DataFrame:
    """Battles of each model (side a) against sft on prompts p0..pn, both orders."""
    rows = []
    for model, results in outcomes.items():
        for i, outcome in enumerate(results):
            for order in ("a_first", "b_first"):
                rows.append({"criterion": "helpfulness", "prompt_set": "h",
                             "prompt_id": f"p{i}", "model_a": model, "model_b": "sft",
                             "order": order, "repetition": 0, "outcome": outcome})
    return pd.DataFrame(rows)


def test_paired_difference_is_the_mean_per_prompt_difference():
    table = battles({"x": ["a_wins"] * 10 + ["tie"] * 10, "y": ["a_wins"] * 20})
    result = stats.paired_difference(table, "x", "y", "sft", "helpfulness", rounds=500)
    assert result["difference"] == pytest.approx(-0.25)
    assert result["ci_high"] < 0 and result["prompts"] == 20
    same = stats.paired_difference(table, "y", "y", "sft", "helpfulness", rounds=100)
    assert same["difference"] == same["ci_low"] == same["ci_high"] == 0


def test_paired_difference_refuses_an_unjudged_model():
    with pytest.raises(InputError, match="no helpfulness battles of 'z'"):
        stats.paired_difference(battles({"x": ["tie"]}), "z", "x", "sft", "helpfulness")


# ---- the constant baseline and answer lengths ----------------------------------------


def test_a_constant_baseline_answers_every_prompt_the_same(tmp_path):
    prompts = tmp_path / "red_team.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": f"r{i}", "prompt": f"q {i}"}) + "\n"
                               for i in range(3)))
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, "-m", "sacpo_steps", "constant_answers", "--answer",
                           "i cannot help with that.", "--model-name", "refuse", "--prompts",
                           str(prompts), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt_id"] for r in rows] == ["r0", "r1", "r2"]
    assert {r["answer"] for r in rows} == {"i cannot help with that."}
    assert {r["model"] for r in rows} == {"refuse"}
    counts = constant_answers.constant_answers(prompts, tmp_path / "e.jsonl", model_name="e",
                                               answer=" ")
    assert counts == {"answers": 3, "empty": 3}


def test_the_win_rate_table_reports_answer_lengths(tmp_path):
    rows = []
    for i in range(4):
        for order in ("a_first", "b_first"):
            rows.append({"criterion": "helpfulness", "prompt_set": "h", "prompt_id": f"p{i}",
                         "model_a": "m", "model_b": "sft", "order": order, "repetition": 0,
                         "outcome": "a_wins", "empty_a": False, "empty_b": False,
                         "words_a": 10 + i, "words_b": 4})
    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = winrate.winrate_table([path], "sft", tmp_path / "w.csv", tmp_path / "w.md",
                                  rounds=50)
    assert table.loc[0, "mean_words"] == pytest.approx(11.5)
    assert table.loc[0, "baseline_mean_words"] == pytest.approx(4.0)
    assert "| 11.5 / 4.0 |" in (tmp_path / "w.md").read_text()
