"""Benchmark the KB ranking engine (mmoe_core.families.mmoe.kb_ranking) against the published chunked
evaluation.

A randomly initialised MMoE matcher at the published sizes (text input 512, 50 text tokens, 50 image
tokens = ViT CLS + 49 patches, dv = hidden = 96, 4 experts top-3, expert FFN x4) and synthetic encoder
outputs (the CLIP towers are skipped: the features are the matcher's inputs; mention = gold entity's
features + noise). Per KB size N:

* baseline: the published loop (per batch of 20 mentions, for every chunk of 6,000 entities, rerun the
  whole matcher, entity-side MoEs included), timed on ONE batch of 20 mentions;
* exact: entity side computed once (KBCache build, timed and reported apart), then mention batches
  scored against the cache; ranks compared with the baseline's;
* two-stage: global scores over the whole KB, full matcher on the top ``--candidates``.

Sampled sizes (``--sample S`` < N; default for N > 10,000): the entity side and the baseline are run on
the first S entities only and scaled by N/S (both are linear in N: every chunk costs the same), ranks are
compared on those S entities, and the exact/two-stage scoring is timed on a full-size cache of N rows
(the S computed rows tiled: scoring cost does not depend on the values). The table says which rows are
sampled.

    python benchmarks/kb_ranking.py --quick            # 10k entities, sampled on 1,000 (about a minute)
    python benchmarks/kb_ranking.py                    # 10k (full), 50k and 110k (sampled on 6,000)
    python benchmarks/kb_ranking.py --entities 50000 --sample 50000 --json
    python benchmarks/kb_ranking.py --record

Target: exact ranking >= 10x the chunked baseline (mentions per second) at 50k entities, ranks identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import fields

import torch  # noqa: E402
from _common import REPO, command_line, load_average, machine, record  # noqa: F401

from mmoe_core.families.mmoe.config import MMoEConfig  # noqa: E402
from mmoe_core.families.mmoe.features import EncodedSide, EntityFeatures, MentionFeatures  # noqa: E402
from mmoe_core.families.mmoe.kb_ranking import (  # noqa: E402
    PUBLISHED_ENTITY_CHUNK,
    PUBLISHED_MENTION_BATCH,
    KBCache,
    KBRanker,
    agreement,
    global_scores,
    mention_side,
    published_ranking,
    same_ranking,
    state_hash,
)
from mmoe_core.families.mmoe.model import MMoEMatcher  # noqa: E402

TEXT_DIM, TEXT_LEN, IMAGE_TOKENS, DV, HIDDEN, EXPERTS, TOP_K = 512, 50, 50, 96, 96, 4, 3
BLOCK = 100  # synthetic features are generated per block of rows (deterministic in the block index)
TARGET = 10.0


def build_matcher(gate: str, seed: int = 0) -> MMoEMatcher:
    torch.manual_seed(seed)
    cfg = MMoEConfig(
        image_dim=DV,
        text_hidden=HIDDEN,
        image_hidden=HIDDEN,
        cross_hidden=HIDDEN,
        num_experts=EXPERTS,
        top_k=TOP_K,
        gate=gate,
        expert_mult=4,
    )
    return MMoEMatcher(TEXT_DIM, cfg).eval()


def _block(i: int, seed: int) -> EncodedSide:
    g = torch.Generator().manual_seed(seed * 1_000_003 + i)
    return EncodedSide(
        torch.randn(BLOCK, TEXT_DIM, generator=g),
        torch.randn(BLOCK, TEXT_LEN, TEXT_DIM, generator=g),
        torch.randn(BLOCK, DV, generator=g),
        torch.randn(BLOCK, IMAGE_TOKENS, DV, generator=g),
    )


def entity_source(seed: int = 1):
    def source(a: int, b: int) -> EncodedSide:
        blocks = [_block(i, seed) for i in range(a // BLOCK, (b - 1) // BLOCK + 1)]
        cat = blocks[0] if len(blocks) == 1 else EncodedSide.cat(blocks)
        off = (a // BLOCK) * BLOCK
        return cat.rows(slice(a - off, b - off))

    return source


def mention_batches(matcher, source, n_real: int, batches: int, seed: int = 7):
    """[(raw mention features of one batch of 20, gold)]: mention = gold entity's features + noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        gold = torch.randint(0, n_real, (PUBLISHED_MENTION_BATCH,), generator=g)
        rows = EncodedSide.cat([source(int(i), int(i) + 1) for i in gold])
        noisy = EncodedSide(
            *(
                getattr(rows, f) + 0.7 * torch.randn(getattr(rows, f).shape, generator=g)
                for f in ("text_cls", "text_tokens", "image_cls", "image_tokens")
            )
        )
        out.append((noisy, gold))
    return out


