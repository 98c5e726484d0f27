"""Live playground: edit an example (text, question / context, picture), knock out an expert, and see
routing, prediction and attribution change now.

Layout only: every number comes from ``analysis.live`` (load the run's checkpoint, build the live
example, run it with routing records, attribution and timings, place it on the run's map).
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from analysis.live import (MAX_UPLOAD_BYTES, TOP_N, UploadError, attribute_live, check_upload, drawing_options,
                           example_picture, live_example, project_live, routing_changes, run_live, text_fields)
from pages import common
from pages.attributions import open_live_model, show_delta, show_inputs
from pages.qga import SOURCE_COLOURS

TEXT_LABELS = {"mention_text": "Mention sentence", "question": "Question", "context": "Context"}
IMAGE_SOURCES = ("the example's picture", "upload a picture", "draw a picture")
UPLOAD_TYPES = ["png", "jpg", "jpeg", "webp"]


def _fingerprint(example: dict) -> str:
    """Identifies a live example's content (text fields and picture pixels) for the session cache."""
    import hashlib
    h = hashlib.sha256()
    for key in sorted(example):
        value = example[key]
        if key == "image" and value is not None:
            h.update(value.tobytes())
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


# -- figures -------------------------------------------------------------------------------------------

def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1000:.0f} ms"


def _timing_badge(slot, result, want_attr: bool) -> None:
    t = result.timings
    attribution = _ms(t.get("attribution")) if want_attr and "attribution" in t else ("…" if want_attr else "off")
    with slot.container():
        st.badge(f"{result.device.upper()} · forward {_ms(t.get('forward'))} · routing {_ms(t.get('routing'))} · "
                 f"attribution {attribution} · total {_ms(t.get('total'))}",
                 icon=":material/timer:", color="green" if result.device.startswith("cuda") else "gray")


# -- page ----------------------------------------------------------------------------------------------

def _example_label(ex: dict) -> str:
    text = ex.get("sentence") or ex.get("question") or ex.get("text") or ""
    tags = ", ".join(f"{k}={v}" for k, v in (ex.get("labels") or {}).items())
    return f"#{ex['index']} · {text[:90]} ({tags})"


