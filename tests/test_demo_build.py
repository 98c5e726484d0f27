"""The demo build (demo_build.py): registered worlds and demo runs, skipping what is built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import demo_build
from mmoe_core import registry
from mmoe_core.checkpoint import load_config, save_checkpoint
from mmoe_core.errors import ConfigError


@pytest.fixture
def no_precompute(monkeypatch):
    """The precompute behind the build has its own tests; here it only records which runs reached it."""
    reached: list[str] = []
    monkeypatch.setattr(demo_build, "precompute_run", lambda run, data_dir, progress: reached.append(run.name) or 0.0)
    return reached


def test_builds_a_tiny_run_once(tmp_path, monkeypatch, no_precompute):
    monkeypatch.setenv("MOESCOPE_ARTIFACTS", str(tmp_path))
    first = demo_build.build(only="mmoe-balanced", scale="tiny", progress=False)
    run = first["runs"]["mmoe-balanced"]
    assert run["trained"] and (tmp_path / "checkpoints" / "mmoe-balanced" / "model.safetensors").is_file()
    assert (tmp_path / "data" / "entity" / "world.json").is_file() and set(first["worlds"]) == {"entity"}
    config = load_config(run["checkpoint"])
    assert config["training"]["recipe"]["scale"] == "tiny" and config["training"]["description"]
    second = demo_build.build(only="mmoe-balanced", scale="tiny", progress=False)
    assert not second["runs"]["mmoe-balanced"]["trained"]
    assert no_precompute == ["mmoe-balanced", "mmoe-balanced"]  # precomputed when built and when up to date


# ------------------------------------------------------------------- a toy family, through the registry only


def _toy_world(out_dir: Path, scale: str, seed: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "world.json").write_text(json.dumps({"scale": scale, "seed": seed}))


def _toy_world_built(out_dir: Path, scale: str, seed: int) -> bool:
    info = out_dir / "world.json"
    return info.is_file() and json.loads(info.read_text()) == {"scale": scale, "seed": seed}


TRAINED: list[str] = []


def _toy_train(data_dir: Path, ckpt_dir: Path, scale: str, progress: bool) -> None:
    TRAINED.append(scale)
    save_checkpoint(
        torch.nn.Linear(2, 2),
        {"family": "toy-demo", "model": {}, "data": {"root": str(data_dir)}, "training": {}},
        ckpt_dir,
    )


def _toy_runs(steps: int):
    def runs(scale: str) -> list[registry.DemoRun]:
        return [
            registry.DemoRun(
                "toy-run",
                "toy-demo",
                "toy-world",
                {"steps": steps, "scale": scale},
                _toy_train,
                {"split": "test"},
                "a toy run",
            )
        ]

    return runs


@pytest.fixture
def toy_family(monkeypatch, tmp_path):
    from mmoe_core.adapter import ModelAdapter

    monkeypatch.setenv("MOESCOPE_ARTIFACTS", str(tmp_path))
    registry.families()  # the built-ins first, so that the toy entries are undone last
    monkeypatch.setitem(registry._WORLDS, "toy-world", registry.World("toy-world", _toy_world, _toy_world_built))
    monkeypatch.setitem(
        registry._FAMILIES, "toy-demo", registry.Family("toy-demo", "toy", ModelAdapter, demo_runs=_toy_runs(3))
    )
    TRAINED.clear()
    return tmp_path


def test_a_registered_family_is_built_without_demo_build_naming_it(toy_family, monkeypatch, no_precompute):
    out = demo_build.build(only="toy-run", scale="tiny", progress=False, jobs=1)
    assert out["runs"]["toy-run"]["trained"] and TRAINED == ["tiny"]
    assert (toy_family / "data" / "toy-world" / "world.json").is_file()
    stamp = json.loads((toy_family / "checkpoints" / "toy-run" / demo_build.STAMP_NAME).read_text())
    assert stamp["fingerprint"] == {"steps": 3, "scale": "tiny"} and stamp["world_seed"] == demo_build.WORLD_SEED
    assert not demo_build.build(only="toy-run", scale="tiny", progress=False)["runs"]["toy-run"]["trained"]
    assert demo_build.build(only="toy-run", scale="tiny", progress=False, force=True)["runs"]["toy-run"]["trained"]
    # a changed recipe (fingerprint) retrains
    monkeypatch.setitem(
        registry._FAMILIES,
        "toy-demo",
        registry.Family("toy-demo", "toy", registry._FAMILIES["toy-demo"].adapter, demo_runs=_toy_runs(4)),
    )
    assert demo_build.build(only="toy-run", scale="tiny", progress=False)["runs"]["toy-run"]["trained"]
    assert TRAINED == ["tiny"] * 3 and no_precompute == ["toy-run"] * 4


def test_a_failed_training_leaves_no_stamp(toy_family, monkeypatch, no_precompute):
    demo_build.build(only="toy-run", scale="tiny", progress=False)
    stamp = toy_family / "checkpoints" / "toy-run" / demo_build.STAMP_NAME
    assert stamp.is_file()

    def broken(scale):
        def fail(*args):
            raise RuntimeError("training broke")

        return [registry.DemoRun("toy-run", "toy-demo", "toy-world", {"steps": 5}, fail)]

    monkeypatch.setitem(
        registry._FAMILIES,
        "toy-demo",
        registry.Family("toy-demo", "toy", registry._FAMILIES["toy-demo"].adapter, demo_runs=broken),
    )
    with pytest.raises(RuntimeError, match="training broke"):
        demo_build.build(only="toy-run", scale="tiny", progress=False)
    assert not stamp.exists()  # the next build retrains


def test_unknown_run_and_scale_say_what_exists(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESCOPE_ARTIFACTS", str(tmp_path))
    with pytest.raises(ConfigError, match="unknown run 'nope'; demo runs: .*mmoe-balanced"):
        demo_build.build(only="nope", scale="tiny")
    with pytest.raises(ConfigError, match="unknown scale"):
        demo_build.build(scale="huge")


def test_every_demo_run_has_a_registered_world():
    worlds = registry.worlds()
    for scale in ("default", "tiny"):
        runs = registry.demo_runs(scale)
        assert {"mmoe-balanced", "mmoe-collapsing", "mmoe-reference-gate", "moemoe-qa"} <= {r.name for r in runs}
        assert all(r.world in worlds for r in runs)