def tiled(feats: EntityFeatures, n: int) -> EntityFeatures:
    reps = -(-n // len(feats))
    d = {}
    for name in (
        "text_cls",
        "text_cls_moe",
        "text_query",
        "image_cls",
        "image_cls_moe",
        "image_query",
        "cross_text_image",
        "cross_image_text",
    ):
        t = getattr(feats, name)
        d[name] = t.repeat(reps, *([1] * (t.dim() - 1)))[:n].contiguous()
    return EntityFeatures(index=torch.arange(n), **d)


def _measure(
    n: int, s: int, score_n: int, gate: str, exact_batches: int, candidates: int, budget_mb: float, agree_batches: int
) -> dict:
    matcher = build_matcher(gate)
    source = entity_source()
    chunk = PUBLISHED_ENTITY_CHUNK
    raw_batches = mention_batches(matcher, source, s, max(exact_batches, agree_batches, 1))
    ckpt = state_hash(matcher)
    print(f"[{n:,}] building the KB cache on {s:,} entities (load {load_average()}) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    cache_s = KBCache.build(matcher, source, s, checkpoint=ckpt, gate=gate, chunk_size=chunk)
    build_s = time.perf_counter() - t0
    print(f"[{n:,}] cache {build_s:.1f} s; baseline on 1 batch over {s:,} entities ...", file=sys.stderr, flush=True)
    with torch.no_grad():
        men0 = mention_side(matcher, raw_batches[0][0])
    t0 = time.perf_counter()
    with torch.no_grad():
        men0_timed = mention_side(matcher, raw_batches[0][0])
        base = published_ranking(
            matcher, source, s, [(men0_timed, raw_batches[0][1])], chunk_size=chunk, k=10, keep_scores=True
        )
    base_s = time.perf_counter() - t0
    ranker_s = KBRanker(matcher, cache_s, memory_budget_mb=budget_mb)
    check = ranker_s.rank_exact(men0, raw_batches[0][1], k=10, keep_scores=True)
    same = same_ranking(base, check)
    # agreement of two-stage with exact on the computed (non-tiled) cache, every mention batch
    all_men = MentionFeatures.cat([mention_side(matcher, r) for r, _ in raw_batches[:agree_batches]])
    all_gold = torch.cat([gd for _, gd in raw_batches[:agree_batches]])
    ex_real = ranker_s.rank_exact(all_men, all_gold, k=10)
    ts_real = ranker_s.rank_two_stage(all_men, all_gold, k=10, candidates=candidates)
    agree = agreement(ex_real, ts_real)

    cache = (
        cache_s
        if s == score_n
        else KBCache(tiled(cache_s.features, score_n), {**cache_s.key, "num_entities": score_n, "tiled_from": s})
    )
    ranker = KBRanker(matcher, cache, memory_budget_mb=budget_mb)
    print(f"[{n:,}] baseline {base_s:.1f} s; exact/two-stage on {score_n:,} ...", file=sys.stderr, flush=True)
    ex_times, ts_times = [], []
    for raw, gold in raw_batches[:exact_batches]:
        t0 = time.perf_counter()
        with torch.no_grad():
            ranker.rank_exact(mention_side(matcher, raw), gold, k=10)
        ex_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad():
            ranker.rank_two_stage(mention_side(matcher, raw), gold, k=10, candidates=candidates)
        ts_times.append(time.perf_counter() - t0)
    # scoring is linear in the KB size; the mention side (once per batch) and the two-stage's second
    # stage (a fixed number of candidates) are not scaled: time them apart
    with torch.no_grad():
        t0 = time.perf_counter()
        men = mention_side(matcher, raw_batches[0][0])
        men_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        global_scores(cache.features, men)
        stage1_s = time.perf_counter() - t0
    return {
        "build_s": build_s,
        "base_s": base_s,
        "same": same,
        "agree": agree,
        "ex_times": ex_times,
        "ts_times": ts_times,
        "men_s": men_s,
        "stage1_s": stage1_s,
        "agree_mentions": int(all_gold.numel()),
        "bytes_per_entity": sum(
            getattr(cache_s.features, f.name).element_size() * getattr(cache_s.features, f.name).numel()
            for f in fields(EntityFeatures)
        )
        / s,
    }


_MEMO: dict = {}


def bench_one(
    n: int,
    sample: int,
    gate: str,
    exact_batches: int,
    candidates: int,
    budget_mb: float,
    agree_batches: int = 2,
    score_full: bool = True,
) -> dict:
    s = min(sample, n)
    score_n = n if (score_full or s == n) else s  # entities the exact / two-stage timings run on
    key = (s, score_n, gate, exact_batches, candidates, budget_mb, agree_batches)
    if key not in _MEMO:  # sizes sampled on the same S with scoring timed on S share one measurement
        _MEMO[key] = _measure(n, s, score_n, gate, exact_batches, candidates, budget_mb, agree_batches)
    m = _MEMO[key]
    build_s, base_s, same, agree, ex_times, ts_times, men_s = (
        m[k] for k in ("build_s", "base_s", "same", "agree", "ex_times", "ts_times", "men_s")
    )
    all_gold_n, chunk = m["agree_mentions"], PUBLISHED_ENTITY_CHUNK
    scale = n / s
    base_batch_s = men_s + (base_s - men_s) * scale
    sc = n / score_n
    ex_batch = men_s + (statistics.median(ex_times) - men_s) * sc
    stage2 = max(statistics.median(ts_times) - men_s - m["stage1_s"], 0.0)
    ts_batch = men_s + m["stage1_s"] * sc + stage2
    b = PUBLISHED_MENTION_BATCH
    return {
        "entities": n,
        "sampled_on": s,
        "sampled": s < n,
        "scoring_timed_on": score_n,
        "gate": gate,
        "entity_chunk": chunk,
        "mention_batch": b,
        "memory_budget_mb": budget_mb,
        "exact_batches_timed": len(ex_times),
        "candidates": candidates,
        "cache_build_s": round(build_s * scale, 2),
        "cache_bytes": int(m["bytes_per_entity"] * n),
        "baseline_batch_s": round(base_batch_s, 3),
        "exact_batch_s": round(ex_batch, 3),
        "two_stage_batch_s": round(ts_batch, 3),
        "baseline_mentions_per_s": round(b / base_batch_s, 4),
        "exact_mentions_per_s": round(b / ex_batch, 3),
        "two_stage_mentions_per_s": round(b / ts_batch, 3),
        "speedup_exact": round(base_batch_s / ex_batch, 2),
        "speedup_two_stage": round(base_batch_s / ts_batch, 2),
        # the whole published test loop for M mentions, cache build included (M = 1,000)
        "speedup_exact_incl_cache_1000_mentions": round(
            (1000 / b) * base_batch_s / (build_s * scale + (1000 / b) * ex_batch), 2
        ),
        "identical_ranks": same["identical_ranks"],
        "max_abs_score_diff": same["max_abs_score_diff"],
        "ranks_checked_on_entities": s,
        "two_stage_vs_exact": agree,
        "two_stage_agreement_mentions": all_gold_n,
        "load_avg_end": load_average(),
    }


def markdown(results: list[dict]) -> str:
    out = [
        "| entities | gate | baseline s/batch | exact s/batch | two-stage s/batch | baseline m/s | exact m/s "
        "| speedup exact | speedup two-stage | cache build s | ranks identical (max abs diff) "
        "| two-stage top-1 agree / MRR diff | load avg end |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in results:
        tag = f" (sampled on {r['sampled_on']:,}; scoring timed on {r['scoring_timed_on']:,})" if r["sampled"] else ""
        a = r["two_stage_vs_exact"]
        out.append(
            f"| {r['entities']:,}{tag} | {r['gate']} | {r['baseline_batch_s']:.1f} | {r['exact_batch_s']:.2f} "
            f"| {r['two_stage_batch_s']:.3f} | {r['baseline_mentions_per_s']:.3f} "
            f"| {r['exact_mentions_per_s']:.2f} | **{r['speedup_exact']:.1f}x** | {r['speedup_two_stage']:.0f}x "
            f"| {r['cache_build_s']:.0f} | {'yes' if r['identical_ranks'] else 'NO'} "
            f"({r['max_abs_score_diff']:.1e}, on {r['ranks_checked_on_entities']:,}) "
            f"| {a['top1_agreement']:.3f} / {a.get('mrr_diff', float('nan')):+.4f} | {r['load_avg_end']} |"
        )
    out.append("")
    out.append(
        "Batch = 20 mentions (published). Baseline = published loop (entity side rerun per batch and "
        "chunk of 6,000) timed on ONE batch; sampled rows: baseline and cache build timed on the first "
        "S entities and scaled by N/S, ranks compared on those S; exact/two-stage scoring timed on a cache "
        "of the stated size (S rows tiled when larger than S) and scaled linearly to N (mention side not "
        "scaled). Two-stage agreement measured on the S computed entities. "
        f"Target: exact >= {TARGET:.0f}x at 50k with identical ranks."
    )
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entities", type=int, nargs="+", default=None, help="KB sizes (default 10000 50000 110000)")
    ap.add_argument(
        "--sample",
        type=int,
        default=None,
        help="entities actually run through the entity side / baseline (default: all up to 10k, "
        "else 6000; --quick 1000)",
    )
    ap.add_argument("--gate", default="topk_softmax", choices=["topk_softmax", "mmoe_reference"])
    ap.add_argument(
        "--exact-batches",
        type=int,
        default=None,
        help="mention batches timed for exact / two-stage (median; default 3; --quick 1)",
    )
    ap.add_argument("--candidates", type=int, default=100, help="two-stage: candidates per mention")
    ap.add_argument(
        "--agree-batches",
        type=int,
        default=None,
        help="mention batches for the two-stage agreement (default 2; --quick 1)",
    )
    ap.add_argument("--memory-budget-mb", type=float, default=512)
    ap.add_argument(
        "--score-full",
        action="store_true",
        help="time exact / two-stage scoring on a full-size cache (default: on the sampled entities, scaled linearly)",
    )
    ap.add_argument("--quick", action="store_true", help="10k entities sampled on 1,000, one batch")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--note", default=None)
    args = ap.parse_args(argv)
    sizes = args.entities or ([10_000] if args.quick else [10_000, 50_000, 110_000])
    batches = args.exact_batches or (1 if args.quick else 3)
    agree = args.agree_batches or (1 if args.quick else 2)
    info = machine()
    results = []
    for n in sizes:
        sample = args.sample or (1000 if args.quick else (n if n <= 10_000 else PUBLISHED_ENTITY_CHUNK))
        results.append(
            bench_one(n, sample, args.gate, batches, args.candidates, args.memory_budget_mb, agree, args.score_full)
        )
        print(markdown(results[-1:]), file=sys.stderr, flush=True)
    if args.json:
        print(
            json.dumps(
                {
                    "machine": info,
                    "target_speedup": TARGET,
                    "results": results,
                    "entities": [r["entities"] for r in results],
                    "speedup_exact": {str(r["entities"]): r["speedup_exact"] for r in results},
                    "identical_ranks": all(r["identical_ranks"] for r in results),
                },
                indent=2,
            )
        )
    else:
        print(markdown(results))
    if args.record:
        record(
            "KB ranking: exact and two-stage vs the published chunked loop",
            info,
            command_line(),
            markdown(results),
            args.note,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
