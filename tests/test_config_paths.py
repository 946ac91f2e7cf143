"""File paths a config names resolve as `extends:` does: against the folder of the config
file that names them when the file is there, else as before (the working directory,
then the clone's root). A missing one is refused before any job, by its config key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sacpo_steps.plan import PlanError, load_plan
from sacpo_steps.plan.loading import path_fields
from tests.helpers import REDUCED, ROOT, output_of, parse_jobs, reduced_config


def every_path_config() -> dict:
    """The reduced demo with every kind of file a config can name, by relative paths:
    a local SFT, preference source, baseline and prompt set, the figures' model info,
    an openai judge's own template and a prompt set's score-model judge."""
    cfg = reduced_config()
    cfg["sft"] = {"name": "sft", "source": "local", "local": {"path": "models/sft"}}
    cfg["preference_sources"]["mine"] = {"source": "local", "path": "data/prefs.jsonl"}
    cfg["baselines"] = {"ext": {"source": "local", "path": "models/ext"}}
    cfg["evaluation"]["prompt_sets"]["own"] = {"source": "local", "criterion": "helpfulness",
                                               "path": "prompts/own.jsonl"}
    cfg["evaluation"]["figures"] = {"model_info": "info.csv"}
    cfg["evaluation"]["judge"] = {"backend": "openai", "model": "m", "repetitions": 1,
                                  "templates": {"helpfulness": "templates/help.txt",
                                                "harmlessness": "v2"}}
    cfg["evaluation"]["prompt_sets"]["red_team"]["judge"] = {
        "backend": "score_model", "cost_model": "models/cost"}
    return cfg


FILES = ["data/prefs.jsonl", "prompts/own.jsonl", "info.csv", "templates/help.txt"]
FOLDERS = ["models/sft", "models/ext", "models/cost"]
#: config key -> the relative path every_path_config gives it
KEYS = {"sft.local.path": "models/sft", "preference_sources.mine.path": "data/prefs.jsonl",
        "baselines.ext.path": "models/ext", "evaluation.prompt_sets.own.path":
        "prompts/own.jsonl", "evaluation.figures.model_info": "info.csv",
        "evaluation.judge.templates.helpfulness": "templates/help.txt",
        "evaluation.prompt_sets.red_team.judge.cost_model": "models/cost"}


def make_files(folder: Path, names=(*FILES, *FOLDERS)) -> Path:
    for name in names:
        path = folder / name
        if name in FOLDERS:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x\n", encoding="utf-8")
    return folder


def resolved(cfg: dict) -> dict[str, str]:
    return {where: holder[key] for where, holder, key, _ in path_fields(cfg)}


def schema_keys(schema: dict, node: dict, prefix: str = "") -> set[str]:
    """Config keys (`*` for any name) of the schema's properties named `path`."""
    while "$ref" in node:
        ref = node["$ref"].removeprefix("#/").split("/")
        node = {**schema[ref[0]][ref[1]], **{k: v for k, v in node.items() if k != "$ref"}}
    found = set()
    for key, sub in (node.get("properties") or {}).items():
        where = f"{prefix}{key}"
        if key == "path":
            found.add(where)
        if isinstance(sub, dict):
            found |= schema_keys(schema, sub, where + ".")
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        found |= schema_keys(schema, extra, prefix + "*.")
    return found


def test_path_fields_name_every_file_key_of_the_schema():
    """Every key of the schema named `path`, the figures' model info and the judge
    registry's file settings (in every judge section) are the fields resolved."""
    from sacpo_steps.plan import config_schema

    schema = config_schema()
    general = {key.replace(".*.", ".").replace("*", "") for key in
               (*schema_keys(schema, schema), "evaluation.figures.model_info")}
    named = {key.replace("mine", "").replace("ext", "").replace("own", "")
             .replace("..", ".") for key in KEYS}
    assert general == {"sft.local.path", "preference_sources.path", "baselines.path",
                       "evaluation.prompt_sets.path", "evaluation.figures.model_info"}
    assert general <= named
    assert resolved(every_path_config()) == KEYS
    # the packaged template's name is no file
    assert "evaluation.judge.templates.harmlessness" not in resolved(every_path_config())


def test_a_config_outside_the_working_directory_finds_the_files_beside_it(tmp_path,
                                                                           monkeypatch):
    mine = make_files(tmp_path / "mine")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = every_path_config()
    plan = load_plan(cfg, source="mine/cfg.yaml", config_dir=mine)
    assert resolved(cfg) == {key: str(mine / rel) for key, rel in KEYS.items()}
    assert plan.paths.prompt_set_file("own", 0) == str(mine / "prompts/own.jsonl")
    assert plan.paths.preference_table("mine") == str(mine / "data/prefs.jsonl")
    assert plan.paths.model_dir("ext") == str(mine / "models/ext")


def test_paths_below_the_working_directory_stay_relative_and_unchanged(tmp_path, monkeypatch):
    """A config in the working directory (or a sub-folder of it) gives the same strings
    as before, so no job's params change; the clone's demo config is unchanged too."""
    make_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    cfg = every_path_config()
    load_plan(cfg, config_dir=tmp_path)
    assert resolved(cfg) == KEYS
    sub = tmp_path / "configs"
    make_files(sub, ["info.csv"])
    cfg = every_path_config()
    load_plan(cfg, config_dir=sub)
    assert resolved(cfg) == {**KEYS, "evaluation.figures.model_info": "configs/info.csv"}

    monkeypatch.chdir(ROOT)
    demo = yaml.safe_load((ROOT / "config/config.yaml").read_text(encoding="utf-8"))
    load_plan(demo, config_dir=ROOT / "config")
    assert demo["evaluation"]["figures"]["model_info"] == "config/demo_model_info.csv"


