"""The routing measures table (analysis.routing_measure_tables) on constructed routing tables with
hand-computed answers; router saturation over a synthetic snapshot sequence (alone and through
precompute's dynamics step); and precompute writing the table (the fake adapter of test_precompute)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analysis import precompute_steps as S
from analysis import routing_measure_tables as T
from analysis import routing_measures as M
from mmoe_core.adapter import ModelAdapter, RunOutput
from mmoe_core.checkpoint import save_snapshot
from mmoe_core.routing_record import PositionMeta, RouterOutput, RoutingRecorder
from tests.test_pages_apptest import (  # the page tests' fixtures and helpers
    _array,
    _clear_caches,
    _copy_run,
    _need,
    _store,
    frames,
    markdown_text,
    no_exceptions,
    render,
    root,  # noqa: F401
    runs_root,  # noqa: F401
)

LOG2 = math.log(2)


def rows(layer, probs, topk, combine=None, modality="text", call="c", example=0, positions=None, kind="text_token"):
    """A routing table of one layer call: one row per position (the columns the measures read)."""
    probs = np.asarray(probs, dtype=np.float64)
    topk = np.asarray(topk, dtype=np.int64).reshape(len(probs), -1)
    if combine is None:
        combine = np.zeros_like(probs)
        np.put_along_axis(combine, topk, 1.0 / topk.shape[1], axis=1)
    n = len(probs)
    modality = [modality] * n if isinstance(modality, str) else list(modality)
    return pd.DataFrame(
        {
            "layer": layer,
            "call": call,
            "example_index": example,
            "position": list(range(n)) if positions is None else list(positions),
            "position_kind": kind,
            "routed_modality": modality,
            "topk_ids": list(topk),
            "combine": list(np.asarray(combine, dtype=np.float64)),
            "probs": list(probs),
            "logits": list(np.log(np.clip(probs, 1e-9, None))),
        }
    )


def one_hot(ids, E):
    out = np.zeros((len(ids), E))
    out[np.arange(len(ids)), ids] = 1.0
    return out


def row(frame, layer, group):
    hit = frame[(frame["layer"] == layer) & (frame["group"] == group)]
    assert len(hit) == 1, (layer, group, frame[["layer", "group"]])
    return hit.iloc[0]


# --------------------------------------------------------------------------------------------- the frame


def test_uniform_routing_has_diversity_one_and_no_information():
    E, k, T_ = 4, 2, 8
    probs = np.full((T_, E), 1 / E)
    topk = np.array([[t % E, (t + 1) % E] for t in range(T_)])  # every expert 4 of the 16 slots
    frame = T.routing_measures_frame(rows("l", probs, topk))
    assert list(frame.columns) == T.COLUMNS
    r = row(frame, "l", "all")
    assert r["positions"] == T_ and r["num_experts"] == E and r["top_k"] == k
    assert r["expert_token_mi"] == pytest.approx(0.0, abs=1e-12)
    assert r["local_entropy"] == pytest.approx(math.log(E)) and r["global_entropy"] == pytest.approx(math.log(E))
    assert r["expert_diversity"] == pytest.approx(1.0) and r["expert_diversity_by_weight"] == pytest.approx(1.0)
    assert r["dead_expert_fraction"] == 0.0
    assert r["top_n"] == k and r["top_n_share"] == pytest.approx(k / E) and r["top_n_uniform"] == pytest.approx(k / E)
    assert r["top_n_ratio"] == pytest.approx(1.0)
    np.testing.assert_allclose(r["load_slots"], [0.25] * 4)
    np.testing.assert_allclose(r["load_weight"], [0.25] * 4)
    assert r["next_layer"] == "" and math.isnan(r["consistency_next"]) and r["consistency_positions"] == 0


def test_all_to_one_expert_has_dead_fraction_e_minus_one_over_e():
    E = 5
    probs = one_hot([2] * 6, E)
    frame = T.routing_measures_frame(rows("l", probs, [[2]] * 6))
    r = row(frame, "l", "all")
    assert r["dead_expert_fraction"] == pytest.approx((E - 1) / E)
    assert r["expert_diversity"] == pytest.approx(1 / E)
    assert r["top_n"] == 1 and r["top_n_share"] == pytest.approx(1.0) and r["top_n_ratio"] == pytest.approx(E)
    assert r["global_entropy"] == pytest.approx(0.0, abs=1e-12) and r["expert_token_mi"] == pytest.approx(0.0)


def test_groups_are_all_and_each_modality_and_see_what_the_layer_hides():
    # text always to expert 0, image always to expert 1 (one-hot gates): each modality alone has no
    # spread at all, the layer as a whole is balanced over experts 0 and 1 and fully informative.
    probs = one_hot([0, 0, 0, 1, 1, 1], 4)
    topk = [[0], [0], [0], [1], [1], [1]]
    frame = T.routing_measures_frame(rows("l", probs, topk, modality=["text"] * 3 + ["image"] * 3))
    assert list(frame["group"]) == ["all", "image", "text"]
    whole, text, image = row(frame, "l", "all"), row(frame, "l", "text"), row(frame, "l", "image")
    assert whole["expert_token_mi"] == pytest.approx(LOG2) and whole["global_entropy"] == pytest.approx(LOG2)
    assert whole["dead_expert_fraction"] == pytest.approx(0.5) and whole["expert_diversity"] == pytest.approx(0.5)
    for part in (text, image):
        assert part["positions"] == 3 and part["expert_token_mi"] == pytest.approx(0.0)
        assert part["dead_expert_fraction"] == pytest.approx(0.75) and part["expert_diversity"] == pytest.approx(0.25)
    np.testing.assert_allclose(text["load_slots"], [1, 0, 0, 0])
    np.testing.assert_allclose(image["load_slots"], [0, 1, 0, 0])


def test_load_by_weight_sits_beside_load_by_slots():
    # slots evenly spread over 4 experts (top-2), but the combine weight sits on experts 0 and 1
    topk = np.array([[0, 2], [1, 3], [0, 3], [1, 2]])
    combine = np.zeros((4, 4))
    for t, (a, b) in enumerate(topk):
        combine[t, a], combine[t, b] = 0.9, 0.1
    probs = np.full((4, 4), 0.25)
    r = row(T.routing_measures_frame(rows("l", probs, topk, combine)), "l", "all")
    np.testing.assert_allclose(r["load_slots"], [0.25] * 4)
    np.testing.assert_allclose(r["load_weight"], [0.45, 0.45, 0.05, 0.05])
    assert r["expert_diversity"] == pytest.approx(1.0)
    expected = math.exp(-(2 * 0.45 * math.log(0.45) + 2 * 0.05 * math.log(0.05))) / 4
    assert r["expert_diversity_by_weight"] == pytest.approx(expected)


def test_no_weight_at_all_gives_no_diversity_by_weight():
    r = row(T.routing_measures_frame(rows("l", np.full((3, 2), 0.5), [[0], [1], [0]], np.zeros((3, 2)))), "l", "all")
    assert math.isnan(r["expert_diversity_by_weight"]) and r["expert_diversity"] > 0


def test_consistency_follows_the_declared_order_and_only_shared_positions():
    probs = np.full((4, 4), 0.25)
    first = [[0, 1], [1, 2], [2, 3], [3, 0]]
    same = first
    half = [[0, 2], [1, 3], [2, 0], [3, 1]]  # one of three experts in common: J = 1/3
    other_modality = rows("z_image", probs, first, modality="image")
    table = pd.concat(
        [
            rows("b_first", probs, first),
            rows("a_second", probs, same),
            rows("c_third", probs, half),
            other_modality,
        ],
        ignore_index=True,
    )
    frame = T.routing_measures_frame(table, layer_order=["b_first", "a_second", "c_third", "z_image"])
    assert list(dict.fromkeys(frame["layer"])) == ["b_first", "a_second", "c_third", "z_image"]
    r1, r2, r3 = row(frame, "b_first", "all"), row(frame, "a_second", "all"), row(frame, "c_third", "all")
    assert r1["next_layer"] == "a_second" and r1["consistency_next"] == pytest.approx(1.0)
    assert r1["consistency_positions"] == 4
    assert r2["next_layer"] == "c_third" and r2["consistency_next"] == pytest.approx(1 / 3)
    # the image layer routes other positions (another modality): nothing is paired
    assert r3["next_layer"] == "z_image" and math.isnan(r3["consistency_next"]) and r3["consistency_positions"] == 0
    assert row(frame, "b_first", "text")["consistency_next"] == pytest.approx(1.0)


def test_positions_align_on_their_keys_not_their_row_order():
    probs = np.full((3, 3), 1 / 3)
    a = rows("a", probs, [[0], [1], [2]], positions=[0, 1, 2])
    b = rows("b", probs[::-1], [[2], [1], [0]], positions=[2, 1, 0])  # same choices, rows reversed
    c = rows("c", probs, [[0], [1], [2]], call="other")  # another call: other positions
    frame = T.routing_measures_frame(pd.concat([a, b, c], ignore_index=True), layer_order=["a", "b", "c"])
    assert row(frame, "a", "all")["consistency_next"] == pytest.approx(1.0)
    assert row(frame, "b", "all")["consistency_positions"] == 0


def test_repeated_keys_pair_by_order_of_occurrence():
    # a decoder routing three steps at position 0: the n-th step here pairs with the n-th step there
    probs = np.full((3, 3), 1 / 3)
    a = rows("a", probs, [[0], [1], [2]], positions=[0, 0, 0])
    b = rows("b", probs, [[0], [1], [1]], positions=[0, 0, 0])
    here, there, keys = T.aligned_topk(a, b)
    assert here[:, 0].tolist() == [0, 1, 2] and there[:, 0].tolist() == [0, 1, 1] and len(keys) == 3
    assert T.consistency_of(here, there) == pytest.approx(2 / 3)


def _random_table(seed, E, k, n):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(E) * 0.5, size=n)
    topk = np.argsort(-probs, axis=1)[:, :k]
    return rows("l", probs, topk, modality=rng.choice(["text", "image"], size=n)), probs, topk


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), E=st.integers(2, 8), k=st.integers(1, 3), n=st.integers(2, 40))
def test_the_all_row_is_the_measures_of_every_position(seed, E, k, n):
    k = min(k, E)
    table, probs, topk = _random_table(seed, E, k, n)
    frame = T.routing_measures_frame(table)
    whole = row(frame, "l", "all")
    groups = frame[frame["group"] != "all"]
    assert groups["positions"].sum() == whole["positions"] == n
    assert whole["expert_token_mi"] == pytest.approx(whole["global_entropy"] - whole["local_entropy"], abs=1e-9)
    assert whole["expert_diversity"] == pytest.approx(M.expert_diversity(M.slot_load(topk, E)))
    assert whole["local_entropy"] == pytest.approx(M.local_entropy(probs))
    assert 1 / E - 1e-9 <= whole["expert_diversity"] <= 1 + 1e-9
    assert 0 <= whole["dead_expert_fraction"] <= (E - 1) / E
    assert 1 - 1e-9 <= whole["top_n_ratio"] <= E / k + 1e-9


# --------------------------------------------------------------------------------------------- saturation


FINAL = [[0, 1], [2, 3], [1, 2], [3, 0]]
SNAPSHOTS = {  # step -> top-2 per position, with its saturation against FINAL and its top-1 agreement
    10: ([[2, 3], [0, 1], [3, 0], [1, 2]], 0.0, 0.0),
    20: ([[0, 2], [2, 0], [1, 0], [0, 1]], 0.5, 0.75),
    30: (FINAL, 1.0, 1.0),
}


def test_saturation_of_a_snapshot_sequence():
    probs = np.full((4, 4), 0.25)
    final = rows("l", probs, FINAL)
    for step, (topk, expected, top1) in SNAPSHOTS.items():
        got = T.saturation_by_layer(rows("l", probs, topk), final)["l"]
        assert got["router_saturation"] == pytest.approx(expected), step
        assert got["router_saturation_top1"] == pytest.approx(top1), step
        assert got["saturation_positions"] == 4
    same = M.router_saturation([np.asarray(t) for t, _, _ in SNAPSHOTS.values()], np.asarray(FINAL))
    np.testing.assert_allclose(same, [e for _, e, _ in SNAPSHOTS.values()])


def test_saturation_without_shared_positions_is_nan():
    probs = np.full((2, 2), 0.5)
    got = T.saturation_by_layer(rows("l", probs, [[0], [1]], call="x"), rows("l", probs, [[0], [1]], call="y"))
    assert math.isnan(got["l"]["router_saturation"]) and got["l"]["saturation_positions"] == 0


class _Router(torch.nn.Module):
    """A router with one learned score per expert: position p's logits are ``scores`` rolled by p (so
    each position has its own top-2, and a snapshot's scores decide all of them)."""

    def __init__(self):
        super().__init__()
        self.scores = torch.nn.Parameter(torch.tensor([3.0, 2.0, 1.0, 0.0]))


