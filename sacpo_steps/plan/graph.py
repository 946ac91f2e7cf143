"""The experiment graph: the models a config asks for, their lineage and what is judged.

The second of the plan's three parts (loading -> graph -> rules): from a validated
config it builds the alignment and merge nodes, orders them parents first and refuses
what cannot run (unknown names, cycles, a stage-2 loss without a reference, mixed
text and chat data), naming the config field at fault.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.layout import SeedError, config_seeds
from sacpo_steps.data import formats as data_formats
from sacpo_steps.evaluation.judges import registry as judge_registry
from sacpo_steps.evaluation.judges.registry import JudgeConfig
from sacpo_steps.models.tokens import is_chat
from sacpo_steps.plan.loading import PlanError
from sacpo_steps.training.node import NodeSettings
from sacpo_steps.training.settings import TrainingConfig


@dataclass(frozen=True)
class Node:
    """One aligned model of the plan: `parent` is its initial policy and its reference."""

    name: str
    parent: str
    data: str
    settings: NodeSettings  # loss, beta and training, checked when built
    resources: dict[str, Any] = field(default_factory=dict)

    @property
    def loss(self) -> str:
        return self.settings.loss

    @property
    def beta(self) -> float:
        return self.settings.beta

    @property
    def training(self) -> TrainingConfig:
        return self.settings.training

    @property
    def data_file(self) -> str:
        """Which file of the preference data folder this node's loss reads (registry)."""
        return self.settings.entry.data

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
class Experiment:
    """The models of an experiment and how they relate; the plan's rules part adds the
    paths and settings each rule asks for."""

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
    formats: dict[str, Any] = field(default_factory=dict)  # source -> checked data format
    # prompt set -> its judge (the global one with the set's overrides), read once
    judges: dict[str, JudgeConfig] = field(default_factory=dict)

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


def _node_training(defaults: dict[str, Any], override: dict[str, Any], where: str
                   ) -> TrainingConfig:
    """The global `training` section with the node's own keys on top, built (and so
    checked against `$defs/training`: YAML reads `learning_rate: 1e-4` as a string)."""
    unknown = sorted(set(override) - set(defaults))
    if unknown:
        raise PlanError(f"{where}: unknown training key(s) {unknown}")
    try:
        return TrainingConfig.from_dict({**defaults, **override})
    except InputError as exc:
        raise PlanError(f"{where.rpartition('.training')[0]}.{exc.field}: {exc.message}") \
            from None


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


def build_graph(config: dict[str, Any]) -> Experiment:
    """Expand a validated config into its experiment graph; refuse unknown names and
    cycles."""
    sft = config["sft"]["name"]
    try:
        seeds = config_seeds(config)
    except SeedError as exc:
        raise PlanError(str(exc)) from None
    datasets = config["datasets"]
    formats = _check_sources(config["preference_sources"], datasets)
    _check_sft(config["sft"], config["models"])
    baselines = config.get("baselines", {})
    nodes, merges = _model_nodes(config, sft, baselines)
    every: dict[str, Node | MergeNode] = {**nodes, **merges}
    ordered = _parents_first(every)
    _check_conversational(nodes, datasets, formats, config["prompt_template"], sft)
    _check_data_kinds(nodes, datasets, formats)
    evaluation = config["evaluation"]
    baseline = evaluation.get("baseline", sft)
    if baseline != sft and baseline not in every and baseline not in baselines:
        raise PlanError(f"evaluation.baseline: unknown model {baseline!r}")
    pairs_mode, families = _check_families(evaluation, [sft, *ordered, *baselines], baseline)
    judges = _read_judges(evaluation)
    if config.get("target"):
        _check_target(config["target"], nodes, evaluation, judges)
    if config.get("comparison"):
        _check_comparison(config["comparison"], nodes, [sft, *ordered, *baselines],
                          evaluation)
    return Experiment(sft=sft, nodes={n: nodes[n] for n in ordered if n in nodes},
                      datasets=datasets, baseline=baseline,
                      merges={n: merges[n] for n in ordered if n in merges},
                      baselines=baselines, order=ordered, pairs=pairs_mode,
                      families=families, seeds=seeds, formats=formats, judges=judges)


def _check_sources(sources: dict[str, Any], datasets: dict[str, Any]) -> dict[str, Any]:
    """Each preference source's checked data format; each dataset names a source that
    yields its criterion."""
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
    return formats


