"""Explanations that check themselves: ground-truth agreement, sanity checks and causal expert knockout.

Everything is read from the run's declaration (:class:`mmoe_core.spec.ModelSpec`): which label decides an
example and which inputs each of its values points at (``spec.deciding_label().decides``), the source-weight
outputs and their truth label, the ground-truth labels, the routed layers and the headline metrics. No family
is named here.

Checks (one row each in the ``explanation_checks`` table, columns :data:`CHECK_COLUMNS`)
------------------------------------------------------------------------------------------
``attr_decisive_share``   attributions: share of attribution mass sum|a| on the inputs a label value decides,
                          per method and label value, against the same share over the other examples
                          (one-sided Mann-Whitney U, scipy). Flagged when the share is not higher there.
``source_agreement``      source weights: share of examples whose dominant source is the truth label's source
                          (:mod:`analysis.source_weights`), overall, per source and per value of every other
                          label; baseline = the same agreement under permuted pairings (scipy
                          ``permutation_test``) or, per source, the dominant share of that source (binomial
                          test). Flagged when not above its baseline.
``routing_specialisation`` MI (nats) between the chosen top-1 expert and each ground-truth label (and the
                          position kind and routed modality), per layer, against a permutation baseline with a
                          p-value. Flagged when chance explains it (p >= alpha).
``randomisation_spearman`` Adebayo et al. 2018 (model-parameter randomisation, cascading top-down): Spearman
                          rank correlation of |a| per position between the trained model's and a model whose
                          modules were re-initialised from the output end down to a stage. Flagged when the
                          correlation stays above :attr:`CheckThresholds.randomisation_spearman` (the
                          explanation does not depend on those parameters).
``deletion_auc`` / ``insertion_auc``  remove (or add back) the most-attributed positions first; area under
                          the normalised output curve against random orders. Flagged when not better than
                          random (deletion: not lower; insertion: not higher).
``infidelity``            captum's ``infidelity`` (Yeh et al. 2019) with position-removal perturbations, against
                          the same values shuffled over positions. Flagged when not lower than shuffled.
``sensitivity_max``       captum's ``sensitivity_max``: largest relative change of the explanation under small
                          input noise; reported, not judged (no reference value exists).

Method names: ``ig`` (captum IntegratedGradients), ``occlusion`` (captum Occlusion, one position at a time;
offered, not in the precompute's :data:`SANITY_METHODS`) and ``input_norm``, a control that ignores the model
(the L2 norm of each position's input vector): it is what an explanation that does not depend on the model
looks like, and the randomisation check must flag it. The agreement check scores every method of the stored
``attributions`` table.

Knockout (``knockout_effects``, :data:`KNOCKOUT_COLUMNS`): for every routed layer and expert the run's headline
and per-slice metrics with that expert knocked out (``adapter.knockout``: the gate chooses among the others),
and with the whole layer removed (``adapter.ablate_layer``, expert = -1), beside the expert's slot load and
weight share over the run: "used a lot" next to "matters".

Detector suite (``detector_suite``): :func:`analysis.collapse_suite.validate` on the run's own routing, per layer.

What is maintained code and what is hand-written
------------------------------------------------
captum: IntegratedGradients, Occlusion, ``infidelity``, ``sensitivity_max``; scipy: ``spearmanr``,
``mannwhitneyu``, ``wilcoxon``, ``binomtest``, ``permutation_test``; scikit-learn: ``auc``. Hand-written, and
why: the cascading randomisation (Quantus's ``MPRT`` expects one input array with a class target and a model
called as ``model(x)``; ours explains a scalar of several embedding tensors through the adapter's
``attribution_forward`` closure, and Quantus would bring opencv and scikit-image for nothing we could call);
the layer order (taken from one traced forward, since registration order is not execution order); deletion and
insertion curves (no maintained implementation takes several inputs and position-level removal); the grouped
permutations of the routing MI (positions of one example are not exchangeable with another example's, which
``scipy.stats.permutation_test`` cannot express).
"""

from analysis.explanation_checks.agreement import (
    deciding_share,
    deciding_share_rows,
    grouped_permutation_mi,
    routing_specialisation_rows,
    source_agreement_rows,
)
from analysis.explanation_checks.common import (
    CHECK_COLUMNS,
    KNOCKOUT_COLUMNS,
    METHODS,
    SANITY_METHODS,
    THRESHOLDS,
    CheckThresholds,
)
from analysis.explanation_checks.knockout import _resolve_metrics as _resolve_metrics
from analysis.explanation_checks.knockout import detector_suite, knockout_effects, metric_rows
from analysis.explanation_checks.sanity import (
    curve_auc,
    deletion_insertion,
    execution_order,
    explain,
    faithfulness_rows,
    randomisation_rows,
    randomisation_stages,
    randomised,
    spearman_abs,
)
from analysis.explanation_checks.step import check_samples, explanation_checks_step, summary_json

__all__ = [
    "CHECK_COLUMNS",
    "KNOCKOUT_COLUMNS",
    "CheckThresholds",
    "THRESHOLDS",
    "METHODS",
    "SANITY_METHODS",
    "deciding_share",
    "deciding_share_rows",
    "source_agreement_rows",
    "grouped_permutation_mi",
    "routing_specialisation_rows",
    "execution_order",
    "randomisation_stages",
    "randomised",
    "spearman_abs",
    "explain",
    "randomisation_rows",
    "deletion_insertion",
    "curve_auc",
    "faithfulness_rows",
    "knockout_effects",
    "metric_rows",
    "detector_suite",
    "check_samples",
    "explanation_checks_step",
    "summary_json",
]
