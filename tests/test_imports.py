"""The package's import graph, read from the source: no cycles, one-way layers, and
package imports inside functions only where deferring a heavy import is the point."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

import sacpo_steps
from sacpo_steps.core.provenance import PACKAGE_DIR

PACKAGE = "sacpo_steps"
#: libraries slow enough to import that a module may defer importing them
HEAVY = {"torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes",
         "matplotlib", "pandas", "numpy", "scipy", "httpx", "openai", "safetensors",
         "sklearn"}
#: "sacpo_steps.x.y:Name", the way registries name what they import at run time
BY_NAME = re.compile(rf"^({PACKAGE}(?:\.\w+)+):\w+$")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines under `if TYPE_CHECKING:`: never executed, so no edge of the graph."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def _target(name: str) -> str | None:
    """The package module an import of `name` runs (a submodule, else its package)."""
    while name:
        if name in modules():
            return name
        name = name.rpartition(".")[0]
    return None


@cache
def imports_of(module: str) -> tuple[tuple[str, int, bool, str], ...]:
    """(imported module, line, inside a function, how) for every import of the package's
    own modules that runs, the ones registries make by name included."""
    path = modules()[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    local: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    local.add(sub.lineno)
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = BY_NAME.match(node.value)
            if match and _target(match.group(1)):
                found.append((_target(match.group(1)), node.lineno, False, "by name"))
            continue
        if not names or node.lineno in skip:
            continue
        for name in names:
            if name.split(".")[0] == PACKAGE and _target(name):
                found.append((_target(name), node.lineno, node.lineno in local, "import"))
    return tuple(sorted(set(found)))


def graph() -> dict[str, set[str]]:
    return {m: {t for t, *_ in imports_of(m) if t != m} for m in modules()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> int:
    """The module's place in `sacpo_steps.LAYERS`; `sacpo_steps` and `sacpo_steps.steps`
    (names only) come first, the `python -m` entry point last."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "steps":
        return -1
    if parts[1] == "__main__":
        return len(sacpo_steps.LAYERS)
    return sacpo_steps.LAYERS.index(parts[1])


def test_the_graph_sees_imports_inside_functions_and_by_name():
    """The reader itself: a cycle hidden in a function or a registry string is found."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
    registry = {t for t, _, _, how in imports_of("sacpo_steps.evaluation.judges.registry")
                if how == "by name"}
    assert {"sacpo_steps.evaluation.judges.openai", "sacpo_steps.evaluation.judges.rule",
            "sacpo_steps.evaluation.judges.score_model"} <= registry
    main = imports_of("sacpo_steps.__main__")
    assert any(t == "sacpo_steps.steps" for t, *_ in main)


def test_the_package_has_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_every_subpackage_imports_only_from_those_before_it():
    assert {m.split(".")[1] for m in modules() if m.count(".") >= 2} == set(sacpo_steps.LAYERS)
    wrong = [f"{m} (line {line}) imports {t}"
             for m in modules() for t, line, _, _ in imports_of(m)
             if layer(t) > layer(m)]
    assert not wrong, "imports against the layer order " \
        f"{' -> '.join(sacpo_steps.LAYERS)}:\n" + "\n".join(wrong)


def _heavy_at_import(module: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether importing `module` imports a heavy library (directly or through the
    package's own module-level imports)."""
    tree = ast.parse(modules()[module].read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] in HEAVY
                                                for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.module and \
                node.module.split(".")[0] in HEAVY:
            return True
    return any(_heavy_at_import(t, seen | {module}) for t, _, inside, how in imports_of(module)
               if not inside and how == "import" and t not in seen | {module})


def test_package_imports_inside_functions_defer_something_heavy():
    """An import of the package's own module inside a function must defer a heavy
    library (else it only hides a dependency) and say so in a comment beside it."""
    bad = []
    for m, path in modules().items():
        lines = path.read_text(encoding="utf-8").split("\n")
        for target, line, inside, how in imports_of(m):
            if not inside or how != "import":
                continue
            beside = lines[line - 1] + lines[line - 2]
            if not _heavy_at_import(target) or "#" not in beside:
                bad.append(f"{m} line {line}: {target}")
    assert not bad, "package imports inside functions without a heavy import to defer " \
        "or without a reason beside them:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", ["sacpo_steps.plan", "sacpo_steps.steps",
                                    "sacpo_steps.core.provenance"])
def test_what_snakemake_imports_on_every_call_stays_light(module):
    """The workflow imports these at every Snakemake call (`--list-rules` included)."""
    assert not _heavy_at_import(module), f"{module} imports a heavy library"