class SnapshotAdapter:
    """Duck-typed adapter with one routed layer driven by ``_Router`` (what dynamics_frame needs)."""

    route = ModelAdapter.route  # the contract's default: run()'s recorder

    def __init__(self):
        self.model = _Router()

    def run(self, examples, record=True, batch_size=32, progress=False):
        recorder = RoutingRecorder()
        L = 4
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            with torch.no_grad():
                base = torch.stack([torch.roll(self.model.scores, shifts=p) for p in range(L)])
                logits = base[None].repeat(len(batch), 1, 1)
            probs = torch.softmax(logits, dim=-1)
            top = probs.topk(2, dim=-1).indices
            combine = torch.zeros_like(probs).scatter(-1, top, probs.gather(-1, top))
            meta = PositionMeta.uniform("c", [ex["index"] for ex in batch], L, "text_token", "text", "text")
            recorder.add("l0", RouterOutput(logits, probs, top, combine), meta)
        return RunOutput([], recorder, {}, None)


def test_dynamics_rows_carry_the_saturation_against_the_final_router(tmp_path: Path):
    adapter = SnapshotAdapter()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    steps = {10: [0.0, 1.0, 2.0, 3.0], 20: [3.0, 0.0, 2.0, 1.0], 30: [3.0, 2.0, 1.0, 0.0]}
    for step, scores in steps.items():
        model = _Router()
        model.scores.data = torch.tensor(scores)
        save_snapshot(model, ckpt, step)
    examples = [{"index": i, "id": f"e{i}"} for i in range(3)]
    dyn = S.dynamics_frame(adapter, ckpt, examples, batch_size=2, progress=False)
    assert list(dyn["step"]) == [10, 20, 30]
    # final top-2 at position 0: {0, 1}; step 10: {3, 2} -> 0; step 20: {0, 2} -> 1/2; step 30: final -> 1
    np.testing.assert_allclose(dyn["router_saturation"], [0.0, 0.5, 1.0])
    np.testing.assert_allclose(dyn["router_saturation_top1"], [0.0, 1.0, 1.0])
    assert (dyn["saturation_positions"] == 3 * 4).all()
    assert {"verdict", "reason", "load", "effective_experts", "dead_experts"} <= set(dyn.columns)
    torch.testing.assert_close(adapter.model.scores.data, torch.tensor([3.0, 2.0, 1.0, 0.0]))  # final restored


