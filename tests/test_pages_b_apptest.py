"""AppTest of the QGA, attributions, embedding-map and playground pages against real (tiny) demo runs.

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

from analysis import live
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


def test_qga_page_shows_the_agreement_with_its_definition(root):
    at = _ok(_page("qga", QA_RUN).run())
    with RunStore(QA_RUN, root) as store:
        summary = live.qga_summary(store.table("qga"), store.examples())
    metric = _metric(at, "QGA agreement with answer source")
    assert metric.value == f"{summary.agreement:.1%}"
    assert re.fullmatch(r"\d+\.\d%", metric.value)
    assert any("Definition" in c.value and "dominant QGA source" in c.value for c in at.caption)
    assert len(at.dataframe) >= 1  # the confusion table
    assert len(at.get("plotly_chart")) >= 3  # by source, by type, one question's tokens


def test_qga_page_says_when_a_run_has_no_qga_output(root):
    at = _ok(_page("qga", MMOE_RUN).run())
    assert any("declares no QGA output" in i.value for i in at.info)
    assert not [m for m in at.metric if m.label.startswith("QGA agreement")]


def test_attributions_page_shows_the_ig_delta_of_the_example(root):
    with RunStore(MMOE_RUN, root) as store:
        table = store.table("attributions")
    with_picture = table[table["input"] == "mention_image"].groupby("example_index")["abs_value"].sum()
    chosen = int(with_picture.idxmax())  # the example whose picture matters most
    stored = live.convergence_delta(live.attribution_rows(table, chosen, "ig", "score"))
    at = _ok(_page("attributions", MMOE_RUN, example=chosen).run())
    deltas = [m for m in at.metric if m.label == "IG convergence delta"]
    assert deltas, "no IG delta shown"
    assert math.isclose(float(deltas[0].value), stored, rel_tol=1e-2, abs_tol=1e-3)
    assert any(m.value.startswith("**mention_image**") for m in at.markdown)
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
    rows = base.routing[(base.routing["layer"] == layer) & (base.routing["call"] == "mention")]
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
