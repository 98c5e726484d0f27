"""Tests for the artifact store (analysis/store/) and hashing (analysis/hashing.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis.hashing import checkpoint_hash, dataset_hash, dir_hash, file_sha256
from analysis.store import (
    RunStore,
    RunWriter,
    code_version,
    inputs_manifest,
    list_runs,
    needs_rebuild,
    rebuild_reasons,
    run_status,
)
from analysis.store import aggregates as store_aggregates
from analysis.store import publish as store_publish
from analysis.store import status as store_status
from mmoe_core.spec import (
    AttributionTarget,
    ExampleField,
    GateSpec,
    ImageGrid,
    InputSpec,
    LabelSpec,
    ModelSpec,
    OutputSpec,
    PredictionSpec,
    RoutedLayerSpec,
    SourceSpec,
    TrainingPhase,
)

REPO = Path(__file__).resolve().parents[1]
# A declaration with one of each piece, so the manifest round trip covers every nested type.
SPEC = ModelSpec(
    family="toy",
    title="Toy: two inputs",
    fields=(ExampleField("text", "Text", editable=True, role="title"), ExampleField("image_path", "Image", "image")),
    inputs=(
        InputSpec("tokens", "text_tokens", "token embeddings", field="text"),
        InputSpec("patches", "image_patches", "patch embeddings", grid=ImageGrid(2, 3, first_position=1)),
    ),
    routed_layers=(
        RoutedLayerSpec(
            "l0",
            4,
            2,
            GateSpec(
                "hf:Router", "sigmoid", "topk_scaled", shared_experts=1, capacity=1.25, score_correction_bias=True
            ),
            calls=("mention",),
        ),
    ),
    prediction=PredictionSpec("ranking", "rank items", headline=("hits@1", "mrr"), item="entity"),
    outputs=(
        OutputSpec("mix", "source_weights", "weights", sources=(SourceSpec("image", "a", "alpha"),), truth_label="src"),
    ),
    labels=(LabelSpec("src", "source", ground_truth=True, decides={"image": ("patches",)}),),
    attribution_targets=(AttributionTarget("score", "the score"),),
    training_phases=(TrainingPhase("warmup_steps", 10, "warm-up over"),),
    model_card={"encoder": "tiny"},
    notes=("a note",),
)
BASE = {"spec": SPEC.to_dict()}


# ----------------------------------------------------------------------------------- fixtures


def make_routing(n_examples=3, layers=("l0", "l1"), positions=4, experts=4, k=2, seed=0) -> pd.DataFrame:
    """A small routing table in the precompute's schema, rows shuffled."""
    rng = np.random.default_rng(seed)
    rows = []
    for ex in range(n_examples):
        for layer in layers:
            for pos in range(positions):
                logits = rng.standard_normal(experts).astype(np.float32)
                p = np.exp(logits - logits.max())
                p /= p.sum()
                top = np.argsort(-p)[:k]
                comb = np.zeros(experts, np.float32)
                comb[top] = p[top] / p[top].sum()
                rows.append(
                    dict(
                        layer=layer,
                        call="mention",
                        example_index=ex,
                        example_id=f"ex{ex}",
                        position=pos,
                        position_kind="cls" if pos == 0 else "text_token",
                        token=f"t{pos}",
                        routed_modality="text" if pos % 2 == 0 else "image",
                        gate_modality="text",
                        top1=int(top[0]),
                        topk_ids=top.astype(np.int16),
                        topk_weights=comb[top],
                        combine=comb,
                        logits=logits,
                        entropy=float(-(p * np.log(p)).sum()),
                        top1_prob=float(p.max()),
                        routed=True,
                    )
                )
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def hand_routing() -> pd.DataFrame:
    """4 positions of layer "a" and 2 of layer "b"; E=3, top-2. Expert 2 of layer "a" is dead."""
    spec = [  # layer, example, position, topk_ids, combine
        ("a", 0, 0, [0, 1], [0.75, 0.25, 0.0]),
        ("a", 0, 1, [0, 1], [0.5, 0.5, 0.0]),
        ("a", 1, 0, [1, 0], [0.4, 0.6, 0.0]),
        ("a", 1, 1, [0, 1], [1.0, 0.0, 0.0]),  # mmoe_reference-like: second choice got no weight
        ("b", 0, 0, [2, 1], [0.0, 0.3, 0.7]),
        ("b", 1, 0, [2, 0], [0.1, 0.0, 0.9]),
    ]
    rows = []
    for layer, ex, pos, ids, comb in spec:
        rows.append(
            dict(
                layer=layer,
                call="c",
                example_index=ex,
                example_id=f"e{ex}",
                position=pos,
                position_kind="text_token",
                token="",
                routed_modality="text" if pos == 0 else "image",
                gate_modality="text",
                top1=ids[0],
                topk_ids=np.array(ids, np.int16),
                topk_weights=np.array([comb[i] for i in ids], np.float32),
                combine=np.array(comb, np.float32),
                logits=np.zeros(3, np.float32),
                entropy=float(pos + ex),
                top1_prob=0.5,
                routed=True,
            )
        )
    return pd.DataFrame(rows)


