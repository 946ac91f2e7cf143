"""Things that rot silently: dependency pins, shipped configs, schema vs. code, source hashes."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from sacpo_steps.core.provenance import PACKAGE_DIR, module_closure, source_hash
from sacpo_steps.core.schema import load_config_schema as load_schema
from sacpo_steps.plan import load_plan
from sacpo_steps.steps import module_of
from sacpo_steps.training.node import NodeSettings
from sacpo_steps.training.settings import TrainingConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def normalized(spec: str) -> tuple[str, frozenset[str], str | None]:
    req = Requirement(spec)
    name = req.name.lower().replace("_", "-").replace(".", "-")
    return name, frozenset(str(s) for s in req.specifier), str(req.marker) if req.marker else None


def pyproject_requirements() -> dict[str, tuple]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    reqs = [normalized(r) for r in data["project"]["dependencies"]]
    return {name: rest for name, *rest in reqs}


#: the user's environment (it installs the project too) and the rules' `conda:` one
CONDA_ENVS = ("environment.yml", "workflow/envs/sacpo.yaml")


def conda_pip_lines(name: str) -> list[str]:
    env = yaml.safe_load((ROOT / name).read_text(encoding="utf-8"))
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, f"{name} needs exactly one pip: section"
    return [line.strip() for line in pip_sections[0]]


def conda_pip_requirements(name: str = "environment.yml") -> dict[str, tuple]:
    reqs = [normalized(r) for r in conda_pip_lines(name) if not r.startswith("-e")]
    return {name: rest for name, *rest in reqs}


@pytest.mark.parametrize("name", CONDA_ENVS)
def test_environment_pins_equal_pyproject_dependencies(name):
    project = pyproject_requirements()
    conda = conda_pip_requirements(name)
    assert project, "pyproject.toml lists no dependencies"
    assert set(conda) == set(project), (
        f"only in {name}: {sorted(set(conda) - set(project))}; "
        f"only in pyproject.toml: {sorted(set(project) - set(conda))}")
    differing = {n: (conda[n], project[n]) for n in project if conda[n] != project[n]}
    assert not differing, f"pins differ ({name}, pyproject.toml): {differing}"


def test_the_conda_environment_installs_the_project_and_the_rules_one_does_not():
    """`conda env create -f environment.yml` runs pip in the file's folder: `-e .` is
    the clone. Snakemake builds a rule's environment from a copy of its file under
    .snakemake/conda/, where `.` names no project: the rules' file lists the
    dependencies only (their jobs import the Snakemake process's package)."""
    assert [line for line in conda_pip_lines("environment.yml") if line.startswith("-")] \
        == ["-e ."]
    assert not [line for line in conda_pip_lines("workflow/envs/sacpo.yaml")
                if line.startswith("-") or "/" in line or line.startswith(".")]
    import re

    directives = [env for smk in (ROOT / "workflow" / "rules").glob("*.smk")
                  for env in re.findall(r"conda:\s*\n\s*(\S+)", smk.read_text(encoding="utf-8"))]
    assert directives and set(directives) == {'"../envs/sacpo.yaml"'}


SHIPPED_CONFIGS = sorted([*(ROOT / "config").glob("*.yaml"),
                          *(ROOT / "tests" / "configs").glob("*.yaml")])


def test_there_are_shipped_configs():
    names = {p.relative_to(ROOT).as_posix() for p in SHIPPED_CONFIGS}
    assert {"config/config.yaml", "tests/configs/reduced_demo.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shipped_config_is_valid(path):
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    plan = load_plan(cfg, source=str(path))
    assert plan.nodes, f"{path} has no aligned model"
    for node in plan.nodes.values():
        # the align step rebuilds every node's settings from its spec, through the same
        # constructor, and gets the plan's
        spec = plan.align_spec(node.name, 0)
        assert NodeSettings.from_dict(spec) == node.settings


def test_schema_training_keys_equal_training_config_fields():
    schema_keys = set(load_schema()["$defs"]["training"]["properties"])
    code_fields = {f.name for f in dataclasses.fields(TrainingConfig)}
    assert schema_keys == code_fields, (
        f"only in the schema: {sorted(schema_keys - code_fields)}; "
        f"only in TrainingConfig: {sorted(code_fields - schema_keys)}")


def test_training_defaults_live_only_in_the_schema():
    """The dataclass has no second copy of the defaults: an empty section gets the
    schema's, and a changed schema default reaches the align step."""
    props = load_schema()["$defs"]["training"]["properties"]
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(TrainingConfig))
    empty = TrainingConfig.from_dict({})
    for f in dataclasses.fields(TrainingConfig):
        assert getattr(empty, f.name) == props[f.name]["default"], f.name


#: the resource keys a job kind of the config sets (`$defs/resources`)
RESOURCE_KEYS = ("gpu", "gpu_model", "cpus_per_gpu", "mem_mb", "runtime")


def test_resource_defaults_live_only_in_the_schema():
    """The rules pass no resource default of their own: every gpu, cpus_per_gpu, mem_mb
    and runtime of a rule is `resource(kind, key, per=...)` or `ref_resource(key)`
    (common.smk), with no number, and each key read has its default in the schema's
    `resources.<kind>`; no shipped config restates one of those defaults."""
    import re

    kinds = load_schema()["properties"]["resources"]["properties"]
    defaults = {kind: {key: sub["default"] for key, sub in spec["properties"].items()}
                for kind, spec in kinds.items()}
    helper = re.compile(r"(?<![\w.])(ref_)?resource\(([^()]*)\)")
    read: set[tuple[str, str]] = set()
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        text = smk.read_text(encoding="utf-8")
        for match in helper.finditer(text):
            args = [a.strip() for a in match.group(2).split(",")]
            where = f"{smk.name}: {match.group(0)}"
            assert not any(re.fullmatch(r"-?[\d_.]+", a.split("=")[-1]) for a in args), (
                f"{where} passes a numeric default (defaults live in the config schema)")
            if match.group(2).startswith(("kind", "key")):
                continue  # the helpers' definitions
            kind, key = ("align", args[0]) if match.group(1) else (args[0], args[1])
            read.add((kind.strip("\"'"), key.strip("\"'")))
        for key, value in re.findall(
                rf"^\s+({'|'.join(RESOURCE_KEYS)})\s*=\s*(.+?),?\s*$", text, re.M):
            assert re.match(r"(ref_)?resource\(", value), (
                f"{smk.name}: {key}={value} (a rule's resources come from the plan: "
                f"resource(kind, key) or ref_resource(key), defaults in the config schema)")
    assert {kind for kind, _ in read} == set(defaults), read
    missing = sorted(f"{kind}.{key}" for kind, key in read if key not in defaults[kind])
    assert not missing, f"rules read resources with no schema default: {missing}"
    for path in SHIPPED_CONFIGS:
        given = yaml.safe_load(path.read_text(encoding="utf-8")).get("resources") or {}
        restated = sorted(f"{kind}.{key}" for kind, keys in given.items()
                          for key, value in keys.items() if defaults[kind].get(key) == value)
        assert not restated, f"{path.name} restates the schema's defaults of {restated}"


def closure_names(module: str) -> set[str]:
    return {p.relative_to(PACKAGE_DIR).as_posix() for p in module_closure(module)}


def test_align_closure_follows_package_imports_only():
    files = closure_names("sacpo_steps.training.align")
    assert {"training/align.py", "core/fileio.py", "core/errors.py",
            "models/folders.py"} <= files
    assert "evaluation/generate.py" not in files
    assert "data/demo_world.py" not in files
    assert not any(name.startswith("plan/") for name in files)


def test_judge_closure_includes_the_backend_and_the_demo_spec():
    files = closure_names("sacpo_steps.evaluation.judge")
    # rule.py is imported inside a function of judges/__init__.py
    assert {"evaluation/judge.py", "evaluation/judges/__init__.py",
            "evaluation/judges/base.py", "evaluation/judges/rule.py", "data/demo_spec.py",
            "core/errors.py", "core/fileio.py"} <= files
    assert "training/align.py" not in files


def test_generate_closure_sees_function_level_imports():
    files = closure_names("sacpo_steps.evaluation.generate")
    assert {"evaluation/generate.py", "models/folders.py"} <= files
    assert "evaluation/winrate.py" not in files


def test_source_hashes_differ_between_steps_and_are_stable():
    steps = ["demo_world", "preference_data", "sft_checkpoint", "align", "generate", "judge",
             "winrate"]
    hashes = {step: source_hash(module_of(step)) for step in steps}
    assert len(set(hashes.values())) == len(steps)
    assert all(len(h) == 16 for h in hashes.values())
    assert source_hash("sacpo_steps.training.align") == hashes["align"]


def test_source_hash_follows_edits_of_the_closure(tmp_path):
    """Edit a copy of the package: only the steps whose closure holds the file change hash."""
    import json
    import shutil
    import subprocess

    shutil.copytree(PACKAGE_DIR, tmp_path / "sacpo_steps",
                    ignore=shutil.ignore_patterns("__pycache__"))
    script = ("import json; from sacpo_steps.core.provenance import source_hash as h; "
              "from sacpo_steps.steps import module_of; "
              "print(json.dumps({m: h(module_of(m)) for m in "
              "('align', 'judge', 'generate', 'winrate')}))")

    def hashes() -> dict[str, str]:
        out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True,
                             capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path)})
        return json.loads(out.stdout)

    before = hashes()
    with open(tmp_path / "sacpo_steps" / "data" / "demo_spec.py", "a", encoding="utf-8") as f:
        f.write("\n# edited\n")
    after_spec = hashes()
    assert after_spec["judge"] != before["judge"]
    assert {k: after_spec[k] for k in ("align", "generate", "winrate")} == {
        k: before[k] for k in ("align", "generate", "winrate")}

    with open(tmp_path / "sacpo_steps" / "models" / "folders.py", "a", encoding="utf-8") as f:
        f.write("\n# edited\n")
    after_modelio = hashes()
    assert after_modelio["align"] != after_spec["align"]
    assert after_modelio["generate"] != after_spec["generate"]
    assert after_modelio["winrate"] == after_spec["winrate"]


