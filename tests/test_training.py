"""The generic training loop (a toy family and MMoE on a tiny world) and the CLIs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from mmoe_core import registry
from mmoe_core.adapter import ModelAdapter, load_adapter
from mmoe_core.checkpoint import list_snapshots, load_config
from mmoe_core.moe import SwitchMoE
from mmoe_core.registry import Family
from mmoe_core.training import TrainOptions, get_trainer, lr_factor, parameter_groups, train, trainer_families

SMALL_MMOE = {
    "encoder": "tiny-32",
    "image_dim": 8,
    "text_hidden": 8,
    "image_hidden": 8,
    "cross_hidden": 8,
    "expert_mult": 1,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mmoe_core.data.generate import generate_entity_world

    return generate_entity_world(tmp_path_factory.mktemp("world") / "entity", scale="tiny", progress=False)


# ---------------------------------------------------------------------------------- a toy family


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(4, 8)
        self.moe = SwitchMoE(8, 1, num_experts=4, top_k=1, name="toy")

    def forward(self, x, recorder=None):
        return self.moe(self.backbone(x).unsqueeze(1), recorder=recorder).squeeze(1)


class ToyTrainer:
    """The smallest FamilyTrainer: regression through one MoE layer; experts-only when asked."""

    family = "toy"

    def __init__(self, options: TrainOptions):
        self.options = options
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 4, generator=g)
        self.y = self.x.sum(dim=1, keepdim=True)
        self.epochs_seen = []

    def model_config(self) -> dict:
        return {"width": 8}

    def build_model(self, config: dict) -> nn.Module:
        return ToyModel()

    def train_batches(self, rng: np.random.Generator, epoch: int):
        order = rng.permutation(64)
        for a in range(0, 64, 16):
            rows = torch.as_tensor(order[a : a + 16])
            yield {"x": self.x[rows], "y": self.y[rows]}

    def loss_parts(self, model, batch, recorder):
        return {"mse": nn.functional.mse_loss(model(batch["x"], recorder), batch["y"])}

    def trainable_parameters(self, model, options):
        expert_only = options.family_options.get("expert_only", False)
        return [(n, p) for n, p in model.named_parameters() if not (expert_only and n.startswith("backbone"))]

    def on_epoch_end(self, model, epoch, step):
        self.epochs_seen.append((epoch, step))


registry.register(Family("toy", "a toy family (tests)", ModelAdapter, trainer=ToyTrainer))


def test_generic_loop_with_a_toy_family(tmp_path):
    opts = TrainOptions(
        family="toy",
        epochs=3,
        lr=1e-2,
        balance=0.1,
        z_loss=1e-3,
        two_stage=True,
        trigger_step=5,
        log_every=1,
        snapshot_every=4,
        progress=False,
        family_options={"expert_only": True},
    )
    trainer = get_trainer("toy")(opts)
    torch.manual_seed(0)  # the loop seeds the same way before building its model
    before = ToyModel().backbone.weight.detach().clone()
    result = train(trainer, opts, tmp_path)
    assert "toy" in trainer_families() and "mmoe" in trainer_families()
    assert result.steps == 12 and trainer.epochs_seen == [(0, 4), (1, 8), (2, 12)]
    assert result.trigger_step == 5 and load_config(tmp_path)["training"]["two_stage_trigger_step"] == 5
    log = pd.read_parquet(tmp_path / "train_log.parquet")
    assert {
        "loss.mse",
        "loss.balance",
        "loss.z_loss",
        "loss.entropy_stage",
        "route.toy.effective_experts",
        "route.toy.max_load",
        "route.toy.balance_loss",
        "route.toy.token_entropy",
    } <= set(log.columns)
    assert list(log["two_stage_phase"][:5]) == ["coverage"] * 5 and log["two_stage_phase"].iloc[-1] == "specialisation"
    assert list_snapshots(tmp_path) == [4, 8, 12]
    from safetensors.torch import load_file

    final = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(final["backbone.weight"], before)  # expert-only: the backbone never moved


def test_lr_schedule_and_router_groups():
    assert lr_factor(0, 100, "constant", 0) == 1.0
    assert lr_factor(4, 100, "linear", 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, "cosine", 0) == pytest.approx(0.0)
    assert lr_factor(55, 100, "linear", 10) == pytest.approx(0.5)
    model = ToyModel()
    groups = parameter_groups(model.named_parameters(), lr=1e-3, weight_decay=0.1, router_lr_mult=10)
    router = [g for g in groups if any(p is model.moe.gate.w_gate.weight for p in g["params"])][0]
    assert router["lr"] == pytest.approx(1e-2) and router["weight_decay"] == 0.1
    bias = [g for g in groups if any(p is model.backbone.bias for p in g["params"])][0]
    assert bias["weight_decay"] == 0.0 and bias["lr"] == pytest.approx(1e-3)


# ---------------------------------------------------------------------------------- MMoE on a tiny world


def test_mmoe_training_smoke(world, tmp_path):
    opts = TrainOptions(
        family="mmoe",
        data_dir=str(world),
        steps=16,
        batch_size=12,
        lr=3e-3,
        balance=0.01,
        log_every=1,
        snapshot_every=8,
        progress=False,
        family_options=SMALL_MMOE,
    )
    result = train(get_trainer("mmoe")(opts), opts, tmp_path)
    log = result.log
    assert log["loss"].iloc[-4:].mean() < log["loss"].iloc[:4].mean()
    assert list_snapshots(tmp_path) == [8, 16]
    assert {
        "loss.overall",
        "loss.text",
        "loss.image",
        "loss.cross",
        "loss.balance",
        "route.text_intra.effective_experts",
        "route.cross_inter.max_load",
    } <= set(log.columns)
    config = load_config(tmp_path)
    assert config["family"] == "mmoe" and config["model"]["gate"] == "topk_softmax"
    assert config["model"]["encoder"]["name"] == "tiny-32" and config["training"]["seed"] == 0
    assert set(config) == {"family", "model", "data", "training", "code_version"}  # one style for every family
    assert config["training"]["steps_done"] == 16 and config["data"]["root"] == str(world.resolve())
    assert load_adapter(tmp_path, device="cpu").family == "mmoe"


def test_cli_train_then_evaluate_json(world, tmp_path, capsys):
    from mmoe_core import evaluate
    from mmoe_core import train as train_cli

    ckpt = tmp_path / "ckpt"
    opts = [f"--opt={k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in SMALL_MMOE.items()]
    assert (
        train_cli.main(
            [
                "--family",
                "mmoe",
                "--data",
                str(world),
                "--out",
                str(ckpt),
                "--steps",
                "2",
                "--batch-size",
                "8",
                "--gate",
                "mmoe_reference",
                "--top-k",
                "2",
                "--dme",
                "--no-progress",
                *opts,
            ]
        )
        == 0
    )
    model_config = load_config(ckpt)["model"]
    assert (model_config["gate"], model_config["top_k"], model_config["mention_desc"]) == ("mmoe_reference", 2, "dme")
    capsys.readouterr()
    assert (
        evaluate.main(
            [
                str(ckpt),
                "--data",
                str(world),
                "--split",
                "test",
                "--json",
                "--limit",
                "10",
                "--modalities",
                "text,image",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    result = json.loads(out)  # exactly one JSON object on stdout
    assert out.strip().count("\n") == 0
    assert result["examples"] == 10 and result["modalities"] == ["text", "image"]
    assert {"MRR", "MR", "Hits@1", "Hits@20"} <= set(result["overall"])


def test_parse_opt():
    from mmoe_core.train import parse_opt

    assert parse_opt(["a=1", "b=tiny-32", 'c={"x": 2}', "d=true"]) == {"a": 1, "b": "tiny-32", "c": {"x": 2}, "d": True}
