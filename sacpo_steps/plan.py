"""The experiment plan: validate a config and expand it into model nodes.

The Snakefile imports this module (never the reverse), so the same checks run
in tests and before any job: schema errors, unknown parents or datasets and
cycles are reported with the config path of the offending field.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from sacpo_steps.errors import InputError
from sacpo_steps.layout import SeedError, config_seeds

WORKFLOW_ROOT = Path(__file__).resolve().parent.parent  # where `extends:` paths start
SCHEMA_PATH = WORKFLOW_ROOT / "workflow" / "schemas" / "config.schema.yaml"


class PlanError(InputError):
    """The config cannot describe a runnable experiment."""


@cache
def load_schema(path: str | Path = SCHEMA_PATH) -> dict[str, Any]:
    """The parsed schema, read once per process (callers must not modify it)."""
    import yaml

    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_extends(config: dict[str, Any], base_dir: str | Path) -> dict[str, Any]:
    """A config with `extends: <file>` is that file's config with its own keys on top
    (mappings merge key by key; lists and scalars replace). A variant of an experiment
    (other seeds, another beta) then states only what differs. Paths are relative to
    `base_dir` (the workflow's folder); chains are followed, cycles refused."""
    import yaml

    seen: list[str] = []
    while "extends" in config:
        name = config["extends"]
        if not isinstance(name, str):
            raise PlanError(f"extends: expected a config file path, got {name!r}")
        path = Path(base_dir) / name
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
    pairs: str = "vs_baseline"  # evaluation.pairs
    families: dict[str, list[str]] = field(default_factory=dict)  # evaluation.families
    seeds: tuple[int, ...] = (0,)  # `seeds`, or a scalar `seed` as one element

    @property
    def models(self) -> list[str]:
        """Every model of the plan, the SFT first (those in no judged pair are not generated)."""
        return [self.sft, *self.order, *self.baselines]

    def judged_pairs(self) -> list[tuple[str, str]]:
        """The distinct unordered pairs to judge, as (model, opponent) in plan order.

        vs_baseline: each model against the baseline; all_pairs: every pair of models;
        families: every pair within each family of `evaluation.families`, plus each
        family member against the baseline. The baseline is always the opponent side;
        otherwise the model listed first in the plan is the candidate.
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
    pairs_mode, families = _check_families(evaluation, [sft, *ordered, *baselines])
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
                baselines=baselines, order=ordered, pairs=pairs_mode, families=families,
                seeds=seeds)


def _check_families(evaluation: dict[str, Any], models: list[str]
                    ) -> tuple[str, dict[str, list[str]]]:
    """`evaluation.pairs` and `evaluation.families` must come together, with known models."""
    pairs_mode = evaluation.get("pairs", "vs_baseline")
    if pairs_mode == "families" and not evaluation.get("families"):
        raise PlanError("evaluation.families: `evaluation.pairs: families` needs "
                        "`evaluation.families: {name: [model, ...]}`")
    if "families" in evaluation and pairs_mode != "families":
        raise PlanError(f"evaluation.families: only used with `evaluation.pairs: families` "
                        f"(pairs is {pairs_mode!r}); set it or remove `families`")
    families = {name: list(members) for name, members in evaluation.get("families", {}).items()}
    for name, members in families.items():
        unknown = [m for m in members if m not in models]
        if unknown:
            raise PlanError(f"evaluation.families.{name}: unknown model(s) {unknown} "
                            f"(plan models: {models})")
    return pairs_mode, families


#: characters per token assumed for the judge template and prompts: conservative for
#: English text (GPT-4's tokenizers average about 4), so token counts are overestimated
CHARS_PER_TOKEN = 3.0
ORDERS = 2  # every pair is judged with each answer first


def judgment_count(n_pairs: int, n_prompts: int, repetitions: int) -> int:
    """Judgments of one prompt set: pairs x prompts x 2 orders x repetitions."""
    return n_pairs * n_prompts * ORDERS * repetitions


def estimated_input_tokens(template_chars: int, max_new_tokens: int, prompt_chars: int = 0
                           ) -> int:
    """Upper-bound input tokens of one judgment: the template and the question at
    CHARS_PER_TOKEN, plus both answers at the generation cap (`max_new_tokens`)."""
    return math.ceil((template_chars + prompt_chars) / CHARS_PER_TOKEN) + 2 * max_new_tokens


def estimated_cost(judgments: int, input_tokens: int, max_tokens: int,
                   price_input_per_1m: float, price_output_per_1m: float) -> float:
    """USD for `judgments` requests of `input_tokens` in and at most `max_tokens` out."""
    return judgments * (input_tokens * price_input_per_1m
                        + max_tokens * price_output_per_1m) / 1e6


def _openai_estimate(judge: dict[str, Any], criterion: str, max_new_tokens: int,
                     prompt_chars: int) -> tuple[int, int, float | None, float | None, str]:
    """(input tokens, max output tokens, USD in, USD out per 1M, model) of one judgment,
    read from the judge's own config class so its defaults are the ones applied."""
    from sacpo_steps.judges.openai import OpenAIJudgeConfig, load_template

    cfg = OpenAIJudgeConfig.from_dict(judge)
    template = load_template(criterion, cfg.format, (cfg.templates or {}).get(criterion))
    suffix = cfg.user_suffix()  # what the judge appends to each user message
    price_in, price_out = cfg.prices()
    tokens_in = estimated_input_tokens(len(template.text) + len(suffix), max_new_tokens,
                                       prompt_chars)
    return tokens_in, int(cfg.output_cap()), price_in, price_out, cfg.model


def judgment_report(plan: Plan, evaluation: dict[str, Any],
                    prompts: dict[str, tuple[int | None, str, int]]) -> list[str]:
    """Lines saying how many judgments the run makes and, for openai judges, an upper
    bound on their cost. `prompts[name]` = (prompt count or None, where it comes from,
    longest prompt in characters, 0 if unknown). Every seed judges its own answers."""
    seeds = len(plan.seeds)
    pairs = plan.judged_pairs()
    n_pairs = len(pairs)
    vs_base = sum(1 for _, opponent in pairs if opponent == plan.baseline)
    max_new = evaluation["generation"]["max_new_tokens"]
    lines = [f"judge requests (evaluation.pairs: {plan.pairs}): {n_pairs} distinct pairs, "
             f"{vs_base} of them against the baseline {plan.baseline!r}"]
    unjudged = plan.unjudged()
    if unjudged:
        lines.append(f"  not in any pair, so neither generated nor judged: {unjudged}")
    total, per_prompt, cost, priced, unpriced = 0, [], 0.0, False, False
    for name, ps in evaluation["prompt_sets"].items():
        judge = judge_for(evaluation, name)
        reps = judge.get("repetitions", 1)
        count, source, prompt_chars = prompts[name]
        head = f"  {name}: {n_pairs} pairs x "
        tail = f"{ORDERS} orders x {reps} repetition(s)"
        if seeds > 1:
            tail += f" x {seeds} seeds"
        if count is None:
            n = judgment_count(n_pairs, 1, reps) * seeds
            per_prompt.append(f"{n:,} per {name} prompt")
            text = f"{head}{tail} = {n:,} judgments per prompt (prompt count {source})"
        else:
            n = judgment_count(n_pairs, count, reps) * seeds
            total += n
            text = f"{head}{count} prompts ({source}) x {tail} = {n:,} judgments"
        if judge["backend"] != "openai":
            lines.append(f"{text}; {judge['backend']} judge, no API cost")
            continue
        tokens_in, tokens_out, price_in, price_out, model = _openai_estimate(
            judge, ps["criterion"], max_new, prompt_chars)
        if price_in is None or price_out is None:
            unpriced = True
            text += (f"; {model}: no price known (set price_input_per_1m and "
                     f"price_output_per_1m), no cost estimate")
        else:
            usd = estimated_cost(n, tokens_in, tokens_out, price_in, price_out)
            if count is not None:
                cost, priced = cost + usd, True
            text += (f"; {model}: <= {tokens_in:,} input tokens x ${price_in:g}/1M + "
                     f"<= {tokens_out:,} output tokens x ${price_out:g}/1M per judgment "
                     f"-> <= ${usd:,.2f}{' per prompt' if count is None else ''}")
        lines.append(text)
    if not per_prompt:
        summary = f"  total: {total:,} judgments"
    elif total:
        summary = (f"  total: {total:,} judgments for the prompt sets of known size, plus "
                   f"{', '.join(per_prompt)} (count unknown until the set exists)")
    else:
        summary = (f"  total: {', '.join(per_prompt)} (prompt counts unknown until the sets "
                   f"exist)")
    if priced:
        summary += f"; estimated cost <= ${cost:,.2f}"
        if per_prompt:
            summary += " for those sets"
        if unpriced:
            summary += ", without the judges of unknown price"
        bound = (f"an upper bound: both answers at the max_new_tokens cap ({max_new}), every "
                 f"reply at max_tokens, the template")
        if all(p[2] for p in prompts.values()):
            bound += f" and the longest question at {CHARS_PER_TOKEN:g} characters per token"
        else:
            bound += (f" at {CHARS_PER_TOKEN:g} characters per token; the question text is "
                      f"not counted until the prompts are fetched")
        summary += f" ({bound})"
    lines.append(summary)
    return lines


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


def load_plan(config: dict[str, Any], *, source: str = "config",
              base_dir: str | Path = WORKFLOW_ROOT) -> Plan:
    """Resolve `extends`, validate (filling defaults) and expand a config; the config
    dict is updated in place, so the workflow's rules read the resolved one."""
    if "extends" in config:
        resolved = resolve_extends(config, base_dir)
        config.clear()
        config.update(resolved)
    validate_config(config, source=source)
    return build_plan(config)


def to_json(obj: Any) -> str:
    """Canonical JSON for rule params: equal content gives equal text (stable reruns)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
