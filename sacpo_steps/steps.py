"""The steps and tools of `python -m sacpo_steps <name>`, and the module behind each.

Step X is `<module>.main(argv)`, and the Snakemake rule that runs it is named X too
(merge rules: merge_<pair>; figures_across_seeds runs figures). Its rule's `code`
param hashes that module and what it imports, so editing a step reruns its jobs.
Light on purpose: the workflow reads it on every Snakemake call.
"""

from __future__ import annotations

STEPS: dict[str, str] = {
    "demo_world": "sacpo_steps.data.demo_world",
    "download_dataset": "sacpo_steps.data.download_dataset",
    "download_model": "sacpo_steps.models.download_model",
    "preference_data": "sacpo_steps.data.preference_data",
    "fetch_prompt_set": "sacpo_steps.data.fetch_prompt_set",
    "sft_checkpoint": "sacpo_steps.models.sft_checkpoint",
    "ref_logps": "sacpo_steps.training.ref_logps",
    "align": "sacpo_steps.training.align",
    "merge": "sacpo_steps.models.merge",
    "target_search": "sacpo_steps.research.target_search",
    "generate": "sacpo_steps.evaluation.generate",
    "constant_answers": "sacpo_steps.evaluation.constant_answers",
    "judge": "sacpo_steps.evaluation.judge",
    "winrate": "sacpo_steps.evaluation.winrate",
    "elo": "sacpo_steps.reporting.elo",
    "figures": "sacpo_steps.reporting.figures",
    "across_seeds": "sacpo_steps.reporting.across_seeds",
    "comparison": "sacpo_steps.reporting.comparison",
}

#: commands for users that no rule runs: what is stale (lineage), and a fingerprint of
#: an experiment's tables with the machine that made them (fingerprint)
TOOLS: dict[str, str] = {
    "lineage": "sacpo_steps.core.lineage",
    "fingerprint": "sacpo_steps.reporting.fingerprint",
}


def module_of(name: str) -> str:
    """The module that runs step or tool `name` (KeyError names the known ones)."""
    try:
        return {**STEPS, **TOOLS}[name]
    except KeyError:
        raise KeyError(f"no step or tool {name!r}; steps: {', '.join(STEPS)}; "
                       f"tools: {', '.join(TOOLS)}") from None
