"""The routing layouts of the artifact store: the "split" layout (many experts) answers the page queries
exactly like the "wide" one, and one example's routing is a read of few row groups."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from analysis.indicator_tables import coselection_frame
from analysis.store import RoutingSink, RunStore, RunWriter, write_routing
from analysis.store.layout import check_combine_is_topk, choose_layout, split_routing
from mmoe_core.spec import ModelSpec, RoutedLayerSpec

LAYERS = ("blocks.0", "blocks.1", "blocks.2")
E, K, POSITIONS, EXAMPLES = 32, 4, 160, 104  # 3 * 160 * 104 = 49,920 routed positions
SPEC = ModelSpec("toy", "toy: many experts", routed_layers=tuple(RoutedLayerSpec(n, E, K) for n in LAYERS))
ROW_GROUP = 2048
GROUPS = {"row_group_size": ROW_GROUP, "dense_row_group_size": ROW_GROUP // 2}


def many_expert_routing(n_examples=EXAMPLES, seed=0, dead=(5,)) -> pd.DataFrame:
    """A routing table in the precompute's schema (E=32, top-4, combine = scatter of the top-k), shuffled;
    expert 5 of every layer is never chosen (it must still get its zero rows)."""
    rng = np.random.default_rng(seed)
    n = n_examples * len(LAYERS) * POSITIONS
    logits = rng.standard_normal((n, E)).astype(np.float32)
    logits[:, list(dead)] -= 20.0
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top = np.argsort(-p, 1)[:, :K]
    w = np.take_along_axis(p, top, 1)
    w = (w / w.sum(1, keepdims=True)).astype(np.float32)
    combine = np.zeros_like(p)
    np.put_along_axis(combine, top, w, 1)
    ex = np.repeat(np.arange(n_examples), len(LAYERS) * POSITIONS)
    li = np.tile(np.repeat(np.arange(len(LAYERS)), POSITIONS), n_examples)
    pos = np.tile(np.arange(POSITIONS), n_examples * len(LAYERS))
    image = pos < 64
    frame = pd.DataFrame(
        {
            "layer": np.array(LAYERS)[li],
            "call": "sequence",
            "example_index": ex,
            "example_id": [f"e{i}" for i in ex],
            "position": pos,
            "position_kind": np.where(image, "image_patch", "text_token"),
            "token": [f"t{i % 50}" for i in pos],
            "routed_modality": np.where(image, "image", "text"),
            "gate_modality": np.where(image, "image", "text"),
            "grid_row": np.where(image, pos // 8, -1),
            "grid_col": np.where(image, pos % 8, -1),
            "top1": top[:, 0].astype(np.int16),
            "topk_ids": list(top.astype(np.int16)),
            "topk_weights": list(w),
            "combine": list(combine),
            "probs": list(p.astype(np.float32)),
            "logits": list(logits),
            "entropy": (-(p * np.log(p)).sum(1)).astype(np.float32),
            "top1_prob": p.max(1).astype(np.float32),
            "routed": True,
        }
    )
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    routing = many_expert_routing()
    for run, layout in (("wide", "wide"), ("split", "auto")):
        with RunWriter(run, root=root, manifest_base={"spec": SPEC.to_dict()}, row_group_size=ROW_GROUP) as w:
            write_routing(w, routing, layout=layout, **GROUPS)
    return root, routing


def test_auto_layout_splits_many_experts(runs):
    root, _ = runs
    wide, split = RunStore("wide", root), RunStore("split", root)
    assert choose_layout({"a": 16}) == "wide" and choose_layout({"a": 17}) == "split"
    assert wide.routing_layout() == "wide" and split.routing_layout() == "split"
    assert {"probs", "logits", "combine"} <= set(wide.columns("routing"))
    assert not {"probs", "logits", "combine"} & set(split.columns("routing"))
    assert split.has("routing_dense") and not wide.has("routing_dense")
    assert split.num_experts() == {name: E for name in LAYERS}
    assert split.manifest["routing_layout"]["dense"] == "routing_dense"
    # pages keep every column they read (the E-wide ones are asked for by name in the split layout)
    assert set(split.columns("routing")) == set(wide.columns("routing")) - {"probs", "logits", "combine"}


@pytest.mark.parametrize("example", [0, 51, EXAMPLES - 1])
def test_example_routing_same_in_both_layouts(runs, example):
    root, routing = runs
    wide, split = RunStore("wide", root), RunStore("split", root)
    a, b = wide.example_routing(example), split.example_routing(example)
    assert len(a) == len(LAYERS) * POSITIONS
    # the direct row-group read gives what the SQL query over the whole file gives
    by_sql = wide.table("routing", where={"example_index": example}, order_by=["layer", "call", "position"])
    pd.testing.assert_frame_equal(a, by_sql)
    pd.testing.assert_frame_equal(a.drop(columns=["probs", "logits", "combine"]), b)
    one_a, one_b = wide.example_routing(example, layer="blocks.1"), split.example_routing(example, layer="blocks.1")
    pd.testing.assert_frame_equal(one_a[b.columns], one_b)
    dense = split.example_routing(example, layer="blocks.1", dense=True)
    for col in ("combine", "probs", "logits"):
        got, want = np.stack(list(dense[col])), np.stack(list(one_a[col]))
        assert got.dtype == np.float32 and got.shape == (POSITIONS, E)
        if col == "combine":
            assert np.array_equal(got, want)  # rebuilt from the top-k: exact
        else:
            assert np.allclose(got, want, rtol=2e-3, atol=1e-3)  # float16 on disk
    assert list(split.example_routing(example, columns=["position", "probs"]).columns) == ["position", "probs"]


def test_aggregates_same_in_both_layouts(runs):
    root, routing = runs
    wide, split = RunStore("wide", root), RunStore("split", root)
    for kw in ({}, {"by": "routed_modality"}, {"layer": "blocks.2", "by": ["position_kind"]}):
        a, b = wide.layer_loads(**kw), split.layer_loads(**kw)
        assert len(a) == len(b) and (a.slots.to_numpy() == b.slots.to_numpy()).all()
        assert np.allclose(a.weight, b.weight, rtol=1e-6) and np.allclose(a.weight_fraction, b.weight_fraction)
    loads = split.layer_loads()
    assert len(loads) == len(LAYERS) * E and (loads[loads.expert == 5].slots == 0).all()
    # without the stored aggregate (the reader's fallback over the full routing table): same numbers
    for store in (wide, split):
        store.tables = [t for t in store.tables if t != "routing_loads"]
        pd.testing.assert_frame_equal(store._layer_loads(None, []), loads, check_dtype=False, atol=1e-6)
    want = coselection_frame(routing).sort_values(["layer", "expert_a", "expert_b"]).reset_index(drop=True)
    for store in (RunStore("wide", root), RunStore("split", root)):
        got = store.coselection()
        assert (
            got[["layer", "expert_a", "expert_b"]].to_numpy() == want[["layer", "expert_a", "expert_b"]].to_numpy()
        ).all()
        assert (got["count"].to_numpy() == want["count"].to_numpy()).all()
        assert set(store.coselection("blocks.0").layer) == {"blocks.0"}
        for name in LAYERS:
            full = np.sort(store.entropy_values(name, sample=None))
            assert np.array_equal(full, np.sort(routing[routing.layer == name].entropy.to_numpy(np.float32)))


def test_one_example_reads_few_row_groups(runs):
    root, _ = runs
    split = RunStore("split", root)
    per_example = len(LAYERS) * POSITIONS
    for table in ("routing", "routing_dense"):
        md = pq.ParquetFile(split.dir / f"{table}.parquet").metadata
        assert md.num_row_groups >= EXAMPLES * per_example // ROW_GROUP
        assert md.row_group(0).num_rows == (ROW_GROUP if table == "routing" else ROW_GROUP // 2)
        col = md.schema.names.index("example_index")
        spans = [
            (md.row_group(i).column(col).statistics.min, md.row_group(i).column(col).statistics.max)
            for i in range(md.num_row_groups)
        ]
        assert all(lo <= hi for lo, hi in spans) and spans == sorted(spans)  # sorted: stats disjoint
        hit = [i for i, (lo, hi) in enumerate(spans) if lo <= 51 <= hi]
        assert 1 <= len(hit) <= -(-per_example // md.row_group(0).num_rows) + 1
        stats = split.scan_stats(f"SELECT * FROM {table} WHERE example_index = ?", [51])
        assert stats["row_groups_total"] == md.num_row_groups
        assert stats["row_groups_scanned"] <= len(hit)
    one_layer = split.scan_stats("SELECT * FROM routing WHERE example_index = ? AND layer = ?", [51, "blocks.1"])
    assert one_layer["row_groups_scanned"] <= 2
    # what example_routing itself reads: the row groups whose example_index range holds the example
    for table in ("routing", "routing_dense"):
        read = split.example_read_stats(51, name=table)
        assert 1 <= read["row_groups_read"] <= 2 and read["row_groups_total"] >= 20
        assert split.example_read_stats(51, layer="blocks.1", name=table)["row_groups_read"] <= read["row_groups_read"]


def test_streamed_sink_matches_one_write(tmp_path, runs):
    root, routing = runs
    ordered = routing.sort_values(["example_index", "layer", "position"]).reset_index(drop=True)
    with RunWriter("streamed", root=tmp_path, manifest_base={"spec": SPEC.to_dict()}, row_group_size=ROW_GROUP) as w:
        with RoutingSink(w, **GROUPS) as sink:
            for lo in range(0, EXAMPLES, 7):
                sink.append(ordered[ordered.example_index.between(lo, lo + 6)])
    s, ref = RunStore("streamed", tmp_path), RunStore("split", root)
    assert s.routing_layout() == "split" and s.num_experts() == ref.num_experts()
    pd.testing.assert_frame_equal(s.example_routing(33, dense=True), ref.example_routing(33, dense=True))
    pd.testing.assert_frame_equal(s.layer_loads(), ref.layer_loads())
    pd.testing.assert_frame_equal(s.coselection(), ref.coselection())


def test_split_without_dense_and_weight_outside_topk(tmp_path):
    routing = many_expert_routing(n_examples=4)
    with RunWriter("lean", root=tmp_path, manifest_base={"spec": SPEC.to_dict()}) as w:
        write_routing(w, routing, dense=False)
    s = RunStore("lean", tmp_path)
    assert s.routing_layout() == "split" and not s.has("routing_dense")
    assert len(s.example_routing(2)) == len(LAYERS) * POSITIONS
    assert len(s.example_routing(2, columns=["position", "combine"])) == len(LAYERS) * POSITIONS
    with pytest.raises(ValueError, match="dense"):
        s.example_routing(2, dense=True)
    # a gate that puts weight outside its top-k (the published MMoE gate can) cannot drop combine
    odd = routing.copy()
    odd.at[0, "combine"] = odd.at[0, "combine"] + np.float32(0.01)
    import pyarrow as pa

    with pytest.raises(ValueError, match="wide"):
        check_combine_is_topk(pa.Table.from_pandas(odd, preserve_index=False))
    with RunWriter("odd", root=tmp_path, manifest_base={"spec": SPEC.to_dict()}) as w, pytest.raises(ValueError):
        write_routing(w, odd, layout="split")
    main, dense = split_routing(pa.Table.from_pandas(routing, preserve_index=False), check=False)
    assert "combine" not in main.column_names and set(dense.column_names) >= {"example_index", "probs", "logits"}
