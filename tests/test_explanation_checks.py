"""Explanation checks (analysis.explanation_checks) on constructed inputs and on a tiny trained model.

The model (:class:`ProbeAdapter`, defined here): two inputs of three positions each ("left", "right"), one
of which carries a class prototype (the ground-truth label ``side`` says which); a routed layer whose gate
is frozen to send every position to expert 0 (so expert 0 alone learns the task), max-pooled, then a
second routed layer without an ``ablated`` switch (the toy family's sigmoid sieve), then a head. Unit
tier: no demo build.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from analysis import explanation_checks as X
from analysis.routing_table import routing_frame
from mmoe_core.adapter import ModelAdapter, RunOutput
from mmoe_core.moe import SwitchMoE
from mmoe_core.routing_record import PositionMeta, RoutingRecorder
from mmoe_core.spec import (
    AttributionTarget,
    ExampleField,
    InputSpec,
    LabelSpec,
    ModelSpec,
    OutputSpec,
    PredictionSpec,
    RoutedLayerSpec,
    SourceSpec,
)
from tests.toy_family import SigmoidSieve

CLASSES, WIDTH, SIDE = 3, 8, 3  # classes, feature width, positions per input


# ---------------------------------------------------------------------------------------------- the model


class Probe(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.moe = SwitchMoE(WIDTH, 16, num_experts=3, top_k=1, mult=2, name="moe")
        with torch.no_grad():  # every position goes to expert 0, whatever it holds
            self.moe.gate.w_gate.weight.zero_()
            self.moe.gate.w_gate.bias.copy_(torch.tensor([6.0, 0.0, -6.0]))
        self.moe.gate.requires_grad_(False)
        self.sieve = SigmoidSieve(16, num_experts=2, top_k=1, name="sieve")
        self.head = nn.Linear(16, CLASSES)

    def forward(
        self, left: Tensor, right: Tensor, recorder: RoutingRecorder | None = None, example_ids: Sequence[int] = ()
    ) -> Tensor:
        x = torch.cat([left, right], dim=1)
        meta = None
        if recorder is not None:
            n = x.shape[1]
            meta = PositionMeta(
                "probe",
                list(example_ids),
                ["token"] * n,
                ["left"] * SIDE + ["right"] * SIDE,
                ["left"] * SIDE + ["right"] * SIDE,
                [[f"p{i}" for i in range(n)]] * x.shape[0],
            )
        h = self.moe(x, recorder=recorder, meta=meta).amax(dim=1)
        return self.head(h + self.sieve(h))


def make_examples(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    prototypes = np.eye(CLASSES, WIDTH) * 3.0  # norm 3, like a noise position's (8 dims of N(0, 1))
    out = []
    for i in range(n):
        cls, side = int(rng.integers(CLASSES)), ("left", "right")[int(rng.integers(2))]
        feats = {s: rng.normal(0, 1.0, size=(SIDE, WIDTH)) for s in ("left", "right")}
        feats[side][int(rng.integers(SIDE))] = prototypes[cls] + rng.normal(0, 0.3, size=WIDTH)
        out.append(
            {
                "index": i,
                "id": f"ex{i}",
                "gold": cls,
                "left": feats["left"],
                "right": feats["right"],
                "labels": {"side": side, "parity": "even" if i % 2 == 0 else "odd"},
            }
        )
    return out


def _tensors(examples: Sequence[dict]) -> tuple[Tensor, Tensor]:
    return (
        torch.tensor(np.stack([e["left"] for e in examples]), dtype=torch.float32),
        torch.tensor(np.stack([e["right"] for e in examples]), dtype=torch.float32),
    )


class ProbeAdapter(ModelAdapter):
    family = "probe"
    title = "probe: which class sits on which side"

    def fields(self):
        return [ExampleField("id", "Example", "id", role="title")]

    def input_spec(self):
        return [InputSpec("left", "text_tokens", "left positions"), InputSpec("right", "text_tokens", "right")]

    def routed_layers(self):
        return [RoutedLayerSpec("moe", 3, 1), RoutedLayerSpec("sieve", 2, 1)]

    def prediction_spec(self):
        return PredictionSpec("ranking", "classes ranked by logit", headline=("Hits@1",), item="class")

    def attribution_targets(self):
        return [AttributionTarget("score", "gold logit")]

    def output_spec(self):
        return [
            OutputSpec(
                "mix",
                "source_weights",
                "",
                sources=(SourceSpec("left", "w_left", "left"), SourceSpec("right", "w_right", "right")),
                truth_label="side",
                positions="positions",
            )
        ]

    def label_spec(self):
        return [
            LabelSpec(
                "side",
                "the side holding the prototype",
                ground_truth=True,
                decides={"left": ("left",), "right": ("right",)},
            ),
            LabelSpec("parity", "index parity"),
        ]

    def load_examples(self, data_dir: Path, split: str = "test"):
        return make_examples(60, 1)

    @torch.no_grad()
    def run(self, examples, record=True, batch_size=32, progress=False):
        recorder = RoutingRecorder() if record else None
        preds, mix = [], []
        for s in range(0, len(examples), batch_size):
            chunk = list(examples[s : s + batch_size])
            left, right = _tensors(chunk)
            logits = self.model(left, right, recorder, [e["index"] for e in chunk])
            # the declared source weights: share of the pooled features whose maximum sits on each side
            pooled_from = self.model.moe(torch.cat([left, right], dim=1)).argmax(dim=1)  # [B, D]
            share_left = (pooled_from < SIDE).float().mean(dim=1)
            mix += [
                {
                    "index": e["index"],
                    "positions": ["pooled"],
                    "w_left": [float(share_left[row])],
                    "w_right": [1 - float(share_left[row])],
                }
                for row, e in enumerate(chunk)
            ]
            for row, e in enumerate(chunk):
                order = logits[row].argsort(descending=True).tolist()
                rank = order.index(e["gold"]) + 1
                preds.append(
                    {
                        "index": e["index"],
                        "id": e["id"],
                        "prediction": str(order[0]),
                        "gold": str(e["gold"]),
                        "rank": rank,
                        "correct": rank == 1,
                        "score": float(logits[row, order[0]]),
                    }
                )
        return RunOutput(preds, recorder, {"mix": mix})

    def summarize(self, predictions, examples):
        side = {e["index"]: e["labels"]["side"] for e in examples}

        def metrics(rows):
            return {
                "Hits@1": float(np.mean([p["rank"] == 1 for p in rows])),
                "MRR": float(np.mean([1 / p["rank"] for p in rows])),
                "n": len(rows),
            }

        groups: dict[str, list] = {}
        for p in predictions:
            groups.setdefault(side[p["index"]], []).append(p)
        return {"overall": metrics(predictions), "by_side": {k: metrics(v) for k, v in sorted(groups.items())}}

    def attribution_inputs(self, example):
        left, right = _tensors([example])
        return {"left": left, "right": right}

    def attribution_forward(self, example, target, layer=None, expert=None, position=None, call=None):
        gold = int(example["gold"])
        return lambda left, right: self.model(left, right)[:, gold]


def train_probe() -> ProbeAdapter:
    """The probe trained 150 steps (a few seconds on one thread); its hits@1 is above 0.9."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = Probe()
        data = make_examples(512, 0)
        left, right = _tensors(data)
        gold = torch.tensor([e["gold"] for e in data])
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for step in range(150):
            rows = torch.randint(0, len(data), (64,), generator=torch.Generator().manual_seed(step))
            loss = F.cross_entropy(model(left[rows], right[rows]), gold[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    adapter = ProbeAdapter(model, {}, "cpu")
    examples = adapter.load_examples(Path("."))
    acc = adapter.summarize(adapter.run(examples, record=False).predictions, examples)["overall"]["Hits@1"]
    assert acc > 0.9, f"the probe did not learn its task (hits@1 {acc:.2f})"
    return adapter


@pytest.fixture(scope="module")
def trained() -> ProbeAdapter:
    return train_probe()


# ---------------------------------------------------------------------------------------------- agreement


def _spec(**kw) -> ModelSpec:
    return ModelSpec(
        family="t",
        title="t",
        labels=(
            LabelSpec("side", "", ground_truth=True, decides={"left": ("left",), "right": ("right",)}),
            LabelSpec("parity", ""),
        ),
        **kw,
    )


def _attribution_table(mass: dict[int, dict[str, float]], method: str = "ig") -> pd.DataFrame:
    rows = [
        {"example_index": i, "method": method, "target": "score", "input": name, "position": p, "abs_value": m / 2}
        for i, by_input in mass.items()
        for name, m in by_input.items()
        for p in range(2)
    ]
    return pd.DataFrame(rows)


def test_deciding_share_is_the_mass_on_the_decided_inputs():
    masses = pd.DataFrame({"left": [3.0, 0.0, 1.0], "right": [1.0, 0.0, 1.0]})
    share = X.deciding_share(masses, ["left"])
    assert share.iloc[0] == pytest.approx(0.75) and math.isnan(share.iloc[1]) and share.iloc[2] == 0.5


def test_deciding_share_rows_score_each_label_value_against_the_other_examples():
    examples = pd.DataFrame({"example_index": range(8), "side": ["left"] * 4 + ["right"] * 4})
    good = {i: ({"left": 0.9, "right": 0.1} if i < 4 else {"left": 0.2, "right": 0.8}) for i in range(8)}
    rows = {r["slice"]: r for r in X.deciding_share_rows(_attribution_table(good), examples, _spec())}
    assert rows["left"]["value"] == pytest.approx(0.9) and rows["left"]["baseline"] == pytest.approx(0.2)
    assert rows["right"]["value"] == pytest.approx(0.8) and rows["right"]["baseline"] == pytest.approx(0.1)
    assert not rows["left"]["flagged"] and rows["left"]["p_value"] < 0.05  # Mann-Whitney, 4 vs 4, all above
    backwards = {i: {"left": 0.1, "right": 0.9} if i < 4 else {"left": 0.9, "right": 0.1} for i in range(8)}
    rows = {r["slice"]: r for r in X.deciding_share_rows(_attribution_table(backwards), examples, _spec())}
    assert rows["left"]["flagged"] and rows["right"]["flagged"] and rows["left"]["p_value"] > 0.5


def test_a_method_that_attributes_only_the_decided_input_is_not_scored():
    examples = pd.DataFrame({"example_index": range(4), "side": ["left", "right"] * 2})
    only_left = _attribution_table({i: {"left": 1.0} for i in range(4)}, "occlusion")
    (row,) = X.deciding_share_rows(only_left, examples, _spec())
    assert row["slice"] == "left" and "by construction" in row["detail"] and not row["flagged"]


def _source_weights(dominant: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "example_index": i,
                "position": 0,
                "token": "",
                "left": 0.8 if d == "left" else 0.2,
                "right": 0.2 if d == "left" else 0.8,
            }
            for i, d in enumerate(dominant)
        ]
    )


