"""Live playground: edit an example, swap its picture, knock out an expert, and see routing, prediction and
attribution change now.

The inputs are built from the model's declaration: one widget per editable field
(``spec.editable_fields()``: a text area for long text, a text input for text, the example's / an
uploaded / a drawn picture for an image), each text held to its declared ``max_chars`` at the widget and
again before the model sees it (the page says when a text is cut or empty). An upload is checked and kept
once, at a bounded size for the model plus a thumbnail (``analysis.live.receive_upload``); pages and
charts draw thumbnails only.

First paint: the page's first run draws the inputs and the stored results of the base example and
schedules the live run (a fragment that reruns the page a moment later); every later run draws the
live model's results (the model loaded once per process, shared) in a fragment under a spinner. Layout
only: every number comes from ``analysis.live``.
"""

from __future__ import annotations

import hashlib

import plotly.graph_objects as go
import streamlit as st

from analysis import figures as F
from analysis.live import (
    MAX_UPLOAD_BYTES,
    MAX_UPLOAD_PIXELS,
    TOP_N,
    UploadError,
    attribute_live,
    clip_text,
    drawing_options,
    example_picture,
    live_example,
    project_live,
    receive_upload,
    routing_changes,
    run_live,
    thumbnail,
)
from analysis.source_weights import long_weights
from mmoe_core.spec import ExampleField, ModelSpec
from pages import reads, state, widgets

IMAGE_SOURCES = ("the example's picture", "upload a picture", "draw a picture")
UPLOAD_TYPES = ["png", "jpg", "jpeg", "webp"]
PAINTED_KEY = "pg_painted"  # set by the first run of a session: later runs draw the live results
START_KEY = "pg_start_runs"  # runs of the fragment that starts the live run after the first paint
START_AFTER_S = 0.3


# -- inputs --------------------------------------------------------------------------------------------


def text_widget(run: str, index: int, f: ExampleField, stored) -> str:
    """The widget of one editable text field (held to max_chars), with a note when cut or empty."""
    default, stored_note = clip_text(f, "" if stored is None or stored != stored else str(stored))
    key = f"pg_{run}_{index}_{f.name}"
    if f.kind == "long_text":
        value = st.text_area(f.label, value=default, height=140, max_chars=f.max_chars, key=key)
    else:
        value = st.text_input(f.label, value=default, max_chars=f.max_chars, key=key)
    # max_chars stops the browser (and Streamlit cuts a longer value it receives); the text is cut here
    # once more before any tokeniser sees it
    value, note = clip_text(f, value)
    if note is None and value == default and stored_note:
        note = stored_note  # the example's own text was longer than the model takes
    elif note is None and len(value) >= f.max_chars:
        note = (
            f"{f.label}: {f.max_chars} characters, the most the model takes; anything typed or pasted past them is cut."
        )
    if note:
        st.caption(note)
    return value


def kept_upload(key: str, upload):
    """The accepted upload of one image field (an :class:`analysis.live.UploadedPicture`: the model's
    copy and a thumbnail), or None. Each file is checked and resized once, when it arrives (Streamlit
    hands the same file to every rerun); a refused file keeps its message and the previous picture."""
    held_key, refused_key = f"{key}_kept_upload", f"{key}_refused_upload"
    held = st.session_state.get(held_key)  # (file_id, UploadedPicture)
    if upload is not None:
        file_id = getattr(upload, "file_id", None) or f"{upload.name}:{upload.size}"
        refused = st.session_state.get(refused_key)
        if (held is None or held[0] != file_id) and (refused is None or refused[0] != file_id):
            try:
                held = st.session_state[held_key] = (file_id, receive_upload(upload.getvalue(), upload.name))
            except UploadError as exc:
                refused = st.session_state[refused_key] = (file_id, str(exc))
        if refused is not None and refused[0] == file_id:
            st.error(
                f"Upload refused: {state.escape_markdown(refused[1])}. "
                + ("Keeping the previous picture." if held else "Keeping the example's picture.")
            )
    return held[1] if held else None


