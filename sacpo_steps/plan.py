"""The experiment plan: validate a config and expand it into model nodes.

The Snakefile imports this module (never the reverse), so the same checks run
in tests and before any job: schema errors, unknown parents or datasets and
cycles are reported with the config path of the offending field.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from sacpo_steps import data_formats, lineage, losses, ref_logps, reproducibility
from sacpo_steps.config_schema import ACCELERATE_CONFIGS
from sacpo_steps.config_schema import load_config_schema as load_schema
from sacpo_steps.errors import InputError
from sacpo_steps.judges import registry as judge_registry
from sacpo_steps.layout import SEED, Layout, SeedError, config_seeds
from sacpo_steps.training_config import migrate_training

WORKFLOW_ROOT = Path(__file__).resolve().parent.parent  # where `extends:` paths start


class PlanError(InputError):
    """The config cannot describe a runnable experiment."""

    @classmethod
    def at_field(cls, exc: InputError) -> PlanError:
        """A registry's InputError as a plan error that starts with the config path of its
        field (`preference_sources.x.format: ...`), as every plan error does."""
        if exc.field and exc.path is None and exc.row is None:
            return cls(f"{exc.field}: {exc.message}")
        return cls(str(exc))


def config_schema() -> dict[str, Any]:
    """The config schema with what the registries own filled in: the judge sections'
    keys come from the judge registry (each backend declares its settings once), the
    losses and data formats are named by their registries, so an entry registered at
    run time is known to the schema too."""
    schema = copy.deepcopy(load_schema())
    evaluation = schema["properties"]["evaluation"]["properties"]
    evaluation["judge"] = judge_registry.judge_schema()
    evaluation["prompt_sets"]["additionalProperties"]["properties"]["judge"] = \
        judge_registry.judge_schema(override=True)
    node = schema["properties"]["models"]["additionalProperties"]["properties"]
    node["loss"] = {**node["loss"], "enum": sorted(losses.LOSSES)}
    source = schema["properties"]["preference_sources"]["additionalProperties"]["properties"]
    source["format"] = {**source["format"], "enum": sorted(data_formats.FORMATS)}
    return schema


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_extends(config: dict[str, Any], base_dir: str | Path,
                    config_dir: str | Path | None = None) -> dict[str, Any]:
    """A config with `extends: <file>` is that file's config with its own keys on top
    (mappings merge key by key; lists and scalars replace). A variant of an experiment
    (other seeds, another beta) then states only what differs. A path is relative to
    the folder of the config that names it (`config_dir` for the first), or, where no
    such file is there, to `base_dir` (the clone's root: `extends: config/config.yaml`
    names the demo); chains are followed, cycles refused."""
    import yaml

    seen: list[str] = []
    here = Path(config_dir) if config_dir is not None else None
    while "extends" in config:
        name = config["extends"]
        if not isinstance(name, str):
            raise PlanError(f"extends: expected a config file path, got {name!r}")
        path = Path(base_dir) / name
        if here is not None and (here / name).is_file():
            path = here / name
        here = path.parent
        if str(path) in seen:
            raise PlanError(f"extends: {name} extends itself (chain: {' -> '.join(seen)})")
        seen.append(str(path))
        try:
            base = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise PlanError(f"extends: cannot read {name}: {exc.strerror}") from None
        if not isinstance(base, dict):
            raise PlanError(f"extends: {name} is not a config (a mapping)")
        override = {k: v for k, v in config.items() if k != "extends"}
        config = _deep_merge(base, override)
    return config


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target[part]
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return _resolve(merged, root)
    return schema


def _apply_defaults(instance: Any, schema: dict[str, Any], root: dict[str, Any]) -> None:
    """Fill `default:` values of the schema into the instance, recursively."""
    schema = _resolve(schema, root)
    if not isinstance(instance, dict) or schema.get("type") not in (None, "object"):
        return
    props = schema.get("properties", {})
    for key, sub in props.items():
        sub_r = _resolve(sub, root)
        if key not in instance and "default" in sub_r:
            instance[key] = copy.deepcopy(sub_r["default"])
        if key in instance:
            _apply_defaults(instance[key], sub_r, root)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key, value in instance.items():
            if key not in props:
                _apply_defaults(value, extra, root)


def _path(error) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def validate_config(config: dict[str, Any], *, source: str = "config",
                    schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check the config against the JSON schema and fill its defaults (in place)."""
    import jsonschema

    schema = schema or config_schema()
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for err in errors[:10]:
            if err.validator == "additionalProperties":
                extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
                msg = f"unknown key(s) {extra}"
            else:
                msg = err.message
            lines.append(f"  {_path(err)}: {msg}")
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise PlanError(f"invalid configuration ({source}):\n" + "\n".join(lines) + more)
    _apply_defaults(config, schema, schema)
    return config


@dataclass(frozen=True)
class Node:
    """One aligned model of the plan: `parent` is its initial policy and its reference."""

    name: str
    parent: str
    data: str
    loss: str
    beta: float
    training: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)

    @property
    def data_file(self) -> str:
        """Which file of the preference data folder this node's loss reads (registry)."""
        return losses.get_loss(self.loss).data

    @property
    def parents(self) -> tuple[str, ...]:
        return (self.parent,)


