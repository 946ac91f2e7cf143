"""Source hashes of steps, for the rules' `params`.

Snakemake's code trigger sees only a rule's own shell text, not this package.
Each rule therefore carries the hash of the modules its step imports (followed
transitively inside the package), so editing a step reruns exactly its jobs.

Code only: package data is not hashed here. A judge prompt template enters the params
of the jobs that render it (`Plan.judge_templates`), so editing one reruns exactly
those, and no Snakemake call reads the templates to hash a step.

Every Snakemake call (a no-op run, `--list-rules`) hashes every step, so the search for
imports is cheap: each package file is parsed at most once per process, only its
statements are searched, and with `use_import_cache` (the workflow keeps one under
.snakemake/) a file is parsed again only when its content changed, its sha256 being the
cache key. The hashes themselves always read the files.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # sacpo_steps/, this file is in core/
PACKAGE = PACKAGE_DIR.name


@cache
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


#: the fields of a statement (or except handler, match case) that hold statements: an
#: import is a statement, so the search never enters an expression
_BLOCKS = ("body", "orelse", "finalbody", "handlers", "cases")


def _statements(nodes: list[ast.AST]) -> Iterator[ast.AST]:
    """Every statement in `nodes` and the blocks nested in them (functions, classes,
    `if TYPE_CHECKING:`, try/except, ...), at any depth."""
    todo = list(nodes)
    while todo:
        node = todo.pop()
        yield node
        for name in _BLOCKS:
            todo.extend(getattr(node, name, ()))


@cache
def _imports_in(source: str) -> frozenset[str]:
    """The package modules a source text imports (absolute imports only). Cached by the
    text itself, so a file edited while the process runs is parsed again."""
    found: set[str] = set()
    for node in _statements(ast.parse(source).body):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from sacpo_steps.evaluation.judges import rule` imports a submodule
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return frozenset(name for name in found if name.split(".")[0] == PACKAGE)


class _ImportCache:
    """What each package file imports, by its path in the package and its content's
    sha256, kept in a JSON file between processes; a changed file misses."""

    FORMAT = 1

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files: dict[str, Any] = {}
        self.changed = False
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # none yet, or unreadable: parse every file, then write a new one
        if isinstance(data, dict) and data.get("format") == self.FORMAT and \
                data.get("package") == PACKAGE and isinstance(data.get("files"), dict):
            self.files = data["files"]

    def get(self, name: str, digest: str) -> frozenset[str] | None:
        entry = self.files.get(name)
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == digest and \
                isinstance(entry[1], list):
            return frozenset(entry[1])
        return None

    def put(self, name: str, digest: str, found: frozenset[str]) -> None:
        self.files[name] = [digest, sorted(found)]
        self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        self.changed = False
        data = {"format": self.FORMAT, "package": PACKAGE, "files": self.files}
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
            os.replace(tmp, self.path)  # a concurrent reader sees the old file or the new
        except OSError:
            tmp.unlink(missing_ok=True)  # a read-only folder: parse again next time


_cache: _ImportCache | None = None


def use_import_cache(path: str | Path | None) -> None:
    """Keep the import search's results in `path` (None: in memory only)."""
    global _cache
    _cache = None if path is None else _ImportCache(Path(path))


def _imports(path: Path) -> set[str]:
    source = path.read_bytes()
    if _cache is None:
        return set(_imports_in(source.decode("utf-8")))
    name = path.relative_to(PACKAGE_DIR).as_posix()
    digest = hashlib.sha256(source).hexdigest()
    found = _cache.get(name, digest)
    if found is None:
        found = _imports_in(source.decode("utf-8"))
        _cache.put(name, digest, found)
    return set(found)


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
    if _cache is not None:
        _cache.save()
    return tuple(sorted(set(seen.values())))


def source_hash(module: str) -> str:
    """A short hash of the source of `module` and the package modules it imports (code
    only: no package data such as the judge prompt templates)."""
    digest = hashlib.sha256()
    closure = module_closure(module)
    if not closure:  # a moved or misspelt module would hash nothing and rerun nothing
        raise ValueError(f"{module} is not a module of the {PACKAGE} package")
    for path in closure:
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]
