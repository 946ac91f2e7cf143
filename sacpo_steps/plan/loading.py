"""Loading a config: `extends:`, deprecated keys, the schema and its defaults.

The first of the plan's three parts (loading -> graph -> rules): it turns the YAML a
user wrote into the validated, default-filled dict the experiment graph is built
from, and reports each problem with the config path of its field.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sacpo_steps.core import validation_cache
from sacpo_steps.core.errors import InputError
from sacpo_steps.core.schema import load_config_schema as load_schema
from sacpo_steps.data import formats as data_formats
from sacpo_steps.evaluation.judges import registry as judge_registry
from sacpo_steps.training import losses
from sacpo_steps.training.settings import migrate_training


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
    names the demo); chains are followed, cycles refused. The file paths each file
    names are resolved against its own folder the same way (`resolve_paths`)."""
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
        # its file paths are relative to its own folder, before keys of other folders mix
        resolve_paths(base, path.parent, base_dir=base_dir)
        override = {k: v for k, v in config.items() if k != "extends"}
        config = _deep_merge(base, override)
    return config


# ---- file paths a config names ---------------------------------------------------------


def _judge_path_keys() -> tuple[set[str], set[str], set[str]]:
    """The judge settings that name files or folders, from the judge registry: keys whose
    value is a path (`reward_model`, ...), keys mapping criterion -> path (`templates`),
    and the values of the latter that name packaged templates instead of files."""
    inputs: set[str] = set()
    mappings: set[str] = set()
    packaged: set[str] = set()
    for entry in judge_registry.BACKENDS.values():
        inputs.update(entry.inputs)
        if entry.templates:
            mappings.add(entry.templates)
            packaged.update(entry.packaged_templates)
    return inputs, mappings, packaged


