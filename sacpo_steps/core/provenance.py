"""Source hashes of steps, for the rules' `params`.

Snakemake's code trigger sees only a rule's own shell text, not this package.
Each rule therefore carries the hash of the modules its step imports (followed
transitively inside the package), so editing a step reruns exactly its jobs.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # sacpo_steps/, this file is in core/
PACKAGE = PACKAGE_DIR.name


def _module_file(module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from sacpo_steps.evaluation.judges import rule` imports a submodule
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] == PACKAGE}


@cache
def module_closure(module: str) -> tuple[Path, ...]:
    """The package files `module` depends on, itself included, sorted."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        todo.extend(_imports(path))
    return tuple(sorted(set(seen.values())))


DATA_DIRS = ("prompts",)  # package data that changes a step's behaviour (judge prompts)


def data_files(modules: tuple[Path, ...]) -> list[Path]:
    """Files in data folders (e.g. judges/prompts/) beside the modules of a closure."""
    found: set[Path] = set()
    for path in modules:
        for name in DATA_DIRS:
            folder = path.parent / name
            if folder.is_dir():
                found.update(p for p in folder.rglob("*") if p.is_file())
    return sorted(found)


def source_hash(module: str) -> str:
    """A short hash of the source of `module`, the package modules it imports and
    their data files (judge prompt templates)."""
    digest = hashlib.sha256()
    closure = module_closure(module)
    if not closure:  # a moved or misspelt module would hash nothing and rerun nothing
        raise ValueError(f"{module} is not a module of the {PACKAGE} package")
    for path in (*closure, *data_files(closure)):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]
