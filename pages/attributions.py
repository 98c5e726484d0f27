"""Attributions: which text tokens and image patches drive the prediction, and a router's choice.

Layout only. The numbers are the run's precomputed ``attributions`` table (integrated gradients with
their convergence delta, occlusion of image patches, one router logit per example) read through the
store; another router logit can be attributed now through ``analysis.live.live_attribution``.
The figure helpers here (:func:`token_html`, :func:`patch_figure`) are shared with the playground.
"""
from __future__ import annotations

import html
import math

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from analysis.live import attribution_choices, attribution_rows, convergence_delta, patch_grid
from pages import common

PREDICTION_TARGETS = ("score", "answer_logit")
ROUTER_TARGET = "router_logit"
METHOD_NAMES = {"ig": "integrated gradients", "occlusion": "occlusion"}


# -- shared figure helpers (also used by pages/playground.py) ---------------------------------------------

def _rgba(value: float, scale: float) -> str:
    """Diverging colour: red for positive, blue for negative attribution, alpha by magnitude."""
    if not scale or not math.isfinite(value):
        return "rgba(0,0,0,0)"
    a = min(1.0, abs(value) / scale) * 0.85
    return f"rgba(214,39,40,{a:.3f})" if value >= 0 else f"rgba(31,119,180,{a:.3f})"


def token_html(rows, column: str = "value") -> str:
    """Text tokens as inline spans coloured by attribution (red +, blue -); padding tokens dropped."""
    shown = rows[rows["label"].astype(str).str.len() > 0]
    if shown.empty:
        return "<em>no tokens</em>"
    scale = float(np.nanmax(np.abs(shown[column].to_numpy(dtype=float)))) or 1.0
    spans = []
    for label, value in zip(shown["label"].astype(str), shown[column].astype(float)):
        spans.append(f'<span title="{value:+.4f}" style="background:{_rgba(value, scale)};padding:2px 3px;'
                     f'margin:1px;border-radius:3px;display:inline-block;font-family:monospace">'
                     f"{html.escape(label)}</span>")
    return '<div style="line-height:2.1">' + "".join(spans) + "</div>"


def is_image_input(rows) -> bool:
    labels = rows["label"].astype(str)
    return len(labels) > 0 and bool(labels.str.startswith("patch ").all())


def patch_figure(picture, rows, title: str = "", column: str = "value") -> go.Figure:
    """The picture with its patch grid overlaid, each patch coloured by attribution (diverging, 0 = clear)."""
    grid = patch_grid(rows, column)
    n_rows, n_cols = grid.shape
    fig = go.Figure()
    if picture is not None:
        arr = np.asarray(picture.convert("RGB"))
        h, w = arr.shape[:2]
        fig.add_trace(go.Image(z=arr, hoverinfo="skip"))
    else:
        h, w = n_rows * 8, n_cols * 8
    dy, dx = h / n_rows, w / n_cols
    scale = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    text = [[f"patch {r},{c}: {grid[r, c]:+.4f}" for c in range(n_cols)] for r in range(n_rows)]
    fig.add_trace(go.Heatmap(z=grid, x0=dx / 2, dx=dx, y0=dy / 2, dy=dy, colorscale="RdBu_r", zmid=0,
                             zmin=-scale or -1, zmax=scale or 1, opacity=0.55, text=text, hoverinfo="text",
                             colorbar=dict(title="attr.", thickness=12)))
    for r in range(1, n_rows):
        fig.add_shape(type="line", x0=0, x1=w, y0=r * dy, y1=r * dy, line=dict(color="white", width=0.5))
    for c in range(1, n_cols):
        fig.add_shape(type="line", y0=0, y1=h, x0=c * dx, x1=c * dx, line=dict(color="white", width=0.5))
    fig.update_xaxes(visible=False, range=[0, w])
    fig.update_yaxes(visible=False, range=[h, 0], scaleanchor="x")
    fig.update_layout(title=title, height=380, margin=dict(t=40 if title else 10, b=10, l=10, r=10))
    return fig


def show_inputs(rows, picture, key: str) -> None:
    """Every attributed input of one attribution: text as coloured tokens, images as patch heatmaps."""
    for name, part in rows.groupby("input", sort=False):
        share = part["share"].iloc[0] if "share" in part else float("nan")
        st.markdown(f"**{name}** · share of |attribution| {share:.0%}" if share == share else f"**{name}**")
        if is_image_input(part):
            if picture is None and not part["value"].abs().gt(0).any():
                st.caption("No picture: the model sees an all-zero image, which the zero baseline gives no "
                           "attribution.")
            else:
                st.plotly_chart(patch_figure(picture, part), key=f"{key}_{name}")
        else:
            st.markdown(token_html(part), unsafe_allow_html=True)


