"""Bradley-Terry and paper-mode Elo on hand-made and random battle tables.

Also the win-rate table's repetition columns (`rep_mean`, `rep_std`), which
`stats.win_rates` computes alongside the pooled rate.
"""

from __future__ import annotations

import inspect
import json
import math
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sacpo_steps.__main__ import main as dispatch
from sacpo_steps.core.errors import InputError
from sacpo_steps.evaluation import winrate
from sacpo_steps.evaluation.stats import SCORE_A, stream_seed, win_rates
from sacpo_steps.reporting import bradley_terry, elo, online_elo
from sacpo_steps.reporting.bradley_terry import bt_elo, bt_elo_bootstrap
from sacpo_steps.reporting.online_elo import paper_elo

ELO_75 = 1000 + 400 * math.log10(3)


def battle(pid: str, outcome: str, a: str = "dpo", b: str = "sft", order: str = "a_first",
           rep: int = 0, criterion: str = "helpfulness", prompt_set: str = "help") -> dict:
    return {"criterion": criterion, "prompt_set": prompt_set, "prompt_id": pid, "model_a": a,
            "model_b": b, "order": order, "repetition": rep, "outcome": outcome,
            "judge": "rule", "raw": None}


def frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows)


def rating(table: pd.DataFrame, model: str, criterion: str = "helpfulness") -> float:
    row = table[(table.model == model) & (table.criterion == criterion)]
    assert len(row) == 1
    return float(row.rating.iloc[0])


def random_battles(seed: int, models: tuple[str, ...] = ("sft", "a", "b", "c"),
                   n_prompts: int = 25, criteria: tuple[str, ...] = ("helpfulness",),
                   ) -> pd.DataFrame:
    """All pairs, both orders, 2 repetitions; BT outcomes with ties and a few errors."""
    rng = np.random.default_rng(seed)
    strength = dict(zip(models, rng.normal(0, 0.8, len(models)), strict=True))
    rows = []
    for criterion in criteria:
        for p in range(n_prompts):
            for a, b in combinations(models, 2):
                for order in ("a_first", "b_first"):
                    for rep in (0, 1):
                        u = rng.random()
                        p_a = 1 / (1 + math.exp(strength[b] - strength[a]))
                        outcome = ("error" if u < 0.02 else "tie" if u < 0.15
                                   else "a_wins" if rng.random() < p_a else "b_wins")
                        rows.append(battle(f"p{p}", outcome, a, b, order, rep, criterion))
    return frame(rows)


# --- Bradley-Terry point estimate -------------------------------------------------------


def test_three_quarters_against_the_anchor_is_400_log10_3():
    rows = [battle(f"p{i}", o) for i, o in enumerate(["a_wins"] * 3 + ["b_wins"])]
    table = bt_elo(frame(rows))
    assert rating(table, "dpo") == pytest.approx(ELO_75, abs=1e-6)
    assert rating(table, "sft") == 1000.0
    assert list(table.status) == ["finite", "finite"]
    assert list(table["mode"].unique()) == ["bt"]


def test_ties_count_half_each_way():
    even = [battle("p1", "a_wins"), battle("p2", "tie"), battle("p3", "tie"),
            battle("p4", "b_wins")]
    assert rating(bt_elo(frame(even)), "dpo") == pytest.approx(1000.0, abs=1e-9)
    # 2 wins + 2 ties = 3 points of 4, the same as 3 wins and a loss
    three_quarters = [battle("p1", "a_wins"), battle("p2", "a_wins"), battle("p3", "tie"),
                      battle("p4", "tie")]
    assert rating(bt_elo(frame(three_quarters)), "dpo") == pytest.approx(ELO_75, abs=1e-6)


def test_errors_are_left_out_and_counted():
    rows = [battle(f"p{i}", o) for i, o in enumerate(["a_wins"] * 3 + ["b_wins"])]
    rows += [battle("p8", "error"), battle("p9", "error", a="sft", b="dpo")]
    table = bt_elo(frame(rows))
    assert rating(table, "dpo") == pytest.approx(ELO_75, abs=1e-6)
    dpo = table[table.model == "dpo"].iloc[0]
    assert (dpo.n, dpo.errors) == (4, 2)


def test_side_does_not_matter():
    rows = [battle("p1", "b_wins", a="sft", b="dpo"), battle("p2", "b_wins", a="sft", b="dpo"),
            battle("p3", "a_wins"), battle("p4", "a_wins", a="sft", b="dpo")]
    assert rating(bt_elo(frame(rows)), "dpo") == pytest.approx(ELO_75, abs=1e-6)


def test_anchor_rating_and_anchor_choice_shift_everything_by_a_constant():
    battles = random_battles(1)
    base = bt_elo(battles).set_index("model").rating
    shifted = bt_elo(battles, anchor_rating=1500).set_index("model").rating
    np.testing.assert_allclose(shifted - base, 500.0, atol=1e-9)
    other = bt_elo(battles, anchor="b").set_index("model").rating
    assert other["b"] == 1000.0
    np.testing.assert_allclose(other - base, 1000.0 - base["b"], atol=1e-6)