OUTPUT = OutputSpec(
    "mix",
    "source_weights",
    "",
    sources=(SourceSpec("left", "w_left", "left"), SourceSpec("right", "w_right", "right")),
    truth_label="side",
)


def test_source_agreement_against_random_pairings():
    truth = ["left", "right"] * 10
    examples = pd.DataFrame({"example_index": range(20), "side": truth, "parity": ["even", "odd", "odd", "even"] * 5})
    rows = X.source_agreement_rows(_source_weights(truth), examples, OUTPUT, ["side", "parity"])
    overall = next(r for r in rows if r["label"] == "side" and r["slice"] == "all")
    assert overall["value"] == 1.0 and overall["baseline"] == pytest.approx(0.5, abs=0.08)
    assert overall["p_value"] < 0.01 and not overall["flagged"]
    per_source = {r["slice"]: r for r in rows if r["label"] == "side" and r["slice"] != "all"}
    assert per_source["left"]["value"] == 1.0 and per_source["left"]["baseline"] == 0.5
    assert {r["slice"] for r in rows if r["label"] == "parity"} == {"even", "odd"}
    wrong = X.source_agreement_rows(_source_weights(["right", "left"] * 10), examples, OUTPUT, ["side"])
    assert wrong[0]["value"] == 0.0 and wrong[0]["flagged"]
    one_source = X.source_agreement_rows(_source_weights(["left"] * 20), examples, OUTPUT, ["side"])
    assert one_source[0]["value"] == 0.5 and one_source[0]["flagged"]  # always the same source: chance, flagged


