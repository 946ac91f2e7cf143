"""`python -m sacpo_steps <step> ...`: one entry point; heavy imports only where needed."""

from __future__ import annotations

import importlib
import logging
import subprocess
import sys
from pathlib import Path

import sacpo_steps
from sacpo_steps.core import reproducibility
from sacpo_steps.core.errors import InputError
from sacpo_steps.steps import STEPS, TOOLS, module_of


def version_line() -> str:
    """What this copy runs: the version, the git commit when the package sits in a git
    checkout (`-dirty` with uncommitted changes), and where the package is."""
    package = Path(sacpo_steps.__file__).resolve().parent
    line = f"sacpo-steps {sacpo_steps.__version__}"
    if (package.parent / ".git").exists():
        try:
            described = subprocess.run(
                ["git", "-C", str(package.parent), "describe", "--always", "--dirty"],
                capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            described = None
        if described is not None and described.returncode == 0 and described.stdout.strip():
            line += f" (git {described.stdout.strip()})"
    return f"{line} at {package}"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["-V"]):
        print(version_line())
        return
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in {**STEPS, **TOOLS}:
        print(f"usage: python -m sacpo_steps <step> [options] | --version\n"
              f"steps: {', '.join(STEPS)}\ntools: {', '.join(TOOLS)}", file=sys.stderr)
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
