"""`python -m sacpo_steps <step> ...`: one entry point; heavy imports only where needed."""

from __future__ import annotations

import importlib
import logging
import sys

from sacpo_steps.errors import InputError

# step name -> module with a `main(argv)` function
STEPS = {
    "demo_world": "sacpo_steps.demo_world",
    "download": "sacpo_steps.download",
    "preference_data": "sacpo_steps.preference_data",
    "prompt_set": "sacpo_steps.prompt_sets",
    "sft_checkpoint": "sacpo_steps.sft",
    "align": "sacpo_steps.align",
    "merge": "sacpo_steps.merge",
    "target_search": "sacpo_steps.target_search",
    "generate": "sacpo_steps.generate",
    "judge": "sacpo_steps.judge",
    "winrate": "sacpo_steps.winrate",
    "elo": "sacpo_steps.elo",
    "figures": "sacpo_steps.figures",
    "across_seeds": "sacpo_steps.across_seeds",
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in STEPS:
        names = ", ".join(STEPS)
        print(f"usage: python -m sacpo_steps <step> [options]\nsteps: {names}", file=sys.stderr)
        sys.exit(0 if argv and argv[0] in {"-h", "--help"} else 2)
    step, rest = argv[0], argv[1:]
    module = importlib.import_module(STEPS[step])
    try:
        module.main(rest)
    except InputError as exc:
        logging.getLogger("sacpo").error("%s", exc)
        if not logging.getLogger().handlers:
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
