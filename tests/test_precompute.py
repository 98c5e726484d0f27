"""The precompute: its steps on a small fake adapter (unit tier: spec in the manifest, tables keyed by
example_index, outputs by kind, batch dependence keyed on the gate's declaration), and the CLI on a real
tiny demo checkpoint (idempotence, staleness, torchrun sharding)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis import precompute as P
from analysis import precompute_steps as S
from analysis.run_tables import named_scores_frame, predictions_frame, source_weights_frame
from analysis.sharding import Dist
from analysis.store import RunStore, run_status
from mmoe_core.adapter import ModelAdapter, RunOutput
from mmoe_core.routing_record import PositionMeta, RouterOutput, RoutingRecorder
from mmoe_core.spec import GateSpec, LabelSpec, ModelSpec, OutputSpec, PredictionSpec, RoutedLayerSpec, SourceSpec

REPO = Path(__file__).resolve().parents[1]
QUICK = [
    "--max-examples",
    "40",
    "--attribution-sample",
    "0",
    "--dynamics-sample",
    "0",
    "--projection",
    "pca",
    "--batch-size",
    "8",
]


def _precompute(cmd_prefix, run, ckpt, data, root, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            *cmd_prefix,
            "--run-name",
            run,
            "--checkpoint",
            str(ckpt),
            "--data",
            str(data),
            "--root",
            str(root),
            *QUICK,
            *extra,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
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
    _precompute(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "analysis.precompute"],
        "one",
        ckpt,
        data,
        tmp_path / "two",
        *sampled,
    )
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
    done = subprocess.run(
        [sys.executable, "-m", "analysis.precompute", "--run", "nope", "--root", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "no checkpoint at" in done.stderr and P.demo_command() in done.stderr


@pytest.mark.parametrize("run", ["mmoe-balanced", "mmoe-collapsing", "mmoe-reference-gate", "moemoe-qa"])
def test_demo_runs_are_published_with_verdicts(demo_artifacts, run):
    store = RunStore(run, root=demo_artifacts)
    metrics = store.layer_metrics()
    assert set(metrics["verdict"]) <= {"healthy", "warning", "collapsed"}
    assert metrics["reason"].str.len().min() > 10
    assert {"routing", "examples", "predictions", "layer_metrics"} <= set(store.tables)


# ----------------------------------------------------------------------------------- unit tier

E, L = 4, 3
WEIGHTS = OutputSpec(
    "mix",
    "source_weights",
    "per-position weights over two sources",
    sources=(SourceSpec("left", "a", "a (left)"), SourceSpec("right", "b", "b (right)")),
    truth_label="side",
    positions="words",
)
SCORES = OutputSpec("parts", "named_scores", "two named scores of the top item")


class FakeAdapter:
    """Duck-typed adapter: one routed layer whose combine weights shrink with the batch size when its gate
    says it is batch dependent (the gate's *kind* is a made-up name: only the declaration counts)."""

    family = "fake"
    route = ModelAdapter.route  # the contract's default: run()'s recorder

    def __init__(self, batch_dependent: bool):
        self.gate = GateSpec("whatever_gate", "sigmoid", "topk_raw", batch_dependent=batch_dependent)

    def spec(self) -> ModelSpec:
        return ModelSpec(
            "fake",
            "Fake",
            routed_layers=(RoutedLayerSpec("l0", E, 2, self.gate, calls=("c",)),),
            prediction=PredictionSpec("ranking", "rank", headline=("hits@1",)),
            outputs=(WEIGHTS, SCORES),
            labels=(
                LabelSpec("kind", "a label"),
                LabelSpec(
                    "side", "which side decides", ground_truth=True, decides={"left": ("left",), "right": ("right",)}
                ),
            ),
        )

    def run(self, examples, record=True, batch_size=32, progress=False):
        recorder = RoutingRecorder()
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            idx = torch.tensor([ex["index"] for ex in batch], dtype=torch.float32)
            logits = torch.sin(idx[:, None, None] + torch.arange(L)[None, :, None] * 0.7 + torch.arange(E) * 1.3)
            probs = torch.sigmoid(logits)
            top = probs.topk(2, dim=-1).indices
            scale = 1.0 / len(batch) if self.gate.batch_dependent else 1.0
            combine = torch.zeros_like(probs).scatter(-1, top, probs.gather(-1, top) * scale)
            meta = PositionMeta.uniform("c", [ex["index"] for ex in batch], L, "text_token", "text", "text")
            recorder.add("l0", RouterOutput(logits, probs, top, combine), meta)
        preds = [
            {
                "index": ex["index"],
                "id": ex["id"],
                "prediction": "x",
                "prediction_id": 1,
                "gold": "x",
                "gold_id": 1,
                "correct": True,
                "score": 1.0,
                "rank": 1,
                "top_ids": [1, 2],
                "top_names": ["x", "y"],
                "top_scores": [1.0, 0.5],
                "parts": {"text": 0.25 * ex["index"], "image": 1.0},
            }
            for ex in examples
        ]
        mix = [{"index": ex["index"], "words": ["w0", "w1"], "a": [0.75, 0.5], "b": [0.25, 0.5]} for ex in examples]
        return RunOutput(preds, recorder, {"mix": mix}, torch.randn(len(examples), 6))

    def summarize(self, predictions, examples):
        return {"overall": {"hits@1": 1.0, "n": len(predictions)}}


def examples(n=24):
    return [
        {
            "index": i,
            "id": f"e{i}",
            "text": f"example {i}",
            "labels": {"kind": "ab"[i % 2], "side": ["left", "right", "both"][i % 3]},
        }
        for i in range(n)
    ]


def fake_checkpoint(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"family": "fake"}')
    (path / "model.safetensors").write_bytes(b"weights")
    return path


def build(tmp_path, adapter, batch_size=8) -> RunStore:
    exs = examples()
    params = {
        **P.DEFAULT_PARAMS,
        "attribution_sample": 0,
        "projection": "pca",
        "batch_size": batch_size,
        "batch_dependence_sample": 6,
    }
    part = S.run_examples(adapter, adapter.spec(), exs, batch_size, Dist(), progress=False)
    ckpt, data = fake_checkpoint(tmp_path / "ckpt"), tmp_path / "data"
    data.mkdir()
    P.write_run("fake", tmp_path / "root", adapter, ckpt, data, exs, S.merge_parts([part]), params)
    return RunStore("fake", tmp_path / "root")


def test_precompute_stores_the_spec_and_keys_every_table_by_example_index(tmp_path):
    adapter = FakeAdapter(batch_dependent=False)
    store = build(tmp_path, adapter)
    assert store.status.state == "ready", store.status.message
    assert store.spec() == adapter.spec()
    assert store.manifest["attribution_label"] == "side"  # the decisive label, not the first one
    for name in ("examples", "predictions", "routing", "mix", "parts", "projection"):
        assert "example_index" in store.columns(name), name
        assert "index" not in store.columns(name), name
    routing = store.table("routing")
    assert {"probs", "grid_row", "grid_col"} <= set(routing.columns) and (routing["grid_row"] == -1).all()
    assert len(routing) == 24 * L
    preds = store.predictions()
    assert list(preds["top_names"].iloc[0]) == ["x", "y"]  # list columns stay lists
    mix = store.table("mix")
    assert list(mix.columns) == ["example_index", "position", "token", "left", "right"]
    assert len(mix) == 48 and mix["left"].iloc[0] == pytest.approx(0.75)
    parts = store.table("parts")
    assert list(parts.columns) == ["example_index", "name", "score"] and len(parts) == 48
    assert "batch_dependence" not in store.layer_metrics()  # the gate does not declare it
    stages = store.read_json("timings")["stage_seconds"]  # where precompute's time went, per stage
    assert {"projection", "checks: knockout"} <= set(stages) and all(s >= 0 for s in stages.values())


def test_batch_dependence_is_measured_when_a_gate_declares_it(tmp_path):
    assert not S.measures_batch_dependence(
        ModelSpec(
            "x", "x", routed_layers=(RoutedLayerSpec("a", E, 2, GateSpec("mmoe_reference", batch_dependent=False)),)
        )
    )
    assert S.measures_batch_dependence(
        ModelSpec(
            "x",
            "x",
            routed_layers=(
                RoutedLayerSpec("a", E, 2),
                RoutedLayerSpec("b", E, 2, GateSpec("custom", batch_dependent=True)),
            ),
        )
    )
    store = build(tmp_path, FakeAdapter(batch_dependent=True), batch_size=6)
    row = store.layer_metrics().iloc[0]
    assert row["batch_dependence"] > 0.01  # alone: weight x1; in a batch of 6: x1/6
    measured = S.batch_dependence_by_layer(FakeAdapter(batch_dependent=False), examples(6), 6)
    assert list(measured) == ["l0"] and measured["l0"] == pytest.approx(0.0, abs=1e-6)


def test_sampling_labels_come_from_the_spec():
    spec = FakeAdapter(False).spec()
    assert S.slice_label(spec) == "kind" and S.attribution_label(spec) == "side"
    plain = ModelSpec("x", "x", labels=(LabelSpec("only", "no ground truth"),))
    assert S.attribution_label(plain) == "only" and S.attribution_label(ModelSpec("x", "x")) is None


def test_output_tables_by_kind_read_both_layouts():
    per_example = [{"index": 3, "words": ["a", "b"], "a": [0.9, 0.4], "b": [0.1, 0.6]}]
    long = source_weights_frame(WEIGHTS, per_example)
    assert long.to_dict("list") == {
        "example_index": [3, 3],
        "position": [0, 1],
        "token": ["a", "b"],
        "left": pytest.approx([0.9, 0.4]),
        "right": pytest.approx([0.1, 0.6]),
    }
    again = source_weights_frame(WEIGHTS, long)  # already long: kept
    pd.testing.assert_frame_equal(again, long)
    rows = named_scores_frame(SCORES, [{"index": 1, "name": "text", "score": 2.0}])
    from_dicts = named_scores_frame(SCORES, [{"index": 1, "parts": {"text": 2.0}}])
    pd.testing.assert_frame_equal(rows, from_dicts)
    preds = predictions_frame(
        [{"index": 2, "nested": {"a": 1}, "top_ids": [4, 5]}, {"index": 1, "nested": {"a": 2}, "top_ids": [6, 7]}]
    )
    assert list(preds["example_index"]) == [1, 2] and preds["nested"].iloc[0] == '{"a": 2}'