def _check_sft(sft: dict[str, Any], models: dict[str, Any]) -> None:
    if sft["name"] in models:
        raise PlanError(f"models.{sft['name']}: the name is taken by the SFT checkpoint "
                        "(sft.name)")
    if sft["source"] not in sft and sft["source"] != "build":
        raise PlanError(f"sft: source {sft['source']!r} needs a `{sft['source']}:` section")
    if sft["source"] == "build" and "build" not in sft:
        raise PlanError("sft: source 'build' needs a `build:` section")


def _model_nodes(config: dict[str, Any], sft: str, baselines: dict[str, Any]
                 ) -> tuple[dict[str, Node], dict[str, MergeNode]]:
    """The alignment and merge nodes of `models`, each name taken once and each parent
    a model of the plan."""
    models = config["models"]
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
            nodes[name] = _align_node(name, spec, where, config.get("training", {}),
                                      config["datasets"],
                                      config.get("resources", {}).get("align", {}), sft)
    known = {sft, *nodes, *merges}
    for node in [*nodes.values(), *merges.values()]:
        for i, parent in enumerate(node.parents):
            field_name = "parent" if isinstance(node, Node) else f"parents[{i}]"
            if parent not in known:
                hint = " (external baselines cannot be parents)" if parent in baselines else ""
                raise PlanError(f"models.{node.name}.{field_name}: unknown model {parent!r}"
                                f"{hint} (the SFT is {sft!r}; plan models: {sorted(models)})")
    return nodes, merges


def _parents_first(every: dict[str, Node | MergeNode]) -> list[str]:
    """The nodes ordered parents before children; a cycle is refused, named."""
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
    return ordered


def _read_judges(evaluation: dict[str, Any]) -> dict[str, JudgeConfig]:
    """Each prompt set's judge (the global one with the set's overrides), read once."""
    judges = {}
    for name, ps in evaluation["prompt_sets"].items():
        if ps.get("source", "local") == "local" and "path" not in ps:
            raise PlanError(f"evaluation.prompt_sets.{name}: needs `path` (or source: demo)")
        where = f"evaluation.prompt_sets.{name}.judge" if ps.get("judge") else \
            "evaluation.judge"
        try:
            judges[name] = JudgeConfig.read(judge_for(evaluation, name), where)
        except InputError as exc:
            raise PlanError.at_field(exc) from None
    return judges


def _check_target(target: dict[str, Any], nodes: dict[str, Node], evaluation: dict[str, Any],
                  judges: dict[str, JudgeConfig]) -> None:
    """The target search needs an alignment node to search over, one helpfulness and
    one harmlessness prompt set, and for `safe_rate` a judge that rates one answer."""
    if target["over_safe"] not in nodes:
        raise PlanError(f"target.over_safe: {target['over_safe']!r} is not an alignment "
                        f"node of the plan")
    criteria = {ps["criterion"] for ps in evaluation["prompt_sets"].values()}
    if criteria != {"helpfulness", "harmlessness"}:
        raise PlanError("target: needs one helpfulness and one harmlessness prompt set")
    if target.get("measure") == "safe_rate":
        red_team = next(n for n, ps in evaluation["prompt_sets"].items()
                        if ps["criterion"] == "harmlessness")
        backend = judges[red_team].backend
        if not backend.rates_one_answer:
            able = sorted(n for n, b in judge_registry.BACKENDS.items() if b.rates_one_answer)
            raise PlanError(f"target.measure: safe_rate rates each answer on its own, "
                            f"which the {backend.name!r} judge of prompt set {red_team!r} "
                            f"cannot (it compares two answers): use a judge of {able}, "
                            f"or measure: harmlessness_winrate")


