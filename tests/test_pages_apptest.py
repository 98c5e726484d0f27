"""The dashboard's own pages (overview, routing explorer, utilization, dynamics, compare, export) rendered
with Streamlit's AppTest against REAL tiny demo runs, plus the HTML report and its CLI.

Runs come from the session fixture ``demo_artifacts`` (tests/conftest.py: the tiny demo built once per
session), or from ``$MOESCOPE_TEST_RUNS_ROOT`` when set (an already built root). First-render times of every page are
written to ``test-output/apptest_timings.json`` (reported, never asserted).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "app.py")
TIMINGS = REPO / "test-output" / "apptest_timings.json"
MMOE_RUNS = ("mmoe-balanced", "mmoe-collapsing", "mmoe-reference-gate")
ALL_RUNS = (*MMOE_RUNS, "moemoe-qa")
MY_PAGES = ("overview", "routing_explorer", "utilization", "dynamics", "compare", "export")
TIMEOUT = 120


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def runs_root(request) -> Path:
    """Artifacts root holding the real tiny demo runs: conftest's ``demo_artifacts`` (builds them once per
    session), unless ``$MOESCOPE_TEST_RUNS_ROOT`` names an already built root (to iterate on pages quickly)."""
    reuse = os.environ.get("MOESCOPE_TEST_RUNS_ROOT")
    if reuse and (Path(reuse) / "runs").is_dir():
        return Path(reuse)
    return Path(request.getfixturevalue("demo_artifacts"))


@pytest.fixture
def root(runs_root, monkeypatch) -> Path:
    monkeypatch.setenv("MOESCOPE_ARTIFACTS", str(runs_root))
    _clear_caches()
    return runs_root


def _clear_caches() -> None:
    import streamlit as st

    st.cache_data.clear()
    st.cache_resource.clear()


def _runs(root: Path) -> list[str]:
    from analysis.store import list_runs

    return list_runs(root)


def _need(root: Path, *runs: str) -> None:
    missing = [r for r in runs if r not in _runs(root)]
    if missing:
        pytest.fail(f"demo runs {missing} are not built under {root}")


_timings: dict[str, float] = {}


def _record(name: str, seconds: float) -> None:
    _timings[name] = round(seconds, 3)
    TIMINGS.parent.mkdir(parents=True, exist_ok=True)
    TIMINGS.write_text(json.dumps(_timings, indent=2, sort_keys=True) + "\n")


def render(page: str, run: str | None = None, **params: str) -> AppTest:
    """Run the app with ``?run=..`` (+ params), switch to ``pages/<page>.py`` and render it with cold page
    caches; records the page's render time."""
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    if run is not None:
        at.query_params["run"] = run
    for key, value in params.items():
        at.query_params[key] = value
    if page == "overview":  # the default page: its first run is the one to time
        _clear_caches()
        started = time.perf_counter()
        at.run()
    else:
        at.run()
        _clear_caches()
        at.switch_page(f"pages/{page}.py")
        started = time.perf_counter()
        at.run()
    _record(f"{page}[{run}]" + "".join(f"[{k}={v}]" for k, v in params.items()), time.perf_counter() - started)
    return at


def no_exceptions(at: AppTest) -> None:
    assert not at.exception, "\n\n".join(f"{e.message}\n{''.join(e.stack_trace)}" for e in at.exception)
    assert not at.error, [e.value for e in at.error]


def markdown_text(at: AppTest) -> str:
    return "\n".join(str(m.value) for m in at.markdown) + "\n" + "\n".join(str(c.value) for c in at.caption)


def frames(at: AppTest) -> list[pd.DataFrame]:
    return [d.value.data if hasattr(d.value, "data") else d.value for d in at.dataframe]


def plotly_count(at: AppTest) -> int:
    return len(at.get("plotly_chart"))