def test_scale_and_base_give_natural_log_odds():
    rows = [battle(f"p{i}", o) for i, o in enumerate(["a_wins"] * 3 + ["b_wins"])]
    table = bt_elo(frame(rows), anchor_rating=0.0, scale=1.0, base=math.e)
    assert rating(table, "dpo") == pytest.approx(math.log(3), abs=1e-9)
    with pytest.raises(InputError):
        bt_elo(frame(rows), base=1.0)


def test_against_the_anchor_only_elo_is_a_function_of_the_win_rate():
    rows = []
    for model, wins in (("m1", 5), ("m2", 9), ("m3", 2)):
        rows += [battle(f"p{i}", "a_wins" if i < wins else ("tie" if i == wins else "b_wins"),
                        a=model) for i in range(12)]
    table = bt_elo(frame(rows))
    rates = win_rates(frame(rows), "sft", rounds=10)
    for r in rates.itertuples():
        expected = 1000 + 400 * math.log10(r.win_rate / (1 - r.win_rate))
        assert rating(table, r.model) == pytest.approx(expected, abs=1e-6)


def sklearn_elo(battles: pd.DataFrame, anchor: str) -> dict[str, float]:
    """The same MLE by unpenalised logistic regression without intercept (independent fit)."""
    from sklearn.linear_model import LogisticRegression

    valid = battles[battles.outcome != "error"]
    models = sorted((set(valid.model_a) | set(valid.model_b)) - {anchor})
    col = {m: i for i, m in enumerate(models)}
    x, y, w = [], [], []
    for r in valid.itertuples():
        row = np.zeros(len(models))
        if r.model_a in col:
            row[col[r.model_a]] = 1.0
        if r.model_b in col:
            row[col[r.model_b]] = -1.0
        if r.outcome == "tie":  # two half-weight rows, one each way
            x += [row, row]
            y += [1, 0]
            w += [0.5, 0.5]
        else:
            x.append(row)
            y.append(int(r.outcome == "a_wins"))
            w.append(1.0)
    # `penalty` is deprecated from scikit-learn 1.8 on, where C=inf means no penalty
    deprecated = inspect.signature(LogisticRegression).parameters["penalty"].default
    unpenalised = {"C": np.inf} if deprecated == "deprecated" else {"penalty": None}
    fit = LogisticRegression(fit_intercept=False, solver="newton-cholesky", tol=1e-12,
                             max_iter=1000, **unpenalised)
    fit.fit(np.array(x), np.array(y), sample_weight=np.array(w))
    out = {m: 1000 + 400 / math.log(10) * c for m, c in zip(models, fit.coef_[0], strict=True)}
    return {**out, anchor: 1000.0}


def test_bt_mle_agrees_with_scikit_learn_logistic_regression():
    pytest.importorskip("sklearn")
    battles = random_battles(7)
    ours = bt_elo(battles).set_index("model").rating
    theirs = sklearn_elo(battles, "sft")
    for model, value in theirs.items():
        assert ours[model] == pytest.approx(value, abs=1e-3)


def test_criteria_are_fitted_separately():
    both = random_battles(3, criteria=("helpfulness", "harmlessness"))
    together = bt_elo(both)
    for criterion in ("helpfulness", "harmlessness"):
        alone = bt_elo(both[both.criterion == criterion])
        mine = together[together.criterion == criterion].reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, alone)


def test_ranks_follow_ratings():
    table = bt_elo(random_battles(5)).sort_values("rating", ascending=False)
    assert list(table["rank"]) == [1.0, 2.0, 3.0, 4.0]


# --- degenerate tables ---------------------------------------------------------------------


def test_a_model_that_never_loses_is_plus_inf_and_one_that_never_wins_minus_inf():
    rows = [battle(f"p{i}", o) for i, o in enumerate(["a_wins", "b_wins", "tie"])]
    rows += [battle(f"p{i}", "a_wins", a="champ") for i in range(3)]
    rows += [battle(f"p{i}", "b_wins", a="dud") for i in range(3)]
    table = bt_elo(frame(rows)).set_index("model")
    assert table.loc["champ", "rating"] == np.inf and table.loc["champ", "status"] == "+inf"
    assert table.loc["dud", "rating"] == -np.inf and table.loc["dud", "status"] == "-inf"
    # the rest is the MLE without them: dpo 1.5 of 3 points
    assert table.loc["dpo", "rating"] == pytest.approx(1000.0, abs=1e-9)
    assert table.loc["dpo", "status"] == "finite"
    assert list(table.sort_values("rank").index[:1]) == ["champ"]