@dataclass(frozen=True)
class MergeNode:
    """A weight-space merge (1 - q) * a + q * b (P-SACPO, or the naive merge baseline)."""

    name: str
    parent_a: str
    parent_b: str
    q: float
    resources: dict[str, Any] = field(default_factory=dict)

    @property
    def parents(self) -> tuple[str, ...]:
        return (self.parent_a, self.parent_b)

    @property
    def group(self) -> str:
        """Merges of one pair share a job: one pass over the parents for every q."""
        return f"{self.parent_a}+{self.parent_b}"


@dataclass
class Plan:
    sft: str
    nodes: dict[str, Node]  # alignment nodes, parents before children
    datasets: dict[str, dict[str, Any]]
    baseline: str
    merges: dict[str, MergeNode] = field(default_factory=dict)
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)  # external models
    order: list[str] = field(default_factory=list)  # align and merge nodes, parents first
    pairs: str = "vs_baseline"  # evaluation.pairs
    # evaluation.families: Elo fits per family (any pairs mode); judged pairs (families)
    families: dict[str, list[str]] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)  # `seeds`, or a scalar `seed` as one element
    config: dict[str, Any] = field(default_factory=dict, repr=False)  # validated, resolved
    layout: Layout | None = field(default=None, repr=False)  # every path of the experiment
    formats: dict[str, Any] = field(default_factory=dict)  # source -> checked data format

    @property
    def models(self) -> list[str]:
        """Every model of the plan, the SFT first (those in no judged pair are not generated)."""
        return [self.sft, *self.order, *self.baselines]

    def judged_pairs(self) -> list[tuple[str, str]]:
        """The distinct unordered pairs to judge, as (model, opponent) in plan order.

        vs_baseline: each model against the baseline; all_pairs: every pair of models;
        families: every pair within each family of `evaluation.families`, plus each
        family member against the baseline. The baseline is always the opponent side;
        otherwise the model listed first in the plan is the candidate. Under
        vs_baseline and all_pairs, families only group the Elo fits (the elo step).
        """
        models = self.models
        if self.pairs == "vs_baseline":
            return [(m, self.baseline) for m in models if m != self.baseline]
        wanted: set[frozenset[str]] | None = None
        if self.pairs == "families":
            wanted = set()
            for members in self.families.values():
                for i, a in enumerate(members):
                    wanted.update(frozenset((a, b)) for b in members[i + 1:] if b != a)
                wanted.update(frozenset((m, self.baseline)) for m in members
                              if m != self.baseline)
        pairs = []
        for i, a in enumerate(models):
            for b in models[i + 1:]:
                if wanted is None or frozenset((a, b)) in wanted:
                    pairs.append((b, a) if a == self.baseline else (a, b))
        return pairs

    def unjudged(self) -> list[str]:
        """Models of the plan that no judged pair includes (families mode only)."""
        judged = {m for pair in self.judged_pairs() for m in pair}
        return [m for m in self.models if m not in judged]

    def merge_groups(self) -> dict[str, list[MergeNode]]:
        groups: dict[str, list[MergeNode]] = {}
        for node in self.merges.values():
            groups.setdefault(node.group, []).append(node)
        return groups

    def lineage(self, name: str) -> list[Node]:
        chain = []
        while name in self.nodes:
            chain.append(self.nodes[name])
            name = self.nodes[name].parent
        return chain[::-1]

    # ---- what the workflow's rules ask (common.smk wraps these; no logic there) ----

    @property
    def paths(self) -> Layout:
        if self.layout is None:
            raise ValueError("a plan built without a config has no layout")
        return self.layout

    def model_dir(self, name: str, seed: int | str = SEED) -> str:
        return self.paths.model_dir(name, seed)

    def resources(self, kind: str, name: str | None = None) -> dict[str, Any]:
        """Resources of one job: the kind's defaults (`resources.<kind>`), overridden by
        the node's or baseline's own `resources`."""
        merged = dict(self.config.get("resources", {}).get(kind, {}))
        node = self.nodes.get(name) or self.merges.get(name) if name is not None else None
        if node is not None:
            merged.update(node.resources)
        elif name in self.baselines:
            merged.update(self.baselines[name].get("resources", {}))
        return merged

    @cached_property
    def reproducibility(self) -> dict[str, Any]:
        """The `reproducibility` section as every torch job's params take it: with
        `rerun_on_library_change`, the installed library versions too."""
        setting = dict(self.config.get("reproducibility", {}))
        if setting.get("rerun_on_library_change"):
            setting["libraries"] = lineage.library_versions()
        return setting

    def job_env(self) -> dict[str, str]:
        """The variables every job's shell exports (reproducibility.job_env)."""
        return reproducibility.job_env(self.config.get("reproducibility", {}))

    def torch_threads(self, kind: str, threads: int) -> int:
        """Threads a torch job uses: with pinned kernels the configured `threads.<kind>`
        (a parallel sum splits by thread, so the count is part of the numbers), even
        where Snakemake gave the job fewer because the machine has fewer cores."""
        if self.config.get("reproducibility", {}).get("cpu_kernels") == "pinned":
            return int(self.config["threads"][kind])
        return int(threads)

    def sft_spec(self, seed: int | str | None = None) -> dict[str, Any]:
        """The sft_checkpoint step's spec: a built SFT depends on its seed, a linked
        local folder does not (seed None)."""
        spec = {**self.config["sft"], "prompt_template": self.config["prompt_template"]}
        return spec if seed is None else {**spec, "seed": int(seed)}

    def hub_download(self, key: str) -> dict[str, Any]:
        """What a model download fetches, by its folder key under resources/models: the
        content only (repo, revision, conversion), never the name a config gives it, so
        experiments sharing a snapshot agree on the job's params."""
        hub = self.paths.hub_spec(self.paths.hub_models()[key])
        return {"repo_id": hub["repo_id"], "revision": hub.get("revision", "main"),
                "convert_bin": bool(hub.get("convert_bin", False))}

    def dataset_download(self, key: str) -> dict[str, Any]:
        """What a dataset download fetches, by its folder key under resources/datasets."""
        src = self.config["preference_sources"][self.paths.hub_datasets()[key]]
        return {"repo_id": src["repo_id"], "revision": src.get("revision", "main")}

    def preference_input(self, source: str, seed: int | str) -> str:
        """What the preference_data step reads: the source's table or folder, or the
        `data_dir` sub-folder of it (one subset of a multi-subset hub snapshot)."""
        table = self.paths.preference_table(source, seed)
        sub = self.config["preference_sources"][source].get("data_dir")
        return f"{table}/{sub}" if sub else table

    def preference_format_args(self, source: str) -> str:
        """The preference_data step's format flags (`--format ... [--criterion ...]
        [--options JSON]`), from the data-format registry's check of the source."""
        return self.formats[source].cli_args()

    def align_spec(self, name: str, seed: int | str) -> dict[str, Any]:
        """Everything the align step trains node `name` with (its rerun trigger)."""
        node = self.nodes[name]
        return {"name": node.name, "parent": node.parent, "data": node.data,
                "loss": node.loss, "beta": node.beta, "training": node.training,
                "prompt_template": self.config["prompt_template"], "seed": int(seed)}

    def align_parent_dir(self, name: str, seed: int | str) -> str:
        return self.model_dir(self.nodes[name].parent, seed)

    def align_data_dir(self, name: str, seed: int | str) -> str:
        return self.paths.data_dir(self.datasets[self.nodes[name].data]["source"], seed)

    def align_data_file(self, name: str, seed: int | str) -> str:
        """The file of the preference-data folder the node's loss reads."""
        node = self.nodes[name]
        criterion = self.datasets[node.data]["criterion"]
        return f"{self.align_data_dir(name, seed)}/{criterion}_{node.data_file}.jsonl"

    def align_checkpoint_dir(self, name: str, seed: int | str) -> str:
        """Scratch for trainer checkpoints, keyed by the node's spec: a changed beta
        never resumes a stale run."""
        digest = hashlib.sha256(to_json(self.align_spec(name, seed)).encode()).hexdigest()
        return f"{self.paths.scratch(seed)}/align/{name}-{digest[:12]}"

    # ---- the shared reference pass (sacpo_steps/ref_logps.py) ----

    @cached_property
    def _ref_logps_keys(self) -> dict[str, str]:
        """{node: key of the ref_logps job it reads}, for nodes that read one."""
        keys = {}
        for name, node in self.nodes.items():
            entry = losses.get_loss(node.loss)
            if entry.ref_columns and node.training.get("precompute_ref_log_probs"):
                spec = ref_logps.reference_key_spec(node.loss, node.training,
                                                    self.config["prompt_template"])
                digest = hashlib.sha256(to_json(spec).encode()).hexdigest()[:12]
                keys[name] = f"{node.data}-{node.loss}-{digest}"
        return keys

    def ref_logps_key(self, name: str) -> str | None:
        """The `ref_logps` job node `name` reads, as `<data>-<loss>-<hash>`; None when the
        node computes no reference log-probs before training (precompute off, or a loss
        without a reference). Nodes with the same parent and key share one job."""
        return self._ref_logps_keys.get(name)

    @cached_property
    def ref_logps_jobs(self) -> dict[tuple[str, str], list[str]]:
        """{(reference model, key): the nodes that read it}, in plan order."""
        jobs: dict[tuple[str, str], list[str]] = {}
        for name, key in self._ref_logps_keys.items():
            jobs.setdefault((self.nodes[name].parent, key), []).append(name)
        return jobs

    def ref_logps_consumer(self, reference: str, key: str) -> str:
        """The node whose resources and launcher the job takes: of the nodes reading it,
        the one with the most GPUs (the first in plan order on a tie)."""
        readers = self.ref_logps_jobs[(reference, key)]
        return max(readers, key=lambda n: int(self.resources("align", n).get("gpu", 0) or 0))

    def ref_logps_spec(self, reference: str, key: str, seed: int | str) -> dict[str, Any]:
        """The ref_logps step's spec: what the pass depends on (its rerun trigger)."""
        node = self.nodes[self.ref_logps_consumer(reference, key)]
        spec = ref_logps.reference_key_spec(node.loss, node.training,
                                            self.config["prompt_template"])
        return {"reference": reference, "data": node.data, **spec, "seed": int(seed)}

    def ref_logps_file(self, reference: str, key: str, seed: int | str = SEED) -> str:
        return self.paths.ref_logps(reference, key, seed)

    def ref_logps_scratch(self, reference: str, key: str, seed: int | str) -> str:
        return f"{self.paths.scratch(seed)}/ref_logps/{reference}/{key}"

    def align_ref_logps(self, name: str, seed: int | str) -> list[str]:
        """The reference log-probs file node `name` reads (an empty list: none)."""
        key = self.ref_logps_key(name)
        return [] if key is None else [self.ref_logps_file(self.nodes[name].parent, key, seed)]

    def launcher(self, name: str, gpus: int) -> str:
        """One process, or `accelerate launch` with one process per GPU of the job."""
        if gpus <= 1:
            return "python -m sacpo_steps"
        dist = self.nodes[name].training["distributed"]
        return (f"accelerate launch --num_processes {gpus} "
                f"--config_file {ACCELERATE_CONFIGS / dist}.yaml -m sacpo_steps")

    def merge_rules(self) -> dict[str, list[MergeNode]]:
        """One merge rule per parent pair, named after the pair (`merge_<a>__<b>`, made
        a valid rule name): adding or removing another pair renames no rule."""
        groups = self.merge_groups()
        names = {g: "merge_" + re.sub(r"\W", "_", f"{ms[0].parent_a}__{ms[0].parent_b}")
                 for g, ms in groups.items()}
        taken: dict[str, int] = {}
        for name in names.values():
            taken[name] = taken.get(name, 0) + 1
        for group, name in names.items():
            if taken[name] > 1:  # two pairs that differ only in punctuation
                names[group] = f"{name}_{hashlib.sha256(group.encode()).hexdigest()[:6]}"
        return {names[g]: ms for g, ms in groups.items()}

    def prompt_cap(self, model: str) -> int | None:
        """The prompt cap (`max_prompt_length`, tokens.PromptCap) `model` is generated
        under: an alignment node's own merged training value; for a merge, the smaller of
        its parents' caps (None is no cap, so the smaller of a cap and None is the cap);
        the SFT and external baselines take the global `training.max_prompt_length`."""
        if model in self.nodes:
            return self.nodes[model].training.get("max_prompt_length")
        if model in self.merges:
            return self._smallest_cap(self.merges[model].parents)
        return self.config.get("training", {}).get("max_prompt_length")

    def _smallest_cap(self, models: tuple[str, ...]) -> int | None:
        """The cap a merge of `models` is generated under: the smallest of theirs, None
        (no cap) only when none of them has one."""
        caps = [cap for cap in map(self.prompt_cap, models) if cap is not None]
        return min(caps, default=None)

    def generation_spec(self, model: str, seed: int | str) -> dict[str, Any]:
        """The generate step's settings for one model (a baseline may bring its own
        prompt format and stop markers)."""
        gen = self.config["evaluation"]["generation"]
        own = self.baselines.get(model, {})
        return {
            "prompt_template": own.get("prompt_template", self.config["prompt_template"]),
            "stop_markers": own.get("stop_markers", self.config["stop_markers"]),
            "max_new_tokens": gen["max_new_tokens"],
            "batch_size": gen["batch_size"],
            "seed": int(seed),
            # the cap the model was trained under (tokens.PromptCap)
            "max_prompt_length": self.prompt_cap(model),
        }

    @property
    def prompt_sets(self) -> dict[str, dict[str, Any]]:
        return self.config["evaluation"]["prompt_sets"]

    def criterion(self, prompt_set: str) -> str:
        return self.prompt_sets[prompt_set]["criterion"]

    def judge(self, prompt_set: str) -> dict[str, Any]:
        """The prompt set's judge: the global judge with the set's own overrides."""
        return judge_for(self.config["evaluation"], prompt_set)

    def judge_settings(self, prompt_set: str) -> dict[str, Any]:
        """The set's judge with only its own criterion's template: editing the other
        criterion's template must not rerun this set's judge jobs (params trigger)."""
        return judge_registry.for_criterion(self.judge(prompt_set), self.criterion(prompt_set))

    def judge_cache(self, prompt_set: str) -> str | None:
        """The backend's shared cache (API replies, model scores) outside results/: paid
        for or slow, they must survive a cleaned results/ folder; None without one."""
        return judge_registry.cache_file(self.judge(prompt_set))

    def judge_reads(self, prompt_sets: list[str], seed: int | str) -> dict[str, str]:
        """What the sets' judges read besides the answers, as the judge registry says
        (the demo world's spec, score models, the user's templates): an edit reruns them.
        Two sets naming different files under one role keep both (the second suffixed)."""
        inputs: dict[str, str] = {}
        for prompt_set in prompt_sets:
            files = judge_registry.input_files(self.judge(prompt_set),
                                               self.criterion(prompt_set),
                                               spec=f"{self.paths.world_dir(seed)}/spec.json")
            for role, path in files.items():
                if inputs.get(role, path) != path:
                    role = f"{role}_{prompt_set}"
                inputs[role] = path
        return inputs

    def judge_inputs(self, model: str, opponent: str, prompt_set: str, seed: int | str
                     ) -> dict[str, str]:
        """The judge rule's inputs for one (model, opponent, prompt set, seed)."""
        return {"candidate": self.paths.generation(model, prompt_set, seed),
                "baseline": self.paths.generation(opponent, prompt_set, seed),
                "prompts": self.paths.prompt_set_file(prompt_set, seed),
                **self.judge_reads([prompt_set], seed)}

    def required_env(self) -> list[str]:
        """Names of the environment variables the judges need (API keys), sorted."""
        return sorted({env for s in self.prompt_sets
                       for env in judge_registry.required_env(self.judge(s))})

    def judge_api_slots(self) -> int | None:
        """Judge jobs at once against an API (each keeps `concurrency` requests in
        flight), or None when no judge calls an API."""
        api = [self.judge(s) for s in self.prompt_sets
               if judge_registry.get_backend(self.judge(s)["backend"]).calls_api]
        return min(judge_registry.protocol(j).parallel_jobs for j in api) if api else None

    def battle_files(self, seed: int | str) -> list[str]:
        """Every battle file of one seed; the baseline is always the opponent side."""
        return self.paths.battle_files(self.judged_pairs(), seed)

    @property
    def target(self) -> dict[str, Any] | None:
        return self.config.get("target")

    def target_sets(self) -> tuple[str, str]:
        """The search's helpfulness and red-team prompt sets (the first of each criterion)."""
        first = {ps["criterion"]: n for n, ps in reversed(self.prompt_sets.items())}
        return first["helpfulness"], first["harmlessness"]

    def target_inputs(self, seed: int | str) -> dict[str, Any]:
        node = self.nodes[self.target["over_safe"]]
        sets = list(self.target_sets())
        return {"a": self.model_dir(node.parent, seed), "b": self.model_dir(node.name, seed),
                "prompts": [self.paths.prompt_set_file(s, seed) for s in sets],
                "baseline": [self.paths.generation(self.baseline, s, seed) for s in sets],
                **self.judge_reads(sets, seed)}

    def target_generation_spec(self, seed: int | str) -> dict[str, Any]:
        """The target search's generation settings: it generates merges of the over-safe
        node and its parent, so under the smaller of their prompt caps, as a merge node."""
        node = self.nodes[self.target["over_safe"]]
        return {**self.generation_spec(self.sft, seed),
                "max_prompt_length": self._smallest_cap((node.parent, node.name))}

    def target_judges(self) -> dict[str, dict[str, Any]]:
        """Each searched prompt set's judge settings, with its cache, as the judge step's."""
        judges = {}
        for role, prompt_set in zip(("helpfulness", "red_team"), self.target_sets(),
                                    strict=True):
            judge = self.judge_settings(prompt_set)
            if self.judge_cache(prompt_set):
                judge["cache"] = self.judge_cache(prompt_set)
            judges[role] = judge
        return judges

    def final_outputs(self, tables: list[str], figures: list[str]) -> list[str]:
        """What `rule all` asks for: the across-seed tables and figures, and every seed's
        own tables, figures and target search."""
        paths = self.paths
        out = [*(paths.table(t) for t in tables), *(paths.figure(f) for f in figures)]
        for seed in self.seeds:
            out += [paths.seed_table(t, seed) for t in tables]
            out += [paths.seed_figure(f, seed) for f in figures]
            if self.target:
                out += [paths.target(f, seed) for f in ("search.json", "search.md")]
        return out

    def prompt_counts(self) -> dict[str, tuple[int | None, str, int]]:
        """Per prompt set (count or None, where the count comes from, longest prompt in
        characters): counted in the first seed's file when it exists, else the
        config's `expected_prompts`, else unknown (for `judgment_report`)."""
        counts = {}
        for name, ps in self.prompt_sets.items():
            path = Path(self.paths.prompt_set_file(name, self.seeds[0]))
            if path.is_file():
                lengths = [len(line) for line in path.open(encoding="utf-8") if line.strip()]
                expected = ps.get("expected_prompts")
                note = "" if expected in (None, len(lengths)) else \
                    f"; the config expects {expected}"
                counts[name] = (len(lengths), f"counted in {path}{note}", max(lengths, default=0))
            elif "expected_prompts" in ps:
                counts[name] = (ps["expected_prompts"], "expected_prompts in the config, "
                                "not fetched yet", 0)
            else:
                counts[name] = (None, "unknown until the set is fetched or built", 0)
        return counts