def _array(value) -> np.ndarray:
    """A plotly figure array from its JSON (plain lists, or plotly's typed-array encoding)."""
    if isinstance(value, dict) and "bdata" in value:
        data = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = [int(x) for x in str(value.get("shape", len(data))).split(",")]
        return data.reshape(shape)
    return np.asarray(value, dtype=float)


def _store(root: Path, run: str):
    from analysis.store import RunStore

    return RunStore(run, root)


# ------------------------------------------------------------------------------------------- overview


@pytest.mark.parametrize("run", ALL_RUNS)
def test_overview_renders_model_card_metrics_and_verdicts(root, run):
    _need(root, run)
    at = render("overview", run)
    no_exceptions(at)
    text = markdown_text(at)
    store = _store(root, run)
    lm = store.layer_metrics()
    for layer in lm["layer"]:
        assert f"**{layer}**" in text
    tables = frames(at)
    card = next(t for t in tables if list(t.columns) == ["field", "value"])
    family = store.manifest["family"]
    assert "family" in set(card["field"]) and family in set(card["value"])
    spec = store.spec()
    layers = next(t for t in tables if "gate sees" in t.columns)
    assert set(layers["layer"]) == {layer.name for layer in spec.routed_layers}
    assert {"scores", "weights", "batch-dependent"} <= set(layers.columns)  # what the gate really does
    assert [m.label for m in at.metric], "headline metrics are shown"
    overall = store.read_json("metrics")["overall"]
    first = next(k for h in spec.prediction.headline for k in overall if k.lower() == h.lower())
    assert at.metric[0].label == first.replace("_", " "), [m.label for m in at.metric]  # declared headline first
    assert at.query_params.get("run") in (run, [run])


def test_overview_collapsing_run_says_collapsed_and_why(root):
    _need(root, "mmoe-collapsing")
    at = render("overview", "mmoe-collapsing")
    no_exceptions(at)
    lm = _store(root, "mmoe-collapsing").layer_metrics()
    collapsed = lm[lm["verdict"] == "collapsed"]
    assert len(collapsed), "the collapsing demo run has a collapsed layer"
    text = markdown_text(at)
    assert "collapsed" in text
    for reason in collapsed["reason"]:
        assert reason.split(": ", 1)[1][:60] in text  # the reason itself, with its numbers
    verdicts = next(t for t in frames(at) if "verdict" in t.columns and "reason" in t.columns)
    assert "collapsed" in set(verdicts["verdict"])


def test_reference_gate_overview_explains_the_gate(root):
    _need(root, "mmoe-reference-gate")
    at = render("overview", "mmoe-reference-gate")
    no_exceptions(at)
    notes = _store(root, "mmoe-reference-gate").spec().notes
    assert notes, "the reference gate declares a note"
    infos = [str(i.value) for i in at.info]
    assert all(note in infos for note in notes)  # the model's own warnings, as declared
    assert any("not routed" in i for i in infos)


# ------------------------------------------------------------------------------------------- explorer


def _explorer_table(at: AppTest) -> pd.DataFrame:
    return next(t for t in frames(at) if "top-k experts" in t.columns)


@pytest.mark.parametrize("run", ["mmoe-balanced", "mmoe-collapsing", "moemoe-qa"])
def test_explorer_shows_k_experts_per_routed_position(root, run):
    _need(root, run)
    store = _store(root, run)
    index = int(store.examples(limit=3)["example_index"].iloc[2])
    at = render("routing_explorer", run, example=str(index))
    no_exceptions(at)
    assert not at.warning, [w.value for w in at.warning]
    table = _explorer_table(at)
    layer = at.radio(key=f"explorer_layer_{run}").value
    k = store.spec().layer(layer).top_k
    routed = table[table["routed"] == "routed"]
    assert len(routed) > 0
    assert all(len(ids.split(", ")) == k for ids in routed["top-k experts"])
    assert all(len(w.split(", ")) == k for w in routed["top-k weights"])
    assert f"The {k} experts of every routed position" in [s.value for s in at.subheader]
    assert plotly_count(at) >= 1
    assert at.query_params.get("example") in (str(index), [str(index)])
    assert at.selectbox(key=f"explorer_example_{run}").value == index  # the picker follows ?example=


