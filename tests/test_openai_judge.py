"""The OpenAI-compatible judge against a real local HTTP server (tests/fake_openai.py).

Offline: the real `openai` client talks to a threaded stdlib server on
127.0.0.1 that scripts replies and faults from markers in the answers.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from sacpo_steps.core.errors import InputError
from sacpo_steps.evaluation import judge as judge_step
from sacpo_steps.evaluation.judges import JudgeRequest, make_judge
from sacpo_steps.evaluation.judges.cache import JudgeCache
from sacpo_steps.evaluation.judges.openai import OpenAIJudge
from sacpo_steps.evaluation.judges.openai_prompts import (
    EXPLAIN_INSTRUCTION,
    load_template,
    parse_scores,
    parse_verdict,
)
from sacpo_steps.evaluation.judges.openai_settings import OpenAIJudgeConfig
from sacpo_steps.evaluation.judges.registry import backend_settings
from tests.fake_openai import FakeOpenAI

SECRET = "sk-test-SECRET-123"
ROOT = Path(__file__).resolve().parent.parent


def openai_settings(section: dict) -> OpenAIJudgeConfig:
    """The openai judge's settings for a judge section, read as a judge job reads it."""
    return backend_settings({**section, "backend": "openai"}, job=True)


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(retry_after="0.3", slow_s=3.0) as fake:
        yield fake


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    return SECRET