def _merge_training(defaults: dict[str, Any], override: dict[str, Any], where: str
                    ) -> dict[str, Any]:
    unknown = sorted(set(override) - set(defaults))
    if unknown:
        raise PlanError(f"{where}: unknown training key(s) {unknown}")
    # A node's overrides are not typed by the schema (defaults would be filled into
    # them): check them against `$defs/training` here, e.g. `learning_rate: 1e-4`,
    # which YAML reads as a string.
    import jsonschema

    # the training section takes nothing from the registries: the cached schema will do
    validator = jsonschema.Draft202012Validator(load_schema()["$defs"]["training"])
    for err in sorted(validator.iter_errors(override), key=lambda e: list(e.absolute_path)):
        raise PlanError(f"{where}.{_path(err)}: {err.message}")
    return {**defaults, **override}


# what each kind of external baseline needs, and what it must not carry
_BASELINE_KEYS = {"hub": ({"repo_id"}, {"answer", "path"}),
                  "local": ({"path"}, {"answer", "repo_id"}),
                  "constant": ({"answer"}, {"repo_id", "path", "prompt_template",
                                            "stop_markers", "resources"})}


def _check_baseline(name: str, spec: dict[str, Any]) -> None:
    needed, foreign = _BASELINE_KEYS[spec["source"]]
    missing = sorted(needed - set(spec))
    if missing:
        raise PlanError(f"baselines.{name}: source {spec['source']!r} needs {missing}")
    stray = sorted(foreign & set(spec))
    if stray:
        raise PlanError(f"baselines.{name}: {stray} do not apply to source {spec['source']!r}")


