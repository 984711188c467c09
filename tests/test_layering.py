"""Imports between rosetta's packages run one way (issue 32).

Every module under ``src/rosetta`` is parsed with ``ast``; each import of a rosetta
module, at module level or inside a function (a lazy import is for start-up time,
never to hide a circle), is an edge of the module graph. Two rules:

- a package imports only from packages at or below its layer in ``LAYERS``;
- the module graph has no cycle.

Imports under ``if TYPE_CHECKING:`` are left out: they never run, so they can
neither climb nor close a circle at run time.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# lowest first; a unit is a top-level module or package of rosetta (a package holds
# all its modules), and "rosetta" is the package's own __init__ (the public API)
LAYERS: list[tuple[str, ...]] = [
    (
        "rosetta.config",
        "rosetta.device",
        "rosetta.safeio",
        "rosetta.memory",
        "rosetta.checkpointdir",
        "rosetta.version",
    ),
    ("rosetta.data",),
    ("rosetta.model",),
    ("rosetta.modeldir",),
    ("rosetta.decode",),
    ("rosetta.evaluate",),  # below train: validation scores BLEU
    ("rosetta.plotting", "rosetta.curves"),  # below train: it draws attention snapshots
    ("rosetta.train",),
    ("rosetta.export", "rosetta.importers"),
    ("rosetta.serve",),
    ("rosetta.demo", "rosetta.cli", "rosetta.__main__", "rosetta"),
]


@dataclass(frozen=True)
class Edge:
    """Module ``source`` imports module ``target``, at ``where`` (``file:line``)."""

    source: str
    target: str
    where: str
    line: int


def find_modules(src: Path, root: str = "rosetta") -> dict[str, Path]:
    """Every module of package ``root`` under ``src``, by dotted name (a package by its
    own name, for its ``__init__.py``)."""
    modules = {}
    for path in sorted((src / root).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of a module, at any depth, less those under
    ``if TYPE_CHECKING:`` (an ``else:`` branch of it still runs, so it counts)."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))
    return found


def imports_of(name: str, src: Path, modules: dict[str, Path], root: str = "rosetta") -> list[Edge]:
    """The edges of module ``name``, in line order: one per rosetta module it imports.
    ``from P import x`` is an import of module ``P.x`` when that is a module, else of
    ``P``; relative imports are resolved against the module's package."""
    path = modules[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = []
    nodes = _import_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    for node in sorted(nodes, key=lambda node: node.lineno):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        for target in targets:
            if target == root or target.startswith(root + "."):
                where = f"{path.relative_to(src).as_posix()}:{node.lineno}"
                edges.append(Edge(name, target, where, node.lineno))
    return edges


def import_graph(src: Path = SRC) -> tuple[dict[str, Path], list[Edge]]:
    modules = find_modules(src)
    edges = [edge for name in modules for edge in imports_of(name, src, modules)]
    return modules, edges


def unit_of(module: str, layers: list[tuple[str, ...]]) -> str | None:
    """The unit of ``LAYERS`` that holds ``module``: the longest name that is it or a
    package above it (``rosetta`` itself holds only its ``__init__``)."""
    units = [u for layer in layers for u in layer]
    holding = [u for u in units if module == u or (u != "rosetta" and module.startswith(u + "."))]
    return max(holding, key=len, default=None)


def layering_problems(edges: list[Edge], layers: list[tuple[str, ...]]) -> list[str]:
    """One line per import of a unit from a layer above the importer's, or of a module
    the layering does not place."""
    rank = {unit: i for i, layer in enumerate(layers) for unit in layer}
    problems = []
    for edge in edges:
        source, target = unit_of(edge.source, layers), unit_of(edge.target, layers)
        if source is None or target is None:
            unplaced = edge.source if source is None else edge.target
            problems.append(f"{edge.where}: {unplaced} is in no layer of LAYERS")
        elif rank[target] > rank[source]:
            problems.append(
                f"{edge.where}: {edge.source} imports {edge.target} ({target} sits above {source})"
            )
    return problems


def cycles(edges: list[Edge]) -> list[list[str]]:
    """One shortest circle of imports through each group of modules that import each
    other (a strongly connected component), as ``[a, b, ..., a]``."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)

    def path(start: str, goal: str, within: set[str] | None = None) -> list[str] | None:
        """A shortest import path from ``start`` to ``goal`` (breadth first)."""
        before: dict[str, str] = {}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            for nxt in sorted(graph.get(node, ())):
                if within is not None and nxt not in within:
                    continue
                if nxt == goal:
                    found = [goal, node]
                    while found[-1] != start:
                        found.append(before[found[-1]])
                    return found[::-1]
                if nxt not in before and nxt != start:
                    before[nxt] = node
                    queue.append(nxt)
        return None

    found, seen = [], set()
    for module in sorted(graph):
        if module in seen or path(module, module) is None:
            continue
        group = {m for m in graph if m == module or (path(module, m) and path(m, module))}
        seen |= group
        found.append(path(module, module, group))
    return found


def test_no_package_imports_one_above_it():
    modules, edges = import_graph()
    assert len(modules) > 30 and len(edges) > 100  # the scan found the package
    problems = layering_problems(edges, LAYERS)
    assert not problems, "imports that climb the layering:\n" + "\n".join(problems)


def test_no_import_cycle():
    _, edges = import_graph()
    circles = cycles(edges)
    assert not circles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_every_module_has_a_layer():
    modules, _ = import_graph()
    unplaced = [name for name in modules if unit_of(name, LAYERS) is None]
    assert not unplaced, f"add these to LAYERS: {unplaced}"


def test_the_checker_finds_a_climb_and_a_cycle(tmp_path):
    """A toy package whose data imports its model lazily, and the model imports the
    data back (relatively): both rules must fire, and a TYPE_CHECKING import not."""
    files = {
        "rosetta/__init__.py": "",
        "rosetta/config.py": "",
        "rosetta/data/__init__.py": "",
        "rosetta/data/reader.py": (
            "from typing import TYPE_CHECKING\n"
            "from rosetta import config\n"
            "if TYPE_CHECKING:\n"
            "    from rosetta.model.net import Net\n"
            "def read():\n"
            "    from rosetta.model.net import build\n"
            "    return build()\n"
        ),
        "rosetta/model/__init__.py": "",
        "rosetta/model/net.py": "from ..data import reader\nimport rosetta.config\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    layers = [("rosetta.config",), ("rosetta.data",), ("rosetta.model",), ("rosetta",)]
    _, edges = import_graph(tmp_path)

    assert {(e.source, e.target, e.line) for e in edges} == {
        ("rosetta.data.reader", "rosetta.config", 2),
        ("rosetta.data.reader", "rosetta.model.net", 6),  # not line 4: TYPE_CHECKING
        ("rosetta.model.net", "rosetta.data.reader", 1),
        ("rosetta.model.net", "rosetta.config", 2),
    }
    assert layering_problems(edges, layers) == [
        "rosetta/data/reader.py:6: rosetta.data.reader imports rosetta.model.net "
        "(rosetta.model sits above rosetta.data)"
    ]
    assert cycles(edges) == [["rosetta.data.reader", "rosetta.model.net", "rosetta.data.reader"]]
    assert layering_problems(edges, layers[1:])[0].endswith(
        "rosetta.config is in no layer of LAYERS"
    )