def picture_controls(f: ExampleField):
    """The picture of one editable image field: (PIL image or None, drawn attributes or None, caption)."""
    key = f"pg_{f.name}"
    source = st.radio(f.label, IMAGE_SOURCES, horizontal=True, key=f"{key}_source")
    if source == IMAGE_SOURCES[1]:
        upload = st.file_uploader(
            f"PNG, JPEG or WebP, up to {MAX_UPLOAD_BYTES // (1024 * 1024)} MB and "
            f"{MAX_UPLOAD_PIXELS / 1e6:g} megapixels",
            type=UPLOAD_TYPES,
            max_upload_size=max(1, MAX_UPLOAD_BYTES // (1024 * 1024)),
            key=f"{key}_upload",
        )
        good = kept_upload(key, upload)
        if good is not None:
            st.caption(state.escape_markdown(good.detail))
            return good.model, None, good.caption
        return None, None, "the example's picture (nothing uploaded yet)"
    if source == IMAGE_SOURCES[2]:
        opts = drawing_options()
        c = st.columns(4)
        attrs = {
            name: c[i].selectbox(name.capitalize(), opts[name], key=f"{key}_draw_{name}")
            for i, name in enumerate(("shape", "colour", "pattern", "background"))
        }
        with st.expander("Finish and trim"):
            d = st.columns(2)
            attrs["finish"] = d[0].selectbox("Finish", opts["finish"], key=f"{key}_draw_finish")
            attrs["trim"] = d[1].selectbox("Trim", opts["trim"], key=f"{key}_draw_trim")
        return None, attrs, "drawn: " + ", ".join(f"{v}" for v in attrs.values() if v not in ("none", "matte"))
    return None, None, "the example's picture"


def knockout_controls(spec: ModelSpec) -> tuple[tuple[str, int] | None, bool]:
    st.markdown("##### Knock out an expert")
    layers = {layer.name: layer for layer in spec.routed_layers}
    name = st.selectbox("Layer", ["none", *layers], key="pg_ko_layer")
    knockout = None
    if name != "none":
        layer = layers[name]
        expert = st.selectbox(
            "Expert",
            list(range(layer.num_experts)),
            key="pg_ko_expert",
            help=f"{layer.num_experts} experts, top-{layer.top_k}, gate {layer.gate_kind}",
        )
        knockout = (name, int(expert))
    want_attr = st.toggle("Attribution (integrated gradients, 16 steps)", value=True, key="pg_attr")
    return knockout, want_attr


# -- live results --------------------------------------------------------------------------------------


def _fingerprint(example: dict) -> str:
    """Identifies a live example's content (texts and picture pixels) for the session cache."""
    h = hashlib.sha256()
    for key in sorted(example):
        value = example[key]
        if hasattr(value, "tobytes"):
            h.update(key.encode() + value.tobytes())
        elif isinstance(value, (str, int, float)) or value is None:
            h.update(f"{key}={value!r};".encode())
    return h.hexdigest()


def _baseline(run: str, adapter, example: dict):
    """The same example without the knockout (no attribution), kept per session for the last few examples."""
    cache = st.session_state.setdefault("pg_baselines", {})
    key = (run, id(adapter), _fingerprint(example))
    if key not in cache:
        if len(cache) >= 8:
            cache.pop(next(iter(cache)))
        cache[key] = run_live(adapter, example, knockout=None, attribution=False)
    return cache[key]


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1000:.0f} ms"


def timing_badge(slot, result, want_attr: bool) -> None:
    t = result.timings
    attribution = _ms(t.get("attribution")) if want_attr and "attribution" in t else ("…" if want_attr else "off")
    with slot.container():
        st.badge(
            f"{result.device.upper()} · forward {_ms(t.get('forward'))} · routing {_ms(t.get('routing'))} · "
            f"attribution {attribution} · total {_ms(t.get('total'))}",
            icon=":material/timer:",
            color="green" if result.device.startswith("cuda") else "gray",
        )


def prediction(result, baseline, knockout, spec: ModelSpec) -> None:
    item = spec.prediction.item or "prediction"
    m = st.columns(3)
    if result.kind == "ranking":
        rank = result.prediction.get("rank")
        before = baseline.prediction.get("rank") if baseline else None
        m[0].metric(f"top-1 {item}", result.predicted or "–")
        m[1].metric(
            "gold rank",
            "–" if rank is None else int(rank),
            delta=None if before is None or rank is None else int(rank) - int(before),
            delta_color="inverse",
            help=f"rank of the gold {item} among all candidates (1 = best)"
            + ("; the change is against the same example without the knockout" if knockout else ""),
        )
        m[2].metric("top-1 score", f"{result.prediction.get('score', float('nan')):.3f}")
        table = result.ranking.copy()
        table["gold"] = table["gold"].map({True: "gold", False: ""})
        if baseline is not None and baseline.ranking is not None:
            before = baseline.ranking["name"].astype(str).tolist()[: len(table)]
            table["without knockout"] = before + [""] * (len(table) - len(before))
        st.dataframe(
            table.rename(columns={"name": item}),
            hide_index=True,
            column_config={"score": st.column_config.NumberColumn(format="%.3f")},
        )
        if len(table) < TOP_N:
            st.caption(f"The model reports its top {len(table)}.")
        return
    m[0].metric(item, result.predicted or "–")
    m[1].metric(f"gold {item}", result.gold or "–")
    m[2].metric("correct", "–" if result.correct is None else ("yes" if result.correct else "no"))
    if result.kind == "lm_loss" and result.prediction.get("loss") is not None:
        st.caption(
            f"Mean per-token loss {float(result.prediction['loss']):.3f}; likely next tokens: "
            + ", ".join(map(str, result.prediction.get("next_tokens") or []))
        )
    if baseline is not None:
        st.caption(f"Without the knockout the {item} is **{baseline.predicted or '–'}**.")