def test_a_model_not_comparable_with_the_anchor_is_undetermined():
    # sft and v both beat u outright; nothing tells sft and v apart
    rows = [battle("p1", "b_wins", a="u", b="sft"), battle("p2", "b_wins", a="u", b="v")]
    table = bt_elo(frame(rows)).set_index("model")
    assert table.loc["u", "status"] == "-inf"
    assert np.isnan(table.loc["v", "rating"]) and table.loc["v", "status"] == "undetermined"
    assert np.isnan(table.loc["v", "rank"])


def test_models_not_linked_to_the_anchor_are_an_error():
    rows = [battle("p1", "a_wins"), battle("p1", "tie", a="x", b="y")]
    with pytest.raises(InputError, match="linking them to the anchor") as err:
        bt_elo(frame(rows))
    assert "'x'" in str(err.value) and "'y'" in str(err.value)
    # only failed judgments do not link either
    with pytest.raises(InputError):
        bt_elo(frame([battle("p1", "a_wins"), battle("p1", "error", a="x")]))


def test_anchor_missing_in_a_criterion_is_an_error():
    rows = [battle("p1", "a_wins"), battle("p1", "a_wins", a="x", b="y", criterion="harm")]
    with pytest.raises(InputError, match="harm") as err:
        bt_elo(frame(rows))
    assert err.value.field == "anchor"


# --- bootstrap -------------------------------------------------------------------------------


def test_bootstrap_interval_contains_the_estimate_and_is_deterministic_per_seed():
    battles = random_battles(11)
    one = bt_elo_bootstrap(battles, rounds=200, seed=4)
    again = bt_elo_bootstrap(battles, rounds=200, seed=4)
    pd.testing.assert_frame_equal(one, again)
    point = bt_elo(battles)
    np.testing.assert_allclose(one.rating, point.rating)
    others = one[one.model != "sft"]
    assert (others.ci_low < others.rating).all() and (others.rating < others.ci_high).all()
    sft = one[one.model == "sft"].iloc[0]
    assert sft.ci_low == sft.ci_high == 1000.0
    assert (one.rank_low <= one["rank"]).all() and (one["rank"] <= one.rank_high).all()
    different = bt_elo_bootstrap(battles, rounds=200, seed=5)
    assert not np.allclose(one.ci_low, different.ci_low)


def test_bootstrap_resamples_whole_prompts_and_keeps_infinite_ends():
    # one prompt won in all 4 judgments, one lost in all 4: a resample of prompts is
    # {both won: +inf, mixed: 1000, both lost: -inf}, each extreme with probability 1/4
    rows = [battle(pid, outcome, order=order, rep=rep)
            for pid, outcome in (("p1", "a_wins"), ("p2", "b_wins"))
            for order in ("a_first", "b_first") for rep in (0, 1)]
    r = bt_elo_bootstrap(frame(rows), rounds=1000).set_index("model").loc["dpo"]
    assert r.rating == pytest.approx(1000.0, abs=1e-9)
    assert (r.ci_low, r.ci_high) == (-np.inf, np.inf)
    assert (r.rank_low, r.rank_high) == (1.0, 2.0)


def test_bootstrap_criteria_draw_from_their_own_streams():
    both = random_battles(2, criteria=("helpfulness", "harmlessness"))
    together = bt_elo_bootstrap(both, rounds=100, seed=1)
    alone = bt_elo_bootstrap(both[both.criterion == "helpfulness"], rounds=100, seed=1)
    mine = together[together.criterion == "helpfulness"].reset_index(drop=True)
    pd.testing.assert_frame_equal(mine, alone)


def test_bootstrap_rejects_bad_settings():
    battles = random_battles(0, n_prompts=3)
    with pytest.raises(InputError) as err:
        bt_elo_bootstrap(battles, rounds=0)
    assert err.value.field == "rounds"
    with pytest.raises(InputError) as err:
        bt_elo_bootstrap(battles, confidence=1.5)
    assert err.value.field == "confidence"


# --- paper mode --------------------------------------------------------------------------------


def scalar_paper_elo(battles: pd.DataFrame, anchor: str, trials: int, passes: int, k: float,
                     start: float, seed: int) -> dict[tuple[str, str], float]:
    """The paper's online Elo written out one update at a time, on the module's shuffles."""
    out = {}
    for criterion, group in battles.groupby("criterion", sort=True):
        valid = group[group.outcome != "error"]
        a, b = valid.model_a.tolist(), valid.model_b.tolist()
        score = valid.outcome.map(SCORE_A).tolist()
        models = sorted(set(group.model_a) | set(group.model_b))
        rng = stream_seed(seed, "paper_elo", str(criterion))
        finals = {m: [] for m in models}
        orders = [rng.permuted(np.broadcast_to(np.arange(len(a)), (trials, len(a))), axis=1)
                  for _ in range(passes)]
        for t in range(trials):
            r = dict.fromkeys(models, start)
            for p in range(passes):
                for i in orders[p][t]:
                    expected = 1 / (1 + 10 ** ((r[b[i]] - r[a[i]]) / 400))
                    delta = k * (score[i] - expected)
                    r[a[i]] += delta
                    r[b[i]] -= delta
            for m in models:
                finals[m].append(r[m] * 1000 / r[anchor])
        out.update({(str(criterion), m): float(np.mean(v)) for m, v in finals.items()})
    return out


