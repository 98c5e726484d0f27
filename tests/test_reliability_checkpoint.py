"""Checkpoints are replaced atomically: a training writes beside the old checkpoint and swaps only when
complete, so SIGKILL mid-training leaves the previous model loadable; config, weights, snapshots and log
change together; files are fsynced before the swap; an import into an existing checkpoint leaves none of
the old model's snapshots or log. Unit tier (the toy family of tests/toy_family.py)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pandas as pd
import pytest
import torch

from mmoe_core import checkpoint as ckpt_mod
from mmoe_core.adapter import load_adapter
from mmoe_core.checkpoint import list_snapshots, replacing_dir, save_snapshot, write_checkpoint
from mmoe_core.errors import BusyError
from tests.reliability_helpers import TOY_CLI, checkpoint_digests, python, toy_world, train_toy, wait_for


@pytest.fixture(scope="module", autouse=True)
def toy_family():
    from mmoe_core import registry
    from mmoe_core.data import views
    from tests import toy_family as toy

    toy.register()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield toy
    torch.set_num_threads(threads)
    registry._FAMILIES.pop(toy.FAMILY, None)
    registry._WORLDS.pop(toy.WORLD, None)
    views._VIEWS.pop(toy.WORLD, None)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return toy_world(tmp_path_factory.mktemp("runes") / "runes")


def staging_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.staging-"))


def test_sigkill_mid_training_leaves_the_previous_checkpoint_loadable(world, tmp_path, toy_family, capsys):
    out = tmp_path / "ckpt"
    train_toy(world, out, steps=4, snapshot_every=2)
    before = checkpoint_digests(out)
    assert list_snapshots(out) == [2, 4]
    proc = python(
        TOY_CLI.format(module="mmoe_core.train"),
        [
            "--family",
            toy_family.FAMILY,
            "--data",
            world,
            "--out",
            out,
            "--steps",
            "100000",
            "--snapshot-every",
            "3",
            "--batch-size",
            "16",
            "--experts",
            "4",
            "--top-k",
            "2",
            "--threads",
            "1",
            "--no-progress",
        ],
    )
    try:
        wait_for(
            lambda: [d for d in staging_dirs(out) if (d / "snapshots" / "step_3.safetensors").is_file()],
            what="the new training's first snapshot",
            proc=proc,
        )
        # meanwhile a second training of the same checkpoint is refused, not interleaved
        from mmoe_core import train as train_cli

        capsys.readouterr()
        assert (
            train_cli.main(
                [
                    "--family",
                    toy_family.FAMILY,
                    "--data",
                    str(world),
                    "--out",
                    str(out),
                    "--steps",
                    "1",
                    "--no-progress",
                    "--experts",
                    "4",
                    "--top-k",
                    "2",
                ]
            )
            == 2
        )
        assert "is being written by another process" in capsys.readouterr().err
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint_digests(out) == before  # config, weights, snapshots and log untouched
    assert load_adapter(out, device="cpu").family == toy_family.FAMILY
    assert staging_dirs(out)  # the killed writer's work, hidden beside it
    result = train_toy(world, out, steps=3, snapshot_every=3, seed=1)
    assert staging_dirs(out) == []  # the next writer removed it
    assert list_snapshots(out) == [3]  # the old model's snapshots went with it
    config = json.loads((out / "config.json").read_text())
    log = pd.read_parquet(out / "train_log.parquet")
    assert config["training"]["steps_done"] == result.steps == int(log["step"].max()) == 3
    assert checkpoint_digests(out)["model.safetensors"] != before["model.safetensors"]


def test_a_failed_training_leaves_the_previous_checkpoint(world, tmp_path, toy_family, monkeypatch):
    out = tmp_path / "ckpt"
    train_toy(world, out, steps=2, snapshot_every=1)
    before = checkpoint_digests(out)
    real = toy_family.RuneTrainer.loss_parts
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("the machine fell over")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(toy_family.RuneTrainer, "loss_parts", failing)
    with pytest.raises(RuntimeError, match="fell over"):
        train_toy(world, out, steps=5, snapshot_every=1)
    assert checkpoint_digests(out) == before and staging_dirs(out) == []


def test_every_file_is_fsynced_before_the_swap(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_swap = ckpt_mod.fsync_path, ckpt_mod._swap_into_place
    monkeypatch.setattr(ckpt_mod, "fsync_path", lambda p: (events.append(("fsync", str(p))), real_fsync(p)))
    monkeypatch.setattr(ckpt_mod, "_swap_into_place", lambda s, t: (events.append(("swap", str(s))), real_swap(s, t)))
    model = torch.nn.Linear(3, 2)
    with replacing_dir(tmp_path / "ckpt") as staged:
        write_checkpoint(model, {"family": "toy"}, staged, pd.DataFrame({"step": [1]}))
        save_snapshot(model, staged, 1)
        files = [str(p) for p in staged.rglob("*") if p.is_file()]
    swap = events.index(("swap", str(staged)))
    synced_before = {path for kind, path in events[:swap] if kind == "fsync"}
    assert len(files) == 4 and set(files) <= synced_before
    assert {str(staged), str(staged / "snapshots")} <= synced_before
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "model.safetensors",
        "snapshots",
        "train_log.parquet",
    ]


def test_two_writers_of_one_checkpoint_do_not_interleave(tmp_path):
    with replacing_dir(tmp_path / "ckpt"):
        with pytest.raises(BusyError, match="being written by another process"):
            with replacing_dir(tmp_path / "ckpt"):
                pass


def test_an_import_into_an_existing_checkpoint_leaves_nothing_of_the_old_model(world, tmp_path):
    from mmoe_core.families.mmoe.import_mmoe import import_checkpoint
    from tests.test_import_mmoe import HEAD_OPTS, K, published_state

    out = tmp_path / "ckpt"
    train_toy(world, out, steps=2, snapshot_every=1)
    assert list_snapshots(out) == [1, 2] and (out / "train_log.parquet").is_file()
    published = tmp_path / "epoch=1.ckpt"
    torch.save({"state_dict": published_state(0)}, published)
    import_checkpoint(published, out, top_k=K, **HEAD_OPTS)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["family"] == "mmoe"
    assert staging_dirs(out) == []