def build_plan(config: dict[str, Any]) -> Plan:
    """Expand a validated config into a Plan; refuse unknown names and cycles."""
    sft = config["sft"]["name"]
    try:
        seeds = config_seeds(config)
    except SeedError as exc:
        raise PlanError(str(exc)) from None
    sources = config["preference_sources"]
    datasets = config["datasets"]
    for name, ds in datasets.items():
        if ds["source"] not in sources:
            raise PlanError(f"datasets.{name}.source: unknown preference source "
                            f"{ds['source']!r} (defined: {sorted(sources)})")
    formats = {}
    for name, src in sources.items():
        if src["source"] == "local" and "path" not in src:
            raise PlanError(f"preference_sources.{name}: source 'local' needs `path`")
        if src["source"] == "hub" and "repo_id" not in src:
            raise PlanError(f"preference_sources.{name}: source 'hub' needs `repo_id`")
        try:  # the format registry checks its own keys (format, criterion, options)
            formats[name] = data_formats.check_source(src, f"preference_sources.{name}")
        except InputError as exc:
            raise PlanError.at_field(exc) from None
    for name, ds in datasets.items():
        yields = formats[ds["source"]].criteria
        if ds["criterion"] not in yields:
            raise PlanError(f"datasets.{name}.criterion: source {ds['source']!r} (format "
                            f"{formats[ds['source']].name}) yields {list(yields)}, not "
                            f"{ds['criterion']!r}")
    models = config["models"]
    if sft in models:
        raise PlanError(f"models.{sft}: the name is taken by the SFT checkpoint (sft.name)")
    src_cfg = config["sft"]
    if src_cfg["source"] not in src_cfg and src_cfg["source"] != "build":
        raise PlanError(f"sft: source {src_cfg['source']!r} needs a `{src_cfg['source']}:` section")
    if src_cfg["source"] == "build" and "build" not in src_cfg:
        raise PlanError("sft: source 'build' needs a `build:` section")

    defaults = config.get("training", {})
    baselines = config.get("baselines", {})
    taken = {sft: "the SFT checkpoint (sft.name)"}
    for name, spec in baselines.items():
        if name in taken:
            raise PlanError(f"baselines.{name}: the name is taken by {taken[name]}")
        taken[name] = "an external baseline (baselines)"
        _check_baseline(name, spec)
    nodes: dict[str, Node] = {}
    merges: dict[str, MergeNode] = {}
    for name, spec in models.items():
        where = f"models.{name}"
        if name in taken:
            raise PlanError(f"{where}: the name is taken by {taken[name]}")
        if "parents" in spec:
            merges[name] = _merge_node(name, spec, where)
        else:
            nodes[name] = _align_node(name, spec, where, defaults, datasets,
                                      config.get("resources", {}).get("align", {}), sft)
    known = {sft, *nodes, *merges}
    for node in [*nodes.values(), *merges.values()]:
        for i, parent in enumerate(node.parents):
            field_name = "parent" if isinstance(node, Node) else f"parents[{i}]"
            if parent not in known:
                hint = " (external baselines cannot be parents)" if parent in baselines else ""
                raise PlanError(f"models.{node.name}.{field_name}: unknown model {parent!r}"
                                f"{hint} (the SFT is {sft!r}; plan models: {sorted(models)})")

    every: dict[str, Node | MergeNode] = {**nodes, **merges}
    ordered: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, stack: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = " -> ".join([*stack[stack.index(name):], name])
            raise PlanError(f"models: the parents form a cycle: {cycle}")
        state[name] = "visiting"
        for parent in every[name].parents:
            if parent in every:
                visit(parent, [*stack, name])
        state[name] = "done"
        ordered.append(name)

    for name in every:
        visit(name, [])
    _check_conversational(nodes, datasets, formats, config["prompt_template"], sft)

    evaluation = config["evaluation"]
    baseline = evaluation.get("baseline", sft)
    if baseline != sft and baseline not in every and baseline not in baselines:
        raise PlanError(f"evaluation.baseline: unknown model {baseline!r}")
    pairs_mode, families = _check_families(evaluation, [sft, *ordered, *baselines], baseline)
    for name, ps in evaluation["prompt_sets"].items():
        if ps.get("source", "local") == "local" and "path" not in ps:
            raise PlanError(f"evaluation.prompt_sets.{name}: needs `path` (or source: demo)")
    target = config.get("target")
    if target:
        over_safe = nodes.get(target["over_safe"])
        if over_safe is None:
            raise PlanError(f"target.over_safe: {target['over_safe']!r} is not an alignment "
                            f"node of the plan")
        criteria = {ps["criterion"] for ps in evaluation["prompt_sets"].values()}
        if criteria != {"helpfulness", "harmlessness"}:
            raise PlanError("target: needs one helpfulness and one harmlessness prompt set")
        if target.get("measure") == "safe_rate":
            red_team = next(n for n, ps in evaluation["prompt_sets"].items()
                            if ps["criterion"] == "harmlessness")
            backend = judge_for(evaluation, red_team)["backend"]
            if not judge_registry.get_backend(backend).rates_one_answer:
                able = sorted(n for n, b in judge_registry.BACKENDS.items()
                              if b.rates_one_answer)
                raise PlanError(f"target.measure: safe_rate rates each answer on its own, "
                                f"which the {backend!r} judge of prompt set {red_team!r} cannot "
                                f"(it compares two answers): use a judge of {able}, "
                                f"or measure: harmlessness_winrate")
    return Plan(sft=sft, nodes={n: nodes[n] for n in ordered if n in nodes}, datasets=datasets,
                baseline=baseline, merges={n: merges[n] for n in ordered if n in merges},
                baselines=baselines, order=ordered, pairs=pairs_mode, families=families,
                seeds=seeds, config=config, layout=Layout.from_config(config), formats=formats)


