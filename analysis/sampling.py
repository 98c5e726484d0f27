"""Sampling shared by the analysis steps: stratified, seeded, never the head of the data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _quota_per_stratum(counts: np.ndarray, size: int) -> np.ndarray:
    """How many rows to draw from each stratum: one each first (when size allows), the rest
    proportionally to what is left (largest remainder), never more than a stratum holds."""
    quota = np.zeros_like(counts)
    if size >= len(counts):
        quota[:] = 1
    remaining = size - int(quota.sum())
    capacity = counts - quota
    ideal = remaining * capacity / max(int(capacity.sum()), 1)
    extra = np.floor(ideal).astype(counts.dtype)
    leftover = remaining - int(extra.sum())
    by_fraction = np.argsort(-(ideal - extra), kind="stable")
    extra[by_fraction[:leftover]] += 1
    return quota + extra


def stratified_indices(n: int, size: int, strata: Sequence[Any] | None = None, seed: int = 0) -> np.ndarray:
    """Sorted indices of a random sample of ``size`` of ``n`` rows.

    With ``strata`` (one label per row) every stratum is represented (when ``size`` is at least the
    number of strata) and the rest is allocated proportionally. Rows are drawn at random within each
    stratum, so the sample is never simply the head of the data. ``size >= n`` returns every row.
    """
    if strata is not None and len(strata) != n:
        raise ValueError(f"strata has {len(strata)} labels for {n} rows")
    if size >= n:
        return np.arange(n)
    if size <= 0:
        return np.arange(0)
    rng = np.random.default_rng(seed)
    if strata is None:
        return np.sort(rng.choice(n, size=size, replace=False))
    _, stratum_of_row, counts = np.unique(np.asarray([str(s) for s in strata]), return_inverse=True, return_counts=True)
    quota = _quota_per_stratum(counts, size)
    picked = [
        rng.choice(np.flatnonzero(stratum_of_row == s), size=int(q), replace=False)
        for s, q in enumerate(quota)
        if q > 0
    ]
    return np.sort(np.concatenate(picked))