def test_paper_mode_equals_the_update_rule_written_out(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(online_elo, "_BLOCK", 7)  # cross many step blocks, pad the short criterion
    both = random_battles(4, n_prompts=2, criteria=("helpfulness",))
    short = random_battles(5, models=("sft", "a", "b"), n_prompts=2, criteria=("harm",))
    battles = pd.concat([both, short], ignore_index=True)
    table = paper_elo(battles, trials=3, passes=2, k=24, start=1100, seed=9)
    expected = scalar_paper_elo(battles, "sft", trials=3, passes=2, k=24, start=1100, seed=9)
    assert len(table) == len(expected)
    for r in table.itertuples():
        assert r.rating == pytest.approx(expected[(r.criterion, r.model)], rel=1e-12)


def test_paper_mode_is_seeded_anchored_at_exactly_1000_and_labelled():
    battles = random_battles(6, n_prompts=6)
    one = paper_elo(battles, trials=5, passes=2, seed=3)
    pd.testing.assert_frame_equal(one, paper_elo(battles, trials=5, passes=2, seed=3))
    assert not np.allclose(one.rating, paper_elo(battles, trials=5, passes=2, seed=4).rating)
    assert rating(one, "sft") == 1000.0
    assert set(one["mode"]) == {"paper"}
    assert (one.trial_std[one.model != "sft"] > 0).all()


def test_paper_mode_orders_models_like_bt_on_a_clear_cut_table():
    rows = []
    strength = {"sft": 0, "weak": -1, "good": 1, "best": 2}
    for p in range(15):
        for a, b in combinations(strength, 2):
            for order in ("a_first", "b_first"):
                # the stronger side wins 4 of every 5 prompts
                stronger_wins = p % 5 != 0
                a_is_stronger = strength[a] > strength[b]
                outcome = "a_wins" if stronger_wins == a_is_stronger else "b_wins"
                rows.append(battle(f"p{p}", outcome, a, b, order))
    battles = frame(rows)
    paper = paper_elo(battles, trials=10, passes=3).sort_values("rating").model.tolist()
    bt = bt_elo(battles).sort_values("rating").model.tolist()
    assert paper == bt == ["weak", "sft", "good", "best"]


def sweep_battles(n_models: int = 8, n_prompts: int = 120) -> pd.DataFrame:
    """Every model beats the anchor on every prompt, in both orders (like the demo's
    helpfulness): the anchor's raw online rating ends below 0."""
    return frame([battle(f"p{p}", "a_wins", f"m{i}", "sft", order)
                  for p in range(n_prompts) for i in range(n_models)
                  for order in ("a_first", "b_first")])


def test_paper_mode_is_invalid_when_the_anchor_raw_rating_is_not_positive():
    battles = sweep_battles()
    crit = bradley_terry.criteria(battles, "sft")[0]
    raw = online_elo._online_elo([crit], 3, 10, 32.0, 1200.0, 0)[0]
    assert (raw[:, crit.anchor] <= 0).all()  # the degenerate case this guards against
    table = paper_elo(battles, trials=3, passes=10)
    assert not table["valid"].any() and set(table["status"]) == {"invalid"}
    assert table[["rating", "rank", "trial_std"]].isna().all().all()
    assert all("raw online rating <= 0" in r for r in table["invalid_reason"])
    # BT is unaffected: every model is +inf, the anchor 1000, all valid
    both = elo.elo_table(battles, rounds=20, paper_trials=3)
    bt = both[both["mode"] == "bt"]
    assert bt["valid"].all() and (bt["invalid_reason"] == "").all()
    md = elo.markdown_table(both)
    paper_lines = [line for line in md.splitlines() if "| paper |" in line]
    assert len(paper_lines) == 9
    for line in paper_lines:  # the rating cell says why, and no (sign-flipped) number
        rating_cell, interval, rank = line.split(" | ")[3:6]
        assert rating_cell.startswith("invalid: baseline 'sft' has a raw online rating <= 0")
        assert interval == rank == "n/a"


def test_paper_mode_stays_valid_on_normal_data():
    for seed in range(3):
        table = paper_elo(random_battles(seed, n_prompts=20), trials=10, passes=3)
        assert table["valid"].all() and (table["invalid_reason"] == "").all()
        assert np.isfinite(table["rating"]).all() and set(table["status"]) == {"finite"}


def beat_the_anchor_everywhere(n_prompts: int = 130, repetitions: int = 3) -> pd.DataFrame:
    """Three models that each beat SFT in every battle: 130 prompts x 2 orders x 3
    repetitions = 780 battles per model (the paper's helpfulness protocol)."""
    return frame([battle(f"p{p}", "a_wins", m, "sft", order, rep)
                  for p in range(n_prompts) for m in ("x", "y", "z")
                  for order in ("a_first", "b_first") for rep in range(repetitions)])


def test_paper_mode_is_invalid_when_the_rescale_stretches_more_than_twofold():
    battles = beat_the_anchor_everywhere()
    assert (battles.groupby("model_a").size() == 780).all()
    crit = bradley_terry.criteria(battles, "sft")[0]
    raw = online_elo._online_elo([crit], 50, 10, 32.0, 1200.0, 0)[0]
    anchor_raw = raw[:, crit.anchor]
    # the case the <= 0 check misses: SFT's raw rating is near-zero but positive, and the
    # rescale keeps every order, so without the bound the rows would read ~21,800, valid
    assert (anchor_raw > 0).all() and 60 < anchor_raw.mean() < 90
    unbounded = (raw * (1000.0 / anchor_raw[:, None])).mean(axis=0)
    assert unbounded[crit.models.index("x")] > 20000
    assert np.all(np.argsort(raw.mean(axis=0)) == np.argsort(unbounded))
    table = paper_elo(battles)
    assert not table["valid"].any() and set(table["status"]) == {"invalid"}
    assert table[["rating", "rank", "trial_std"]].isna().all().all()
    reason = table["invalid_reason"].iloc[0]
    assert (table["invalid_reason"] == reason).all()
    assert "outside [0.5, 2] in 50 of 50 trials" in reason and "by 13.8" in reason
    # BT keeps its limit: SFT lost every battle, so the others are +inf
    bt = bt_elo(battles).set_index("model")
    assert (bt.loc[["x", "y", "z"], "status"] == "+inf").all()


def test_the_rescale_bound_is_a_factor_of_two_either_way():
    crit = bradley_terry.criteria(frame([battle("p1", "a_wins", "a", "sft"),
                                battle("p1", "b_wins", "b", "sft"),
                                battle("p1", "tie", "a", "b")]), "sft")[0]

    def reasons(anchor_raw: float) -> list[str]:
        raw = np.array([[1300.0, 900.0, 1000.0], [1300.0, 900.0, anchor_raw]])
        return online_elo._paper_invalid_reasons(crit, raw, (raw * 1000 / raw[:, [2]]).mean(axis=0))

    assert online_elo.PAPER_MAX_RESCALE == 2.0
    assert reasons(520.0) == reasons(1950.0) == [""] * 3  # x1.92 and x0.51: inside
    assert reasons(500.0) == reasons(2000.0) == [""] * 3  # the bound itself is allowed
    for outside, factor in ((480.0, "2.08"), (2100.0, "0.48")):
        got = reasons(outside)
        assert len(set(got)) == 1 and "outside [0.5, 2] in 1 of 2 trials" in got[0]
        assert factor in got[0]


def test_paper_mode_marks_models_whose_bradley_terry_rating_is_infinite():
    battles = random_battles(3, n_prompts=10)
    others = ("sft", "a", "b", "c")
    extra = [battle(f"p{p}", "a_wins", "champ", o, order) for p in range(10) for o in others
             for order in ("a_first", "b_first")]
    extra += [battle(f"p{p}", "b_wins", "dud", o, order) for p in range(10) for o in others
              for order in ("a_first", "b_first")]
    battles = pd.concat([battles, frame(extra)], ignore_index=True)
    bt = bt_elo(battles).set_index("model")
    assert bt.loc["champ", "status"] == "+inf" and bt.loc["dud", "status"] == "-inf"
    crit = bradley_terry.criteria(battles, "sft")[0]
    raw = online_elo._online_elo([crit], 10, 3, 32.0, 1200.0, 0)[0]
    factor = 1000.0 / raw[:, crit.anchor]
    assert ((factor > 0.5) & (factor < 2)).all()  # not the criterion-wide rule
    table = paper_elo(battles, trials=10, passes=3).set_index("model")
    assert not table.loc["champ", "valid"] and not table.loc["dud", "valid"]
    assert table.loc["champ", "invalid_reason"].startswith(
        "its Bradley-Terry rating is +inf (it never loses to 'sft''s group)")
    assert table.loc["dud", "invalid_reason"].startswith("its Bradley-Terry rating is -inf")
    assert np.isnan(table.loc[["champ", "dud"], "rating"]).all()
    finite = table.loc[list(others)]
    assert finite["valid"].all() and np.isfinite(finite["rating"]).all()
    assert finite.loc["sft", "rating"] == 1000.0


def test_paper_mode_marks_models_whose_order_the_rescale_reverses():
    crit = bradley_terry.criteria(frame([battle("p1", "a_wins", "a", "sft"),
                                battle("p1", "b_wins", "b", "sft"),
                                battle("p1", "tie", "a", "b")]), "sft")[0]
    assert crit.models == ["a", "b", "sft"]
    # trial 1: anchor 550 (rescale x1.82, inside the bound), a 1100, b 990;
    # trial 2: anchor 1000, a 1000, b 1150
    raw = np.array([[1100.0, 990.0, 550.0], [1000.0, 1150.0, 1000.0]])
    rescaled = (raw * (1000.0 / raw[:, [2]])).mean(axis=0)  # a 1500 > b 1475
    assert raw.mean(axis=0)[1] > raw.mean(axis=0)[0]  # but raw b 1070 > a 1050
    reasons = online_elo._paper_invalid_reasons(crit, raw, rescaled)
    assert reasons[0] == "the multiplicative rescale reverses its order against ['b']"
    assert reasons[1] == "the multiplicative rescale reverses its order against ['a']"
    assert reasons[2] == ""
    ok = np.array([[1100.0, 990.0, 550.0], [1200.0, 1100.0, 1000.0]])
    rescaled = (ok * 1000 / ok[:, [2]]).mean(axis=0)
    assert online_elo._paper_invalid_reasons(crit, ok, rescaled) == [""] * 3


def test_cli_writes_invalid_paper_rows_without_numbers(tmp_path: Path):
    path = write_battles(tmp_path / "b.jsonl", sweep_battles().to_dict(orient="records"))
    out_csv, out_md = tmp_path / "elo.csv", tmp_path / "elo.md"
    elo.main(["--battles", str(path), "--mode", "paper", "--paper-trials", "2",
              "--out-csv", str(out_csv), "--out-md", str(out_md)])
    csv = pd.read_csv(out_csv)
    assert csv["rating"].isna().all() and not csv["valid"].any()
    assert csv["invalid_reason"].str.contains("<= 0").all()
    assert out_md.read_text().count("invalid: baseline 'sft'") == 9


# --- the table, the Markdown and the CLI --------------------------------------------------------


def write_battles(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_writes_csv_and_markdown_with_both_modes(tmp_path: Path):
    battles = random_battles(8, n_prompts=6, criteria=("helpfulness", "harmlessness"))
    path = write_battles(tmp_path / "b.jsonl", battles.to_dict(orient="records"))
    out_csv, out_md = tmp_path / "out" / "elo.csv", tmp_path / "out" / "elo.md"
    elo.main(["--battles", str(path), "--anchor", "sft", "--rounds", "50", "--seed", "2",
              "--mode", "both", "--out-csv", str(out_csv), "--out-md", str(out_md),
              "--log", str(tmp_path / "elo.log")])
    csv = pd.read_csv(out_csv)
    assert list(csv.columns) == list(elo.ELO_COLUMNS)
    assert len(csv) == 2 * 2 * 4
    assert list(csv.criterion.unique()) == ["harmlessness", "helpfulness"]
    assert list(csv["mode"].unique()) == ["bt", "paper"]
    bt = csv[csv["mode"] == "bt"]
    assert bt.ci_low.notna().all() and csv[csv["mode"] == "paper"].ci_low.isna().all()
    assert (csv[csv.model == "sft"].rating == 1000.0).all()
    md = out_md.read_text()
    assert md.startswith("| criterion | mode | model | rating | 95% interval |")
    assert "paper" in md and "trial std" in md
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_cli_keeps_infinite_ratings_readable(tmp_path: Path):
    rows = [battle(f"p{i}", "a_wins") for i in range(3)] + [battle("p9", "tie", a="x")]
    path = write_battles(tmp_path / "b.jsonl", rows)
    out_csv, out_md = tmp_path / "elo.csv", tmp_path / "elo.md"
    elo.main(["--battles", str(path), "--mode", "bt", "--rounds", "20", "--out-csv",
              str(out_csv), "--out-md", str(out_md)])
    csv = pd.read_csv(out_csv).set_index("model")
    assert csv.loc["dpo", "rating"] == np.inf and csv.loc["dpo", "status"] == "+inf"
    assert "+inf" in out_md.read_text()


def test_cli_failure_writes_nothing_and_exits_2(tmp_path: Path):
    path = write_battles(tmp_path / "b.jsonl", [battle("p1", "a_wins", a="x", b="y")])
    out_csv, out_md = tmp_path / "out" / "elo.csv", tmp_path / "out" / "elo.md"
    with pytest.raises(SystemExit) as exit_info:
        dispatch(["elo", "--battles", str(path), "--out-csv", str(out_csv), "--out-md",
                  str(out_md)])
    assert exit_info.value.code == 2
    assert not out_csv.exists() and not out_md.exists()



# --- fits per family ---------------------------------------------------------------------------


def family_world() -> pd.DataFrame:
    """a beats sft on 3 of 4 prompts; c ties sft and beats a on 3 of 4: pooled, c drags
    a's rating down, a family without c sees none of it. b splits with sft, loses to a."""
    rows = [battle(f"p{i}", o, "a", "sft") for i, o in
            enumerate(["a_wins", "a_wins", "a_wins", "b_wins"])]
    rows += [battle(f"p{i}", "tie", "c", "sft") for i in range(4)]
    rows += [battle(f"p{i}", o, "c", "a") for i, o in
             enumerate(["a_wins", "a_wins", "a_wins", "b_wins"])]
    rows += [battle(f"p{i}", o, "b", "sft") for i, o in enumerate(["a_wins", "b_wins"] * 2)]
    rows += [battle(f"p{i}", "a_wins", "a", "b") for i in range(4)]
    return frame(rows)


def test_a_family_is_fitted_from_its_own_battles_only():
    battles = family_world()
    table = elo.family_elo_table(battles, {"solo": ["a"], "ab": ["a", "b"]}, mode="bt",
                                 rounds=50)
    assert list(table.columns) == list(elo.FAMILY_COLUMNS)
    solo = table[table["fit"] == "solo"].set_index("model")
    pooled = table[table["fit"] == "pooled"].set_index("model")
    # a vs sft only: 3 of 4, the closed form; pooled, c's 3-of-4 wins over a pull it down
    assert set(solo.index) == {"a", "sft"}
    assert solo.loc["a", "rating"] == pytest.approx(ELO_75, abs=1e-6)
    assert pooled.loc["a", "rating"] < ELO_75 - 30  # measured: 1147.2 vs 1190.8
    assert solo.loc["a", "n"] == 4 and pooled.loc["a", "n"] == 12
    # ab: a, b and sft, with no battle of c: the BT fit of the table without c
    ab = table[table["fit"] == "ab"].set_index("model")
    assert set(ab.index) == {"a", "b", "sft"} and ab.loc["b", "n"] == 8
    alone = bt_elo(battles[(battles.model_a != "c") & (battles.model_b != "c")])
    assert ab.loc["a", "rating"] == pytest.approx(rating(alone, "a"), abs=1e-9)
    assert ab.loc["a", "rating"] != pytest.approx(pooled.loc["a", "rating"], abs=1.0)
    # the pooled rows are exactly the elo table (elo.csv); sorted pooled first
    plain = elo.elo_table(battles, mode="bt", rounds=50)
    pd.testing.assert_frame_equal(
        table[table["fit"] == "pooled"].drop(columns="fit").reset_index(drop=True), plain)
    assert list(dict.fromkeys(table["fit"])) == ["pooled", "solo", "ab"]


def test_family_fits_in_paper_mode_use_the_family_battles_and_their_own_streams():
    battles = random_battles(4, models=("sft", "a", "b", "c", "d"), n_prompts=8)
    table = elo.family_elo_table(battles, {"abc": ["a", "b", "c"]}, mode="paper",
                                 paper_trials=4, paper_passes=2, seed=1)
    fam = table[table["fit"] == "abc"].set_index("model")
    part = elo.family_battles(battles, ["a", "b", "c"], "sft")
    assert set(part.model_a) | set(part.model_b) == {"sft", "a", "b", "c"}
    assert len(part) < len(battles)  # d's battles are left out
    own = paper_elo(part, trials=4, passes=2, seed=1, fit="abc").set_index("model")
    assert sorted(fam.index) == ["a", "b", "c", "sft"]
    for column in ("rating", "trial_std", "n"):
        np.testing.assert_allclose(fam[column].astype(float),
                                   own.loc[fam.index, column].astype(float))
    # the pooled fit of the same criterion saw d too: other numbers
    pooled = table[table["fit"] == "pooled"].set_index("model")
    assert (pooled.loc[fam.index, "n"] > fam["n"]).all()
    # same battles with the pooled streams: another shuffle, so other numbers
    shared = paper_elo(part, trials=4, passes=2, seed=1).set_index("model")
    assert not np.allclose(own.loc[["a", "b", "c"], "rating"],
                           shared.loc[["a", "b", "c"], "rating"])


@pytest.mark.parametrize(("families", "field", "words"), [
    ({"pooled": ["a"]}, "families.pooled", ["pooled"]),
    ({"f": ["sft"]}, "families.f", ["other than the anchor"]),
    ({"f": []}, "families.f", ["non-empty"]),
    ({"f": ["a", "a"]}, "families.f", ["twice"]),
    ({"f": ["a", "ghost"]}, "families.f", ["ghost", "no battles"]),
    (["a"], "families", ["map"]),
])
def test_bad_families_are_refused_naming_the_family(families, field, words):
    with pytest.raises(InputError) as err:
        elo.family_elo_table(family_world(), families, mode="bt", rounds=10)
    assert err.value.field == field
    assert all(w in str(err.value) for w in words)


def test_cli_writes_the_family_tables_and_leaves_elo_csv_as_without_families(tmp_path: Path):
    battles = random_battles(8, n_prompts=6, criteria=("helpfulness", "harmlessness"))
    path = write_battles(tmp_path / "b.jsonl", battles.to_dict(orient="records"))
    common = ["--battles", str(path), "--rounds", "30", "--paper-trials", "3",
              "--paper-passes", "2"]
    elo.main([*common, "--out-csv", str(tmp_path / "plain.csv"),
              "--out-md", str(tmp_path / "plain.md")])
    out = {k: tmp_path / f"{k}" for k in ("elo.csv", "elo.md", "fam.csv", "fam.md")}
    elo.main([*common, "--families", json.dumps({"ab": ["a", "b"], "c": ["c"]}),
              "--out-csv", str(out["elo.csv"]), "--out-md", str(out["elo.md"]),
              "--out-families-csv", str(out["fam.csv"]), "--out-families-md", str(out["fam.md"])])
    assert out["elo.csv"].read_bytes() == (tmp_path / "plain.csv").read_bytes()
    assert out["elo.md"].read_bytes() == (tmp_path / "plain.md").read_bytes()
    fam = pd.read_csv(out["fam.csv"])
    assert list(fam.columns) == list(elo.FAMILY_COLUMNS)
    assert list(dict.fromkeys(fam["fit"])) == ["pooled", "ab", "c"]
    # per criterion and mode: 4 pooled rows, 3 for ab (with sft), 2 for c
    assert fam.groupby(["criterion", "mode"])["fit"].value_counts().to_dict() == {
        (crit, mode, fit): n for crit in ("harmlessness", "helpfulness")
        for mode in ("bt", "paper") for fit, n in (("pooled", 4), ("ab", 3), ("c", 2))}
    md = out["fam.md"].read_text()
    assert md.startswith("| criterion | fit | mode | model | rating |")
    assert "| helpfulness | ab | bt |" in md and "fit `pooled`" in md
    # families and their outputs go together; bad JSON names the field
    with pytest.raises(InputError) as err:
        elo.main([*common, "--families", '{"ab": ["a"]}', "--out-csv", str(tmp_path / "x.csv"),
                  "--out-md", str(tmp_path / "x.md")])
    assert err.value.field == "out_families_csv"
    with pytest.raises(InputError) as err:
        elo.main([*common, "--families", "{ab", "--out-csv", str(tmp_path / "x.csv"),
                  "--out-md", str(tmp_path / "x.md")])
    assert err.value.field == "families"
    assert not (tmp_path / "x.csv").exists()


# --- win-rate table: repetition mean and std -----------------------------------------------------


def test_rep_mean_and_std_over_repetitions_use_ddof_0():
    # rep 0: 3 of 4 won; rep 1: 1 of 4 won, 1 tie -> 0.375; rep 2: 2 of 4 -> 0.5
    outcomes = {0: ["a_wins"] * 3 + ["b_wins"], 1: ["a_wins", "tie", "b_wins", "b_wins"],
                2: ["a_wins", "a_wins", "b_wins", "b_wins"]}
    rows = [battle(f"p{i // 2}", o, order=("a_first", "b_first")[i % 2], rep=rep)
            for rep, seq in outcomes.items() for i, o in enumerate(seq)]
    rows.append(battle("p9", "error", rep=2))
    r = win_rates(frame(rows), "sft", rounds=50).iloc[0]
    per_rep = [0.75, 0.375, 0.5]
    assert r.rep_mean == pytest.approx(np.mean(per_rep))
    assert r.rep_std == pytest.approx(np.std(per_rep, ddof=0))


def test_rep_std_is_nan_with_one_repetition():
    rows = [battle(f"p{i}", o) for i, o in enumerate(["a_wins"] * 3 + ["b_wins"])]
    r = win_rates(frame(rows), "sft", rounds=50).iloc[0]
    assert r.rep_mean == pytest.approx(0.75) and np.isnan(r.rep_std)


def test_winrate_markdown_extra_columns(tmp_path: Path):
    rows = [battle(f"p{i}", o, order=order, rep=rep)
            for i, o in enumerate(["a_wins", "a_wins", "tie", "b_wins"])
            for order in ("a_first", "b_first") for rep in (0, 1)]
    rows[0]["outcome"] = "b_wins"  # repetitions differ a little; one order disagrees
    path = write_battles(tmp_path / "b.jsonl", rows)
    out_csv, out_md = tmp_path / "w.csv", tmp_path / "w.md"
    winrate.main(["--battles", str(path), "--baseline", "sft", "--rounds", "50",
                  "--out-csv", str(out_csv), "--out-md", str(out_md), "--extra-columns"])
    csv = pd.read_csv(out_csv)
    assert {"rep_mean", "rep_std", "position_consistency"} <= set(csv.columns)
    header, _, row = out_md.read_text().splitlines()
    assert header.endswith("| n | position consistency | mean ± std (reps) |")
    r = csv.iloc[0]
    assert row.endswith(f"| {r.position_consistency:.3f} | {r.rep_mean:.3f} ± {r.rep_std:.3f} |")
