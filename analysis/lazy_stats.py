"""scipy / scikit-learn functions the routing measures use, imported on first call.

``scipy.stats`` and ``sklearn.metrics`` take about 1.3 s to import on the demo machine. Every page imports
the routing modules (for their column names, verdict texts and measure descriptions) but only precompute and
live runs compute with them, so a page's first paint must not wait for those imports. Each function here is
the library's own, called through; nothing is reimplemented.
"""

from __future__ import annotations


def entropy(p, axis=None):
    """``scipy.stats.entropy`` (nats) of ``p`` (normalised by scipy), over ``axis`` (all when None)."""
    from scipy.stats import entropy as _entropy

    return _entropy(p) if axis is None else _entropy(p, axis=axis)


def mutual_info_score(labels_true, labels_pred) -> float:
    from sklearn.metrics import mutual_info_score as _score

    return _score(labels_true, labels_pred)


def normalized_mutual_info_score(labels_true, labels_pred) -> float:
    from sklearn.metrics import normalized_mutual_info_score as _score

    return _score(labels_true, labels_pred)


def jaccard_score(*args, **kwargs):
    from sklearn.metrics import jaccard_score as _score

    return _score(*args, **kwargs)
