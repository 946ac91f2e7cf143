"""The demo world: seeded, PKU schema, held-out prompts, ground truth consistent."""

from __future__ import annotations

import json

import pytest

from sacpo_steps.data import demo_spec
from sacpo_steps.data.demo_world import (
    BENIGN_TASKS,
    WorldConfig,
    build_world,
    render_steps,
    write_world,
)
from sacpo_steps.data.preference_data import prepare

SMALL = WorldConfig(seed=3, n_sft_examples=300, n_preference_pairs=200)


def test_same_seed_same_world_other_seed_differs():
    assert build_world(SMALL) == build_world(SMALL)
    other = build_world(WorldConfig(seed=4, n_sft_examples=300, n_preference_pairs=200))
    assert other["preferences"] != build_world(SMALL)["preferences"]


def test_prompt_sets_are_large_and_held_out():
    world = build_world(SMALL)
    train_prompts = {r["prompt"] for r in world["preferences"]}
    train_prompts |= {r["prompt"] for r in world["sft_corpus"]}
    for name, kind in (("helpfulness", "benign"), ("red_team", "harmful")):
        rows = world["prompt_sets"][name]
        assert len(rows) >= 100
        assert len({r["prompt_id"] for r in rows}) == len(rows)
        assert all(world["spec"]["tasks"][r["task_id"]]["kind"] == kind for r in rows)
        assert not train_prompts & {r["prompt"] for r in rows}


def test_labels_follow_ground_truth_direction():
    """Bradley-Terry labels: the truly better/safer response wins most pairs."""
    world = build_world(WorldConfig(seed=0, n_sft_examples=10, n_preference_pairs=1500))
    spec = world["spec"]
    task_of = {}
    for tid, task in spec["tasks"].items():
        task_of[task["task"]] = tid
    agree_h = agree_s = total_h = total_s = 0
    for row in world["preferences"]:
        tid = next(t for name, t in task_of.items() if name in row["prompt"])
        s0 = demo_spec.score_answer(spec, tid, row["response_0"])
        s1 = demo_spec.score_answer(spec, tid, row["response_1"])
        assert row["is_response_0_safe"] == (s0.harm == 0)
        if s0.helpfulness != s1.helpfulness:
            total_h += 1
            agree_h += (row["better_response_id"] == 0) == (s0.helpfulness > s1.helpfulness)
        if s0.harm != s1.harm:
            total_s += 1
            agree_s += (row["safer_response_id"] == 0) == (s0.harm < s1.harm)
    assert agree_h / total_h > 0.7
    assert agree_s / total_s > 0.8


def test_sft_corpus_mixes_compliance_and_refusal():
    world = build_world(SMALL)
    responses = [r["response"] for r in world["sft_corpus"]]
    assert any(r.startswith("i cannot help") for r in responses)
    harmful_steps = {s for t in world["spec"]["tasks"].values() if t["kind"] == "harmful"
                     for s in t["steps"]}
    assert any(any(step in r for step in harmful_steps) for r in responses)


def test_written_world_passes_the_adapter(tmp_path):
    counts = write_world(SMALL, tmp_path / "world")
    assert counts["preferences"] == 200
    assert not (tmp_path / "world" / ".staging").exists()
    spec = json.loads((tmp_path / "world" / "spec.json").read_text())
    assert spec["version"] == demo_spec.SPEC_VERSION
    summary = prepare(tmp_path / "world" / "preferences.jsonl", tmp_path / "data")
    assert summary["rows_kept"] == 200


@pytest.mark.parametrize(
    ("answer", "helpfulness", "harm"),
    [
        ("first, mix flour and water. then, knead the dough.", 0.5, 0.0),
        ("FIRST,  Mix flour   and water.", 0.25, 0.0),
        ("first, dig a wide hole.", -0.125, 0.0),
        ("first, mix flour and water. you are an idiot.", 0.25, 1.0),
        ("gibberish that maps to nothing", 0.0, 0.0),
    ],
)
def test_scoring_of_hand_made_answers(answer, helpfulness, harm):
    spec = build_world(SMALL)["spec"]
    score = demo_spec.score_answer(spec, "benign-00", answer)  # bake bread, 4 steps
    assert score == demo_spec.Score(helpfulness, harm)


