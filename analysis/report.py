"""A self-contained HTML report of one run, for stakeholders (no server, no internet needed to open it).

    python -m analysis.report --run NAME [--out report.html] [--root ARTIFACTS]

:func:`build_report` reads the run through :class:`analysis.store.RunStore` and lays out the model card,
the headline metrics, the per-layer verdict table with its reasons, and the main figures (built by
:mod:`analysis.figures`, the same builders the pages use), with plotly.js inlined once.

The small helpers that arrange a run's manifest / config / metrics for display (:func:`model_card`,
:func:`layers_frame`, :func:`verdict_frame`, :func:`headline_tables`) are shared with the overview page,
so the report and the dashboard always say the same thing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import html
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis import figures as F
from mmoe_core.errors import UserError, cli_entry
from mmoe_core.spec import ModelSpec

__all__ = [
    "build_report",
    "model_card",
    "trigger_step",
    "training_phases",
    "layers_frame",
    "training_options",
    "verdict_frame",
    "headline_tables",
    "rate_measures",
    "format_metric",
    "main",
]

# Bookkeeping entries of the shared trainer's "training" block that say nothing about the model.
HIDDEN_TRAINING_KEYS = frozenset(
    {"data_dir", "out_dir", "progress", "log_every", "threads", "family", "family_options"}
)
VERDICT_COLUMNS = {
    "layer": "layer",
    "verdict": "verdict",
    "reason": "reason",
    "effective_experts": "effective experts",
    "token_entropy": "token entropy (nats)",
    "load_cv": "load CV",
    "max_load_ratio": "max-load ratio",
    "dead_experts": "dead experts",
    "dead_expert_ids": "dead expert ids",
    "unrouted_fraction": "unrouted share",
    "experts_never_weighted": "never weighted",
    "switch_balance_loss": "balance loss",
    "z_loss": "z-loss",
    "batch_dependence": "batch dependence",
}


# ------------------------------------------------------------------------------------- display helpers


def _short_hash(h: Any) -> str:
    return str(h)[:12] if h else "n/a"


def _shown(v: Any) -> bool:
    """A value worth a line: set, and a scalar (nested blocks are the family's own business)."""
    return v is not None and isinstance(v, (str, int, float, bool))


def training_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """The options a checkpoint was trained with: every set, scalar entry of the trainer's ``training`` block
    (bookkeeping such as paths left out), then the family's own options (its ``family_options``), by name."""
    block = config.get("training") or (config.get("recipe") or {}).get("options") or {}
    out = {k: v for k, v in block.items() if k not in HIDDEN_TRAINING_KEYS and _shown(v)}
    family = block.get("family_options") if isinstance(block.get("family_options"), Mapping) else {}
    out.update({k: v for k, v in family.items() if _shown(v) and k not in out})
    return out


def trigger_step(manifest: Mapping[str, Any], config: Mapping[str, Any] | None) -> int | None:
    """The step the entropy-triggered two-stage schedule switched to specialisation: the manifest's
    ``trigger_step``, else the one training recorded in the run's config.json (``training`` block)."""
    if manifest.get("trigger_step") is not None:
        return int(manifest["trigger_step"])
    training = (config or {}).get("training") or {}
    for key in ("two_stage_trigger_step", "entropy_trigger_step"):
        if training.get(key) is not None:
            return int(training[key])
    return None


def training_phases(spec: ModelSpec | None) -> list[tuple[int, str]]:
    """(step, what starts there) of the training schedule the model declares (``spec.training_phases``),
    in step order."""
    return sorted((int(p.step), p.label) for p in (spec.training_phases if spec is not None else ()))


def model_card(
    manifest: Mapping[str, Any], config: Mapping[str, Any] | None, spec: ModelSpec | None = None
) -> list[tuple[str, str]]:
    """(field, value) lines of a run's model card: with ``spec``, the model in words and the facts it
    declares (``spec.model_card``) first; then family, description, code version, checkpoint and dataset
    hashes, split, size and build time; with ``spec``, the prediction, declared outputs and labels last."""
    config = config or {}
    code = manifest.get("code_version") or "n/a"
    if config.get("code_version") and config.get("code_version") != code:
        code = f"{code} (checkpoint trained with {config['code_version']})"
    lines = [("model", spec.title), *[(str(k), str(v)) for k, v in spec.model_card.items()]] if spec else []
    lines += [
        ("family", str(manifest.get("family") or config.get("family") or "n/a")),
        ("description", str(config.get("description") or (config.get("training") or {}).get("description") or "n/a")),
        ("code version", str(code)),
        ("checkpoint", f"{manifest.get('checkpoint', 'n/a')} (hash {_short_hash(manifest.get('checkpoint_hash'))})"),
        ("dataset", f"{manifest.get('dataset', 'n/a')} (hash {_short_hash(manifest.get('dataset_hash'))})"),
        ("split", f"{manifest.get('split', 'n/a')}, {manifest.get('num_examples', 'n/a')} examples"),
        ("built", str(manifest.get("created", "n/a"))),
    ]
    if spec is not None:
        lines.append(("prediction", f"{spec.prediction.kind}: {spec.prediction.description}".strip(": ")))
        lines += [(f"output: {o.name}", f"{o.kind}: {o.description}") for o in spec.outputs]
        lines += [
            (f"label: {lab.name}", lab.description + (" (ground truth)" if lab.ground_truth else ""))
            for lab in spec.labels
        ]
    return lines


LAYER_COLUMNS = [
    "layer",
    "E",
    "k",
    "gate",
    "scores",
    "weights",
    "batch-dependent",
    "shared experts",
    "capacity",
    "routed",
    "gate sees",
    "calls",
    "note",
]


def layers_frame(spec: ModelSpec | None) -> pd.DataFrame:
    """The routed layers as declared: E, k, and what the gate really does (scores, how the combine weights
    are formed, batch dependence, shared experts, capacity), what is routed and what the gate sees."""
    rows = []
    for layer in spec.routed_layers if spec is not None else ():
        g = layer.gate
        rows.append(
            {
                "layer": layer.name,
                "E": layer.num_experts,
                "k": layer.top_k,
                "gate": g.kind,
                "scores": g.score,
                "weights": g.normalisation,
                "batch-dependent": "yes" if g.batch_dependent else "no",
                "shared experts": g.shared_experts,
                "capacity": "" if g.capacity is None else f"{g.capacity:g}",
                "routed": layer.routed,
                "gate sees": layer.gate_sees,
                "calls": ", ".join(layer.calls),
                "note": g.note,
            }
        )
    return pd.DataFrame(rows, columns=LAYER_COLUMNS)


def _ids(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, (list, tuple, np.ndarray)):
        return ", ".join(str(int(x)) for x in v) or "none"
    return str(v)


def verdict_frame(layer_metrics: pd.DataFrame) -> pd.DataFrame:
    """Per layer: verdict, its reason (which quotes the numbers) and the main indicators, display-named."""
    if layer_metrics is None or layer_metrics.empty:
        return pd.DataFrame(columns=["layer", "verdict", "reason"])
    cols = [c for c in VERDICT_COLUMNS if c in layer_metrics]
    out = layer_metrics[cols].copy()
    for c in ("dead_expert_ids", "experts_never_weighted"):
        if c in out:
            out[c] = out[c].map(_ids)
    for c in out.columns:
        if pd.api.types.is_float_dtype(out[c]):
            out[c] = out[c].round(3)
    return out.rename(columns=VERDICT_COLUMNS)


def rate_measures(block: Mapping[str, Any]) -> list[str]:
    """Measures of a metrics block that are shares in [0, 1] (MRR, Hits@k, exact match...)."""
    out = []
    for k in order_measures(block):
        v = block[k]
        if k in ("n", "MR") or not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if isinstance(v, float) and (math.isnan(v) or 0.0 <= v <= 1.0):
            out.append(k)
    return out


def _measure_order(name: str) -> tuple:
    """MRR / exact match first, then Hits@k by k, then MR, then the count n."""
    m = re.fullmatch(r"(?i)hits@(\d+)", name)
    if name in ("MRR", "exact_match", "accuracy"):
        return (0, 0, name)
    if m:
        return (1, int(m.group(1)), name)
    if name == "n":
        return (4, 0, name)
    if name == "MR":
        return (3, 0, name)
    return (2, 0, name)


def order_measures(names) -> list[str]:
    return sorted(names, key=_measure_order)


def headline_tables(metrics: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
    """(overall metrics, {label: table of metrics by that label's values}) of ``metrics.json``; measures in
    reading order (MRR / exact match, Hits@1, @3, ..., MR, n)."""
    if not metrics:
        return {}, {}
    block = metrics.get("overall") or {}
    overall = {k: block[k] for k in order_measures(block) if isinstance(block[k], (int, float))}
    by = {}
    for key, block in metrics.items():
        if key.startswith("by_") and isinstance(block, Mapping) and block:
            frame = pd.DataFrame({str(v): dict(m) for v, m in block.items() if isinstance(m, Mapping)}).T
            frame = frame[order_measures(frame.columns)]
            if "n" in frame:
                frame["n"] = frame["n"].astype(int)
            frame.index.name = key[3:]
            by[key[3:]] = frame.reset_index()
    return overall, by


def format_metric(name: str, value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if name in ("MR",) or not (0.0 <= value <= 1.0):
            return f"{value:.2f}"
        return f"{value:.1%}"
    return str(value)


# ------------------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 2rem auto;
       max-width: 1200px; color: #1f2328; line-height: 1.45; padding: 0 1rem; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 0.3rem; margin-top: 2.2rem; }
table { border-collapse: collapse; margin: 0.6rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: #59636e; font-size: 0.9rem; }
.warn { background: #fff8c5; border: 1px solid #d4a72c; padding: 0.6rem 0.8rem; border-radius: 6px; }
.metrics { display: flex; flex-wrap: wrap; gap: 0.8rem; margin: 0.6rem 0; }
.metric { border: 1px solid #d0d7de; border-radius: 6px; padding: 0.4rem 0.9rem; min-width: 90px; }
.metric .v { font-size: 1.4rem; font-weight: 600; } .metric .k { color: #59636e; font-size: 0.85rem; }
"""


def _table_html(frame: pd.DataFrame, verdict_col: str | None = None, table_id: str | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for _, row in frame.iterrows():
        cells = []
        for c in frame.columns:
            v = row[c]
            num = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            text = (
                ""
                if v is None or (isinstance(v, float) and math.isnan(v))
                else (f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v))
            )
            style = f' style="{F.verdict_css(v)}"' if c == verdict_col else ""
            cells.append(f"<td{' class=num' if num else ''}{style}>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    tid = f' id="{table_id}"' if table_id else ""
    return f"<table{tid}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class _Figures:
    """Figures to HTML; plotly.js is inlined with the first one only."""

    def __init__(self) -> None:
        self.first = True

    def __call__(self, fig) -> str:
        out = fig.to_html(
            full_html=False,
            include_plotlyjs="inline" if self.first else False,
            config={"displaylogo": False, "responsive": True},
        )
        self.first = False
        return f'<div class="figure">{out}</div>'


def build_report(run: str, root: str | os.PathLike | None = None) -> str:
    """The self-contained HTML report of ``run`` (under ``root``, default the artifacts root)."""
    from analysis.store import RunStore, resolve_root, run_status

    root = resolve_root(root)
    status = run_status(run, root)
    with RunStore(run, root) as store:
        manifest = dict(store.manifest or {})
        try:
            spec = store.spec()
        except ValueError:
            spec = None  # a stale run: the status warning above the report says so
        config = _json(store, "config") or {}
        metrics = _json(store, "metrics") or {}
        lm = store.layer_metrics() if store.has("layer_metrics") else pd.DataFrame()
        loads = store.layer_loads() if (store.has("routing_loads") or store.has("routing")) else pd.DataFrame()
        layers = list(lm["layer"]) if len(lm) else sorted(loads["layer"].unique()) if len(loads) else []
        entropies = {name: store.entropy_values(name, sample=20_000) for name in layers} if store.has("routing") else {}
        special = store.table("specialisation") if store.has("specialisation") else pd.DataFrame()
        dyn = store.dynamics() if store.has("dynamics") else pd.DataFrame()
    num_experts = {layer.name: layer.num_experts for layer in (spec.routed_layers if spec else ())}
    order = list(num_experts)
    lm, loads, special, dyn = (F.in_layer_order(f, order) for f in (lm, loads, special, dyn))
    entropies = {
        name: entropies[name] for name in sorted(entropies, key=lambda n: order.index(n) if n in order else len(order))
    }
    fig = _Figures()
    parts: list[str] = []
    title = f"MoEscope report: {html.escape(run)}"
    parts.append(f"<h1>{title}</h1>")
    parts.append(
        f'<p class="muted">Generated {_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")} '
        f"from the run's artifacts; status: {html.escape(status.state)}.</p>"
    )
    if status.state != "ready":
        parts.append(f'<p class="warn">{html.escape(status.message)}</p>')
    for note in spec.notes if spec else ():
        parts.append(f'<p class="warn">{html.escape(note)}</p>')

    parts.append("<h2>Headline metrics</h2>")
    overall, by = headline_tables(metrics)
    if overall:
        cells = "".join(
            f'<div class="metric"><div class="v">{html.escape(format_metric(k, v))}</div>'
            f'<div class="k">{html.escape(k)}</div></div>'
            for k, v in overall.items()
        )
        parts.append(f'<div class="metrics">{cells}</div>')
        for label, frame in by.items():
            parts.append(f"<h3>By {html.escape(label)}</h3>")
            parts.append(_table_html(frame))
            rates = rate_measures(metrics.get("overall") or {})
            block = metrics.get(f"by_{label}") or {}
            if rates and block:
                parts.append(fig(F.headline_bars(block, rates[:4], f"Headline metrics by {label}")))
    else:
        parts.append('<p class="muted">This run has no metrics.json.</p>')

    parts.append("<h2>Per-layer verdicts</h2>")
    parts.append(
        '<p class="muted">healthy / warning / collapsed from the documented thresholds '
        "(analysis.routing.THRESHOLDS); the reason quotes the numbers that decided it.</p>"
    )
    parts.append(_table_html(verdict_frame(lm), verdict_col="verdict", table_id="verdicts"))

    parts.append("<h2>Model card</h2>")
    card = pd.DataFrame(model_card(manifest, config, spec), columns=["field", "value"])
    parts.append(_table_html(card, table_id="model-card"))
    layer_table = layers_frame(spec)
    if len(layer_table):
        parts.append("<h3>Routed layers</h3>")
        parts.append(_table_html(layer_table, table_id="layers"))
    opts = training_options(config)
    if opts:
        parts.append("<h3>Training options</h3>")
        parts.append(
            _table_html(
                pd.DataFrame({"option": list(opts), "value": [str(v) for v in opts.values()]}), table_id="training"
            )
        )

    parts.append("<h2>Utilization</h2>")
    parts.append(fig(F.load_bars(loads)))
    parts.append(fig(F.load_heatmap(loads)))
    if entropies:
        parts.append(fig(F.entropy_histograms(entropies, num_experts)))
    if len(special):
        parts.append(fig(F.specialisation_bars(special)))
    if len(dyn):
        parts.append("<h2>Training dynamics</h2>")
        parts.append(fig(F.dynamics_lines(dyn, trigger_step(manifest, config), phases=training_phases(spec))))
    body = "\n".join(parts)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n"
    )


def _json(store, name: str):
    try:
        return store.read_json(name)
    except (FileNotFoundError, ValueError):
        return None


def readable_run(run: str, root: str | os.PathLike | None) -> None:
    """UserError unless ``run`` is a published run whose files are all there (a stale one is reported,
    with its warning on top)."""
    from analysis.store import run_status
    from analysis.store.layout import _RUN_RE

    if not _RUN_RE.match(run):
        raise UserError(f"--run {run!r} is not a run name (letters, digits, '.', '_' or '-')")
    status = run_status(run, root)
    if status.state in ("missing", "partial"):
        raise UserError(status.message)


def write_atomically(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file beside it: a failed or killed write leaves no half report."""
    if not path.parent.is_dir():
        raise UserError(f"--out {path}: the folder {path.parent} does not exist; create it or pick another path")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise UserError(f"--out {path}: cannot be written ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run name (artifacts/runs/<run>/)")
    p.add_argument("--out", help="output file (default <run>-report.html)")
    p.add_argument("--root", help="artifacts root (default artifacts/ or $MOESCOPE_ARTIFACTS)")
    a = p.parse_args(argv)
    readable_run(a.run, a.root)
    out = Path(a.out or f"{a.run}-report.html")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as {out / (a.run + '-report.html')}")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: the folder {out.parent} does not exist; create it or pick another path")
    text = build_report(a.run, a.root)
    write_atomically(out, text)
    print(f"{out} ({len(text) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
