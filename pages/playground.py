"""Live playground: edit an example (text, question / context, picture), knock out an expert, and see
routing, prediction and attribution change now.

Layout only: every number comes from ``analysis.live`` (load the run's checkpoint, build the live
example, run it with routing records, attribution and timings, place it on the run's map).
"""
from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from analysis.live import (MAX_UPLOAD_BYTES, UploadError, check_upload, drawing_options, example_picture,
                           live_example, load_base_examples, load_live_adapter, project_live, routing_changes,
                           run_inputs, run_live, text_fields, top1_grid)
from pages import common
from pages.attributions import show_delta, show_inputs

EXPERT_COLOURS = px.colors.qualitative.Bold
TEXT_LABELS = {"mention_text": "Mention sentence", "question": "Question", "context": "Context"}
IMAGE_SOURCES = ("the example's picture", "upload a picture", "draw a picture")
UPLOAD_TYPES = ["png", "jpg", "jpeg", "webp"]


# -- run selection (pages.common's helpers when present) ---------------------------------------------

def _selected_store():
    getter = getattr(common, "selected_run", None)
    opener = getattr(common, "run_store", None) or getattr(common, "get_store", None)
    from analysis.store import list_runs
    run = getter() if callable(getter) else None
    if not run:
        runs = list_runs()
        if not runs:
            st.info("No runs are built yet. Build the demo runs with `python -m mmoe_core.demo` (or `make demo`).")
            st.stop()
        wanted = st.query_params.get(getattr(common, "RUN_PARAM", "run"))
        run = st.selectbox("Run", runs, index=runs.index(wanted) if wanted in runs else 0, key="pg_run")
    try:
        store = opener(run) if callable(opener) else _fallback_store(run)
    except FileNotFoundError as exc:
        st.error(str(exc))
        st.stop()
    if store is None:
        st.stop()
    return run, store


@st.cache_resource(show_spinner=False)
def _fallback_store_cached(run: str, target: str):
    from analysis.store import RunStore
    return RunStore(run)


def _fallback_store(run: str):
    import os
    from analysis.store import runs_dir
    return _fallback_store_cached(run, os.path.realpath(runs_dir() / run))


# -- the live model: one per (run, checkpoint hash), shared by sessions, used under a lock ---------------

@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def live_model(run: str, checkpoint_hash: str | None, root: str):
    """(adapter, base examples, lock). The lock serialises live runs: a knockout changes the shared model."""
    adapter = load_live_adapter(run, root)
    examples = load_base_examples(adapter, run, root)
    return adapter, examples, threading.Lock()


@st.cache_data(show_spinner=False, max_entries=8)
def _projection(run: str, version: str, _store):
    return _store.table("projection") if _store.has("projection") else None


# -- figures -------------------------------------------------------------------------------------------

def routing_strip(part: pd.DataFrame, num_experts: int, knocked: int | None) -> go.Figure:
    """One layer call: a strip of positions coloured by their top-1 expert (hover: token, probability)."""
    z = [part["top1"].astype(int).tolist()]
    scale = []
    for e in range(num_experts):  # a discrete colour scale: expert e owns [e, e+1) / E
        c = EXPERT_COLOURS[e % len(EXPERT_COLOURS)]
        scale += [[e / num_experts, c], [(e + 1) / num_experts, c]]
    text = [[f"pos {p} · {t or kind}<br>top-1 expert {e} (p={q:.2f}){'' if r else '<br>no combine weight'}"
             for p, t, kind, e, q, r in zip(part["position"], part["token"], part["position_kind"], part["top1"],
                                            part["top1_prob"], part["routed"])]]
    fig = go.Figure(go.Heatmap(z=z, x=part["position"], zmin=0, zmax=num_experts, colorscale=scale, text=text,
                               hoverinfo="text", xgap=1, showscale=False))
    fig.update_yaxes(visible=False)
    fig.update_xaxes(title=None, showgrid=False)
    fig.update_layout(height=90, margin=dict(t=5, b=20, l=5, r=5))
    return fig


def expert_legend(num_experts: int, knocked: int | None) -> str:
    chips = []
    for e in range(num_experts):
        c = EXPERT_COLOURS[e % len(EXPERT_COLOURS)]
        mark = " (knocked out)" if knocked == e else ""
        chips.append(f'<span style="background:{c};color:white;padding:2px 8px;border-radius:10px;'
                     f'margin-right:6px">expert {e}{mark}</span>')
    return "".join(chips)


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1000:.0f} ms"


# -- page ----------------------------------------------------------------------------------------------

def _example_label(ex: dict) -> str:
    text = ex.get("sentence") or ex.get("question") or ex.get("text") or ""
    tags = ", ".join(f"{k}={v}" for k, v in (ex.get("labels") or {}).items())
    return f"#{ex['index']} · {text[:90]} ({tags})"


def _picture_controls(run: str, base: dict):
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
    run, store = _selected_store()
    from analysis.store import resolve_root
    try:
        inputs = run_inputs(run)
    except FileNotFoundError as exc:
        st.error(str(exc))
        return
    try:
        adapter, examples, lock = live_model(run, inputs.checkpoint_hash, str(resolve_root()))
    except Exception as exc:  # a missing dataset / unloadable checkpoint: say so, keep the app alive
        st.error(f"Cannot load the model of run {run}: {exc}")
        return
    if not examples:
        st.info("This run's split has no examples.")
        return
    by_index = {int(ex["index"]): ex for ex in examples}
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
        image, drawn, image_caption = _picture_controls(run, base)
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
    with lock:
        result = run_live(adapter, example, knockout=knockout, attribution=want_attr)
        baseline = run_live(adapter, example, knockout=None, attribution=False) if knockout else None

    t = result.timings
    st.badge(f"{result.device.upper()} · forward {_ms(t.get('forward'))} · attribution "
             f"{_ms(t.get('attribution')) if want_attr else 'off'} · total {_ms(t.get('total'))}",
             icon=":material/timer:", color="green" if result.device.startswith("cuda") else "gray")

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
    strips = top1_grid(result.routing)
    for spec in adapter.routed_layers():
        st.markdown(f"**{spec.name}** · {spec.num_experts} experts, top-{spec.top_k} · routes {spec.routed}; "
                    f"gate sees {spec.gate_sees}", help=None)
        st.markdown(expert_legend(spec.num_experts, knocked_expert if spec.name == knocked_layer else None),
                    unsafe_allow_html=True)
        for key, part in strips.items():
            if key.split(" · ")[0] != spec.name:
                continue
            st.caption(key)
            st.plotly_chart(routing_strip(part, spec.num_experts, None), key=f"pg_strip_{key}")

    qga = result.extras.get("qga")
    if qga:
        _qga_chart(qga[0])

    st.subheader("Attribution")
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
            table["without knockout"] = baseline.ranking["name"].to_numpy()[:len(table)]
        st.dataframe(table, hide_index=True, height=250,
                     column_config={"score": st.column_config.NumberColumn(format="%.3f")})
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
    fig.add_bar(x=tokens, y=np.asarray(row["alpha"]), name="alpha (image)")
    fig.add_bar(x=tokens, y=np.asarray(row["beta"]), name="beta (context)")
    fig.update_layout(barmode="group", yaxis_range=[0, 1], height=280, margin=dict(t=10, b=10, l=10, r=10),
                      legend_orientation="h")
    st.plotly_chart(fig, key="pg_qga")


def _on_the_map(run: str, store, result) -> None:
    with st.expander("This example on the run's embedding map"):
        proj = _projection(run, str(store.dir), store)
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
