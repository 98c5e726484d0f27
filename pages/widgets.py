"""Widgets and figures shared by the pages, built from what the run declares (its ModelSpec).

* examples: a one-line title, their declared fields and labels, the stored prediction by name, the
  picture, a selectable table that opens the routing explorer;
* routing of one layer call: image patches on their recorded grid, other positions as a strip;
* verdict lines, attributions (coloured tokens, patch heatmaps on the declared grid, IG's delta).

Nothing here names a model family or one family's fields.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from analysis import figures as F
from analysis.store import EXAMPLE_KEY
from mmoe_core.spec import ImageGrid, ModelSpec
from pages import state

VERDICT_BADGES = {"healthy": "green", "warning": "orange", "collapsed": "red"}


def _present(value: Any) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return not (isinstance(value, str) and not value.strip())


def _cut(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "\u2026"


# ----------------------------------------------------------------------------------------- examples


def example_title(row: Mapping[str, Any], spec: ModelSpec, width: int = 70) -> str:
    """ "<index> · <id> · <title field>" for a select box or a caption."""
    title = spec.title_field()
    text = _cut(row.get(title.name), width) if title is not None and _present(row.get(title.name)) else ""
    index = row.get(EXAMPLE_KEY, "")
    parts = [str(int(index)) if _present(index) else "", str(row.get("id") or ""), text]
    return " · ".join(p for p in parts if p)


def label_tags(row: Mapping[str, Any], spec: ModelSpec) -> str:
    """ "label=value, ..." of the declared labels the row carries."""
    values = row.get("labels") if isinstance(row.get("labels"), Mapping) else row
    return ", ".join(
        f"{lab.name}={values[lab.name]}" for lab in spec.labels if lab.name in values and _present(values[lab.name])
    )


def show_fields(row: Mapping[str, Any], spec: ModelSpec, long_chars: int = 400) -> None:
    """The example's declared fields (not the pictures), each under its label; long texts are cut, with
    the whole text one click away."""
    for f in spec.fields:
        if f.kind == "image" or f.name not in row or not _present(row[f.name]):
            continue
        value = str(row[f.name])
        if f.kind == "long_text" and len(value) > long_chars:
            st.markdown(f"**{f.label}:** {state.escape_markdown(_cut(value, long_chars))}")
            with st.expander(f"The whole {f.label.lower()}"):
                st.text(value)
        else:
            st.markdown(f"**{f.label}:** {state.escape_markdown(value)}")
    tags = [(lab.name, row[lab.name]) for lab in spec.labels if lab.name in row and _present(row[lab.name])]
    if tags:
        st.markdown(" · ".join(f"{name}: **{state.escape_markdown(value)}**" for name, value in tags))


def display_columns(spec: ModelSpec, frame: pd.DataFrame, long_text: bool = False) -> list[str]:
    """Columns for a table of examples: id, the declared non-image fields (long texts only when asked),
    the labels, in declaration order, those ``frame`` has."""
    names = [
        "id",
        *[f.name for f in spec.fields if f.kind != "image" and (long_text or f.kind != "long_text")],
        *[lab.name for lab in spec.labels],
    ]
    return [c for c in dict.fromkeys(names) if c in frame]


def column_labels(spec: ModelSpec) -> dict[str, str]:
    """{field name: its label in words}, for table headers."""
    return {f.name: f.label for f in spec.fields}


def prediction_text(prediction: Mapping[str, Any], spec: ModelSpec) -> str:
    """The stored prediction in words, for Markdown: "<item>: <name> · gold: <name> · rank 3 · correct"
    (names escaped: they are data)."""
    item = spec.prediction.item or "prediction"
    parts = []
    for key, label in (("prediction", item), ("gold", "gold")):
        value = prediction.get(key)
        if _present(value):
            parts.append(f"{label}: **{state.escape_markdown(value)}**")
        elif key in prediction and value is not None:
            parts.append(f"{label}: (empty)")
    correct = prediction.get("correct")
    wrong = correct is not None and not (isinstance(correct, float) and math.isnan(correct)) and not bool(correct)
    named = prediction.get("prediction")
    if wrong and _present(named) and str(named) == str(prediction.get("gold")):
        parts[0] += f" (another {item} of the same name)"  # ambiguous names: the right name, the wrong one
    rank = prediction.get("rank")
    if _present(rank):
        parts.append(f"gold rank **{int(rank)}**")
    if correct is not None and not (isinstance(correct, float) and math.isnan(correct)):
        parts.append("correct" if bool(correct) else "wrong")
    return " · ".join(parts)


def image_fields(spec: ModelSpec) -> list[str]:
    return [f.name for f in spec.fields if f.kind == "image"]


def example_picture(row: Mapping[str, Any] | pd.Series | None, spec: ModelSpec):
    """A display thumbnail (PIL, longer side <= ``analysis.live.THUMB_SIDE``) of the example's picture from
    its declared image field, or None: pages and charts never carry a full-resolution picture."""
    if row is None:
        return None
    from analysis.live import example_picture as picture
    from analysis.live import thumbnail

    clean = {k: v for k, v in dict(row).items() if not (isinstance(v, float) and v != v)}
    return thumbnail(picture(clean, image_fields(spec)))


def example_table(frame: pd.DataFrame, run: str, key: str, height: int | None = None, **kwargs) -> None:
    """A dataframe of examples (it must carry ``example_index``); selecting a row opens that example in
    the routing explorer."""
    event = st.dataframe(
        frame,
        key=key,
        hide_index=True,
        on_select="rerun",
        selection_mode="single-row",
        height=height if height is not None else "auto",
        **kwargs,
    )
    rows = getattr(getattr(event, "selection", None), "rows", None) or []
    if rows:
        state.open_example(run, int(frame.iloc[rows[0]][EXAMPLE_KEY]))
    st.caption("Select a row to open that example in the routing explorer.")


# ----------------------------------------------------------------------------------------- verdicts


def verdict_lines(layer_metrics: pd.DataFrame) -> None:
    """One line per layer: its verdict as a coloured badge and the reason with its numbers."""
    for row in layer_metrics.itertuples(index=False):
        colour = VERDICT_BADGES.get(row.verdict, "gray")
        reason = str(row.reason)
        if reason.startswith(f"{row.verdict}: "):
            reason = reason[len(row.verdict) + 2 :]
        st.markdown(f"**{row.layer}** · :{colour}-background[{row.verdict}] {reason}")


# ----------------------------------------------------------------------------------------- routing


def call_label(rows: pd.DataFrame, call: str) -> str:
    """ "<call>: routes <modality> (<kinds>) · gate sees <modality>" for a layer call's rows (majority
    over the positions that are not CLS)."""
    part = rows[rows["call"] == call]
    if part.empty:
        return str(call)
    body = part[part["position_kind"] != "cls"] if (part["position_kind"] != "cls").any() else part
    routed = body["routed_modality"].mode().iloc[0] if "routed_modality" in body else "?"
    gate = body["gate_modality"].mode().iloc[0] if "gate_modality" in body else "?"
    kinds = ", ".join(sorted(set(body["position_kind"])))
    return f"{call}: routes {routed} ({kinds}) · gate sees {gate}"


def show_call_routing(
    rows: pd.DataFrame,
    layer: str,
    call: str,
    num_experts: int | None,
    key: str,
    picture=None,
    title_prefix: str = "",
    wrap: int = 12,
) -> None:
    """The routing of one layer call of one example: image patches on their grid (beside the example's
    picture when given), other positions (tokens, CLS, decoder steps) as a strip of ``wrap`` cells per
    row, coloured by top-1 expert; grey cells are positions the layer did not route (all-zero combine
    weights). ``title_prefix`` (e.g. a run name) replaces "<layer> · <call>" in the figure titles."""
    part = rows[(rows["layer"] == layer) & (rows["call"] == call)]
    if part.empty:
        st.info(f"No routed positions for {layer} / {call} in this example.")
        return
    patches, others = F.split_call_rows(part)
    prefix = title_prefix or f"{layer} · {call}"
    config = {"displayModeBar": False}  # hover is the interaction here; the bar would cover the title
    if len(patches):
        if picture is not None:
            from analysis.live import thumbnail

            left, right = st.columns([1, 2])
            left.image(thumbnail(picture), caption="the example's image", width=240)
        else:
            right = st.container()
        with right:
            st.plotly_chart(
                F.patch_grid(part, f"{prefix}: image patches by top-1 expert", num_experts),
                key=f"{key}_grid",
                config=config,
            )
    if len(others):
        kinds = set(others["position_kind"]) - {"cls"}
        what = F.kind_words(kinds.pop()) if len(kinds) == 1 else "positions" if kinds else F.kind_words("cls")
        st.plotly_chart(
            F.token_strip(others, f"{prefix}: {what} by top-1 expert", num_experts, wrap=wrap),
            key=f"{key}_strip",
            config=config,
        )
    unrouted = int((~part["routed"].astype(bool)).sum()) if "routed" in part else 0
    if unrouted:
        st.caption(
            f"{unrouted} of {len(part)} positions are **{F.NOT_ROUTED_LABEL}** (grey): their combine "
            "weights are all zero, so the layer passed them through with no expert output."
        )


def own_side(rows: pd.DataFrame, example: Mapping[str, Any], spec: ModelSpec) -> str | None:
    """The call prefix (the part before ':') whose token strings overlap the example's own declared text
    fields the most: its calls are shown first (e.g. an example's own positions before those of a paired
    item routed on the other side)."""
    words = {
        w.strip(".,;:!?'\"()").lower()
        for f in spec.text_fields()
        if isinstance(example.get(f.name), str)
        for w in example[f.name].split()
    }
    words.discard("")
    if not words or "token" not in rows or rows.empty:
        return None
    side = rows["call"].astype(str).str.split(":").str[0]
    tokens = rows["token"].astype(str).str.lower().str.strip("\u0120 ")
    overlap = tokens.isin(words).groupby(side).sum()
    return str(overlap.idxmax()) if len(overlap) and overlap.max() > 0 else None


def order_calls(calls: Sequence[str], side: str | None) -> list[str]:
    """``calls`` with those of ``side`` first (stable)."""
    calls = list(calls)
    return calls if side is None else sorted(calls, key=lambda c: str(c).split(":")[0] != side)


# ----------------------------------------------------------------------------------------- attributions


def _rgba(value: float, scale: float) -> str:
    """Diverging colour: red for positive, blue for negative attribution, alpha by magnitude."""
    if not scale or not math.isfinite(value):
        return "rgba(0,0,0,0)"
    a = min(1.0, abs(value) / scale) * 0.85
    return f"rgba(214,39,40,{a:.3f})" if value >= 0 else f"rgba(31,119,180,{a:.3f})"


def token_html(rows: pd.DataFrame, column: str = "value") -> str:
    """Text tokens as inline spans coloured by attribution (red +, blue -); padding tokens dropped."""
    shown = rows[rows["label"].astype(str).str.len() > 0]
    if shown.empty:
        return "<em>no tokens</em>"
    scale = float(np.nanmax(np.abs(shown[column].to_numpy(dtype=float)))) or 1.0
    spans = []
    for label, value in zip(shown["label"].astype(str), shown[column].astype(float)):
        spans.append(
            f'<span title="{value:+.4f}" style="background:{_rgba(value, scale)};padding:2px 3px;'
            f'margin:1px;border-radius:3px;display:inline-block;font-family:monospace">'
            f"{html.escape(label)}</span>"
        )
    return '<div style="line-height:2.1">' + "".join(spans) + "</div>"


def image_grids(spec: ModelSpec) -> dict[str, ImageGrid | None]:
    """{image input name: its declared patch grid} (inputs of kind image_patches)."""
    return {i.name: i.grid for i in spec.image_inputs()}


def show_inputs(
    rows: pd.DataFrame, picture, key: str, spec: ModelSpec, grids: Mapping[str, ImageGrid | None] | None = None
) -> None:
    """Every attributed input of one attribution: text as coloured tokens, image inputs (declared kind
    image_patches) as patch heatmaps on their grid (``grids`` overrides the declared ones, e.g. a live
    example's own)."""
    from analysis.live import patch_grid, thumbnail_array

    grids = {**image_grids(spec), **dict(grids or {})}
    for name, part in rows.groupby("input", sort=False):
        share = part["share"].iloc[0] if "share" in part else float("nan")
        st.markdown(f"**{name}** · share of |attribution| {share:.0%}" if share == share else f"**{name}**")
        if name in grids:
            if picture is None and not part["value"].abs().gt(0).any():
                st.caption(
                    "No picture: the model sees an all-zero image, which the zero baseline gives no attribution."
                )
                continue
            st.plotly_chart(
                F.attribution_patches(thumbnail_array(picture), patch_grid(part, grids[name])), key=f"{key}_{name}"
            )
        else:
            st.markdown(token_html(part), unsafe_allow_html=True)


def show_delta(rows: pd.DataFrame, label: str = "IG convergence delta") -> None:
    from analysis.live import convergence_delta

    delta = convergence_delta(rows)
    if delta is None:
        return
    st.metric(
        label,
        f"{delta:+.2e}",
        help="Integrated gradients' completeness check: the sum of all attributions minus "
        "(f(input) − f(baseline)). Near 0: the path integral converged; large: use more steps.",
    )
