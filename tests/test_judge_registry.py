"""The judge registry: one entry per backend, asked by the plan, the rules and the step.

A new backend registered in one place runs through the judge step; a key of another
backend, an unknown key or a bad value fails before any job, in `check_judge` and in
the schema alike; the workflow's questions (API keys, cache file, inputs) get the
answers they got before the registry.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from sacpo_steps.core.errors import InputError
from sacpo_steps.evaluation import judge as judge_step
from sacpo_steps.evaluation.judges import Judge, JudgeReply, JudgeRequest
from sacpo_steps.evaluation.judges.registry import (
    BACKENDS,
    Backend,
    cache_file,
    check_judge,
    cost_basis,
    for_criterion,
    get_backend,
    input_files,
    judge_schema,
    make_judge,
    protocol,
    register_backend,
    required_env,
    resolve_judge,
)
from sacpo_steps.evaluation.judges.settings import setting

ROOT = Path(__file__).resolve().parent.parent


# --- a new backend, in one place ----------------------------------------------------------


@dataclass(frozen=True)
class LongerSettings:
    """Settings of the test backend: answers closer than `margin` words tie."""

    margin: int = setting(0, "Word counts at most this far apart tie", type="integer",
                          minimum=0)


class LongerAnswerJudge(Judge):
    """The longer answer wins (the length bias judges are known for, made a judge)."""

    name = "longer"
    deterministic = True

    def __init__(self, settings: LongerSettings) -> None:
        self.settings = settings

    def judge_many(self, requests: Sequence[JudgeRequest]) -> list[JudgeReply]:
        out = []
        for r in requests:
            a, b = len(r.first_answer.split()), len(r.second_answer.split())
            verdict = ("tie" if abs(a - b) <= self.settings.margin
                       else "first" if a > b else "second")
            out.append(JudgeReply(verdict, json.dumps({"words": [a, b]})))
        return out


@pytest.fixture
def longer() -> Iterator[Backend]:
    entry = register_backend(Backend(
        name="longer", judge_class=f"{__name__}:LongerAnswerJudge", settings=LongerSettings,
        help="the longer answer wins (a test backend)", deterministic=True))
    try:
        yield entry
    finally:
        BACKENDS.pop("longer")


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    prompts = [{"prompt_id": f"p{i}", "prompt": f"question {i}?"} for i in range(3)]
    candidate = ["a long and detailed answer", "two words", "same length"]
    baseline = ["short", "a much longer answer here", "equal size"]

    def generations(model: str, answers: list[str]) -> Path:
        return write_jsonl(tmp_path / f"{model}.jsonl", [
            {**p, "answer": a, "model": model} for p, a in zip(prompts, answers, strict=True)])

    return {"prompts": write_jsonl(tmp_path / "help.jsonl", prompts),
            "cand": generations("dpo", candidate), "base": generations("sft", baseline),
            "out": tmp_path / "battles" / "dpo__vs__sft.jsonl"}


def outcomes(path: Path) -> dict[tuple[str, str], str]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {(r["prompt_id"], r["order"]): r["outcome"] for r in rows}


def test_a_registered_backend_runs_through_the_judge_step(longer, files):
    judge = make_judge({"backend": "longer", "repetitions": 3})
    assert isinstance(judge, LongerAnswerJudge) and judge.settings == LongerSettings()
    summary = judge_step.judge_model(files["cand"], files["base"], files["prompts"],
                                     "helpfulness", judge, 3, files["out"])
    assert summary["repetitions"] == 1  # deterministic
    assert outcomes(files["out"]) == {
        ("p0", "a_first"): "a_wins", ("p0", "b_first"): "a_wins",
        ("p1", "a_first"): "b_wins", ("p1", "b_first"): "b_wins",
        ("p2", "a_first"): "tie", ("p2", "b_first"): "tie"}

    # the CLI, with the backend's own setting: p1's answers, 3 words apart, tie now
    out = files["out"].with_name("cli.jsonl")
    judge_step.main(["--candidate", str(files["cand"]), "--baseline", str(files["base"]),
                     "--prompts", str(files["prompts"]), "--criterion", "helpfulness",
                     "--judge-config", json.dumps({"backend": "longer", "margin": 3}),
                     "--out", str(out)])
    assert outcomes(out) == {(pid, order): "a_wins" if pid == "p0" else "tie"
                             for pid in ("p0", "p1", "p2") for order in ("a_first", "b_first")}
    assert {r["judge"] for r in map(json.loads, out.read_text().splitlines())} == {"longer"}


def test_a_registered_backend_is_checked_and_in_the_schema(longer):
    assert check_judge({"backend": "longer", "margin": 2}) == {"backend": "longer",
                                                               "margin": 2}
    for bad, field in [({"margin": -1}, "judge.margin"), ({"margin": "2"}, "judge.margin"),
                       ({"temperature": 0.5}, "judge.temperature")]:
        with pytest.raises(InputError) as err:
            check_judge({"backend": "longer", **bad})
        assert err.value.field == field
    with pytest.raises(InputError, match="belongs to the openai judge, not longer"):
        check_judge({"backend": "longer", "temperature": 0.5})
    schema = judge_schema()
    assert "longer" in schema["properties"]["backend"]["enum"]
    assert "longer: word counts" in schema["properties"]["margin"]["description"]
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"backend": "longer", "margin": 2})
    assert not validator.is_valid({"backend": "longer", "margin": -1})
    assert not validator.is_valid({"backend": "rule", "margin": 2})
    assert not validator.is_valid({"backend": "longer", "temperature": 0.5})


def test_registering_twice_needs_replace(longer):
    with pytest.raises(ValueError, match="registered already"):
        register_backend(longer)
    assert register_backend(longer, replace=True) is longer
    with pytest.raises(ValueError, match="protocol keys"):
        Backend(name="bad", judge_class="x:Y", settings=_WithRepetitions, help="")
    with pytest.raises(ValueError, match="not among its settings"):
        Backend(name="bad", judge_class="x:Y", settings=LongerSettings, help="",
                inputs=("model_dir",))


@dataclass(frozen=True)
class _WithRepetitions:
    repetitions: int = setting(1, "clashes with the protocol key", type="integer")


# --- checking a section before any job ----------------------------------------------------


@pytest.mark.parametrize("section,field,message", [
    ({"backend": "rule", "reward_model": "x"}, "reward_model",
     "belongs to the score_model judge, not rule"),
    ({"backend": "openai", "cost_model": "x"}, "cost_model",
     "belongs to the score_model judge, not openai"),
    ({"backend": "score_model", "reward_model": "x", "temperature": 0.7}, "temperature",
     "belongs to the openai judge, not score_model"),
    ({"reward_model": "x"}, "reward_model", "not rule"),  # the default backend is rule
    ({"backend": "openai", "temprature": 0.7}, "temprature", "did you mean temperature"),
    ({"backend": "rule", "repetition": 3}, "repetition", "did you mean repetitions"),
    ({"backend": "openai", "temperature": "hot"}, "temperature", "expected a number"),
    ({"backend": "openai", "max_tokens": 16.5}, "max_tokens", "expected an integer"),
    ({"backend": "openai", "format": "stars"}, "format", "must be one of"),
    ({"backend": "openai", "model": " "}, "model", "non-empty"),
    ({"backend": "openai", "templates": {"honesty": "x.txt"}}, "templates.honesty",
     "unknown key"),
    ({"backend": "openai", "cache": "c.jsonl"}, "cache", "set by the workflow"),
    ({"backend": "score_model", "reward_model": "x", "dtype": "float16"}, "dtype",
     "must be one of"),
    ({"backend": "score_model"}, "reward_model", "needs reward_model"),
    ({"backend": "score_model", "cost_model": "x", "template": "{prompt}"}, "template",
     "needs exactly one {answer}"),
    ({"backend": "rule", "repetitions": 0}, "repetitions", "at least 1"),
    ({"backend": "rule", "max_error_rate": 1.5}, "max_error_rate", "at most 1"),
    ({"backend": "gpt5"}, "backend", "known: openai, rule, score_model"),
])
def test_check_judge_names_the_field(section, field, message):
    where = "evaluation.prompt_sets.red_team.judge"
    with pytest.raises(InputError) as err:
        check_judge(section, where)
    assert err.value.field == f"{where}.{field}"
    assert message in str(err.value)


def test_check_judge_passes_good_sections_unchanged():
    for section in [{"backend": "rule", "repetitions": 1},
                    {"backend": "openai", "model": "gpt-4-0125-preview", "temperature": 0.7,
                     "repetitions": 3, "max_error_rate": 0.1, "parallel_jobs": 2},
                    {"backend": "score_model", "cost_model": "m", "tie_tolerance": 0.5}]:
        assert check_judge(section) == section
    # the workflow's own keys are allowed in a job's section
    job = {"backend": "openai", "cache": "resources/judge_cache/openai.jsonl"}
    assert check_judge(job, job=True) == job


def test_every_shipped_config_passes():
    for path in sorted((ROOT / "config").glob("*.yaml")):
        evaluation = yaml.safe_load(path.read_text()).get("evaluation") or {}
        sections = [evaluation.get("judge", {})]
        for ps in (evaluation.get("prompt_sets") or {}).values():
            sections.append(resolve_judge(evaluation.get("judge", {}), ps.get("judge")))
        for section in sections:
            check_judge(section, str(path.name))
            jsonschema.validate(section, judge_schema())


def test_protocol_defaults_live_in_one_place():
    # a backend's own keys are not the protocol's
    assert protocol({"backend": "openai", "temperature": 0.3}) == protocol({"backend": "openai"})
    p = protocol({"repetitions": 3})
    assert (p.backend, p.repetitions, p.max_error_rate, p.parallel_jobs) == ("rule", 3, 0.05, 4)
    assert judge_step.error_rate_limit({}) == 0.05
    with pytest.raises(InputError) as err:
        judge_step.error_rate_limit({"max_error_rate": True})
    assert err.value.field == "judge.max_error_rate"


# --- the schema rejects the same ----------------------------------------------------------


def schema_errors(section: dict[str, Any], **kwargs: Any) -> list[str]:
    validator = jsonschema.Draft202012Validator(judge_schema(**kwargs))
    return [e.message for e in validator.iter_errors(section)]


def test_schema_rejects_stray_unknown_and_mistyped_keys():
    assert schema_errors({"backend": "rule", "reward_model": "x"})
    assert schema_errors({"reward_model": "x"})  # no backend: rule
    assert schema_errors({"backend": "openai", "temprature": 0.7})
    assert schema_errors({"backend": "openai", "temperature": "hot"})
    assert schema_errors({"backend": "openai", "cache": "c.jsonl"})  # the workflow's key
    assert schema_errors({"backend": "score_model", "dtype": "float16"})
    assert schema_errors({"backend": "gpt5"})
    for good in [{}, {"backend": "rule", "repetitions": 1},
                 {"backend": "openai", "model": "m", "templates": {"helpfulness": "h.txt"},
                  "explain": True, "parallel_jobs": 2},
                 {"backend": "score_model", "reward_model": "r", "cost_model": None}]:
        assert schema_errors(good) == [], good


def test_override_schema_leaves_the_backend_to_the_global_section():
    # an override without backend inherits it: its keys are checked after resolve_judge
    assert schema_errors({"reward_model": "x"}, override=True) == []
    assert schema_errors({"backend": "rule", "reward_model": "x"}, override=True)
    assert "default" not in judge_schema(override=True)["properties"]["backend"]


def test_schema_descriptions_say_each_default_and_only_protocol_defaults_are_filled():
    props = judge_schema()["properties"]
    assert "(default 0.7)" in props["temperature"]["description"]
    assert "(default 8)" in props["batch_size"]["description"]
    assert "(default OPENAI_API_KEY)" in props["api_key_env"]["description"]
    assert "(default 0.05)" in props["max_error_rate"]["description"]
    assert props["temperature"]["description"].startswith("openai: ")
    # a default written into the config would change every judge job's params
    assert {k for k, v in props.items() if "default" in v} == {"backend", "repetitions"}
    assert (props["backend"]["default"], props["repetitions"]["default"]) == ("rule", 1)


# --- what the workflow asks ---------------------------------------------------------------


def test_required_env():
    assert required_env({"backend": "rule"}) == []
    assert required_env({"backend": "score_model", "cost_model": "m"}) == []
    assert required_env({"backend": "openai"}) == ["OPENAI_API_KEY"]
    assert required_env({"backend": "openai", "api_key_env": "VLLM_KEY"}) == ["VLLM_KEY"]


def test_cache_file_keeps_the_existing_names():
    assert cache_file({"backend": "rule"}) is None
    assert cache_file({"backend": "openai"}) == "resources/judge_cache/openai.jsonl"
    assert cache_file({"backend": "openai", "model": "gpt-4-0125-preview"}) == (
        "resources/judge_cache/gpt-4-0125-preview.jsonl")
    assert cache_file({"backend": "openai", "model": "org/model:v1"}) == (
        "resources/judge_cache/org_model_v1.jsonl")
    assert cache_file({"backend": "score_model", "cost_model": "m"}) == (
        "resources/judge_cache/score_model.jsonl")


def test_input_files():
    assert input_files({"backend": "rule"}, "helpfulness", spec="w/spec.json") == {
        "spec": "w/spec.json"}
    with pytest.raises(ValueError, match="spec"):
        input_files({"backend": "rule"}, "helpfulness")
    score = {"backend": "score_model", "reward_model": "models/r", "cost_model": "models/c"}
    # both models: the judge checks and fingerprints both folders whatever the criterion
    assert input_files(score, "harmlessness") == {"reward_model": "models/r",
                                                  "cost_model": "models/c"}
    assert input_files({"backend": "score_model", "cost_model": "c"}, "helpfulness") == {
        "cost_model": "c"}
    openai = {"backend": "openai", "templates": {"helpfulness": "my_help.txt",
                                                 "harmlessness": None}}
    assert input_files(openai, "helpfulness") == {"template_helpfulness": "my_help.txt"}
    assert input_files(openai, "harmlessness") == {}
    assert input_files({"backend": "openai"}, "helpfulness") == {}
    # a packaged template set is no file the job reads (it is part of the judge's source)
    named = {"backend": "openai", "templates": {"helpfulness": "v2", "harmlessness": "legacy"}}
    assert input_files(named, "helpfulness") == {} and input_files(named, "harmlessness") == {}
    # ... and its name travels to the job of its criterion only
    assert for_criterion(named, "harmlessness") == {"backend": "openai",
                                                    "templates": {"harmlessness": "legacy"}}


def test_for_criterion_keeps_only_that_criterions_template():
    section = {"backend": "openai", "model": "m",
               "templates": {"helpfulness": "h.txt", "harmlessness": "r.txt"}}
    assert for_criterion(section, "helpfulness") == {"backend": "openai", "model": "m",
                                                     "templates": {"helpfulness": "h.txt"}}
    assert for_criterion({"backend": "openai", "templates": {"helpfulness": "h.txt"}},
                         "harmlessness") == {"backend": "openai"}
    assert for_criterion({"backend": "rule"}, "helpfulness") == {"backend": "rule"}


def test_cost_basis_is_the_openai_judges_own_settings():
    from sacpo_steps.evaluation.judges.openai_prompts import EXPLAIN_INSTRUCTION, load_template

    assert cost_basis({"backend": "rule"}, "helpfulness") is None
    assert cost_basis({"backend": "score_model", "cost_model": "m"}, "harmlessness") is None
    basis = cost_basis({"backend": "openai"}, "helpfulness")
    template = load_template("helpfulness", "scores")
    assert (basis.model, basis.template_chars, basis.output_tokens) == (
        "gpt-4-0125-preview", len(template.text), 16)
    assert (basis.price_input_per_1m, basis.price_output_per_1m) == (10.0, 30.0)
    # a named set is priced by its own file
    old = cost_basis({"backend": "openai", "templates": {"helpfulness": "v2"}}, "helpfulness")
    assert old.template_chars == len(load_template("helpfulness", "scores", "v2").text)
    assert old.template_chars != basis.template_chars
    explained = cost_basis({"backend": "openai", "model": "local", "explain": True},
                           "harmlessness")
    assert explained.template_chars == (len(load_template("harmlessness", "scores").text)
                                        + len(EXPLAIN_INSTRUCTION))
    assert explained.output_tokens == 1024
    assert (explained.price_input_per_1m, explained.price_output_per_1m) == (None, None)


def test_what_each_backend_can_do():
    assert [n for n, e in sorted(BACKENDS.items()) if e.rates_one_answer] == [
        "rule", "score_model"]
    assert [n for n, e in sorted(BACKENDS.items()) if e.calls_api] == ["openai"]
    # the entries agree with the judge classes they name
    for entry in BACKENDS.values():
        cls = entry.load()
        assert cls.deterministic == entry.deterministic, entry.name
        assert (cls.safe_many is not Judge.safe_many) == entry.rates_one_answer, entry.name


def test_get_backend_lists_the_known_ones():
    assert get_backend("openai").name == "openai"
    with pytest.raises(InputError) as err:
        get_backend("gpt5", where="evaluation.judge")
    assert err.value.field == "evaluation.judge.backend"
    assert "known: openai, rule, score_model" in str(err.value)


# --- resolve_judge ------------------------------------------------------------------------


def test_resolve_judge_overrides_key_by_key():
    glob = {"backend": "openai", "model": "gpt-4", "repetitions": 3, "max_error_rate": 0.1}
    assert resolve_judge(glob, None) == glob
    assert resolve_judge(glob, {"temperature": 0.0}) == {**glob, "temperature": 0.0}
    assert resolve_judge(glob, {"backend": "openai", "model": "gpt-4o"}) == {
        **glob, "model": "gpt-4o"}
    # another backend keeps only the protocol keys of the global judge
    assert resolve_judge(glob, {"backend": "score_model", "cost_model": "c"}) == {
        "repetitions": 3, "max_error_rate": 0.1, "backend": "score_model", "cost_model": "c"}
    # the global judge's backend defaults to rule
    assert resolve_judge({"repetitions": 2}, {"backend": "rule"}) == {
        "repetitions": 2, "backend": "rule"}
    assert resolve_judge({"repetitions": 2}, {"backend": "openai"}) == {
        "repetitions": 2, "backend": "openai"}


# --- light to import, and in the judge step's source hash ---------------------------------


def test_the_registry_imports_no_client_nor_torch():
    code = ("import sys, sacpo_steps.evaluation.judges.registry as r; r.judge_schema(); "
            "r.check_judge({'backend': 'openai'}); "
            "r.cost_basis({'backend': 'openai'}, 'helpfulness'); "
            "print(sorted(m for m in ('openai', 'torch', 'transformers', 'httpx') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_judge_steps_source_hash_covers_every_builtin_backend():
    from sacpo_steps.core.provenance import PACKAGE_DIR, module_closure

    files = {p.relative_to(PACKAGE_DIR).as_posix()
             for p in module_closure("sacpo_steps.evaluation.judge")}
    for name in ("rule", "openai", "score_model"):
        module = get_backend(name).judge_class.split(":")[0]
        assert module.replace("sacpo_steps.", "").replace(".", "/") + ".py" in files
    assert {"evaluation/judges/openai_prompts.py",
            "evaluation/judges/score_model_loader.py"} <= files
