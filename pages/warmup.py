"""Warm a fresh server before its first visitor: import what the pages import at their top.

A Streamlit server imports a page's modules on the first script run that needs them, so the first
visitor of a fresh server waited for pandas, plotly, DuckDB and the store (measured on the demo build: a
fresh server's first page painted in 2.0-2.1 s without this warm-up, 1.2-1.5 s with it; BENCHMARKS.md).
``serve.py`` calls :func:`warm_up` in its lifespan, before the server accepts connections. The list is
read from the sources (``app.py`` and ``pages/*.py``, their module-level imports), so a new page or
import is warmed without editing anything here.
"""

from __future__ import annotations

import ast
import importlib
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def top_level_imports(path: Path) -> set[str]:
    """The absolute modules a Python file imports at module level."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def page_modules(repo: Path = REPO) -> list[str]:
    """Every module that ``app.py`` and the pages import at their top, sorted."""
    files = [repo / "app.py", *sorted((repo / "pages").glob("*.py"))]
    names: set[str] = set()
    for path in files:
        names |= top_level_imports(path)
    return sorted(names - {"__future__"})


def warm_up(repo: Path = REPO) -> dict[str, float]:
    """Import :func:`page_modules`; returns the seconds each import took (the slow ones are worth knowing).
    A module that fails to import is left for the page to report: warming must not stop the server."""
    seconds = {}
    for name in page_modules(repo):
        started = time.perf_counter()
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001  (the page that imports it shows the error to its visitor)
            continue
        seconds[name] = time.perf_counter() - started
    return seconds