def show_delta(rows, label: str = "IG convergence delta") -> None:
    delta = convergence_delta(rows)
    if delta is None:
        return
    st.metric(label, f"{delta:+.2e}",
              help="Integrated gradients' completeness check: the sum of all attributions minus "
                   "(f(input) − f(baseline)). Near 0: the path integral converged; large: use more steps.")


def _tables(run: str, version: str):
    return common.table(run, "attributions"), common.examples(run)


# -- the live model (shared with the playground): one per (run, checkpoint hash), used under a lock ----------

@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def live_model(run: str, checkpoint_hash: str | None, root: str):
    """(adapter, base examples by index, lock). The lock serialises live runs: a knockout changes the
    shared model for the length of a run."""
    import threading

    from analysis.live import load_base_examples, load_live_adapter, warm_up
    adapter = load_live_adapter(run, root)
    examples = load_base_examples(adapter, run, root)
    if examples:
        warm_up(adapter, examples[0])  # lazy imports and caches are paid here, under the loading spinner
    return adapter, {int(ex["index"]): ex for ex in examples}, threading.Lock()


def open_live_model(run: str):
    """The run's live model, or None after an error message (checkpoint or dataset gone)."""
    from analysis.live import run_inputs
    try:
        inputs = run_inputs(run, common.artifacts_root())
        return live_model(run, inputs.checkpoint_hash, str(common.artifacts_root()))
    except Exception as exc:  # a missing checkpoint / dataset: say so, keep the page alive
        st.error(f"Cannot load the model of run `{run}` for a live run: {exc}")
        return None


def _router_now(run: str, index: int, picture) -> None:
    """Attribute any router logit of this example now (layer, call, expert, position), with the live model."""
    from analysis.live import live_attribution
    with st.expander("Attribute another router logit now"):
        routing = common.example_routing(run, index)
        specs = common.layer_specs(run)
        if routing is None or routing.empty or not specs:
            st.caption("This run has no routing rows for the example.")
            return
        c = st.columns(4)
        layer = c[0].selectbox("Layer", list(specs), key="attr_now_layer")
        part = routing[routing["layer"] == layer]
        calls = list(dict.fromkeys(part["call"]))
        call = c[1].selectbox("Call", calls, key="attr_now_call")
        rows = part[part["call"] == call]
        positions = rows["position"].astype(int).tolist()
        labels = {int(p): f"{int(p)}: {t}" if t else str(int(p)) for p, t in zip(rows["position"], rows["token"])}
        position = c[2].selectbox("Position", positions, format_func=labels.get, key="attr_now_position")
        top1 = int(rows.loc[rows["position"] == position, "top1"].iloc[0])
        n_experts = int(specs[layer].get("num_experts") or (max(part["top1"]) + 1))
        expert = c[3].selectbox("Expert", list(range(n_experts)), index=top1, key="attr_now_expert",
                                help=f"The router chose expert {top1} first at this position.")
        key = ("attr_now", run, index, layer, call, int(position), int(expert))
        if st.button("Compute (integrated gradients, 16 steps)", key="attr_now_go"):
            model = open_live_model(run)
            if model is None:
                return
            adapter, examples, lock = model
            if index not in examples:
                st.error(f"Example {index} is not in the run's dataset split any more.")
                return
            try:
                with lock:
                    st.session_state[key] = live_attribution(adapter, examples[index], "ig", layer=layer,
                                                             expert=int(expert), position=int(position), call=call)
            except Exception as exc:  # e.g. a call the adapter cannot attribute to its inputs
                st.error(f"Cannot attribute that router logit: {exc}")
                return
        if key in st.session_state:
            result = st.session_state[key]
            show_delta(result)
            show_inputs(result, picture, "attr_now")


def _target_label(row) -> str:
    if row["target"] != ROUTER_TARGET:
        return f"prediction ({row['target']})"
    where = f", {row['call']}" if isinstance(row.get("call"), str) and row.get("call") else ""
    pos = row.get("target_position")
    pos = "" if pos is None or (isinstance(pos, float) and math.isnan(pos)) else f" at position {int(pos)}"
    return f"router logit: {row['layer']} expert {int(row['expert'])}{pos}{where}"


