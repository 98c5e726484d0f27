"""Summaries of any declared output of kind ``source_weights``: per-position weights over named sources.

A family declares such an output with :class:`mmoe_core.spec.OutputSpec` (``kind="source_weights"``): its
sources (:class:`~mmoe_core.spec.SourceSpec`: a name, the list column holding its weights in the adapter's
rows, a label and a colour) and, optionally, ``truth_label``: the ground-truth label whose values name the
source each example should draw on. Nothing here knows a family or its source names.

Two layouts of the weights are read:

* long (as the store keeps them): one row per example and position, ``example_index, position, token``
  and one float column per source *name*;
* per example (as ``adapter.run`` returns them in ``RunOutput.extras``): ``index`` (the adapter's example
  key), the positions list column (``OutputSpec.positions``, e.g. ``tokens``) and one list column per
  source (``SourceSpec.column``).

Dominant source of an example: the source with the largest mean weight over the example's positions
(ties to the first declared). Agreement: over the examples whose truth label is one of the source names,
the share whose dominant source is that source.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mmoe_core.spec import OutputSpec

__all__ = ["long_weights", "mean_column", "agreement_definition", "SourceWeightsSummary", "summarise", "by_label"]

KEY = "example_index"


def mean_column(source: str) -> str:
    """Column of an example's mean weight on ``source`` in :attr:`SourceWeightsSummary.per_example`."""
    return f"mean_{source}"


def _names(output: OutputSpec) -> list[str]:
    return [s.name for s in output.sources]


def long_weights(weights: pd.DataFrame | Sequence[Mapping[str, Any]] | None, output: OutputSpec) -> pd.DataFrame:
    """The weights of ``output`` as one row per example and position: example_index, position, token and
    one float column per source name (see the module docstring for the two layouts read)."""
    names = _names(output)
    columns = [KEY, "position", "token", *names]
    if weights is None or len(weights) == 0:
        return pd.DataFrame({c: pd.Series(dtype=float if c in names else object) for c in columns})
    df = weights if isinstance(weights, pd.DataFrame) else pd.DataFrame(list(weights))
    if KEY not in df and "index" in df:
        df = df.rename(columns={"index": KEY})
    if all(n in df for n in names):  # already long
        out = df.copy()
        if "position" not in out:
            out["position"] = out.groupby(KEY).cumcount()
        if "token" not in out:
            out["token"] = ""
        out = out[columns].sort_values([KEY, "position"], kind="stable").reset_index(drop=True)
        out[names] = out[names].astype(float)
        return out
    missing = [s.column for s in output.sources if s.column not in df]
    if missing:
        raise ValueError(
            f"output {output.name!r}: no weights for its sources (columns {missing} are missing; "
            f"columns: {', '.join(map(str, df.columns))})"
        )
    rows: dict[str, list] = {c: [] for c in columns}
    for record in df.to_dict("records"):
        values = {s.name: np.asarray(record[s.column], dtype=float).ravel() for s in output.sources}
        n = min(len(v) for v in values.values())
        labels = record.get(output.positions)
        labels = list(labels) if labels is not None and not isinstance(labels, float) else []
        rows[KEY] += [int(record[KEY])] * n
        rows["position"] += list(range(n))
        rows["token"] += [str(labels[p]) if p < len(labels) else "" for p in range(n)]
        for name in names:
            rows[name] += values[name][:n].tolist()
    return pd.DataFrame(rows)


def agreement_definition(output: OutputSpec) -> str:
    """In words: what the agreement of ``output`` measures (shown beside the number)."""
    sources = " / ".join(s.name for s in output.sources) or "none"
    truth = output.truth_label.replace("_", " ") or "the ground-truth source"
    return (
        f"Over the examples whose {truth} is a single source ({sources}): the share whose dominant source "
        f"matches it. The dominant source of an example is the one with the largest mean weight over the "
        f"example's positions ({output.positions})."
    )


@dataclass
class SourceWeightsSummary:
    output: OutputSpec
    per_example: pd.DataFrame  # example_index, positions, mean_<source>..., dominant, + example columns
    agreement: float  # nan when no example has a single-source truth label (or none is declared)
    agreement_n: int
    agreement_by_source: dict  # {source name: share of its examples weighted to it}
    confusion: pd.DataFrame  # rows: truth label value, columns: dominant source (counts)
    definition: str = ""
    labels: list[str] = field(default_factory=list)  # the example labels present for :func:`by_label`


def _per_example(tokens: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    if tokens.empty:
        return pd.DataFrame(columns=[KEY, "positions", *map(mean_column, names), "dominant"])
    per = (
        tokens.groupby(KEY, sort=True)
        .agg(positions=("position", "size"), **{mean_column(n): (n, "mean") for n in names})
        .reset_index()
    )
    means = per[[mean_column(n) for n in names]].to_numpy(dtype=float)
    per["dominant"] = [names[i] for i in np.argmax(np.nan_to_num(means, nan=-np.inf), axis=1)]
    return per


def summarise(
    weights: pd.DataFrame | Sequence[Mapping[str, Any]] | None,
    examples: pd.DataFrame | None,
    output: OutputSpec,
    labels: Sequence[str] = (),
) -> SourceWeightsSummary:
    """Per-example means and dominant source, agreement with ``output.truth_label`` (overall and per
    source) and the confusion of truth label x dominant source. ``examples`` (keyed by example_index)
    supplies the labels; ``labels`` names the label columns to carry (the truth label always is)."""
    names = _names(output)
    per = _per_example(long_weights(weights, output), names)
    truth = output.truth_label
    wanted = list(dict.fromkeys([*([truth] if truth else []), *labels]))
    if examples is not None and len(examples):
        ex = examples
        keep = [c for c in wanted if c in ex and c not in per]
        per = per.merge(ex[[KEY, *keep]], on=KEY, how="left")
    agreement, n, by_source, confusion = float("nan"), 0, {}, pd.DataFrame()
    if truth and truth in per:
        single = per[per[truth].isin(names)]
        n = len(single)
        if n:
            hits = single["dominant"] == single[truth]
            agreement = float(hits.mean())
            by_source = {
                s: float(hits[single[truth] == s].mean()) if (single[truth] == s).any() else float("nan") for s in names
            }
        confusion = pd.crosstab(per[truth].rename(truth.replace("_", " ")), per["dominant"].rename("dominant source"))
        confusion = confusion.reindex(columns=names, fill_value=0)
    present = [c for c in wanted if c in per]
    return SourceWeightsSummary(output, per, agreement, n, by_source, confusion, agreement_definition(output), present)


def by_label(summary: SourceWeightsSummary, label: str) -> pd.DataFrame:
    """Per value of ``label``: examples and the mean of each source's per-example mean weight."""
    names = _names(summary.output)
    cols = [mean_column(n) for n in names]
    per = summary.per_example
    if label not in per:
        return pd.DataFrame(columns=[label, "examples", *cols])
    return per.groupby(label, sort=True).agg(examples=(KEY, "size"), **{c: (c, "mean") for c in cols}).reset_index()
