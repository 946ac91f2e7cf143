"""The experiment plan, in three parts: loading -> graph -> rules.

`loading` resolves `extends:`, renames deprecated keys, validates against the schema
and fills its defaults; `graph` builds the models and their lineage and refuses what
cannot run; `rules` answers what each Snakemake rule asks (paths, params, inputs,
resources). The workflow imports this package; nothing in the package imports it
back, except the start-up judgment report beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sacpo_steps.plan.graph import Experiment, MergeNode, Node, build_graph, judge_for
from sacpo_steps.plan.loading import (
    PlanError,
    config_schema,
    load_config,
    migrate_config,
    resolve_extends,
    to_json,
    validate_config,
)
from sacpo_steps.plan.rules import Plan, build_plan

#: a clone's root: where `extends: config/config.yaml` is found when the config's own
#: folder has no such file
WORKFLOW_ROOT = Path(__file__).resolve().parents[2]

__all__ = [
    "WORKFLOW_ROOT", "Experiment", "MergeNode", "Node", "Plan", "PlanError", "build_graph",
    "build_plan", "config_schema", "judge_for", "load_config", "load_plan", "migrate_config",
    "resolve_extends", "to_json", "validate_config",
]


def load_plan(config: dict[str, Any], *, source: str = "config",
              base_dir: str | Path = WORKFLOW_ROOT,
              config_dir: str | Path | None = None) -> Plan:
    """Load a config (in place: the workflow's rules read the resolved one) and plan it."""
    load_config(config, source=source, base_dir=base_dir, config_dir=config_dir)
    return build_plan(config)
