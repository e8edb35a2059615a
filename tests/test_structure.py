"""Structure anyone can check: no import cycles inside nanomt, lower layers never import higher
ones, no module over 500 lines. Reads the source with `ast`; imports under `if TYPE_CHECKING:`
are annotations only and do not count."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nanomt"

# layer -> packages it must never import (a lower layer knows nothing of the ones above it)
FORBIDDEN = {
    "nanomt.parallel": ("nanomt.model", "nanomt.optim", "nanomt.checkpoint", "nanomt.data",
                        "nanomt.train", "nanomt.config"),
    "nanomt.model": ("nanomt.optim", "nanomt.checkpoint", "nanomt.data", "nanomt.train"),
    "nanomt.optim": ("nanomt.model", "nanomt.checkpoint", "nanomt.data", "nanomt.train"),
    "nanomt.data": ("nanomt.model", "nanomt.optim", "nanomt.checkpoint", "nanomt.train"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> set[str]:
    """nanomt modules imported when `path` runs (not those under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for top in ast.walk(tree) if isinstance(top, ast.If)
               and "TYPE_CHECKING" in ast.unparse(top.test) for node in ast.walk(top)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("nanomt")}


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in runtime_imports(path) if m in modules and m != name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of module-level imports (a package importing its own submodules is not one:
    Python initialises the package first), or None."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):
                continue  # package -> own submodule
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_no_import_cycle_in_nanomt():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"nanomt.a": {"nanomt.b"}, "nanomt.b": {"nanomt.c"}, "nanomt.c": {"nanomt.a"},
             "nanomt.d": set()}
    assert find_cycle(graph) == ["nanomt.a", "nanomt.b", "nanomt.c", "nanomt.a"]


def test_lower_layers_never_import_higher_ones():
    offences = [(name, imported) for name, imports in import_graph().items()
                for layer, forbidden in FORBIDDEN.items()
                if name == layer or name.startswith(layer + ".")
                for imported in imports if imported.startswith(forbidden)]
    assert offences == []


def test_no_module_over_500_lines():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}
