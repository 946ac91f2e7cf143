"""Win rates, bootstrap intervals and position consistency on hand-made battle tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sacpo_steps.core.errors import InputError
from sacpo_steps.evaluation import winrate
from sacpo_steps.evaluation.stats import bootstrap_interval, load_battles, win_rates


def battle(pid: str, outcome: str, order: str = "a_first", rep: int = 0, a: str = "dpo",
           b: str = "sft", criterion: str = "helpfulness") -> dict:
    return {"criterion": criterion, "prompt_set": "help", "prompt_id": pid, "model_a": a,
            "model_b": b, "order": order, "repetition": rep, "outcome": outcome,
            "judge": "rule", "raw": "x.replies.jsonl#1"}


def table(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows)


def only_row(result: pd.DataFrame) -> pd.Series:
    assert len(result) == 1
    return result.iloc[0]


def test_three_wins_one_loss_is_three_quarters():
    rows = [battle(f"p{i}", o) for i, o in enumerate(["a_wins"] * 3 + ["b_wins"])]
    r = only_row(win_rates(table(rows), "sft", rounds=200))
    assert (r.model, r.criterion) == ("dpo", "helpfulness")
    assert (r.wins, r.ties, r.losses, r.errors, r.n) == (3, 0, 1, 0, 4)
    assert r.win_rate == pytest.approx(0.75)


def test_ties_count_half():
    rows = [battle("p1", "a_wins"), battle("p2", "tie"), battle("p3", "tie"),
            battle("p4", "b_wins")]
    r = only_row(win_rates(table(rows), "sft", rounds=200))
    assert r.ties == 2 and r.win_rate == pytest.approx(0.5)


def test_errors_are_counted_apart_and_left_out_of_the_rate():
    rows = [battle("p1", "a_wins"), battle("p2", "a_wins"), battle("p3", "b_wins"),
            battle("p4", "error")]
    r = only_row(win_rates(table(rows), "sft", rounds=200))
    assert (r.errors, r.n) == (1, 3)
    assert r.win_rate == pytest.approx(2 / 3)


def test_all_errors_give_no_rate_rather_than_a_tie():
    r = only_row(win_rates(table([battle("p1", "error")]), "sft", rounds=50))
    assert r.n == 0 and np.isnan(r.win_rate) and np.isnan(r.ci_low)


def test_baseline_on_side_a_is_flipped():
    rows = [battle("p1", "b_wins", a="sft", b="dpo"), battle("p2", "b_wins", a="sft", b="dpo"),
            battle("p3", "a_wins", a="sft", b="dpo"), battle("p4", "a_wins")]
    r = only_row(win_rates(table(rows), "sft", rounds=200))
    assert r.model == "dpo"
    assert (r.wins, r.losses) == (3, 1) and r.win_rate == pytest.approx(0.75)


def test_battles_without_the_baseline_are_ignored_and_none_at_all_is_an_error():
    rows = [battle("p1", "a_wins"), battle("p1", "b_wins", a="dpo", b="kto")]
    r = only_row(win_rates(table(rows), "sft", rounds=50))
    assert (r.model, r.wins, r.losses) == ("dpo", 1, 0)
    with pytest.raises(InputError) as err:
        win_rates(table(rows), "nobody")
    assert err.value.field == "baseline"


def mixed(n_prompts: int = 30, model: str = "dpo", criterion: str = "helpfulness") -> list:
    outcomes = ["a_wins", "b_wins", "tie", "a_wins", "a_wins"]
    return [battle(f"p{i}", outcomes[(i + k) % 5], order, 0, a=model, criterion=criterion)
            for i in range(n_prompts) for k, order in enumerate(("a_first", "b_first"))]


def test_interval_contains_the_point_estimate():
    r = only_row(win_rates(table(mixed()), "sft", rounds=1000))
    assert r.ci_low < r.win_rate < r.ci_high
    assert 0.0 <= r.ci_low and r.ci_high <= 1.0


def test_interval_is_degenerate_when_the_model_wins_everything():
    rows = [battle(f"p{i}", "a_wins", order) for i in range(10) for order in ("a_first",
                                                                               "b_first")]
    r = only_row(win_rates(table(rows), "sft", rounds=500))
    assert r.win_rate == 1.0 and r.ci_low == 1.0 and r.ci_high == 1.0


def test_bootstrap_resamples_whole_prompts():
    # one prompt won in all 4 judgments, one lost in all 4: resampling prompts gives rates in
    # {0, 0.5, 1}, each extreme with probability 1/4, so the 95% interval is [0, 1]; resampling
    # single judgments would give a much narrower interval
    rows = [battle(pid, outcome, order, rep) for pid, outcome in (("p1", "a_wins"),
                                                                  ("p2", "b_wins"))
            for order in ("a_first", "b_first") for rep in (0, 1)]
    r = only_row(win_rates(table(rows), "sft", rounds=1000))
    assert r.win_rate == 0.5
    assert (r.ci_low, r.ci_high) == (0.0, 1.0)


def test_same_seed_same_interval_and_models_do_not_disturb_each_other():
    one = win_rates(table(mixed()), "sft", rounds=300, seed=7)
    again = win_rates(table(mixed()), "sft", rounds=300, seed=7)
    pd.testing.assert_frame_equal(one, again)
    both = win_rates(table(mixed() + mixed(model="aaa")), "sft", rounds=300, seed=7)
    dpo = both[both.model == "dpo"].reset_index(drop=True)
    pd.testing.assert_frame_equal(one, dpo)


def test_different_seeds_draw_different_resamples():
    scores = np.linspace(0.1, 7.3, 50)
    counts = np.arange(1, 51, dtype=float) + 7
    a = bootstrap_interval(scores, counts, np.random.default_rng(0), 5, 0.5)
    b = bootstrap_interval(scores, counts, np.random.default_rng(1), 5, 0.5)
    assert a != b


def test_position_consistency():
    rows = [
        battle("p1", "a_wins", "a_first"), battle("p1", "a_wins", "b_first"),  # agree
        battle("p2", "a_wins", "a_first"), battle("p2", "b_wins", "b_first"),  # disagree
        battle("p3", "tie", "a_first"), battle("p3", "tie", "b_first"),  # agree
        battle("p4", "error", "a_first"), battle("p4", "a_wins", "b_first"),  # not counted
        battle("p5", "a_wins", "a_first"),  # one order only: not counted
        battle("p1", "b_wins", "a_first", rep=1), battle("p1", "tie", "b_first", rep=1),
    ]
    r = only_row(win_rates(table(rows), "sft", rounds=50))
    assert r.position_consistency == pytest.approx(2 / 4)


def test_rows_sorted_by_criterion_then_model():
    rows = (mixed(model="zeta", criterion="helpfulness") + mixed(model="alpha")
            + mixed(model="zeta", criterion="harmlessness"))
    result = win_rates(table(rows), "sft", rounds=50)
    assert list(zip(result.criterion, result.model, strict=True)) == [
        ("harmlessness", "zeta"), ("helpfulness", "alpha"), ("helpfulness", "zeta")]


def write_battles(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_battles_validates_rows(tmp_path: Path):
    good = write_battles(tmp_path / "good.jsonl", mixed(5))
    frame = load_battles([good])
    assert len(frame) == 10 and frame["repetition"].dtype == np.int64

    rows = mixed(5, model="kto")
    rows[3]["outcome"] = "draw"
    bad = write_battles(tmp_path / "bad.jsonl", rows)
    with pytest.raises(InputError) as err:
        load_battles([good, bad])
    assert (err.value.path, err.value.row, err.value.field) == (str(bad), 4, "outcome")

    rows = mixed(5)
    del rows[0]["model_b"]
    bad = write_battles(tmp_path / "bad2.jsonl", rows)
    with pytest.raises(InputError) as err:
        load_battles([bad])
    assert (err.value.row, err.value.field) == (1, "model_b")

    with pytest.raises(InputError, match="same judgment") as err:
        load_battles([good, good])
    assert err.value.row == 1


def test_cli_writes_csv_and_markdown(tmp_path: Path):
    wins = [battle(f"p{i}", "a_wins", order, criterion="harmlessness")
            for i in range(4) for order in ("a_first", "b_first")]
    help_path = write_battles(tmp_path / "help.jsonl", mixed(20))
    harm_path = write_battles(tmp_path / "harm.jsonl", wins + [battle("p9", "error",
                                                                      criterion="harmlessness")])
    out_csv, out_md = tmp_path / "out" / "winrate.csv", tmp_path / "out" / "winrate.md"
    winrate.main(["--battles", str(help_path), str(harm_path), "--baseline", "sft",
                  "--rounds", "200", "--seed", "3", "--out-csv", str(out_csv),
                  "--out-md", str(out_md), "--log", str(tmp_path / "winrate.log")])
    csv = pd.read_csv(out_csv)
    assert list(csv.criterion) == ["harmlessness", "helpfulness"]
    harm = csv.iloc[0]
    assert (harm.wins, harm.errors, harm.n, harm.win_rate) == (8, 1, 8, 1.0)
    md = out_md.read_text().splitlines()
    assert md[0] == ("| model | criterion | wins | ties | losses | errors | win rate "
                     "| 95% interval | n |")
    assert md[2] == "| dpo | harmlessness | 8 | 0 | 0 | 1 | 1.000 | [1.000, 1.000] | 8 |"
    assert len(md) == 4
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_cli_failure_writes_nothing(tmp_path: Path):
    path = write_battles(tmp_path / "b.jsonl", mixed(3))
    out_csv, out_md = tmp_path / "out" / "w.csv", tmp_path / "out" / "w.md"
    with pytest.raises(InputError):
        winrate.main(["--battles", str(path), "--baseline", "nobody", "--out-csv", str(out_csv),
                      "--out-md", str(out_md)])
    assert not out_csv.exists() and not out_md.exists()


def test_table_counts_each_models_empty_answers_from_the_battle_flags(tmp_path):
    # the judge step flags empty answers per side; every order and repetition repeats them
    empty_dpo = {"p0": False, "p1": True, "p2": True}
    rows = [{**battle(pid, "a_wins", order=order, rep=rep), "empty_a": flag, "empty_b": False}
            for pid, flag in empty_dpo.items() for order in ("a_first", "b_first")
            for rep in (0, 1)]
    battles = tmp_path / "battles.jsonl"
    battles.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_csv, out_md = tmp_path / "w.csv", tmp_path / "w.md"
    r = only_row(winrate.winrate_table([battles], "sft", out_csv, out_md, rounds=20))
    assert (r.empty_answers, r.answers) == (2, 3)
    assert "empty answers" in out_md.read_text() and "| 2/3 |" in out_md.read_text()
    assert pd.read_csv(out_csv)["empty_answers"].tolist() == [2]


def test_battles_without_empty_flags_keep_the_old_layout(tmp_path):
    battles = tmp_path / "battles.jsonl"
    battles.write_text(json.dumps(battle("p0", "a_wins")) + "\n")
    out_csv, out_md = tmp_path / "w.csv", tmp_path / "w.md"
    r = only_row(winrate.winrate_table([battles], "sft", out_csv, out_md, rounds=20))
    assert pd.isna(r.empty_answers) and "empty answers" not in out_md.read_text()
