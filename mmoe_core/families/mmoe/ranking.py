"""Ranks over a knowledge base and the metrics computed from them (MRR, MR, Hits@k).

Ranks follow the published MEL-MMoE evaluation: ``argsort(argsort(scores, descending), ascending) + 1``
over every entity of the KB, so rank 1 is the best-scored entity.

Ties: we use a *stable* descending argsort, so entities with exactly equal scores are ordered by their
KB index (the lower index ranks first). The published code uses torch's default (unstable) argsort,
whose tie order is unspecified; with real-valued scores exact ties are rare, but a model that gives
many entities the same score (e.g. all zeros) would look better than it is if the gold has a low index.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

HITS_AT = (1, 3, 5, 10, 20)


def rank_matrix(scores: Tensor) -> Tensor:
    """1-based rank of every entity for every row of ``scores`` [B, N] (argsort of argsort)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    return torch.argsort(order, dim=-1, stable=True) + 1


def gold_ranks(scores: Tensor, gold: Tensor | Sequence[int]) -> Tensor:
    """Rank of the gold entity of each row: ``rank_matrix(scores)[b, gold[b]]``."""
    gold = torch.as_tensor(gold, dtype=torch.long, device=scores.device)
    return rank_matrix(scores)[torch.arange(scores.shape[0], device=scores.device), gold]


def top_k(scores: Tensor, k: int = 5) -> tuple[Tensor, Tensor]:
    """(entity indices, scores) of the k best entities per row, best first, ties by KB index."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)[:, :k]
    return order, torch.gather(scores, 1, order)


def ranking_metrics(ranks: Sequence[int] | np.ndarray, hits_at: Sequence[int] = HITS_AT) -> dict[str, float]:
    """MRR, MR and Hits@k of 1-based gold ranks (plus ``n``, the number of ranked mentions)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        return {"n": 0, "MRR": float("nan"), "MR": float("nan"), **{f"Hits@{k}": float("nan") for k in hits_at}}
    out: dict[str, float] = {"n": int(ranks.size), "MRR": float((1.0 / ranks).mean()), "MR": float(ranks.mean())}
    for k in hits_at:
        out[f"Hits@{k}"] = float((ranks <= k).mean())
    return out


def metrics_by_label(
    ranks: Sequence[int], labels: Sequence[str], hits_at: Sequence[int] = HITS_AT
) -> dict[str, dict[str, float]]:
    """:func:`ranking_metrics` of each group of rows sharing a label value (sorted by value)."""
    ranks = np.asarray(ranks)
    labels = np.asarray([str(x) for x in labels])
    return {value: ranking_metrics(ranks[labels == value], hits_at) for value in sorted(set(labels.tolist()))}


def summarize_ranks(ranks: Sequence[int], slices: Mapping[str, Sequence[str]] | None = None) -> dict:
    """{"overall": metrics, "by_<label>": {value: metrics}} for each slice label given."""
    summary: dict = {"overall": ranking_metrics(ranks)}
    for name, labels in (slices or {}).items():
        summary[f"by_{name}"] = metrics_by_label(ranks, labels)
    return summary
