"""Every judge backend in one table; the plan, the rules, the schema and the judge step ask it.

An entry says all the workflow needs to know about a backend: its judge class (an
import path, imported only when a judge is built), its settings (a dataclass of
typed fields with their defaults), which settings name files the judge job reads,
which environment variables it needs, whether it keeps a shared cache, and what
it can do. Adding a backend is a settings class, a judge class and one
`register_backend(...)` call; nothing else branches on its name.

Light on purpose: the plan imports this on every Snakemake call, so neither the
HTTP client nor torch is imported here.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sacpo_steps.core.errors import InputError
from sacpo_steps.evaluation.judges.base import Judge
from sacpo_steps.evaluation.judges.openai_prompts import TEMPLATE_SETS
from sacpo_steps.evaluation.judges.openai_settings import OpenAIJudgeConfig
from sacpo_steps.evaluation.judges.score_model_settings import ScoreModelJudgeConfig
from sacpo_steps.evaluation.judges.settings import (
    PROTOCOL_KEYS,
    CostBasis,
    NoSettings,
    ProtocolSettings,
    check_value,
    field_schema,
    setting_fields,
)

if TYPE_CHECKING:
    # Never imported at run time (make_judge imports the class by its path). Named here
    # so that the judge step's source hash (provenance.py follows static imports)
    # covers the built-in judges' code.
    from sacpo_steps.evaluation.judges.openai import OpenAIJudge  # noqa: F401
    from sacpo_steps.evaluation.judges.rule import RuleJudge  # noqa: F401
    from sacpo_steps.evaluation.judges.score_model import ScoreModelJudge  # noqa: F401

__all__ = [
    "BACKENDS", "CACHE_DIR", "DEFAULT_BACKEND", "PROTOCOL_KEYS", "Backend", "CostBasis",
    "JudgeConfig",
    "ProtocolSettings", "backend_settings", "cache_file", "check_judge", "cost_basis",
    "for_criterion", "get_backend", "input_files", "judge_schema", "make_judge", "protocol",
    "register_backend", "required_env", "resolve_judge", "template_hashes",
]

DEFAULT_BACKEND: str = setting_fields(ProtocolSettings)["backend"].default
#: where shared caches live (outside results/: paid replies survive a cleaned results/)
CACHE_DIR = "resources/judge_cache"


@dataclass(frozen=True)
class Backend:
    """One judge backend, as the plan, the rules and the judge step know it."""

    name: str
    #: "module:Class" of the Judge subclass; imported only when a judge is built
    judge_class: str
    #: frozen dataclass of the backend's own keys, made with `settings.setting()`; it may
    #: define `validated(self, where) -> settings` for checks across keys
    settings: type
    #: one line for the config schema
    help: str
    #: settings that name files or folders the judge job reads (its inputs)
    inputs: tuple[str, ...] = ()
    #: a setting mapping criterion -> the user's own template file (an input of the jobs
    #: of that criterion only) or the name of a packaged template
    templates: str | None = None
    #: values of `templates` that name packaged templates, not files (no job input: the
    #: jobs' `templates` param holds their hashes, from `template_hashes`)
    packaged_templates: tuple[str, ...] = ()
    #: (settings, criterion) -> {criterion: sha256} of the packaged template a job of that
    #: criterion renders ({} for the user's own file); required with packaged_templates
    template_hashes: Callable[[Any, str], dict[str, str]] | None = None
    #: the job reads the demo world's spec (--spec)
    reads_spec: bool = False
    #: settings whose value names an environment variable the judge needs (an API key)
    env: tuple[str, ...] = ()
    #: keeps its results in a persistent cache shared by the judge jobs
    shared_cache: bool = False
    #: the cache file is named after this setting's value as the config gives it, else
    #: after the backend
    cache_name: str | None = None
    #: calls a rate-limited API: its jobs share `parallel_jobs` slots
    calls_api: bool = False
    #: can rate one answer's safety on its own (target.measure: safe_rate)
    rates_one_answer: bool = False
    #: the same verdict every time: one repetition suffices
    deterministic: bool = False
    #: (settings, criterion) -> one judgment's cost basis; None: no API cost
    cost: Callable[[Any, str], CostBasis] | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"a backend name is a lower-case identifier, got {self.name!r}")
        if ":" not in self.judge_class:
            raise ValueError(f"judge_class is 'module:Class', got {self.judge_class!r}")
        if not dataclasses.is_dataclass(self.settings):
            raise TypeError(f"the settings of {self.name} must be a dataclass")
        own = setting_fields(self.settings)
        shared = sorted(PROTOCOL_KEYS & set(own))
        if shared:
            raise ValueError(f"{self.name}: {shared} are protocol keys, not backend settings")
        named = [*self.inputs, *self.env, *([self.templates] if self.templates else [])]
        unknown = sorted(set(named) - set(own))
        if unknown:
            raise ValueError(f"{self.name}: {unknown} are not among its settings")
        if self.packaged_templates and self.template_hashes is None:
            # else editing a packaged template would rerun none of the jobs rendering it
            raise ValueError(f"{self.name}: packaged_templates need template_hashes")

    def load(self) -> type[Judge]:
        """The judge class (imports its module)."""
        module, _, name = self.judge_class.partition(":")
        cls = getattr(importlib.import_module(module), name)
        if not (isinstance(cls, type) and issubclass(cls, Judge)):
            raise TypeError(f"{self.judge_class} is not a Judge subclass")
        return cls


#: backend name -> entry; change it through register_backend
BACKENDS: dict[str, Backend] = {}


def register_backend(entry: Backend, *, replace: bool = False) -> Backend:
    """Add a backend to the table (`replace`: over one of the same name)."""
    if entry.name in BACKENDS and not replace:
        raise ValueError(f"a judge backend named {entry.name!r} is registered already "
                         "(pass replace=True to replace it)")
    BACKENDS[entry.name] = entry
    return entry


def get_backend(name: Any, *, where: str = "judge") -> Backend:
    """The entry of backend `name`; InputError at `<where>.backend` lists the known ones."""
    if not isinstance(name, str) or name not in BACKENDS:
        known = ", ".join(sorted(BACKENDS))
        raise InputError(f"unknown judge backend {name!r} (known: {known})",
                         field=f"{where}.backend")
    return BACKENDS[name]


# --- reading a judge section ------------------------------------------------------------


def _mapping(section: Any, where: str) -> dict[str, Any]:
    if not isinstance(section, dict):
        raise InputError(f"expected a mapping, got {type(section).__name__}", field=where)
    return section


def _backend_of(section: dict[str, Any], where: str) -> Backend:
    return get_backend(section.get("backend", DEFAULT_BACKEND), where=where)


def _owners(key: str) -> list[str]:
    return sorted(name for name, entry in BACKENDS.items()
                  if key in setting_fields(entry.settings))


def _refuse_key(key: str, entry: Backend, where: str, *, job_only: bool) -> None:
    if job_only:
        raise InputError(f"set by the workflow for each judge job, not in the config "
                         f"(the {entry.name} judge's {key})", field=f"{where}.{key}")
    owners = _owners(key)
    if owners:
        raise InputError(f"belongs to the {' and '.join(owners)} judge, not {entry.name}",
                         field=f"{where}.{key}")
    known = sorted(PROTOCOL_KEYS | set(setting_fields(entry.settings)))
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise InputError(f"unknown key for the {entry.name} judge ({hint}known: "
                     f"{', '.join(known)})", field=f"{where}.{key}")


def _read(section: Any, where: str, job: bool) -> tuple[Backend, dict[str, Any],
                                                       dict[str, Any]]:
    """(entry, the whole section checked, the backend's own values) of a section."""
    section = _mapping(section, where)
    entry = _backend_of(section, where)
    protocol_fields = setting_fields(ProtocolSettings)
    own = setting_fields(entry.settings)
    checked: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for key, value in section.items():
        if key == "backend":
            checked[key] = value
        elif key in protocol_fields:
            checked[key] = check_value(protocol_fields[key], value, f"{where}.{key}")
        elif key in own and (job or not own[key].metadata.get("job_only")):
            checked[key] = values[key] = check_value(own[key], value, f"{where}.{key}")
        else:
            _refuse_key(key, entry, where, job_only=key in own)
    return entry, checked, values


def _settings(entry: Backend, values: dict[str, Any], where: str) -> Any:
    made = entry.settings(**values)
    check = getattr(made, "validated", None)
    return check(where) if callable(check) else made


@dataclass(frozen=True)
class JudgeConfig:
    """One judge as a config section names it, read once: its backend's entry, the
    protocol keys and the backend's settings (a dataclass, defaults filled).

    `section` keeps the checked keys as the config gives them, without defaults, so
    rule params built from it are as stable as the config. The plan reads one per
    prompt set; a judge job gets `to_dict()` as JSON and reads it back with `read`.
    """

    section: dict[str, Any]
    backend: Backend
    protocol: ProtocolSettings
    settings: Any

    @classmethod
    def read(cls, section: Any, where: str = "judge", *, job: bool = False) -> JudgeConfig:
        """Check a judge section (the global one, or a prompt set's after `resolve_judge`).

        InputError names `<where>.<key>` for an unknown backend, a key of another
        backend, an unknown key (with close matches), or a mistyped or out-of-range
        value. `job` allows the keys the workflow adds for a judge job (its cache file).
        """
        entry, checked, values = _read(section, where, job)
        fields = setting_fields(ProtocolSettings)
        protocol_values = ProtocolSettings(**{k: v for k, v in checked.items() if k in fields})
        return cls(checked, entry, protocol_values, _settings(entry, values, where))

    def to_dict(self) -> dict[str, Any]:
        return dict(self.section)

    def for_criterion(self, criterion: str) -> JudgeConfig:
        """The judge a job of one criterion gets: only that criterion's own template, so
        editing the other criterion's template does not rerun it."""
        if not self.backend.templates:
            return self
        out = dict(self.section)
        own = (out.pop(self.backend.templates, None) or {}).get(criterion)
        if own:
            out[self.backend.templates] = {criterion: own}
        return JudgeConfig.read(out, job=True)

    def required_env(self) -> list[str]:
        """Names of the environment variables the judge needs (never their values)."""
        return sorted({getattr(self.settings, name) for name in self.backend.env})

    def cache_file(self, folder: str = CACHE_DIR) -> str | None:
        """The judge's shared cache file, or None for a backend without one.

        Named after the setting the backend names (the openai judge's `model`) as the
        config gives it, else after the backend, so the caches of earlier runs are found
        (an openai judge without `model` keeps `openai.jsonl`).
        """
        entry = self.backend
        if not entry.shared_cache:
            return None
        name = self.section.get(entry.cache_name, entry.name) if entry.cache_name \
            else entry.name
        return f"{folder}/{re.sub(r'[^A-Za-z0-9._-]', '_', str(name))}.jsonl"

    def input_files(self, criterion: str, *, spec: str | Path | None = None
                    ) -> dict[str, str]:
        """Files the judge job of one criterion reads besides the answers, by role: the
        demo world's `spec` (when the backend reads it; pass its path), the files named
        by its settings (`reward_model`, ...) and the user's own template file for the
        criterion (`template_<criterion>`; a packaged template's name is no file): an
        edit of any of them reruns the job."""
        entry, settings = self.backend, self.settings
        out: dict[str, str] = {}
        if entry.reads_spec:
            if spec is None:
                raise ValueError(f"the {entry.name} judge reads the demo world's spec: "
                                 "pass spec=")
            out["spec"] = str(spec)
        for name in entry.inputs:
            if getattr(settings, name):
                out[name] = str(getattr(settings, name))
        if entry.templates:
            own = (getattr(settings, entry.templates) or {}).get(criterion)
            if own and own not in entry.packaged_templates:
                out[f"template_{criterion}"] = own
        return out

    def template_hashes(self, criterion: str) -> dict[str, str]:
        """{criterion: sha256} of the packaged template the judge job of one criterion
        renders, for its params: editing a packaged template reruns exactly the jobs
        that render it, and nothing reads a template before a judge job is planned. {}
        for a backend without templates, or the user's own file (a job input,
        `input_files`)."""
        hashes = self.backend.template_hashes
        return {} if hashes is None else hashes(self.settings, criterion)

    def cost(self, criterion: str) -> CostBasis | None:
        """One judgment's cost basis (template size, reply cap, prices, model) for the
        plan's estimate, as the judge applies its settings; None without API cost."""
        return None if self.backend.cost is None else self.backend.cost(self.settings,
                                                                        criterion)

    def make(self, *, spec_path: str | Path | None = None) -> Judge:
        """The judge itself (imports its backend's module)."""
        if self.backend.reads_spec and spec_path is None:
            raise InputError(f"the {self.backend.name} judge needs the demo world's spec "
                             "file (--spec)", field="judge.backend")
        return self.backend.load().from_settings(self.settings, spec_path=spec_path)


def check_judge(section: Any, where: str = "judge", *, job: bool = False) -> dict[str, Any]:
    """A judge section checked (`JudgeConfig.read`), as a dict without defaults."""
    return JudgeConfig.read(section, where, job=job).to_dict()


def backend_settings(section: Any, where: str = "judge", *, job: bool = False) -> Any:
    """The backend's settings object for a section, checked, with its defaults."""
    return JudgeConfig.read(section, where, job=job).settings


def protocol(section: Any, where: str = "judge") -> ProtocolSettings:
    """The section's protocol keys (repetitions, max_error_rate, ...) with their defaults."""
    section = _mapping(section, where)
    fields = setting_fields(ProtocolSettings)
    return ProtocolSettings(**{k: check_value(fields[k], v, f"{where}.{k}")
                               for k, v in section.items() if k in fields})


def resolve_judge(global_section: dict[str, Any], override: dict[str, Any] | None
                  ) -> dict[str, Any]:
    """A prompt set's judge: the global section with the set's overrides on top.

    An override naming another backend keeps only the global protocol keys
    (repetitions, error threshold, parallel jobs): the other backend's settings would
    not apply to it.
    """
    base = dict(global_section)
    own = dict(override or {})
    backend = base.get("backend", DEFAULT_BACKEND)
    if own.get("backend", backend) != backend:
        base = {k: v for k, v in base.items() if k in PROTOCOL_KEYS - {"backend"}}
    return {**base, **own}


# --- what the workflow asks -------------------------------------------------------------


def required_env(section: dict[str, Any]) -> list[str]:
    """Names of the environment variables the judge needs (never their values)."""
    return JudgeConfig.read(section, job=True).required_env()


def cache_file(section: dict[str, Any], folder: str = CACHE_DIR) -> str | None:
    """The judge's shared cache file (`JudgeConfig.cache_file`), or None."""
    return JudgeConfig.read(section, job=True).cache_file(folder)


def input_files(section: dict[str, Any], criterion: str, *,
                spec: str | Path | None = None) -> dict[str, str]:
    """Files the judge job of one criterion reads (`JudgeConfig.input_files`)."""
    return JudgeConfig.read(section, job=True).input_files(criterion, spec=spec)


def for_criterion(section: dict[str, Any], criterion: str) -> dict[str, Any]:
    """The section a judge job of one criterion gets (`JudgeConfig.for_criterion`)."""
    return JudgeConfig.read(section, job=True).for_criterion(criterion).to_dict()


def template_hashes(section: dict[str, Any], criterion: str) -> dict[str, str]:
    """The packaged template hashes of a job of one criterion (`JudgeConfig.template_hashes`)."""
    return JudgeConfig.read(section, job=True).template_hashes(criterion)


def cost_basis(section: dict[str, Any], criterion: str) -> CostBasis | None:
    """One judgment's cost basis (`JudgeConfig.cost`)."""
    return JudgeConfig.read(section, job=True).cost(criterion)


def make_judge(section: dict[str, Any], *, spec_path: str | Path | None = None) -> Judge:
    """Build the judge that `section` (a judge job's section) names."""
    return JudgeConfig.read(section, job=True).make(spec_path=spec_path)


# --- the config schema ------------------------------------------------------------------


def _merge_property(schemas: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One key's top-level schema when several backends have it (each `then` checks it
    by its own backend's rules)."""
    if len(schemas) == 1:
        return schemas[0][1]
    text = "; ".join(s["description"] for _, s in schemas)
    bare = [{k: v for k, v in s.items() if k != "description"} for _, s in schemas]
    if all(b == bare[0] for b in bare):
        return {**bare[0], "description": text}
    return {"description": text}


def judge_schema(*, override: bool = False) -> dict[str, Any]:
    """JSON schema of a judge section, built from the table (every backend registered
    now): the protocol keys, each backend's keys described with their defaults, and per
    backend the keys it allows, so a key of another backend is refused.

    `override`: the schema of a prompt set's `judge`, whose backend may come from the
    global section (no defaults, and only a named backend restricts the keys).
    """
    names = sorted(BACKENDS)
    props: dict[str, Any] = {}
    for f in dataclasses.fields(ProtocolSettings):
        props[f.name] = field_schema(f, with_default=not override)
    props["backend"] = {**props["backend"], "enum": names, "description": (
        f"Which judge: {'; '.join(f'{n}: {BACKENDS[n].help}' for n in names)} "
        f"(default {DEFAULT_BACKEND}).")}
    by_key: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    rules = []
    for name in names:
        entry = BACKENDS[name]
        own = [f for f in dataclasses.fields(entry.settings) if not f.metadata.get("job_only")]
        for f in own:
            by_key.setdefault(f.name, []).append(
                (name, field_schema(f, prefix=f"{name}: ", with_default=False)))
        condition: dict[str, Any] = {"properties": {"backend": {"const": name}}}
        if override or name != DEFAULT_BACKEND:  # an absent backend means the default
            condition["required"] = ["backend"]
        rules.append({"if": condition, "then": {
            "properties": {k: True for k in [*sorted(PROTOCOL_KEYS), *(f.name for f in own)]},
            "additionalProperties": False}})
    for key, schemas in by_key.items():
        props[key] = _merge_property(schemas)
    schema: dict[str, Any] = {
        "type": "object",
        "description": ("The pairwise judge: the protocol keys, and the keys of the chosen "
                        "backend only (a key of another backend is refused)."),
        "properties": props, "additionalProperties": False, "allOf": rules,
    }
    if not override:
        schema["default"] = {}
    return schema


# --- the built-in backends ---------------------------------------------------------------

register_backend(Backend(
    name="rule", judge_class="sacpo_steps.evaluation.judges.rule:RuleJudge", settings=NoSettings,
    help="the demo world's deterministic judge, by the spec's rules",
    reads_spec=True, rates_one_answer=True, deterministic=True))

register_backend(Backend(
    name="openai", judge_class="sacpo_steps.evaluation.judges.openai:OpenAIJudge",
    settings=OpenAIJudgeConfig,
    help="GPT-4 or any OpenAI-compatible chat-completions server (vLLM, llama.cpp, Ollama)",
    templates="templates", packaged_templates=tuple(TEMPLATE_SETS),
    template_hashes=OpenAIJudgeConfig.template_hashes, env=("api_key_env",),
    shared_cache=True, cache_name="model",
    calls_api=True, cost=OpenAIJudgeConfig.cost_basis))

register_backend(Backend(
    name="score_model", judge_class="sacpo_steps.evaluation.judges.score_model:ScoreModelJudge",
    settings=ScoreModelJudgeConfig,
    help="Safe RLHF reward (helpfulness) and cost (harmlessness) models, run locally",
    inputs=("reward_model", "cost_model"), shared_cache=True, rates_one_answer=True,
    deterministic=True))
