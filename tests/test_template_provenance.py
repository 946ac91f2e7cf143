"""Judge prompt templates and what reruns: a packaged template is not the judge step's
source but a param of the jobs that render it (Plan.judge_templates), so editing one
reruns exactly the judge jobs of its criterion; no Snakemake call reads a template to
hash a step, and the battles' record names the template its judge rendered.

The end-to-end check (a finished run, a template edited, `snakemake -n`) is in
tests/test_workflow.py; here the parts, without a run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sacpo_steps.core.lineage import fingerprint_of, read_sidecar
from sacpo_steps.core.provenance import PACKAGE_DIR
from sacpo_steps.plan import load_plan
from tests.fake_openai import FakeOpenAI
from tests.helpers import REDUCED, copy_workflow, write_config

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = PACKAGE_DIR / "evaluation" / "judges" / "prompts"
DEMO = yaml.safe_load((ROOT / "config" / "config.yaml").read_text(encoding="utf-8"))
OPENAI = {"backend": "openai", "api_key_env": "TEST_JUDGE_KEY"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def openai_config(base: dict, **judge) -> dict:
    cfg = copy.deepcopy(base)
    cfg["evaluation"]["judge"] = {**OPENAI, **judge}
    return cfg


def plan_of(cfg: dict):
    return load_plan(copy.deepcopy(cfg), source="test.yaml")


# ---- the jobs' `templates` param ------------------------------------------------------


def test_each_judge_job_carries_the_hash_of_the_packaged_template_it_renders():
    plan = plan_of(openai_config(DEMO))
    assert plan.judge_templates(["helpfulness"]) == {
        "helpfulness": sha256(PROMPTS / "helpfulness_scores.txt")}
    assert plan.judge_templates(["red_team"]) == {
        "harmlessness": sha256(PROMPTS / "harmlessness_scores.txt")}
    # the same hash the usage file and the cache keys give
    from sacpo_steps.evaluation.judges.openai_prompts import load_template
    assert plan.judge_templates(["red_team"])["harmlessness"] == \
        load_template("harmlessness", "scores").sha256

    # a named set and another format pick other files
    plan = plan_of(openai_config(DEMO, format="verdict", templates={"helpfulness": "v2"}))
    assert plan.judge_templates(["helpfulness"]) == {
        "helpfulness": sha256(PROMPTS / "v2" / "helpfulness_verdict.txt")}
    assert plan.judge_templates(["red_team"]) == {
        "harmlessness": sha256(PROMPTS / "harmlessness_verdict.txt")}


def test_the_users_own_template_is_an_input_not_a_param(tmp_path):
    own = tmp_path / "harmless.txt"
    own.write_text("{question} {answer_a} {answer_b}", encoding="utf-8")
    plan = plan_of(openai_config(DEMO, templates={"harmlessness": str(own)}))
    assert plan.judge_templates(["red_team"]) == {}
    assert plan.judge_inputs("dpo_h", "sft", "red_team", 0)["template_harmlessness"] == str(own)
    assert set(plan.judge_templates(["helpfulness"])) == {"helpfulness"}


def test_judges_without_templates_have_no_template_hashes():
    rule = plan_of(DEMO)  # the demo's rule judge
    assert rule.judge_templates(list(rule.prompt_sets)) == {}
    cfg = copy.deepcopy(DEMO)
    cfg["evaluation"]["judge"] = {"backend": "score_model",
                                  "reward_model": "resources/models/reward"}
    assert plan_of(cfg).judge_templates(list(DEMO["evaluation"]["prompt_sets"])) == {}


def test_the_target_search_carries_both_criteria_templates():
    cfg = yaml.safe_load((ROOT / "config" / "demo-target.yaml").read_text(encoding="utf-8"))
    plan = plan_of(openai_config(cfg))
    assert plan.judge_templates(list(plan.target_sets())) == {
        "helpfulness": sha256(PROMPTS / "helpfulness_scores.txt"),
        "harmlessness": sha256(PROMPTS / "harmlessness_scores.txt")}


def test_a_backend_with_packaged_templates_must_hash_them():
    from sacpo_steps.evaluation.judges.openai_settings import OpenAIJudgeConfig
    from sacpo_steps.evaluation.judges.registry import Backend

    with pytest.raises(ValueError, match="template_hashes"):
        Backend(name="mine", judge_class="x:Y", settings=OpenAIJudgeConfig, help="",
                templates="templates", packaged_templates=("default",))


# ---- editing a template: its criterion's param changes, no code hash does --------------

_PROBE = """
import json, sys
from sacpo_steps.core.provenance import source_hash
from sacpo_steps.plan import load_plan
from sacpo_steps.steps import STEPS, module_of
plan = load_plan(json.loads(sys.argv[1]), source="test.yaml")
print(json.dumps({
    "code": {step: source_hash(module_of(step)) for step in STEPS},
    "templates": {s: plan.judge_templates([s]) for s in plan.prompt_sets},
}))
"""


def _probe(package_root: Path, cfg: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(cfg)], cwd=package_root,
                         check=True, capture_output=True, text=True,
                         env={"PYTHONPATH": str(package_root), "PYTHONSAFEPATH": "1"})
    return json.loads(out.stdout)


def test_editing_one_template_changes_only_its_criterions_param(tmp_path):
    shutil.copytree(PACKAGE_DIR, tmp_path / "sacpo_steps",
                    ignore=shutil.ignore_patterns("__pycache__"))
    cfg = openai_config(DEMO)
    before = _probe(tmp_path, cfg)
    template = tmp_path / "sacpo_steps" / "evaluation" / "judges" / "prompts" / \
        "harmlessness_scores.txt"
    template.write_text(template.read_text(encoding="utf-8") + "\nBe brief.\n",
                        encoding="utf-8")
    after = _probe(tmp_path, cfg)
    assert after["code"] == before["code"]  # no step's source hash covers a template
    assert after["templates"]["helpfulness"] == before["templates"]["helpfulness"]
    assert after["templates"]["red_team"] != before["templates"]["red_team"]
    assert after["templates"]["red_team"] == {"harmlessness": sha256(template)}
    # a template of another set (v2, legacy) is nobody's: editing it changes nothing
    legacy = template.parent / "legacy" / "harmlessness_scores.txt"
    legacy.write_text(legacy.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    assert _probe(tmp_path, cfg) == after


# ---- what a Snakemake call reads -------------------------------------------------------

# runs Snakemake in this process, noting every file it opens under judges/prompts/
_WATCH = """
import json, sys
opened = []
def hook(event, args):
    if event == "open" and isinstance(args[0], str) and "judges/prompts" in args[0]:
        opened.append(args[0].split("judges/prompts/")[-1])