def examples_df(n=3) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "example_index": np.arange(n, dtype=np.int64),
            "example_id": [f"ex{i}" for i in range(n)],
            "label": ["a", "b", "a", "c", "b"][:n] if n <= 5 else ["a"] * n,
            "decided_by": ["text", "image", "both", "text", "image"][:n] if n <= 5 else ["text"] * n,
        }
    )


def publish(root: Path, run="demo", routing=None, examples=None, manifest_base=None, **kw) -> Path:
    """Publish a small run; its manifest carries :data:`SPEC` unless ``manifest_base`` sets a spec."""
    with RunWriter(run, root=root, manifest_base={**BASE, **(manifest_base or {})}, **kw) as w:
        w.write_table("routing", make_routing() if routing is None else routing)
        w.write_table("examples", examples_df() if examples is None else examples)
        w.write_table("layer_metrics", pd.DataFrame({"layer": ["l0", "l1"], "load_cv": [0.1, 0.2]}))
        w.write_json("projection_model", {"kind": "pca", "components": [[1.0, 0.0]]})
        w.write_bytes("projection_model.npz", b"\x00\x01binary")
    return w.published


def make_checkpoint(d: Path, scale: float = 1.0) -> Path:
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"family": "mmoe", "experts": 4}))
    save_file({"w": (np.arange(12, dtype=np.float32).reshape(3, 4) * scale)}, str(d / "model.safetensors"))
    return d


