"""MMoE: Multi-level Mixture of Experts for multimodal entity linking (Hu et al., KDD 2025).

A faithful re-implementation of the published matcher (github zhiweihu1103/MEL-MMoE,
``codes/model/modeling_mmoe.py``) on open_clip towers, split so that the entity side can be cached:

    entity_feats  = model.encode_entities(ids, pixels)            # once per KB (per chunk)
    mention_feats = model.encode_mentions(ids, pixels)            # per batch of mentions
    scores        = model.match(entity_feats, mention_feats)      # [mentions, entities]

Module and parameter names follow the published code wherever there is a counterpart, so that an
importer maps published checkpoints key-for-key (``encoder.image_cls_fc``, ``encoder.image_tokens_fc``,
``matcher.text_module.{fc_query,fc_key,fc_value,layer_norm,moe_layer}``, ``matcher.vision_module.*``,
``matcher.cross_module.{text_fc,image_fc,gate_fc,gate_layer_norm,context_layer_norm,moe_layer}``,
``matcher.{text,image}_{cls,tokens}_layernorm``; the MoE layers' own names mirror the published
``SwitchMoE``). Only the CLIP towers differ: ``encoder.towers`` is an open_clip model where the
published ``encoder.clip`` is a Hugging Face ``CLIPModel``.

Config names and their published counterparts: see :mod:`mmoe_core.families.mmoe.config`.

Routed layers and what they record (``PositionMeta.call``):

* ``text_intra`` (IntraMoE of the text unit) over [text CLS; text tokens], gate = the same sequence;
  calls ``entity`` and ``mention``.
* ``image_intra`` (IntraMoE of the vision unit) over [image CLS; ViT CLS; patches], gate = the same.
* ``cross_inter`` (InterMoE): one MoE called in both directions; [text CLS; image tokens] routed by
  [image CLS; text tokens] (calls ``<side>:text_cls+image_tokens``) and the reverse
  (``<side>:image_cls+text_tokens``). The routed and the gate sequence must have equal length, hence
  context length = 1 + patches.

Score = mean of the text, image and cross scores; training loss = CE(overall) + CE(text) + CE(image)
+ CE(cross) with in-batch negatives (row i's gold is entity row i).

With ``gate="mmoe_reference"`` every MoE call normalises its combine weights over its batch axis
(see mmoe_core/moe.py), so an entity's features depend on the chunk of entities it is encoded with
(``entity_chunk_size``, the published ``eval_chunk_size``) and a mention's on its batch: that is how
the published model behaves, and the dashboard shows it rather than hiding it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmoe_core.encoders import ClipTowers, build_towers
from mmoe_core.families.mmoe.config import LAYER_NAMES, MODALITIES, MMoEConfig
from mmoe_core.families.mmoe.features import (
    EncodedSide,
    EntityFeatures,
    MentionFeatures,
    SideLayout,
    UnitScores,
    text_valid_mask,
    valid_mean,
)
from mmoe_core.families.mmoe.hf_clip_map import build_hf_clip_towers
from mmoe_core.moe import SwitchMoE
from mmoe_core.routing_record import RoutingRecorder


class MMoEEncoder(nn.Module):
    """CLIP towers plus the published projections of the image side (image_cls_fc, image_tokens_fc)."""

    def __init__(self, towers: ClipTowers, image_dim: int):
        super().__init__()
        self.towers = towers
        self.image_cls_fc = nn.Linear(towers.embed_dim, image_dim)
        self.image_tokens_fc = nn.Linear(towers.vision_width, image_dim)

    def forward(
        self, ids: Tensor, pixels: Tensor, token_embeds: Tensor | None = None, patch_embeds: Tensor | None = None
    ) -> EncodedSide:
        text_cls, text_tokens = self.towers.encode_text(ids, token_embeds)
        image_cls, image_tokens = self.towers.encode_image(pixels, patch_embeds)
        return EncodedSide(text_cls, text_tokens, self.image_cls_fc(image_cls), self.image_tokens_fc(image_tokens))


def _moe(dim: int, out: int, cfg: MMoEConfig, name: str) -> SwitchMoE:
    return SwitchMoE(
        dim,
        out,
        cfg.num_experts,
        cfg.top_k,
        gate=cfg.gate,
        capacity_factor=cfg.capacity_factor,
        mult=cfg.expert_mult,
        dispatch=cfg.dispatch,
        name=name,
    )


class IntraUnit(nn.Module):
    """Published TextUnit / VisionUnit: IntraMoE over [CLS; tokens], token-level cross attention from the
    entity's routed tokens (queries) to the mention's routed tokens (keys, values), averaged over the
    queries and layer-normed (a local context), then

        score = (<entity CLS after the MoE, context>  +  <mention CLS, entity CLS>) / 2
                 global-to-local                          global-to-global (raw normalised CLS)
    """

    def __init__(self, in_dim: int, fc_in: int, hidden: int, cfg: MMoEConfig, name: str):
        super().__init__()
        self.hidden = hidden
        # fc_* read the MoE output (width ``hidden``); the published VisionUnit declares them with
        # in_features = dv, which only works because its config has dv == IDLU_hidden_dim.
        self.fc_query = nn.Linear(fc_in, hidden)
        self.fc_key = nn.Linear(fc_in, hidden)
        self.fc_value = nn.Linear(fc_in, hidden)
        self.layer_norm = nn.LayerNorm(hidden)
        self.moe_layer = _moe(in_dim, hidden, cfg, name)

    def route(self, cls: Tensor, tokens: Tensor, recorder, meta_fn) -> Tensor:
        x = torch.cat([cls.unsqueeze(1), tokens], dim=1)
        meta = meta_fn() if recorder is not None else None
        return self.moe_layer(x, x, recorder=recorder, meta=meta)

    def match(
        self,
        ent_cls: Tensor,
        ent_cls_moe: Tensor,
        ent_query: Tensor,
        men_cls: Tensor,
        men_key: Tensor,
        men_value: Tensor,
    ) -> Tensor:
        """[B mentions, N entities]. The mean over queries of softmax(QK^T/sqrt(H))V is computed as the
        mean attention row times V, and QK^T as one matrix product laid out [N, Lq, B, Lk] (equal in exact
        arithmetic; avoids an [N, B, Lq, H] tensor and a permuted copy of the [.., Lq, Lk] scores)."""
        n, lq, h = ent_query.shape
        b, lk, _ = men_key.shape
        scores = (ent_query / math.sqrt(self.hidden)).reshape(n * lq, h) @ men_key.reshape(b * lk, h).T
        mean_attention = scores.view(n, lq, b, lk).softmax(dim=-1).mean(dim=1)  # [N, B, Lk]
        context = torch.bmm(mean_attention.transpose(0, 1), men_value).transpose(0, 1)  # [N, B, H]
        context = self.layer_norm(context)
        global_to_local = (ent_cls_moe.unsqueeze(1) * context).sum(dim=-1).T  # [B, N]
        global_to_global = men_cls @ ent_cls.T
        return (global_to_local + global_to_global) / 2


class TextUnit(IntraUnit):
    def __init__(self, text_dim: int, cfg: MMoEConfig):
        super().__init__(text_dim, cfg.text_hidden, cfg.text_hidden, cfg, LAYER_NAMES["text"])


class VisionUnit(IntraUnit):
    def __init__(self, cfg: MMoEConfig):
        super().__init__(cfg.image_dim, cfg.image_dim, cfg.image_hidden, cfg, LAYER_NAMES["image"])


class CrossUnit(nn.Module):
    """Published CrossUnit (InterMoE): one MoE called in both directions, each time routed by the other
    modality; the routed CLS attends over the routed tokens of the other modality, and a tanh gate mixes
    the (pre-MoE) CLS back in before a layer norm.

    Reproduced asymmetries of the published arithmetic:
    * the entity side's tanh gate reads the attended *context*, the mention side's reads the *CLS*
      (``gate_fc(entity_..._context)`` vs ``gate_fc(mention_..._cls_ori)``);
    * this attention is not scaled by 1/sqrt(d), unlike the intra units' attention;
    * ``context_layer_norm`` is declared but never used (kept so that checkpoints map key-for-key);
    * the published ``.squeeze()`` would also drop a batch axis of size 1; we squeeze the query axis only.
    """

    def __init__(self, text_dim: int, cfg: MMoEConfig):
        super().__init__()
        hidden = cfg.cross_hidden
        self.text_fc = nn.Linear(text_dim, hidden)
        self.image_fc = nn.Linear(cfg.image_dim, hidden)
        self.gate_fc = nn.Linear(hidden, 1)
        self.gate_act = nn.Tanh()
        self.gate_layer_norm = nn.LayerNorm(hidden)
        self.context_layer_norm = nn.LayerNorm(hidden)  # unused, as published
        self.moe_layer = _moe(hidden, hidden, cfg, LAYER_NAMES["cross"])

    @staticmethod
    def attend(routed: Tensor) -> Tensor:
        """Routed CLS (position 0) attends over the routed tokens (positions 1..): [N, H]."""
        cls, tokens = routed[:, :1], routed[:, 1:]
        probs = (cls @ tokens.transpose(-1, -2)).softmax(dim=-1)
        return (probs @ tokens).squeeze(1)

    def side(
        self, enc: EncodedSide, role: str, text_valid: Tensor, recorder, layout: SideLayout | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(text->image context, image->text context, mean routed output over valid positions), each [N, *]."""
        text_cls, text_tokens = self.text_fc(enc.text_cls), self.text_fc(enc.text_tokens)
        image_cls, image_tokens = self.image_fc(enc.image_cls), self.image_fc(enc.image_tokens)
        text_cls_image_tokens = torch.cat([text_cls.unsqueeze(1), image_tokens], dim=1)
        image_cls_text_tokens = torch.cat([image_cls.unsqueeze(1), text_tokens], dim=1)
        record = recorder is not None and layout is not None
        routed_ti = self.moe_layer(
            text_cls_image_tokens,
            image_cls_text_tokens,
            recorder=recorder,
            meta=layout.cross_text_image() if record else None,
        )
        routed_it = self.moe_layer(
            image_cls_text_tokens,
            text_cls_image_tokens,
            recorder=recorder,
            meta=layout.cross_image_text() if record else None,
        )
        context_ti, context_it = self.attend(routed_ti), self.attend(routed_it)
        if role == "entity":
            gate_ti, gate_it = self.gate_act(self.gate_fc(context_ti)), self.gate_act(self.gate_fc(context_it))
        else:
            gate_ti, gate_it = self.gate_act(self.gate_fc(text_cls)), self.gate_act(self.gate_fc(image_cls))
        out_ti = self.gate_layer_norm(text_cls * gate_ti + context_ti)
        out_it = self.gate_layer_norm(image_cls * gate_it + context_it)
        mean_routed = (routed_ti.mean(dim=1) + valid_mean(routed_it, text_valid)) / 2
        return out_ti, out_it, mean_routed

    @staticmethod
    def match(ent_ti: Tensor, ent_it: Tensor, men_ti: Tensor, men_it: Tensor) -> Tensor:
        return (men_ti @ ent_ti.T + men_it @ ent_it.T) / 2