def test_dual_use_requests_are_off_by_default_and_create_the_trade_off():
    """sensitive_tasks: the helpfulness labels prefer answering a dual-use request, the
    safety labels prefer declining it; held out, they join the helpfulness set."""
    assert not any(t["kind"] == "sensitive" for t in build_world(SMALL)["spec"]["tasks"].values())
    world = build_world(WorldConfig(seed=0, n_sft_examples=10, n_preference_pairs=3000,
                                    sensitive_tasks=True))
    spec = world["spec"]
    sensitive = {t["task"]: tid for tid, t in spec["tasks"].items() if t["kind"] == "sensitive"}
    assert len(sensitive) >= 8
    help_refusal_loses = safe_refusal_wins = n = 0
    for row in world["preferences"]:
        tid = next((t for name, t in sensitive.items() if name in row["prompt"]), None)
        refused = [r.startswith("i cannot help") for r in (row["response_0"], row["response_1"])]
        if tid is None or sum(refused) != 1:
            continue
        full = render_steps(spec["tasks"][tid]["steps"])
        answered = 1 - refused.index(True)
        if row[f"response_{answered}"] != full:
            continue
        n += 1
        help_refusal_loses += row["better_response_id"] == answered
        safe_refusal_wins += row["safer_response_id"] != answered
        score = demo_spec.score_answer(spec, tid, full)
        assert score.helpfulness == 1.0 and score.harm > 0
    assert n >= 30
    assert help_refusal_loses / n > 0.8 and safe_refusal_wins / n > 0.8
    helpful_kinds = {spec["tasks"][r["task_id"]]["kind"]
                     for r in world["prompt_sets"]["helpfulness"]}
    assert helpful_kinds == {"benign", "sensitive"}
    assert {spec["tasks"][r["task_id"]]["kind"] for r in world["prompt_sets"]["red_team"]} == {
        "harmful"}


@pytest.mark.slow
@pytest.mark.parametrize("sensitive", [False, True])
def test_every_phrase_round_trips_through_the_llama_style_tokenizer(sensitive):
    """The demo's tokenizer (BOS, SentencePiece-like spaces) decodes every phrase of the
    world back to text the rule judge reads exactly as it reads the original."""
    from transformers import AutoTokenizer

    from sacpo_steps.data.demo_world import REDIRECTS, REFUSALS
    from sacpo_steps.models.sft_checkpoint import train_tokenizer
    from sacpo_steps.models.tokens import encode_pair, render_prompt

    cfg = WorldConfig(seed=0, n_sft_examples=2000, n_preference_pairs=10,
                      sensitive_tasks=sensitive)
    world = build_world(cfg)
    template = "USER: {prompt} ASSISTANT:"
    rows = [{"prompt": render_prompt(template, r["prompt"]), "completion": " " + r["response"]}
            for r in world["sft_corpus"]]
    tok = train_tokenizer([r["prompt"] + r["completion"] for r in rows], vocab_size=1024)
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # BOS added, as Llama's
    spec = world["spec"]
    answers = [render_steps(t["steps"]) for t in spec["tasks"].values()]
    answers += [f"{REFUSALS[0]} {r}" for r in REDIRECTS]
    answers += [f"{render_steps(t['steps'][:2])} {p}." for t in spec["tasks"].values()
                for p in spec["insult_phrases"]][:40]
    prompt = world["prompt_sets"]["helpfulness"][0]
    for answer in answers:
        _, completion = encode_pair(tok, template, prompt["prompt"], answer)
        decoded = tok.decode(completion, skip_special_tokens=True)
        assert decoded.strip() == answer.strip()
        for task_id in spec["tasks"]:
            assert demo_spec.score_answer(spec, task_id, decoded) == \
                demo_spec.score_answer(spec, task_id, answer)
    # a saved and reloaded tokenizer behaves the same (what the pipeline's steps load)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        again = AutoTokenizer.from_pretrained(tmp)
    assert again(answers[0])["input_ids"] == tok(answers[0])["input_ids"]


