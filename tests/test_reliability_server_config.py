"""The server settings in .streamlit/config.toml agree with the code and with the Makefile's `serve`: the
server's upload cap is the playground widget's (one constant, in MiB), messages to the browser are capped
below Streamlit's 200 MB default, no usage statistics, headless, loopback by default. Streamlit itself
(in a subprocess started from the repository root, as `make serve` runs it) must read every key from the
file: a misspelt key would be ignored with only a log line. Unit tier."""

from __future__ import annotations

import ast
import json
import math
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from analysis.live.uploads import MAX_UPLOAD_BYTES, MAX_UPLOAD_MB

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / ".streamlit" / "config.toml"
MIB = 1024 * 1024  # Streamlit's "megabytes" for uploads (server.maxUploadSize * 1024 * 1024)
STREAMLIT_DEFAULT_MB = 200


def settings() -> dict[str, object]:
    """config.toml flattened to Streamlit's option names ("server.maxUploadSize": 5, ...)."""
    data = tomllib.loads(CONFIG.read_text())
    return {f"{section}.{key}": value for section, values in data.items() for key, value in values.items()}


def serve_flags(makefile: str) -> dict[str, str]:
    """The ``--section.key value`` pairs of the Makefile's ``serve`` recipe (continuation lines joined)."""
    recipe = re.search(r"^serve:.*\n((?:\t.*\n?)+)", makefile, re.M)
    assert recipe, "the Makefile has no serve target"
    line = recipe.group(1).replace("\\\n", " ")
    return dict(re.findall(r"--([a-zA-Z]+\.[a-zA-Z]+)[ =](\S+)", line))


def as_flag(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def test_the_file_is_tracked_not_ignored():
    ignored = subprocess.run(["git", "check-ignore", "-q", str(CONFIG)], cwd=REPO)
    assert ignored.returncode == 1, ".streamlit/config.toml is git-ignored"


def test_the_upload_cap_is_the_widget_s_in_one_constant():
    s = settings()
    assert MAX_UPLOAD_BYTES == MAX_UPLOAD_MB * MIB
    # the smallest whole MiB that covers the widget's limit (Streamlit takes only whole numbers)
    assert s["server.maxUploadSize"] == MAX_UPLOAD_MB == math.ceil(MAX_UPLOAD_BYTES / MIB)


def test_the_playground_widget_takes_its_limit_from_the_upload_constant():
    tree = ast.parse((REPO / "pages" / "playground.py").read_text())
    limits = [
        ast.unparse(kw.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "file_uploader"
        for kw in node.keywords
        if kw.arg == "max_upload_size"
    ]
    assert limits, "the playground's file_uploader sets no max_upload_size (it would take the server's)"
    assert all("MAX_UPLOAD_BYTES" in src or "MAX_UPLOAD_MB" in src for src in limits), limits
    assert eval(limits[0], {"MAX_UPLOAD_BYTES": MAX_UPLOAD_BYTES, "MAX_UPLOAD_MB": MAX_UPLOAD_MB}) == MAX_UPLOAD_MB


def test_privacy_and_binding_defaults():
    s = settings()
    assert s["browser.gatherUsageStats"] is False
    assert s["server.headless"] is True
    assert s["server.address"] == "127.0.0.1"
    # a cap that a thumbnail-sized chart or a table never reaches, below Streamlit's 200 MB default
    assert MAX_UPLOAD_MB < s["server.maxMessageSize"] < STREAMLIT_DEFAULT_MB


def test_the_makefile_serve_line_does_not_contradict_the_file():
    flags = serve_flags((REPO / "Makefile").read_text())
    assert flags.get("server.address") == "127.0.0.1"
    clashes = {
        k: (v, as_flag(settings()[k])) for k, v in flags.items() if k in settings() and v != as_flag(settings()[k])
    }
    assert clashes == {}, f"Makefile flag vs config.toml: {clashes}"


def test_a_contradicting_serve_line_is_caught():
    makefile = "serve: venv\n\t$(BIN)/python -m streamlit run app.py \\\n\t\t--server.maxUploadSize 200\n"
    flags = serve_flags(makefile)
    assert flags == {"server.maxUploadSize": "200"} and as_flag(settings()["server.maxUploadSize"]) != "200"


def test_streamlit_reads_every_key_from_the_file():
    probe = (
        "import json, sys; from streamlit import config; o = config.get_config_options(); "
        "keys = json.loads(sys.argv[1]); "
        "print(json.dumps({k: [o[k].value, o[k].where_defined] if k in o else None for k in keys}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, json.dumps(list(settings()))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    for key, value in settings().items():
        assert seen[key] is not None, f"{key} is not a Streamlit option"
        assert seen[key] == [value, str(CONFIG)], (key, seen[key])