# ---------------------------------------------------------------------------------------------- specialisation


def test_grouped_permutation_mi_and_its_p_value():
    rng = np.random.default_rng(0)
    labels = np.repeat(rng.integers(0, 2, size=50), 10)  # one label per example of 10 positions
    groups = np.repeat(np.arange(50), 10)
    mi, null_mean, null_max, p = X.grouped_permutation_mi(labels, labels, groups, within=False, n_permutations=99)
    assert mi == pytest.approx(math.log(2), abs=0.01) and null_max < mi and p == pytest.approx(1 / 100)
    chosen = rng.integers(0, 4, size=500)
    mi, null_mean, _, p = X.grouped_permutation_mi(chosen, labels, groups, within=False, n_permutations=99)
    assert p > 0.05 and mi == pytest.approx(null_mean, abs=0.01)
    kinds = np.tile(["a"] * 5 + ["b"] * 5, 50)  # a position label: half of each example
    mi, _, _, p = X.grouped_permutation_mi((kinds == "a").astype(int), kinds, groups, within=True, n_permutations=49)
    assert p == pytest.approx(1 / 50)


def test_routing_specialisation_rows_per_layer_and_label():
    n = 40
    routing = pd.DataFrame(
        {
            "layer": "moe",
            "example_index": np.repeat(np.arange(n), 4),
            "position_kind": np.tile(["cls", "token", "token", "token"], n),
            "routed_modality": "text",
        }
    )
    side = np.where(np.arange(n) % 2 == 0, "left", "right")
    routing["top1"] = np.where(np.repeat(side, 4) == "left", 0, 1)
    examples = pd.DataFrame({"example_index": np.arange(n), "side": side, "parity": "x"})
    rows = {r["label"]: r for r in X.routing_specialisation_rows(routing, examples, _spec())}
    assert set(rows) == {"side", "position_kind"}  # one-valued columns and labels that are no ground truth: none
    assert rows["side"]["value"] == pytest.approx(math.log(2)) and not rows["side"]["flagged"]
    assert rows["position_kind"]["value"] == pytest.approx(0.0, abs=1e-12) and rows["position_kind"]["flagged"]