@pytest.mark.parametrize("run", ["mmoe-balanced", "moemoe-qa"])
def test_explorer_shows_the_example_fields_and_the_prediction_by_name(root, run):
    from pages.state import escape_markdown

    _need(root, run)
    store = _store(root, run)
    spec = store.spec()
    pred = store.predictions()
    row = pred[pred["gold"].notna()].iloc[0]
    at = render("routing_explorer", run, example=str(int(row["example_index"])))
    no_exceptions(at)
    text = markdown_text(at)
    example = store.examples(filters={"example_index": int(row["example_index"])}).iloc[0]
    title = spec.title_field()
    # declared fields under their labels; data text escaped (it cannot render as Markdown)
    assert f"**{title.label}:** {escape_markdown(example[title.name])}" in text
    line = next(m.value for m in at.markdown if str(m.value).startswith("Prediction · "))
    item = spec.prediction.item
    assert f"{item}: **{escape_markdown(row['prediction'])}**" in line, line
    assert f"gold: **{escape_markdown(row['gold'])}**" in line, line
    if "gold_id" in pred and pd.notna(row.get("gold_id")) and str(row["gold_id"]) != str(row["gold"]):
        assert f"**{int(row['gold_id'])}**" not in line  # names, never the KB row number


def test_explorer_image_call_draws_patch_grid(root):
    _need(root, "mmoe-balanced")
    at = render("routing_explorer", "mmoe-balanced", example="1", layer="image_intra", call="mention")
    no_exceptions(at)
    assert at.radio(key="explorer_layer_mmoe-balanced").value == "image_intra"
    table = _explorer_table(at)
    patches = table[table["kind"] == "image_patch"]
    assert len(patches) >= 4
    spec = next(
        json.loads(c.proto.spec)
        for c in at.get("plotly_chart")
        if "image patches" in json.loads(c.proto.spec)["layout"]["title"]["text"]
    )
    grid = _array(spec["data"][0]["z"])
    declared = next(i.grid for i in _store(root, "mmoe-balanced").spec().image_inputs())
    assert grid.shape == (declared.rows, declared.cols) and len(patches) == declared.rows * declared.cols
    rows = _store(root, "mmoe-balanced").example_routing(1, "image_intra")
    rows = rows[rows["call"] == "mention"]
    cell = rows[(rows["grid_row"] == 0) & (rows["grid_col"] == 0)]
    if cell.empty:  # a family that records no grid cells: row-major from the first patch position
        cell = rows[rows["position_kind"] == "image_patch"].sort_values("position")
    assert grid[0][0] == int(cell["top1"].iloc[0])
    assert at.query_params.get("layer") in ("image_intra", ["image_intra"])
    # a layer choice by the user drops the call of the previous layer from the URL
    at.radio(key="explorer_layer_mmoe-balanced").set_value("cross_inter").run()
    no_exceptions(at)
    assert not at.warning, [w.value for w in at.warning]


def test_explorer_bad_layer_param_warns_and_still_renders(root):
    _need(root, "mmoe-balanced")
    at = render("routing_explorer", "mmoe-balanced", example="1", layer="no_such_layer")
    no_exceptions(at)
    assert any("no_such_layer" in str(w.value) for w in at.warning)
    assert plotly_count(at) >= 1


def test_explorer_reference_gate_shows_not_routed_positions(root):
    _need(root, "mmoe-reference-gate")
    at = render("routing_explorer", "mmoe-reference-gate", example="0")
    no_exceptions(at)
    table = _explorer_table(at)
    assert (table["routed"] == "not routed").any()
    assert "not routed" in markdown_text(at)
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert any(t.get("name") == "not routed" for t in spec["data"]), "the figure has a 'not routed' legend entry"