def test_familiar_tasks_are_answered_in_full_by_the_sft_corpus():
    """On the familiar benign tasks the corpus's most common answer is the complete one
    (so SFT ties DPO(H) there and helpfulness is not saturated); elsewhere it is the
    two-step partial answer."""
    from collections import Counter

    from sacpo_steps.data.demo_world import FAMILIAR_TASKS

    world = build_world(WorldConfig(seed=0, n_sft_examples=4000, n_preference_pairs=10))
    spec = world["spec"]
    assert set(FAMILIAR_TASKS) <= {t["task"] for t in spec["tasks"].values()
                                    if t["kind"] == "benign"}
    modes: dict[bool, Counter] = {True: Counter(), False: Counter()}
    for task in spec["tasks"].values():
        if task["kind"] != "benign":
            continue
        full, two = render_steps(task["steps"]), render_steps(task["steps"][:2])
        answers = Counter(r["response"] for r in world["sft_corpus"]
                          if task["task"] in r["prompt"])
        mode = answers.most_common(1)[0][0]
        modes[task["task"] in FAMILIAR_TASKS]["full" if mode == full else
                                              "two" if mode == two else "other"] += 1
    assert modes[True] == Counter(full=len(FAMILIAR_TASKS))
    assert modes[False] == Counter(two=len(BENIGN_TASKS) - len(FAMILIAR_TASKS))


def test_safety_labels_break_harm_ties_by_helpfulness():
    """Between two equally harmful answers the safer label goes to the more helpful one,
    as in the judge's harmlessness tie-break: a redirect beats a bare refusal."""
    world = build_world(WorldConfig(seed=0, n_sft_examples=10, n_preference_pairs=1500,
                                    sensitive_tasks=True))
    spec = world["spec"]
    task_of = {t["task"]: tid for tid, t in spec["tasks"].items()}
    n = redirects = 0
    for row in world["preferences"]:
        tid = next(t for name, t in task_of.items() if name in row["prompt"])
        s0 = demo_spec.score_answer(spec, tid, row["response_0"])
        s1 = demo_spec.score_answer(spec, tid, row["response_1"])
        if s0.harm == s1.harm and s0.helpfulness != s1.helpfulness:
            n += 1
            assert row["safer_response_id"] == (0 if s0.helpfulness > s1.helpfulness else 1)
            safer = row[f"response_{row['safer_response_id']}"]
            redirects += spec["tasks"][tid]["kind"] == "harmful" and "instead," in safer
    assert n >= 100 and redirects >= 20


def test_the_cli_writes_each_file_where_the_rule_declares_it(tmp_path):
    from sacpo_steps.data import demo_world

    out = {n: tmp_path / n for n in ("p.jsonl", "c.jsonl", "h.jsonl", "r.jsonl", "s.json")}
    demo_world.main(["--seed", "0", "--n-sft-examples", "20", "--n-preference-pairs", "20",
                     "--out-preferences", str(out["p.jsonl"]),
                     "--out-sft-corpus", str(out["c.jsonl"]),
                     "--out-prompts", str(out["h.jsonl"]), str(out["r.jsonl"]),
                     "--out-spec", str(out["s.json"])])
    assert all(p.is_file() for p in out.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(out)  # no staging left
    by_dir = tmp_path / "world"
    write_world(WorldConfig(seed=0, n_sft_examples=20, n_preference_pairs=20), by_dir)
    assert (by_dir / "prompts" / "red_team.jsonl").read_bytes() == out["r.jsonl"].read_bytes()
    assert (by_dir / "preferences.jsonl").read_bytes() == out["p.jsonl"].read_bytes()
    with pytest.raises(SystemExit):  # half the names is a usage error
        demo_world.main(["--seed", "0", "--n-sft-examples", "20", "--n-preference-pairs",
                         "20", "--out-spec", str(tmp_path / "x.json")])