# --------------------------------------------------------------------------------------------- precompute


def test_precompute_writes_the_routing_measures_table(tmp_path):
    from tests.test_precompute import FakeAdapter, build

    store = build(tmp_path, FakeAdapter(batch_dependent=False))
    assert store.has("routing_measures")
    stored = store.table("routing_measures")
    assert list(stored.columns) == T.COLUMNS
    assert list(stored["group"]) == ["all", "text"] and set(stored["layer"]) == {"l0"}
    again = T.routing_measures_frame(store.table("routing"), ["l0"])
    scalars = ("positions", "local_entropy", "global_entropy", "expert_token_mi", "top_n_share", "expert_diversity")
    for column in scalars:
        np.testing.assert_allclose(stored[column].astype(float), again[column].astype(float), err_msg=column)
    np.testing.assert_allclose(np.stack(stored["load_slots"]), np.stack(again["load_slots"]))
    assert stored["top_n"].iloc[0] == 2 and stored["positions"].iloc[0] == len(store.table("routing"))


# --------------------------------------------------------------------------------------------- display


def test_display_names_the_measures_and_writes_the_loads():
    probs = one_hot([0, 0, 1, 1], 2)
    frame = T.routing_measures_frame(rows("l", probs, [[0], [0], [1], [1]], modality=["a", "a", "b", "b"]))
    shown = T.measures_display(frame)
    assert list(shown["group"]) == ["all", "a", "b"]
    assert {"expert-token MI", "top-k coverage", "diversity (weight)", "load by slots", "load by weight"} <= set(shown)
    assert list(shown["load by slots"]) == ["0.50 / 0.50", "1.00 / 0.00", "0.00 / 1.00"]
    assert T.format_load(None) == "" and T.format_load(np.array([0.25, 0.75])) == "0.25 / 0.75"
    assert all(m in T.MEASURES and T.MEASURES[m][1].endswith(".") for m in T.TABLE_MEASURES)