def _check_comparison(comparison: dict[str, Any], nodes: dict[str, Node], models: list[str],
                      evaluation: dict[str, Any]) -> None:
    """Each method lists models of the plan, once; a match searches over a stage-2 node
    and matches models of the plan, with both criteria's prompt sets to measure on."""
    seen: dict[str, str] = {}
    for method, members in comparison["methods"].items():
        for model in members:
            if model not in models:
                raise PlanError(f"comparison.methods.{method}: unknown model {model!r} "
                                f"(plan models: {models})")
            if model in seen:
                raise PlanError(f"comparison.methods.{method}: {model!r} is already a model "
                                f"of method {seen[model]!r}")
            seen[model] = method
    match = comparison.get("match")
    if not match:
        return
    over_safe = match["over_safe"]
    if over_safe not in nodes or nodes[over_safe].parent not in nodes:
        raise PlanError(f"comparison.match.over_safe: {over_safe!r} is not a stage-2 "
                        "alignment node (an aligned model whose parent is aligned too)")
    unknown = [m for m in match["models"] if m not in models]
    if unknown:
        raise PlanError(f"comparison.match.models: unknown model(s) {unknown} "
                        f"(plan models: {models})")
    criteria = {ps["criterion"] for ps in evaluation["prompt_sets"].values()}
    if not {"helpfulness", "harmlessness"} <= criteria:
        raise PlanError("comparison.match: needs a helpfulness and a harmlessness prompt set")


def _check_data_kinds(nodes: dict[str, Node], datasets: dict[str, Any],
                      formats: dict[str, Any]) -> None:
    """Each node's loss reads a file its dataset's source writes: a loss on labelled
    pairs (SafeDPO) needs a source whose rows carry each answer's safety label."""
    for name, node in nodes.items():
        dataset = datasets[node.data]
        wanted = f"{dataset['criterion']}_{node.data_file}"
        fmt = formats[dataset["source"]]
        if wanted not in fmt.output_names():
            able = sorted(f for f, entry in data_formats.FORMATS.items()
                          if dataset["criterion"] in entry.labeled)
            raise PlanError(
                f"models.{name}.loss: loss {node.settings.loss!r} trains on {wanted}.jsonl, "
                f"which source {dataset['source']!r} (format {fmt.name}) does not write: its "
                f"rows carry no safety label of each answer (formats with "
                f"{dataset['criterion']} pairs labelled by safety: {able or 'none'})")


def _check_conversational(nodes: dict[str, Node], datasets: dict[str, Any],
                          formats: dict[str, Any], prompt_template: str, sft: str) -> None:
    """Conversational data (message lists) trains through the chat template, so it needs
    `prompt_template: chat`; and one lineage must not mix text and conversational data
    (a model trained on chat turns, then on plain text, or the reverse)."""
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
    training = _node_training(defaults, spec.get("training", {}), f"{where}.training")
    try:  # the loss registry's own checks: reference for stage 2, batch, `trl:` args
        # a node's own `trl:` replaces the global one; without it, errors name the global
        inherited = "trl" not in spec.get("training", {})
        settings = NodeSettings(spec["loss"], spec["beta"], training,
                                stage2=spec["parent"] != sft, where=where,
                                trl_where="training.trl" if inherited else None,
                                margin=spec.get("margin"))
    except InputError as exc:
        raise PlanError.at_field(exc) from None
    resources = dict(spec.get("resources", {}))
    _check_global_batch(training, {**kind_resources, **resources}, where)
    return Node(name, spec["parent"], spec["data"], settings, resources)


def _merge_node(name: str, spec: dict[str, Any], where: str) -> MergeNode:
    extra = [f for f in (*ALIGN_FIELDS, "training", "margin") if f in spec]
    if extra:
        raise PlanError(f"{where}: a merge node (with `parents`) takes `parents` and `q`, "
                        f"not {extra}")
    if "q" not in spec:
        raise PlanError(f"{where}.q: a merge node needs q in [0, 1]")
    a, b = spec["parents"]
    if a == b:
        raise PlanError(f"{where}.parents: the two parents are the same model {a!r}")
    return MergeNode(name, a, b, float(spec["q"]), dict(spec.get("resources", {})))


def _check_global_batch(training: TrainingConfig, resources: dict[str, Any], where: str
                        ) -> None:
    """A declared global batch must equal per-device batch x GPUs x accumulation."""
    declared = training.global_batch_size
    if declared is None:
        return
    gpus = max(1, int(resources.get("gpu", 1)))
    actual = (training.per_device_train_batch_size * gpus
              * training.gradient_accumulation_steps)
    if actual != declared:
        raise PlanError(
            f"{where}.training.global_batch_size: declared {declared}, but "
            f"per_device_train_batch_size {training.per_device_train_batch_size} x gpu "
            f"{gpus} x "
            f"gradient_accumulation_steps {training.gradient_accumulation_steps} = {actual}")
