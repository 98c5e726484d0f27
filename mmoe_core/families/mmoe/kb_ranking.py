"""KB ranking engine for MMoE: entity side computed once per checkpoint, mention x entity scoring chunked.

The published evaluation (MEL-MMoE ``lightning_mmoe.py``, ``test_step``) reruns the *whole* matcher,
entity-side switch MoE included, for every batch of 20 mentions and every chunk of 6,000 entities.
Nothing on the entity side depends on the mentions, so this module splits the work:

* :class:`KBCache` holds the entity side of the whole KB (:class:`~mmoe_core.families.mmoe.features.EntityFeatures`: the
  normalised text/image CLS used by the global-to-global scores, the IntraMoE outputs at the CLS, the
  ``fc_query`` projections of the routed entity tokens, and the two gated cross-unit contexts). It is
  computed once per checkpoint, saved as safetensors next to a run's artifacts and loaded back; its
  key (a JSON dict stored in the safetensors metadata) names the checkpoint hash, the gate kind, the
  entity chunk size, the number of entities and a hash of the KB order.
* :class:`KBRanker` scores mentions against the cache in entity chunks sized from a memory budget
  (``memory_budget_mb``): *exact* mode (:meth:`KBRanker.rank_exact`) gives the ranking of the published
  loop (:func:`published_ranking`; ranks identical, scores equal to ~1e-6), *two-stage* mode
  (:meth:`KBRanker.rank_two_stage`) ranks the whole KB by the cheap global scores (the g2g CLS dot
  products plus the cross score, i.e. the overall score without the two global-to-local terms) and
  runs the full matcher on the top ``k`` candidates only (an approximation: compare with
  :func:`agreement`).

Gate ``mmoe_reference`` (batch-dependent): the published ``SwitchGate`` normalises every expert column
over the batch axis, so an entity's MoE outputs depend on the other entities of the chunk it is encoded
with. What is cached for that gate is exactly what the published loop computes: the entity side of
each chunk of ``chunk_size`` consecutive KB entities (the published ``eval_chunk_size``, 6,000), in KB
order. The cache is therefore valid only for that chunk size and that KB order; both are part of the
key (``chunk_size``, ``kb_order``) and :meth:`KBCache.check` refuses a mismatch. The mention side is
batch dependent too: encode mentions in the published batches (20) before ranking them; mention batching
does not matter for the scoring itself (scores are per pair), so the ranker may re-block mentions freely.
For ``topk_softmax`` the entity side is row-wise and the cache is valid for any chunking (the chunk size
is still recorded).

Two ways in:

* a full :class:`~mmoe_core.families.mmoe.model.MMoEModel`: :meth:`KBCache.from_model` (CLIP towers +
  matcher, ``model.encode_entities`` with the config's ``entity_chunk_size``);
* a bare :class:`~mmoe_core.families.mmoe.model.MMoEMatcher` plus encoder outputs
  (:class:`~mmoe_core.families.mmoe.features.EncodedSide`, e.g. precomputed CLIP features or the synthetic
  features of ``benchmarks/kb_ranking.py``): :meth:`KBCache.build` with an
  ``entity_source(start, stop) -> EncodedSide``, and :func:`mention_side`.

model.py keeps the entity side inside ``MMoEModel._encode_entity_chunk`` (encoder + matcher together);
:func:`entity_side` / :func:`mention_side` below rebuild the matcher half from its submodules
(``text_module.route``, ``vision_module.route``, ``cross_module.side``, ``fc_query``/``fc_key``/``fc_value``)
and :func:`score_units` mirrors ``MMoEModel._match_chunk``. The tests check both against model.py.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from mmoe_core.families.mmoe.config import MODALITIES
from mmoe_core.families.mmoe.features import EncodedSide, EntityFeatures, MentionFeatures, valid_mean
from mmoe_core.families.mmoe.model import MMoEMatcher

CACHE_FORMAT = "moescope-kbcache-v1"
PUBLISHED_ENTITY_CHUNK = 6000
PUBLISHED_MENTION_BATCH = 20

EntitySource = Callable[[int, int], EncodedSide]  # raw encoder outputs of KB rows [start, stop)


# ---------------------------------------------------------------------------------------------
# The matcher's two sides and its pairwise scores, from encoder outputs
# ---------------------------------------------------------------------------------------------


def _all_valid(enc: EncodedSide) -> Tensor:
    return torch.ones(
        enc.text_tokens.shape[0], enc.text_tokens.shape[1] + 1, dtype=torch.bool, device=enc.text_tokens.device
    )


@torch.no_grad()
def entity_side(
    matcher: MMoEMatcher, raw: EncodedSide, index: Tensor | None = None, text_valid: Tensor | None = None
) -> EntityFeatures:
    """Entity side of ONE chunk (one MoE call per routed layer, as ``MMoEModel._encode_entity_chunk``)."""
    enc = matcher.normalise(raw)
    tm, vm, cm = matcher.text_module, matcher.vision_module, matcher.cross_module
    text = tm.route(enc.text_cls, enc.text_tokens, None, None)
    image = vm.route(enc.image_cls, enc.image_tokens, None, None)
    valid = _all_valid(raw) if text_valid is None else text_valid
    cross_ti, cross_it, _ = cm.side(enc, "entity", valid, None, None)
    n = raw.text_cls.shape[0]
    index = torch.arange(n) if index is None else torch.as_tensor(index).long()
    return EntityFeatures(
        index=index.to(raw.text_cls.device),
        text_cls=enc.text_cls,
        text_cls_moe=text[:, 0],
        text_query=tm.fc_query(text[:, 1:]),
        image_cls=enc.image_cls,
        image_cls_moe=image[:, 0],
        image_query=vm.fc_query(image[:, 1:]),
        cross_text_image=cross_ti,
        cross_image_text=cross_it,
    )


@torch.no_grad()
def mention_side(matcher: MMoEMatcher, raw: EncodedSide, text_valid: Tensor | None = None) -> MentionFeatures:
    """Mention side of ONE batch (as ``MMoEModel.encode_mentions`` after the encoder)."""
    enc = matcher.normalise(raw)
    tm, vm, cm = matcher.text_module, matcher.vision_module, matcher.cross_module
    text = tm.route(enc.text_cls, enc.text_tokens, None, None)
    image = vm.route(enc.image_cls, enc.image_tokens, None, None)
    valid = _all_valid(raw) if text_valid is None else text_valid
    text_tokens, image_tokens = text[:, 1:], image[:, 1:]
    cross_ti, cross_it, cross_mean = cm.side(enc, "mention", valid, None, None)
    representation = torch.cat([valid_mean(text, valid), image.mean(dim=1), cross_mean], dim=-1)
    return MentionFeatures(
        text_cls=enc.text_cls,
        text_key=tm.fc_key(text_tokens),
        text_value=tm.fc_value(text_tokens),
        image_cls=enc.image_cls,
        image_key=vm.fc_key(image_tokens),
        image_value=vm.fc_value(image_tokens),
        cross_text_image=cross_ti,
        cross_image_text=cross_it,
        representation=representation,
    )


def score_units(
    matcher: MMoEMatcher, e: EntityFeatures, m: MentionFeatures, modalities: Sequence[str] = MODALITIES
) -> dict[str, Tensor]:
    """Unit scores [B, N] of one entity chunk (mirror of ``MMoEModel._match_chunk``)."""
    out = {}
    if "text" in modalities:
        out["text"] = matcher.text_module.match(
            e.text_cls, e.text_cls_moe, e.text_query, m.text_cls, m.text_key, m.text_value
        )
    if "image" in modalities:
        out["image"] = matcher.vision_module.match(
            e.image_cls, e.image_cls_moe, e.image_query, m.image_cls, m.image_key, m.image_value
        )
    if "cross" in modalities:
        out["cross"] = matcher.cross_module.match(
            e.cross_text_image, e.cross_image_text, m.cross_text_image, m.cross_image_text
        )
    return out


def overall_score(units: dict[str, Tensor], modalities: Sequence[str]) -> Tensor:
    """Mean of the units, summed in the order of ``MMoEModel.match`` (text, image, cross)."""
    return sum(units[u] for u in modalities) / len(modalities)


def global_scores(e: EntityFeatures, m: MentionFeatures, modalities: Sequence[str] = MODALITIES) -> Tensor:
    """Stage-1 score [B, N]: the overall score without the two global-to-local terms (g2g CLS dot
    products halved, as in the full score, plus the cross score). Costs O(B*N*D), no attention."""
    parts = []
    if "text" in modalities:
        parts.append((m.text_cls @ e.text_cls.T) / 2)
    if "image" in modalities:
        parts.append((m.image_cls @ e.image_cls.T) / 2)
    if "cross" in modalities:
        parts.append((m.cross_text_image @ e.cross_text_image.T + m.cross_image_text @ e.cross_image_text.T) / 2)
    return sum(parts) / len(modalities)


# ---------------------------------------------------------------------------------------------
# Ranks from scores (stable: ties by KB index, as ranking.py)
# ---------------------------------------------------------------------------------------------


def stable_gold_ranks(scores: Tensor, gold: Tensor) -> Tensor:
    """1 + #(score > gold score) + #(score == gold score and index < gold): equals
    ``ranking.gold_ranks`` (stable argsort of argsort) in O(N) per row."""
    gold = gold.long().to(scores.device)
    g = scores.gather(1, gold[:, None])
    idx = torch.arange(scores.shape[1], device=scores.device)
    return 1 + (scores > g).sum(1) + ((scores == g) & (idx[None] < gold[:, None])).sum(1)


def stable_top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)[:, :k]
    return order, scores.gather(1, order)


@dataclass
class RankResult:
    """Ranking of mentions over the KB: top-k entity ids (best first) and their scores; gold ranks when
    golds were given; the full overall scores when asked (``keep_scores``)."""

    top_ids: Tensor  # [M, k]
    top_scores: Tensor  # [M, k]
    gold_ranks: Tensor | None = None  # [M] 1-based
    scores: Tensor | None = None  # [M, N]
    info: dict = field(default_factory=dict)

    @staticmethod
    def cat(parts: Sequence[RankResult]) -> RankResult:
        def cat_opt(name):
            vals = [getattr(p, name) for p in parts]
            return None if any(v is None for v in vals) else torch.cat(vals)

        info = {}
        for p in parts:
            for k, v in p.info.items():
                info[k] = info.get(k, 0) + v if isinstance(v, (int, float)) else v
        return RankResult(
            torch.cat([p.top_ids for p in parts]),
            torch.cat([p.top_scores for p in parts]),
            cat_opt("gold_ranks"),
            cat_opt("scores"),
            info,
        )

    def mrr(self) -> float:
        if self.gold_ranks is None:
            raise ValueError("no gold ranks")
        return float((1.0 / self.gold_ranks.double()).mean())


def _finish(scores: Tensor, gold: Tensor | None, k: int, keep_scores: bool) -> RankResult:
    top_ids, top_scores = stable_top_k(scores, min(k, scores.shape[1]))
    ranks = stable_gold_ranks(scores, gold) if gold is not None else None
    return RankResult(top_ids, top_scores, ranks, scores if keep_scores else None)


# ---------------------------------------------------------------------------------------------
# The published loop (the baseline the exact mode must reproduce)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def published_ranking(
    matcher: MMoEMatcher,
    entity_source: EntitySource,
    num_entities: int,
    mentions: Iterable[tuple[MentionFeatures, Tensor | None]],
    *,
    chunk_size: int = PUBLISHED_ENTITY_CHUNK,
    modalities: Sequence[str] = MODALITIES,
    k: int = 10,
    keep_scores: bool = False,
    match_chunk: int = 128,
) -> RankResult:
    """The published evaluation: for every mention batch, for every chunk of ``chunk_size`` entities,
    rerun the entity side (switch MoEs included) and score the chunk. ``mentions`` yields
    (mention features of one published batch, gold indices or None). ``match_chunk`` only bounds the
    memory of the attention scores inside a chunk (as ``MMoEModel.match``); it changes no arithmetic
    that depends on other entities."""
    results = []
    for men, gold in mentions:
        units_parts: dict[str, list[Tensor]] = {u: [] for u in modalities}
        for a in range(0, num_entities, chunk_size):
            b = min(a + chunk_size, num_entities)
            ent = entity_side(matcher, entity_source(a, b), torch.arange(a, b))
            for c in range(0, b - a, match_chunk):
                u = score_units(matcher, ent.rows(slice(c, c + match_chunk)), men, modalities)
                for name in modalities:
                    units_parts[name].append(u[name])
        units = {u: torch.cat(v, dim=1) for u, v in units_parts.items()}
        results.append(_finish(overall_score(units, modalities), gold, k, keep_scores))
    return RankResult.cat(results)


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------


def state_hash(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes, bytes): a checkpoint hash for a model
    that only lives in memory. Prefer ``analysis.hashing.checkpoint_hash`` of the checkpoint folder."""
    h = hashlib.sha256(b"moescope-state-hash-v1\n")
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def kb_order_hash(keys: Sequence[str] | Sequence[int]) -> str:
    """Hash of the KB order (entity ids, or indices) - part of the cache key."""
    return hashlib.sha256("\n".join(map(str, keys)).encode()).hexdigest()[:16]


