# The plan (config validation and every path, param and input a rule needs) and thin
# wrappers that turn Snakemake wildcards into calls of its tested methods
# (sacpo_steps.plan.Plan); the rules in the other .smk files call only these.
import os
import re
import shlex
import sys
from pathlib import Path

# the clone's root (workflow/rules/ is two levels down), whichever Snakefile was run
REPO_ROOT = Path(workflow.current_basedir).parents[1]
# The package the rules plan with (and whose source hashes they take) is the one beside
# this Snakefile when there is one (a clone, or a test's copy of it): rules and steps of
# one tree, never a clone's rules with another version's steps. A workflow folder
# deployed alone runs the installed package.
if (REPO_ROOT / "sacpo_steps" / "__init__.py").is_file():
    sys.path.insert(0, str(REPO_ROOT))

import sacpo_steps  # noqa: E402
from sacpo_steps.core.errors import InputError  # noqa: E402
from sacpo_steps.core.layout import COMPARISON_FILES  # noqa: E402
from sacpo_steps.core.layout import SEED as SEED_WILDCARD  # noqa: E402
from sacpo_steps.plan.judgment_report import judgment_report  # noqa: E402
from sacpo_steps.core import validation_cache  # noqa: E402
from sacpo_steps.plan import PlanError, load_plan, to_json  # noqa: E402
from sacpo_steps.core.provenance import source_hash, use_import_cache  # noqa: E402
from sacpo_steps.steps import module_of  # noqa: E402

_config_source = ", ".join(map(str, workflow.overwrite_configfiles)) or "config/config.yaml"
# a config (and node settings) that passed validation is not checked again, by content
validation_cache.use(Path(".snakemake", "sacpo_steps", "validated.json"))
try:
    # resolves `extends: <file>` (relative to the workflow) in place, then validates
    PLAN = load_plan(
        config,
        source=_config_source,
        base_dir=REPO_ROOT,
        # `extends:` is relative to the (last) config file's own folder first
        config_dir=(
            Path(workflow.overwrite_configfiles[-1]).parent
            if workflow.overwrite_configfiles
            else None
        ),
    )
except PlanError as exc:
    raise WorkflowError(str(exc)) from None

LAYOUT = PLAN.paths  # every path of the experiment (sacpo_steps.core.layout)
SFT = PLAN.sft
SEEDS = PLAN.seeds
PROMPT_SETS = PLAN.prompt_sets
CONSTANTS = LAYOUT.constant_models()
HUB_MODELS = LAYOUT.hub_models()  # {folder key under resources/models: model name}
HUB_DATASETS = LAYOUT.hub_datasets()
URL_PROMPT_SETS = LAYOUT.url_prompt_sets()  # {set name: content key}
TARGET = PLAN.target
FIGURE_NAMES = [f"{name}.{ext}" for name in ("figure2", "figure3", "elo_chart")
                for ext in ("png", "svg")]
TABLES = ["winrate.csv", "winrate.md", "elo.csv", "elo.md"]
# Elo fitted per family beside the pooled fit (only with evaluation.families)
if PLAN.families:
    TABLES += ["elo_families.csv", "elo_families.md"]


def _family_tables(path, caption, subcategory, seed):
    """The elo and across_seeds rules' extra outputs with `evaluation.families`: each
    family fitted from its own battles, in elo_families.{csv,md} (pooled and per-family
    rows, column `fit`); none without families (elo.{csv,md} alone, as before)."""
    if not PLAN.families:
        return {}
    return {
        "families_csv": report(
            path("elo_families.csv"),
            caption=caption,
            category="Tables",
            subcategory=subcategory,
            labels={"table": "Elo per family", "seed": seed},
        ),
        "families_md": path("elo_families.md"),
    }


def _one_of(names):
    """A wildcard constraint matching exactly these names (or nothing)."""
    return "|".join(map(re.escape, names)) or "$^"


wildcard_constraints:
    seed=_one_of(map(str, SEEDS)),
    model=_one_of(PLAN.models),
    aligned=_one_of(PLAN.nodes),
    constant=_one_of(CONSTANTS),
    hub_model=_one_of(HUB_MODELS),
    hub_dataset=_one_of(HUB_DATASETS),
    prompt_set=_one_of(PROMPT_SETS),
    opponent=_one_of(PLAN.models),
    url_prompt_set=_one_of(URL_PROMPT_SETS),
    prompt_key=_one_of(set(URL_PROMPT_SETS.values())),
    source=_one_of(config["preference_sources"]),
    reference=_one_of({reference for reference, _ in PLAN.ref_logps_jobs}),
    ref_key=_one_of({key for _, key in PLAN.ref_logps_jobs}),


# Every call hashes every step (code() below): what each package file imports is kept
# here between calls, keyed by the file's content, so only edited files are parsed again.
use_import_cache(Path(".snakemake", "sacpo_steps", "imports.json"))


def code(step):
    """Hash of a step's source (and the package modules it imports): edits rerun its jobs."""
    return source_hash(module_of(step))


# Jobs run `python -m sacpo_steps ...` with the Python that runs Snakemake, even
# when its environment is not activated; with --use-conda, the rule's environment
# (workflow/envs/sacpo.yaml: the dependencies only). Either way the package is the one
# this process imported (PYTHONPATH below).
# Every job exports the reproducibility settings (pinned kernels, GPU determinism);
# `python -m sacpo_steps` applies them before torch loads.
_JOB_ENV = " ".join(f"{key}={value}" for key, value in PLAN.job_env().items())
_PATH = (
    ""
    if workflow.deployment_settings.deployment_method
    else f'export PATH="{Path(sys.executable).parent}:$PATH"; '
)


