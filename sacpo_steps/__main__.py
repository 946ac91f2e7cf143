"""`python -m sacpo_steps <step> ...`: one entry point; heavy imports only where needed."""

from __future__ import annotations

import importlib
import logging
import sys

from sacpo_steps.core import reproducibility
from sacpo_steps.core.errors import InputError
from sacpo_steps.steps import STEPS, TOOLS, module_of


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in {**STEPS, **TOOLS}:
        print(f"usage: python -m sacpo_steps <step> [options]\nsteps: {', '.join(STEPS)}\n"
              f"tools: {', '.join(TOOLS)}", file=sys.stderr)
        sys.exit(0 if argv and argv[0] in {"-h", "--help"} else 2)
    step, rest = argv[0], argv[1:]
    # kernel pinning must be in the environment before torch or numpy loads
    reproducibility.apply()
    module = importlib.import_module(module_of(step))
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