def test_side_by_side_puts_each_run_in_a_column_and_keeps_missing_ones_empty():
    probs = np.full((4, 2), 0.5)
    balanced = T.routing_measures_frame(rows("l", probs, [[0], [1], [0], [1]]))
    collapsed = T.routing_measures_frame(
        pd.concat([rows("l", probs, [[0]] * 4), rows("m", probs, [[1]] * 4)], ignore_index=True), ["l", "m"]
    )
    table = T.measures_side_by_side({"A": balanced, "B": collapsed, "old": None})
    assert list(table.columns) == ["layer", "measure", "A", "B", "old"]
    assert list(dict.fromkeys(table["layer"])) == ["l", "m"]
    dead = table[(table["layer"] == "l") & (table["measure"] == "dead fraction")].iloc[0]
    assert dead["A"] == pytest.approx(0.0) and dead["B"] == pytest.approx(0.5) and math.isnan(dead["old"])
    only_b = table[(table["layer"] == "m") & (table["measure"] == "diversity (slots)")].iloc[0]
    assert math.isnan(only_b["A"]) and only_b["B"] == pytest.approx(0.5)
    assert list(table.loc[table["layer"] == "l", "measure"]) == [T.MEASURES[m][0] for m in T.TABLE_MEASURES]
    text_only = T.measures_side_by_side({"A": balanced}, group="text")
    assert len(text_only) == len(T.TABLE_MEASURES) and (text_only["layer"] == "l").all()