class CacheMismatch(ValueError):
    """A cache built for another checkpoint, gate, chunk size or KB order."""


@dataclass
class KBCache:
    """Entity side of a whole KB, plus the key it is valid for.

    key: ``checkpoint`` (hash), ``gate``, ``chunk_size`` (entities per MoE call when it was built),
    ``num_entities``, ``kb_order`` (hash of the KB's entity ids in order), ``modalities`` irrelevant
    (every unit is cached), ``format``."""

    features: EntityFeatures
    key: dict

    REQUIRED = ("checkpoint", "gate", "chunk_size", "num_entities", "kb_order")

    def __len__(self) -> int:
        return len(self.features)

    # -- building -------------------------------------------------------------------------------
    @staticmethod
    @torch.no_grad()
    def build(
        matcher: MMoEMatcher,
        entity_source: EntitySource,
        num_entities: int,
        *,
        checkpoint: str,
        gate: str,
        chunk_size: int = PUBLISHED_ENTITY_CHUNK,
        kb_order: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> KBCache:
        """Entity side chunk by chunk, ``chunk_size`` consecutive entities per MoE call (the published
        chunking: required for ``mmoe_reference``, harmless for ``topk_softmax``)."""
        parts = []
        for a in range(0, num_entities, chunk_size):
            b = min(a + chunk_size, num_entities)
            parts.append(entity_side(matcher, entity_source(a, b), torch.arange(a, b)))
            if progress:
                progress(b, num_entities)
        feats = parts[0] if len(parts) == 1 else EntityFeatures.cat(parts)
        key = {
            "format": CACHE_FORMAT,
            "checkpoint": checkpoint,
            "gate": gate,
            "chunk_size": int(chunk_size),
            "num_entities": int(num_entities),
            "kb_order": kb_order or kb_order_hash(range(num_entities)),
        }
        return KBCache(feats, key)

    @staticmethod
    @torch.no_grad()
    def from_model(
        model,
        ids: Tensor,
        pixels: Tensor,
        *,
        checkpoint: str | None = None,
        entity_keys: Sequence[str] | None = None,
        chunk_size: int | None = None,
    ) -> KBCache:
        """From a full MMoEModel and the KB's tokenised texts / first images (``mmoe.kb_inputs``)."""
        chunk = chunk_size or model.cfg.entity_chunk_size
        feats = model.encode_entities(ids, pixels, recorder=None, chunk_size=chunk)
        n = ids.shape[0]
        key = {
            "format": CACHE_FORMAT,
            "checkpoint": checkpoint or state_hash(model),
            "gate": model.cfg.gate,
            "chunk_size": int(chunk),
            "num_entities": int(n),
            "kb_order": kb_order_hash(entity_keys if entity_keys is not None else range(n)),
        }
        return KBCache(feats, key)

    # -- validity -------------------------------------------------------------------------------
    def check(self, **expected) -> None:
        """Raise :class:`CacheMismatch` unless every given key field equals the cache's. For the
        ``mmoe_reference`` gate a chunk size and a KB order must be given (the cache is only valid for those)."""
        if self.key.get("gate") == "mmoe_reference":
            missing = [k for k in ("chunk_size", "kb_order") if k not in expected]
            if missing:
                raise CacheMismatch(f"mmoe_reference caches depend on the entity chunking: give {missing}")
        bad = {k: (self.key.get(k), v) for k, v in expected.items() if self.key.get(k) != v}
        if bad:
            raise CacheMismatch(f"KB cache key mismatch (cached, expected): {bad}")

    # -- storage --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """safetensors file (tensors + the key as JSON metadata), written atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f.name: getattr(self.features, f.name).detach().cpu().contiguous() for f in fields(EntityFeatures)}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"kb_cache_key": json.dumps(self.key, sort_keys=True)})
        tmp.replace(path)
        return path

    @staticmethod
    def load(path: str | Path, device: str | torch.device = "cpu", **expected) -> KBCache:
        """Load a cache; ``expected`` key fields are checked (:meth:`check`)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if "kb_cache_key" not in meta:
                raise CacheMismatch(f"{path} is not a KB cache")
            key = json.loads(meta["kb_cache_key"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        cache = KBCache(EntityFeatures(**{f.name: tensors[f.name] for f in fields(EntityFeatures)}), key)
        if expected:
            cache.check(**expected)
        return cache

    @staticmethod
    def default_path(run_dir: str | Path) -> Path:
        return Path(run_dir) / "kb_cache.safetensors"


# ---------------------------------------------------------------------------------------------
# The ranker
# ---------------------------------------------------------------------------------------------


class KBRanker:
    """Scores mentions against a :class:`KBCache`.

    ``memory_budget_mb`` bounds the transient memory of one scoring step: the entity chunk is chosen so
    that the [chunk, Lq, B, Lk] attention scores (and their softmax) of the larger intra unit fit, for the
    mention block ``mention_block``. Results do not depend on the budget (the scores of a pair depend on
    that pair only)."""

    def __init__(
        self,
        matcher: MMoEMatcher,
        cache: KBCache,
        *,
        memory_budget_mb: float = 256,
        modalities: Sequence[str] = MODALITIES,
        mention_block: int = 32,
    ):
        self.matcher, self.cache = matcher, cache
        self.memory_budget_mb = memory_budget_mb
        self.modalities = tuple(modalities)
        self.mention_block = mention_block

    def entity_chunk(self, mentions: int, lk_text: int, lk_image: int) -> int:
        f = self.cache.features
        lq = max(f.text_query.shape[1], f.image_query.shape[1])
        lk = max(lk_text, lk_image)
        per_entity = 4 * (3 * lq * mentions * lk + 4 * mentions * max(f.text_query.shape[2], 1))  # bytes
        return max(1, int(self.memory_budget_mb * 2**20 // per_entity))

    @torch.no_grad()
    def scores(self, mentions: MentionFeatures) -> Tensor:
        """Exact overall scores [B, N] of every mention against every cached entity."""
        f = self.cache.features
        n = len(f)
        out = []
        for s in range(0, len(mentions), self.mention_block):
            m = mentions.rows(slice(s, s + self.mention_block))
            chunk = self.entity_chunk(len(m), m.text_key.shape[1], m.image_key.shape[1])
            row = [
                overall_score(
                    score_units(self.matcher, f.rows(slice(a, a + chunk)), m, self.modalities), self.modalities
                )
                for a in range(0, n, chunk)
            ]
            out.append(torch.cat(row, dim=1))
        return torch.cat(out)

    @torch.no_grad()
    def rank_exact(
        self,
        mentions: MentionFeatures,
        gold: Tensor | Sequence[int] | None = None,
        k: int = 10,
        keep_scores: bool = False,
    ) -> RankResult:
        """Exact ranking: the same scores as the published loop (entity side cached)."""
        gold_t = None if gold is None else torch.as_tensor(gold).long()
        return _finish(self.scores(mentions), gold_t, k, keep_scores)

    @torch.no_grad()
    def rank_two_stage(
        self, mentions: MentionFeatures, gold: Tensor | Sequence[int] | None = None, k: int = 10, candidates: int = 100
    ) -> RankResult:
        """Stage 1: :func:`global_scores` over the whole KB; stage 2: the full matcher on the top
        ``candidates`` of each mention. The final order puts the candidates first (by full score), then
        every other entity by its stage-1 score; gold ranks follow that order."""
        f = self.cache.features
        n = len(f)
        kc = min(candidates, n)
        results = []
        for s in range(0, len(mentions), self.mention_block):
            m = mentions.rows(slice(s, s + self.mention_block))
            g1 = torch.cat(
                [global_scores(f.rows(slice(a, a + 65536)), m, self.modalities) for a in range(0, n, 65536)], dim=1
            )
            cand, _ = stable_top_k(g1, kc)  # [b, kc]
            full = torch.empty(len(m), kc)
            for i in range(len(m)):
                ents = f.rows(cand[i])
                full[i] = overall_score(
                    score_units(self.matcher, ents, m.rows(slice(i, i + 1)), self.modalities), self.modalities
                )[0]
            order = torch.argsort(full, dim=1, descending=True, stable=True)
            top_ids = cand.gather(1, order)[:, :k]
            top_scores = full.gather(1, order)[:, :k]
            ranks = None
            if gold is not None:
                gb = torch.as_tensor(gold).long()[s : s + len(m)]
                ranks = torch.empty(len(m), dtype=torch.long)
                for i in range(len(m)):
                    hit = (cand[i] == gb[i]).nonzero()
                    if hit.numel():
                        j = int(hit[0, 0])
                        row = full[i]
                        ranks[i] = 1 + int((row > row[j]).sum()) + int(((row == row[j]) & (cand[i] < gb[i])).sum())
                    else:  # after every candidate, by stage-1 score among the non-candidates
                        rest = g1[i].clone()
                        rest[cand[i]] = float("-inf")
                        ranks[i] = kc + stable_gold_ranks(rest[None], gb[i : i + 1])[0]
            results.append(RankResult(top_ids, top_scores, ranks, None, {"candidates": kc}))
        out = RankResult.cat(results)
        out.info["candidates"] = kc
        return out


def agreement(exact: RankResult, approx: RankResult) -> dict:
    """Top-1 agreement, top-k overlap and MRR difference of an approximate ranking against the exact one."""
    k = min(exact.top_ids.shape[1], approx.top_ids.shape[1])
    top1 = float((exact.top_ids[:, 0] == approx.top_ids[:, 0]).double().mean())
    overlap = float(
        sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(exact.top_ids[:, :k], approx.top_ids[:, :k]))
        / (k * len(exact.top_ids))
    )
    out = {"top1_agreement": top1, f"top{k}_overlap": overlap}
    if exact.gold_ranks is not None and approx.gold_ranks is not None:
        out.update(
            {
                "mrr_exact": exact.mrr(),
                "mrr_approx": approx.mrr(),
                "mrr_diff": approx.mrr() - exact.mrr(),
                "gold_rank_equal": float((exact.gold_ranks == approx.gold_ranks).double().mean()),
            }
        )
    return out


def same_ranking(a: RankResult, b: RankResult, atol: float = 1e-5) -> dict:
    """Do two rankings agree: identical top ids and gold ranks; max |score difference| (top-k, or full
    scores when both kept)."""
    ids = bool(torch.equal(a.top_ids, b.top_ids))
    ranks = a.gold_ranks is None or b.gold_ranks is None or bool(torch.equal(a.gold_ranks, b.gold_ranks))
    if a.scores is not None and b.scores is not None:
        diff = float((a.scores - b.scores).abs().max())
    else:
        diff = float((a.top_scores - b.top_scores).abs().max())
    return {
        "identical_ranks": ids and ranks,
        "identical_top_ids": ids,
        "identical_gold_ranks": ranks,
        "max_abs_score_diff": diff,
        "scores_within_tol": diff <= atol,
    }