def _check_conversational(nodes: dict[str, Node], datasets: dict[str, Any],
                          formats: dict[str, Any], prompt_template: str, sft: str) -> None:
    """Conversational data (message lists) trains through the chat template, so it needs
    `prompt_template: chat`; and one lineage must not mix text and conversational data
    (a model trained on chat turns, then on plain text, or the reverse)."""
    from sacpo_steps.tokens import is_chat

    def kind(node: Node) -> str:
        fmt = formats[datasets[node.data]["source"]]
        return "conversational" if fmt.conversational else "text"

    for name, node in nodes.items():
        fmt = formats[datasets[node.data]["source"]]
        if fmt.conversational and not is_chat(prompt_template):
            raise PlanError(f"models.{name}.data: dataset {node.data!r} is conversational "
                            f"(format {fmt.name}), which trains through the tokenizer's chat "
                            f"template: set `prompt_template: chat`")
        chain, parent = [node], node.parent
        while parent in nodes:
            chain.append(nodes[parent])
            parent = nodes[parent].parent
        kinds = {n.name: kind(n) for n in chain}
        if len(set(kinds.values())) > 1:
            raise PlanError(f"models.{name}.data: the lineage {sft} -> "
                            f"{' -> '.join(reversed(kinds))} mixes text and conversational "
                            f"datasets ({', '.join(f'{k}: {v}' for k, v in kinds.items())}); "
                            f"train one lineage on one kind")