# --------------------------------------------------------------------------------------------- pages (e2e)


def _chart(at, title: str) -> dict:
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    found = [c for c in charts if c["layout"].get("title", {}).get("text") == title]
    assert found, [c["layout"].get("title", {}).get("text") for c in charts]
    return found[0]


@pytest.mark.parametrize("run", ["mmoe-reference-gate", "moemoe-qa"])
def test_utilization_page_shows_the_measures_of_the_first_layer_per_modality(root, run):  # noqa: F811
    _need(root, run)
    at = render("utilization", run)
    no_exceptions(at)
    stored = _store(root, run).table("routing_measures")
    first = stored[stored["layer"] == stored["layer"].iloc[0]]
    shown = next(t for t in frames(at) if "top-k coverage" in t.columns)
    assert list(shown["group"]) == list(first["group"])
    np.testing.assert_allclose(shown["expert-token MI"], first["expert_token_mi"].round(3))
    np.testing.assert_allclose(shown["diversity (slots)"], first["expert_diversity"].round(3))
    assert list(shown["load by weight"]) == [T.format_load(v) for v in first["load_weight"]]
    assert list(shown["load by slots"]) == [T.format_load(v) for v in first["load_slots"]]
    text = markdown_text(at)
    assert all(source in text for source in ("LIMoE", "Megatron", "NeMo")), text[-2000:]
    assert "load by slots / load by weight" in text