class MMoEMatcher(nn.Module):
    """Published MMoEMatcher: four input layer norms, then the text, vision and cross units."""

    def __init__(self, text_dim: int, cfg: MMoEConfig):
        super().__init__()
        self.text_module = TextUnit(text_dim, cfg)
        self.vision_module = VisionUnit(cfg)
        self.cross_module = CrossUnit(text_dim, cfg)
        # text_cls_layernorm has width dt but normalises the projected CLS: published dt == projection width.
        self.text_cls_layernorm = nn.LayerNorm(text_dim)
        self.text_tokens_layernorm = nn.LayerNorm(text_dim)
        self.image_cls_layernorm = nn.LayerNorm(cfg.image_dim)
        self.image_tokens_layernorm = nn.LayerNorm(cfg.image_dim)

    def normalise(self, enc: EncodedSide) -> EncodedSide:
        return EncodedSide(
            self.text_cls_layernorm(enc.text_cls),
            self.text_tokens_layernorm(enc.text_tokens),
            self.image_cls_layernorm(enc.image_cls),
            self.image_tokens_layernorm(enc.image_tokens),
        )


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def _build_towers(spec: dict) -> ClipTowers:
    """Encoder towers from a spec; kind "hf_clip" (Hugging Face CLIP weights of checkpoints imported from the
    published code by ``import_mmoe``) is built by ``hf_clip_map``."""
    if (spec.get("kind") if isinstance(spec, dict) else getattr(spec, "kind", None)) == "hf_clip":
        return build_hf_clip_towers(spec)
    return build_towers(spec)


