"""xbm's modules import each other without a cycle, and the lower layers never import the engine.

The graph is read from the source (ast), not by importing: an edge for every import statement of a module,
at the top level or deferred into a function (a deferred import that dodges a cycle still ties the two
modules together), but not under `if TYPE_CHECKING:` (annotations only). `from package import name` is an edge to `package.name` when that is a module, else to
`package`; and importing `a.b.c` first runs the `__init__` of `a` and `a.b`, an edge to each of them
except the importer's own enclosing packages (already being run when the importer is: `__init__` importing
its own modules is the usual re-export, not a cycle).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "xbm"
# Packages below the engine: they must not import xbm.engine (nor the command lines) at import time.
LOWER_LAYERS = ("xbm.config", "xbm.data", "xbm.evaluation", "xbm.losses", "xbm.memory", "xbm.modeling", "xbm.utils")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(body: list[ast.stmt], deferred: bool):
    """The import statements a module runs when it is imported (top level, if/try included), and with
    `deferred` those inside its functions and classes too; never those under `if TYPE_CHECKING:`."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node):
            yield from _import_nodes(node.orelse, deferred)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not deferred:
            continue
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                block = getattr(node, field, None)
                if isinstance(block, list):
                    yield from _import_nodes([n for n in block if isinstance(n, ast.AST)], deferred)


def _with_enclosing(name: str) -> list[str]:
    """`a.b.c` -> [a, a.b, a.b.c]: what importing it runs."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imports_of(name: str, path: Path, modules: dict[str, Path], deferred: bool = False) -> set[str]:
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    own_packages = set(_with_enclosing(package))
    targets = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path)).body, deferred):
        if isinstance(node, ast.Import):
            bases = [alias.name for alias in node.names]
        else:
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            bases = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for base in bases:
            targets.update(m for m in _with_enclosing(base) if m in modules and m not in own_packages)
    targets.discard(name)
    return targets


def import_graph(deferred: bool = False) -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules, deferred) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_walker_finds_a_cycle_it_is_shown(tmp_path):
    """The reference: a hand-made graph with one cycle of three and a self-contained tail."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_walker_reads_relative_imports_and_ignores_type_checking_ones():
    modules = all_modules()
    graph = import_graph()
    assert "xbm.memory.item_tracking" in graph["xbm.memory.cross_batch_memory"]  # from .item_tracking import ...
    assert "xbm.config" in graph["xbm.engine.defaults"]  # from ..config import check_cfg: the package itself
    # from ..data.transforms import ... runs xbm/data/__init__ first; the importer's own packages are no edge
    assert {"xbm.data", "xbm.data.transforms"} <= graph["xbm.evaluation.build"]
    assert "xbm.engine" not in graph["xbm.evaluation.build"] and "xbm" not in graph["xbm.evaluation.build"]
    # undo.py names CrossBatchMemory under `if TYPE_CHECKING:` only
    assert "xbm.memory.cross_batch_memory" not in graph["xbm.memory.undo"]
    assert len(modules) > 50


def test_no_module_of_xbm_is_in_an_import_cycle():
    """What runs when a module is imported has no cycle (one would break an import depending on which module
    comes first, as `xbm.data.image_steps` <-> xbm.modeling's __init__ did before InputConvention left both)."""
    found = cycles(import_graph())
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


# Imports deferred into a function that reach back up the layers and so close a cycle with what runs at import
# time; each is there on purpose. A new one fails the test below: rather than add it here, import from a lower
# layer (or move the shared piece down, as xbm/input_convention.py was).
DEFERRED_CYCLE_EDGES = {
    # check_cfg validates names against the registries (filled by importing the packages that define them)
    # and builds the backbone on the meta device, before any data is read; xbm.config stays importable
    # without torch.
    ("xbm.config.checks", "xbm.data.datasets"), ("xbm.config.checks", "xbm.memory"),
    ("xbm.config.checks", "xbm.modeling"), ("xbm.config.checks", "xbm.modeling.backbones"),
    ("xbm.config.checks", "xbm.modeling.backbones.build"), ("xbm.config.checks", "xbm.modeling.backbones.timm_backbone"),
    # the input geometry of a config is its backbone's data config, read from the registry when asked (a
    # backbone registered at run time must be found)
    ("xbm.data.image_steps", "xbm.modeling"), ("xbm.data.image_steps", "xbm.modeling.backbones"),
    # the memory's width is the model's embedding width (MODEL.HEAD.DIM 0: the backbone's, by a meta build)
    ("xbm.memory.build", "xbm.modeling"),
    # refuse_timm_keys compares MODEL.BACKBONE.TIMM with its defaults (xbm.config.defaults)
    ("xbm.modeling.backbones.build", "xbm.config"),
}


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return False


def test_the_deferred_imports_that_close_a_cycle_are_the_known_ones():
    now, everything = import_graph(), import_graph(deferred=True)
    deferred = {(m, t) for m in everything for t in everything[m] - now[m]}
    closing = {(m, t) for m, t in deferred if _reaches(everything, t, m)}
    assert closing == DEFERRED_CYCLE_EDGES


@pytest.mark.parametrize("layer", LOWER_LAYERS)
def test_the_lower_layers_do_not_import_the_engine(layer):
    graph = import_graph(deferred=True)
    offending = sorted(f"{m} -> {t}" for m, targets in graph.items() if m == layer or m.startswith(layer + ".")
                       for t in targets if t.startswith(("xbm.engine", "xbm.cli", "xbm.serving", "xbm.diagnostics")))
    assert offending == []