def make_dataset(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.json").write_text(json.dumps([{"id": 1, "text": "hello"}]))
    (d / "images").mkdir(exist_ok=True)
    (d / "images" / "1.png").write_bytes(b"\x89PNG fake")
    return d


def staging_entries(root: Path) -> list[str]:
    d = root / "runs" / ".staging"
    return sorted(os.listdir(d)) if d.exists() else []


def versions(root: Path) -> list[str]:
    d = root / "runs" / ".versions"
    return sorted(os.listdir(d)) if d.exists() else []


# ----------------------------------------------------------------------------------- write/read


def test_write_then_read_back(tmp_path):
    routing = make_routing()
    publish(tmp_path, manifest_base={"family": "toy", "split": "test"})
    assert list_runs(tmp_path) == ["demo"]
    s = RunStore("demo", tmp_path)
    m = s.manifest
    assert m["run"] == "demo" and m["status"] == "complete" and m["family"] == "toy" and m["split"] == "test"
    assert m["code_version"] == code_version() and m["code_version"]
    assert pd.Timestamp(m["created"]).tzinfo is not None
    assert m["files"]["routing.parquet"]["rows"] == len(routing)
    assert m["files"]["examples.parquet"]["rows"] == 3
    assert m["files"]["projection_model.npz"]["rows"] is None
    for name, info in m["files"].items():
        assert (s.dir / name).stat().st_size == info["bytes"]
        assert file_sha256(s.dir / name) == info["sha256"]
    assert {"routing", "examples", "layer_metrics", "routing_loads", "routing_entropy_sample"} <= set(s.tables)
    back = s.table("routing")
    assert len(back) == len(routing)
    # stored sorted by example, layer, position and with the declared types
    assert list(back.example_index) == sorted(back.example_index)
    schema = pq.read_schema(s.dir / "routing.parquet")
    assert schema.field("topk_ids").type.value_type == pa.int16()
    assert schema.field("position").type == pa.int32()
    assert s.table("examples").equals(examples_df())
    assert s.read_json("projection_model") == {"kind": "pca", "components": [[1.0, 0.0]]}
    assert s.path("projection_model.npz").read_bytes() == b"\x00\x01binary"
    assert s.status.state == "ready" and s.status.ready
    assert list(s.layer_metrics().layer) == ["l0", "l1"]
    s.close()


def test_streamed_routing_is_sorted_and_aggregated(tmp_path):
    routing = make_routing(n_examples=5).sort_values(["example_index"]).reset_index(drop=True)
    with RunWriter("s", root=tmp_path, row_group_size=8) as w:
        for _, part in routing.groupby("example_index"):
            w.append_table("routing", part.sample(frac=1.0, random_state=1))
    s = RunStore("s", tmp_path)
    assert s.manifest["files"]["routing.parquet"]["rows"] == len(routing)
    assert pq.ParquetFile(s.dir / "routing.parquet").metadata.num_row_groups > 1
    back = s.table("routing", columns=["example_index", "layer", "position"])
    key = list(zip(back.example_index, back.layer, back.position))
    assert key == sorted(key)
    assert s.has("routing_loads")


def test_kb_routing_sorted_and_examples_in_example_order(tmp_path):
    with RunWriter("kb", root=tmp_path) as w:
        w.write_table("kb_routing", make_routing(n_examples=4))
        w.write_table("examples", pd.DataFrame({"example_index": [2, 0, 1], "label": ["x", "y", "z"]}))
    s = RunStore("kb", tmp_path)
    back = s.table("kb_routing")
    assert list(back.example_index) == sorted(back.example_index)
    assert not s.has("routing_loads")  # aggregates are for the examples' routing only
    assert list(s.examples().label) == ["y", "z", "x"]


def test_reserved_and_invalid_names(tmp_path):
    with pytest.raises(ValueError):
        RunWriter("../evil", root=tmp_path)
    with pytest.raises(ValueError):
        RunWriter(".hidden", root=tmp_path)
    with pytest.raises(ValueError):
        RunWriter("x", root=tmp_path, manifest_base={"status": "complete"})
    with pytest.raises(ValueError):
        with RunWriter("x", root=tmp_path) as w:
            w.write_table("bad name", examples_df())
    with pytest.raises(ValueError):
        with RunWriter("x", root=tmp_path) as w:
            w.write_bytes("../escape", b"")
    with pytest.raises(ValueError):
        with RunWriter("x", root=tmp_path) as w:
            w.write_json("manifest", {})
    assert list_runs(tmp_path) == []
    assert staging_entries(tmp_path) == []


# ----------------------------------------------------------------------------------- atomicity


def test_exception_inside_with_keeps_previous_version(tmp_path):
    publish(tmp_path)
    before = RunStore("demo", tmp_path)
    old_tables = {t: before.table(t) for t in before.tables}
    old_manifest = before.manifest
    with pytest.raises(RuntimeError, match="boom"):
        with RunWriter("demo", root=tmp_path) as w:
            w.write_table("examples", examples_df(5))
            raise RuntimeError("boom")
    after = RunStore("demo", tmp_path)
    assert after.dir == before.dir and after.manifest == old_manifest
    for t, df in old_tables.items():
        pd.testing.assert_frame_equal(after.table(t), df)
    assert after.status.state == "ready"
    assert staging_entries(tmp_path) == []
    assert list_runs(tmp_path) == ["demo"]
    assert before.is_current()


def test_failed_publish_leaves_old_run_and_next_writer_cleans(tmp_path, monkeypatch):
    publish(tmp_path)
    old = RunStore("demo", tmp_path)
    real_replace = os.replace

    def failing_replace(src, dst, *a, **kw):
        raise OSError("simulated crash before the symlink swap")

    monkeypatch.setattr(store_publish.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        publish(tmp_path, examples=examples_df(5))
    monkeypatch.setattr(store_publish.os, "replace", real_replace)
    now = RunStore("demo", tmp_path)
    assert now.dir == old.dir and len(now.examples()) == 3
    assert len(versions(tmp_path)) == 2  # the orphaned, never-published version
    old.close(), now.close()  # an open store holds its version: closed, it can go
    publish(tmp_path, examples=examples_df(4))
    assert len(versions(tmp_path)) == 1
    assert len(RunStore("demo", tmp_path).examples()) == 4
    assert [e for e in os.listdir(tmp_path / "runs") if ".link-" in e] == []


KILLED_WRITER = r"""
import os, signal, sys
sys.path.insert(0, {repo!r})
import pandas as pd
from analysis.store import RunWriter
w = RunWriter("demo", root={root!r}).open()
w.write_table("examples", pd.DataFrame({{"example_index": [0, 1, 2, 3, 4, 5, 6]}}))
print(w.staging_dir, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_killed_writer_leaves_old_run_and_is_cleaned_up(tmp_path):
    publish(tmp_path)
    old = RunStore("demo", tmp_path)
    old_examples = old.examples()
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER.format(repo=str(REPO), root=str(tmp_path))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    leftover = Path(proc.stdout.strip())
    assert leftover.is_dir() and (leftover / "examples.parquet").exists()
    # readers see the old run, intact; no junk in the run list
    assert list_runs(tmp_path) == ["demo"]
    s = RunStore("demo", tmp_path)
    assert s.dir == old.dir
    pd.testing.assert_frame_equal(s.examples(), old_examples)
    assert run_status("demo", tmp_path).state == "ready"
    # the next writer removes the dead writer's staging dir and lock
    publish(tmp_path, run="other")
    assert not leftover.exists()
    assert staging_entries(tmp_path) == []
    assert list_runs(tmp_path) == ["demo", "other"]


def test_live_writer_staging_survives_another_writer(tmp_path):
    a = RunWriter("demo", root=tmp_path).open()
    a.write_table("examples", examples_df())
    publish(tmp_path, run="other")  # its cleaner must not touch a's work
    assert a.staging_dir.is_dir()
    a.commit()
    assert RunStore("demo", tmp_path).examples().equals(examples_df())
    assert staging_entries(tmp_path) == []


def test_republish_swaps_version_and_old_store_notices(tmp_path):
    publish(tmp_path)
    s1 = RunStore("demo", tmp_path)
    assert (tmp_path / "runs" / "demo").is_symlink()
    publish(tmp_path, examples=examples_df(5))
    assert not s1.is_current()
    s2 = RunStore("demo", tmp_path)
    assert s2.is_current() and len(s2.examples()) == 5
    assert len(versions(tmp_path)) == 2 and len(s1.examples()) == 3  # s1 holds the old version: still readable
    s1.close()
    assert store_publish.collect_versions("demo", tmp_path / "runs" / ".versions", keep=s2.dir.name) == []
    assert len(versions(tmp_path)) == 1


def test_legacy_real_directory_is_migrated(tmp_path):
    legacy = tmp_path / "runs" / "demo"
    legacy.mkdir(parents=True)
    (legacy / "manifest.json").write_text(json.dumps({"run": "demo", "status": "complete", "files": {}}))
    assert list_runs(tmp_path) == ["demo"]
    assert RunStore("demo", tmp_path).is_current()
    publish(tmp_path)
    assert legacy.is_symlink()
    assert RunStore("demo", tmp_path).manifest["files"]
    assert len(versions(tmp_path)) == 1


def test_list_runs_ignores_hidden_and_incomplete(tmp_path):
    assert list_runs(tmp_path) == []
    publish(tmp_path, run="b")
    publish(tmp_path, run="a")
    (tmp_path / "runs" / "no_manifest").mkdir()
    (tmp_path / "runs" / ".hidden").mkdir()
    os.symlink("nowhere", tmp_path / "runs" / "dangling")
    assert list_runs(tmp_path) == ["a", "b"]
    with pytest.raises(FileNotFoundError):
        RunStore("missing", tmp_path)


# ----------------------------------------------------------------------------------- status


def test_stale_when_checkpoint_or_dataset_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(store_status, "DATASET_HASH_TTL_S", 0.0)
    ckpt = make_checkpoint(tmp_path / "ckpt")
    data = make_dataset(tmp_path / "data")
    publish(tmp_path, manifest_base=inputs_manifest(ckpt, data, {"split": "test"}, spec=SPEC, family="toy"))
    st = run_status("demo", tmp_path)
    assert st.state == "ready", st.message
    assert st.manifest["checkpoint_hash"] == checkpoint_hash(ckpt)
    make_checkpoint(ckpt, scale=2.0)  # same shapes, new weights
    st = run_status("demo", tmp_path)
    assert st.state == "stale"
    assert "checkpoint" in st.message and "python -m analysis.precompute --run demo" in st.message
    make_checkpoint(ckpt, scale=1.0)
    assert run_status("demo", tmp_path).state == "ready"
    # an explicitly passed checkpoint is compared instead of the recorded one
    other = make_checkpoint(tmp_path / "other", scale=3.0)
    assert run_status("demo", tmp_path, checkpoint_dir=other).state == "stale"
    (data / "train.json").write_text(json.dumps([{"id": 1, "text": "changed"}]))
    st = run_status("demo", tmp_path)
    assert st.state == "stale" and "dataset" in st.message
    assert RunStore("demo", tmp_path).status.state == "stale"
    assert RunStore("demo", tmp_path).check_status(checkpoint_dir=ckpt).state == "stale"


def test_missing_checkpoint_is_ready_with_a_note(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    publish(tmp_path, manifest_base=inputs_manifest(ckpt, None, {}, spec=SPEC))
    for f in ckpt.iterdir():
        f.unlink()
    st = run_status("demo", tmp_path)
    assert st.state == "ready" and "not verified" in st.message


def test_partial_and_missing(tmp_path):
    assert run_status("nope", tmp_path).state == "missing"
    assert "python -m analysis.precompute --run nope" in run_status("nope", tmp_path).message
    publish(tmp_path)
    d = RunStore("demo", tmp_path).dir
    (d / "layer_metrics.parquet").unlink()
    st = run_status("demo", tmp_path)
    assert st.state == "partial" and "layer_metrics.parquet" in st.message and "--run demo" in st.message

    publish(tmp_path)
    d = RunStore("demo", tmp_path).dir
    with open(d / "projection_model.npz", "ab") as f:
        f.write(b"more")
    assert run_status("demo", tmp_path).state == "partial"

    publish(tmp_path)
    d = RunStore("demo", tmp_path).dir
    data = bytearray((d / "projection_model.npz").read_bytes())
    data[0] ^= 0xFF
    (d / "projection_model.npz").write_bytes(bytes(data))  # same size, different content
    assert run_status("demo", tmp_path).state == "ready"
    assert run_status("demo", tmp_path, verify=True).state == "partial"

    publish(tmp_path)
    d = RunStore("demo", tmp_path).dir
    m = json.loads((d / "manifest.json").read_text())
    m["status"] = "writing"
    (d / "manifest.json").write_text(json.dumps(m))
    assert run_status("demo", tmp_path).state == "partial"
    (d / "manifest.json").write_text("{not json")
    assert run_status("demo", tmp_path).state == "partial"
    (d / "manifest.json").unlink()
    assert run_status("demo", tmp_path).state == "missing"


def test_spec_round_trips_through_the_manifest(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    publish(tmp_path, manifest_base=inputs_manifest(ckpt, None, {}, spec=SPEC))
    s = RunStore("demo", tmp_path)
    assert s.status.state == "ready", s.status.message
    assert s.spec() == SPEC  # every nested piece comes back typed
    assert s.spec().layer("l0").gate.score == "sigmoid" and s.spec().deciding_label().name == "src"
    assert s.spec().image_inputs()[0].grid == ImageGrid(2, 3, 1)
    assert json.loads((s.dir / "manifest.json").read_text())["spec"] == SPEC.to_dict()


def test_manifest_without_spec_is_stale_with_the_rebuild_command(tmp_path):
    with RunWriter("demo", root=tmp_path, manifest_base={"family": "toy"}) as w:
        w.write_table("examples", examples_df())
    st = run_status("demo", tmp_path)
    assert st.state == "stale" and "spec" in st.message
    assert "python -m analysis.precompute --run demo" in st.message
    with pytest.raises(ValueError, match="rebuild with: python -m analysis.precompute --run demo"):
        RunStore("demo", tmp_path).spec()
    ckpt = make_checkpoint(tmp_path / "ckpt")
    assert needs_rebuild("demo", ckpt, None, {}, root=tmp_path)  # the precompute rebuilds it


def test_older_store_format_is_stale(tmp_path):
    publish(tmp_path)
    d = RunStore("demo", tmp_path).dir
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**m, "store_format": 1}))
    st = run_status("demo", tmp_path)
    assert st.state == "stale" and "store format 1" in st.message and "--run demo" in st.message
    (d / "manifest.json").write_text(json.dumps({**m, "spec": {"family": "toy", "routed_layers": "bad"}}))
    assert run_status("demo", tmp_path).state == "stale"


def test_needs_rebuild(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    data = make_dataset(tmp_path / "data")
    params = {"split": "test", "max_examples": 100}
    assert needs_rebuild("demo", ckpt, data, params, root=tmp_path)  # nothing built yet
    publish(tmp_path, manifest_base=inputs_manifest(ckpt, data, params, spec=SPEC))
    assert not needs_rebuild("demo", ckpt, data, params, root=tmp_path)
    assert not needs_rebuild("demo", ckpt, data, {**params, "code_version": "9.9"}, root=tmp_path)
    assert not needs_rebuild("demo", ckpt, data, dict(reversed(list(params.items()))), root=tmp_path)
    assert needs_rebuild("demo", ckpt, data, {**params, "max_examples": 50}, root=tmp_path)
    assert "max_examples" in rebuild_reasons("demo", ckpt, data, {**params, "max_examples": 50}, tmp_path)[0]
    other_data = make_dataset(tmp_path / "data2")
    (other_data / "extra.jsonl").write_text("{}\n")
    assert needs_rebuild("demo", ckpt, other_data, params, root=tmp_path)
    make_checkpoint(ckpt, scale=5.0)
    assert needs_rebuild("demo", ckpt, data, params, root=tmp_path)


# ----------------------------------------------------------------------------------- queries


def test_example_routing(tmp_path):
    routing = make_routing(n_examples=4, layers=("l1", "l0"), positions=5)
    publish(tmp_path, routing=routing)
    s = RunStore("demo", tmp_path)
    got = s.example_routing(2)
    assert set(got.example_index) == {2} and len(got) == 2 * 5
    assert list(zip(got.layer, got.position)) == sorted(zip(got.layer, got.position))
    one = s.example_routing(np.int64(2), layer="l1")
    assert set(one.layer) == {"l1"} and list(one.position) == list(range(5))
    assert len(s.example_routing(99)) == 0
    assert list(s.example_routing(1, columns=["layer", "position"]).columns) == ["layer", "position"]


@pytest.mark.parametrize("aggregates", [True, False])
def test_layer_loads_exact(tmp_path, aggregates):
    publish(tmp_path, routing=hand_routing(), aggregate_routing=aggregates)
    s = RunStore("demo", tmp_path)
    assert s.has("routing_loads") == aggregates
    loads = s.layer_loads()
    got = {(r.layer, r.expert): (r.slots, round(r.weight, 6)) for r in loads.itertuples()}
    assert got == {
        ("a", 0): (4, 2.65),
        ("a", 1): (4, 1.35),
        ("a", 2): (0, 0.0),
        ("b", 0): (1, 0.1),
        ("b", 1): (1, 0.3),
        ("b", 2): (2, 1.6),
    }
    a = loads[loads.layer == "a"]
    assert np.allclose(a.slot_fraction, [0.5, 0.5, 0.0]) and np.isclose(a.weight_fraction.sum(), 1.0)
    assert list(s.layer_loads(layer="b").expert) == [0, 1, 2]
    by = s.layer_loads(layer="a", by="routed_modality")
    got = {(r.routed_modality, r.expert): r.slots for r in by.itertuples()}
    assert got == {("image", 0): 2, ("image", 1): 2, ("image", 2): 0, ("text", 0): 2, ("text", 1): 2, ("text", 2): 0}
    with pytest.raises(ValueError):
        s.layer_loads(by="token")
    # cached result is not shared mutably
    mutated = s.layer_loads()
    mutated["slots"] = -1
    assert (s.layer_loads().slots >= 0).all()


def test_entropy_values(tmp_path, monkeypatch):
    routing = make_routing(n_examples=20, layers=("l0", "l1"), positions=10)
    monkeypatch.setattr(store_aggregates, "ENTROPY_SAMPLE_PER_LAYER", 60)
    publish(tmp_path, routing=routing)
    s = RunStore("demo", tmp_path)
    assert 20 <= s.sql("SELECT count(*) AS n FROM routing_entropy_sample WHERE layer = 'l0'").n[0] <= 120
    full = np.sort(s.entropy_values("l0", sample=None))
    assert np.allclose(full, np.sort(routing[routing.layer == "l0"].entropy.to_numpy(np.float32)))
    small = s.entropy_values("l0", sample=15, seed=3)
    assert len(small) == 15 and set(small.tolist()) <= set(full.tolist())
    assert np.array_equal(small, RunStore("demo", tmp_path).entropy_values("l0", sample=15, seed=3))
    big = s.entropy_values("l1", sample=150)  # more than the stored sample: from routing
    assert len(big) == 150
    assert len(s.entropy_values("l1", sample=10_000)) == 200
    assert len(s.entropy_values("l0", column="top1_prob")) == 200
    with pytest.raises(ValueError):
        s.entropy_values("l0", column="logits")


def test_examples_filters_and_injection(tmp_path):
    publish(tmp_path, examples=examples_df(5))
    s = RunStore("demo", tmp_path)
    assert list(s.examples({"label": "a"}).example_index) == [0, 2]
    assert list(s.examples({"label": ["a", "c"], "decided_by": "text"}).example_index) == [0, 3]
    assert len(s.examples({"label": []})) == 0
    assert len(s.examples(limit=2)) == 2
    for evil in ["a' OR '1'='1", "a'; DROP VIEW examples; --", 'a" OR 1=1 --']:
        assert len(s.examples({"label": evil})) == 0
    assert len(s.examples()) == 5 and "examples" in s.tables
    assert list(
        s.table(
            "examples", where="label = ? OR example_index > ?", params=["b", 3], order_by="-example_index"
        ).example_index
    ) == [4, 1]
    with pytest.raises(ValueError, match="unknown table"):
        s.table("examples; DROP TABLE x")
    with pytest.raises(ValueError, match="unknown table"):
        s.dynamics()
    with pytest.raises(ValueError, match="unknown column"):
        s.examples({"label = 'a' OR 1=1 --": 1})
    with pytest.raises(ValueError, match="unknown column"):
        s.table("examples", columns=["example_index", "secret"])
    with pytest.raises(ValueError, match="unknown column"):
        s.table("examples", order_by="label; DROP")
    with pytest.raises(ValueError):
        s.table("examples", limit=-1)
    with pytest.raises(ValueError):
        s.table("examples", limit="1; DROP")
    with pytest.raises(ValueError):
        s.path("../manifest.json")
    with pytest.raises(FileNotFoundError):
        s.path("absent.bin")
    assert s.sql("SELECT count(*) AS n FROM examples WHERE label = $l", {"l": "b"}).n[0] == 2


def test_queries_from_threads(tmp_path):
    publish(tmp_path, routing=make_routing(n_examples=6))
    s = RunStore("demo", tmp_path)
    errors, counts = [], []

    def work(i):
        try:
            for _ in range(5):
                counts.append(len(s.example_routing(i % 6)))
                s.layer_loads()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and set(counts) == {8}


# ----------------------------------------------------------------------------------- hashing


def test_hashes(tmp_path):
    data = make_dataset(tmp_path / "d")
    h = dir_hash(data)
    assert h == dir_hash(data) == dataset_hash(data)
    (data / "train.json").write_text(json.dumps([{"id": 1, "text": "hellO"}]))  # same size, new content
    h2 = dir_hash(data)
    assert h2 != h
    h_all = dir_hash(data, content_suffixes=None)
    (data / "images" / "1.png").write_bytes(b"\x89PNG FAKE")  # image: names + sizes
    assert dir_hash(data) == h2
    assert dir_hash(data, content_suffixes=None) != h_all
    (data / "images" / "2.png").write_bytes(b"x")
    assert dir_hash(data) != h2
    assert dir_hash(data, patterns=["*.json"]) != dir_hash(data)
    (data / ".cache").mkdir()
    (data / ".cache" / "x.json").write_text("{}")
    assert dir_hash(data, patterns=["*.json"]) == dir_hash(data, patterns=["*.json"])
    f = tmp_path / "q.jsonl"
    f.write_text("{}\n")
    assert dataset_hash(f) == file_sha256(f)
    ck = make_checkpoint(tmp_path / "ck")
    c1 = checkpoint_hash(ck)
    (ck / "snapshots").mkdir()
    (ck / "snapshots" / "step_1.safetensors").write_bytes(b"ignored")
    assert checkpoint_hash(ck) == c1
    (ck / "config.json").write_text(json.dumps({"family": "mmoe", "experts": 8}))
    assert checkpoint_hash(ck) != c1
    with pytest.raises(FileNotFoundError):
        checkpoint_hash(tmp_path / "d")


def test_code_version_never_fails(monkeypatch):
    v = code_version()
    assert isinstance(v, str) and v
    code_version.cache_clear()

    def no_git(*a, **kw):
        raise FileNotFoundError("git")

    monkeypatch.setattr(store_status.subprocess, "run", no_git)
    try:
        assert code_version() == v.split("+")[0]
    finally:
        code_version.cache_clear()


def test_stores_left_open_are_closed_at_exit(tmp_path):
    """A store a cache keeps until the process ends (Streamlit's resource cache does) is closed and its
    DuckDB connection dropped by the exit hook: a DuckDB object alive at interpreter exit made the binding
    library print 'nanobind: leaked ...' after pytest's summary line."""
    from analysis.store import reader

    publish(tmp_path)
    store = reader.RunStore("demo", tmp_path)
    assert len(store.table("examples")) == 3 and store in reader._OPEN_STORES
    reader.close_open_stores()
    assert store._con is None and store not in reader._OPEN_STORES
    with pytest.raises(RuntimeError, match="closed"):
        store.table("examples")
    store.close()  # closing twice is harmless
