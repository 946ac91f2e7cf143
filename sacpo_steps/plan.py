"""The experiment plan: validate a config and expand it into model nodes.

The Snakefile imports this module (never the reverse), so the same checks run
in tests and before any job: schema errors, unknown parents or datasets and
cycles are reported with the config path of the offending field.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from sacpo_steps.errors import InputError

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"


class PlanError(InputError):
    """The config cannot describe a runnable experiment."""


@cache
def load_schema(path: str | Path = SCHEMA_PATH) -> dict[str, Any]:
    """The parsed schema, read once per process (callers must not modify it)."""
    import yaml

    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


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

    schema = schema or load_schema()
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
        """Which file of the preference data folder this node trains on."""
        return "pairs" if self.loss == "dpo" else "kto"

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

    @property
    def models(self) -> list[str]:
        """Every model that is generated and judged, the SFT first."""
        return [self.sft, *self.order, *self.baselines]

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


def _merge_training(defaults: dict[str, Any], override: dict[str, Any], where: str
                    ) -> dict[str, Any]:
    unknown = sorted(set(override) - set(defaults))
    if unknown:
        raise PlanError(f"{where}: unknown training key(s) {unknown}")
    # A node's overrides are not typed by the schema (defaults would be filled into
    # them): check them against `$defs/training` here, e.g. `learning_rate: 1e-4`,
    # which YAML reads as a string.
    import jsonschema

    validator = jsonschema.Draft202012Validator(load_schema()["$defs"]["training"])
    for err in sorted(validator.iter_errors(override), key=lambda e: list(e.absolute_path)):
        raise PlanError(f"{where}.{_path(err)}: {err.message}")
    return {**defaults, **override}


def build_plan(config: dict[str, Any]) -> Plan:
    """Expand a validated config into a Plan; refuse unknown names and cycles."""
    sft = config["sft"]["name"]
    sources = config["preference_sources"]
    datasets = config["datasets"]
    for name, ds in datasets.items():
        if ds["source"] not in sources:
            raise PlanError(f"datasets.{name}.source: unknown preference source "
                            f"{ds['source']!r} (defined: {sorted(sources)})")
    for name, src in sources.items():
        if src["source"] == "local" and "path" not in src:
            raise PlanError(f"preference_sources.{name}: source 'local' needs `path`")
        if src["source"] == "hub" and "repo_id" not in src:
            raise PlanError(f"preference_sources.{name}: source 'hub' needs `repo_id`")
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
    for name in baselines:
        if name in taken:
            raise PlanError(f"baselines.{name}: the name is taken by {taken[name]}")
        taken[name] = "an external baseline (baselines)"
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
                                      config.get("resources", {}).get("align", {}))
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

    evaluation = config["evaluation"]
    baseline = evaluation.get("baseline", sft)
    if baseline != sft and baseline not in every and baseline not in baselines:
        raise PlanError(f"evaluation.baseline: unknown model {baseline!r}")
    judge_schema = load_schema()["properties"]["evaluation"]["properties"]["judge"]
    for name, ps in evaluation["prompt_sets"].items():
        if "judge" in ps:
            _check_judge_override(ps["judge"], judge_schema,
                                  f"evaluation.prompt_sets.{name}.judge")
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
            if backend not in ("rule", "score_model"):
                raise PlanError(f"target.measure: safe_rate rates each answer on its own, "
                                f"which the {backend!r} judge of prompt set {red_team!r} cannot "
                                f"(it compares two answers): use a rule or score_model judge, "
                                f"or measure: harmlessness_winrate")
    return Plan(sft=sft, nodes={n: nodes[n] for n in ordered if n in nodes}, datasets=datasets,
                baseline=baseline, merges={n: merges[n] for n in ordered if n in merges},
                baselines=baselines, order=ordered)


def judge_for(evaluation: dict[str, Any], prompt_set: str) -> dict[str, Any]:
    """The judge of one prompt set: the global judge, overridden by the set's own.

    An override with another backend keeps only the protocol keys (repetitions, error
    threshold, parallel jobs): the other backend's settings would not apply to it.
    """
    base = dict(evaluation["judge"])
    own = evaluation["prompt_sets"][prompt_set].get("judge", {})
    if own.get("backend", base["backend"]) != base["backend"]:
        from sacpo_steps.judges.base import STEP_KEYS

        base = {k: v for k, v in base.items() if k in STEP_KEYS - {"backend"}}
    return {**base, **own}


def _check_judge_override(override: dict[str, Any], schema: dict[str, Any], where: str
                          ) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    for err in sorted(validator.iter_errors(override), key=lambda e: list(e.absolute_path)):
        if err.validator == "additionalProperties":
            extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
            raise PlanError(f"{where}: unknown key(s) {extra}")
        raise PlanError(f"{where}.{_path(err)}: {err.message}")


ALIGN_FIELDS = ("parent", "data", "loss", "beta")


def _align_node(name: str, spec: dict[str, Any], where: str, defaults: dict[str, Any],
                datasets: dict[str, Any], kind_resources: dict[str, Any]) -> Node:
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
    if spec["loss"] == "kto" and training["per_device_batch_size"] < 2:
        raise PlanError(f"{where}.training.per_device_batch_size: KTO needs at least 2")
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
    actual = (training["per_device_batch_size"] * gpus
              * training["gradient_accumulation_steps"])
    if actual != declared:
        raise PlanError(
            f"{where}.training.global_batch_size: declared {declared}, but "
            f"per_device_batch_size {training['per_device_batch_size']} x gpu {gpus} x "
            f"gradient_accumulation_steps {training['gradient_accumulation_steps']} = {actual}")


def load_plan(config: dict[str, Any], *, source: str = "config") -> Plan:
    """Validate (filling defaults in place) and expand a config."""
    validate_config(config, source=source)
    return build_plan(config)


def to_json(obj: Any) -> str:
    """Canonical JSON for rule params: equal content gives equal text (stable reruns)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