# ---- one name per rule, step and module ---------------------------------------------

#: rules that do not share their step's name, and why (docs/pipeline.md says so too)
RULE_EXCEPTIONS = {"merge_<a>__<b>": "merge",  # one rule per parent pair, all step merge
                   "figures_across_seeds": "figures",  # the figures step on across-seed tables
                   "matched_search": "target_search"}  # the target search at a model's bound


def readme_rule_table() -> dict[str, str]:
    """{rule: step} from the rule table of docs/pipeline.md ("| `rule` | `step` ... |")."""
    import re

    text = (ROOT / "docs" / "pipeline.md").read_text(encoding="utf-8")
    start = text.index("| rule | step")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("| `"):
            break
        rules, module = line.split(" | ")[:2]
        for rule in re.findall(r"`([^`]+)`", rules):
            rows[rule] = re.findall(r"`([^`]+)`", module)[0]
    return rows


def workflow_rules() -> dict[str, str | None]:
    """{rule: the step its shell command runs} of every rule in workflow/rules/*.smk."""
    import re

    rules: dict[str, str | None] = {}
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        text = smk.read_text(encoding="utf-8")
        blocks = re.split(r"\n(?=\s*(?:rule \w+:|rule:|use rule ))", text)
        for block in blocks:
            named = re.match(r"\s*rule (\w+):", block)
            used = re.match(r"\s*use rule (\w+) as (\w+)", block)
            if re.match(r"\s*rule:", block):  # the merge rules, named per pair
                rules["merge_<a>__<b>"] = re.search(r"sacpo_steps (\w+)", block).group(1)
            elif named:
                # `{params.launcher}` is `python -m sacpo_steps` or `accelerate launch ... -m
                # sacpo_steps` (Plan.launcher)
                step = re.search(r"(?:sacpo_steps|\{params\.launcher\}) (\w+)", block)
                rules[named.group(1)] = step.group(1) if step else None
            elif used:
                rules[used.group(2)] = rules.get(used.group(1))
    return rules