sys.addaudithook(hook)
from snakemake.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print("OPENED " + json.dumps({"code": code, "opened": sorted(set(opened))}))
"""


def _opened(workdir: Path, *args: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", _WATCH, "--cores", "1", *args], cwd=workdir,
                          capture_output=True, text=True, timeout=300,
                          env={**_env(), "TEST_JUDGE_KEY": "sk-test"})
    line = next(x for x in proc.stdout.splitlines() if x.startswith("OPENED "))
    result = json.loads(line[len("OPENED "):])
    assert result["code"] in (0, None), proc.stdout[-3000:] + proc.stderr[-3000:]
    return result["opened"]


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "TEST_JUDGE_KEY"}


def test_list_rules_reads_no_template(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    assert _opened(workdir, "--list-rules") == []


def test_a_rule_judged_dry_run_reads_no_template(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    assert _opened(workdir, "-n", "--configfile", REDUCED) == []


def test_an_openai_judged_dry_run_reads_only_the_templates_it_renders(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    cfg = yaml.safe_load((ROOT / REDUCED).read_text(encoding="utf-8"))
    cfg["evaluation"]["judge"] = {**OPENAI, "repetitions": 1,
                                  "templates": {"helpfulness": "v2"}}
    config = write_config(tmp_path / "openai.yaml", cfg)
    # the cost estimate at start-up and the judge jobs' params: these two files only
    assert _opened(workdir, "-n", "--configfile", str(config)) == [
        "harmlessness_scores.txt", "v2/helpfulness_scores.txt"]


# ---- the battles' record ---------------------------------------------------------------


def _judge_once(server: FakeOpenAI, tmp_path: Path, templates: dict | None) -> dict:
    from sacpo_steps.evaluation import judge as judge_step
    from sacpo_steps.evaluation.judges import make_judge

    prompts = [{"prompt_id": p, "prompt": f"How do I do {p}?"} for p in ("h1", "h2")]

    def write(name: str, rows: list[dict]) -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path

    def gens(model: str, answer: str) -> list[dict]:
        return [{**p, "answer": answer, "model": model} for p in prompts]

    section = {**OPENAI, "base_url": server.url, "cache": str(tmp_path / "cache.jsonl"),
               **({"templates": templates} if templates else {})}
    judge = make_judge(section)
    out = tmp_path / "battles.jsonl"
    judge_step.judge_model(write("cand.jsonl", gens("dpo-h", "good #q=8")),
                           write("base.jsonl", gens("sft", "meh #q=4")),
                           write("prompts.jsonl", prompts), "harmlessness", judge, 1, out)
    judge.close()
    return read_sidecar(out)


def test_the_battles_record_names_the_template_the_judge_rendered(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
    with FakeOpenAI() as server:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        default = _judge_once(server, tmp_path / "a", None)
        legacy = _judge_once(server, tmp_path / "b", {"harmlessness": "legacy"})
    assert default["inputs"]["template"] == {
        "name": "sacpo_steps/evaluation/judges/prompts/harmlessness_scores.txt",
        "sha256": sha256(PROMPTS / "harmlessness_scores.txt")}
    assert legacy["inputs"]["template"]["sha256"] == \
        sha256(PROMPTS / "legacy" / "harmlessness_scores.txt")
    # the code hash no longer tells the templates apart: the record's template does
    assert default["code"] == legacy["code"]
    swapped = {**default["inputs"], "template": legacy["inputs"]["template"]}
    assert fingerprint_of(default) != fingerprint_of({**default, "inputs": swapped})