class MMoEModel(nn.Module):
    """Encoder + matcher with an entity side, a mention side and a pairwise match."""

    def __init__(self, cfg: MMoEConfig | dict):
        super().__init__()
        cfg = MMoEConfig.from_dict(cfg) if isinstance(cfg, dict) else cfg
        self.cfg = cfg
        towers = _build_towers(cfg.encoder)
        if towers.embed_dim != towers.text_width:
            raise ValueError(
                f"MMoE concatenates the projected text CLS with the text tokens: the towers' "
                f"projection width ({towers.embed_dim}) must equal the text width ({towers.text_width})"
            )
        if towers.context_length != towers.num_patches + 1:
            raise ValueError(
                f"the InterMoE needs text length == 1 + patches; got {towers.context_length} and {towers.num_patches}"
            )
        if cfg.image_dim != cfg.image_hidden:
            raise ValueError("the published VisionUnit needs image_dim (dv) == image_hidden (IDLU_hidden_dim)")
        self.encoder = MMoEEncoder(towers, cfg.image_dim)
        self.matcher = MMoEMatcher(towers.embed_dim, cfg)

    @property
    def towers(self) -> ClipTowers:
        return self.encoder.towers

    # ---- sides ----------------------------------------------------------------------------------
    def layout(self, role: str, ids: Tensor, example_ids: Sequence[int], token_strings: bool) -> SideLayout:
        valid = text_valid_mask(ids)
        strings = None
        if token_strings:
            strings = [["[CLS]"] + row for row in self.towers.token_strings(ids.cpu())]
        grid = int(round(math.sqrt(self.towers.num_patches)))
        return SideLayout(role, [int(i) for i in example_ids], valid.cpu(), strings, self.towers.num_patches, grid)

    def _route_side(self, enc: EncodedSide, layout: SideLayout | None, recorder):
        """Intra MoEs of both modalities for one side: (routed text [N,1+L,Ht], routed image [N,2+P,Hv])."""
        m = self.matcher
        text = m.text_module.route(enc.text_cls, enc.text_tokens, recorder, lambda: layout.text_intra())
        image = m.vision_module.route(enc.image_cls, enc.image_tokens, recorder, lambda: layout.image_intra())
        return text, image

    def _want_strings(self, recorder, token_strings: bool | None) -> bool:
        if token_strings is not None:
            return token_strings
        return recorder is not None and not recorder.keep_graph

    def encode_entities(
        self,
        ids: Tensor,
        pixels: Tensor,
        entity_index: Sequence[int] | Tensor | None = None,
        recorder: RoutingRecorder | None = None,
        chunk_size: int | None = None,
        token_strings: bool | None = None,
    ) -> EntityFeatures:
        """Entity side for N entities (texts ``ids`` [N, L], one image each ``pixels`` [N, 3, S, S]),
        encoded ``chunk_size`` entities per MoE call (default: the config's ``entity_chunk_size``)."""
        n = ids.shape[0]
        index = torch.arange(n) if entity_index is None else torch.as_tensor(entity_index).long().cpu()
        chunk = chunk_size or self.cfg.entity_chunk_size
        parts = [
            self._encode_entity_chunk(
                ids[a : a + chunk],
                pixels[a : a + chunk],
                index[a : a + chunk],
                recorder,
                self._want_strings(recorder, token_strings),
            )
            for a in range(0, n, chunk)
        ]
        return parts[0] if len(parts) == 1 else EntityFeatures.cat(parts)

    def _encode_entity_chunk(self, ids, pixels, index, recorder, strings) -> EntityFeatures:
        enc = self.matcher.normalise(self.encoder(ids, pixels))
        layout = self.layout("entity", ids, index.tolist(), strings) if recorder is not None else None
        text, image = self._route_side(enc, layout, recorder)
        m = self.matcher
        cross_ti, cross_it, _ = m.cross_module.side(enc, "entity", text_valid_mask(ids), recorder, layout)
        return EntityFeatures(
            index=index.to(ids.device),
            text_cls=enc.text_cls,
            text_cls_moe=text[:, 0],
            text_query=m.text_module.fc_query(text[:, 1:]),
            image_cls=enc.image_cls,
            image_cls_moe=image[:, 0],
            image_query=m.vision_module.fc_query(image[:, 1:]),
            cross_text_image=cross_ti,
            cross_image_text=cross_it,
        )

    def encode_mentions(
        self,
        ids: Tensor,
        pixels: Tensor,
        example_ids: Sequence[int] | None = None,
        recorder: RoutingRecorder | None = None,
        token_embeds: Tensor | None = None,
        patch_embeds: Tensor | None = None,
        token_strings: bool | None = None,
    ) -> MentionFeatures:
        """Mention side for B mentions. ``token_embeds`` [B, L, W] / ``patch_embeds`` [B, P, W] replace the
        text-token embedding lookup / the patch convolution (attribution inputs)."""
        enc = self.matcher.normalise(self.encoder(ids, pixels, token_embeds, patch_embeds))
        example_ids = list(range(ids.shape[0])) if example_ids is None else example_ids
        need_layout = recorder is not None
        layout = (
            self.layout("mention", ids, example_ids, self._want_strings(recorder, token_strings))
            if need_layout
            else None
        )
        text, image = self._route_side(enc, layout, recorder)
        m = self.matcher
        text_tokens, image_tokens = text[:, 1:], image[:, 1:]  # the mention's routed CLS is unused, as published
        text_valid = text_valid_mask(ids)
        cross_ti, cross_it, cross_mean = m.cross_module.side(enc, "mention", text_valid, recorder, layout)
        representation = torch.cat([valid_mean(text, text_valid), image.mean(dim=1), cross_mean], dim=-1)
        return MentionFeatures(
            text_cls=enc.text_cls,
            text_key=m.text_module.fc_key(text_tokens),
            text_value=m.text_module.fc_value(text_tokens),
            image_cls=enc.image_cls,
            image_key=m.vision_module.fc_key(image_tokens),
            image_value=m.vision_module.fc_value(image_tokens),
            cross_text_image=cross_ti,
            cross_image_text=cross_it,
            representation=representation,
        )

    # ---- pairs ----------------------------------------------------------------------------------
    def match(
        self,
        entities: EntityFeatures,
        mentions: MentionFeatures,
        modalities: Sequence[str] = MODALITIES,
        chunk_size: int = 128,
    ) -> UnitScores:
        """Scores [B, N] of every mention against every entity; ``modalities`` picks the units averaged
        into ``overall`` (an ablation: ("text",) scores with the text unit alone). Entities are matched
        ``chunk_size`` at a time (no routing happens here, so chunks only bound the memory of the
        [chunk, L, B, L] attention scores)."""
        modalities = tuple(modalities)
        bad = set(modalities) - set(MODALITIES)
        if bad or not modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}")
        parts = [
            self._match_chunk(entities.rows(slice(a, a + chunk_size)), mentions, modalities)
            for a in range(0, len(entities), chunk_size)
        ]
        units = {u: torch.cat([p[u] for p in parts], dim=1) for u in modalities}
        overall = sum(units.values()) / len(units)
        return UnitScores(overall, units.get("text"), units.get("image"), units.get("cross"), modalities)

    def _match_chunk(self, e: EntityFeatures, m: MentionFeatures, modalities) -> dict[str, Tensor]:
        mt = self.matcher
        out = {}
        if "text" in modalities:
            out["text"] = mt.text_module.match(
                e.text_cls, e.text_cls_moe, e.text_query, m.text_cls, m.text_key, m.text_value
            )
        if "image" in modalities:
            out["image"] = mt.vision_module.match(
                e.image_cls, e.image_cls_moe, e.image_query, m.image_cls, m.image_key, m.image_value
            )
        if "cross" in modalities:
            out["cross"] = mt.cross_module.match(
                e.cross_text_image, e.cross_image_text, m.cross_text_image, m.cross_image_text
            )
        return out

    def forward(
        self,
        entity_ids: Tensor,
        entity_pixels: Tensor,
        mention_ids: Tensor,
        mention_pixels: Tensor,
        *,
        recorder: RoutingRecorder | None = None,
        entity_index: Sequence[int] | None = None,
        example_ids: Sequence[int] | None = None,
        modalities: Sequence[str] = MODALITIES,
    ) -> UnitScores:
        """Training forward (published ``matcher(...)``): the batch's entities, one chunk, against its mentions."""
        entities = self.encode_entities(
            entity_ids, entity_pixels, entity_index, recorder, chunk_size=max(1, entity_ids.shape[0])
        )
        mentions = self.encode_mentions(mention_ids, mention_pixels, example_ids, recorder)
        return self.match(entities, mentions, modalities, chunk_size=max(1, entity_ids.shape[0]))


def matching_loss(scores: UnitScores) -> dict[str, Tensor]:
    """Published loss parts: CE with in-batch negatives (mention i's gold is entity column i)."""
    labels = torch.arange(scores.overall.shape[0], device=scores.overall.device)
    parts = {"overall": F.cross_entropy(scores.overall, labels)}
    for unit in scores.modalities:
        parts[unit] = F.cross_entropy(getattr(scores, unit), labels)
    return parts


def build_model(config: dict) -> MMoEModel:
    """The family's build_model (mmoe_core.registry.Family): an MMoE model from a config.json's "model" section."""
    return MMoEModel(MMoEConfig.from_dict(config.get("model", {})))
