"""Structure anyone can check: no import cycles inside nanomt, lower layers never import higher
ones, checking a config imports no subsystem's runtime, no module over 500 lines. Reads the
source with `ast`. Every import counts for cycles, those under `if TYPE_CHECKING:` and inside
functions included (a reader follows them all); for layering, annotation-only imports do not."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nanomt"

# layer -> modules or packages it must never import (a lower layer knows nothing of the ones
# above it)
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


def imported_names(path: Path, type_checking: bool = True) -> set[str]:
    """nanomt names `path` imports (modules, and `from M import x` as M and M.x); relative
    imports resolved; those under `if TYPE_CHECKING:` only if `type_checking`."""
    tree = ast.parse(path.read_text())
    skipped = set() if type_checking else {
        id(node) for top in ast.walk(tree) if isinstance(top, ast.If)
        and "TYPE_CHECKING" in ast.unparse(top.test) for node in ast.walk(top)}
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "nanomt" or name.startswith("nanomt.")}


def with_packages(names: set[str]) -> set[str]:
    """The names and the packages above them: importing nanomt.a.b runs nanomt/a/__init__.py."""
    return {".".join(name.split(".")[:n]) for name in names
            for n in range(2, name.count(".") + 2)}


def import_graph(type_checking: bool = True) -> dict[str, set[str]]:
    """module -> the nanomt modules it imports (with the packages that holds them)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in with_packages(imported_names(path, type_checking))
                   if m in modules and m != name}
            for name, path in modules.items()}


def is_in(module: str, packages: tuple[str, ...]) -> bool:
    """`module` is one of `packages` or inside one (nanomt.config_rules is not in
    nanomt.config)."""
    return any(module == p or module.startswith(p + ".") for p in packages)


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module that importing `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


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
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"nanomt.a": {"nanomt.b"}, "nanomt.b": {"nanomt.c"}, "nanomt.c": {"nanomt.a"},
             "nanomt.d": set()}
    assert find_cycle(graph) == ["nanomt.a", "nanomt.b", "nanomt.c", "nanomt.a"]


def test_the_graph_sees_type_checking_and_relative_imports(tmp_path, monkeypatch):
    """A cycle closed only by an annotation import, or by a relative one, is still found."""
    package = tmp_path / "nanomt"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from nanomt.sub import b\n")
    (package / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\n"
                                          "if TYPE_CHECKING:\n    from ..a import Thing\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    assert find_cycle(import_graph()) == ["nanomt.a", "nanomt.sub.b", "nanomt.a"]
    assert find_cycle(import_graph(type_checking=False)) is None


def test_lower_layers_never_import_higher_ones():
    offences = [(name, imported) for name, imports in import_graph(type_checking=False).items()
                for layer, forbidden in FORBIDDEN.items() if is_in(name, (layer,))
                for imported in imports if is_in(imported, forbidden)]
    assert offences == []


# What checking a config may not load: the evaluation, the checkpoints, the pipeline and
# data-parallel runtime, the optimizer, the data loaders (their checks run in
# nanomt.launch_checks). It may call a lower layer's own check (parallel.layout's validate_layout,
# data.rampup's; the data package's __init__ then imports the tokenizer module, loading none).
CONFIG_MUST_NOT_REACH = ("nanomt.eval", "nanomt.checkpoint", "nanomt.parallel.pipeline",
                         "nanomt.parallel.data_parallel", "nanomt.parallel.forward_backward",
                         "nanomt.optim", "nanomt.data.build", "nanomt.train",
                         "nanomt.launch_checks")


def test_checking_a_config_imports_no_subsystem_runtime():
    graph = import_graph()
    for module in ("nanomt.config", "nanomt.config_rules"):
        reached = sorted(m for m in reachable(graph, module) if is_in(m, CONFIG_MUST_NOT_REACH))
        assert reached == [], f"{module} imports {reached}"


def test_no_module_over_500_lines():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}
