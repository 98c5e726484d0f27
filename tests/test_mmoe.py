"""MMoE model, adapter, ranking metrics, hard-negative batches and DME (tiny sizes, untrained weights)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mmoe_core.adapter import load_adapter
from mmoe_core.checkpoint import save_checkpoint
from mmoe_core.encoders import EncoderSpec
from mmoe_core.families.mmoe.config import LAYER_NAMES
from mmoe_core.families.mmoe.data import mention_text
from mmoe_core.families.mmoe.features import text_valid_mask
from mmoe_core.families.mmoe.model import MMoEModel, build_model, matching_loss
from mmoe_core.families.mmoe.ranking import gold_ranks, metrics_by_label, rank_matrix, ranking_metrics, top_k
from mmoe_core.families.mmoe.trainer import hard_negative_batches
from mmoe_core.routing_record import RoutingRecorder, flatten_call

SMALL = dict(
    encoder=EncoderSpec(name="tiny-32").to_dict(),
    image_dim=8,
    text_hidden=8,
    image_hidden=8,
    cross_hidden=8,
    expert_mult=1,
)


def small_config(**overrides) -> dict:
    return {"family": "mmoe", "model": {**SMALL, **overrides}}


@pytest.fixture(scope="module")
def model() -> MMoEModel:
    torch.manual_seed(0)
    return build_model(small_config()).eval()


def inputs(model: MMoEModel, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    words = ["Jaguar rock band", "Jaguar jazz band from Italy", "Orion ship", "a city on the Nile", "Phoenix"]
    ids = model.towers.tokenize([f"{words[i % len(words)]} {i}" for i in range(n)])
    return ids, torch.randn(n, 3, 64, 64, generator=g)


# ---------------------------------------------------------------------------------- ranking


def test_token_mask_keeps_the_real_token_with_id_0(model):
    ids = model.towers.tokenize(["wow!( what a band", ""])
    eot = int(ids[0].argmax())
    assert (ids[0, :eot] == 0).any()  # "!" is BPE id 0 ...
    mask = text_valid_mask(ids)
    assert mask[0, 1 : eot + 2].all() and not mask[0, eot + 2 :].any()  # ... and still a real token
    assert mask[1].sum() == 3  # CLS, SOT, EOT of the empty text


def test_rank_matrix_is_argsort_of_argsort_with_ties_by_index():
    scores = torch.tensor([[0.125, 0.75, 0.5, 0.75]])
    assert rank_matrix(scores).tolist() == [[4, 1, 3, 2]]  # the tie (0.75, 0.75) goes to the lower index
    assert gold_ranks(scores, [2]).tolist() == [3]
    ids, vals = top_k(scores, 2)
    assert ids.tolist() == [[1, 3]] and vals.tolist() == [[0.75, 0.75]]


def test_ranking_metrics_exact_on_a_hand_made_ranking():
    ranks = [1, 2, 4, 10, 25]
    m = ranking_metrics(ranks)
    assert m["n"] == 5
    assert m["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 10 + 1 / 25) / 5)
    assert m["MR"] == pytest.approx(42 / 5)
    assert (m["Hits@1"], m["Hits@3"], m["Hits@5"], m["Hits@10"], m["Hits@20"]) == (0.2, 0.4, 0.6, 0.8, 0.8)
    by = metrics_by_label(ranks, ["text", "image", "text", "both", "image"])
    assert by["text"]["MRR"] == pytest.approx((1 + 1 / 4) / 2) and by["image"]["MR"] == pytest.approx(13.5)


# ---------------------------------------------------------------------------------- model


def test_parameter_names_follow_the_published_matcher(model):
    keys = set(model.state_dict())
    for key in [
        "encoder.image_cls_fc.weight",
        "encoder.image_tokens_fc.weight",
        "matcher.text_module.fc_query.weight",
        "matcher.text_module.fc_key.bias",
        "matcher.text_module.fc_value.weight",
        "matcher.text_module.layer_norm.weight",
        "matcher.text_module.moe_layer.gate.w_gate.weight",
        "matcher.text_module.moe_layer.experts.3.ff.0.0.weight",
        "matcher.text_module.moe_layer.experts.3.ff.2.weight",
        "matcher.vision_module.fc_query.weight",
        "matcher.vision_module.moe_layer.gate.w_gate.bias",
        "matcher.cross_module.text_fc.weight",
        "matcher.cross_module.image_fc.weight",
        "matcher.cross_module.gate_fc.weight",
        "matcher.cross_module.gate_layer_norm.weight",
        "matcher.cross_module.context_layer_norm.weight",
        "matcher.cross_module.moe_layer.gate.w_gate.weight",
        "matcher.text_cls_layernorm.weight",
        "matcher.text_tokens_layernorm.weight",
        "matcher.image_cls_layernorm.weight",
        "matcher.image_tokens_layernorm.weight",
    ]:
        assert key in keys, key
    names = {m.name for m in model.modules() if hasattr(m, "gate") and hasattr(m, "experts")}
    assert names == set(LAYER_NAMES.values())


def test_split_sides_equal_the_training_forward(model):
    ids, px = inputs(model, 6)
    with torch.no_grad():
        joint = model(ids[:3], px[:3], ids[3:], px[3:])
        ent = model.encode_entities(ids[:3], px[:3])
        men = model.encode_mentions(ids[3:], px[3:])
        split = model.match(ent, men, chunk_size=2)  # entity chunks in match change nothing
    assert joint.overall.shape == (3, 3)
    torch.testing.assert_close(split.overall, joint.overall)
    torch.testing.assert_close(split.overall, (split.text + split.image + split.cross) / 3)
    assert set(matching_loss(joint)) == {"overall", "text", "image", "cross"}


def test_modality_ablation_scores_with_one_unit(model):
    ids, px = inputs(model, 4)
    with torch.no_grad():
        ent, men = model.encode_entities(ids, px), model.encode_mentions(ids, px)
        full = model.match(ent, men)
        text_only = model.match(ent, men, ("text",))
        image_only = model.match(ent, men, ("image",))
    torch.testing.assert_close(text_only.overall, full.text)
    torch.testing.assert_close(image_only.overall, full.image)
    assert text_only.cross is None and text_only.image is None
    with pytest.raises(ValueError):
        model.match(ent, men, ("audio",))


def test_entity_chunks_matter_only_for_the_reference_gate():
    ids, px = None, None
    for gate, should_match in [("topk_softmax", True), ("mmoe_reference", False)]:
        torch.manual_seed(0)
        m = build_model(small_config(gate=gate)).eval()
        if ids is None:
            ids, px = inputs(m, 6)
        with torch.no_grad():
            whole = m.encode_entities(ids, px, chunk_size=6)
            chunks = m.encode_entities(ids, px, chunk_size=2)
        same = torch.allclose(whole.text_cls_moe, chunks.text_cls_moe, atol=1e-5)
        assert same is should_match, gate


def test_routing_records_describe_every_call(model):
    ids, px = inputs(model, 3)
    recorder = RoutingRecorder()
    with torch.no_grad():
        plain = model.encode_mentions(ids, px)
        recorded = model.encode_mentions(ids, px, example_ids=[10, 11, 12], recorder=recorder)
        model.encode_entities(ids[:2], px[:2], entity_index=[5, 7], recorder=recorder)
    torch.testing.assert_close(recorded.representation, plain.representation, rtol=0, atol=0)
    calls = {(c.layer, c.meta.call) for c in recorder.calls}
    assert calls == {
        ("text_intra", "mention"),
        ("image_intra", "mention"),
        ("cross_inter", "mention:text_cls+image_tokens"),
        ("cross_inter", "mention:image_cls+text_tokens"),
        ("text_intra", "entity"),
        ("image_intra", "entity"),
        ("cross_inter", "entity:text_cls+image_tokens"),
        ("cross_inter", "entity:image_cls+text_tokens"),
    }
    text = next(c for c in recorder.calls if c.layer == "text_intra" and c.meta.call == "mention")
    rows = flatten_call(text)
    n_tokens = int((ids != 0).sum())
    assert len(rows["position"]) == 3 * 1 + n_tokens  # CLS + non-padding tokens; padding is invalid
    assert set(rows["example_index"]) == {10, 11, 12}
    assert rows["position_kind"][0] == "cls" and rows["token"][0] == "[CLS]" and rows["token"][1] == "<start_of_text>"
    cross = next(c for c in recorder.calls if c.meta.call == "mention:text_cls+image_tokens")
    assert cross.meta.routed_modality[0] == "text" and cross.meta.gate_modality[0] == "image"
    assert cross.meta.routed_modality[2] == "image" and cross.meta.gate_modality[2] == "text"
    assert cross.meta.kinds[2] == "image_patch"
    entity = next(c for c in recorder.calls if c.meta.call == "entity")
    assert list(entity.meta.example_ids) == [5, 7]
    # patches carry their grid cell (row-major after the two CLS positions); other positions -1
    image = flatten_call(next(c for c in recorder.calls if c.layer == "image_intra" and c.meta.call == "mention"))
    side = int(round((len(image["position"]) // 3 - 2) ** 0.5))
    assert image["grid_row"][:3] == [-1, -1, 0] and image["grid_col"][:4] == [-1, -1, 0, 1]
    assert (image["grid_row"][2 + side], image["grid_col"][2 + side]) == (1, 0)
    assert flatten_call(cross)["grid_row"][:3] == [-1, -1, 0]


def test_no_recorder_builds_no_metadata(model, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("metadata built without a recorder")

    monkeypatch.setattr(MMoEModel, "layout", boom)
    ids, px = inputs(model, 2)
    with torch.no_grad():
        model(ids, px, ids, px)


# ---------------------------------------------------------------------------------- batches and DME


def test_hard_negative_batches_keep_golds_distinct_and_names_together():
    rng = np.random.default_rng(0)
    golds = [g for g in range(12) for _ in range(3)]  # 12 entities, 3 mentions each
    names = [f"name{g // 4}" for g in golds]  # 3 names, 4 entities each
    batches = hard_negative_batches(golds, names, batch_size=8, per_name=4, rng=rng)
    used = [r for b in batches for r in b]
    assert len(used) == len(set(used)) and len(used) >= len(golds) - 2
    for batch in batches:
        assert len({golds[r] for r in batch}) == len(batch)
        assert max(np.unique([names[r] for r in batch], return_counts=True)[1]) >= 2  # shared names in a batch


def test_embedding_chooser_and_a_pluggable_chooser(model):
    from mmoe_core.families.mmoe.dme import EmbeddingChooser, choose_descriptions

    chooser = EmbeddingChooser(model)
    descs = ["a red circle on a white background", "Jaguar is a British rock band", "a ship on the Baltic"]
    assert chooser(descs[1], descs) == 1  # identical text is the most similar
    picked = choose_descriptions(["m1", "m2"], [descs, descs[:2]], lambda mention, cands: len(cands) - 1)
    assert picked == [2, 1]
    assert mention_text("Jaguar", "They played.", "desc") == "Jaguar [SEP] They played. [SEP] desc"


# ---------------------------------------------------------------------------------- adapter on a tiny world


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from mmoe_core.data.generate import generate_entity_world

    return generate_entity_world(tmp_path_factory.mktemp("world") / "entity", seed=0, scale="tiny", progress=False)


@pytest.fixture(scope="module")
def adapter(tiny_world, tmp_path_factory, model):
    ckpt = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(model, {**small_config(), "data": {"root": str(tiny_world)}}, ckpt)
    return load_adapter(ckpt, device="cpu")


@pytest.fixture(scope="module")
def examples(adapter, tiny_world):
    return adapter.load_examples(tiny_world, "test")[:12]


def test_adapter_declarations(adapter):
    layers = {spec.name: spec for spec in adapter.routed_layers()}
    assert set(layers) == {"text_intra", "image_intra", "cross_inter"}
    assert layers["cross_inter"].num_experts == 4 and layers["cross_inter"].top_k == 3
    assert "mention:image_cls+text_tokens" in layers["cross_inter"].calls
    assert adapter.prediction_spec().kind == "ranking"
    assert {t.name for t in adapter.attribution_targets()} == {"score", "router_logit"}
    assert adapter.slice_labels() == ["decisive", "entity_type", "has_image"]


def test_examples_carry_labels_and_candidates(examples, adapter):
    ex = examples[0]
    assert set(ex["labels"]) == {"decisive", "entity_type", "has_image"}
    assert ex["gold_index"] in ex["candidates"] and len(ex["candidates"]) >= 3
    assert ex["index"] == 0 and isinstance(ex["id"], str)


def test_run_ranks_over_the_whole_kb(adapter, examples):
    out = adapter.run(examples, record=True, batch_size=5)
    n_entities = len(adapter.kb().names)
    assert len(out.predictions) == len(examples)
    for p, ex in zip(out.predictions, examples):
        assert 1 <= p["rank"] <= n_entities and p["correct"] == (p["rank"] == 1)
        assert len(p["top_ids"]) == 5 and p["prediction_id"] == p["top_ids"][0]
        assert p["top_scores"] == sorted(p["top_scores"], reverse=True)
        assert p["index"] == ex["index"]
    assert out.representations.shape[0] == len(examples)
    mention_calls = [c for c in out.recorder.calls if c.meta.call.startswith("mention")]
    assert sorted({i for c in mention_calls for i in c.meta.example_ids}) == [ex["index"] for ex in examples]
    summary = adapter.summarize(out.predictions, examples)
    assert {"MRR", "MR", "Hits@1", "Hits@3", "Hits@5", "Hits@10", "Hits@20"} <= set(summary["overall"])
    assert set(summary["by_decisive"]) <= {"text", "image", "both"}


def test_route_records_what_run_records_on_the_examples(adapter, examples):
    """route() (dynamics, batch dependence) skips the knowledge-base matching, not the routing: the
    examples' routing table equals run()'s, cell for cell; with a knockout too."""
    from analysis.routing_table import routing_frame

    def same(a, b):
        pd.testing.assert_frame_equal(routing_frame(a), routing_frame(b))

    same(adapter.run(examples, record=True, batch_size=5).recorder, adapter.route(examples, batch_size=5))
    with adapter.knockout("text_intra", 0):
        same(adapter.run(examples, record=True, batch_size=5).recorder, adapter.route(examples, batch_size=5))
    assert all(c.meta.subject == "example" for c in adapter.route(examples[:2]).calls)


def test_kb_encodings_per_knockout_are_bounded(adapter, examples):
    """A run-wide knockout visits every (layer, expert): the adapter keeps the trained model's whole-KB
    encoding and the latest few, not one per knockout state."""
    from mmoe_core.families.mmoe.adapter import KB_CACHE_ENTRIES

    trained = adapter.knockout_state()
    adapter.entity_features()
    for layer in ("text_intra", "image_intra"):
        for expert in range(adapter.model.cfg.num_experts):
            with adapter.knockout(layer, expert):
                adapter.entity_features()
                adapter.entity_routing_calls()
    assert len(adapter._entity_cache) <= KB_CACHE_ENTRIES and len(adapter._entity_calls) <= KB_CACHE_ENTRIES
    assert trained in adapter._entity_cache


def test_knockout_changes_routing(adapter, examples):
    def chosen(out):
        return torch.cat(
            [
                c.router.topk_ids.reshape(-1)
                for c in out.recorder.calls
                if c.layer == "text_intra" and c.meta.call == "mention"
            ]
        )

    before = chosen(adapter.run(examples[:4]))
    expert = int(torch.mode(before).values)
    with adapter.knockout("text_intra", expert):
        during = chosen(adapter.run(examples[:4]))
    after = chosen(adapter.run(examples[:4]))
    assert (during != expert).all() and not torch.equal(before, during)
    assert torch.equal(before, after)


def test_kb_routing_is_recorded_once_per_knockout_state(adapter, examples, monkeypatch):
    def kb_calls(out):
        return [c for c in out.recorder.calls if c.meta.call.startswith("entity")]

    first = kb_calls(adapter.run(examples[:2]))
    assert first and {c.meta.subject for c in first} == {"kb"}
    encoded = []
    original = adapter.model.encode_entities
    monkeypatch.setattr(adapter.model, "encode_entities", lambda *a, **k: encoded.append(1) or original(*a, **k))
    again = kb_calls(adapter.run(examples[2:4]))
    assert not encoded and [id(c) for c in again] == [id(c) for c in first]  # reused, not re-run
    expert = int(first[0].router.topk_ids.reshape(-1)[0])
    with adapter.knockout(first[0].layer, expert):
        knocked = kb_calls(adapter.run(examples[:2]))
    assert encoded and all((c.router.topk_ids != expert).all() for c in knocked if c.layer == first[0].layer)


def test_attribution_inputs_and_forwards(adapter, examples):
    ex = examples[0]
    inputs_ = adapter.attribution_inputs(ex)
    text, image = inputs_["mention_text"], inputs_["mention_image"]
    assert text.shape == (1, adapter.towers.context_length, adapter.towers.text_width)
    assert image.shape == (1, adapter.towers.num_patches, adapter.towers.vision_width)
    labels = adapter.input_labels(ex)
    assert len(labels["mention_text"]) == text.shape[1] and len(labels["mention_image"]) == image.shape[1]
    score = adapter.attribution_forward(ex, "score")
    with torch.no_grad():
        value = score(text.repeat(2, 1, 1), image.repeat(2, 1, 1))
    run = adapter.run([ex], record=False).predictions[0]
    assert value.shape == (2,)
    assert float(value[0]) == pytest.approx(run["gold_score"], abs=1e-4)
    # InterMoE routing of [text CLS; image tokens] is decided by [image CLS; text tokens]: position 0 by the
    # image alone, position 2 by a text token.
    for position, moves, still in [(0, image, text), (2, text, image)]:
        logit = adapter.attribution_forward(
            ex, "router_logit", layer="cross_inter", expert=1, position=position, call="mention:text_cls+image_tokens"
        )
        text_in, image_in = text.clone().requires_grad_(True), image.clone().requires_grad_(True)
        out = logit(text_in, image_in)
        out.sum().backward()
        grads = {id(text): text_in.grad, id(image): image_in.grad}
        assert out.shape == (1,)
        assert grads[id(moves)].abs().sum() > 0 and grads[id(still)].abs().sum() == 0


def test_dme_appends_the_chosen_candidate_description(adapter, examples):
    ex = {k: v for k, v in examples[0].items() if k != "text"}
    plain = adapter.example_texts([ex])[0]
    assert plain == mention_text(ex["mention"], ex["sentence"])  # default: no description (it would leak the gold)
    seen = []

    def last_candidate(mention, candidates):
        seen.append((mention, len(candidates)))
        return len(candidates) - 1

    adapter.model.cfg.mention_desc, adapter.dme_chooser = "dme", last_candidate
    try:
        enhanced = adapter.example_texts([ex])[0]
    finally:
        adapter.model.cfg.mention_desc, adapter.dme_chooser = "none", None
    group = adapter.dataset.name_groups[ex["mention"]]
    assert enhanced == mention_text(ex["mention"], ex["sentence"], group[-1].desc)
    assert seen == [(plain, len(group))]
