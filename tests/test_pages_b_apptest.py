"""AppTest of the source-weights, attributions, embedding-map, playground and dataset pages against real
(tiny) demo runs.

Each page is run on its own (``AppTest.from_file``) with ``?run=`` in the URL, as a link would open it;
the assertions compare what the page shows with what the run's tables say.
"""
from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from analysis import live, source_weights
from analysis.store import RunStore
from tests.test_live import MMOE_RUN, QA_RUN

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600


@pytest.fixture(scope="module")
def root(demo_artifacts) -> Path:
    return Path(demo_artifacts)


def _page(name: str, run: str, **params) -> AppTest:
    at = AppTest.from_file(str(REPO / "pages" / f"{name}.py"), default_timeout=TIMEOUT)
    at.query_params["run"] = run
    for k, v in params.items():
        at.query_params[k] = str(v)
    return at


def _ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.message for e in at.exception]
    return at


def _metric(at: AppTest, label_start: str):
    hits = [m for m in at.metric if m.label.startswith(label_start)]
    assert hits, f"no metric starting {label_start!r}; metrics: {[m.label for m in at.metric]}"
    return hits[0]


def _chart_points(chart) -> int:
    """Number of x values over the traces of a plotly chart (plain lists or plotly's typed "bdata" arrays)."""
    spec = json.loads(chart.proto.spec)
    total = 0
    for trace in spec["data"]:
        x = trace.get("x")
        if isinstance(x, dict) and "bdata" in x:
            total += len(base64.b64decode(x["bdata"])) // np.dtype(x["dtype"]).itemsize
        else:
            total += len(x or [])
    return total


def test_source_weights_page_shows_the_agreement_with_its_definition(root):
    at = _ok(_page("source_weights", QA_RUN).run())
    with RunStore(QA_RUN, root) as store:
        output = store.spec().output("source_weights")[0]
        summary = source_weights.summarise(store.table(output.name), store.examples(), output)
    assert at.title[0].value == "Source weights"
    metric = _metric(at, f"agreement with {output.truth_label.replace('_', ' ')}")
    assert metric.value == f"{summary.agreement:.1%}"
    assert re.fullmatch(r"\d+\.\d%", metric.value)
    assert any("Definition" in c.value and "dominant source" in c.value for c in at.caption)
    assert len(at.dataframe) >= 1  # the confusion table
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert len(charts) >= 3  # by the truth label, by another label, one example's positions
    names = {t.get("name") for c in charts for t in c["data"]}
    assert {s.label for s in output.sources} <= names  # the declared source labels, not column names


def test_source_weights_page_says_when_a_run_declares_none(root):
    at = _ok(_page("source_weights", MMOE_RUN).run())
    assert any("declares no output of kind" in i.value for i in at.info)
    assert not [m for m in at.metric if m.label.startswith("agreement")]


def test_attributions_page_shows_the_ig_delta_of_the_example(root):
    with RunStore(MMOE_RUN, root) as store:
        table = store.table("attributions")
        image_input = store.spec().image_inputs()[0].name
    with_picture = table[table["input"] == image_input].groupby("example_index")["abs_value"].sum()
    chosen = int(with_picture.idxmax())  # the example whose picture matters most
    stored = live.convergence_delta(live.attribution_rows(table, chosen, "ig", "score"))
    at = _ok(_page("attributions", MMOE_RUN, example=chosen).run())
    deltas = [m for m in at.metric if m.label == "IG convergence delta"]
    assert deltas, "no IG delta shown"
    assert math.isclose(float(deltas[0].value), stored, rel_tol=1e-2, abs_tol=1e-3)
    assert any(m.value.startswith(f"**{image_input}**") for m in at.markdown)
    assert any("<span" in m.value and "background:rgba" in m.value for m in at.markdown)  # coloured tokens
    assert len(at.get("plotly_chart")) >= 3  # patch heatmaps (prediction, router) + the modality-share chart


def test_embedding_map_renders_every_example(root):
    with RunStore(MMOE_RUN, root) as store:
        n = len(store.table("projection"))
    at = _ok(_page("embedding_map", MMOE_RUN).run())
    charts = at.get("plotly_chart")
    assert charts and _chart_points(charts[0]) == n
    at.selectbox(key="emb_colour").set_value("correctness").run()
    _ok(at)
    assert _chart_points(at.get("plotly_chart")[0]) == n


def test_playground_knockout_shows_the_change(root):
    adapter = live.load_live_adapter(MMOE_RUN, root, device="cpu")
    examples = live.load_base_examples(adapter, MMOE_RUN, root)
    layer = adapter.routed_layers()[0].name
    base = live.run_live(adapter, examples[0], attribution=False)
    rows = base.routing[base.routing["layer"] == layer]
    rows = rows[rows["call"] == rows["call"].iloc[0]]
    expert = int(rows["top1"].value_counts().idxmax())
    must_change = int((rows["top1"] == expert).sum())

    at = _page("playground", MMOE_RUN).run()
    _ok(at)
    assert _metric(at, "gold rank") and _metric(at, "IG convergence delta")
    assert any("badge[" in m.value and "forward" in m.value and " ms" in m.value for m in at.markdown)
    at.toggle(key="pg_attr").set_value(False)
    at.selectbox(key="pg_ko_layer").set_value(layer).run()
    at.selectbox(key="pg_ko_expert").set_value(expert).run()
    _ok(at)
    changed = _metric(at, "positions whose top-1 expert changed")
    n_changed, n_total = (int(x) for x in re.fullmatch(r"(\d+) of (\d+)", changed.value).groups())
    assert n_changed >= must_change > 0 and n_total > 0
    assert f"expert {expert} of {layer}" in changed.label


@pytest.mark.parametrize("run", [MMOE_RUN, QA_RUN])
def test_playground_builds_its_inputs_from_the_declared_fields(root, run):
    with RunStore(run, root) as store:
        spec = store.spec()
    at = _ok(_page("playground", run).run())
    editable = spec.editable_fields()
    texts = [f for f in editable if f.kind == "text"]
    areas = [f for f in editable if f.kind == "long_text"]
    assert [w.label for w in at.text_input] == [f.label for f in texts]
    assert [w.label for w in at.text_area] == [f.label for f in areas]
    assert {w.label for w in at.radio} >= {f.label for f in editable if f.kind == "image"}
    assert all(w.max_chars == f.max_chars for w, f in zip(at.text_input, texts))
    # a text past its limit is cut, and the page says so; an empty one is named too
    first = (texts or areas)[0]
    widget = (at.text_input if texts else at.text_area)[0]
    widget.set_value("")
    at.toggle(key="pg_attr").set_value(False).run()
    _ok(at)
    assert any(f"{first.label} is empty" in c.value for c in at.caption)
    if spec.prediction.kind == "ranking":
        table = next(d.value for d in at.dataframe if spec.prediction.item in d.value.columns)
        assert table[spec.prediction.item].map(lambda n: isinstance(n, str) and not n.isdigit()).all()


def test_dataset_browser_shows_every_declared_world(root):
    from mmoe_core.data.views import views
    at = _ok(AppTest.from_file(str(REPO / "pages" / "dataset_browser.py"), default_timeout=TIMEOUT).run())
    assert [t.label for t in at.tabs] == [f"{v.title} · {t.name}" for v in views() for t in v.tables]
    assert len(at.dataframe) >= len(at.tabs)