# ---------------------------------------------------------------------------------------------- pure helpers


def test_randomisation_stages_are_cumulative_from_the_output_end():
    stages = X.randomisation_stages(["embed", "block1", "block2", "head"], 2)
    assert stages == [["head", "block2"], ["head", "block2", "block1", "embed"]]
    assert X.randomisation_stages(["a"], 4) == [["a"]] and X.randomisation_stages([], 3) == []


def test_spearman_abs_reads_magnitudes():
    assert X.spearman_abs([np.array([1.0, -2.0, 3.0])], [np.array([-1.0, 2.0, 3.0])]) == pytest.approx(1.0)
    assert math.isnan(X.spearman_abs([np.ones(3)], [np.arange(3.0)]))


def test_deletion_and_insertion_beat_random_orders_for_a_faithful_explanation():
    w = torch.tensor([5.0, 0.1, 3.0, 0.2, 1.0, 0.0])

    def forward(x: Tensor) -> Tensor:  # a linear model of six one-dimensional positions
        return (x[..., 0] * w).sum(dim=1)

    x = (torch.ones(1, 6, 1),)
    faithful = X.deletion_insertion(forward, x, [w.numpy()], steps=6, random_orders=16)
    assert faithful["deletion"] < faithful["deletion_random"] < faithful["insertion_random"] < faithful["insertion"]
    backwards = X.deletion_insertion(forward, x, [1 / (w.numpy() + 0.01)], steps=6, random_orders=16)
    assert backwards["deletion"] > backwards["deletion_random"]
    assert backwards["insertion"] < backwards["insertion_random"]
    assert X.curve_auc(np.array([1.0, 0.0])) == pytest.approx(0.5)


def test_metrics_resolve_case_insensitively_and_slices_come_from_by_labels():
    summary = {
        "overall": {"Hits@1": 0.5, "MRR": 0.6, "n": 10},
        "by_side": {"left": {"Hits@1": 1.0, "MRR": 1.0, "n": 5}},
        "num_entities": 7,
    }
    metrics = X._resolve_metrics(summary["overall"], ("hits@1",))
    assert metrics == ["Hits@1"]
    assert X.metric_rows(summary, metrics) == [("Hits@1", "", "all", 0.5, 10), ("Hits@1", "side", "left", 1.0, 5)]
    assert X._resolve_metrics(summary["overall"], ()) == ["Hits@1", "MRR"]


