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

    at = _page("playground", MMOE_RUN).run().run()  # the first run paints; the live results follow
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
    # a text past its limit is cut (a request need not respect the widget's max_chars), and the page says
    # so; an empty one is named too
    first = (texts or areas)[0]
    widget = (at.text_input if texts else at.text_area)[0]
    widget.set_value("word " * (first.max_chars // 5 + 400))
    at.toggle(key="pg_attr").set_value(False).run()
    _ok(at)
    assert len((at.text_input if texts else at.text_area)[0].value) == first.max_chars
    assert any(
        f"{first.label}: {first.max_chars} characters, the most the model takes" in c.value for c in at.caption
    ), [c.value for c in at.caption]
    widget = (at.text_input if texts else at.text_area)[0]
    widget.set_value("")
    at.run()
    _ok(at)
    assert any(f"{first.label} is empty" in c.value for c in at.caption)
    if spec.prediction.kind == "ranking":
        table = next(d.value for d in at.dataframe if spec.prediction.item in d.value.columns)
        assert table[spec.prediction.item].map(lambda n: isinstance(n, str) and not n.isdigit()).all()


def test_playground_first_run_paints_the_stored_results_without_the_model(root, monkeypatch):
    """The first run draws the inputs and the stored prediction and schedules the live run: the model is
    not loaded before the first paint. The next run draws the live results."""
    loads = []
    real = live.load_live_adapter

    def counted(*args, **kwargs):
        loads.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(live, "load_live_adapter", counted)
    import streamlit as st

    st.cache_resource.clear()
    at = _ok(_page("playground", MMOE_RUN).run())
    assert loads == [] and not at.metric
    assert any(c.value.startswith("Stored prediction of the base example") for c in at.caption)
    assert any("Starting the live model" in c.value for c in at.caption)
    assert at.session_state["pg_painted"] is True
    _ok(at.run())
    assert len(loads) == 1 and _metric(at, "gold rank")


def _png_bytes(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _pictures_in(value, seen=None, depth=0):
    """Every PIL image reachable from ``value`` (dicts, lists, tuples, dataclass-like objects)."""
    from PIL import Image

    seen = set() if seen is None else seen
    if id(value) in seen or depth > 6:
        return
    seen.add(id(value))
    if isinstance(value, Image.Image):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _pictures_in(v, seen, depth + 1)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _pictures_in(v, seen, depth + 1)
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        for v in vars(value).values():
            yield from _pictures_in(v, seen, depth + 1)


def test_playground_keeps_an_upload_once_and_charts_get_thumbnails(root):
    """A 5000 x 5000 upload (the pixel limit) is kept at the model's bounded size: no full-resolution
    picture in session state, and no chart embeds more than a thumbnail (the attribution chart used to
    carry the whole picture: "RangeError: Invalid string length" in the browser)."""
    from PIL import Image

    big = Image.new("RGB", (5000, 5000), (235, 235, 240))
    big.paste((200, 30, 30), (1000, 1000, 4000, 4000))
    data = _png_bytes(big)
    at = _page("playground", MMOE_RUN).run().run()
    field = next(f for f in RunStore(MMOE_RUN, root).spec().editable_fields() if f.kind == "image")
    at.radio(key=f"pg_{field.name}_source").set_value("upload a picture").run()
    _ok(at)
    at.file_uploader[0].set_value(("big.png", data, "image/png")).run()
    _ok(at)
    assert not at.error, [e.value for e in at.error]
    assert any("5000 x 5000 pixels" in str(c.value) and "kept at" in str(c.value) for c in at.caption), [
        c.value for c in at.caption
    ]
    sizes = [max(p.size) for key in list(at.session_state) for p in _pictures_in(at.session_state[key])]
    assert sizes and max(sizes) <= live.MODEL_SIDE, sizes
    charts = at.get("plotly_chart")
    assert charts
    for chart in charts:
        assert len(chart.proto.spec) < 1_500_000, len(chart.proto.spec)
        for trace in json.loads(chart.proto.spec)["data"]:
            if trace.get("type") == "image":
                z = trace["z"]  # nested lists, or plotly's typed array {"dtype", "bdata", "shape": "h, w, 3"}
                shape = [int(n) for n in z["shape"].split(",")] if isinstance(z, dict) else np.shape(z)
                assert shape[0] <= 256 and shape[1] <= 256, shape
    assert any(t.get("type") == "image" for c in charts for t in json.loads(c.proto.spec)["data"]), (
        "the attribution chart draws the (thumbnail of the) uploaded picture"
    )
    # the same file on the next rerun is not decoded again; a 16-bit grayscale PNG keeps its tones
    kept = at.session_state[f"pg_{field.name}_kept_upload"]
    _ok(at.run())
    assert at.session_state[f"pg_{field.name}_kept_upload"][1] is kept[1]
    ramp = np.linspace(0, 65535, 128 * 128).reshape(128, 128).astype(np.uint16)
    at.file_uploader[0].set_value(("ramp16.png", _png_bytes(Image.fromarray(ramp)), "image/png")).run()
    _ok(at)
    model = np.asarray(at.session_state[f"pg_{field.name}_kept_upload"][1].model)
    assert abs(float(model.mean()) - 127.5) < 3, float(model.mean())  # clipped, it would be about 254


def test_playground_refused_upload_says_why_and_keeps_the_picture(root):
    at = _page("playground", MMOE_RUN).run().run()
    field = next(f for f in RunStore(MMOE_RUN, root).spec().editable_fields() if f.kind == "image")
    at.radio(key=f"pg_{field.name}_source").set_value("upload a picture").run()
    at.file_uploader[0].set_value(("notes.png", b"not a picture at all\n" * 20, "image/png")).run()
    _ok(at)
    assert any("Upload refused" in e.value and "not a PNG, JPEG or WebP" in e.value for e in at.error)
    assert _metric(at, "gold rank")  # the live run goes on with the example's picture


@pytest.mark.parametrize(
    "page,run",
    [("playground", MMOE_RUN), ("attributions", MMOE_RUN), ("source_weights", QA_RUN), ("routing_explorer", MMOE_RUN)],
)
@pytest.mark.parametrize("value", ["\u00b2", "\u0663", "99999", "-1", "1e3", "**7**"])
def test_bad_example_param_gives_one_clear_message(root, page, run, value):
    """?example=² (a digit to Python's int(), not to a link), other non-ASCII digits, out-of-range and
    non-numbers: a warning that quotes the value literally, never a traceback."""
    at = _ok(_page(page, run, example=value).run())
    warnings = [str(w.value) for w in at.warning if "The link asks for example" in str(w.value)]
    assert warnings, [w.value for w in at.warning]
    assert value.strip("*") in warnings[0] and "`" in warnings[0]
    assert "Traceback" not in warnings[0] and "/" not in warnings[0].split("Showing")[0]
    if page == "playground":  # the run after the first paint (the live results) still says so
        _ok(at.run())
        assert [str(w.value) for w in at.warning if "The link asks for example" in str(w.value)] == warnings


def test_a_refused_model_config_is_one_message_without_a_traceback(root, monkeypatch):
    """load_adapter refusing a config (an absurd size) reaches the playground as one message."""
    from mmoe_core.errors import ConfigError

    def refuse(*args, **kwargs):
        raise ConfigError("checkpoint config.json: cross_hidden 1000000000 is out of range: allowed 1 .. 65,536")

    monkeypatch.setattr(live, "load_live_adapter", refuse)
    import streamlit as st

    st.cache_resource.clear()
    at = _ok(_page("playground", MMOE_RUN).run().run())
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "cross\\_hidden 1000000000 is out of range" in errors[0], errors
    assert not at.expander or all("bug report" not in str(x.label) for x in at.expander)
    st.cache_resource.clear()


def test_dataset_browser_shows_every_declared_world(root):
    from mmoe_core.data.views import views

    at = _ok(AppTest.from_file(str(REPO / "pages" / "dataset_browser.py"), default_timeout=TIMEOUT).run())
    tables = {f"{v.title} · {t.name}": f"{v.title}: {t.description}." for v in views() for t in v.tables}
    assert [t.label for t in at.tabs] == list(tables)
    assert len(at.dataframe) == 1, "only the open tab's table is read and drawn"
    for label, caption in tables.items():  # each tab, opened, shows its own table
        at.query_params["table"] = label  # the open tab is kept in the URL
        at = _ok(at.run())
        assert len(at.dataframe) == 1 and caption in [c.value for c in at.caption], label
