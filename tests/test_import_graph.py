"""No import cycle between the parts of ``modality``: the folder tree is the data flow, so dependencies run one way.

A part is a sub-package (``shards``, ``data``...) or a top-level module (``prepare``, ``crossval``...): the cycle
this test was written for ran through one (``data/datamodule.py -> prepare -> shards/build.py ->
shards/work.py -> data/png_codec.py``). Every import counts, wherever it is written (module level, inside a
function, under ``TYPE_CHECKING``, ``importlib.import_module("modality....")``): an import deferred into a
function hides a cycle from Python, not from the design.
"""

from __future__ import annotations

import ast
import itertools
from collections import defaultdict
from pathlib import Path

import modality

PACKAGE_ROOT = Path(modality.__file__).parent
_DYNAMIC_IMPORTERS = frozenset({"import_module", "__import__", "run_module"})


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _part(module: str) -> str | None:
    """``modality.shards.build`` -> ``shards``; None outside ``modality`` and for the package itself."""
    parts = module.split(".")
    return parts[1] if parts[0] == "modality" and len(parts) > 1 else None


def _imported_modules(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """Every ``(line, module)`` the file imports, relative imports resolved."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from modality import shards` names the part in the alias, not in the module
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in _DYNAMIC_IMPORTERS and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def import_graph(root: Path = PACKAGE_ROOT) -> dict[str, dict[str, list[str]]]:
    """part -> imported part -> the import lines that make the edge (``path:line -> module``)."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        source = _part(module)
        if source is None:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, imported in _imported_modules(tree, module, path.name == "__init__.py"):
            target = _part(imported)
            if target is not None and target != source:
                graph[source][target].append(f"{path.relative_to(root.parent)}:{line} -> {imported}")
    return graph


def strongly_connected(graph: dict[str, dict[str, list[str]]]) -> list[set[str]]:
    """The groups of parts that import each other, directly or round a loop (Tarjan), of two parts or more."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, {})):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def find_cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """One shortest cycle (``[a, b, ..., a]``) per strongly connected group, from its first part by name."""
    cycles = []
    for component in strongly_connected(graph):
        start = min(component)
        # shortest way back to start inside the component (breadth-first), for a readable message
        previous: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in previous:
            following = []
            for node in frontier:
                for succ in sorted(graph[node]):
                    if succ in component and succ not in previous:
                        previous[succ] = node
                        following.append(succ)
            frontier = following
        path = [start]
        node = previous[start]
        while node != start:
            path.append(node)
            node = previous[node]
        path.append(start)
        cycles.append(path[::-1])
    return cycles


def describe(cycle: list[str], graph: dict[str, dict[str, list[str]]]) -> str:
    lines = [" -> ".join(cycle)]
    for a, b in itertools.pairwise(cycle):
        lines += [f"  {a} -> {b}:"] + [f"    {witness}" for witness in graph[a][b]]
    return "\n".join(lines)


def test_no_import_cycle_between_modality_parts() -> None:
    graph = import_graph()
    cycles = find_cycles(graph)
    groups = "; ".join(", ".join(sorted(group)) for group in strongly_connected(graph))
    message = "\n".join(describe(cycle, graph) for cycle in cycles) + f"\nparts in loops: {groups}"
    print(message)
    assert not cycles, f"import cycles between modality parts:\n{message}"


def test_the_graph_sees_deferred_imports_and_the_flow_direction() -> None:
    """The check is not vacuous: it sees a function-level import and the edges the data flow needs."""
    graph = import_graph()
    deferred = graph["data"]["prepare"]  # datamodule.py imports prepare inside functions only
    assert any(witness.startswith("modality/data/datamodule.py:") for witness in deferred)
    assert "shards" in graph["data"] and "shards" in graph["prepare"] and "readers" in graph["shards"]
    assert "data" not in graph["shards"], graph["shards"].get("data")


def test_find_cycles_names_a_planted_cycle(tmp_path: Path) -> None:
    package = tmp_path / "modality"
    for name, body in {
        "__init__.py": "",
        "alpha/__init__.py": "",
        "alpha/one.py": "def f():\n    from modality.beta import two\n",
        "beta/__init__.py": "",
        "beta/two.py": "from ..gamma import three\n",
        "gamma/__init__.py": "import importlib\nimportlib.import_module('modality.alpha.one')\n",
        "gamma/three.py": "",
        "delta.py": "from modality import alpha\n",
    }.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(body)
    graph = import_graph(package)
    assert find_cycles(graph) == [["alpha", "beta", "gamma", "alpha"]]
    assert graph["delta"]["alpha"] == ["modality/delta.py:1 -> modality.alpha"]
    assert "gamma/__init__.py:2" in describe(find_cycles(graph)[0], graph)
