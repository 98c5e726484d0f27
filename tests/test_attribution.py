"""Attributions checked against a toy adapter whose score and router logits have known ground truth.

Toy model (W = 8; text: 6 token embeddings, image: 4 patch embeddings; routed sequence [text; image]):

* one SwitchMoE ``toy_moe`` (4 experts, top-4: a smooth gate, so IG's completeness holds exactly)
  whose gate input at every position is that position plus 0.5 x image patch 0 (a cross-modal gate);
* score = 1.0 * u.text[1] + 3.0 * u.image[2] + 0.1 * v.moe_out[text 0].

So the score reads text 0, text 1, image 0 (through the gate of text 0) and image 2; text 2..5 and
image patches 1 and 3 are ignored. Router logit (position p, expert e) = w_e.(x_p + 0.5 image[0]) + b_e.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from analysis.attribution import (
    TABLE_COLUMNS,
    ExplainedOutput,
    attribution_table,
    default_router_target,
    integrated_gradients,
    modality_share_by_label,
    occlusion_image,
    router_attribution,
)
from mmoe_core.adapter import AttributionTarget, InputSpec, ModelAdapter, PredictionSpec, RoutedLayerSpec, RunOutput
from mmoe_core.moe import SwitchMoE
from mmoe_core.routing_record import PositionMeta, RoutingRecorder
from mmoe_core.spec import GateSpec

W, L, P, E = 8, 6, 4, 4
GATE_MIX = 0.5
TEXT_WEIGHT, IMAGE_WEIGHT, MOE_WEIGHT = 1.0, 3.0, 0.1
IGNORED = {"text": [2, 3, 4, 5], "image": [1, 3]}


class ToyModel(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.moe = SwitchMoE(W, W, num_experts=E, top_k=E, name="toy_moe")
        self.register_buffer("u", torch.nn.functional.normalize(torch.randn(W), dim=0))
        self.register_buffer("v", torch.randn(W))

    def forward(self, text, image, recorder=None, meta=None):
        x = torch.cat([text, image], dim=1)
        gate_input = x + GATE_MIX * image[:, :1]
        routed = self.moe(x, gate_input, recorder=recorder, meta=meta)
        return (
            TEXT_WEIGHT * text[:, 1] @ self.u + IMAGE_WEIGHT * image[:, 2] @ self.u + MOE_WEIGHT * routed[:, 0] @ self.v
        )


class ToyAdapter(ModelAdapter):
    family = "toy"

    def fields(self):
        return []

    def input_spec(self):
        return [InputSpec("text", "text_tokens", "token embeddings"), InputSpec("image", "image_patches", "patches")]

    def routed_layers(self):
        return [
            RoutedLayerSpec(
                "toy_moe",
                E,
                E,
                GateSpec(),
                routed="text tokens and image patches",
                gate_sees="the position plus image patch 0",
                calls=("mention",),
            )
        ]

    def prediction_spec(self):
        return PredictionSpec("ranking", "toy score")

    def attribution_targets(self):
        return [
            AttributionTarget("score", "toy score"),
            AttributionTarget("router_logit", "a router logit", needs_layer=True),
        ]

    def load_examples(self, data_dir: Path, split: str = "test"):
        return []

    def summarize(self, predictions, examples):
        return {"overall": {}}

    def _tensors(self, examples: Sequence[dict]):
        text = torch.tensor(np.stack([ex["text_emb"] for ex in examples]), dtype=torch.float32)
        image = torch.tensor(np.stack([ex["image_emb"] for ex in examples]), dtype=torch.float32)
        return text, image

    def _meta(self, examples: Sequence[dict]) -> PositionMeta:
        kinds = ["text_token"] * L + ["image_patch"] * P
        modality = ["text"] * L + ["image"] * P
        return PositionMeta("mention", [ex["index"] for ex in examples], kinds, modality, modality)

    def run(self, examples, record=True, batch_size=32, progress=False):
        recorder = RoutingRecorder() if record else None
        with torch.no_grad():
            scores = self.model(*self._tensors(examples), recorder=recorder, meta=self._meta(examples))
        predictions = [{"index": ex["index"], "score": float(s)} for ex, s in zip(examples, scores)]
        return RunOutput(predictions, recorder)

    def attribution_inputs(self, example):
        text, image = self._tensors([example])
        return {"text": text, "image": image}

    def attribution_forward(self, example, target, layer=None, expert=None, position=None, call=None):
        if target == "score":
            return lambda text, image: self.model(text, image)

        def router_logit(text, image):
            recorder = RoutingRecorder(keep_graph=True)
            self.model(text, image, recorder=recorder, meta=self._meta([example] * text.shape[0]))
            recorded = next(c for c in recorder.calls if c.layer == layer and c.meta.call == (call or "mention"))
            return recorded.router.logits[:, position, expert]

        return router_logit

    def input_labels(self, example):
        return {"text": [f"tok{i}" for i in range(L)], "image": [f"patch {i // 2},{i % 2}" for i in range(P)]}


@pytest.fixture(scope="module")
def adapter() -> ToyAdapter:
    return ToyAdapter(ToyModel(), {"family": "toy"})


def make_example(index: int, decisive: str = "both", seed: int | None = None, u: torch.Tensor | None = None) -> dict:
    """Random embeddings; the decisive modality's scored position is pushed along u."""
    rng = np.random.default_rng(index if seed is None else seed)
    text, image = rng.normal(size=(L, W)), rng.normal(size=(P, W))
    if u is not None:
        direction = u.numpy()
        text[1] = direction * (4.0 if decisive in ("text", "both") else 0.1) + 0.05 * rng.normal(size=W)
        image[2] = direction * (4.0 if decisive in ("image", "both") else 0.1) + 0.05 * rng.normal(size=W)
    return {
        "index": index,
        "id": f"ex{index}",
        "labels": {"decisive": decisive},
        "text_emb": text.astype(np.float32),
        "image_emb": image.astype(np.float32),
    }


