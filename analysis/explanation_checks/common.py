"""Shared pieces of the explanation checks: table columns, thresholds, row builders.

Part of :mod:`analysis.explanation_checks` (see its docstring for the whole).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

KEY = "example_index"
CHECK_COLUMNS = ("check", "method", "layer", "label", "slice", "value", "n", "baseline", "p_value", "flagged", "detail")
KNOCKOUT_COLUMNS = (
    "layer",
    "expert",
    "metric",
    "label",
    "slice",
    "value",
    "base",
    "delta",
    "n",
    "load",
    "weight_share",
)
METHODS = ("ig", "occlusion", "input_norm")
SANITY_METHODS = ("ig", "input_norm")
"""The precompute's sanity-check methods: occlusion of every position costs one forward per position (five
IG calls' worth on the demo models, and a dozen calls per example), so it is offered but not run by default."""
CONTROL = "input_norm"
ROUTER_TARGET = "router_logit"
ALL = "all"


@dataclass(frozen=True)
class CheckThresholds:
    """Every threshold and size of the checks, in one place.

    * ``randomisation_spearman``: an explanation whose mean Spearman correlation (of |a| per position) with the
      trained model's stays above this after re-initialising parameters is flagged as not depending on them.
      0.5: Adebayo et al. read rank correlations near 0 as "changed"; a faithful method on a 4-expert model of
      our size drops below 0.3 once the output end is re-initialised, the input-norm control stays at 1.
    * ``alpha``: p-value under which agreement or specialisation is taken as more than chance.
    * ``n_permutations``: permutations of every permutation baseline.
    * ``curve_steps``: points of the deletion and insertion curves (fractions 0, 1/steps, ..., 1 of positions).
    * ``random_orders``: random orders per example that make the curves' baseline.
    * ``infidelity_drop``: chance of each position being removed in one infidelity perturbation.
    * ``sensitivity_radius``: radius of sensitivity_max's L-infinity noise, as a share of mean |x|.
    """

    randomisation_spearman: float = 0.5
    alpha: float = 0.05
    n_permutations: int = 200
    curve_steps: int = 10
    random_orders: int = 8
    infidelity_samples: int = 10
    infidelity_drop: float = 0.25
    sensitivity_samples: int = 2
    sensitivity_radius: float = 0.02


THRESHOLDS = CheckThresholds()


def _row(
    check: str,
    method: str = "",
    layer: str = "",
    label: str = "",
    slice: str = ALL,
    value: float = math.nan,
    n: int = 0,
    baseline: float = math.nan,
    p_value: float = math.nan,
    flagged: bool = False,
    detail: str = "",
) -> dict:
    return {
        "check": check,
        "method": method,
        "layer": layer,
        "label": label,
        "slice": str(slice),
        "value": float(value),
        "n": int(n),
        "baseline": float(baseline),
        "p_value": float(p_value),
        "flagged": bool(flagged),
        "detail": detail,
    }


def _above(a: float, b: float) -> bool:
    """a > b beyond rounding (a permutation null of identical values averages to b within an ulp of a)."""
    return bool(a > b + 1e-9 * (1.0 + abs(b)))


def _frame(rows: Sequence[dict], columns: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=list(columns))


# =============================================================================================
# Ground-truth agreement: attributions
# =============================================================================================
