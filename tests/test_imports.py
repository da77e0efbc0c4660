"""Imports point one way: fedcore <- fedserver, fedclient <- fedlab (and bench); netem knows no federated learning.

Read from the source with `ast`, so a lazy import inside a function counts
as much as one at the top of a file. Cycles are looked for among the files
of the project, on the imports a module runs when it is loaded (those at
module level, outside `if TYPE_CHECKING:`).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedcore", "fedserver", "fedclient", "netem", "fedlab", "bench")
# package -> the project packages it must never import
FORBIDDEN = {
    "fedcore": {"fedserver", "fedclient", "netem", "fedlab", "bench"},
    "fedserver": {"fedclient", "netem", "fedlab", "bench"},
    "fedclient": {"fedserver", "netem", "fedlab", "bench"},
    "netem": {"fedcore", "fedserver", "fedclient", "fedlab", "bench"},
    "fedlab": {"bench"},
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, path: Path, load_time_only: bool) -> set[str]:
    """Project modules `module` imports (each `from X import Y` also names X.Y, in case Y is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            if not load_time_only:
                for child in node.body:
                    visit(child, top)
            for child in node.orelse:
                visit(child, top)
            return
        if isinstance(node, ast.Import) and (top or not load_time_only):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (top or not load_time_only):
            target = _resolve(module, is_package, node)
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
        nested = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, top and not nested)

    for stmt in tree.body:
        visit(stmt, True)
    return {m for m in found if m.split(".")[0] in PACKAGES}


MODULES = modules()


@pytest.mark.parametrize("pkg", sorted(FORBIDDEN))
def test_a_package_imports_nothing_above_it(pkg):
    wrong = sorted(f"{m} imports {i}" for m, p in MODULES.items() if m.split(".")[0] == pkg
                   for i in imports(m, p, load_time_only=False) if i.split(".")[0] in FORBIDDEN[pkg])
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_files():
    graph = {m: {i for i in imports(m, p, load_time_only=True) if i in MODULES and i != m}
             for m, p in MODULES.items()}
    # A package's __init__ importing its own submodules is how packages work, not a cycle between files.
    for m in graph:
        graph[m] = {i for i in graph[m] if not (MODULES[m].name == "__init__.py" and i.startswith(m + "."))}
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = dfs(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = dfs(m)
            assert cycle is None, " -> ".join(cycle)