def routing(result, baseline, knockout, spec: ModelSpec, picture) -> None:
    st.subheader("Routing")
    knocked_layer, knocked_expert = knockout if knockout else (None, None)
    if knockout:
        changes = routing_changes(baseline.routing, result.routing)
        total = int(changes["changed"].sum()) if len(changes) else 0
        st.metric(
            f"positions whose top-1 expert changed with expert {knocked_expert} of {knocked_layer} out",
            f"{total} of {int(changes['positions'].sum()) if len(changes) else 0}",
        )
        st.dataframe(
            changes.rename(columns={"changed_share": "share changed"}),
            hide_index=True,
            column_config={
                "share changed": st.column_config.ProgressColumn(min_value=0, max_value=1, format="percent")
            },
        )
    tabs = st.tabs([layer.name for layer in spec.routed_layers])
    for layer, tab in zip(spec.routed_layers, tabs):
        with tab:
            st.caption(
                f"{layer.num_experts} experts, top-{layer.top_k}, gate {layer.gate_kind} · routes "
                f"{layer.routed}; the gate sees {layer.gate_sees}"
                + (f" · **expert {knocked_expert} is knocked out**" if layer.name == knocked_layer else "")
            )
            rows = result.routing[result.routing["layer"] == layer.name]
            for call in dict.fromkeys(rows["call"]):
                widgets.show_call_routing(
                    rows, layer.name, call, layer.num_experts, key=f"pg_route_{layer.name}_{call}", picture=picture
                )


def source_weights(result, spec: ModelSpec) -> None:
    for output in spec.output("source_weights"):
        payload = result.extras.get(output.name)
        if not payload:
            continue
        st.subheader(f"{output.name}: source weights of this example")
        st.plotly_chart(
            F.source_weight_positions(long_weights(payload, output), output.sources, "", height=300),
            key=f"pg_sw_{output.name}",
        )


def on_the_map(run: str, store, result) -> None:
    with st.expander("This example on the run's embedding map"):
        proj = reads.table(run, "projection")
        point = project_live(store, result.representation) if proj is not None else None
        if point is None:
            st.caption("The run has no fitted map (or the model gives no representation).")
            return
        fig = go.Figure()
        fig.add_scatter(
            x=proj["x"], y=proj["y"], mode="markers", name="run examples", marker=dict(size=5, color="lightgrey")
        )
        fig.add_scatter(
            x=[point["x"]],
            y=[point["y"]],
            mode="markers",
            name="live example",
            marker=dict(size=16, symbol="star", color="crimson", line=dict(width=1, color="black")),
        )
        fig.update_layout(height=360, margin=dict(t=10, b=10, l=10, r=10), legend_orientation="h")
        st.plotly_chart(fig, key="pg_map")
        st.caption(
            f"Placed by the stored {point['method'].upper()} map; distance to the nearest fitted example "
            f"{point['distance']:.3g}."
        )