def score_of(adapter: ToyAdapter, example: dict, zero: bool = False) -> float:
    text, image = adapter.attribution_inputs(example).values()
    if zero:
        text, image = torch.zeros_like(text), torch.zeros_like(image)
    with torch.no_grad():
        return float(adapter.model(text, image))


# ---------------------------------------------------------------------------------------------


def test_ig_completeness_and_small_delta(adapter):
    example = make_example(3)
    result = integrated_gradients(adapter, example, "score", n_steps=32)
    expected = score_of(adapter, example) - score_of(adapter, example, zero=True)
    assert result.total() == pytest.approx(expected, abs=1e-4)
    assert abs(result.delta) < 1e-4
    assert result.output == pytest.approx(score_of(adapter, example), abs=1e-5)
    assert result.values["text"].shape == (L,) and result.values["image"].shape == (P,)
    np.testing.assert_allclose(result.abs_values["image"], np.abs(result.values["image"]))
    assert sum(result.share.values()) == pytest.approx(1.0)
    assert result.labels["image"][3] == "patch 1,1"


def test_ig_linear_positions_match_ground_truth_and_ignored_positions_get_zero(adapter):
    example = make_example(4)
    result = integrated_gradients(adapter, example)  # default target: the adapter's first, "score"
    u = adapter.model.u.numpy()
    # Linear terms: IG from a zero baseline gives exactly weight * u.x at those positions.
    assert result.values["image"][2] == pytest.approx(IMAGE_WEIGHT * example["image_emb"][2] @ u, abs=1e-4)
    assert result.values["text"][1] == pytest.approx(TEXT_WEIGHT * example["text_emb"][1] @ u, abs=1e-4)
    for name, positions in IGNORED.items():
        np.testing.assert_allclose(result.values[name][positions], 0.0, atol=1e-7)


def test_occlusion_finds_the_decisive_patch(adapter):
    example = make_example(5, "image", u=adapter.model.u)
    result = occlusion_image(adapter, example, "score")
    assert list(result.values) == ["image"]  # only image patches are occluded
    assert int(np.argmax(result.abs_values["image"])) == 2
    # Hiding patch 2 removes exactly its linear term (the MoE path does not read patch 2).
    u = adapter.model.u.numpy()
    assert result.values["image"][2] == pytest.approx(IMAGE_WEIGHT * example["image_emb"][2] @ u, abs=1e-4)
    np.testing.assert_allclose(result.values["image"][IGNORED["image"]], 0.0, atol=1e-6)
    assert math.isnan(result.delta) and result.share == {"image": 1.0}