def test_check_samples_follow_the_precompute_sizes():
    assert X.check_samples({"attribution_sample": 48, "dynamics_sample": 256}, 1000) == {"knockout": 200, "sanity": 8}
    assert X.check_samples({"attribution_sample": 4, "dynamics_sample": 48}, 81) == {"knockout": 48, "sanity": 2}
    assert X.check_samples({"attribution_sample": 0, "knockout_sample": 10}, 5) == {"knockout": 5, "sanity": 0}


def test_detector_suite_on_a_healthy_routing_catches_every_injection():
    rng = np.random.default_rng(0)
    t = 600
    probs = rng.dirichlet(np.ones(4) * 2, size=t).astype(np.float32)
    top = np.argsort(-probs, axis=1)[:, :2]
    combine = np.zeros_like(probs)
    rows = np.arange(t)[:, None]
    combine[rows, top] = probs[rows, top] / probs[rows, top].sum(axis=1, keepdims=True)
    routing = pd.DataFrame(
        {
            "layer": "moe",
            "example_index": np.repeat(np.arange(60), 10),
            "position": np.tile(np.arange(10), 60),
            "position_kind": "token",
            "probs": list(probs),
            "topk_ids": list(top),
            "combine": list(combine),
            "logits": list(np.log(probs)),
        }
    )
    suite = X.detector_suite(routing)
    assert {"none", "dead_expert", "all_to_one", "weight_collapse"} <= set(suite["pathology"])
    assert suite["passed"].dropna().all(), suite[["pathology", "verdict", "reason"]].to_string()


# ---------------------------------------------------------------------------------------------- on the model


def input_times_constant(method, forward, inputs, n_steps=32, internal_batch_size=8):
    """An 'explanation' that ignores the model: each position's input summed, times 2."""
    return tuple(2.0 * x.detach().double()[0].sum(dim=-1).numpy() for x in inputs)


def test_randomisation_flags_what_ignores_the_model_and_not_ig(trained):
    spec = trained.spec()
    before = {k: v.clone() for k, v in trained.model.state_dict().items()}
    examples = make_examples(6, 5)
    rows = X.randomisation_rows(trained, spec, examples, methods=("ig", "input_norm"), n_stages=3, n_steps=16)
    by = {(r["method"], r["layer"].split(":")[0]): r for r in rows}
    assert {stage for _, stage in by} == {"1/3", "2/3", "3/3"}
    assert by[("ig", "3/3")]["value"] < X.THRESHOLDS.randomisation_spearman and not by[("ig", "3/3")]["flagged"]
    assert all(r["flagged"] and r["value"] == pytest.approx(1.0) for (m, _), r in by.items() if m == "input_norm")
    constant = X.randomisation_rows(
        trained, spec, examples, methods=("x2",), n_stages=3, explain_fn=input_times_constant
    )
    assert all(r["flagged"] for r in constant)
    after = trained.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_randomised_changes_the_weights_then_restores_them(trained):
    head = trained.model.head.weight.detach().clone()
    with X.randomised(trained, ["head", "moe.gate.w_gate"]):
        assert not torch.equal(trained.model.head.weight, head)
    assert torch.equal(trained.model.head.weight, head)


def test_faithfulness_rows_on_the_trained_model(trained):
    rows = X.faithfulness_rows(trained, trained.spec(), make_examples(6, 7), methods=("ig",), n_steps=16)
    by = {r["check"]: r for r in rows}
    assert set(by) == {"deletion_auc", "insertion_auc", "infidelity", "sensitivity_max"}
    assert by["deletion_auc"]["value"] < by["deletion_auc"]["baseline"] and not by["deletion_auc"]["flagged"]
    assert by["insertion_auc"]["value"] > by["insertion_auc"]["baseline"]
    assert by["infidelity"]["value"] < by["infidelity"]["baseline"] and by["sensitivity_max"]["value"] >= 0