@st.fragment
def live_section(
    run: str,
    store,
    spec: ModelSpec,
    index: int,
    texts: dict,
    pictures: dict,
    knockout: tuple[str, int] | None,
    want_attr: bool,
) -> None:
    """Everything the live model does for the edited example, after the stored results are on screen."""
    try:
        with st.spinner("Loading the model (once per server)…"):
            adapter, by_index, lock = reads.live_model(run)
    except Exception as exc:  # a missing checkpoint / dataset, a refused config: say so, keep the page alive
        state.show_failure(f"Cannot load the model of run {state.literal(run)} for a live run", exc)
        return
    if index not in by_index:
        st.error(f"Example {index} is not in the run's dataset split any more; {state.rebuild_hint(run)}.")
        return
    base = by_index[index]
    live_spec = adapter.spec()
    changed = {name: value for name, value in texts.items() if value != str(base.get(name) or "")}
    example = live_example(live_spec, base, texts=changed)
    for name, (image, drawn, _) in pictures.items():
        if image is not None or drawn is not None:
            example = live_example(live_spec, example, image=image, drawn_attributes=drawn, image_field=name)
    with lock, st.spinner("Running the example…"):  # routing and prediction first; the attribution follows
        result = run_live(adapter, example, knockout=knockout, attribution=False)
        baseline = _baseline(run, adapter, example) if knockout else None
    badge = st.empty()
    timing_badge(badge, result, want_attr)
    picture = thumbnail(example_picture(example, widgets.image_fields(spec)))  # what the page draws
    p1, p2 = st.columns([1, 3])
    with p1:
        if picture is not None:
            st.image(picture, caption=next((c for _, _, c in pictures.values()), "the example's picture"), width=160)
        elif widgets.image_fields(spec):
            st.caption("no picture (the model sees an all-zero image)")
    with p2:
        prediction(result, baseline, knockout, spec)
    routing(result, baseline, knockout, spec, picture)
    source_weights(result, spec)

    st.subheader("Attribution")
    if not want_attr:
        st.caption("Attribution is off.")
    else:
        with lock, st.spinner("Integrated gradients…"):
            result.attribution, result.attribution_error, seconds = attribute_live(adapter, example, knockout)
        result.timings["attribution"] = seconds
        result.timings["total"] += seconds
        timing_badge(badge, result, want_attr)
        if result.attribution is None:
            st.warning(f"Attribution failed: {state.escape_markdown(result.attribution_error)}")
        else:
            st.caption(
                f"Integrated gradients of the {result.attribution['target'].iloc[0]} "
                f"{'with the knockout ' if knockout else ''}w.r.t. each input (red up, blue down)."
            )
            widgets.show_delta(result.attribution)
            widgets.show_inputs(result.attribution, picture, "pg_attr", spec, grids=adapter.input_grids(example))
    on_the_map(run, store, result)


@st.fragment(run_every=START_AFTER_S)
def start_live() -> None:
    """The page's first run ends with this note; a moment after the first paint the browser reruns the
    fragment, which reruns the page: that run (and every later one) draws the live results. A full rerun
    cancels the fragment's timer."""
    runs = st.session_state[START_KEY] = st.session_state.get(START_KEY, 0) + 1
    if runs > 1:
        st.rerun()
    st.caption(
        ":material/hourglass_top: Starting the live model: its routing, prediction and attribution of "
        "this example follow in a moment."
    )


def stored_results(run: str, index: int, row: dict, spec: ModelSpec) -> None:
    """What the precompute stored for the base example: its prediction, by name."""
    stored = reads.predictions(run)
    hit = stored[stored["example_index"] == index] if stored is not None and "example_index" in stored else None
    if hit is not None and len(hit):
        st.caption("Stored prediction of the base example · " + widgets.prediction_text(hit.iloc[0].to_dict(), spec))


def render() -> None:
    st.title("Live playground")
    st.caption(
        "Edit an example, swap its picture, knock out an expert: the model runs now and the routing, "
        "prediction and attribution below follow."
    )
    run, store = state.require_run()
    spec = reads.spec(run)
    examples = reads.examples(run)
    if examples is None or examples.empty:
        st.info(f"Run `{run}` has no examples; {state.rebuild_hint(run)}.")
        return
    rows = {int(r["example_index"]): r for r in examples.to_dict("records")}
    index = state.synced_example(
        "Base example",
        list(rows),
        key=f"pg_base_{run}",
        among="this run's examples",
        format_func=lambda i: widgets.example_title(rows[i], spec, 90),
    )
    row = rows[index]
    edit, side = st.columns([3, 2])
    with edit:
        st.markdown("##### Inputs")
        fields = spec.editable_fields()
        if not fields:
            st.caption("The model declares no editable input; the base example runs as it is.")
        texts = {f.name: text_widget(run, index, f, row.get(f.name)) for f in fields if f.kind in ("text", "long_text")}
        pictures = {f.name: picture_controls(f) for f in fields if f.kind == "image"}
    with side:
        knockout, want_attr = knockout_controls(spec)
    stored_results(run, index, row, spec)
    if not st.session_state.get(PAINTED_KEY):  # the first run: paint now, run the model right after
        st.session_state[PAINTED_KEY] = True
        st.session_state[START_KEY] = 0
        start_live()
        return
    live_section(run, store, spec, index, texts, pictures, knockout, want_attr)


render()
