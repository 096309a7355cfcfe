"""The package's import graph: no cycles, and imports flow one way through the layers.

The graph is built from the AST of every ``graphtune/**/*.py``. Only module-level imports count:
an import inside a function is the accepted lazy-import escape hatch (e.g. Triton only when a
kernel is used), and imports under ``if TYPE_CHECKING:`` never run.

Layers, lowest first: ``ir`` -> ``rewrites`` -> ``codegen`` / ``autotune`` -> ``runtime`` -> the
top-level modules (``api``, ``backend``, ``cli``, ...). ``flags`` and ``errors`` sit below
everything: they import nothing from the subpackages.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PKG = "graphtune"
ROOT = Path(__file__).resolve().parents[1] / PKG


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: not in functions, not under TYPE_CHECKING."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(stmts: list[ast.stmt]) -> None:
        for s in stmts:
            if isinstance(s, (ast.Import, ast.ImportFrom)):
                found.append(s)
            elif isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue  # lazy import: runs only when called
            elif isinstance(s, ast.If) and _is_type_checking(s.test):
                visit(s.orelse)
            elif isinstance(s, ast.ClassDef):
                visit(s.body)  # a class body runs at import time
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    block = getattr(s, field, None)
                    if isinstance(block, list):
                        visit([b for b in block if isinstance(b, ast.stmt)] +
                              [x for h in block if isinstance(h, ast.ExceptHandler) for x in h.body])

    visit(tree.body)
    return found


def _all_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def build_import_graph(lazy: bool = False) -> nx.DiGraph:
    """Module -> module edges (``line``: where). ``lazy=True`` counts function-level imports too."""
    collect = _all_imports if lazy else _module_level_imports
    files = sorted(ROOT.rglob("*.py"))
    modules = {_module_name(p): p for p in files}
    g = nx.DiGraph()
    g.add_nodes_from(modules)

    def resolve(name: str) -> str | None:
        # the closest enclosing module of the package (``a.b.func`` -> ``a.b``)
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in collect(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:  # relative: resolve against the containing package
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                # ``from pkg import submodule`` imports the submodule; ``from m import name`` imports m
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
            for t in targets:
                if not (t == PKG or t.startswith(PKG + ".")):
                    continue
                target = resolve(t)
                if target and target != mod:
                    g.add_edge(mod, target, line=node.lineno)
    return g


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    return build_import_graph()


def _fmt_cycle(g: nx.DiGraph, cycle: list[str]) -> str:
    hops = [f"{a} -> {b} (line {g.edges[a, b]['line']})" for a, b in zip(cycle, cycle[1:] + cycle[:1])]
    return "\n    ".join(hops)


# Function-level imports that may close a cycle: each is lazy on purpose. Any other cycle through
# a lazy import is a design smell (e.g. a kernel module and the cross-compiler importing each other).
ACCEPTED_LAZY = {
    ("graphtune", "graphtune.api"): "package __getattr__: importing graphtune must not import inductor",
    ("graphtune.backend", "graphtune"): "__version__ read at call time",
}


def test_graph_sees_the_package(graph):
    assert "graphtune.ir.ops" in graph and "graphtune.codegen.registry" in graph
    assert graph.has_edge("graphtune.codegen.attention.cpu", "graphtune.codegen.registry")


def test_no_import_cycles(graph):
    cycles = sorted(nx.simple_cycles(graph), key=lambda c: (len(c), c))
    report = "\n".join(f"  cycle {i + 1}:\n    {_fmt_cycle(graph, c)}" for i, c in enumerate(cycles[:20]))
    assert not cycles, f"{len(cycles)} module-level import cycle(s):\n{report}"


def _layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "<package>"


# layer -> the layers it must not import from
FORBIDDEN = {
    "ir": {"rewrites", "codegen", "autotune", "runtime"},
    "rewrites": {"codegen", "autotune", "runtime"},
    "codegen": {"runtime"},
    "autotune": {"runtime"},
    "flags": {"ir", "rewrites", "codegen", "autotune", "runtime"},
    "errors": {"ir", "rewrites", "codegen", "autotune", "runtime"},
}
# codegen and autotune sit side by side: today only autotune imports codegen at module level
# (codegen reaches autotune, if at all, lazily). Keep it that way.
FORBIDDEN["codegen"] |= {"autotune"}


def test_layering(graph):
    bad = [f"  {a} -> {b} (line {graph.edges[a, b]['line']})"
           for a, b in sorted(graph.edges) if _layer(b) in FORBIDDEN.get(_layer(a), ())]
    assert not bad, "imports against the layering (ir -> rewrites -> codegen/autotune -> runtime):\n" + "\n".join(bad)


def test_lazy_imports_close_only_accepted_cycles():
    g = build_import_graph(lazy=True)
    bad = [c for c in nx.simple_cycles(g)
           if not any(e in ACCEPTED_LAZY for e in zip(c, c[1:] + c[:1]))]
    report = "\n".join(f"  cycle {i + 1}:\n    {_fmt_cycle(g, c)}" for i, c in enumerate(bad[:20]))
    assert not bad, f"import cycles through function-level imports not in ACCEPTED_LAZY:\n{report}"