def main() -> None:
    from analysis.attribution import modality_share_by_label

    st.title("Attributions")
    st.caption("Which inputs move the prediction (score / answer logit) and a router's logit. Red: pushes it up; "
               "blue: pushes it down. Integrated gradients (zero baseline) and occlusion of image patches.")
    run, store = common.require_run()
    if not store.has("attributions"):
        st.info(f"Run **{run}** has no attributions table; rebuild it with "
                f"`python -m analysis.precompute --run {run}`.", icon=":material/info:")
        return
    attributions, examples = _tables(run, common.run_version(run))
    ex_by_index = examples.set_index("index") if "index" in examples else examples.set_index("example_index")

    # -- one example
    st.subheader("One example")
    sampled = sorted(int(i) for i in attributions["example_index"].unique())
    labels = store.manifest.get("slice_labels") or []

    def describe(i: int) -> str:
        if i not in ex_by_index.index:
            return f"#{i}"
        row = ex_by_index.loc[i]
        text = row.get("sentence") if "sentence" in row else row.get("question", "")
        tags = ", ".join(f"{k}={row[k]}" for k in labels if k in row and row[k] is not None)
        return f"#{i} · {text} ({tags})"

    wanted = st.query_params.get("example")
    with_picture = [i for i in sampled if i in ex_by_index.index and isinstance(ex_by_index.loc[i].get("image_path"), str)]
    default = sampled.index(with_picture[0]) if with_picture else 0  # open on an example with a picture
    if wanted and wanted.isdigit() and int(wanted) in sampled:
        default = sampled.index(int(wanted))
    c1, c2 = st.columns([3, 1])
    index = c1.selectbox("Example (attributed sample)", sampled, index=default, format_func=describe,
                         key="attr_example")
    mine = attributions[attributions["example_index"] == index]
    methods = [m for m in ("ig", "occlusion") if m in set(mine["method"])]
    method = c2.radio("Method", methods, format_func=METHOD_NAMES.get, key="attr_method", horizontal=True)
    picture = common.example_picture(ex_by_index.loc[index].to_dict()) if index in ex_by_index.index else None

    choices = attribution_choices(mine[mine["method"] == method])
    merged = choices.merge(mine[["method", "target", "layer", "expert", "call", "target_position"]]
                           .drop_duplicates(["method", "target", "layer", "expert"]),
                           on=["method", "target", "layer", "expert"], how="left") if "call" in mine else choices
    prediction = merged[merged["target"] != ROUTER_TARGET]
    router = merged[merged["target"] == ROUTER_TARGET]

    left, right = st.columns(2)
    with left:
        st.markdown("#### Prediction")
        if prediction.empty:
            st.info(f"No {METHOD_NAMES.get(method, method)} attribution of the prediction for this example.")
        else:
            target = prediction.iloc[0]["target"]
            rows = attribution_rows(mine, None, method, target, None, None)
            show_delta(rows)
            show_inputs(rows, picture, f"attr_pred_{method}")
    with right:
        st.markdown("#### Router logit")
        if router.empty:
            st.info("No router-logit attribution stored for this example and method "
                    "(the precompute attributes one router logit per example, by integrated gradients).")
        else:
            options = list(range(len(router)))
            pick = st.selectbox("Router logit (layer, expert)", options,
                                format_func=lambda i: _target_label(router.iloc[i]), key="attr_router")
            chosen = router.iloc[pick]
            rows = attribution_rows(mine, None, method, ROUTER_TARGET, chosen["layer"], int(chosen["expert"]))
            show_delta(rows)
            show_inputs(rows, picture, f"attr_router_{method}")
        _router_now(run, index, picture)

    # -- modality share by label
    st.subheader("Modality share by label")
    st.caption("Mean share of each input in an example's total |attribution| of the prediction, per value of a "
               "label: e.g. the image's share for image-decisive vs text-decisive mentions.")
    label_options = [c for c in labels if c in attributions.columns]
    if not label_options:
        st.info("The attributions table carries no example labels to compare by.")
        return
    s1, s2 = st.columns(2)
    label = s1.selectbox("Label", label_options, key="attr_share_label")
    share_method = s2.radio("Method", [m for m in ("ig", "occlusion") if m in set(attributions["method"])],
                            format_func=METHOD_NAMES.get, key="attr_share_method", horizontal=True)
    shares = modality_share_by_label(attributions, label, method=share_method)
    if shares.empty:
        st.info("No attribution of the prediction with that method.")
        return
    inputs = [c for c in shares.columns if c != "n_examples"]
    fig = go.Figure()
    for name in inputs:
        fig.add_bar(x=shares.index.astype(str), y=shares[name], name=name,
                    hovertemplate=f"{name}: %{{y:.1%}}<extra></extra>")
    fig.update_layout(barmode="stack" if share_method == "ig" else "group", yaxis_title="mean share",
                      yaxis_tickformat=".0%", xaxis_title=label, height=360, legend_orientation="h",
                      margin=dict(t=30, b=10, l=10, r=10))
    st.plotly_chart(fig, key="attr_share_chart")
    st.dataframe(shares.style.format({c: "{:.1%}" for c in inputs}), width="stretch")
    if share_method == "occlusion":
        st.caption("Occlusion is run over image patches only, so its share is always the image's.")


if __name__ == "__main__":
    main()