def _check_families(evaluation: dict[str, Any], models: list[str], baseline: str
                    ) -> tuple[str, dict[str, list[str]]]:
    """`evaluation.pairs` and `evaluation.families`: `pairs: families` needs families;
    families are allowed under every pairs mode (they always group the Elo fits, and
    decide the judged pairs only under `pairs: families`); each lists known models, at
    least one besides the baseline, and none is named `pooled` (the label of the fit
    over every battle)."""
    pairs_mode = evaluation.get("pairs", "vs_baseline")
    if pairs_mode == "families" and not evaluation.get("families"):
        raise PlanError("evaluation.families: `evaluation.pairs: families` needs "
                        "`evaluation.families: {name: [model, ...]}`")
    families = {name: list(members) for name, members in evaluation.get("families", {}).items()}
    for name, members in families.items():
        if name == "pooled":
            raise PlanError("evaluation.families.pooled: `pooled` labels the Elo fit over "
                            "every battle; give the family another name")
        unknown = [m for m in members if m not in models]
        if unknown:
            raise PlanError(f"evaluation.families.{name}: unknown model(s) {unknown} "
                            f"(plan models: {models})")
        if set(members) <= {baseline}:
            raise PlanError(f"evaluation.families.{name}: lists only the baseline "
                            f"{baseline!r}; a family needs another model (the baseline is "
                            f"part of every family's Elo fit anyway)")
    return pairs_mode, families