def test_every_rule_runs_the_step_of_its_own_name_and_module():
    from sacpo_steps.steps import STEPS

    rules = workflow_rules()
    assert {"align", "judge", "download_model", "merge_<a>__<b>"} <= set(rules)
    for rule, step in rules.items():
        assert step == RULE_EXCEPTIONS.get(rule, rule), f"rule {rule} runs step {step}"
        assert step in STEPS, step
        module = STEPS[step].removeprefix("sacpo_steps.").replace(".", "/")
        assert (PACKAGE_DIR / f"{module}.py").is_file(), step
    # and every step is run by some rule (no orphan steps)
    assert set(STEPS) == set(rules.values())


def test_the_readme_lists_every_rule_with_its_module():
    table = readme_rule_table()
    rules = workflow_rules()
    assert set(table) == set(rules) - {"all"}, (set(table) ^ set(rules))
    for rule, module in table.items():
        assert module == rules[rule], (f"docs/pipeline.md: {rule} -> {module}, "
                                       f"workflow: {rules[rule]}")


@pytest.mark.slow
def test_a_wheel_carries_what_the_steps_read_at_run_time(tmp_path):
    """Installed as a wheel (not editable), outside a clone: the schema, the accelerate
    configs and the judge templates are found through the package."""
    import shutil
    import zipfile

    # built from a copy: setuptools' build/ folder in the clone could carry stale files
    source = tmp_path / "source"
    shutil.copytree(ROOT / "sacpo_steps", source / "sacpo_steps",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                            str(wheels), str(source)], capture_output=True, text=True,
                           timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(wheels.glob("sacpo_steps-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"sacpo_steps/assets/config.schema.yaml", "sacpo_steps/assets/accelerate/fsdp.yaml",
            "sacpo_steps/evaluation/judges/prompts/helpfulness_scores.txt",
            "sacpo_steps/training/trl_fields.json"} <= names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = ("import sacpo_steps, sacpo_steps.core.schema as c, sacpo_steps.plan as p;"
             "print(sacpo_steps.__file__);"
             "print(c.default_of('evaluation.winrate.bootstrap_rounds'));"
             "print(all((c.ACCELERATE_CONFIGS / f'{n}.yaml').is_file()"
             " for n in ('fsdp', 'ddp', 'deepspeed_zero3')))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=outside, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    where, rounds, configs = proc.stdout.split()
    assert where.startswith(str(site)) and int(rounds) > 0 and configs == "True"
    step = subprocess.run([sys.executable, "-m", "sacpo_steps", "winrate", "--help"],
                          cwd=outside, env=env, capture_output=True, text=True, timeout=120)
    assert step.returncode == 0, step.stderr[-2000:]
