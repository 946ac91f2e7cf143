# Config validation, the plan, and the helpers that turn it into paths and params.
# Rules in the other .smk files call only these helpers.
import hashlib
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir)))

from sacpo_steps.errors import InputError  # noqa: E402
from sacpo_steps.layout import SEED as SEED_WILDCARD, Layout  # noqa: E402
from sacpo_steps.plan import (  # noqa: E402
    PlanError,
    judge_for,
    judgment_report,
    load_plan,
    to_json,
)
from sacpo_steps.provenance import source_hash  # noqa: E402

_config_source = ", ".join(map(str, workflow.overwrite_configfiles)) or "config/config.yaml"
try:
    # resolves `extends: <file>` (relative to the workflow) in place, then validates
    PLAN = load_plan(config, source=_config_source, base_dir=workflow.basedir)
except PlanError as exc:
    raise WorkflowError(str(exc)) from None

SFT = PLAN.sft
ALIGNED = list(PLAN.nodes)
BASELINES = config.get("baselines", {})
PROMPT_SETS = config["evaluation"]["prompt_sets"]
# every path of the experiment (results/<experiment>/seed-<s>/..., resources/, logs/)
LAYOUT = Layout.from_config(config)
SEEDS = PLAN.seeds
CONSTANTS = LAYOUT.constant_models()
HUB_MODELS = LAYOUT.hub_models()  # {folder key under resources/models: model name}
HUB_DATASETS = LAYOUT.hub_datasets()
URL_PROMPT_SETS = LAYOUT.url_prompt_sets()  # {set name: content key}


def _one_of(names):
    """A wildcard constraint matching exactly these names (or nothing)."""
    return "|".join(map(re.escape, names)) or "$^"


wildcard_constraints:
    seed=_one_of(map(str, SEEDS)),
    model=_one_of(PLAN.models),
    aligned=_one_of(ALIGNED),
    constant=_one_of(CONSTANTS),
    hub_model=_one_of(HUB_MODELS),
    hub_dataset=_one_of(HUB_DATASETS),
    prompt_set=_one_of(PROMPT_SETS),
    opponent=_one_of(PLAN.models),
    url_prompt_set=_one_of(URL_PROMPT_SETS),
    prompt_key=_one_of(set(URL_PROMPT_SETS.values())),
    source=_one_of(config["preference_sources"]),


def code(module):
    """Hash of a step's source (and the package modules it imports): edits rerun its jobs."""
    return source_hash(f"sacpo_steps.{module}")


# Jobs run `python -m sacpo_steps ...` with the Python that runs Snakemake, even
# when its environment is not activated; with --use-conda, the rule's environment.
if not workflow.deployment_settings.deployment_method:
    shell.prefix(f'set -euo pipefail; export PATH="{Path(sys.executable).parent}:$PATH"; ')


# ---- models -------------------------------------------------------------------


def model_dir(name, seed=SEED_WILDCARD):
    """Folder of a model (see sacpo_steps.layout): a pattern with {seed} unless given."""
    return LAYOUT.model_dir(name, seed)


def download_spec(wildcards):
    """What a hub download fetches: content only (repo, revision), never the name a
    config gives the model, so experiments sharing the snapshot agree on its params."""
    hub = LAYOUT.hub_spec(HUB_MODELS[wildcards.hub_model])
    keys = {"repo_id": hub["repo_id"], "revision": hub.get("revision", "main"),
            "convert_bin": hub.get("convert_bin", False)}
    return to_json({"source": "hub", "name": wildcards.hub_model, "hub": keys})


def node_resources(kind, name=None):
    """Resources of one job: the kind's defaults, overridden by the node's own."""
    merged = dict(config.get("resources", {}).get(kind, {}))
    node = None
    if name is not None:
        node = PLAN.nodes.get(name) or PLAN.merges.get(name)
    if node is not None:
        merged.update(node.resources)
    elif name in BASELINES:
        merged.update(BASELINES[name].get("resources", {}))
    return merged


def resource(kind, key, default, per="name"):
    """A resource callable for a rule (reads the node's config at job time)."""

    def get(wildcards):
        name = getattr(wildcards, per, None) if per else None
        return node_resources(kind, name).get(key, default)

    return get


def sft_spec(wildcards):
    """A built SFT depends on its seed; a linked local folder does not."""
    seed = {"seed": int(wildcards.seed)} if "seed" in wildcards.keys() else {}
    return to_json({**config["sft"], "prompt_template": config["prompt_template"], **seed})


def align_spec(wildcards):
    node = PLAN.nodes[wildcards.aligned]
    return to_json(
        {
            "name": node.name,
            "parent": node.parent,
            "data": node.data,
            "loss": node.loss,
            "beta": node.beta,
            "training": node.training,
            "prompt_template": config["prompt_template"],
            "seed": int(wildcards.seed),
        }
    )