def judge_for(evaluation: dict[str, Any], prompt_set: str) -> dict[str, Any]:
    """The judge of one prompt set: the global judge, overridden by the set's own (an
    override naming another backend keeps only the protocol keys)."""
    return judge_registry.resolve_judge(evaluation["judge"],
                                        evaluation["prompt_sets"][prompt_set].get("judge"))


ALIGN_FIELDS = ("parent", "data", "loss", "beta")


def _align_node(name: str, spec: dict[str, Any], where: str, defaults: dict[str, Any],
                datasets: dict[str, Any], kind_resources: dict[str, Any], sft: str) -> Node:
    missing = [f for f in ALIGN_FIELDS if f not in spec]
    if missing:
        raise PlanError(f"{where}: an alignment node needs {list(ALIGN_FIELDS)}; missing "
                        f"{missing} (a merge node has `parents` and `q`)")
    if "q" in spec:
        raise PlanError(f"{where}.q: only merge nodes (with `parents`) have q")
    if spec["data"] not in datasets:
        raise PlanError(f"{where}.data: unknown dataset {spec['data']!r} "
                        f"(defined: {sorted(datasets)})")
    training = _merge_training(defaults, spec.get("training", {}), f"{where}.training")
    try:  # the loss registry's own checks: reference for stage 2, batch, `trl:` args
        loss = losses.get_loss(spec["loss"])
        # a node's own `trl:` replaces the global one; without it, errors name the global
        inherited = "trl" not in spec.get("training", {})
        losses.check_node(loss, stage2=spec["parent"] != sft, training=training, where=where,
                          trl_where="training.trl" if inherited else None)
    except InputError as exc:
        if exc.field == "loss":
            raise PlanError(f"{where}.loss: {exc.message}") from None
        raise PlanError.at_field(exc) from None
    resources = dict(spec.get("resources", {}))
    _check_global_batch(training, {**kind_resources, **resources}, where)
    return Node(name, spec["parent"], spec["data"], spec["loss"], float(spec["beta"]),
                training, resources)


