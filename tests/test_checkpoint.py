"""Checkpoints: bit-exact save/load round trip, snapshots, strict loading."""

from __future__ import annotations

import json

import pytest
import torch

from mmoe_core.adapter import load_adapter
from mmoe_core.checkpoint import (
    CheckpointError,
    list_snapshots,
    load_config,
    load_into,
    load_state,
    save_checkpoint,
    save_snapshot,
)
from mmoe_core.encoders import EncoderSpec
from mmoe_core.families.mmoe.model import build_model

CONFIG = {
    "family": "mmoe",
    "model": dict(
        encoder=EncoderSpec(name="tiny-32").to_dict(),
        image_dim=8,
        text_hidden=8,
        image_hidden=8,
        cross_hidden=8,
        expert_mult=1,
    ),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mmoe_core.data.generate import generate_entity_world

    return generate_entity_world(tmp_path_factory.mktemp("world") / "entity", scale="tiny", progress=False)


def trained_looking_model():
    """A model whose weights are not the init ones (so that a round trip cannot pass by re-initialising)."""
    torch.manual_seed(1)
    model = build_model(CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model.eval()


def test_round_trip_is_bit_exact_and_predicts_the_same(tmp_path, world):
    model = trained_looking_model()
    save_checkpoint(model, {**CONFIG, "data": {"root": str(world)}}, tmp_path)
    adapter = load_adapter(tmp_path, device="cpu")
    original, loaded = model.state_dict(), adapter.model.state_dict()
    assert set(original) == set(loaded)
    for key in original:
        assert torch.equal(original[key], loaded[key]), key
    assert load_config(tmp_path)["family"] == "mmoe" and "code_version" in load_config(tmp_path)

    fresh = load_adapter(tmp_path, device="cpu")
    fresh.model.load_state_dict(model.state_dict())
    examples = adapter.load_examples(world, "test")[:8]
    a = adapter.run(examples, record=False).predictions
    b = fresh.run(examples, record=False).predictions
    assert [(p["rank"], p["top_ids"], p["top_scores"]) for p in a] == [
        (p["rank"], p["top_ids"], p["top_scores"]) for p in b
    ]


def test_snapshots_are_listed_and_loadable(tmp_path):
    model = trained_looking_model()
    save_checkpoint(model, CONFIG, tmp_path)
    save_snapshot(model, tmp_path, 20)
    save_snapshot(model, tmp_path, 5)
    assert list_snapshots(tmp_path) == [5, 20]
    state = load_state(tmp_path, snapshot=5)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_loading_into_a_different_architecture_names_the_problem(tmp_path):
    save_checkpoint(trained_looking_model(), CONFIG, tmp_path)
    other = build_model({"family": "mmoe", "model": {**CONFIG["model"], "text_hidden": 16}})
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_into(other, load_state(tmp_path), source=str(tmp_path))


def test_config_is_plain_json(tmp_path):
    save_checkpoint(trained_looking_model(), CONFIG, tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model"]["gate"] == "topk_softmax" if "gate" in data["model"] else True
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in tmp_path.iterdir())