def align_checkpoint_dir(wildcards):
    """Scratch for trainer checkpoints, keyed by the node's parameters: a changed beta
    never resumes a stale run."""
    digest = hashlib.sha256(align_spec(wildcards).encode()).hexdigest()[:12]
    return f"{LAYOUT.scratch(wildcards.seed)}/align/{wildcards.aligned}-{digest}"


def launcher(wildcards, resources):
    """One process, or `accelerate launch` with one process per GPU of the job."""
    gpus = int(getattr(resources, "gpu", 0) or 0)
    if gpus <= 1:
        return "python -m sacpo_steps"
    dist = PLAN.nodes[wildcards.aligned].training["distributed"]
    return (
        f"accelerate launch --num_processes {gpus} "
        f"--config_file config/accelerate/{dist}.yaml -m sacpo_steps"
    )


def align_parent(wildcards):
    return model_dir(PLAN.nodes[wildcards.aligned].parent, wildcards.seed)


def align_data_dir(wildcards):
    node = PLAN.nodes[wildcards.aligned]
    return LAYOUT.data_dir(PLAN.datasets[node.data]["source"], wildcards.seed)


def align_data_file(wildcards):
    node = PLAN.nodes[wildcards.aligned]
    criterion = PLAN.datasets[node.data]["criterion"]
    return f"{align_data_dir(wildcards)}/{criterion}_{node.data_file}.jsonl"


# ---- data ---------------------------------------------------------------------


def preference_table(wildcards):
    return LAYOUT.preference_table(wildcards.source, wildcards.seed)


def prompt_set_file(name, seed=SEED_WILDCARD):
    return LAYOUT.prompt_set_file(name, seed)


def world_seed(wildcards):
    """The demo world's seed: the run's seed, unless demo_world.seed pins one world."""
    return LAYOUT.world_seed_for(getattr(wildcards, "seed", 0))


# ---- evaluation ---------------------------------------------------------------


def generation_spec(wildcards):
    return generation_spec_for(wildcards.model, wildcards.seed)


def generation_spec_for(model, seed):
    gen = config["evaluation"]["generation"]
    own = BASELINES.get(model, {})
    return to_json(
        {
            "prompt_template": own.get("prompt_template", config["prompt_template"]),
            "stop_markers": own.get("stop_markers", config["stop_markers"]),
            "max_new_tokens": gen["max_new_tokens"],
            "batch_size": gen["batch_size"],
            "seed": int(seed),
            # the cap the models were trained under (tokens.PromptCap)
            "max_prompt_length": config.get("training", {}).get("max_prompt_length"),
        }
    )


def merge_spec(nodes):
    return to_json([{"name": n.name, "q": n.q} for n in nodes])


JUDGES = {name: judge_for(config["evaluation"], name) for name in PROMPT_SETS}


def judge_template(prompt_set):
    """The user's own judge template (`judge.templates.<criterion>`) for this prompt set's
    criterion, or None (the packaged one, which counts as the judge's code)."""
    templates = JUDGES[prompt_set].get("templates") or {}
    return templates.get(PROMPT_SETS[prompt_set]["criterion"])


def judge_for_job(prompt_set):
    """The set's judge section with only its own criterion's template: changing the
    other criterion's template must not rerun this set's judge jobs (params trigger)."""
    judge = dict(JUDGES[prompt_set])
    judge.pop("templates", None)
    if judge_template(prompt_set):
        judge["templates"] = {PROMPT_SETS[prompt_set]["criterion"]: judge_template(prompt_set)}
    return judge


def judge_template_inputs(prompt_sets):
    """The sets' own template files, as inputs: an edited template reruns its jobs."""
    return {
        f"template_{PROMPT_SETS[s]['criterion']}": judge_template(s)
        for s in prompt_sets
        if judge_template(s)
    }


def judge_config(wildcards):
    return to_json(judge_for_job(wildcards.prompt_set))


def judge_cache_path(judge):
    """API judges share one append-only cache per judge model, outside results/: these
    replies are paid for, and must survive a cleaned results/ folder."""
    if judge["backend"] == "rule":
        return None
    name = re.sub(r"[^A-Za-z0-9._-]", "_", judge.get("model", judge["backend"]))
    return f"resources/judge_cache/{name}.jsonl"


def judge_cache(wildcards):
    path = judge_cache_path(JUDGES[wildcards.prompt_set])
    return f"--judge-cache {path}" if path else ""


# API keys come from the environment only: refuse before any job if one is missing.
_KEY_ENVS = sorted({j.get("api_key_env", "OPENAI_API_KEY") for j in JUDGES.values()
                    if j["backend"] == "openai"})