def judge_config(server: FakeOpenAI, tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    # small timeout and backoff keep the fault tests quick
    return {"backend": "openai", "base_url": server.url, "cache": str(tmp_path / "cache.jsonl"),
            "timeout": 2.0, "backoff_base": 0.001, "backoff_max": 0.005, "concurrency": 4,
            **overrides}


def make(server: FakeOpenAI, tmp_path: Path, **overrides: Any) -> OpenAIJudge:
    judge = make_judge(judge_config(server, tmp_path, **overrides))
    assert isinstance(judge, OpenAIJudge)
    return judge


def req(first: str, second: str, *, pid: str = "p", criterion: str = "helpfulness",
        rep: int = 0) -> JudgeRequest:
    return JudgeRequest(criterion, pid, f"question of {pid}?", first, second, rep)


def cache_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- parsing -------------------------------------------------------------------------


@pytest.mark.parametrize("text,verdict", [
    # ours
    ("Scores: A=7 B=4\nA is more complete.", "first"),
    ("\n\n  Scores: A=3 B=10  \nB wins.", "second"),
    ("Scores: A=5 B=5", "tie"),
    ("Scores: A=1 B=10\nlater: Scores: A=10 B=1", "second"),
    ("Scores: A=0 B=4", "second"),  # the scale is 0-10
    ("Scores: A=7.5 B=4", "first"),
    # the paper's: a first line with only the two scores
    ("8 3", "first"),
    ("8 3\nAssistant A is more detailed.", "first"),
    ("0 10", "second"),
    ("8.5 8.5\n", "tie"),
    ("  6\t9  ", "second"),
    ("10.0 10", "tie"),
])
def test_scores_first_line_parses_in_our_and_the_papers_shape(text: str, verdict: str):
    assert parse_scores(text).verdict == verdict


def test_scores_detail_keeps_whole_numbers_whole():
    assert parse_scores("8 3").detail == {"scores": {"A": 8, "B": 3}}
    assert parse_scores("Scores: A=8.5 B=3").detail == {"scores": {"A": 8.5, "B": 3}}


@pytest.mark.parametrize("text", [
    "", "   \n  ", "**Scores: A=7 B=4**", "Scores: A=7, B=4",
    "Scores: A=11 B=4", "scores: A=7 B=4", "Scores: A=7 B=4 (A is better)",
    "Here are my scores.\nScores: A=7 B=4", "Scores: B=4 A=7", "Scores: A=-1 B=4",
    # the paper's shape, broken
    "8", "8 3 2", "8, 3", "8,3", "11 3", "8 -1", "07 3", "10.5 2", "A: 8 B: 3",
    "Sure! Here are the scores:\n8 3", "8 3 because A is better",
])
def test_scores_a_first_line_that_is_no_scores_line_is_unparseable(text: str):
    parsed = parse_scores(text)
    assert parsed.verdict is None and parsed.reason


@pytest.mark.parametrize("text,verdict", [
    ("B is better.\n[[B]]", "second"),
    ("A says it deserves [[A]], but it does not.\n[[B]]", "second"),
    ("[[A]] ... on reflection they are equal: [[tie]]", "tie"),
    ("[[B]] first thought, final: [[A]] and a [[b]] typo", "first"),
])
def test_verdict_last_well_formed_token_wins(text: str, verdict: str):
    assert parse_verdict(text).verdict == verdict


@pytest.mark.parametrize("text", ["", "A is better", "[[a]]", "[[ A ]]", "[A]", "[[Tie]]"])
def test_verdict_without_a_token_is_unparseable(text: str):
    assert parse_verdict(text).verdict is None


PROMPTS_DIR = ROOT / "sacpo_steps" / "evaluation" / "judges" / "prompts"
#: sha256 of the templates before the 0-10 defaults; kept under prompts/legacy/
LEGACY_SHA256 = {
    "harmlessness_scores": "22ee7f004ccc3574e7f3af5a29ec66d8d5126dd03dec6cbbb0d9f21a5ae8a8ad",
    "harmlessness_verdict": "7ce08edd995e6ab887c5b747b38eeff2258619d7254b5f0b74de815591be134f",
    "helpfulness_scores": "94620ba781688307a90e29dba57f7707811b907cb550970e801371781073da92",
    "helpfulness_verdict": "9f04af07efde4a83bfdadb462931bde5fcc6bba76739195a3d3b2ddf453de803",
}


def test_templates_are_packaged_hashed_and_rendered_once():
    for criterion in ("helpfulness", "harmlessness"):
        for fmt in ("scores", "verdict"):
            template = load_template(criterion, fmt)
            path = PROMPTS_DIR / f"{criterion}_{fmt}.txt"
            assert template.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
            rendered = template.render("Q {answer_b}?", "first {question}", "second")
            # values are not substituted again
            assert "Q {answer_b}?" in rendered and "first {question}" in rendered
            assert ("Scores: A=" in rendered) == (fmt == "scores")
            assert ("[[tie]]" in rendered) == (fmt == "verdict")
            # a separate system message, not part of the user message
            assert template.system and "impartial" in template.system
            assert "===" not in rendered and template.system not in rendered
    assert len({load_template(c, f).sha256 for c in ("helpfulness", "harmlessness")
                for f in ("scores", "verdict")}) == 4


#: the paper's helpfulness factors, in its order
NINE_FACTORS = ("accuracy", "clarity", "completeness", "contextual understanding",
                "creative problem-solving", "depth", "politeness",
                "reference to reliable sources", "user engagement")


def test_default_templates_carry_the_papers_criteria():
    for fmt in ("scores", "verdict"):
        help_text = load_template("helpfulness", fmt).user
        # the numbered list names the paper's nine factors, in its order, and nothing else
        assert re.findall(r"^(\d)\. ([^:\n]+):", help_text, flags=re.M) == [
            (str(i), factor.capitalize()) for i, factor in enumerate(NINE_FACTORS, start=1)]
        lower = load_template("helpfulness", fmt).text.lower()
        assert "nine factors" in lower and "empty reply" in lower
        # the paper's helpfulness prompt says nothing about safety; neither do we now
        assert "safety" not in lower and "must not change" not in lower
        # the previous default had that clause (kept as the set v2)
        assert "safety is reviewed separately and must not change" in load_template(
            "helpfulness", fmt, "v2").text
        # the reply format is the one the parser reads, word for word as before
        tail = 2 if fmt == "scores" else 5
        old_tail = load_template("helpfulness", fmt, "v2").user.splitlines()[-tail:]
        assert help_text.splitlines()[-tail:] == old_tail
    assert "0 to 10" in load_template("helpfulness", "scores").text
    harm_text = load_template("harmlessness", "scores").text.lower()
    for risk in ("social bias", "discrimination", "crime", "privacy", "emotional harm",
                 "physical harm", "insult", "immoral", "unethical", "pornographic", "sexual",
                 "0 to 10", "bare refusal", "more\n  helpful one scores higher"):
        assert risk in harm_text, risk
    for fmt in ("scores", "verdict"):
        assert "bare refusal" in load_template("harmlessness", fmt).text


def test_legacy_templates_are_kept_byte_for_byte(tmp_path):
    for name, digest in LEGACY_SHA256.items():
        path = PROMPTS_DIR / "legacy" / f"{name}.txt"
        criterion, fmt = name.split("_")
        template = load_template(criterion, fmt, str(path))
        assert template.sha256 == digest and template.system is None
        assert template.user == path.read_text()


def test_legacy_templates_keep_the_old_cache_keys(server, tmp_path):
    legacy = {c: str(PROMPTS_DIR / "legacy" / f"{c}_scores.txt")
              for c in ("helpfulness", "harmlessness")}
    judge = make(server, tmp_path, templates=legacy, max_tokens=1024)
    # keys computed by the previous version (old packaged templates, max_tokens 1024)
    assert judge.cache_key(req("a", "b"), 0) == (
        "762eb7d7a78b63c4ebd1ec05232e84fe9dc0fe909c5296cca2b1473a3f6b62db")
    assert judge.cache_key(req("a", "b", criterion="harmlessness", rep=1), 2) == (
        "f4f1140eb25a61ddbe4ce32dc6177b7720b7ee2595639286fb273409801fdf29")
    judge.judge_many([req("a #q=2", "b #q=7")])
    # a legacy template has no system section: one user message, as before
    assert [m["role"] for m in server.bodies[-1]["messages"]] == ["user"]


#: sha256 of the default templates from a4aaf44 to a3c957c; kept under prompts/v2/
V2_SHA256 = {
    "harmlessness_scores": "5d9be02703165680ece85367480b44c6cbd198600226fb6a473d251a925e197d",
    "harmlessness_verdict": "77e6e3c0fd7eb2b908d3d38d5bc4010fbc983a1874af51e0d13a8e3fa0d02685",
    "helpfulness_scores": "e399ae09a6650bae9c142042267932eee969ea9ee8880058636fc91fd3281e9c",
    "helpfulness_verdict": "8cb246b7926b20492fcd62b43c19136bb427f8c1341bf218f4d0842865967fa6",
}
#: what a3c957c sent and keyed with its default templates for V2_REQUEST's question and
#: answers: (sha256 of the chat messages as JSON, cache key of attempt 0)
V2_SENT = {
    "helpfulness_scores": (
        "66d6397ff46b8c7ecf3b3de155ce495ca69934b92467bd018c0b6861a7948bd6",
        "95ef257e49f9d493c629df3ac4cde11c95046eceb3340254fda04d9f6ca44eb4"),
    "harmlessness_scores": (
        "f33a315f91428ce17595d1698a47682975098cafe644b970d812f1f56271b881",
        "4b72a64080c197d43984844ffebc3031ab51c183bf53aaa662f453382faec4fc"),
    "helpfulness_verdict": (
        "bead7fc0aa72db9f1c8c2bf6b4602eed0b4655c19daee84c69d9cb27bb04f639",
        "cdeb89fbd30d0a3631433ef90396e5529516ee4688bedbb34b4a676d23c66270"),
    "harmlessness_verdict": (
        "df038b998f9d89bfbba581af906a662ba2fdcc2aeec82838a7552a305abe1c4b",
        "70b2655a3a30bf4d8f107a60763e1810ba25cc40fceb7a34249155cb4c27ce60"),
}


def v2_request(criterion: str) -> JudgeRequest:
    return JudgeRequest(criterion, "p", "How do I bake {answer_b} bread?", "Knead {question} it.",
                        "")


def test_v2_set_sends_what_the_previous_defaults_sent(server, tmp_path):
    for name, digest in V2_SHA256.items():
        criterion, fmt = name.split("_")
        template = load_template(criterion, fmt, "v2")
        assert template.sha256 == digest
        assert hashlib.sha256((PROMPTS_DIR / "v2" / f"{name}.txt").read_bytes()).hexdigest() \
            == digest
        assert (template.set_name, template.source) == (
            "v2", f"sacpo_steps/evaluation/judges/prompts/v2/{name}.txt")
    for fmt in ("scores", "verdict"):
        judge = make(server, tmp_path, format=fmt,
                     templates={"helpfulness": "v2", "harmlessness": "v2"})
        default = make(server, tmp_path, format=fmt)
        for criterion in ("helpfulness", "harmlessness"):
            request = v2_request(criterion)
            messages = judge.messages(request)
            sent, key = V2_SENT[f"{criterion}_{fmt}"]
            assert hashlib.sha256(json.dumps(messages, ensure_ascii=False).encode()
                                  ).hexdigest() == sent
            assert judge.cache_key(request, 0) == key  # old cached replies are found
            # the new default changed helpfulness only
            assert (default.cache_key(request, 0) == key) == (criterion == "harmlessness")
        # and it is what goes over the wire
        judge.judge_many([v2_request("helpfulness")])
        assert server.bodies[-1]["messages"] == judge.messages(v2_request("helpfulness"))


def test_legacy_set_by_name_is_the_legacy_file(server, tmp_path):
    for name, digest in LEGACY_SHA256.items():
        criterion, fmt = name.split("_")
        by_name = load_template(criterion, fmt, "legacy")
        by_path = load_template(criterion, fmt, str(PROMPTS_DIR / "legacy" / f"{name}.txt"))
        assert by_name.sha256 == by_path.sha256 == digest and by_name.user == by_path.user
        assert (by_name.set_name, by_path.set_name) == ("legacy", None)
    judge = make(server, tmp_path, templates={"helpfulness": "legacy", "harmlessness": "legacy"},
                 max_tokens=1024)
    # the keys of test_legacy_templates_keep_the_old_cache_keys
    assert judge.cache_key(req("a", "b"), 0) == (
        "762eb7d7a78b63c4ebd1ec05232e84fe9dc0fe909c5296cca2b1473a3f6b62db")


def test_a_set_name_that_is_also_a_file_is_refused(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "v2").write_text("{question} {answer_a} {answer_b}")
    with pytest.raises(InputError) as err:
        make(server, tmp_path, templates={"helpfulness": "v2"})
    assert err.value.field == "judge.templates.helpfulness" and "./v2" in str(err.value)
    # the file, written as a path
    assert make(server, tmp_path, templates={"helpfulness": "./v2"}).templates[
        "helpfulness"].source == "./v2"
    with pytest.raises(InputError) as err:
        make(server, tmp_path, templates={"harmlessness": "v3"})
    assert err.value.field == "judge.templates.harmlessness"
    assert "not a packaged template set either: default, v2, legacy" in str(err.value)


def test_user_template_file_is_used_and_validated(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "prompts" / "help.txt"
    own.parent.mkdir()
    own.write_text("=== system ===\nBe fair.\n=== user ===\nQ: {question}\n"
                   "A: {answer_a}\nB: {answer_b}\nScores first.\n")
    judge = make(server, tmp_path, templates={"helpfulness": "prompts/help.txt"})
    default = make(server, tmp_path)
    assert judge.templates["helpfulness"].source == "prompts/help.txt"
    # only that criterion's template (and so its cache keys) changes
    assert judge.cache_key(req("a", "b"), 0) != default.cache_key(req("a", "b"), 0)
    harm = req("a", "b", criterion="harmlessness")
    assert judge.cache_key(harm, 0) == default.cache_key(harm, 0)
    [reply] = judge.judge_many([req("x #q=3", "y #q=6")])
    assert reply.verdict == "second"
    assert server.bodies[-1]["messages"] == [
        {"role": "system", "content": "Be fair."},
        {"role": "user", "content": "Q: question of p?\nA: x #q=3\nB: y #q=6\nScores first.\n"}]
    assert judge.usage()["template_files"]["helpfulness"] == "prompts/help.txt"

    bad_texts = {
        "twice.txt": "{question} {answer_a} {answer_b} {answer_b}",
        "missing.txt": "{question} {answer_a}",
        "sys.txt": "=== system ===\n{question}\n=== user ===\n{question} {answer_a} {answer_b}",
        "nouser.txt": "=== system ===\nBe fair.\n{question} {answer_a} {answer_b}",
    }
    for name, text in bad_texts.items():
        (tmp_path / name).write_text(text)
    for name in [*bad_texts, "no_such_file.txt"]:
        with pytest.raises(InputError) as err:
            make(server, tmp_path, templates={"harmlessness": name})
        assert err.value.field == "judge.templates.harmlessness", name
        assert err.value.path == name and name in str(err.value)
    (tmp_path / "latin1.txt").write_bytes(b"\xff {question} {answer_a} {answer_b}")
    with pytest.raises(InputError, match="UTF-8"):
        make(server, tmp_path, templates={"helpfulness": "latin1.txt"})


def test_openai_name_is_the_real_client():
    import openai

    import sacpo_steps.evaluation.judges.openai as backend

    assert backend.openai is openai and hasattr(openai, "AsyncOpenAI")


# --- configuration -------------------------------------------------------------------


def test_missing_key_is_an_input_error_at_construction(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(InputError) as err:
        make_judge({"backend": "openai"})
    assert err.value.field == "judge.api_key_env" and "OPENAI_API_KEY" in str(err.value)
    monkeypatch.setenv("MY_JUDGE_KEY", "")
    with pytest.raises(InputError, match="MY_JUDGE_KEY"):
        make_judge({"backend": "openai", "api_key_env": "MY_JUDGE_KEY"})


def test_config_defaults_and_validation():
    cfg = openai_settings({"backend": "openai", "repetitions": 3,
                                       "max_error_rate": 0.1})
    assert (cfg.model, cfg.temperature, cfg.format, cfg.api_key_env) == (
        "gpt-4-0125-preview", 0.7, "scores", "OPENAI_API_KEY")
    assert cfg.prices() == (10.0, 30.0)
    assert OpenAIJudgeConfig(model="local").prices() == (None, None)
    assert (cfg.explain, cfg.retry_errors, cfg.templates) == (False, False, None)
    # the output cap: the scores line alone, unless reasons are asked for; explicit wins
    assert cfg.output_cap() == 16
    assert openai_settings({"explain": True}).output_cap() == 1024
    assert openai_settings({"format": "verdict"}).output_cap() == 1024
    assert openai_settings({"max_tokens": 300}).output_cap() == 300
    assert openai_settings({"max_tokens": 8, "explain": True}).output_cap() == 8
    assert openai_settings({"max_tokens": None}).output_cap() == 16
    for bad, field in [({"temprature": 0.7}, "judge.temprature"),
                       ({"explain": "yes"}, "judge.explain"),
                       ({"retry_errors": 1}, "judge.retry_errors"),
                       ({"max_tokens": 0}, "judge.max_tokens"),
                       ({"max_tokens": 16.5}, "judge.max_tokens"),
                       ({"templates": "x.txt"}, "judge.templates"),
                       ({"templates": {"honesty": "x.txt"}}, "judge.templates.honesty"),
                       ({"templates": {"helpfulness": 3}}, "judge.templates.helpfulness"),
                       ({"format": "stars"}, "judge.format"),
                       ({"concurrency": 0}, "judge.concurrency"),
                       ({"max_retries": 1.5}, "judge.max_retries"),
                       ({"temperature": "hot"}, "judge.temperature"),
                       ({"model": ""}, "judge.model")]:
        with pytest.raises(InputError) as err:
            openai_settings(bad)
        assert err.value.field == field


# --- protocol against the server -------------------------------------------------------


def test_faults_end_as_verdicts_or_counted_errors(server, tmp_path):
    judge = make(server, tmp_path, parse_retries=2, max_retries=3)
    requests = [
        req("good #q=8", "bad #q=2", pid="plain"),
        req("ok #q=3 #fault=429*2", "better #q=6", pid="limited"),
        req("ok #q=7 #fault=500*1", "worse #q=6", pid="flaky"),
        req("ok #q=4 #fault=slow*1", "same #q=4", pid="slow"),
        req("ok #q=9 #fault=garbage*1", "worse #q=1", pid="garbled_once"),
        req("ok #q=9 #fault=garbage", "worse #q=1", pid="garbled"),
        req("ok #q=9 #fault=500", "worse #q=1", pid="down"),
        req("ok #q=9 #fault=400", "worse #q=1", pid="rejected"),
    ]
    replies = judge.judge_many(requests)
    verdicts = {r.prompt_id: reply.verdict for r, reply in zip(requests, replies, strict=True)}
    assert verdicts == {"plain": "first", "limited": "second", "flaky": "first", "slow": "tie",
                        "garbled_once": "first", "garbled": "error", "down": "error",
                        "rejected": "error"}
    by_id = {r.prompt_id: reply for r, reply in zip(requests, replies, strict=True)}
    # an unparseable reply is kept as the raw text, with the reason; never a tie
    assert by_id["garbled"].raw.startswith("Both replies have merits")
    assert "unparseable after 3 attempts" in by_id["garbled"].detail["reason"]
    assert by_id["down"].detail["reason"] == "no reply: server_error"
    assert "after 4 attempts" in by_id["down"].raw
    assert by_id["rejected"].detail["reason"] == "no reply: status_400"
    assert by_id["garbled_once"].detail["attempt"] == 1

    usage = judge.usage()
    assert usage["retries"] == {"rate_limit": 2, "server_error": 1 + 3, "timeout": 1,
                                "unparseable": 1 + 2}
    assert usage["errors"] == {"unparseable": 1, "server_error": 1, "status_400": 1}
    # every request the server saw is counted, and nothing else
    assert usage["requests"] == server.requests == 1 + 3 + 2 + 2 + 2 + 3 + 4 + 1
    assert usage["tokens"] == {**server.tokens, "total": sum(server.tokens.values())}
    price_in, price_out = 10.0, 30.0
    assert usage["cost_usd"] == pytest.approx(
        (server.tokens["prompt"] * price_in + server.tokens["completion"] * price_out) / 1e6)


def test_retry_after_is_honoured_by_every_request(server, tmp_path):
    judge = make(server, tmp_path, concurrency=1)
    judge.judge_many([req("a #q=3 #fault=429*1", "b #q=6")])
    first, second = server.times["429"]
    # backoff alone would wait at most backoff_max = 5 ms; Retry-After says 0.3 s
    assert second - first >= 0.25
    assert judge.usage()["retries"] == {"rate_limit": 1}


def test_concurrency_is_bounded(tmp_path):
    with FakeOpenAI(latency=0.05) as fake:
        judge = make(fake, tmp_path, concurrency=3)
        judge.judge_many([req(f"a{i} #q=3", "b #q=6", pid=f"p{i}") for i in range(12)])
        assert 1 < fake.max_in_flight <= 3


def test_verdict_format_takes_the_last_token(server, tmp_path):
    judge = make(server, tmp_path, format="verdict")
    replies = judge.judge_many([req("a #q=9 #fault=quote", "b #q=1", pid="quoted"),
                                req("a #q=2", "b #q=2", pid="even"),
                                req("a #q=2", "b #q=5", criterion="harmlessness")])
    assert [r.verdict for r in replies] == ["second", "tie", "second"]
    assert "[[A]]" in replies[0].raw and replies[0].detail["token"] == "[[B]]"


def test_scores_line_cap_system_message_and_explain(server, tmp_path):
    judge = make(server, tmp_path)
    [reply] = judge.judge_many([req("a #q=8", "b #q=3")])
    assert reply.verdict == "first"
    body = server.bodies[-1]
    assert body["max_tokens"] == 16
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert "Scores: A=" in body["messages"][1]["content"]
    assert "explain your scores" not in body["messages"][1]["content"]
    assert judge.usage()["settings"]["max_tokens"] == 16

    explaining = make(server, tmp_path, explain=True)
    [reply] = explaining.judge_many([req("a #q=8", "b #q=3")])
    body = server.bodies[-1]
    assert reply.verdict == "first" and not reply.detail["cached"]  # its own cache key
    assert body["max_tokens"] == 1024
    assert body["messages"][1]["content"].endswith(EXPLAIN_INSTRUCTION)
    make(server, tmp_path, explain=True, max_tokens=200).judge_many([req("a #q=8", "b #q=3")])
    assert server.bodies[-1]["max_tokens"] == 200


def test_the_papers_bare_scores_reply_is_read(server, tmp_path):
    judge = make(server, tmp_path)
    replies = judge.judge_many([req("a #q=8 #fault=bare", "b #q=3"),
                                req("a #q=2 #fault=bare", "b #q=2", pid="even")])
    assert [r.verdict for r in replies] == ["first", "tie"]
    assert replies[0].raw.startswith("8 3\n") and replies[0].detail["scores"] == {"A": 8, "B": 3}


def test_errors_are_cached_and_asked_again_only_with_retry_errors(server, tmp_path):
    requests = [req("a #q=8 #fault=garbage*3", "b #q=3", pid="garbled"),
                req("a #q=8 #fault=400*1", "b #q=3", pid="rejected"),
                req("a #q=8", "b #q=3", pid="fine")]
    first = make(server, tmp_path, parse_retries=2).judge_many(requests)
    assert [r.verdict for r in first] == ["error", "error", "first"]
    assert server.requests == 3 + 1 + 1

    # a rerun: everything is cached, errors included, so no request at all
    judge = make(server, tmp_path, parse_retries=2)
    again = judge.judge_many(requests)
    assert server.requests == 5
    assert [r.verdict for r in again] == ["error", "error", "first"]
    assert again[1].detail["reason"] == "no reply: status_400" and again[1].detail["cached"]
    assert "unparseable after 3 attempts" in again[0].detail["reason"]
    assert judge.usage()["errors"] == {"status_400": 1, "unparseable": 1}
    assert judge.usage()["requests"] == 0

    # retry_errors: the failed ones are asked again (new attempts), the good one is not
    judge = make(server, tmp_path, parse_retries=2, retry_errors=True)
    retried = judge.judge_many(requests)
    assert [r.verdict for r in retried] == ["first", "first", "first"]
    assert server.requests == 5 + 2
    assert (retried[0].detail["attempt"], retried[1].detail["attempt"]) == (3, 1)
    assert judge.usage()["retries"] == {"retry_errors": 2}

    # and a plain rerun now finds those replies in the cache
    judge = make(server, tmp_path, parse_retries=2)
    assert [r.verdict for r in judge.judge_many(requests)] == ["first"] * 3
    assert server.requests == 7 and judge.usage()["requests"] == 0


def test_transient_failures_are_not_cached(server, tmp_path):
    request = req("a #q=8 #fault=500*2", "b #q=3")
    [reply] = make(server, tmp_path, max_retries=1).judge_many([request])
    assert reply.verdict == "error" and reply.detail["reason"] == "no reply: server_error"
    # nothing was cached, so the rerun asks again (and the server has recovered)
    [reply] = make(server, tmp_path, max_retries=1).judge_many([request])
    assert reply.verdict == "first" and server.requests == 3


def test_missing_usage_block_is_counted_not_fatal(server, tmp_path):
    judge = make(server, tmp_path)
    [reply] = judge.judge_many([req("a #q=3 #fault=nousage", "b #q=6")])
    assert reply.verdict == "second"
    assert judge.usage()["replies_without_usage"] == 1


@pytest.mark.parametrize("fault,words", [("401", "refused the API key"),
                                          ("quota", "no quota left")])
def test_refused_key_or_exhausted_quota_fails_at_once_with_the_key_masked(server, tmp_path,
                                                                           fault, words):
    judge = make(server, tmp_path)
    with pytest.raises(InputError) as err:
        judge.judge_many([req(f"a #q=3 #fault={fault}", "b #q=6")])
    assert err.value.field == "judge.api_key_env"
    assert words in str(err.value) and SECRET not in str(err.value)
    assert server.requests == 1  # no retry: waiting would not help


# --- cache -----------------------------------------------------------------------------


def comparisons(n_prompts: int, reps: int = 2) -> list[JudgeRequest]:
    """Both orders and `reps` repetitions of each prompt, as the judge step asks them."""
    out = []
    for i in range(n_prompts):
        a, b = f"cand {i} #q={i % 10 + 1}", f"base {i} #q=5"
        for rep in range(reps):
            out += [req(a, b, pid=f"p{i}", rep=rep), req(b, a, pid=f"p{i}", rep=rep)]
    return out


def test_one_cache_entry_per_comparison_and_a_cached_rerun_sends_nothing(server, tmp_path):
    requests = comparisons(5)
    first = make(server, tmp_path).judge_many(requests)
    sent = server.requests
    assert sent == len(requests)
    entries = cache_lines(tmp_path / "cache.jsonl")
    assert len(entries) == len({e["key"] for e in entries}) == len(requests)
    assert {e["repetition"] for e in entries} == {0, 1}

    judge = make(server, tmp_path)
    again = judge.judge_many(requests)
    assert server.requests == sent  # nothing sent
    assert [r.verdict for r in again] == [r.verdict for r in first]
    assert [r.raw for r in again] == [r.raw for r in first]
    usage = judge.usage()
    assert (usage["requests"], usage["cached"], usage["cost_usd"]) == (0, len(requests), 0)
    assert all(r.detail["cached"] for r in again)


def test_key_follows_what_changes_the_reply(server, tmp_path):
    judge = make(server, tmp_path)
    base = req("a", "b")
    keys = {judge.cache_key(base, 0), judge.cache_key(base, 1),
            judge.cache_key(req("a", "b", rep=1), 0), judge.cache_key(req("b", "a"), 0),
            judge.cache_key(req("a", "b", criterion="harmlessness"), 0)}
    for overrides in ({"temperature": 0.0}, {"max_tokens": 64}, {"model": "other"},
                      {"format": "verdict"}, {"explain": True}):
        keys.add(make(server, tmp_path, **overrides).cache_key(base, 0))
    assert len(keys) == 10
    # retry_errors changes what is asked again, not a reply
    assert make(server, tmp_path, retry_errors=True).cache_key(base, 0) == judge.cache_key(
        base, 0)
    # the route to the model is not part of the key
    moved = make(server, tmp_path, base_url="http://127.0.0.1:1/v1")
    assert moved.cache_key(base, 0) == judge.cache_key(base, 0)


def test_partial_run_resumes_with_only_the_missing_requests(server, tmp_path):
    requests = comparisons(6)
    make(server, tmp_path).judge_many(requests[:7])
    assert server.requests == 7
    make(server, tmp_path).judge_many(requests)
    assert server.requests == len(requests)
    assert len(cache_lines(tmp_path / "cache.jsonl")) == len(requests)


def _append_entries(path: str, start: int, count: int) -> None:
    cache = JudgeCache(path)
    for i in range(start, start + count):
        cache.put(f"k{i}", {"raw": f"{i}:" + "x" * 20_000})  # far above PIPE_BUF
    cache.close()


@pytest.mark.multi_process
def test_parallel_writers_neither_interleave_nor_duplicate(tmp_path):
    path = str(tmp_path / "shared.jsonl")
    ctx = multiprocessing.get_context("fork")
    # overlapping key ranges: 0-59 and 30-89
    procs = [ctx.Process(target=_append_entries, args=(path, s, 60)) for s in (0, 30)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    entries = cache_lines(Path(path))  # every line is whole JSON
    keys = [e["key"] for e in entries]
    assert len(keys) == len(set(keys)) == 90
    assert all(e["raw"].startswith(e["key"][1:] + ":") for e in entries)


def test_torn_last_line_is_skipped_and_not_glued_to_the_next(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = JudgeCache(path)
    cache.put("k1", {"raw": "one"})
    cache.close()
    with open(path, "ab") as fh:
        fh.write(b'{"key": "k2", "raw": "ha')  # a writer killed mid-line
    cache = JudgeCache(path)
    assert cache.get("k1") is not None and cache.get("k2") is None
    cache.put("k3", {"raw": "three"})
    cache.close()
    reread = JudgeCache(path)
    assert reread.get("k3")["raw"] == "three" and reread.skipped == 1 and len(reread) == 2


# --- the judge step --------------------------------------------------------------------

PROMPT_IDS = ("h1", "h2", "h3")


def write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def step_files(tmp_path: Path, candidate: dict[str, str], baseline: dict[str, str]
               ) -> dict[str, Path]:
    prompts = [{"prompt_id": pid, "prompt": f"How do I do {pid}?"} for pid in PROMPT_IDS]
    text = {p["prompt_id"]: p["prompt"] for p in prompts}

    def gens(model: str, answers: dict[str, str]) -> list[dict]:
        return [{"prompt_id": pid, "prompt": text[pid], "answer": answers[pid], "model": model}
                for pid in PROMPT_IDS]

    return {
        "prompts": write_jsonl(tmp_path / "helpful.jsonl", prompts),
        "cand": write_jsonl(tmp_path / "cand.jsonl", gens("dpo-h", candidate)),
        "base": write_jsonl(tmp_path / "base.jsonl", gens("sft", baseline)),
        "out": tmp_path / "battles" / "dpo-h.jsonl",
    }


def run_step(files: dict[str, Path], judge: OpenAIJudge, reps: int = 2,
             max_error_rate: float | None = 0.05) -> dict[str, Any]:
    return judge_step.judge_model(files["cand"], files["base"], files["prompts"],
                                  "helpfulness", judge, reps, files["out"],
                                  max_error_rate=max_error_rate)


def test_error_rate_over_the_limit_fails_naming_prompts_and_writes_nothing(server, tmp_path):
    files = step_files(tmp_path, {"h1": "good #q=8", "h2": "x #q=8 #fault=garbage",
                                  "h3": "y #q=8"},
                       {pid: "meh #q=4" for pid in PROMPT_IDS})
    judge = make(server, tmp_path, parse_retries=1)
    with pytest.raises(InputError) as err:
        run_step(files, judge)
    message = str(err.value)
    assert err.value.field == "judge.max_error_rate"
    # h2 fails in all 4 judgments (2 orders x 2 repetitions), after a parse retry each
    assert "4 of 12 judgments failed" in message
    assert "'h2' (4)" in message and "'h1'" not in message and "'h3'" not in message
    assert not files["out"].parent.exists() or not any(files["out"].parent.iterdir())
    sent = server.requests

    # the replies are cached: the rerun costs nothing, and with a looser limit it writes
    judge = make(server, tmp_path, parse_retries=1)
    summary = run_step(files, judge, max_error_rate=0.5)
    assert server.requests == sent
    outcomes = summary["outcomes"]
    assert outcomes["error"] == 4 and outcomes["tie"] == 0
    battles = [json.loads(line) for line in files["out"].read_text().splitlines()]
    assert {b["prompt_id"] for b in battles if b["outcome"] == "error"} == {"h2"}
    usage = json.loads(judge_step.usage_path_for(files["out"]).read_text())
    assert usage["requests"] == 0 and usage["cached"] > 0 and usage["error_rate"] == 4 / 12


@pytest.mark.parametrize("templates,expected", [
    # the packaged defaults
    (None, {"helpfulness": "default", "harmlessness": "default"}),
    # the user's own file for one criterion: the other criterion's job names the default
    # (it used to name the packaged template of the criterion it did not judge)
    ({"harmlessness": "own.txt"}, {"helpfulness": "default", "harmlessness": "own.txt"}),
    ({"helpfulness": "own.txt"}, {"helpfulness": "own.txt", "harmlessness": "default"}),
    # the earlier defaults, by name
    ({"helpfulness": "v2", "harmlessness": "legacy"},
     {"helpfulness": "v2", "harmlessness": "legacy"}),
])
def test_usage_file_names_the_template_each_job_rendered(server, tmp_path, monkeypatch,
                                                          templates, expected):
    from sacpo_steps.evaluation.judges.openai_prompts import TEMPLATE_SETS
    from sacpo_steps.evaluation.judges.registry import for_criterion

    monkeypatch.chdir(tmp_path)
    (tmp_path / "own.txt").write_text("=== system ===\nBe fair.\n=== user ===\nOWN {question}"
                                      "\nA: {answer_a}\nB: {answer_b}\nScores first.\n")
    files = step_files(tmp_path, {pid: "good #q=8" for pid in PROMPT_IDS},
                       {pid: "meh #q=4" for pid in PROMPT_IDS})
    config = judge_config(server, tmp_path, **({"templates": templates} if templates else {}))
    for criterion, choice in expected.items():
        # the section a judge job gets in the workflow
        judge = make_judge(for_criterion(config, criterion))
        sent_before = len(server.bodies)
        out = tmp_path / criterion / "dpo-h.jsonl"
        judge_step.judge_model(files["cand"], files["base"], files["prompts"], criterion,
                               judge, 1, out)
        usage = json.loads(judge_step.usage_path_for(out).read_text())
        packaged = choice in TEMPLATE_SETS
        folder = "/".join(p for p in ("sacpo_steps/evaluation/judges/prompts",
                                      TEMPLATE_SETS.get(choice)) if p)
        source = f"{folder}/{criterion}_scores.txt" if packaged else choice
        # only the judged criterion, named by the file rendered and its set
        assert usage["template_files"] == {criterion: source}
        assert usage["template_sets"] == {criterion: choice if packaged else None}
        file = ROOT / source if packaged else tmp_path / source
        assert usage["templates"] == {criterion: hashlib.sha256(file.read_bytes()).hexdigest()}
        # and that file is what was sent
        rendered = load_template(criterion, "scores", str(file))
        bodies = server.bodies[sent_before:]
        assert len(bodies) == len(PROMPT_IDS) * 2
        for body in bodies:
            system = [m["content"] for m in body["messages"] if m["role"] == "system"]
            assert system == ([rendered.system] if rendered.system else [])
            assert body["messages"][-1]["content"].startswith(
                rendered.user.split("{question}")[0])
        judge.close()


def test_cli_run_keeps_the_secret_out_of_every_file(server, tmp_path):
    from sacpo_steps.__main__ import main as cli

    files = step_files(tmp_path, {"h1": "good #q=8 #fault=echo", "h2": "x #q=8 #fault=429*1",
                                  "h3": "y #q=2 #fault=500*1"},
                       {pid: "meh #q=4" for pid in PROMPT_IDS})
    config = judge_config(server, tmp_path, repetitions=2)
    config.pop("cache")
    log_file = tmp_path / "logs" / "judge.log"
    args = ["judge", "--candidate", str(files["cand"]), "--baseline", str(files["base"]),
            "--prompts", str(files["prompts"]), "--criterion", "helpfulness",
            "--judge-config", json.dumps(config), "--repetitions", "2",
            "--judge-cache", str(tmp_path / "judge_cache" / "gpt4.jsonl"),
            "--out", str(files["out"]), "--log", str(log_file)]
    cli(args)
    battles = [json.loads(line) for line in files["out"].read_text().splitlines()]
    assert [b["outcome"] for b in battles].count("a_wins") == 8  # h1, h2 both orders x 2
    assert all(b["judge"] == "openai:gpt-4-0125-preview" for b in battles)
    usage = json.loads(files["out"].with_name("dpo-h.usage.json").read_text())
    # a fault "*1" hits the first request of each prompt text: once per order
    assert usage["retries"] == {"rate_limit": 2, "server_error": 2}
    assert usage["requests"] == 12 + 4 and usage["tokens"]["total"] > 0
    replies = files["out"].with_name("dpo-h.replies.jsonl").read_text()
    assert "debug: your request carried Bearer ***" in replies  # masked, not dropped
    assert "usage:" in log_file.read_text()

    # a refused key fails the step, and its message masks the key too
    (tmp_path / "refused").mkdir()
    refused = step_files(tmp_path / "refused", {pid: "a #q=1 #fault=401" for pid in PROMPT_IDS},
                         {pid: "b #q=1" for pid in PROMPT_IDS})
    refused_log = tmp_path / "logs" / "refused.log"
    with pytest.raises(SystemExit) as exit_info:
        cli([*args[:1], "--candidate", str(refused["cand"]), "--baseline",
             str(refused["base"]), *args[5:-4], "--out", str(refused["out"]),
             "--log", str(refused_log)])
    assert exit_info.value.code == 2
    assert "judge.api_key_env" in refused_log.read_text()

    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaks, leaks


@pytest.mark.slow
def test_killed_job_resumes_without_repeating_paid_requests(tmp_path):
    with FakeOpenAI(latency=0.25) as fake:
        files = step_files(tmp_path, {pid: f"c #q={i + 6}" for i, pid in enumerate(PROMPT_IDS)},
                           {pid: "b #q=5" for pid in PROMPT_IDS})
        cache = tmp_path / "cache.jsonl"
        config = json.dumps(judge_config(fake, tmp_path, concurrency=2))
        total = len(PROMPT_IDS) * 2 * 4
        cmd = [sys.executable, "-m", "sacpo_steps", "judge", "--candidate", str(files["cand"]),
               "--baseline", str(files["base"]), "--prompts", str(files["prompts"]),
               "--criterion", "helpfulness", "--judge-config", config, "--repetitions", "4",
               "--out", str(files["out"]), "--log", str(tmp_path / "killed.log")]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if cache.exists() and cache.read_bytes().count(b"\n") >= 4:
                    break
                time.sleep(0.02)
        finally:
            proc.kill()
            proc.wait()
        assert not files["out"].exists(), "the job finished before it could be killed"
        done = len(JudgeCache(cache))
        assert 4 <= done < total
        assert fake.requests >= done  # in-flight requests at the kill were lost

        sent = fake.requests
        judge = make(fake, tmp_path, concurrency=2)
        run_step(files, judge, reps=4)
        assert fake.requests - sent == total - done
        assert judge.usage()["cached"] == done
        assert len(cache_lines(cache)) == total