def test_ablate_layer_zeroes_a_switch_moe_and_refuses_a_layer_without_the_switch(trained):
    example = make_examples(1, 9)
    inputs = _tensors(example)
    with trained.ablate_layer("moe"):
        assert trained.knockout_state()[0] == ("moe", (), "ablated")
        out = trained.model.moe(torch.cat(inputs, dim=1))
        assert torch.count_nonzero(out) == 0
    assert not trained.model.moe.ablated
    with pytest.raises(NotImplementedError, match="ablated"), trained.ablate_layer("sieve"):
        pass
    with pytest.raises(KeyError):
        with trained.ablate_layer("nope"):
            pass


def test_knockout_of_the_expert_that_carries_the_prediction_lowers_the_metric(trained):
    examples = make_examples(60, 3)
    routing = routing_frame(trained.run(examples).recorder)
    table, notes = X.knockout_effects(trained, trained.spec(), examples, routing=routing)
    overall = table[(table["label"] == "") & (table["metric"] == "Hits@1")].set_index(["layer", "expert"])
    assert overall.loc[("moe", 0), "delta"] < -0.4  # expert 0 carries every position
    assert overall.loc[("moe", 1), "delta"] == 0.0  # expert 2 is never chosen, even without 0 ...
    assert overall.loc[("moe", 2), "delta"] == 0.0  # ... so knocking out 1 or 2 changes nothing
    assert overall.loc[("moe", -1), "delta"] < -0.4  # the whole layer removed
    assert overall.loc[("moe", 0), "load"] == 1.0 and overall.loc[("moe", 1), "load"] == 0.0
    assert ("sieve", -1) not in overall.index and "sieve" in notes
    assert {"left", "right"} <= set(table.loc[table["label"] == "side", "slice"])
    assert list(table.columns) == list(X.KNOCKOUT_COLUMNS)


def test_the_precompute_step_writes_every_table_and_the_json(trained):
    examples = trained.load_examples(Path("."))
    run = trained.run(examples)
    routing = routing_frame(run.recorder)
    examples_df = pd.DataFrame(
        {
            "example_index": [e["index"] for e in examples],
            "side": [e["labels"]["side"] for e in examples],
            "parity": [e["labels"]["parity"] for e in examples],
        }
    )
    from analysis.attribution import attribution_table

    attributions = attribution_table(
        trained, examples, sample_size=6, stratify_by="side", progress=False, n_steps=8, router_target=None
    )
    weights = _source_weights([e["labels"]["side"] for e in examples])
    params = {
        "attribution_sample": 4,
        "dynamics_sample": 20,
        "seed": 0,
        "randomisation_stages": 2,
        "sanity_ig_steps": 8,
    }
    out = X.explanation_checks_step(
        trained,
        trained.spec(),
        examples,
        routing=routing,
        examples_df=examples_df,
        attributions=attributions,
        extras={"mix": weights},
        params=params,
    )
    checks = out["tables"]["explanation_checks"]
    assert list(checks.columns) == list(X.CHECK_COLUMNS)
    assert {
        "attr_decisive_share",
        "source_agreement",
        "routing_specialisation",
        "randomisation_spearman",
        "deletion_auc",
        "insertion_auc",
        "infidelity",
        "sensitivity_max",
    } <= set(checks["check"])
    ig = checks[(checks["check"] == "attr_decisive_share") & (checks["method"] == "ig")].set_index("slice")
    assert ig.loc["left", "value"] > ig.loc["left", "baseline"]
    assert ig.loc["right", "value"] > ig.loc["right", "baseline"]
    assert set(out["tables"]["knockout_effects"]["layer"]) == {"moe", "sieve"}
    assert len(out["tables"]["detector_suite"])
    summary = out["json"]
    for key in (
        "attr_decisive_share",
        "qga_agreement",
        "randomisation_spearman",
        "deletion_auc",
        "knockout",
        "detector_suite",
    ):
        assert summary[key], key
    assert summary["samples"] == {"knockout": 20, "sanity": 2}
    assert summary["knockout"]["moe"]["0"]["Hits@1"] < 0 and summary["knockout_notes"]["sieve"]
    import json

    json.dumps(summary, allow_nan=False)