def test_explorer_bad_example_param_warns_and_still_renders(root):
    _need(root, "mmoe-balanced")
    at = render("routing_explorer", "mmoe-balanced", example="not-an-example")
    no_exceptions(at)
    assert any("not-an-example" in str(w.value) for w in at.warning)
    assert _explorer_table(at) is not None


def test_bad_run_param_warns_and_falls_back(root):
    runs = _runs(root)
    at = render("overview", "no-such-run")
    no_exceptions(at)
    assert any("no-such-run" in str(w.value) for w in at.warning)
    picked = at.selectbox(key="moescope_run_picker").value
    assert picked in runs
    assert any(f"**{name}**" in markdown_text(at) for name in _store(root, picked).layer_metrics()["layer"])


def test_prediction_text_names_both_sides_and_escapes_data_text():
    """Names, never row numbers; a wrong prediction with the gold's name says it is another item of that
    name (the demo worlds share names between entities); data text cannot render as Markdown."""
    from mmoe_core.spec import ModelSpec, PredictionSpec
    from pages.widgets import prediction_text

    spec = ModelSpec("toy", "toy", prediction=PredictionSpec("ranking", "", item="entity"))
    line = prediction_text(
        {"prediction": "Trinity", "prediction_id": 28, "gold": "Trinity", "gold_id": 29, "rank": 2, "correct": False},
        spec,
    )
    assert line == "entity: **Trinity** (another entity of the same name) · gold: **Trinity** · gold rank **2** · wrong"
    assert "28" not in line and "29" not in line
    crafted = prediction_text({"prediction": "[x](http://evil.example)", "gold": "**b**", "correct": True}, spec)
    assert "\\[x\\]\\(http\\://evil\\.example\\)" in crafted and "\\*\\*b\\*\\*" in crafted


CRAFTED_RUNS = [
    "x` [a live link](http://evil.example/a) **bold** ![remote](http://evil.example/i.png)",
    "www.evil.example :red[red] $x^2$ <b>b</b>",
    "``",
    "a\n\n# heading",
]


@pytest.mark.parametrize("value", CRAFTED_RUNS)
def test_a_crafted_run_param_is_shown_as_literal_text(root, value):
    """?run= with Markdown in it: the warning quotes it in a code span (no live link, bold text or remote
    image can render inside the warning); the page falls back to a real run."""
    markdown_it = pytest.importorskip("markdown_it")
    at = render("overview", value)
    no_exceptions(at)
    warning = next(str(w.value) for w in at.warning if "The link asks for run" in str(w.value))
    tokens = markdown_it.MarkdownIt("commonmark").parse(warning)
    inline = [t for block in tokens if block.children for t in block.children]
    kinds = {t.type for t in inline}
    assert not kinds & {"link_open", "image", "strong_open", "em_open", "html_inline"}, kinds
    assert [t.type for t in tokens].count("paragraph_open") == 1  # no heading or second block
    shown = next(t.content for t in inline if t.type == "code_inline")
    assert shown == "".join(c if c.isprintable() else "\ufffd" for c in value[:80])
    assert at.selectbox(key="moescope_run_picker").value in _runs(root)


@pytest.mark.parametrize("value", ["\u00b2", "99999", "abc"])
def test_compare_bad_example_param_gives_one_clear_message(root, value):
    _need(root, "mmoe-balanced", "mmoe-collapsing")
    at = render("compare", "mmoe-balanced", compare="mmoe-collapsing", example=value)
    no_exceptions(at)
    assert any("The link asks for example" in str(w.value) and value in str(w.value) for w in at.warning)


