"""KB ranking engine: exact mode == the published chunked loop, cache round trip, two-stage agreement."""

from __future__ import annotations

import pytest
import torch

from mmoe_core.families.mmoe.config import MMoEConfig
from mmoe_core.families.mmoe.features import EncodedSide
from mmoe_core.families.mmoe.kb_ranking import (
    CacheMismatch,
    KBCache,
    KBRanker,
    agreement,
    entity_side,
    mention_side,
    published_ranking,
    same_ranking,
    stable_gold_ranks,
    state_hash,
)
from mmoe_core.families.mmoe.model import MMoEMatcher
from mmoe_core.families.mmoe.ranking import gold_ranks

TEXT_DIM, DV, H, L = 16, 8, 8, 6  # text tokens L, image tokens L (ViT CLS + patches): InterMoE needs equal
N_ENT, N_MEN, CHUNK, MEN_BATCH = 45, 12, 8, 5


def matcher(gate: str) -> MMoEMatcher:
    torch.manual_seed(0)
    cfg = MMoEConfig(
        image_dim=DV, text_hidden=H, image_hidden=H, cross_hidden=H, num_experts=4, top_k=3, gate=gate, expert_mult=1
    )
    return MMoEMatcher(TEXT_DIM, cfg).eval()


def raw(n: int, seed: int) -> EncodedSide:
    g = torch.Generator().manual_seed(seed)
    return EncodedSide(
        torch.randn(n, TEXT_DIM, generator=g),
        torch.randn(n, L, TEXT_DIM, generator=g),
        torch.randn(n, DV, generator=g),
        torch.randn(n, L, DV, generator=g),
    )


KB = raw(N_ENT, 1)
GOLD = torch.randint(0, N_ENT, (N_MEN,), generator=torch.Generator().manual_seed(2))


def source(a: int, b: int) -> EncodedSide:
    return KB.rows(slice(a, b))


def mention_raw() -> EncodedSide:
    noise = raw(N_MEN, 3)
    base = KB.rows(GOLD)
    return EncodedSide(
        *(getattr(base, f) + 0.5 * getattr(noise, f) for f in ("text_cls", "text_tokens", "image_cls", "image_tokens"))
    )


def mention_batches(m: MMoEMatcher):
    """Mentions encoded in published batches (matters for the reference gate), with their golds."""
    r = mention_raw()
    return [
        (mention_side(m, r.rows(slice(s, s + MEN_BATCH))), GOLD[s : s + MEN_BATCH]) for s in range(0, N_MEN, MEN_BATCH)
    ]


def all_mentions(batches):
    from mmoe_core.families.mmoe.features import MentionFeatures

    return MentionFeatures.cat([b for b, _ in batches])


@pytest.mark.parametrize("gate", ["topk_softmax", "mmoe_reference"])
def test_exact_equals_published_chunked_loop(gate):
    m = matcher(gate)
    batches = mention_batches(m)
    base = published_ranking(m, source, N_ENT, batches, chunk_size=CHUNK, k=N_ENT, keep_scores=True)
    cache = KBCache.build(m, source, N_ENT, checkpoint=state_hash(m), gate=gate, chunk_size=CHUNK)
    res = KBRanker(m, cache, memory_budget_mb=0.01).rank_exact(all_mentions(batches), GOLD, k=N_ENT, keep_scores=True)
    same = same_ranking(base, res)
    assert same["identical_ranks"], same
    assert same["max_abs_score_diff"] <= 1e-5, same
    assert torch.equal(res.gold_ranks, gold_ranks(res.scores, GOLD))  # O(N) ranks == argsort of argsort


def test_reference_gate_cache_depends_on_chunking_and_key_says_so():
    m = matcher("mmoe_reference")
    a = KBCache.build(m, source, N_ENT, checkpoint="x", gate="mmoe_reference", chunk_size=CHUNK)
    b = KBCache.build(m, source, N_ENT, checkpoint="x", gate="mmoe_reference", chunk_size=CHUNK * 2)
    assert not torch.allclose(a.features.text_cls_moe, b.features.text_cls_moe)  # batch-axis normalisation
    a.check(checkpoint="x", chunk_size=CHUNK, kb_order=a.key["kb_order"])
    with pytest.raises(CacheMismatch):
        a.check(checkpoint="x", chunk_size=CHUNK * 2, kb_order=a.key["kb_order"])
    with pytest.raises(CacheMismatch):
        a.check(checkpoint="x")  # chunk size and KB order are required for this gate


def test_topk_softmax_cache_independent_of_entity_chunking():
    m = matcher("topk_softmax")
    a = KBCache.build(m, source, N_ENT, checkpoint="x", gate="topk_softmax", chunk_size=CHUNK)
    b = KBCache.build(m, source, N_ENT, checkpoint="x", gate="topk_softmax", chunk_size=N_ENT)
    assert torch.allclose(a.features.text_query, b.features.text_query, atol=1e-6)


@pytest.mark.parametrize("budget_mb", [0.0001, 0.003, 0.05, 64])
def test_memory_budget_chunking_gives_identical_results(budget_mb):
    m = matcher("topk_softmax")
    men = all_mentions(mention_batches(m))
    cache = KBCache.build(m, source, N_ENT, checkpoint="x", gate="topk_softmax", chunk_size=CHUNK)
    ref = KBRanker(m, cache, memory_budget_mb=1024).rank_exact(men, GOLD, k=N_ENT, keep_scores=True)
    ranker = KBRanker(m, cache, memory_budget_mb=budget_mb, mention_block=4)
    res = ranker.rank_exact(men, GOLD, k=N_ENT, keep_scores=True)
    same = same_ranking(ref, res)
    assert same["identical_ranks"] and same["max_abs_score_diff"] <= 1e-5, same