def test_reference_gate_weight_load_shows_the_expert_it_never_weights(root):  # noqa: F811
    _need(root, "mmoe-reference-gate")
    stored = _store(root, "mmoe-reference-gate").table("routing_measures")
    # the published SwitchGate never weights experts with id >= k (top-3 of 4): expert 3 gets slots, no weight
    assert (np.stack(stored["load_weight"])[:, 3] == 0).all() and (np.stack(stored["load_slots"])[:, 3] > 0).all()
    assert (stored["expert_diversity_by_weight"] < stored["expert_diversity"]).all()


def test_dynamics_page_draws_router_saturation_per_layer(root):  # noqa: F811
    _need(root, "mmoe-balanced")
    at = render("dynamics", "mmoe-balanced")
    no_exceptions(at)
    dyn = _store(root, "mmoe-balanced").table("dynamics")
    chart = _chart(at, "Router saturation per layer over training")
    lines = [t for t in chart["data"] if t.get("xaxis", "x") == "x" and t.get("name") in set(dyn["layer"])]
    assert {t["name"] for t in lines} == set(dyn["layer"])
    for trace in lines:
        part = dyn[dyn["layer"] == trace["name"]].sort_values("step")
        np.testing.assert_allclose(_array(trace["y"]), part["router_saturation"], rtol=1e-6)
        assert _array(trace["y"])[-1] == pytest.approx(1.0)  # the last snapshot is the final model here
    assert "OLMoE" in markdown_text(at)


def test_compare_page_puts_the_measures_of_both_runs_side_by_side(root):  # noqa: F811
    a, b = "mmoe-balanced", "mmoe-collapsing"
    _need(root, a, b)
    at = render("compare", a, compare=b)
    no_exceptions(at)
    table = next(t for t in frames(at) if {"layer", "measure", a, b} <= set(t.columns))
    dead = table[(table["layer"] == "text_intra") & (table["measure"] == "dead fraction")].iloc[0]
    stored = {run: _store(root, run).table("routing_measures") for run in (a, b)}
    for run in (a, b):
        want = stored[run].query("layer == 'text_intra' and group == 'all'")["dead_expert_fraction"].iloc[0]
        assert dead[run] == pytest.approx(round(want, 3))
    assert set(table["measure"]) == {T.MEASURES[m][0] for m in T.TABLE_MEASURES}
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]
    assert f"{a}: share of top-k slots" in titles


def _as_older_run(run_dir: Path) -> None:
    """Make a copied run look published before the routing measures: no routing_measures table, no
    saturation columns in dynamics (manifest updated to match, so the run is not partial)."""
    import hashlib

    import pyarrow.parquet as pq

    manifest = json.loads((run_dir / "manifest.json").read_text())
    (run_dir / "routing_measures.parquet").unlink()
    manifest["files"].pop("routing_measures.parquet")
    dyn_path = run_dir / "dynamics.parquet"
    if dyn_path.is_file():
        table = pq.read_table(dyn_path)
        table = table.drop([c for c in table.column_names if "saturation" in c])
        pq.write_table(table, dyn_path)
        data = dyn_path.read_bytes()
        manifest["files"]["dynamics.parquet"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (run_dir / "manifest.json").write_text(json.dumps(manifest))


def test_an_older_run_without_the_measures_still_renders_with_the_rebuild_command(root, tmp_path, monkeypatch):  # noqa: F811
    a, b = "mmoe-balanced", "mmoe-collapsing"
    _need(root, a, b)
    _as_older_run(_copy_run(root, tmp_path, a))
    _copy_run(root, tmp_path, b)
    monkeypatch.setenv("MOESCOPE_ARTIFACTS", str(tmp_path))
    _clear_caches()
    hint = f"python -m analysis.precompute --run {a}"
    for page, params in (("utilization", {}), ("dynamics", {}), ("compare", {"compare": b})):
        at = render(page, a, **params)
        no_exceptions(at)
        assert not any("partial" in str(w.value).lower() for w in at.warning), page
        infos = " ".join(str(i.value) for i in at.info)
        assert hint in infos and ("routing_measures" in infos or "saturation" in infos), (page, infos)
    table = next(t for t in frames(at) if {"layer", "measure", a, b} <= set(t.columns))  # B's column still shown
    assert table[a].isna().all() and table[b].notna().any()