def path_fields(config: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], str, bool]]:
    """Every value of the config that names a file or folder the workflow reads, as
    (config path of the field, the mapping holding it, its key there, whether the config
    uses it): `sft.local.path`, a local preference source's, baseline's or prompt set's
    `path`, `evaluation.figures.model_info`, and the judge settings the judge registry
    declares as files (`reward_model`, `cost_model`, a criterion's own template in
    `templates`), in `evaluation.judge` and each prompt set's `judge`. A value that is
    not a string (unset, or for the schema to refuse) is left out."""

    def section(holder: Any, *keys: str) -> dict[str, Any]:
        for key in keys:
            holder = holder.get(key) if isinstance(holder, dict) else None
        return holder if isinstance(holder, dict) else {}

    def named(holder: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        return [(name, spec) for name, spec in holder.items() if isinstance(spec, dict)]

    def local(spec: dict[str, Any], default: str | None = None) -> bool:
        return spec.get("source", default) == "local"

    fields: list[tuple[str, dict[str, Any], str, bool]] = [
        ("sft.local.path", section(config, "sft", "local"), "path",
         local(section(config, "sft")))]
    for name, spec in named(section(config, "preference_sources")):
        fields.append((f"preference_sources.{name}.path", spec, "path", local(spec)))
    for name, spec in named(section(config, "baselines")):
        fields.append((f"baselines.{name}.path", spec, "path", local(spec)))
    prompt_sets = named(section(config, "evaluation", "prompt_sets"))
    for name, spec in prompt_sets:
        fields.append((f"evaluation.prompt_sets.{name}.path", spec, "path",
                       local(spec, "local")))
    fields.append(("evaluation.figures.model_info", section(config, "evaluation", "figures"),
                   "model_info", True))
    inputs, mappings, packaged = _judge_path_keys()
    judges = [("evaluation.judge", section(config, "evaluation", "judge"))]
    judges += [(f"evaluation.prompt_sets.{name}.judge", section(spec, "judge"))
               for name, spec in prompt_sets]
    for where, judge in judges:
        fields += [(f"{where}.{key}", judge, key, True) for key in sorted(inputs)]
        for key in sorted(mappings):
            own = section(judge, key)
            fields += [(f"{where}.{key}.{criterion}", own, criterion, True)
                       for criterion, value in own.items()
                       if isinstance(value, str) and value not in packaged]
    for where, holder, key, used in fields:
        if isinstance(holder.get(key), str):
            yield where, holder, key, used


def _same(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def locate(value: str, folder: str | Path | None, base_dir: str | Path | None = None) -> str:
    """A path a config file in `folder` names, as the workflow is to read it: relative
    to that folder when it exists there, else relative to the working directory as
    given, else under `base_dir` (the clone's root) when it exists there; absolute paths
    and paths found nowhere are returned as given. A path found in `folder` or
    `base_dir` is written relative to the working directory when it lies below it
    (stable params), absolute otherwise."""
    path = Path(value)
    if path.is_absolute():
        return value
    for root in (folder, None, base_dir):
        candidate = path if root is None else Path(root) / path
        if not candidate.exists():
            continue
        if root is None or _same(candidate, path):
            return value  # as the working directory reads it: unchanged
        absolute = os.path.abspath(candidate)
        relative = os.path.relpath(absolute, os.getcwd())
        return absolute if relative.split(os.sep)[0] == os.pardir else relative
    return value


def resolve_paths(config: dict[str, Any], folder: str | Path | None,
                  base_dir: str | Path | None = None) -> dict[str, Any]:
    """Resolve, in place, every file or folder the config names (`path_fields`) as
    `locate` does: `folder` is the folder of the config file that names them, as for
    `extends:`. Returns the config."""
    for _, holder, key, _ in list(path_fields(config)):
        holder[key] = locate(holder[key], folder, base_dir)
    return config


def check_paths(config: dict[str, Any]) -> None:
    """Every file or folder the config uses exists (after `resolve_paths`), or a
    PlanError names each missing one by its config key."""
    missing = [f"  {where}: no file or folder {holder[key]!r}"
               for where, holder, key, used in path_fields(config)
               if used and not Path(holder[key]).exists()]
    if missing:
        raise PlanError(
            "missing input files (a relative path is looked up in the folder of the config "
            f"file that names it, then in the working directory {os.getcwd()}, then in the "
            "workflow's folder):\n" + "\n".join(missing))


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


def schema_error_path(error) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def validate_config(config: dict[str, Any], *, source: str = "config",
                    schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check the config against the JSON schema and fill its defaults (in place).
    A config that passed before is not checked again where the workflow keeps a
    `validation_cache`."""
    schema = schema or config_schema()
    key = validation_cache.key("config", config, schema)
    if not validation_cache.passed(key):
        _check_against_schema(config, schema, source)
        validation_cache.remember(key)
    _apply_defaults(config, schema, schema)
    return config


def _check_against_schema(config: dict[str, Any], schema: dict[str, Any],
                          source: str) -> None:
    import jsonschema  # deferred: ~60 ms, and a remembered config needs no validator

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
            lines.append(f"  {schema_error_path(err)}: {msg}")
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise PlanError(f"invalid configuration ({source}):\n" + "\n".join(lines) + more)


def load_config(config: dict[str, Any], *, source: str = "config",
                base_dir: str | Path | None = None,
                config_dir: str | Path | None = None) -> dict[str, Any]:
    """Resolve `extends` and the file paths the config names (against `config_dir`,
    the config file's folder, then the working directory, then `base_dir`; each file of
    an `extends` chain against its own folder), rename deprecated keys and validate,
    filling the defaults; the dict is updated in place, so the workflow's rules read the
    resolved config. With `config_dir` (a config read from a file, as the workflow
    does) every file or folder the config uses must exist: a missing one is an error
    that names its config key."""
    if config_dir is not None:
        resolve_paths(config, config_dir, base_dir)
    if "extends" in config:
        resolved = resolve_extends(config, base_dir if base_dir is not None else ".",
                                   config_dir)
        config.clear()
        config.update(resolved)
    for line in migrate_config(config):
        print(f"deprecated ({source}): {line}", file=sys.stderr)
    _check_judge_sections(config)
    validate_config(config, source=source)
    if config_dir is not None:
        check_paths(config)
    return config


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