def test_a_path_relative_to_the_clone_root_still_works(tmp_path, monkeypatch):
    """Not beside the config: relative to the working directory as before (here the
    clone), and from elsewhere the clone's root, where `extends:` looks too."""
    mine = tmp_path / "mine"
    mine.mkdir()
    cfg = reduced_config()
    cfg["evaluation"]["figures"] = {"model_info": "config/demo_model_info.csv"}
    monkeypatch.chdir(ROOT)
    load_plan(cfg, config_dir=mine)
    assert cfg["evaluation"]["figures"]["model_info"] == "config/demo_model_info.csv"
    monkeypatch.chdir(tmp_path)
    cfg = reduced_config()
    cfg["evaluation"]["figures"] = {"model_info": "config/demo_model_info.csv"}
    load_plan(cfg, config_dir=mine)  # base_dir: the clone the package belongs to
    assert cfg["evaluation"]["figures"]["model_info"] == str(ROOT / "config/demo_model_info.csv")


def test_absolute_paths_stay(tmp_path, monkeypatch):
    files = make_files(tmp_path / "files")
    monkeypatch.chdir(tmp_path)
    cfg = every_path_config()
    cfg["evaluation"]["figures"]["model_info"] = str(files / "info.csv")
    cfg["preference_sources"]["mine"]["path"] = str(files / "data/prefs.jsonl")
    make_files(tmp_path / "cfg")
    load_plan(cfg, config_dir=tmp_path / "cfg")
    assert cfg["evaluation"]["figures"]["model_info"] == str(files / "info.csv")
    assert cfg["preference_sources"]["mine"]["path"] == str(files / "data/prefs.jsonl")


def test_each_file_of_an_extends_chain_names_paths_beside_itself(tmp_path, monkeypatch):
    shared, mine = tmp_path / "shared", tmp_path / "mine"
    make_files(shared, ["info.csv", "data/prefs.jsonl"])
    make_files(mine, ["prompts/own.jsonl", "data/prefs.jsonl"])
    base = reduced_config()
    base["preference_sources"]["mine"] = {"source": "local", "path": "data/prefs.jsonl"}
    base["evaluation"]["figures"] = {"model_info": "info.csv"}
    (shared / "base.yaml").write_text(yaml.safe_dump(base), encoding="utf-8")
    child = {"extends": "../shared/base.yaml", "experiment": "child",
             "evaluation": {"prompt_sets": {"own": {"source": "local", "path":
                                                    "prompts/own.jsonl",
                                                    "criterion": "helpfulness"}}}}
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    load_plan(child, config_dir=mine)
    assert child["evaluation"]["figures"]["model_info"] == str(shared / "info.csv")
    # the base's own file, though the child's folder has one of that name too
    assert child["preference_sources"]["mine"]["path"] == str(shared / "data/prefs.jsonl")
    assert child["evaluation"]["prompt_sets"]["own"]["path"] == str(mine / "prompts/own.jsonl")


def test_a_missing_file_is_refused_by_its_config_key(tmp_path, monkeypatch):
    make_files(tmp_path, [n for n in (*FILES, *FOLDERS)
                          if n not in ("prompts/own.jsonl", "templates/help.txt")])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PlanError) as err:
        load_plan(every_path_config(), config_dir=tmp_path)
    message = str(err.value)
    assert "evaluation.prompt_sets.own.path: no file or folder 'prompts/own.jsonl'" in message
    assert "evaluation.judge.templates.helpfulness: no file or folder 'templates/help.txt'" \
        in message
    assert "info.csv" not in message and str(tmp_path) in message
    # a path the config does not use (a demo source's) is not checked
    cfg = reduced_config()
    cfg["preference_sources"]["demo"]["path"] = "nowhere.jsonl"
    load_plan(cfg, config_dir=tmp_path)


@pytest.mark.slow
def test_the_workflow_reads_a_file_beside_a_config_outside_the_working_directory(tmp_path):
    """Through Snakemake: run in one folder with a config from another, whose own prompt
    set lies beside it; the job reads that file, and a missing one stops the run before
    any job with its config key."""
    mine, work = tmp_path / "mine", tmp_path / "work"
    work.mkdir()
    mine.mkdir()
    (mine / "own.jsonl").write_text('{"prompt_id": "a", "prompt": "how do i bake bread?"}\n',
                                    encoding="utf-8")
    cfg = yaml.safe_load((ROOT / REDUCED).read_text(encoding="utf-8"))
    cfg["evaluation"]["prompt_sets"]["own"] = {"source": "local", "path": "own.jsonl",
                                               "criterion": "helpfulness"}
    (mine / "cfg.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    entry = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "workflow" / "Snakefile"),
             "--directory", str(work), "--cores", "2", "-n"]
    proc = subprocess.run([*entry, "--configfile", str(mine / "cfg.yaml")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, output_of(proc)[-3000:]
    generate = [j for j in parse_jobs(output_of(proc))
                if j.rule == "generate" and j.wildcards["prompt_set"] == "own"]
    assert generate and all(str(mine / "own.jsonl") in j.inputs for j in generate)
    (mine / "own.jsonl").unlink()
    proc = subprocess.run([*entry, "--configfile", str(mine / "cfg.yaml")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "evaluation.prompt_sets.own.path: no file or folder 'own.jsonl'" in output_of(proc)
    assert not (work / "results").exists()
