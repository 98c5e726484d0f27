"""The precompute CLI on a real tiny demo checkpoint: idempotence, staleness, and torchrun sharding."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis.store import RunStore, run_status

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--max-examples", "40", "--attribution-sample", "0", "--dynamics-sample", "0", "--projection", "pca",
         "--batch-size", "8"]


def _precompute(cmd_prefix, run, ckpt, data, root, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*cmd_prefix, "--run-name", run, "--checkpoint", str(ckpt), "--data", str(data),
                           "--root", str(root), *QUICK, *extra], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _tables(root: Path, run: str, names=("routing", "predictions", "layer_metrics", "examples")) -> dict:
    store = RunStore(run, root=root)
    return {name: store.table(name) for name in names}


def test_torchrun_two_ranks_give_the_same_artifacts(demo_artifacts, tmp_path):
    # The reference gate normalises over the batch: equal artifacts need identical batches on the ranks.
    # Attributions and dynamics are sharded too (blocks of the sample and of the snapshots).
    ckpt, data = demo_artifacts / "checkpoints" / "mmoe-reference-gate", demo_artifacts / "data" / "entity"
    sampled = ["--attribution-sample", "3", "--dynamics-sample", "8"]
    _precompute([sys.executable, "-m", "analysis.precompute"], "one", ckpt, data, tmp_path / "one", *sampled)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    _precompute([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "analysis.precompute"], "one", ckpt, data,
                tmp_path / "two", *sampled)
    names = ("routing", "predictions", "layer_metrics", "examples", "attributions", "dynamics")
    single, sharded = _tables(tmp_path / "one", "one", names), _tables(tmp_path / "two", "one", names)
    assert len(single["routing"]) > 0
    assert single["attributions"]["example_index"].nunique() == 3 and single["dynamics"]["step"].nunique() >= 2
    for name in single:
        pd.testing.assert_frame_equal(single[name], sharded[name], check_exact=False, rtol=1e-6, atol=1e-6)


def test_rerun_does_nothing_and_changed_checkpoint_is_stale(demo_artifacts, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(demo_artifacts / "checkpoints" / "mmoe-balanced", ckpt)
    data = demo_artifacts / "data" / "entity"
    cmd = [sys.executable, "-m", "analysis.precompute"]
    _precompute(cmd, "r", ckpt, data, tmp_path / "root")
    first = (tmp_path / "root" / "runs" / "r").resolve()
    again = _precompute(cmd, "r", ckpt, data, tmp_path / "root")
    assert "up to date" in again.stderr
    assert (tmp_path / "root" / "runs" / "r").resolve() == first  # nothing republished
    assert run_status("r", root=tmp_path / "root").state == "ready"
    # A retrained checkpoint (here: a snapshot's weights in place of the final ones) makes the run stale.
    snapshot = sorted((ckpt / "snapshots").glob("step_*.safetensors"))[0]
    shutil.copy(snapshot, ckpt / "model.safetensors")
    status = run_status("r", root=tmp_path / "root")
    assert status.state == "stale"
    assert "python -m analysis.precompute --run r" in status.message


def test_missing_checkpoint_gives_a_clear_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "analysis.precompute", "--run", "nope", "--root", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "no checkpoint at" in done.stderr and "mmoe_core.demo" in done.stderr


@pytest.mark.parametrize("run", ["mmoe-balanced", "mmoe-collapsing", "mmoe-reference-gate", "moemoe-qa"])
def test_demo_runs_are_published_with_verdicts(demo_artifacts, run):
    store = RunStore(run, root=demo_artifacts)
    metrics = store.layer_metrics()
    assert set(metrics["verdict"]) <= {"healthy", "warning", "collapsed"}
    assert metrics["reason"].str.len().min() > 10
    assert {"routing", "examples", "predictions", "layer_metrics"} <= set(store.tables)
