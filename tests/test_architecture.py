"""The house's arrows, read off the import statements (``ast``, nothing is imported).

``pages -> analysis -> mmoe_core``, with ``app.py`` and ``serve.py`` above pages and ``demo_build.py`` above
analysis and mmoe_core; no import cycle among modules; pages and analysis reach the families only through the
adapter contract, the registry and the spec (never ``mmoe_core.families``).

Every ``import`` / ``from ... import`` counts, at module level or inside a function (a lazy import is
still an arrow), except under ``if TYPE_CHECKING:`` for the cycle check (never executed). Calls of
``importlib.import_module("name")`` with a literal name count for the layer checks; they are not cycle
arrows, since that is how the registry discovers plugins that import it.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("app.py", "serve.py", "demo_build.py", "pages", "analysis", "mmoe_core")


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    imports: set[tuple[str, str]] = field(default_factory=set)  # (module, member or ""), absolute
    typing_only: set[tuple[str, str]] = field(default_factory=set)  # imported under TYPE_CHECKING only
    dynamic: set[str] = field(default_factory=set)  # importlib.import_module("...") literals

    def names(self, typing: bool = True) -> set[str]:
        """Every dotted name imported (``from a import b``: both a and a.b), for the layer checks."""
        pairs = self.imports | (self.typing_only if typing else set())
        return {m for m, _ in pairs} | {f"{m}.{b}" for m, b in pairs if b} | (self.dynamic if typing else set())


def module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _absolute(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def read_module(path: Path) -> Module:
    name, is_package = module_name(path)
    module = Module(name, path, is_package)
    tree = ast.parse(path.read_text(), str(path))

    def visit(node: ast.AST, typing_only: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, typing_only)
            return
        names: list[tuple[str, str]] = []
        if isinstance(node, ast.Import):
            names = [(alias.name, "") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            names = [(base, alias.name) for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            module.dynamic.add(node.args[0].value)
        for n in names:
            (module.typing_only if typing_only else module.imports).add(n)
        for child in ast.iter_child_nodes(node):
            visit(child, typing_only)

    visit(tree, False)
    module.typing_only -= module.imports
    return module


def read_all() -> dict[str, Module]:
    files: list[Path] = []
    for source in SOURCES:
        path = REPO / source
        files += [path] if path.is_file() else sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)
    modules = [read_module(p) for p in files]
    return {m.name: m for m in modules}


MODULES = read_all()


def internal_targets(pairs: set[tuple[str, str]]) -> set[str]:
    """The project modules imported (``from a import b``: a.b when it is a module, else a; ``import a.b``:
    a.b). Parent packages run implicitly are not arrows: they are imported by whoever imports a child."""
    out = set()
    for module, member in pairs:
        if member and f"{module}.{member}" in MODULES:
            out.add(f"{module}.{member}")
        elif module in MODULES:
            out.add(module)
    return out


def graph() -> dict[str, set[str]]:
    return {name: internal_targets(m.imports) - {name} for name, m in MODULES.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
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

    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(edges) + 100))
    try:
        for v in sorted(edges):
            if v not in index:
                strong(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found)


def _top(name: str) -> str:
    return name.split(".")[0]


def offending(layer: str, forbidden: tuple[str, ...]) -> list[str]:
    """'module -> import' for every import of a module under ``layer`` that names a forbidden top."""
    out = []
    for name, m in sorted(MODULES.items()):
        if _top(name) != layer:
            continue
        for imported in sorted(m.names()):
            if any(imported == f or imported.startswith(f + ".") for f in forbidden):
                out.append(f"{name} -> {imported}")
    return sorted(set(out))


def _cycles_within(tops: tuple[str, ...]) -> list[list[str]]:
    edges = graph()
    keep = {n for n in edges if _top(n) in tops}
    return cycles({n: {t for t in edges[n] if t in keep} for n in keep})


def _format(items) -> str:
    return "\n  ".join(str(i) for i in items)


# ------------------------------------------------------------------------------- the checker itself


def test_the_checker_resolves_imports_and_finds_cycles():
    assert "mmoe_core.registry" in MODULES and "demo_build" in MODULES
    adapter = MODULES["mmoe_core.adapter"]
    assert "mmoe_core.registry" in internal_targets(adapter.imports)  # a lazy import inside load_adapter
    registry = MODULES["mmoe_core.registry"]
    assert ("mmoe_core.adapter", "ModelAdapter") in registry.typing_only
    assert "mmoe_core.adapter" not in graph()["mmoe_core.registry"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


# ------------------------------------------------------------------------------- mmoe_core and demo_build


def test_no_import_cycle_in_mmoe_core_and_the_demo_build():
    found = _cycles_within(("mmoe_core", "demo_build"))
    assert not found, "import cycles:\n  " + _format(found)


def test_mmoe_core_knows_nothing_above_it():
    bad = offending("mmoe_core", ("analysis", "pages", "streamlit", "demo_build", "app", "serve"))
    assert not bad, "mmoe_core imports a layer above it:\n  " + _format(bad)


def test_demo_build_names_no_family():
    from mmoe_core import registry

    tree = ast.parse((REPO / "demo_build.py").read_text())
    words = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            words |= set(re.findall(r"[A-Za-z0-9_-]+", node.value))
    builtin = set(registry.families()) - {"toy", "toy-demo"}  # test families registered by other tests
    assert not (words & builtin), f"demo_build.py names families {sorted(words & builtin)}"
    assert not any(i.startswith("mmoe_core.families") for i in MODULES["demo_build"].names())


# ------------------------------------------------------------------------------- analysis and pages


def test_no_import_cycle_anywhere():
    found = _cycles_within(tuple(_top(s.removesuffix(".py")) for s in SOURCES))
    assert not found, "import cycles:\n  " + _format(found)


def test_analysis_knows_nothing_of_pages_or_streamlit():
    bad = offending("analysis", ("pages", "streamlit", "app", "serve", "demo_build"))
    assert not bad, "analysis imports a layer above it:\n  " + _format(bad)


@pytest.mark.parametrize("layer", ["analysis", "pages", "app", "serve"])
def test_analysis_and_pages_reach_families_only_through_the_contract(layer):
    bad = offending(layer, ("mmoe_core.families",))
    assert not bad, f"{layer} imports a family package (use mmoe_core.adapter / registry / spec):\n  " + _format(bad)


def test_pages_import_no_heavy_library_before_their_first_paint():
    """A page paints its title only after its module-level imports: the modules app.py and the pages import at
    their top must not pull in torch, scipy.stats or sklearn.metrics (~1.5 s, 1.0 s and 0.3 s on the demo
    machine); those load inside the functions that run a model or compute a measure."""
    import subprocess
    import sys

    from pages.warmup import page_modules  # the same list serve.py imports before the first visitor

    imported = set(page_modules(REPO))
    assert "pages.state" in imported and "analysis.routing_measure_tables" in imported
    heavy = ("torch", "scipy.stats", "sklearn.metrics", "transformers")
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
        + "".join(f"import {name}\n" for name in sorted(imported))
        + f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