def _code_path():
    """The folder whose `sacpo_steps` every job imports: the very package this process
    imported (and hashed). A clone's root as it is; an installed package's site folder
    holds every other distribution too (wrong under --use-conda), so a folder under
    .snakemake/ with a link to the package alone."""
    package = Path(sacpo_steps.__file__).resolve().parent
    if package.parent == REPO_ROOT.resolve():
        return package.parent
    folder = Path(".snakemake", "sacpo_steps_code").absolute()
    link = folder / "sacpo_steps"
    if not (link.is_dir() and link.resolve() == package):
        folder.mkdir(parents=True, exist_ok=True)
        new = folder / f".sacpo_steps.{os.getpid()}"  # replaced at once: jobs may read it
        new.unlink(missing_ok=True)
        new.symlink_to(package, target_is_directory=True)
        os.replace(new, link)
    return folder


# PYTHONSAFEPATH: the job's working directory does not come first (Python >= 3.11), so a
# `sacpo_steps/` folder there cannot shadow the package named here. (Snakemake formats
# the prefix: {{ }} is a brace.)
_KEEP = '"${{PYTHONPATH:+:$PYTHONPATH}}"'  # a PYTHONPATH of the caller's comes after
_CODE = f"export PYTHONPATH={shlex.quote(str(_code_path()))}{_KEEP} PYTHONSAFEPATH=1; "
shell.prefix(f"set -euo pipefail; {_PATH}{_CODE}export {_JOB_ENV}; ")
REPRODUCIBILITY = PLAN.reproducibility  # in every torch job's params


def torch_threads(kind):
    """The `--threads` of a torch job (Plan.torch_threads): fixed when kernels are pinned."""
    return lambda wildcards, threads: PLAN.torch_threads(kind, threads)


def model_dir(name, seed=SEED_WILDCARD):
    """Folder of a model: a pattern with {seed} unless a seed is given."""
    return PLAN.model_dir(name, seed)


def _ref_reader(wildcards):
    """The node whose data, launcher and resources a ref_logps job takes."""
    return PLAN.ref_logps_consumer(wildcards.reference, wildcards.ref_key)


def resource(kind, key, per="name"):
    """A resource callable for a rule: the job's `key` from the plan (Plan.resources:
    `resources.<kind>`, whose defaults live in the config schema, then the node's own)."""

    def get(wildcards):
        name = getattr(wildcards, per, None) if per else None
        return PLAN.resources(kind, name)[key]

    return get


def ref_resource(key):
    """A ref_logps job's `key`: the align resources of the node it is run for."""
    return lambda wildcards: PLAN.resources("align", _ref_reader(wildcards))[key]


def search_params(over_safe=None):
    """The params the safety target search and the matched search share, defined once,
    with the values both had before, so no job reruns for it. The judges and their
    templates are looked up per job, so parsing the workflow reads no template."""
    return dict(
        baseline_name=PLAN.baseline,
        judges=lambda wildcards: to_json(PLAN.target_judges()),
        spec=lambda wildcards, input: f"--spec {input.spec}" if "spec" in input.keys() else "",
        generation=lambda wildcards: to_json(
            PLAN.target_generation_spec(wildcards.seed, over_safe)
        ),
        rounds=config["evaluation"]["winrate"]["bootstrap_rounds"],
        seed=lambda wildcards: int(wildcards.seed),
        templates=lambda wildcards: PLAN.judge_templates(list(PLAN.target_sets())),
        code=code("target_search"),
        reproducibility=REPRODUCIBILITY,
        threads=torch_threads("generate"),
    )


def search_args(target, measure):
    """The target_search step's arguments after `--name-b`, with `target` (the flags that
    set the target) and `measure` filled in; both rules' commands stay the text they were,
    which Snakemake compares to rerun a job whose command changed."""
    return (
        f"{target} --prompts {{input.prompts}} --baseline {{input.baseline}} --baseline-name"
        f" {{params.baseline_name}} --judges {{params.judges:q}} {{params.spec}}"
        f" --measure {measure}"
        " --generation {params.generation:q} --rounds {params.rounds} --seed {params.seed}"
        " --threads {params.threads} --out-json {output.json} --out-md {output.md} > {log} 2>&1"
    )


# API keys come from the environment only: refuse before any job if one is missing.
for _key_env in PLAN.required_env():
    if not os.environ.get(_key_env):
        raise WorkflowError(
            f"evaluation.judge.api_key_env: the environment variable {_key_env} is not set "
            f"(the judge needs an API key; for a local server any non-empty value works)"
        )

if PLAN.required_env():

    envvars:
        *PLAN.required_env(),


if PLAN.judge_api_slots():
    # Each judge job keeps `concurrency` requests in flight: cap the jobs at once.
    workflow.global_resources.setdefault("judge_api", PLAN.judge_api_slots())


# Before any judge request: how many judgments the run makes, and an upper-bound cost.
try:
    print("\n".join(judgment_report(PLAN, config["evaluation"], PLAN.prompt_counts())),
          file=sys.stderr)
except InputError as exc:
    raise WorkflowError(str(exc)) from None


# Downloads need the internet of the login node; tables and figures are seconds of CPU.
localrules:
    download_dataset,
    download_model,
    fetch_prompt_set,
    constant_answers,
    winrate,
    elo,
    across_seeds,
    figures,
    figures_across_seeds,
