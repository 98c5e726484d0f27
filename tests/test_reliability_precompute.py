"""Precompute records the checkpoint and dataset hashes it read (taken before the run, checked again just
before publishing: a change meanwhile refuses the run); SIGKILL midway leaves the previous run readable and
complete; a second precompute of the same run refuses, or with --wait waits its turn. Unit tier (the toy
family of tests/toy_family.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pandas as pd
import pytest
import torch

from analysis import precompute as P
from analysis.hashing import checkpoint_hash, dataset_hash
from analysis.store import RunStore, run_status
from analysis.store.status import InputsChanged
from tests.reliability_helpers import expected_failure, python, toy_world, train_toy, wait_for

RUN = "toy"
OPTS = dict(attribution_sample=0, dynamics_sample=4, projection="pca", checks=False, batch_dependence_sample=2)

# A precompute in a subprocess that pauses (holding its lock, its staging dir half written) after writing
# the routing table and says so in a file: the moment to kill it, or to start a second one.
PAUSED = """
import sys, time, pathlib
from tests import toy_family as toy
toy.register()
from analysis.store import publish
ready, pause = pathlib.Path(sys.argv[1]), float(sys.argv[2])
real = publish.RunWriter.write_table
def slow(self, name, data):
    rows = real(self, name, data)
    if name == "routing":
        ready.write_text("writing")
        time.sleep(pause)
    return rows
publish.RunWriter.write_table = slow
from analysis.precompute import precompute
precompute("toy", checkpoint=sys.argv[3], data=sys.argv[4], root=sys.argv[5], force=True, device="cpu",
           progress=False, **{opts})
""".replace("{opts}", repr(OPTS))


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
def inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("toy")
    world = toy_world(base / "runes")
    ckpt = base / "ckpt"
    train_toy(world, ckpt, steps=4, snapshot_every=2)
    return world, ckpt


def build(world, ckpt, root, **kwargs):
    return P.precompute(
        RUN, checkpoint=str(ckpt), data=str(world), root=root, device="cpu", progress=False, **{**OPTS, **kwargs}
    )


def snapshot_of(root) -> tuple[dict, dict]:
    """(manifest, every table) of the published run, read through a RunStore."""
    with RunStore(RUN, root) as store:
        return store.manifest, {t: store.table(t) for t in store.tables}


def staging(root) -> list[str]:
    folder = root / "runs" / ".staging"
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def paused(world, ckpt, root, tmp_path, pause: float):
    ready = tmp_path / f"ready-{time.monotonic_ns()}"
    proc = python(PAUSED, [ready, pause, ckpt, world, root])
    wait_for(ready.exists, timeout=180, what="the precompute to start writing", proc=proc)
    return proc


def test_the_manifest_records_the_hashes_taken_before_the_run(inputs, tmp_path):
    world, ckpt = inputs
    build(world, ckpt, tmp_path / "root", force=True)
    manifest, _ = snapshot_of(tmp_path / "root")
    assert manifest["checkpoint_hash"] == checkpoint_hash(ckpt) and manifest["dataset_hash"] == dataset_hash(world)


def test_sigkill_midway_leaves_the_previous_run_readable_and_complete(inputs, tmp_path):
    world, ckpt = inputs
    root = tmp_path / "root"
    build(world, ckpt, root, force=True)
    before = snapshot_of(root)
    proc = paused(world, ckpt, root, tmp_path, pause=120)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL and staging(root)  # it died half way
    status = run_status(RUN, root, verify=True)
    assert status.state == "ready", status.message
    after = snapshot_of(root)
    assert after[0] == before[0]
    for name, frame in before[1].items():
        pd.testing.assert_frame_equal(after[1][name], frame)
    build(world, ckpt, root, force=True)  # the next one publishes and cleans up
    assert staging(root) == [] and snapshot_of(root)[0]["created"] != before[0]["created"]


def test_a_second_precompute_of_the_run_refuses_or_waits(inputs, tmp_path, capsys):
    world, ckpt = inputs
    root = tmp_path / "root"
    proc = paused(world, ckpt, root, tmp_path, pause=8)
    try:
        capsys.readouterr()
        rc = P.main(
            [
                "--run",
                RUN,
                "--checkpoint",
                str(ckpt),
                "--data",
                str(world),
                "--root",
                str(root),
                "--device",
                "cpu",
                "--attribution-sample",
                "0",
                "--dynamics-sample",
                "4",
                "--projection",
                "pca",
            ]
        )
        expected_failure((rc, capsys.readouterr().err), "another precompute of run 'toy' is running", "--wait")
        started = time.monotonic()
        assert build(world, ckpt, root, wait=True) is None  # waited, then found it built
        err = capsys.readouterr().err
        assert "waiting for it" in err and "the other precompute built it" in err
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
        assert time.monotonic() - started > 1
    finally:
        if proc.poll() is None:
            proc.kill()
    assert run_status(RUN, root).state == "ready"


@pytest.mark.parametrize("what", ["checkpoint", "dataset"])
def test_inputs_changed_during_the_run_are_refused_and_not_published(what, inputs, tmp_path, monkeypatch):
    world, ckpt = inputs
    world, ckpt = shutil.copytree(world, tmp_path / "world"), shutil.copytree(ckpt, tmp_path / "ckpt")
    root = tmp_path / "root"
    build(world, ckpt, root, force=True)
    before = snapshot_of(root)[0]
    real = P.run_examples

    def changing(*args, **kwargs):  # another process rewrites an input while this one reads it
        out = real(*args, **kwargs)
        if what == "checkpoint":
            config = json.loads((ckpt / "config.json").read_text())
            (ckpt / "config.json").write_text(json.dumps({**config, "note": "retrained meanwhile"}))
        else:
            with open(world / "test.jsonl", "a") as f:
                f.write("\n")
        return out

    monkeypatch.setattr(P, "run_examples", changing)
    with pytest.raises(InputsChanged, match=f"the {what} .* changed while the precompute read it"):
        build(world, ckpt, root, force=True)
    assert snapshot_of(root)[0] == before and staging(root) == []
    assert len(list((root / "runs" / ".versions").iterdir())) == 1