for _key_env in _KEY_ENVS:
    if not os.environ.get(_key_env):
        raise WorkflowError(
            f"evaluation.judge.api_key_env: the environment variable "
            f"{_key_env} is not set (the openai judge needs an API key; "
            f"for a local server any non-empty value works)"
        )

if _KEY_ENVS:

    envvars:
        *_KEY_ENVS,

    # Each judge job keeps `concurrency` requests in flight: cap the jobs at once.
    workflow.global_resources.setdefault(
        "judge_api",
        min(j.get("parallel_jobs", 4) for j in JUDGES.values() if j["backend"] == "openai"),
    )


def judge_model_inputs(judges, seed):
    """What the given judges read: the demo spec (rule), score models (score_model)."""
    inputs = {}
    for judge in judges:
        if judge["backend"] == "rule":
            inputs["spec"] = f"{LAYOUT.world_dir(seed)}/spec.json"
        if judge["backend"] == "score_model":
            for key in ("reward_model", "cost_model"):
                if judge.get(key):
                    inputs[f"{key}_{len(inputs)}"] = judge[key]
    return inputs


def judge_inputs(wildcards):
    seed = wildcards.seed
    return {
        "candidate": LAYOUT.generation(wildcards.model, wildcards.prompt_set, seed),
        "baseline": LAYOUT.generation(wildcards.opponent, wildcards.prompt_set, seed),
        "prompts": prompt_set_file(wildcards.prompt_set, seed),
        **judge_model_inputs([JUDGES[wildcards.prompt_set]], seed),
        **judge_template_inputs([wildcards.prompt_set]),
    }


def battle_files(wildcards):
    """Every battle file of one seed; the baseline is always the opponent side."""
    return LAYOUT.battle_files(PLAN.judged_pairs(), wildcards.seed)


def report_request_count():
    """Before any judge request: how many judgments the run makes, and an upper-bound cost."""
    prompts = {}
    for name, ps in PROMPT_SETS.items():
        path = Path(prompt_set_file(name, SEEDS[0]))
        if path.is_file():
            lengths = [len(line) for line in path.open(encoding="utf-8") if line.strip()]
            expected = ps.get("expected_prompts")
            note = "" if expected in (None, len(lengths)) else f"; the config expects {expected}"
            prompts[name] = (len(lengths), f"counted in {path}{note}", max(lengths, default=0))
        elif "expected_prompts" in ps:
            prompts[name] = (ps["expected_prompts"], "expected_prompts in the config, "
                             "not fetched yet", 0)
        else:
            prompts[name] = (None, "unknown until the set is fetched or built", 0)
    try:
        lines = judgment_report(PLAN, config["evaluation"], prompts)
    except InputError as exc:
        raise WorkflowError(str(exc)) from None
    print("\n".join(lines), file=sys.stderr)

report_request_count()


FIGURE_NAMES = [f"{name}.{ext}" for name in ("figure2", "figure3", "elo_chart")
                for ext in ("png", "svg")]
TABLES = ["winrate.csv", "winrate.md", "elo.csv", "elo.md"]
TARGET = config.get("target")


def target_sets():
    """The search's helpfulness and red-team prompt sets (the first of each criterion)."""
    by_criterion = {ps["criterion"]: name for name, ps in reversed(PROMPT_SETS.items())}
    return by_criterion["helpfulness"], by_criterion["harmlessness"]


def target_inputs(wildcards):
    node = PLAN.nodes[TARGET["over_safe"]]
    sets = target_sets()
    seed = wildcards.seed
    return {
        "a": model_dir(node.parent, seed),
        "b": model_dir(node.name, seed),
        "prompts": [prompt_set_file(s, seed) for s in sets],
        "baseline": [LAYOUT.generation(PLAN.baseline, s, seed) for s in sets],
        **judge_model_inputs([JUDGES[s] for s in sets], seed),
        **judge_template_inputs(sets),
    }


def target_judges(wildcards):
    """Each searched prompt set's judge settings, with its cache, as the judge step's."""
    judges = {}
    for role, prompt_set in zip(("helpfulness", "red_team"), target_sets()):
        judge = judge_for_job(prompt_set)
        if judge_cache_path(judge):
            judge["cache"] = judge_cache_path(judge)
        judges[role] = judge
    return to_json(judges)


def all_targets():
    """The across-seed tables and figures, and every seed's own tables, figures and
    target search."""
    per_seed = [LAYOUT.seed_table(t, s) for s in SEEDS for t in TABLES]
    per_seed += [LAYOUT.seed_figure(f, s) for s in SEEDS for f in FIGURE_NAMES]
    if TARGET:
        per_seed += [LAYOUT.target(f, s) for s in SEEDS for f in ("search.json", "search.md")]
    return [*(LAYOUT.table(t) for t in TABLES), *(LAYOUT.figure(f) for f in FIGURE_NAMES),
            *per_seed]


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