def test_a_page_that_fails_on_bad_artifacts_shows_one_message(root, monkeypatch):
    """An expected failure inside a page (here: a table read refused as stale) is one error message with
    the rebuild command, no traceback; a real bug keeps Streamlit's traceback. (The app's own run: AppTest
    runs a switched-to page without app.py around it, a browser never does.)"""
    from pages import reads

    def stale(*args, **kwargs):
        raise ValueError(
            "run 'mmoe-balanced': metrics.json changed since it was published; rebuild with: "
            "python -m analysis.precompute --run mmoe-balanced"
        )

    monkeypatch.setattr(reads, "read_json", stale)
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["run"] = "mmoe-balanced"
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    errors = [str(e.value) for e in at.error]
    assert len(errors) == 1 and "changed since it was published" in errors[0], errors
    assert "Overview and health" in errors[0] and "python \\-m analysis" in errors[0]

    def bug(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(reads, "read_json", bug)
    at.run()
    assert at.exception  # not an expected failure: Streamlit shows it with its traceback


# ------------------------------------------------------------------------------------------- other pages


@pytest.mark.parametrize("run", ALL_RUNS)
def test_utilization_page(root, run):
    _need(root, run)
    at = render("utilization", run)
    no_exceptions(at)
    assert plotly_count(at) >= 5  # load bars, heatmap, entropy, co-selection, specialisation
    text = markdown_text(at)
    for row in _store(root, run).layer_metrics().itertuples():
        assert f"**{row.layer}**" in text and row.verdict in text
    slices = next(t for t in frames(at) if "slice" in t.columns)
    assert len(slices) > 0


@pytest.mark.parametrize("run", ["mmoe-balanced", "mmoe-collapsing", "moemoe-qa"])
def test_dynamics_page(root, run):
    _need(root, run)
    at = render("dynamics", run)
    no_exceptions(at)
    store = _store(root, run)
    if store.has("dynamics"):
        assert plotly_count(at) >= 2
        spec = json.loads(at.get("plotly_chart")[0].proto.spec)
        from analysis.report import trigger_step

        trigger = trigger_step(store.manifest, store.read_json("config"))
        if trigger is not None:
            assert f"step {trigger}" in markdown_text(at)
            assert any(t.get("name", "").startswith("entropy trigger") for t in spec["data"])
        phases = [(p.step, p.label) for p in store.spec().training_phases]
        assert bool(phases) == (run == "moemoe-qa")  # the demo's MoEMoE recipe has three phase switches
        for step, label in phases:
            assert f"from **step {step}**, {label}" in markdown_text(at)
            assert any(t.get("name") == f"{label} (step {step})" for t in spec["data"])
    else:
        assert any("no training snapshots" in str(i.value) for i in at.info)


def test_compare_page_routes_the_same_example_with_both_runs(root):
    _need(root, "mmoe-balanced", "mmoe-collapsing")
    at = render("compare", "mmoe-balanced", compare="mmoe-collapsing")
    no_exceptions(at)
    verdicts = next(
        t
        for t in frames(at)
        if "mmoe-balanced" in t.columns and "mmoe-collapsing" in t.columns and "layer" in t.columns
    )
    assert "collapsed" in set(verdicts["mmoe-collapsing"])
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]
    assert any(t.startswith("mmoe-balanced:") for t in titles) and any(t.startswith("mmoe-collapsing:") for t in titles)
    assert at.query_params.get("compare") in ("mmoe-collapsing", ["mmoe-collapsing"])


def test_export_page_offers_the_report(root):
    _need(root, "mmoe-collapsing")
    at = render("export", "mmoe-collapsing")
    no_exceptions(at)
    assert any("python -m analysis.report --run mmoe-collapsing" in c.value for c in at.code)
    assert at.get("download_button"), "a download button is shown"


# ------------------------------------------------------------------------------------------- report


def test_build_report_is_self_contained_with_verdict_table(root):
    _need(root, "mmoe-collapsing")
    from analysis.report import build_report

    html = build_report("mmoe-collapsing", root)
    assert html.startswith("<!DOCTYPE html>")
    assert '<table id="verdicts">' in html
    assert not re.search(r"<script[^>]*\bsrc=", html)  # plotly.js inlined, nothing fetched
    assert html.count("Plotly.newPlot") >= 3 and "plotly.js" in html.lower()
    lm = _store(root, "mmoe-collapsing").layer_metrics()
    for row in lm.itertuples():
        assert f">{row.layer}<" in html and row.verdict in html
    assert html.count("Plotly.newPlot") >= 3
    assert 'id="model-card"' in html and "mmoe" in html