def _picture_controls():
    """The picture for the live example: (PIL image or None, drawn attributes or None, caption)."""
    source = st.radio("Picture", IMAGE_SOURCES, horizontal=True, key="pg_image_source")
    if source == IMAGE_SOURCES[1]:
        upload = st.file_uploader("PNG, JPEG or WebP, up to 5 MB and 25 megapixels", type=UPLOAD_TYPES,
                                  max_upload_size=max(1, MAX_UPLOAD_BYTES // (1024 * 1024)), key="pg_upload")
        good = st.session_state.get("pg_good_upload")
        if upload is not None:
            try:
                image = check_upload(upload.getvalue(), upload.name)
                st.session_state["pg_good_upload"] = good = (upload.name, image)
            except UploadError as exc:
                st.error(f"Upload refused: {exc}. "
                         + ("Keeping the previous picture." if good else "Keeping the example's picture."))
        if good:
            return good[1], None, f"uploaded: {good[0]}"
        return None, None, "the example's picture (nothing uploaded yet)"
    if source == IMAGE_SOURCES[2]:
        opts = drawing_options()
        c = st.columns(4)
        attrs = {
            "shape": c[0].selectbox("Shape", opts["shape"], key="pg_draw_shape"),
            "colour": c[1].selectbox("Colour", opts["colour"], key="pg_draw_colour"),
            "pattern": c[2].selectbox("Pattern", opts["pattern"], key="pg_draw_pattern"),
            "background": c[3].selectbox("Background", opts["background"], key="pg_draw_background"),
        }
        with st.expander("Finish and trim (product pictures)"):
            d = st.columns(2)
            attrs["finish"] = d[0].selectbox("Finish", opts["finish"], key="pg_draw_finish")
            attrs["trim"] = d[1].selectbox("Trim", opts["trim"], key="pg_draw_trim")
        return None, attrs, "drawn: " + ", ".join(f"{v}" for v in attrs.values() if v not in ("none", "matte"))
    return None, None, "the example's picture"


def main() -> None:
    st.title("Live playground")
    st.caption("Edit an example, swap its picture, knock out an expert: the model runs now and the routing, "
               "prediction and attribution below follow.")
    run, store = common.require_run()
    model = open_live_model(run)
    if model is None:
        return
    adapter, by_index, lock = model
    if not by_index:
        st.info("This run's split has no examples.")
        return
    wanted = st.query_params.get("example")
    keys = list(by_index)
    default = keys.index(int(wanted)) if wanted and wanted.isdigit() and int(wanted) in by_index else 0
    index = st.selectbox("Base example", keys, index=default, format_func=lambda i: _example_label(by_index[i]),
                         key=f"pg_base_{run}")
    base = by_index[index]

    edit, side = st.columns([3, 2])
    with edit:
        st.markdown("##### Inputs")
        mapping = text_fields(adapter, base)
        edits: dict[str, str] = {}
        for name, field in mapping.items():
            label = TEXT_LABELS.get(name, name.replace("_", " ").capitalize())
            height = 140 if field == "context" else 68
            edits[field] = st.text_area(label, value=str(base.get(field) or ""), height=height,
                                        key=f"pg_text_{run}_{index}_{field}")
        image, drawn, image_caption = _picture_controls()
    with side:
        st.markdown("##### Knock out an expert")
        layers = adapter.routed_layers()
        names = ["none", *[spec.name for spec in layers]]
        ko_layer = st.selectbox("Layer", names, key="pg_ko_layer")
        knockout = None
        if ko_layer != "none":
            spec = next(s for s in layers if s.name == ko_layer)
            ko_expert = st.selectbox("Expert", list(range(spec.num_experts)), key="pg_ko_expert",
                                     help=f"{spec.num_experts} experts, top-{spec.top_k}, gate {spec.gate_kind}")
            knockout = (ko_layer, int(ko_expert))
        want_attr = st.toggle("Attribution (integrated gradients, 16 steps)", value=True, key="pg_attr")

    kwargs: dict[str, str] = {}
    for field, value in edits.items():
        if value != str(base.get(field) or ""):
            kwargs[field if field in ("question", "context") else "text"] = value
    example = live_example(adapter, base, image=image, drawn_attributes=drawn, **kwargs)
    with lock:  # routing and prediction first; the attribution follows below, once they are on screen
        result = run_live(adapter, example, knockout=knockout, attribution=False)
        baseline = _baseline(run, adapter, example) if knockout else None
    badge = st.empty()
    _timing_badge(badge, result, want_attr)

    picture = example_picture(example)
    p1, p2 = st.columns([1, 3])
    with p1:
        if picture is not None:
            st.image(picture, caption=image_caption, width=160)
        else:
            st.caption("no picture (the model sees an all-zero image)")
    with p2:
        _prediction(result, baseline, knockout)

    st.subheader("Routing")
    knocked_layer, knocked_expert = knockout if knockout else (None, None)
    if knockout:
        changes = routing_changes(baseline.routing, result.routing)
        total = int(changes["changed"].sum()) if len(changes) else 0
        st.metric(f"positions whose top-1 expert changed with expert {knocked_expert} of {knocked_layer} out",
                  f"{total} of {int(changes['positions'].sum()) if len(changes) else 0}")
        st.dataframe(changes.rename(columns={"changed_share": "share changed"}), hide_index=True,
                     column_config={"share changed": st.column_config.ProgressColumn(min_value=0, max_value=1,
                                                                                      format="percent")})
    specs = adapter.routed_layers()
    tabs = st.tabs([spec.name for spec in specs])
    for spec, tab in zip(specs, tabs):
        with tab:
            st.caption(f"{spec.num_experts} experts, top-{spec.top_k}, gate {spec.gate_kind} · routes {spec.routed}; "
                       f"the gate sees {spec.gate_sees}"
                       + (f" · **expert {knocked_expert} is knocked out**" if spec.name == knocked_layer else ""))
            rows = result.routing[result.routing["layer"] == spec.name]
            for call in dict.fromkeys(rows["call"]):
                common.show_call_routing(rows, spec.name, call, spec.num_experts, key=f"pg_route_{spec.name}_{call}",
                                         picture=picture)

    qga = result.extras.get("qga")
    if qga:
        _qga_chart(qga[0])

    st.subheader("Attribution")
    if want_attr:
        with lock, st.spinner("Integrated gradients…"):
            result.attribution, result.attribution_error, seconds = attribute_live(adapter, example, knockout)
        result.timings["attribution"] = seconds
        result.timings["total"] += seconds
        _timing_badge(badge, result, want_attr)
    if not want_attr:
        st.caption("Attribution is off.")
    elif result.attribution is None:
        st.warning(f"Attribution failed: {result.attribution_error}")
    else:
        st.caption(f"Integrated gradients of the {result.attribution['target'].iloc[0]} "
                   f"{'with the knockout' if knockout else ''} w.r.t. each input (red up, blue down).")
        show_delta(result.attribution)
        show_inputs(result.attribution, picture, "pg_attr")

    _on_the_map(run, store, result)


def _prediction(result, baseline, knockout) -> None:
    if result.kind == "ranking":
        rank = result.prediction.get("rank")
        before = baseline.prediction.get("rank") if baseline else None
        m = st.columns(3)
        m[0].metric("top-1 entity", str(result.ranking.iloc[0]["name"]) if result.ranking is not None and len(result.ranking) else "–")
        m[1].metric("gold rank", "–" if rank is None else int(rank),
                    delta=None if before is None or rank is None else int(rank) - int(before), delta_color="inverse",
                    help="rank of the gold entity over the whole knowledge base (1 = best)"
                         + ("; the change is against the same example without the knockout" if knockout else ""))
        m[2].metric("top-1 score", f"{result.prediction.get('score', float('nan')):.3f}")
        table = result.ranking.copy()
        table["gold"] = table["gold"].map({True: "gold", False: ""})
        if baseline is not None and baseline.ranking is not None:
            before = baseline.ranking["id"].astype(str).to_numpy()[:len(table)]
            table["without knockout"] = list(before) + [""] * (len(table) - len(before))
        st.dataframe(table.drop(columns=["entity"]), hide_index=True,
                     column_config={"score": st.column_config.NumberColumn(format="%.3f")})
        if len(table) < TOP_N:
            st.caption(f"The model reports its top {len(table)}.")
    else:
        m = st.columns(3)
        m[0].metric("answer", result.answer or "–")
        m[1].metric("gold answer", str(result.gold_answer or "–"))
        m[2].metric("exact match", "–" if result.correct is None else ("yes" if result.correct else "no"))
        if baseline is not None:
            st.caption(f"Without the knockout the answer is **{baseline.answer or '–'}**.")


def _qga_chart(row: dict) -> None:
    st.subheader("QGA source weights of this question")
    tokens = [f"{i}: {t}" for i, t in enumerate(row.get("tokens", []))]
    fig = go.Figure()
    fig.add_bar(x=tokens, y=np.asarray(row["alpha"]), name="alpha (image)", marker_color=SOURCE_COLOURS["alpha (image)"])
    fig.add_bar(x=tokens, y=np.asarray(row["beta"]), name="beta (context)", marker_color=SOURCE_COLOURS["beta (context)"])
    fig.update_layout(barmode="group", yaxis_range=[0, 1], height=280, margin=dict(t=10, b=10, l=10, r=10),
                      legend_orientation="h")
    st.plotly_chart(fig, key="pg_qga")


def _on_the_map(run: str, store, result) -> None:
    with st.expander("This example on the run's embedding map"):
        proj = common.table(run, "projection")
        point = project_live(store, result.representation) if proj is not None else None
        if point is None:
            st.caption("The run has no fitted map (or the model gives no representation).")
            return
        fig = go.Figure()
        fig.add_scatter(x=proj["x"], y=proj["y"], mode="markers", name="run examples",
                        marker=dict(size=5, color="lightgrey"))
        fig.add_scatter(x=[point["x"]], y=[point["y"]], mode="markers", name="live example",
                        marker=dict(size=16, symbol="star", color="crimson", line=dict(width=1, color="black")))
        fig.update_layout(height=360, margin=dict(t=10, b=10, l=10, r=10), legend_orientation="h")
        st.plotly_chart(fig, key="pg_map")
        st.caption(f"Placed by the stored {point['method'].upper()} map; distance to the nearest fitted example "
                   f"{point['distance']:.3g}.")


if __name__ == "__main__":
    main()
