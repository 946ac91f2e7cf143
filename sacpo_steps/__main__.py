"""`python -m sacpo_steps <step> ...`: one entry point; heavy imports only where needed."""

from __future__ import annotations

import importlib
import logging
import sys

from sacpo_steps import reproducibility
from sacpo_steps.errors import InputError

#: every step; step X is `sacpo_steps.X.main(argv)`, and the Snakemake rule that runs
#: it is named X too (merge rules: merge_<pair>; figures_across_seeds runs figures)
STEPS = (
    "demo_world",
    "download_dataset",
    "download_model",
    "preference_data",
    "fetch_prompt_set",
    "sft_checkpoint",
    "ref_logps",
    "align",
    "merge",
    "target_search",
    "generate",
    "constant_answers",
    "judge",
    "winrate",
    "elo",
    "figures",
    "across_seeds",
)
#: commands for users that no rule runs: what is stale (lineage), and a fingerprint of
#: an experiment's tables with the machine that made them (fingerprint)
TOOLS = ("lineage", "fingerprint")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in STEPS + TOOLS:
        print(f"usage: python -m sacpo_steps <step> [options]\nsteps: {', '.join(STEPS)}\n"
              f"tools: {', '.join(TOOLS)}", file=sys.stderr)
        sys.exit(0 if argv and argv[0] in {"-h", "--help"} else 2)
    step, rest = argv[0], argv[1:]
    # kernel pinning must be in the environment before torch or numpy loads
    reproducibility.apply()
    module = importlib.import_module(f"sacpo_steps.{step}")
    try:
        reproducibility.deterministic_torch()
        module.main(rest)
    except InputError as exc:
        logging.getLogger("sacpo").error("%s", exc)
        if not logging.getLogger().handlers:
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
