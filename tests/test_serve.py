"""serve.py: app.py inside ``st.App``, the pages' modules imported by its lifespan before the first visitor.

Unit tier: nothing is served here (tests/test_browser.py serves serve.py and visits every page)."""

from __future__ import annotations

from pathlib import Path

from pages.warmup import page_modules, top_level_imports
from tests.fresh_python import printed_lines

REPO = Path(__file__).resolve().parents[1]


def test_page_modules_are_every_top_level_import_of_the_app_and_its_pages():
    modules = page_modules(REPO)
    assert "__future__" not in modules
    for path in [REPO / "app.py", *sorted((REPO / "pages").glob("*.py"))]:
        missing = (top_level_imports(path) - {"__future__"}) - set(modules)
        assert not missing, f"{path.name}: {sorted(missing)} not warmed"
    assert {"pages.state", "streamlit", "analysis.store"} <= set(modules)


def test_top_level_imports_skip_function_level_and_relative_imports(tmp_path):
    source = tmp_path / "page.py"
    source.write_text("import os, json\nfrom a.b import c\nfrom . import d\ndef f():\n    import torch\n")
    assert top_level_imports(source) == {"os", "json", "a.b"}


def test_streamlit_finds_the_asgi_app_in_serve_py():
    from streamlit.web.server.app_discovery import discover_asgi_app

    found = discover_asgi_app(REPO / "serve.py")
    assert found.is_asgi_app and found.app_name == "app"


def test_warm_up_imports_the_page_modules_and_no_model_library():
    code = (
        "import sys\nfrom pages.warmup import page_modules, warm_up\n"
        "seconds = warm_up()\n"
        "print(sorted(set(page_modules()) - set(seconds)))\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    not_imported, heavy = printed_lines(code)[-2:]
    assert not_imported == "[]" and heavy == "[]"