def test_report_cli_writes_the_file(root, tmp_path):
    _need(root, "mmoe-balanced")
    out = tmp_path / "report.html"
    env = {**os.environ, "MOESCOPE_ARTIFACTS": str(root), "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-m", "analysis.report", "--run", "mmoe-balanced", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert '<table id="verdicts">' in out.read_text()
    bad = subprocess.run(
        [sys.executable, "-m", "analysis.report", "--run", "no-such-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "no-such-run" in bad.stderr


# ------------------------------------------------------------------------------------------- clear states


def test_no_runs_yet_shows_the_build_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESCOPE_ARTIFACTS", str(tmp_path / "empty"))
    _clear_caches()
    for page in ("overview", "routing_explorer", "utilization", "dynamics", "compare", "export"):
        at = render(page, None)
        no_exceptions(at)
        infos = " ".join(str(i.value) for i in at.info)
        assert "make demo" in infos and "python -m demo_build" in infos, page


def _copy_run(src_root: Path, dst_root: Path, run: str) -> Path:
    """A private copy of a published run (a plain directory under dst_root/runs) to damage safely."""
    src = Path(os.path.realpath(src_root / "runs" / run))
    dst = dst_root / "runs" / run
    shutil.copytree(src, dst)
    return dst


def test_stale_run_says_so_with_the_rebuild_command(root, tmp_path, monkeypatch):
    _need(root, "mmoe-balanced")
    run_dir = _copy_run(root, tmp_path, "mmoe-balanced")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["checkpoint_hash"] = "0" * 64  # as if the checkpoint had been retrained since
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("MOESCOPE_ARTIFACTS", str(tmp_path))
    _clear_caches()
    at = render("overview", "mmoe-balanced")
    no_exceptions(at)
    warnings = " ".join(str(w.value) for w in at.warning)
    assert "stale" in warnings.lower() and "python -m analysis.precompute --run mmoe-balanced" in warnings


def test_partial_run_says_so_and_the_page_still_renders(root, tmp_path, monkeypatch):
    _need(root, "mmoe-balanced")
    run_dir = _copy_run(root, tmp_path, "mmoe-balanced")
    (run_dir / "coselection.parquet").unlink()
    monkeypatch.setenv("MOESCOPE_ARTIFACTS", str(tmp_path))
    _clear_caches()
    at = render("utilization", "mmoe-balanced")
    no_exceptions(at)
    warnings = " ".join(str(w.value) for w in at.warning)
    assert "partial" in warnings.lower() and "coselection.parquet is missing" in warnings
    assert "python -m analysis.precompute --run mmoe-balanced" in warnings
    assert any("co-selection" in str(i.value) for i in at.info)


def test_dynamics_shows_the_training_log_when_the_run_carries_one(root, tmp_path, monkeypatch):
    """The checkpoint's train_log.parquet, carried by the run as a ``train_log`` table (what the precompute
    is asked to add), is plotted: losses and per-layer routing indicators against the step."""
    _need(root, "mmoe-collapsing")
    log = Path(_store(root, "mmoe-collapsing").manifest["checkpoint"]) / "train_log.parquet"
    if not log.is_file():
        pytest.skip(f"the checkpoint has no {log.name}")
    run_dir = _copy_run(root, tmp_path, "mmoe-collapsing")
    shutil.copy(log, run_dir / "train_log.parquet")
    monkeypatch.setenv("MOESCOPE_ARTIFACTS", str(tmp_path))
    _clear_caches()
    at = render("dynamics", "mmoe-collapsing")
    no_exceptions(at)
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]
    assert "Training log: losses" in titles and any(t.startswith("Training log: routing") for t in titles), titles