@pytest.mark.parametrize("driver", ["own_position", "gate_patch"])
def test_router_attribution_points_at_the_driving_position(adapter, driver):
    expert, text_position = 2, 3
    w_e = adapter.model.moe.gate.w_gate.weight[expert].detach().numpy()
    example = make_example(6)
    direction = w_e / np.linalg.norm(w_e)
    if driver == "own_position":
        example["text_emb"][text_position] = 5 * direction
    else:
        example["image_emb"][0] = 5 * direction
    result = router_attribution(adapter, example, "toy_moe", expert, text_position, call="mention")
    # The router logit is linear: IG is exact. Own position: w.x_p; image patch 0: 0.5 * w.image0.
    assert result.values["text"][text_position] == pytest.approx(w_e @ example["text_emb"][text_position], abs=1e-4)
    assert result.values["image"][0] == pytest.approx(GATE_MIX * w_e @ example["image_emb"][0], abs=1e-4)
    others_text = [i for i in range(L) if i != text_position]
    np.testing.assert_allclose(result.values["text"][others_text], 0.0, atol=1e-7)
    np.testing.assert_allclose(result.values["image"][1:], 0.0, atol=1e-7)
    top_input = max(result.abs_values, key=lambda n: result.abs_values[n].max())
    top_position = int(np.argmax(result.abs_values[top_input]))
    assert (top_input, top_position) == (("text", text_position) if driver == "own_position" else ("image", 0))
    assert result.target.describe() == "router logit of expert 2 at position 3 (mention) of toy_moe"


def test_to_rows_have_the_table_columns(adapter):
    result = router_attribution(adapter, make_example(7), "toy_moe", 1, 0, call="mention")
    rows = result.to_rows(example_index=7)
    assert len(rows) == L + P
    assert set(rows[0]) == set(TABLE_COLUMNS)
    assert {(r["layer"], r["expert"], r["target"], r["target_position"]) for r in rows} == {
        ("toy_moe", 1, "router_logit", 0)
    }


def test_default_router_target_is_top1_of_first_position(adapter):
    example = make_example(8)
    chosen = default_router_target(adapter, example)
    recorder = adapter.run([example]).recorder
    top1 = int(recorder.calls[0].router.topk_ids[0, 0, 0])
    assert chosen == ExplainedOutput("router_logit", "toy_moe", top1, 0, "mention")


def test_batch_dependent_forward_warns(adapter):
    class BatchNormalised(ToyAdapter):  # output depends on the other rows, like a batch-normalising gate
        def attribution_forward(self, example, target, **kw):
            base = super().attribution_forward(example, target, **kw)
            return lambda text, image: base(text, image) / (1 + text.shape[0])

    with pytest.warns(RuntimeWarning, match="batch dependent"):
        integrated_gradients(BatchNormalised(adapter.model, {}), make_example(9), n_steps=4)


def test_table_stratified_sample_and_image_share_by_deciding_label(adapter):
    u = adapter.model.u
    # Ordered by stratum: the head of the data is all "text".
    examples = [make_example(i, kind, u=u) for i, kind in enumerate(["text"] * 12 + ["image"] * 12 + ["both"] * 6)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        table = attribution_table(
            adapter, examples, sample_size=9, stratify_by="decisive", seed=1, progress=False, n_steps=16
        )
    sampled = sorted(table["example_index"].unique())
    assert len(sampled) == 9 and sampled != list(range(9))
    assert set(table["decisive"]) == {"text", "image", "both"}
    assert set(TABLE_COLUMNS) <= set(table.columns)
    assert set(table["method"]) == {"ig", "occlusion"}
    assert set(table["target"]) == {"score", "router_logit"}
    # Per example: IG rows for both inputs, occlusion rows for the image only, one router target.
    one = table[table["example_index"] == sampled[0]]
    assert len(one) == (L + P) + P + (L + P)
    shares = modality_share_by_label(table, "decisive")
    assert shares.loc["image", "image"] > 0.8 > shares.loc["text", "image"]
    assert shares.loc["text", "text"] > 0.8


def test_modality_share_by_label_on_a_hand_made_table():
    def rows(example, label, shares, method="ig", target="score"):
        return [
            {
                "example_index": example,
                "method": method,
                "target": target,
                "input": name,
                "position": p,
                "share": share,
                "decisive": label,
            }
            for name, share in shares.items()
            for p in range(3)
        ]

    table = pd.DataFrame(
        rows(0, "text", {"mention_text": 0.8, "mention_image": 0.2})
        + rows(1, "text", {"mention_text": 0.6, "mention_image": 0.4})
        + rows(2, "image", {"mention_text": 0.1, "mention_image": 0.9})
        + rows(3, "image", {"mention_text": 1.0})  # no image input: counts as image share 0
        + rows(2, "image", {"mention_text": 0.5, "mention_image": 0.5}, target="router_logit")  # ignored
        + rows(1, "text", {"mention_image": 1.0}, method="occlusion")
    )  # ignored
    shares = modality_share_by_label(table, "decisive")
    expected = pd.DataFrame(
        {"mention_image": [0.45, 0.3], "mention_text": [0.55, 0.7], "n_examples": [2, 2]},
        index=pd.Index(["image", "text"], name="decisive"),
    )
    pd.testing.assert_frame_equal(shares, expected, check_dtype=False, check_like=True)