def test_entity_chunk_follows_budget():
    m = matcher("topk_softmax")
    cache = KBCache.build(m, source, N_ENT, checkpoint="x", gate="topk_softmax", chunk_size=CHUNK)
    small = KBRanker(m, cache, memory_budget_mb=0.001).entity_chunk(5, L, L)
    big = KBRanker(m, cache, memory_budget_mb=1.0).entity_chunk(5, L, L)
    assert 1 <= small < big


def test_cache_save_load_round_trip(tmp_path):
    m = matcher("mmoe_reference")
    cache = KBCache.build(m, source, N_ENT, checkpoint=state_hash(m), gate="mmoe_reference", chunk_size=CHUNK)
    path = cache.save(KBCache.default_path(tmp_path / "run"))
    back = KBCache.load(path, checkpoint=state_hash(m), chunk_size=CHUNK, kb_order=cache.key["kb_order"])
    assert back.key == cache.key
    for name in ("index", "text_cls", "text_query", "image_query", "cross_text_image", "cross_image_text"):
        assert torch.equal(getattr(back.features, name), getattr(cache.features, name))
    men = all_mentions(mention_batches(m))
    r1 = KBRanker(m, cache).rank_exact(men, GOLD, k=5)
    r2 = KBRanker(m, back).rank_exact(men, GOLD, k=5)
    assert torch.equal(r1.top_ids, r2.top_ids) and torch.equal(r1.gold_ranks, r2.gold_ranks)
    with pytest.raises(CacheMismatch):
        KBCache.load(path, checkpoint="another checkpoint", chunk_size=CHUNK, kb_order=cache.key["kb_order"])


def test_two_stage_agreement_reported_and_full_candidates_is_exact():
    m = matcher("topk_softmax")
    men = all_mentions(mention_batches(m))
    cache = KBCache.build(m, source, N_ENT, checkpoint="x", gate="topk_softmax", chunk_size=CHUNK)
    ranker = KBRanker(m, cache)
    exact = ranker.rank_exact(men, GOLD, k=5)
    approx = ranker.rank_two_stage(men, GOLD, k=5, candidates=10)
    agree = agreement(exact, approx)
    assert 0.0 <= agree["top1_agreement"] <= 1.0 and "mrr_diff" in agree
    full = ranker.rank_two_stage(men, GOLD, k=5, candidates=N_ENT)  # every entity a candidate: exact
    assert torch.equal(full.top_ids, exact.top_ids) and torch.equal(full.gold_ranks, exact.gold_ranks)
    assert agreement(exact, full)["top1_agreement"] == 1.0 and agreement(exact, full)["mrr_diff"] == 0.0


def test_stable_gold_ranks_ties_by_index():
    scores = torch.tensor([[0.125, 0.75, 0.5, 0.75]])
    assert stable_gold_ranks(scores, torch.tensor([3])).tolist() == [2]
    assert stable_gold_ranks(scores, torch.tensor([1])).tolist() == [1]


def test_entity_side_matches_mmoe_model():
    """entity_side / mention_side rebuilt from the matcher's submodules == MMoEModel's own sides."""
    from mmoe_core.encoders import EncoderSpec
    from mmoe_core.families.mmoe.model import build_model

    torch.manual_seed(0)
    model = build_model(
        {
            "family": "mmoe",
            "model": dict(
                encoder=EncoderSpec(name="tiny-32").to_dict(),
                image_dim=8,
                text_hidden=8,
                image_hidden=8,
                cross_hidden=8,
                expert_mult=1,
                gate="mmoe_reference",
            ),
        }
    ).eval()
    ids = model.towers.tokenize([f"entity number {i}" for i in range(7)])
    pixels = torch.randn(7, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = KBCache.from_model(model, ids, pixels, chunk_size=3)
        enc = model.encoder(ids, pixels)
        from mmoe_core.families.mmoe.features import text_valid_mask

        mine = [
            entity_side(
                model.matcher,
                enc.rows(slice(a, a + 3)),
                torch.arange(a, min(a + 3, 7)),
                text_valid_mask(ids[a : a + 3]),
            )
            for a in range(0, 7, 3)
        ]
        men_model = model.encode_mentions(ids[:4], pixels[:4])
        men_mine = mention_side(model.matcher, enc.rows(slice(0, 4)), text_valid_mask(ids[:4]))
    for name in ("text_query", "image_query", "cross_text_image", "text_cls_moe"):
        got = torch.cat([getattr(p, name) for p in mine])
        assert torch.allclose(got, getattr(cache.features, name), atol=1e-6), name
    for name in ("text_key", "image_value", "cross_image_text", "representation"):
        assert torch.allclose(getattr(men_mine, name), getattr(men_model, name), atol=1e-6), name
    with torch.no_grad():
        s_model = model.match(cache.features, men_model).overall
        s_mine = KBRanker(model.matcher, cache).scores(men_mine)
    assert torch.allclose(s_model, s_mine, atol=1e-6)