def _merge_node(name: str, spec: dict[str, Any], where: str) -> MergeNode:
    extra = [f for f in (*ALIGN_FIELDS, "training") if f in spec]
    if extra:
        raise PlanError(f"{where}: a merge node (with `parents`) takes `parents` and `q`, "
                        f"not {extra}")
    if "q" not in spec:
        raise PlanError(f"{where}.q: a merge node needs q in [0, 1]")
    a, b = spec["parents"]
    if a == b:
        raise PlanError(f"{where}.parents: the two parents are the same model {a!r}")
    return MergeNode(name, a, b, float(spec["q"]), dict(spec.get("resources", {})))


def _check_global_batch(training: dict[str, Any], resources: dict[str, Any], where: str
                        ) -> None:
    """A declared global batch must equal per-device batch x GPUs x accumulation."""
    declared = training.get("global_batch_size")
    if declared is None:
        return
    gpus = max(1, int(resources.get("gpu", 1)))
    actual = (training["per_device_train_batch_size"] * gpus
              * training["gradient_accumulation_steps"])
    if actual != declared:
        raise PlanError(
            f"{where}.training.global_batch_size: declared {declared}, but "
            f"per_device_train_batch_size {training['per_device_train_batch_size']} x gpu "
            f"{gpus} x "
            f"gradient_accumulation_steps {training['gradient_accumulation_steps']} = {actual}")


def load_plan(config: dict[str, Any], *, source: str = "config",
              base_dir: str | Path = WORKFLOW_ROOT,
              config_dir: str | Path | None = None) -> Plan:
    """Resolve `extends` (against `config_dir`, the config file's folder, then
    `base_dir`), validate (filling defaults) and expand a config; the config dict is
    updated in place, so the workflow's rules read the resolved one."""
    if "extends" in config:
        resolved = resolve_extends(config, base_dir, config_dir)
        config.clear()
        config.update(resolved)
    for line in migrate_config(config):
        print(f"deprecated ({source}): {line}", file=sys.stderr)
    _check_judge_sections(config)
    validate_config(config, source=source)
    return build_plan(config)


def migrate_config(config: dict[str, Any]) -> list[str]:
    """Rename deprecated training keys in place (the defaults and each node's own), before
    validation; return one message per rename. Both names at once is an error."""
    sections = [("training", config)]
    models = config.get("models")
    if isinstance(models, dict):
        sections += [(f"models.{n}.training", spec) for n, spec in models.items()
                     if isinstance(spec, dict)]
    messages = []
    for where, holder in sections:
        if isinstance(holder.get("training"), dict):
            try:
                holder["training"], notes = migrate_training(holder["training"], where)
            except InputError as exc:
                raise PlanError.at_field(exc) from None
            messages += notes
    return messages


def _check_judge_sections(config: dict[str, Any]) -> None:
    """The judge registry checks every judge section before the schema does, so a key of
    another backend is reported as such (`belongs to the score_model judge`), not only
    as unknown. Sections that are not mappings are left to the schema."""
    evaluation = config.get("evaluation")
    if not isinstance(evaluation, dict):
        return
    judge = evaluation.get("judge", {})
    if not isinstance(judge, dict):
        return
    try:
        judge_registry.check_judge(judge, "evaluation.judge")
        for name, ps in (evaluation.get("prompt_sets") or {}).items():
            if isinstance(ps, dict) and isinstance(ps.get("judge"), dict):
                judge_registry.check_judge(judge_registry.resolve_judge(judge, ps["judge"]),
                                           f"evaluation.prompt_sets.{name}.judge")
    except InputError as exc:
        raise PlanError.at_field(exc) from None


def to_json(obj: Any) -> str:
    """Canonical JSON for rule params: equal content gives equal text (stable reruns)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
