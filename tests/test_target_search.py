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
