"""Training dynamics: routing indicators of a fixed example sample at every training snapshot.

Effective experts, token entropy, max-load ratio and balance loss per layer against the step, with the
step the entropy-triggered two-stage schedule switched marked (manifest ``trigger_step``), and the steps where
the training schedule changes phase as the model declares them (``spec.training_phases``); the per-expert
load of one layer over training; router saturation (share of a position's final top-k already chosen at
each snapshot, OLMoE) per layer; the verdict at every snapshot; and the training log when the run carries
one (``train_log`` table). Layout only: the precompute measured everything (``dynamics`` table).
"""

from __future__ import annotations

import streamlit as st

from analysis import figures as F
from analysis.report import training_phases, trigger_step
from analysis.routing_measure_tables import MEASURES
from pages import reads, state

LOG_GROUPS = {
    "losses": lambda c: c == "loss" or c.startswith("loss."),
    "routing (from the training batches)": lambda c: c.startswith("route."),
    "learning rate": lambda c: c == "lr",
}


def header(run: str, manifest: dict, config: dict, trigger: int | None, phases: list[tuple[int, str]]) -> None:
    training = config.get("training") or {}
    st.caption(
        f"Run **{run}**. Snapshots every {training.get('snapshot_every', '?')} steps of "
        f"{training.get('steps_done', training.get('steps', '?'))}; each measured on the same stratified "
        f"sample of {manifest.get('params', {}).get('dynamics_sample', '?')} examples."
    )
    if trigger is not None:
        st.markdown(
            f"The entropy-triggered two-stage schedule switched to its specialisation phase at "
            f"**step {trigger}** (dotted red line)."
        )
    elif training.get("two_stage"):
        st.markdown(
            "Two-stage routing was on; the run records no step at which it switched (the router entropy "
            f"never fell below the trigger {training.get('trigger_entropy', '?')}, or the step was not "
            "logged)."
        )
    if phases:
        st.markdown(
            "Training phases (dashed grey lines): "
            + "; ".join(f"from **step {step}**, {label}" for step, label in phases)
            + ". Snapshots before a phase show the "
            "model as it was then (e.g. a part still untrained while another warms up)."
        )


def snapshots(run: str, trigger: int | None, phases: list[tuple[int, str]]) -> None:
    dyn = reads.table(run, "dynamics")
    if dyn is None or dyn.empty:
        st.info(
            f"Run `{run}` has no training snapshots (no `dynamics` table): train with `snapshot_every` > 0 "
            f"and rebuild with `python -m analysis.precompute --run {run}`."
        )
    else:
        st.plotly_chart(
            F.dynamics_lines(dyn, trigger, title="Routing indicators per layer over training snapshots", phases=phases),
            key="dynamics_lines",
        )
        saturation(run, dyn, trigger, phases)
        layers = list(dict.fromkeys(dyn["layer"]))
        layer = st.radio("Layer for the per-expert load", layers, horizontal=True, key="dyn_layer")
        st.plotly_chart(F.dynamics_load_area(dyn, layer, trigger, phases), key="dynamics_load")
        verdicts = dyn.pivot_table(index="step", columns="layer", values="verdict", aggfunc="first")
        verdicts = verdicts[[name for name in layers if name in verdicts.columns]].reset_index()
        verdicts.columns.name = None
        st.markdown("**Verdict at each snapshot**")
        st.dataframe(
            verdicts.style.map(F.verdict_css, subset=[c for c in verdicts.columns if c != "step"]), hide_index=True
        )
        with st.expander("Reasons at each snapshot"):
            st.dataframe(
                dyn[["step", "layer", "verdict", "reason"]],
                hide_index=True,
                column_config={"reason": st.column_config.TextColumn(width="large")},
            )


def saturation(run: str, dyn, trigger: int | None, phases: list[tuple[int, str]]) -> None:
    """Router saturation per snapshot, one line per layer (columns of the ``dynamics`` table)."""
    st.markdown("**Router saturation**")
    if "router_saturation" not in dyn or dyn["router_saturation"].isna().all():
        st.info(
            "This run's dynamics table has no router saturation (built before it was measured): "
            f"{state.rebuild_hint(run)}."
        )
        return
    names = ("router_saturation", "router_saturation_top1")
    indicators = {m: f"{MEASURES[m][0]} (vs the final model)" for m in names if m in dyn}
    st.plotly_chart(
        F.dynamics_lines(dyn, trigger, indicators, title="Router saturation per layer over training", phases=phases),
        key="dynamics_saturation",
    )
    st.caption(" ".join(f"{MEASURES[m][0].capitalize()}: {MEASURES[m][1]}" for m in indicators))


def training_log(run: str, trigger: int | None, phases: list[tuple[int, str]]) -> None:
    st.subheader("Training log")
    log = reads.table(run, "train_log")
    if log is None or log.empty:
        st.info(
            "This run carries no training log (`train_log` table); the checkpoint's train_log.parquet is "
            "not part of the run's artifacts yet."
        )
        return
    for i, (name, keep) in enumerate(LOG_GROUPS.items()):
        cols = [c for c in log.columns if keep(c)]
        if not cols:
            continue
        if name.startswith("routing"):
            metric = st.selectbox(
                "Routing indicator", sorted({c.rsplit(".", 1)[-1] for c in cols}), key="dyn_log_metric"
            )
            cols = [c for c in cols if c.endswith("." + metric)]
        st.plotly_chart(
            F.train_log_lines(log, cols[:8], trigger, title=f"Training log: {name}", phases=phases), key=f"log_{i}"
        )


def render() -> None:
    st.title("Training dynamics")
    run, store = state.require_run()
    manifest = reads.manifest(run)
    config = reads.read_json(run, "config") or {}
    trigger = trigger_step(manifest, config)
    phases = training_phases(reads.spec(run))
    header(run, manifest, config, trigger, phases)
    snapshots(run, trigger, phases)
    training_log(run, trigger, phases)


render()
