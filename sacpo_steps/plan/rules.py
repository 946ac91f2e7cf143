"""What the workflow's rules ask: every path, param, input and resource of a job.

The last of the plan's three parts (loading -> graph -> rules). `common.smk` wraps
these methods and holds no logic of its own, so what a rule gets is tested here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shlex
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from sacpo_steps.core import lineage, reproducibility
from sacpo_steps.core.layout import COMPARISON_FILES, SEED, Layout
from sacpo_steps.core.schema import ACCELERATE_CONFIGS
from sacpo_steps.evaluation.generation_settings import GenerationSettings
from sacpo_steps.evaluation.judges.registry import JudgeConfig
from sacpo_steps.plan.graph import Experiment, MergeNode, build_graph
from sacpo_steps.plan.loading import to_json
from sacpo_steps.training import losses
from sacpo_steps.training.reference import reference_key_spec


@dataclass
class Plan(Experiment):
    """The experiment graph with its config and layout, answering the rules' questions."""

    config: dict[str, Any] = field(default_factory=dict, repr=False)  # validated, resolved
    layout: Layout | None = field(default=None, repr=False)  # every path of the experiment
    _judge_args: dict[tuple[str, str], str] = field(default_factory=dict, init=False,
                                                    repr=False, compare=False)

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
                **node.settings.to_dict(),
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

    # ---- the shared reference pass (sacpo_steps/training/ref_logps.py) ----

    @cached_property
    def _ref_logps_keys(self) -> dict[str, str]:
        """{node: key of the ref_logps job it reads}, for nodes that read one."""
        keys = {}
        for name, node in self.nodes.items():
            entry = losses.get_loss(node.loss)
            if entry.ref_columns and node.training.precompute_ref_log_probs:
                # a loss reading another's reference pass (bso: safedpo's) shares its job
                spec = reference_key_spec(entry.reference_name, asdict(node.training),
                                          self.config["prompt_template"])
                digest = hashlib.sha256(to_json(spec).encode()).hexdigest()[:12]
                keys[name] = f"{node.data}-{entry.reference_name}-{digest}"
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
        spec = reference_key_spec(losses.get_loss(node.loss).reference_name,
                                  asdict(node.training), self.config["prompt_template"])
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
        dist = self.nodes[name].training.distributed
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
            return self.nodes[model].training.max_prompt_length
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
        return GenerationSettings(
            prompt_template=own.get("prompt_template", self.config["prompt_template"]),
            stop_markers=own.get("stop_markers", self.config["stop_markers"]),
            max_new_tokens=gen["max_new_tokens"],
            batch_size=gen["batch_size"],
            seed=int(seed),
            # the cap the model was trained under (tokens.PromptCap)
            max_prompt_length=self.prompt_cap(model),
        ).to_dict()

    @property
    def prompt_sets(self) -> dict[str, dict[str, Any]]:
        return self.config["evaluation"]["prompt_sets"]

    def criterion(self, prompt_set: str) -> str:
        return self.prompt_sets[prompt_set]["criterion"]

    def judge(self, prompt_set: str) -> JudgeConfig:
        """The prompt set's judge: the global judge with the set's own overrides."""
        return self.judges[prompt_set]

    def judge_settings(self, prompt_set: str) -> dict[str, Any]:
        """The set's judge with only its own criterion's template: editing the other
        criterion's template must not rerun this set's judge jobs (params trigger)."""
        return dict(self._criterion_judges[prompt_set])

    @cached_property
    def _criterion_judges(self) -> dict[str, dict[str, Any]]:
        """Each set's `judge_settings`, read once per set, not once per judge job."""
        return {s: self.judge(s).for_criterion(self.criterion(s)).to_dict()
                for s in self.prompt_sets}

    def judge_templates(self, prompt_sets: list[str]) -> dict[str, str]:
        """{criterion: sha256} of the packaged prompt templates the sets' judges render
        (`JudgeConfig.template_hashes`): a param of the jobs that judge them, so editing
        one template reruns exactly those; {} for judges without templates. The user's
        own template files are job inputs instead (`judge_reads`)."""
        hashes: dict[str, str] = {}
        for prompt_set in prompt_sets:
            hashes.update(self.judge(prompt_set).template_hashes(self.criterion(prompt_set)))
        return hashes

    def judge_cache(self, prompt_set: str) -> str | None:
        """The backend's shared cache (API replies, model scores) outside results/: paid
        for or slow, they must survive a cleaned results/ folder; None without one."""
        return self.judge(prompt_set).cache_file()

    def judge_args(self, prompt_set: str, seed: int | str) -> str:
        """The judge step's arguments that depend on the prompt set alone (criterion,
        judge settings, repetitions, cache, the world's spec), as one shell fragment:
        one param per judge job, not five, since Snakemake's cost per callable param
        and job dominates a no-op rerun of a DAG of judge jobs."""
        key = (prompt_set, str(seed))
        if key not in self._judge_args:
            judge = self.judge(prompt_set)
            args = ["--criterion", self.criterion(prompt_set),
                    "--judge-config", to_json(self.judge_settings(prompt_set)),
                    "--repetitions", str(judge.protocol.repetitions)]
            cache = self.judge_cache(prompt_set)
            if cache:
                args += ["--judge-cache", cache]
            spec = self.judge_reads([prompt_set], seed).get("spec")
            if spec:
                args += ["--spec", spec]
            self._judge_args[key] = shlex.join(args)
        return self._judge_args[key]

    def judge_reads(self, prompt_sets: list[str], seed: int | str) -> dict[str, str]:
        """What the sets' judges read besides the answers, as the judge registry says
        (the demo world's spec, score models, the user's templates): an edit reruns them.
        Two sets naming different files under one role keep both (the second suffixed)."""
        inputs: dict[str, str] = {}
        for prompt_set in prompt_sets:
            files = self.judge(prompt_set).input_files(
                self.criterion(prompt_set), spec=f"{self.paths.world_dir(seed)}/spec.json")
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
        return sorted({env for s in self.prompt_sets for env in self.judge(s).required_env()})

    def judge_api_slots(self) -> int | None:
        """Judge jobs at once against an API (each keeps `concurrency` requests in
        flight), or None when no judge calls an API."""
        api = [self.judge(s) for s in self.prompt_sets if self.judge(s).backend.calls_api]
        return min(j.protocol.parallel_jobs for j in api) if api else None

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

    def target_inputs(self, seed: int | str, over_safe: str | None = None) -> dict[str, Any]:
        """The target search's inputs: the merge's parents, both prompt sets, the
        baseline's answers to them and what the judges read."""
        node = self.nodes[over_safe or self.target["over_safe"]]
        sets = list(self.target_sets())
        return {"a": self.model_dir(node.parent, seed), "b": self.model_dir(node.name, seed),
                "prompts": [self.paths.prompt_set_file(s, seed) for s in sets],
                "baseline": [self.paths.generation(self.baseline, s, seed) for s in sets],
                **self.judge_reads(sets, seed)}

    def target_generation_spec(self, seed: int | str, over_safe: str | None = None
                               ) -> dict[str, Any]:
        """The target search's generation settings: it generates merges of the over-safe
        node and its parent, so under the smaller of their prompt caps, as a merge node."""
        node = self.nodes[over_safe or self.target["over_safe"]]
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

    # ---- the method comparison (reporting/comparison.py, docs/comparison.md) ----

    @property
    def comparison(self) -> dict[str, Any] | None:
        return self.config.get("comparison")

    @property
    def matched_models(self) -> list[str]:
        """The models P-SACPO is matched to (comparison.match.models), or none."""
        match = (self.comparison or {}).get("match") or {}
        return list(match.get("models", []))

    def matched_inputs(self, model: str, seed: int | str) -> dict[str, Any]:
        """A matched search's inputs: the target search's, with the seed's win rates
        (the target: `model`'s harmlessness lower bound) and battles (its helpfulness)."""
        return {**self.target_inputs(seed, self.comparison["match"]["over_safe"]),
                "table": self.paths.seed_table("winrate.csv", seed),
                "battles": self.paths.seed_table("battles.csv", seed)}

    def comparison_card_dirs(self) -> list[str]:
        """Every trained or merged model of every seed: the costs follow each method's
        models back to SFT through their model cards."""
        return [self.model_dir(name, seed) for seed in self.seeds
                for name in (*self.nodes, *self.merges)]

    def comparison_matched(self) -> list[str]:
        return [self.paths.matched(m, ".json", seed) for seed in self.seeds
                for m in self.matched_models]

    def final_outputs(self, tables: list[str], figures: list[str]) -> list[str]:
        """What `rule all` asks for: the across-seed tables and figures, and every seed's
        own tables, figures and target search; the method comparison's outputs."""
        paths = self.paths
        out = [*(paths.table(t) for t in tables), *(paths.figure(f) for f in figures)]
        for seed in self.seeds:
            out += [paths.seed_table(t, seed) for t in tables]
            out += [paths.seed_figure(f, seed) for f in figures]
            if self.target:
                out += [paths.target(f, seed) for f in ("search.json", "search.md")]
        if self.comparison:
            out += [paths.comparison(name) for name in COMPARISON_FILES]
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


def build_plan(config: dict[str, Any]) -> Plan:
    """The plan of a validated config: its graph, config and layout."""
    graph = build_graph(config)
    fields = {f.name: getattr(graph, f.name) for f in dataclasses.fields(Experiment)}
    return Plan(**fields, config=config, layout=Layout.from_config(config))
