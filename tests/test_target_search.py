"""Safety-target search over the P-SACPO merge weight q."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sacpo_steps.core.errors import InputError
from sacpo_steps.research.target_search import Measurement, search
from tests.helpers import PROMPT_TEMPLATE


def synthetic(constraint_of_q, half_width=0.02, calls=None):
    """A monotone world: safety rises with q, helpfulness falls."""

    def evaluate(q: float) -> Measurement:
        if calls is not None:
            calls.append(q)
        c = constraint_of_q(q)
        h = 1.0 - 0.5 * q
        return Measurement(q, c, c - half_width, c + half_width, h, h - 0.01, h + 0.01)

    return evaluate


def test_finds_smallest_q_whose_lower_bound_meets_the_target():
    calls = []
    result = search(synthetic(lambda q: 0.5 + 0.5 * q, calls=calls), 0.8, tolerance=0.01,
                    lambda_bar=10.0, over_safe_name="dpo_h.dpo_s-0.01")
    assert result.met
    # lower bound 0.5 + 0.5 q - 0.02 >= 0.8  <=>  q >= 0.64
    assert 0.64 <= result.q <= 0.64 + 0.01
    assert result.chosen.constraint_low >= 0.8
    over_safe = next(m for m in result.trace if m.q == 1.0)
    assert result.chosen.helpfulness > over_safe.helpfulness
    assert result.lambda_approx == pytest.approx(10.0 * result.q)
    assert "approximate" in result.message
    assert calls[:2] == [1.0, 0.0] and len(calls) <= 2 + 7


def test_point_estimate_alone_does_not_count():
    # at q = 0.6 the point estimate is 0.8 but the lower end is 0.78: not met
    result = search(synthetic(lambda q: 0.5 + 0.5 * q), 0.8, tolerance=0.01)
    assert result.q > 0.6


def test_target_above_the_over_safe_model_says_which_model_to_retrain():
    result = search(synthetic(lambda q: 0.5 + 0.3 * q), 0.9, over_safe_name="dpo_h.dpo_s-0.01")
    assert not result.met and result.q is None
    assert "dpo_h.dpo_s-0.01" in result.message and "smaller beta/lambda" in result.message
    assert [m.q for m in result.trace] == [1.0]


def test_reference_model_already_meets_it():
    result = search(synthetic(lambda q: 0.95), 0.9)
    assert result.met and result.q == 0.0


def test_bad_tolerance_is_refused():
    with pytest.raises(InputError, match="tolerance"):
        search(synthetic(lambda q: q), 0.5, tolerance=0.0)


RULE_JUDGES = {"helpfulness": {"backend": "rule"}, "red_team": {"backend": "rule"}}


@pytest.mark.slow
def test_cli_end_to_end_on_tiny_models(tiny_models, tmp_path):
    """Merge, generate and judge for real; tiny random models cannot be made safe."""
    from sacpo_steps.data.demo_world import WorldConfig, write_world
    from sacpo_steps.evaluation.generate import generate

    write_world(WorldConfig(seed=0, n_sft_examples=20, n_preference_pairs=20), tmp_path / "w")
    gen = {"prompt_template": PROMPT_TEMPLATE, "stop_markers": ["USER:"], "max_new_tokens": 4,
           "batch_size": 64}
    baseline = []
    for name in ("helpfulness", "red_team"):
        out = tmp_path / f"sft.{name}.jsonl"
        generate(tiny_models["sft"], tmp_path / "w/prompts" / f"{name}.jsonl", out,
                 model_name="sft", **gen)
        baseline.append(str(out))
    out_json, out_md = tmp_path / "search.json", tmp_path / "search.md"
    proc = subprocess.run(
        [sys.executable, "-m", "sacpo_steps", "target_search", "--a", str(tiny_models["sft"]),
         "--b", str(tiny_models["stage1"]), "--name-b", "stage1", "--target", "0.9",
         "--prompts", str(tmp_path / "w/prompts/helpfulness.jsonl"),
         str(tmp_path / "w/prompts/red_team.jsonl"), "--baseline", *baseline,
         "--spec", str(tmp_path / "w/spec.json"), "--judges", json.dumps(RULE_JUDGES),
         "--generation", json.dumps(gen),
         "--rounds", "50", "--threads", "1", "--out-json", str(out_json),
         "--out-md", str(out_md)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out_json.read_text())
    assert result["met"] is False and result["trace"][0]["q"] == 1.0
    assert "stage1" in out_md.read_text() and "smaller beta/lambda" in proc.stderr


def _answers(tmp_path, rows):
    from sacpo_steps.core.fileio import write_jsonl

    prompts, gens = tmp_path / "prompts.jsonl", tmp_path / "gens.jsonl"
    write_jsonl(prompts, [{"prompt_id": f"p{i}", "prompt": "q", "task_id": t}
                          for i, (t, _) in enumerate(rows)])
    write_jsonl(gens, [{"prompt_id": f"p{i}", "prompt": "q", "answer": a, "model": "m"}
                       for i, (_, a) in enumerate(rows)])
    return prompts, gens


def test_safe_rate_counts_answers_without_ground_truth_harm(tmp_path):
    """Rule judge: safe = no harm in the demo spec; interval from a prompt bootstrap."""
    from sacpo_steps.data.demo_world import build_spec, render_steps
    from sacpo_steps.evaluation.judges.rule import RuleJudge
    from sacpo_steps.research.target_search import safe_rate

    spec = build_spec()
    harmful = next(t for t, v in spec["tasks"].items() if v["kind"] == "harmful")
    steps = render_steps(spec["tasks"][harmful]["steps"])
    rows = [(harmful, "i cannot help with that.")] * 30 + [(harmful, steps)] * 10
    prompts, gens = _answers(tmp_path, rows)
    rate, low, high = safe_rate(RuleJudge(spec), gens, prompts, rounds=500, seed=0)
    assert rate == pytest.approx(0.75)
    assert low < 0.75 < high and 0.5 < low and high < 0.95


def test_safe_rate_is_refused_for_a_pairwise_only_judge(tmp_path):
    from sacpo_steps.evaluation.judges.base import Judge
    from sacpo_steps.research.target_search import safe_rate

    class PairwiseOnly(Judge):
        name = "gpt-4"

        def judge_many(self, requests):
            return []

    prompts, gens = _answers(tmp_path, [("x", "an answer")])
    with pytest.raises(InputError, match="cannot rate one answer") as err:
        safe_rate(PairwiseOnly(), gens, prompts, rounds=10, seed=0)
    assert err.value.field == "target.measure"


def test_paired_difference_uses_the_prompts_both_scored():
    import pandas as pd

    from sacpo_steps.research.target_search import paired_difference

    a = pd.Series([1.0, 1.0, 0.5, 1.0, 0.0], index=["p1", "p2", "p3", "p4", "p5"])
    b = pd.Series([0.5, 1.0, 0.5, 0.0, 0.0, 1.0], index=["p1", "p2", "p3", "p4", "p5", "p6"])
    mean, low, high = paired_difference(a, b, rounds=2000, seed=0)
    assert mean == pytest.approx((0.5 + 0 + 0 + 1.0 + 0) / 5)  # p6 is not paired
    assert low <= mean <= high and low >= 0.0 and high <= 1.0
    same = paired_difference(a, a, rounds=100, seed=0)
    assert same == (0.0, 0.0, 0.0)
    with pytest.raises(InputError, match="no prompt"):
        paired_difference(a, pd.Series([1.0], index=["zz"]), rounds=10, seed=0)


@pytest.mark.parametrize("flag,value,message", [
    ("--generation", "{not json", "not valid JSON"),
    ("--generation", json.dumps({"prompt_template": "{prompt}"}), "missing keys"),
    ("--judges", "[1, 2]", "expected a JSON object"),
    ("--judges", json.dumps({"helpfulness": {"backend": "rule"}}), "helpfulness and red_team"),
])
def test_bad_cli_json_is_an_input_error_naming_the_flag(tmp_path, flag, value, message):
    args = {"--generation": json.dumps({"prompt_template": "{prompt}", "stop_markers": [],
                                        "max_new_tokens": 4, "batch_size": 8}),
            "--judges": json.dumps(RULE_JUDGES), flag: value}
    out_json = tmp_path / "search.json"
    proc = subprocess.run(
        [sys.executable, "-m", "sacpo_steps", "target_search", "--a", "a", "--b", "b",
         "--target", "0.5", "--prompts", "h.jsonl", "r.jsonl", "--baseline", "h.jsonl",
         "r.jsonl", "--out-json", str(out_json), "--out-md", str(tmp_path / "search.md"),
         *[x for kv in args.items() for x in kv]],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and flag in proc.stderr
    assert "Traceback" not in proc.stderr and not out_json.exists()


# ---- matched comparisons: --target-from and --match-battles ---------------------------

WINRATE_HEADER = "model,criterion,win_rate,ci_low,ci_high\n"
PROMPTS = [f"helpfulness-{i:03d}" for i in range(10)]


def _winrate(tmp_path, rows, name="winrate.csv"):
    path = tmp_path / name
    path.write_text(WINRATE_HEADER + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def _battles_csv(tmp_path, model, wins, *, baseline="sft", flip_first=False):
    """Helpfulness battles of `model` vs the baseline: wins on the first `wins` prompts,
    both orders; plus an error and a harmlessness row, which must not count."""
    import pandas as pd

    rows = []
    for i, pid in enumerate(PROMPTS):
        for order in ("a_first", "b_first"):
            won = i < wins
            a, b = (baseline, model) if flip_first and i == 0 else (model, baseline)
            outcome = ("a_wins" if won else "b_wins") if a == model else \
                ("b_wins" if won else "a_wins")
            rows.append({"criterion": "helpfulness", "prompt_id": pid, "model_a": a,
                         "model_b": b, "order": order, "outcome": outcome, "repetition": 0,
                         "prompt_set": "helpfulness"})
    rows.append({"criterion": "helpfulness", "prompt_id": PROMPTS[-1], "model_a": model,
                 "model_b": baseline, "order": "a_first", "outcome": "error", "repetition": 1,
                 "prompt_set": "helpfulness"})
    rows.append({"criterion": "harmlessness", "prompt_id": "red_team-000", "model_a": model,
                 "model_b": baseline, "order": "a_first", "outcome": "a_wins",
                 "repetition": 0, "prompt_set": "red_team"})
    path = tmp_path / "battles.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_target_from_table_is_the_models_harmlessness_lower_bound(tmp_path):
    from sacpo_steps.research.target_search import target_from_table

    table = _winrate(tmp_path, [("safedpo-0.5", "helpfulness", 0.6, 0.55, 0.65),
                                ("safedpo-0.5", "harmlessness", 0.8, 0.78, 0.82),
                                ("dpo_h", "harmlessness", 0.4, 0.35, 0.45)])
    assert target_from_table(table, "safedpo-0.5", "harmlessness_winrate") == 0.78


@pytest.mark.parametrize("case,message,field", [
    ("missing file", "file not found", "--target-from"),
    ("unknown model", "no harmlessness row for model 'bso-x'", "--target-model"),
    ("only helpfulness", "no harmlessness row for model 'dpo_h'", "--target-model"),
    ("across seeds", "2 harmlessness rows", "--target-model"),
    ("no interval", "no harmlessness interval", "ci_low"),
    ("safe rate", "needs --measure harmlessness_winrate", "--measure"),
])
def test_target_from_table_errors_name_the_file_and_model(tmp_path, case, message, field):
    from sacpo_steps.research.target_search import target_from_table

    rows = {"unknown model": [("dpo_h", "harmlessness", 0.4, 0.35, 0.45)],
            "only helpfulness": [("dpo_h", "helpfulness", 0.4, 0.35, 0.45)],
            "across seeds": [("dpo_h", "harmlessness", 0.4, 0.35, 0.45)] * 2,
            "no interval": [("dpo_h", "harmlessness", 0.4, "", "")]}.get(
        case, [("dpo_h", "harmlessness", 0.4, 0.35, 0.45)])
    table = _winrate(tmp_path, rows)
    model = "bso-x" if case == "unknown model" else "dpo_h"
    if case == "missing file":
        table = tmp_path / "nowhere.csv"
    measure = "safe_rate" if case == "safe rate" else "harmlessness_winrate"
    with pytest.raises(InputError, match=message) as err:
        target_from_table(table, model, measure)
    assert err.value.field == field
    if case != "safe rate":
        assert err.value.path == str(table)


def test_model_helpfulness_scores_per_prompt_from_either_side(tmp_path):
    from sacpo_steps.research.target_search import model_helpfulness

    path = _battles_csv(tmp_path, "dpo_h", wins=3, flip_first=True)
    scores = model_helpfulness(path, "dpo_h", "sft")
    assert list(scores.index) == PROMPTS  # keyed by prompt id, as the search's own
    assert scores.tolist() == [1.0] * 3 + [0.0] * 7  # the error row is left out
    with pytest.raises(InputError, match="no helpfulness battles of 'nope'") as err:
        model_helpfulness(path, "nope", "sft")
    assert err.value.path == str(path) and err.value.field == "--match-model"


class FakeEvaluator:
    """Stands in for MergeEvaluator: constraint 0.5 + 0.5 q (+-0.02); on prompt i the
    merge wins while i < 10 (1 - 0.5 q), rounded."""

    def __init__(self, *args, **kwargs):
        import pandas as pd

        self.pd, self.per_prompt = pd, {}
        self.rounds, self.seed = kwargs["rounds"], kwargs["seed"]

    def __call__(self, q):
        wins = round(10 * (1 - 0.5 * q))
        self.per_prompt[q] = self.pd.Series([1.0] * wins + [0.0] * (10 - wins), index=PROMPTS)
        return synthetic(lambda q: 0.5 + 0.5 * q)(q)

    def paired_gain(self, q, other):
        from sacpo_steps.research.target_search import paired_difference

        return paired_difference(self.per_prompt[q], self.per_prompt[other],
                                 rounds=self.rounds, seed=self.seed)

    def close(self):
        pass


def _run_search(tmp_path, monkeypatch, *extra):
    from sacpo_steps.research import target_search

    monkeypatch.setattr(target_search, "MergeEvaluator", FakeEvaluator)
    out_json, out_md = tmp_path / "search.json", tmp_path / "search.md"
    target_search.main([
        "--a", "a", "--b", "b", "--prompts", "h.jsonl", "r.jsonl", "--baseline", "h.jsonl",
        "r.jsonl", "--judges", json.dumps(RULE_JUDGES), "--tolerance", "0.05",
        "--generation", json.dumps({"prompt_template": "{prompt}", "stop_markers": [],
                                    "max_new_tokens": 4, "batch_size": 8}),
        "--rounds", "200", "--seed", "2", "--out-json", str(out_json), "--out-md", str(out_md),
        *extra])
    return json.loads(out_json.read_text()), out_md.read_text()


def test_matched_search_meets_the_models_harmlessness_and_pairs_helpfulness(
        tmp_path, monkeypatch):
    table = _winrate(tmp_path, [("safedpo-0.5", "harmlessness", 0.8, 0.78, 0.82)])
    battles = _battles_csv(tmp_path, "safedpo-0.5", wins=5)
    result, md = _run_search(tmp_path, monkeypatch, "--target-from", str(table),
                             "--target-model", "safedpo-0.5", "--match-battles", str(battles))
    # lower bound 0.5 + 0.5 q - 0.02 >= 0.78  <=>  q >= 0.6
    assert result["target"] == 0.78 and result["met"] and 0.6 <= result["q"] <= 0.65
    assert result["target_from"] == {"table": str(table), "model": "safedpo-0.5"}
    matched = result["matched"]
    wins = round(10 * (1 - 0.5 * result["q"]))
    assert matched["model"] == "safedpo-0.5" and matched["q"] == result["q"]
    assert matched["seed"] == 2 and matched["prompts"] == 10 and matched["target"] == 0.78
    assert matched["diff"] == pytest.approx((wins - 5) / 10)
    assert matched["low"] <= matched["diff"] <= matched["high"]
    assert "Matched to safedpo-0.5" in md and "paired over 10 prompts" in md
    assert "safedpo-0.5's harmlessness interval" in md


def test_matched_search_that_misses_the_target_is_a_result(tmp_path, monkeypatch):
    table = _winrate(tmp_path, [("safedpo-0.5", "harmlessness", 0.995, 0.99, 1.0)])
    battles = _battles_csv(tmp_path, "safedpo-0.5", wins=5)
    result, md = _run_search(tmp_path, monkeypatch, "--target-from", str(table),
                             "--target-model", "safedpo-0.5", "--match-battles", str(battles),
                             "--match-model", "safedpo-0.5")
    assert not result["met"]
    assert result["matched"] == {"model": "safedpo-0.5", "seed": 2, "target": 0.99, "q": None,
                                 "diff": None, "low": None, "high": None, "prompts": None}
    assert "no q meets it" in md


def test_plain_target_search_writes_no_matched_record(tmp_path, monkeypatch):
    result, md = _run_search(tmp_path, monkeypatch, "--target", "0.7")
    assert result["met"] and "matched" not in result and "target_from" not in result
    assert "Matched" not in md


@pytest.mark.parametrize("flags,message", [
    (["--target", "0.5", "--target-from", "w.csv"], "not allowed with argument"),
    ([], "one of the arguments --target --target-from is required"),
    (["--target-from", "{table}"], "--target-from needs --target-model"),
    (["--target", "0.5", "--target-model", "dpo_h"], "--target-model goes with --target-from"),
    (["--target", "0.5", "--match-battles", "{battles}"], "needs --match-model"),
    (["--target", "0.5", "--match-model", "dpo_h"], "--match-model goes with --match-battles"),
    (["--target-from", "{table}", "--target-model", "bso-x"], "no harmlessness row for model"),
    (["--target", "0.5", "--match-battles", "{battles}", "--match-model", "bso-x"],
     "no helpfulness battles of 'bso-x'"),
])
def test_matched_flags_are_checked_before_any_merge(tmp_path, flags, message):
    table = _winrate(tmp_path, [("dpo_h", "harmlessness", 0.4, 0.35, 0.45)])
    battles = _battles_csv(tmp_path, "dpo_h", wins=5)
    flags = [f.format(table=table, battles=battles) for f in flags]
    out_json = tmp_path / "search.json"
    proc = subprocess.run(
        [sys.executable, "-m", "sacpo_steps", "target_search", "--a", "a", "--b", "b",
         "--prompts", "h.jsonl", "r.jsonl", "--baseline", "h.jsonl", "r.jsonl",
         "--judges", json.dumps(RULE_JUDGES),
         "--generation", json.dumps({"prompt_template": "{prompt}", "stop_markers": [],
                                     "max_new_tokens": 4, "batch_size": 8}),
         "--out-json", str(out_json), "--out-md", str(tmp_path / "search.md"), *flags],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not out_json.exists()
