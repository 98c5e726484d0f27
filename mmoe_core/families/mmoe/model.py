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

Config names and the published ones (``config/*.yaml``, ``model:`` section)::

    image_dim    = dv                 text_hidden  = TGLU_hidden_dim    num_experts = num_experts
    image_hidden = IDLU_hidden_dim    cross_hidden = CMFU_hidden_dim    top_k       = top_experts
    input_hidden_dim = dt = the towers' projection width (must equal the text width, as in CLIP B/32)

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

import dataclasses
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmoe_core.adapter import ModelAdapter, RunOutput
from mmoe_core.spec import (AttributionTarget, ExampleField, GateSpec, ImageGrid, InputSpec, LabelSpec, OutputSpec,
                            PredictionSpec, RoutedLayerSpec)
from mmoe_core.encoders import ClipTowers, EncoderSpec, build_towers, token_mask
from mmoe_core.moe import SwitchMoE
from mmoe_core.ranking import gold_ranks, summarize_ranks, top_k
from mmoe_core.routing_record import PositionMeta, RoutingRecorder

FAMILY = "mmoe"
MODALITIES = ("text", "image", "cross")
LAYER_NAMES = {"text": "text_intra", "image": "image_intra", "cross": "cross_inter"}
TEXT_TO_IMAGE, IMAGE_TO_TEXT = "text_cls+image_tokens", "image_cls+text_tokens"
SEP = " [SEP] "


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

@dataclass
class MMoEConfig:
    """The ``model`` section of an MMoE checkpoint's config.json."""
    encoder: dict = field(default_factory=lambda: EncoderSpec().to_dict())
    image_dim: int = 32          # dv: image CLS and patch features after image_cls_fc / image_tokens_fc
    text_hidden: int = 32        # TGLU_hidden_dim: text IntraMoE output
    image_hidden: int = 32       # IDLU_hidden_dim: image IntraMoE output (published shapes need == image_dim)
    cross_hidden: int = 32       # CMFU_hidden_dim: InterMoE width
    num_experts: int = 4
    top_k: int = 3
    gate: str = "topk_softmax"   # "topk_softmax" | "mmoe_reference"
    capacity_factor: float = 1.0
    expert_mult: float = 4       # expert FFN inner width = mult * input width (published: 4)
    dispatch: str = "dense"      # "dense" (published) | "sparse" (same result)
    entity_chunk_size: int = 6000  # entities encoded per MoE call at eval (published eval_chunk_size)
    mention_desc: str = "none"   # what follows the sentence in a mention's text: none | dataset | dme

    @staticmethod
    def from_dict(d: dict) -> "MMoEConfig":
        known = {f.name for f in dataclasses.fields(MMoEConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MMoE model options {unknown}; known: {sorted(known)}")
        return MMoEConfig(**d)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Features passed between the sides (all tensors share the leading row axis)
# ---------------------------------------------------------------------------------------------

class _Rows:
    """Row-wise helpers for dataclasses of tensors whose first axis is the row (entity/mention)."""

    def _tensors(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def rows(self, index: slice | Tensor) -> Any:
        return type(self)(**{k: (v[index] if isinstance(v, Tensor) else v) for k, v in self._tensors().items()})

    def to(self, device) -> Any:
        return type(self)(**{k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self._tensors().items()})

    def __len__(self) -> int:
        return int(next(v for v in self._tensors().values() if isinstance(v, Tensor)).shape[0])

    @classmethod
    def cat(cls, parts: Sequence[Any]) -> Any:
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: torch.cat([getattr(p, n) for p in parts]) for n in names})


@dataclass
class EncodedSide(_Rows):
    """What the encoder gives the matcher for one side (before the matcher's layer norms)."""
    text_cls: Tensor       # [N, D]   projected pooled text embedding
    text_tokens: Tensor    # [N, L, D] final text hidden states (padding included, as published)
    image_cls: Tensor      # [N, dv]  image_cls_fc(projected pooled image embedding)
    image_tokens: Tensor   # [N, 1+P, dv] image_tokens_fc(ViT CLS + patch hidden states)


@dataclass
class EntityFeatures(_Rows):
    """Entity side, ready for :meth:`MMoEModel.match` (cacheable: it does not depend on mentions)."""
    index: Tensor             # [N] entity index in the KB
    text_cls: Tensor          # [N, D]   normalised text CLS (global-to-global score)
    text_cls_moe: Tensor      # [N, Ht]  IntraMoE output at the CLS (global side of global-to-local)
    text_query: Tensor        # [N, L, Ht] fc_query of the routed text tokens
    image_cls: Tensor         # [N, dv]
    image_cls_moe: Tensor     # [N, Hv]
    image_query: Tensor       # [N, 1+P, Hv]
    cross_text_image: Tensor  # [N, C] gated text-CLS -> image-token context
    cross_image_text: Tensor  # [N, C] gated image-CLS -> text-token context


@dataclass
class MentionFeatures(_Rows):
    """Mention side, ready for :meth:`MMoEModel.match`."""
    text_cls: Tensor          # [B, D]
    text_key: Tensor          # [B, L, Ht]
    text_value: Tensor        # [B, L, Ht]
    image_cls: Tensor         # [B, dv]
    image_key: Tensor         # [B, 1+P, Hv]
    image_value: Tensor       # [B, 1+P, Hv]
    cross_text_image: Tensor  # [B, C]
    cross_image_text: Tensor  # [B, C]
    representation: Tensor    # [B, Ht+Hv+C] mean routed MoE output of each layer (for the embedding map)


@dataclass
class UnitScores:
    """Scores [B mentions, N entities]: ``overall`` is the mean over the units in ``modalities``."""
    overall: Tensor
    text: Tensor | None = None
    image: Tensor | None = None
    cross: Tensor | None = None
    modalities: tuple[str, ...] = MODALITIES


# ---------------------------------------------------------------------------------------------
# Routing metadata (only built when a recorder is passed)
# ---------------------------------------------------------------------------------------------

@dataclass
class SideLayout:
    """Per-position description of one side's batch, used to build each call's PositionMeta."""
    role: str                              # "entity" | "mention"
    example_ids: list[int]
    text_valid: Tensor                     # [N, 1+L] bool: CLS + non-padding tokens
    text_strings: list[list[str]] | None   # [N][1+L]: "[CLS]" + token strings
    num_patches: int
    grid: int

    @property
    def subject(self) -> str:
        """Entities are knowledge-base items, not the run's examples: their ids index the KB."""
        return "kb" if self.role == "entity" else "example"

    def image_labels(self) -> list[str]:
        return ["[CLS]", "[ViT CLS]"] + [f"patch {r},{c}" for r in range(self.grid) for c in range(self.grid)]

    def text_intra(self) -> PositionMeta:
        length = self.text_valid.shape[1]
        return PositionMeta.uniform(self.role, self.example_ids, length, "text_token", "text", "text",
                                    first_kind="cls", tokens=self.text_strings, valid=self.text_valid,
                                    subject=self.subject)

    def image_intra(self) -> PositionMeta:
        labels = self.image_labels()
        kinds = ["cls", "cls"] + ["image_patch"] * self.num_patches
        n = len(labels)
        return PositionMeta(self.role, self.example_ids, kinds, ["image"] * n, ["image"] * n,
                            tokens=[labels] * len(self.example_ids) if self.text_strings is not None else None,
                            subject=self.subject)

    def cross_text_image(self) -> PositionMeta:
        """[text CLS; image tokens] routed by [image CLS; text tokens]."""
        labels = ["[text CLS]"] + self.image_labels()[1:]
        n = len(labels)
        kinds = ["cls", "cls"] + ["image_patch"] * self.num_patches
        return PositionMeta(f"{self.role}:{TEXT_TO_IMAGE}", self.example_ids, kinds, ["text"] + ["image"] * (n - 1),
                            ["image"] + ["text"] * (n - 1),
                            tokens=[labels] * len(self.example_ids) if self.text_strings is not None else None,
                            subject=self.subject)

    def cross_image_text(self) -> PositionMeta:
        """[image CLS; text tokens] routed by [text CLS; image tokens]; text padding is invalid."""
        n = self.text_valid.shape[1]
        tokens = None if self.text_strings is None else [["[image CLS]"] + row[1:] for row in self.text_strings]
        return PositionMeta(f"{self.role}:{IMAGE_TO_TEXT}", self.example_ids, ["cls"] + ["text_token"] * (n - 1),
                            ["image"] + ["text"] * (n - 1), ["text"] + ["image"] * (n - 1), tokens=tokens,
                            valid=self.text_valid, subject=self.subject)


def text_valid_mask(ids: Tensor) -> Tensor:
    """[N, 1+L] bool for [CLS; text tokens]: the CLS and every token up to EOT (the rest is padding)."""
    return torch.cat([torch.ones_like(ids[:, :1], dtype=torch.bool), token_mask(ids)], dim=1)


def _valid_mean(x: Tensor, valid: Tensor | None) -> Tensor:
    """Mean over the position axis of [N, L, H], counting only valid positions."""
    if valid is None:
        return x.mean(dim=1)
    w = valid.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


# ---------------------------------------------------------------------------------------------
# Encoder and units (published names)
# ---------------------------------------------------------------------------------------------

class MMoEEncoder(nn.Module):
    """CLIP towers plus the published projections of the image side (image_cls_fc, image_tokens_fc)."""

    def __init__(self, towers: ClipTowers, image_dim: int):
        super().__init__()
        self.towers = towers
        self.image_cls_fc = nn.Linear(towers.embed_dim, image_dim)
        self.image_tokens_fc = nn.Linear(towers.vision_width, image_dim)

    def forward(self, ids: Tensor, pixels: Tensor, token_embeds: Tensor | None = None,
                patch_embeds: Tensor | None = None) -> EncodedSide:
        text_cls, text_tokens = self.towers.encode_text(ids, token_embeds)
        image_cls, image_tokens = self.towers.encode_image(pixels, patch_embeds)
        return EncodedSide(text_cls, text_tokens, self.image_cls_fc(image_cls), self.image_tokens_fc(image_tokens))


def _moe(dim: int, out: int, cfg: MMoEConfig, name: str) -> SwitchMoE:
    return SwitchMoE(dim, out, cfg.num_experts, cfg.top_k, gate=cfg.gate, capacity_factor=cfg.capacity_factor,
                     mult=cfg.expert_mult, dispatch=cfg.dispatch, name=name)


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

    def match(self, ent_cls: Tensor, ent_cls_moe: Tensor, ent_query: Tensor,
              men_cls: Tensor, men_key: Tensor, men_value: Tensor) -> Tensor:
        """[B mentions, N entities]. The mean over queries of softmax(QK^T/sqrt(H))V is computed as the
        mean attention row times V, and QK^T as one matrix product laid out [N, Lq, B, Lk] (equal in exact
        arithmetic; avoids an [N, B, Lq, H] tensor and a permuted copy of the [.., Lq, Lk] scores)."""
        n, lq, h = ent_query.shape
        b, lk, _ = men_key.shape
        scores = ((ent_query / math.sqrt(self.hidden)).reshape(n * lq, h) @ men_key.reshape(b * lk, h).T)
        mean_attention = scores.view(n, lq, b, lk).softmax(dim=-1).mean(dim=1)         # [N, B, Lk]
        context = torch.bmm(mean_attention.transpose(0, 1), men_value).transpose(0, 1)  # [N, B, H]
        context = self.layer_norm(context)
        global_to_local = (ent_cls_moe.unsqueeze(1) * context).sum(dim=-1).T            # [B, N]
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

    def side(self, enc: EncodedSide, role: str, text_valid: Tensor, recorder, layout: SideLayout | None
             ) -> tuple[Tensor, Tensor, Tensor]:
        """(text->image context, image->text context, mean routed output over valid positions), each [N, *]."""
        text_cls, text_tokens = self.text_fc(enc.text_cls), self.text_fc(enc.text_tokens)
        image_cls, image_tokens = self.image_fc(enc.image_cls), self.image_fc(enc.image_tokens)
        text_cls_image_tokens = torch.cat([text_cls.unsqueeze(1), image_tokens], dim=1)
        image_cls_text_tokens = torch.cat([image_cls.unsqueeze(1), text_tokens], dim=1)
        record = recorder is not None and layout is not None
        routed_ti = self.moe_layer(text_cls_image_tokens, image_cls_text_tokens, recorder=recorder,
                                   meta=layout.cross_text_image() if record else None)
        routed_it = self.moe_layer(image_cls_text_tokens, text_cls_image_tokens, recorder=recorder,
                                   meta=layout.cross_image_text() if record else None)
        context_ti, context_it = self.attend(routed_ti), self.attend(routed_it)
        if role == "entity":
            gate_ti, gate_it = self.gate_act(self.gate_fc(context_ti)), self.gate_act(self.gate_fc(context_it))
        else:
            gate_ti, gate_it = self.gate_act(self.gate_fc(text_cls)), self.gate_act(self.gate_fc(image_cls))
        out_ti = self.gate_layer_norm(text_cls * gate_ti + context_ti)
        out_it = self.gate_layer_norm(image_cls * gate_it + context_it)
        mean_routed = (routed_ti.mean(dim=1) + _valid_mean(routed_it, text_valid)) / 2
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
        return EncodedSide(self.text_cls_layernorm(enc.text_cls), self.text_tokens_layernorm(enc.text_tokens),
                           self.image_cls_layernorm(enc.image_cls), self.image_tokens_layernorm(enc.image_tokens))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

def _build_towers(spec: dict) -> ClipTowers:
    """Encoder towers from a spec; kind "hf_clip" (Hugging Face CLIP weights of checkpoints imported from the
    published code by ``mmoe_core.import_mmoe``) is built by ``mmoe_core.hf_clip_map``."""
    if (spec.get("kind") if isinstance(spec, dict) else getattr(spec, "kind", None)) == "hf_clip":
        from mmoe_core.hf_clip_map import build_hf_clip_towers
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
            raise ValueError(f"MMoE concatenates the projected text CLS with the text tokens: the towers' "
                             f"projection width ({towers.embed_dim}) must equal the text width ({towers.text_width})")
        if towers.context_length != towers.num_patches + 1:
            raise ValueError(f"the InterMoE needs text length == 1 + patches; got {towers.context_length} "
                             f"and {towers.num_patches}")
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

    def encode_entities(self, ids: Tensor, pixels: Tensor, entity_index: Sequence[int] | Tensor | None = None,
                        recorder: RoutingRecorder | None = None, chunk_size: int | None = None,
                        token_strings: bool | None = None) -> EntityFeatures:
        """Entity side for N entities (texts ``ids`` [N, L], one image each ``pixels`` [N, 3, S, S]),
        encoded ``chunk_size`` entities per MoE call (default: the config's ``entity_chunk_size``)."""
        n = ids.shape[0]
        index = torch.arange(n) if entity_index is None else torch.as_tensor(entity_index).long().cpu()
        chunk = chunk_size or self.cfg.entity_chunk_size
        parts = [self._encode_entity_chunk(ids[a:a + chunk], pixels[a:a + chunk], index[a:a + chunk], recorder,
                                           self._want_strings(recorder, token_strings))
                 for a in range(0, n, chunk)]
        return parts[0] if len(parts) == 1 else EntityFeatures.cat(parts)

    def _encode_entity_chunk(self, ids, pixels, index, recorder, strings) -> EntityFeatures:
        enc = self.matcher.normalise(self.encoder(ids, pixels))
        layout = self.layout("entity", ids, index.tolist(), strings) if recorder is not None else None
        text, image = self._route_side(enc, layout, recorder)
        m = self.matcher
        cross_ti, cross_it, _ = m.cross_module.side(enc, "entity", text_valid_mask(ids), recorder, layout)
        return EntityFeatures(
            index=index.to(ids.device),
            text_cls=enc.text_cls, text_cls_moe=text[:, 0], text_query=m.text_module.fc_query(text[:, 1:]),
            image_cls=enc.image_cls, image_cls_moe=image[:, 0], image_query=m.vision_module.fc_query(image[:, 1:]),
            cross_text_image=cross_ti, cross_image_text=cross_it)

    def encode_mentions(self, ids: Tensor, pixels: Tensor, example_ids: Sequence[int] | None = None,
                        recorder: RoutingRecorder | None = None, token_embeds: Tensor | None = None,
                        patch_embeds: Tensor | None = None, token_strings: bool | None = None) -> MentionFeatures:
        """Mention side for B mentions. ``token_embeds`` [B, L, W] / ``patch_embeds`` [B, P, W] replace the
        text-token embedding lookup / the patch convolution (attribution inputs)."""
        enc = self.matcher.normalise(self.encoder(ids, pixels, token_embeds, patch_embeds))
        example_ids = list(range(ids.shape[0])) if example_ids is None else example_ids
        need_layout = recorder is not None
        layout = self.layout("mention", ids, example_ids, self._want_strings(recorder, token_strings)) \
            if need_layout else None
        text, image = self._route_side(enc, layout, recorder)
        m = self.matcher
        text_tokens, image_tokens = text[:, 1:], image[:, 1:]  # the mention's routed CLS is unused, as published
        text_valid = text_valid_mask(ids)
        cross_ti, cross_it, cross_mean = m.cross_module.side(enc, "mention", text_valid, recorder, layout)
        representation = torch.cat([_valid_mean(text, text_valid), image.mean(dim=1), cross_mean], dim=-1)
        return MentionFeatures(
            text_cls=enc.text_cls, text_key=m.text_module.fc_key(text_tokens),
            text_value=m.text_module.fc_value(text_tokens),
            image_cls=enc.image_cls, image_key=m.vision_module.fc_key(image_tokens),
            image_value=m.vision_module.fc_value(image_tokens),
            cross_text_image=cross_ti, cross_image_text=cross_it, representation=representation)

    # ---- pairs ----------------------------------------------------------------------------------
    def match(self, entities: EntityFeatures, mentions: MentionFeatures,
              modalities: Sequence[str] = MODALITIES, chunk_size: int = 128) -> UnitScores:
        """Scores [B, N] of every mention against every entity; ``modalities`` picks the units averaged
        into ``overall`` (an ablation: ("text",) scores with the text unit alone). Entities are matched
        ``chunk_size`` at a time (no routing happens here, so chunks only bound the memory of the
        [chunk, L, B, L] attention scores)."""
        modalities = tuple(modalities)
        bad = set(modalities) - set(MODALITIES)
        if bad or not modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}")
        parts = [self._match_chunk(entities.rows(slice(a, a + chunk_size)), mentions, modalities)
                 for a in range(0, len(entities), chunk_size)]
        units = {u: torch.cat([p[u] for p in parts], dim=1) for u in modalities}
        overall = sum(units.values()) / len(units)
        return UnitScores(overall, units.get("text"), units.get("image"), units.get("cross"), modalities)

    def _match_chunk(self, e: EntityFeatures, m: MentionFeatures, modalities) -> dict[str, Tensor]:
        mt = self.matcher
        out = {}
        if "text" in modalities:
            out["text"] = mt.text_module.match(e.text_cls, e.text_cls_moe, e.text_query,
                                               m.text_cls, m.text_key, m.text_value)
        if "image" in modalities:
            out["image"] = mt.vision_module.match(e.image_cls, e.image_cls_moe, e.image_query,
                                                  m.image_cls, m.image_key, m.image_value)
        if "cross" in modalities:
            out["cross"] = mt.cross_module.match(e.cross_text_image, e.cross_image_text,
                                                 m.cross_text_image, m.cross_image_text)
        return out

    def forward(self, entity_ids: Tensor, entity_pixels: Tensor, mention_ids: Tensor, mention_pixels: Tensor, *,
                recorder: RoutingRecorder | None = None, entity_index: Sequence[int] | None = None,
                example_ids: Sequence[int] | None = None, modalities: Sequence[str] = MODALITIES) -> UnitScores:
        """Training forward (published ``matcher(...)``): the batch's entities, one chunk, against its mentions."""
        entities = self.encode_entities(entity_ids, entity_pixels, entity_index, recorder,
                                        chunk_size=max(1, entity_ids.shape[0]))
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
    """Family factory for :func:`mmoe_core.adapter.register_family`: reads config['model']."""
    return MMoEModel(MMoEConfig.from_dict(config.get("model", {})))


# ---------------------------------------------------------------------------------------------
# Inputs: texts and images of entities and mentions
# ---------------------------------------------------------------------------------------------

def entity_text(name: str, desc: str) -> str:
    """Published entity input: ``entity_name [SEP] desc``."""
    return f"{name}{SEP}{desc}"


def mention_text(mention: str, sentence: str, desc: str | None = None) -> str:
    """Published mention input ``mention [SEP] sentence [SEP] desc``; the desc part only when given.

    In the published release the mention 'desc' is an extra description (DME's choice); in the demo
    world it is the *gold* entity's description (it gives the answer away), so by default it is left out
    (``mention_desc="none"``); ``"dataset"`` reads it as published, ``"dme"`` appends DME's choice.
    """
    text = f"{mention}{SEP}{sentence}"
    return f"{text}{SEP}{desc}" if desc else text


def _open_image(path):
    try:
        from mmoe_core.data.readers import load_image
    except ImportError:  # data layer not importable: plain PIL
        from PIL import Image

        def load_image(p):
            return Image.open(p).convert("RGB")
    return load_image(path)


def pixels_for(towers: ClipTowers, images: Sequence) -> Tensor:
    """Preprocess images (PIL, a path, or None for 'no image' -> zeros, as published)."""
    loaded = [(_open_image(img) if isinstance(img, (str, Path)) else img) for img in images]
    return towers.preprocess(loaded)


@dataclass
class KBInputs:
    """Tokenised texts and preprocessed images of every KB entity (row = entity index)."""
    ids: Tensor                   # [N, L]
    first_pixels: Tensor          # [N, 3, S, S] the first image (eval, as published), zeros if none
    all_pixels: Tensor            # [M, 3, S, S] every image of every entity (training only; else empty)
    image_rows: list[list[int]]   # rows of all_pixels per entity (empty: no image)
    names: list[str]
    qids: list[str]


def kb_inputs(towers: ClipTowers, entities: Sequence, all_images: bool = False) -> KBInputs:
    """Entities sorted by index, each image loaded once; ``all_images`` keeps every image (training
    picks one at random), else only the first one (evaluation, as published)."""
    entities = sorted(entities, key=lambda e: e.index)
    if [e.index for e in entities] != list(range(len(entities))):
        raise ValueError("entity indices must be 0..N-1")
    ids = towers.tokenize([entity_text(e.name, e.desc) for e in entities])
    zero = torch.zeros(1, 3, towers.image_size, towers.image_size)
    if not all_images:
        first = pixels_for(towers, [e.images[0] if e.images else None for e in entities])
        return KBInputs(ids, first, zero[:0], [[] for _ in entities], [e.name for e in entities],
                        [e.id for e in entities])
    paths, rows = [], []
    for e in entities:
        rows.append(list(range(len(paths), len(paths) + len(e.images))))
        paths.extend(e.images)
    all_pixels = pixels_for(towers, paths)
    first = torch.cat([all_pixels[r[0]:r[0] + 1] if r else zero for r in rows]) if rows else zero[:0]
    return KBInputs(ids, first, all_pixels, rows, [e.name for e in entities], [e.id for e in entities])


# ---------------------------------------------------------------------------------------------
# Examples (the adapter's vocabulary) from an entity dataset
# ---------------------------------------------------------------------------------------------

def _entity_type(dataset, mention) -> str:
    gt = (dataset.ground_truth or {}).get("mentions", {}).get(mention.id, {}) if dataset.ground_truth else {}
    return str(mention.meta.get("entity_type") or gt.get("entity_type") or "unknown")


def examples_from_dataset(dataset, split: str) -> list[dict]:
    """Adapter examples of one split. ``text`` is left to the adapter (it may add a DME description)."""
    examples = []
    for i, m in enumerate(dataset.splits[split]):
        group = dataset.name_groups.get(m.mention) or dataset.name_groups.get(m.entity_name) or []  # shares its name
        examples.append({
            "index": i, "id": m.id, "split": split,
            "labels": {"decisive": m.decisive or "unknown", "entity_type": _entity_type(dataset, m),
                       "has_image": "yes" if m.image is not None else "no"},
            "mention": m.mention, "sentence": m.sentence, "dataset_desc": m.desc,
            "image_path": str(m.image) if m.image is not None else None,
            "gold_index": int(m.answer_index), "gold_qid": m.answer_qid, "gold_name": m.entity_name,
            "candidates": [e.index for e in group],
        })
    return examples


def read_dataset(data_dir: Path, splits: Sequence[str] = ("train", "dev", "test")):
    from mmoe_core.data.readers import read_entity_dataset
    return read_entity_dataset(Path(data_dir), splits=tuple(splits))


# ---------------------------------------------------------------------------------------------
# Adapter
# ---------------------------------------------------------------------------------------------

class MMoEAdapter(ModelAdapter):
    """MMoE for the dashboard: ranks each mention against the whole KB.

    The KB comes from :meth:`load_examples` (or :meth:`set_dataset`; else the checkpoint's training
    data folder). ``modalities`` is an eval-time ablation: ("text",) scores with the text unit only.
    """

    family = FAMILY

    def __init__(self, model: MMoEModel, config: dict, device="cpu"):
        super().__init__(model, config, device)
        self.model: MMoEModel
        self.modalities: tuple[str, ...] = MODALITIES
        self.dataset = None
        self._kb: KBInputs | None = None
        self._entity_cache: dict[tuple, EntityFeatures] = {}
        self._entity_calls: dict[tuple, list] = {}
        self.dme_chooser = None  # optional chooser(mention_text, candidate_descs) -> index (e.g. an LLM)

    @property
    def towers(self) -> ClipTowers:
        return self.model.towers

    # ---- declarations ----------------------------------------------------------------------------
    title = "MMoE: multimodal entity linking"

    def fields(self) -> list[ExampleField]:
        return [ExampleField("sentence", "Mention sentence", "text", editable=True, role="title", max_chars=300),
                ExampleField("mention", "Mention", "text"),
                ExampleField("image", "Mention picture", "image", editable=True),
                ExampleField("gold_name", "Gold entity", "text", role="gold"),
                ExampleField("gold_qid", "Gold entity id", "id")]

    def _gate(self) -> GateSpec:
        cfg = self.model.cfg
        if cfg.gate == "mmoe_reference":
            return GateSpec("mmoe_reference", "softmax", "batch_column", batch_dependent=True,
                            capacity=cfg.capacity_factor,
                            note="published SwitchGate: top-k mask scattered along the sequence axis, columns "
                                 "normalised over the batch and multiplied by int(capacity x batch size); only "
                                 f"positions 0..{cfg.num_experts - 1} and expert columns 0..{cfg.top_k - 1} "
                                 "can get weight")
        return GateSpec("topk_softmax", "softmax", "topk_renormalised")

    def input_spec(self) -> list[InputSpec]:
        side = int(round(math.sqrt(self.towers.num_patches)))
        return [InputSpec("mention_text", "text_tokens", "mention [SEP] sentence (token embeddings)", field="sentence"),
                InputSpec("mention_image", "image_patches", "mention picture (patch embeddings)", field="image",
                          grid=ImageGrid(side, side, 0))]

    def routed_layers(self) -> list[RoutedLayerSpec]:
        cfg = self.model.cfg
        e, k, g = cfg.num_experts, cfg.top_k, self._gate()
        return [
            RoutedLayerSpec("text_intra", e, k, g, "[text CLS; text tokens]", "the same sequence",
                            ("entity", "mention")),
            RoutedLayerSpec("image_intra", e, k, g, "[image CLS; ViT CLS; patches]", "the same sequence",
                            ("entity", "mention")),
            RoutedLayerSpec("cross_inter", e, k, g,
                            "[text CLS; image tokens] and [image CLS; text tokens]",
                            "the other modality: [image CLS; text tokens] and [text CLS; image tokens]",
                            tuple(f"{s}:{d}" for s in ("entity", "mention") for d in (TEXT_TO_IMAGE, IMAGE_TO_TEXT))),
        ]

    def prediction_spec(self) -> PredictionSpec:
        return PredictionSpec("ranking", "rank of the gold entity among all KB entities (1 = best)",
                              headline=("hits@1", "mrr", "hits@5", "mr"), item="entity")

    def attribution_targets(self) -> list[AttributionTarget]:
        return [AttributionTarget("score", "matching score of the gold entity (the predicted one when there is "
                                           "no gold; example['target_entity'] overrides)"),
                AttributionTarget("router_logit", "router logit of (layer, expert, position) on the mention side",
                                  needs_layer=True)]

    def output_spec(self) -> list[OutputSpec]:
        return [OutputSpec("unit_scores", "named_scores",
                           "text, image and cross unit scores of the top-1 entity per example")]

    def label_spec(self) -> list[LabelSpec]:
        return [LabelSpec("decisive", "which modality decides the mention (generated with the world)",
                          ground_truth=True,
                          decides={"text": ("mention_text",), "image": ("mention_image",)}),
                LabelSpec("entity_type", "type of the gold entity", ground_truth=True),
                LabelSpec("has_image", "whether the mention has a picture")]

    def model_card(self) -> dict[str, str]:
        cfg = self.model.cfg
        return {"encoder": str(cfg.encoder.get("name", cfg.encoder.get("kind", ""))),
                "experts": f"{cfg.num_experts} per layer, top-{cfg.top_k}", "gate": cfg.gate,
                "mention text": cfg.mention_desc, "dispatch": cfg.dispatch}

    def notes(self) -> list[str]:
        if self.model.cfg.gate != "mmoe_reference":
            return []
        return ["This run uses the published MEL-MMoE `SwitchGate` (`gate=\"mmoe_reference\"`): it normalises "
                "each expert column over the batch and scatters its top-k mask along the sequence axis, so most "
                "positions get no expert weight and one example's routing depends on its batch."]

    # ---- data ------------------------------------------------------------------------------------
    def set_dataset(self, dataset) -> None:
        if dataset is not self.dataset:
            self.dataset = dataset
            self._kb = None
            self._entity_cache.clear()
            self._entity_calls.clear()

    def load_examples(self, data_dir: Path, split: str = "test") -> list[dict]:
        self.set_dataset(read_dataset(data_dir, splits=(split,)))
        return examples_from_dataset(self.dataset, split)

    def _ensure_dataset(self):
        if self.dataset is None:
            root = self.config.get("data", {}).get("root")
            if not root or not Path(root).exists():
                raise RuntimeError("no knowledge base: call load_examples(data_dir) or set_dataset(dataset) first")
            self.set_dataset(read_dataset(Path(root), splits=()))
        return self.dataset

    def kb(self) -> KBInputs:
        if self._kb is None:
            self._kb = kb_inputs(self.towers, self._ensure_dataset().entities)
        return self._kb

    def _knockout_key(self) -> tuple:
        return self.knockout_state()

    def entity_features(self) -> EntityFeatures:
        """Entity side of the whole KB, computed once per (KB, knockout state)."""
        key = self._knockout_key()
        if key not in self._entity_cache:
            kb = self.kb()
            with torch.no_grad():
                self._entity_cache[key] = self.model.encode_entities(
                    kb.ids.to(self.device), kb.first_pixels.to(self.device), recorder=None)
        return self._entity_cache[key]

    def entity_routing_calls(self) -> list:
        """The KB side's routing records, recorded once per (KB, knockout state) on first request.

        Kept apart from :meth:`entity_features` because most callers never ask for them (they grow with
        the KB); a live example that records its routing then costs one mention forward, not a KB's.
        """
        key = self._knockout_key()
        if key not in self._entity_calls:
            kb, recorder = self.kb(), RoutingRecorder()
            with torch.no_grad():
                features = self.model.encode_entities(kb.ids.to(self.device), kb.first_pixels.to(self.device),
                                                      recorder=recorder)
            self._entity_cache.setdefault(key, features)
            self._entity_calls[key] = list(recorder.calls)
        return self._entity_calls[key]

    def example_texts(self, examples: Sequence[dict]) -> list[str]:
        """What the model reads for each example (``text`` when given, else built per ``mention_desc``)."""
        mode = self.model.cfg.mention_desc
        todo = [i for i, ex in enumerate(examples) if not ex.get("text")]
        descs: dict[int, str | None] = {i: None for i in todo}
        if mode == "dataset":
            descs = {i: examples[i].get("dataset_desc") for i in todo}
        elif mode == "dme" and todo:
            from mmoe_core.dme import choose_for_examples
            descs = dict(zip(todo, choose_for_examples(self, [examples[i] for i in todo], self.dme_chooser)))
        return [ex.get("text") or mention_text(ex["mention"], ex["sentence"], descs[i]) for i, ex in enumerate(examples)]

    def _inputs(self, examples: Sequence[dict], texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        ids = self.towers.tokenize(texts)
        images = [ex.get("image") if ex.get("image") is not None else ex.get("image_path") for ex in examples]
        return ids.to(self.device), pixels_for(self.towers, images).to(self.device)

    # ---- running ---------------------------------------------------------------------------------
    def run(self, examples: Sequence[dict], record: bool = True, batch_size: int = 32,
            progress: bool = False) -> RunOutput:
        from tqdm import tqdm
        recorder = RoutingRecorder() if record else None
        kb = self.kb()
        if recorder is not None:
            recorder.calls.extend(self.entity_routing_calls())
        entities = self.entity_features()
        texts = self.example_texts(examples)
        predictions, reps = [], []
        bar = tqdm(total=len(examples), desc="mmoe run", unit="ex", disable=not progress, file=sys.stderr)
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = examples[start:start + batch_size]
                ids, pixels = self._inputs(batch, texts[start:start + batch_size])
                mentions = self.model.encode_mentions(ids, pixels, [ex["index"] for ex in batch], recorder)
                scores = self.model.match(entities, mentions, self.modalities)
                predictions += self._predictions(batch, scores, kb)
                reps.append(mentions.representation.float().cpu())
                bar.update(len(batch))
        bar.close()
        representations = torch.cat(reps) if reps else None
        return RunOutput(predictions, recorder, {"modalities": list(self.modalities)}, representations)

    def _predictions(self, batch: Sequence[dict], scores: UnitScores, kb: KBInputs) -> list[dict]:
        overall = scores.overall.float()
        top_ids, top_scores = top_k(overall, min(5, overall.shape[1]))
        golds = [ex.get("gold_index") for ex in batch]
        has_gold = [g is not None for g in golds]
        ranks = gold_ranks(overall, [g if g is not None else 0 for g in golds]).cpu().tolist()
        out = []
        for row, ex in enumerate(batch):
            pred = int(top_ids[row, 0])
            gold = golds[row]
            units = {u: float(getattr(scores, u)[row, pred]) for u in scores.modalities}
            top = [int(i) for i in top_ids[row]]
            out.append({
                "index": ex["index"], "id": ex.get("id", str(ex["index"])),
                "prediction": kb.names[pred], "prediction_id": pred, "prediction_qid": kb.qids[pred],
                "score": float(top_scores[row, 0]),
                "gold": kb.names[gold] if has_gold[row] else None, "gold_id": gold,
                "gold_score": float(overall[row, gold]) if has_gold[row] else None,
                "rank": int(ranks[row]) if has_gold[row] else None,
                "correct": (int(ranks[row]) == 1) if has_gold[row] else None,
                "top_ids": top, "top_names": [kb.names[i] for i in top], "top_qids": [kb.qids[i] for i in top],
                "top_scores": [float(s) for s in top_scores[row]],
                "unit_scores": units,
            })
        return out

    def summarize(self, predictions: Sequence[dict], examples: Sequence[dict]) -> dict:
        by_index = {ex["index"]: ex for ex in examples}
        ranked = [p for p in predictions if p.get("rank") is not None]
        ranks = [p["rank"] for p in ranked]
        slices = {label: [by_index[p["index"]].get("labels", {}).get(label, "unknown") for p in ranked]
                  for label in ("decisive", "has_image")}
        summary = summarize_ranks(ranks, slices)
        summary["modalities"] = list(self.modalities)
        summary["num_entities"] = len(self.kb().names) if self.dataset is not None else None
        return summary

    # ---- attribution -----------------------------------------------------------------------------
    def _example_inputs(self, example: dict) -> tuple[Tensor, Tensor]:
        return self._inputs([example], self.example_texts([example]))

    def attribution_inputs(self, example: dict) -> dict[str, Tensor]:
        ids, pixels = self._example_inputs(example)
        with torch.no_grad():
            return {"mention_text": self.towers.embed_text_tokens(ids),
                    "mention_image": self.towers.embed_image_patches(pixels)}

    def input_labels(self, example: dict) -> dict[str, list[str]]:
        ids, _ = self._example_inputs(example)
        grid = int(round(math.sqrt(self.towers.num_patches)))
        return {"mention_text": self.towers.token_strings(ids.cpu())[0],
                "mention_image": [f"patch {r},{c}" for r in range(grid) for c in range(grid)]}

    def target_entity(self, example: dict) -> int:
        """The entity whose score is attributed: example['target_entity'], else the gold, else the top-1."""
        for key in ("target_entity", "gold_index"):
            if example.get(key) is not None:
                return int(example[key])
        return int(self.run([example], record=False).predictions[0]["prediction_id"])

    def attribution_forward(self, example: dict, target: str, layer: str | None = None,
                            expert: int | None = None, position: int | None = None,
                            call: str | None = None) -> Callable[..., Tensor]:
        ids, pixels = self._example_inputs(example)
        model = self.model
        if target == "score":
            entity = self.entity_features().rows(slice(t := self.target_entity(example), t + 1))
            modalities = self.modalities

            def one(text_emb: Tensor, patch_emb: Tensor) -> Tensor:
                n = text_emb.shape[0]
                men = model.encode_mentions(ids.expand(n, -1), pixels.expand(n, -1, -1, -1),
                                            token_embeds=text_emb, patch_embeds=patch_emb)
                return model.match(entity, men, modalities).overall[:, 0]
        elif target == "router_logit":
            if layer is None or expert is None or position is None:
                raise ValueError("router_logit needs layer, expert and position")
            call = call or "mention"
            if not call.startswith("mention"):
                raise ValueError("attribution inputs are the mention's: pick a mention-side call")

            def one(text_emb: Tensor, patch_emb: Tensor) -> Tensor:
                n = text_emb.shape[0]
                rec = RoutingRecorder(keep_graph=True)
                model.encode_mentions(ids.expand(n, -1), pixels.expand(n, -1, -1, -1), recorder=rec,
                                      token_embeds=text_emb, patch_embeds=patch_emb)
                hits = [c for c in rec.calls if c.layer == layer and c.meta is not None and c.meta.call == call]
                if not hits:
                    raise KeyError(f"no call {call!r} of layer {layer!r}")
                return hits[0].router.logits[:, position, expert]
        else:
            raise ValueError(f"unknown attribution target {target!r}")

        if model.cfg.gate != "mmoe_reference":
            return one

        def row_by_row(text_emb: Tensor, patch_emb: Tensor) -> Tensor:
            # The reference gate normalises over the batch: evaluate each row alone so that the
            # attribution of one input never depends on the other rows (e.g. IG's interpolation steps).
            return torch.cat([one(text_emb[i:i + 1], patch_emb[i:i + 1]) for i in range(text_emb.shape[0])])
        return row_by_row




# ---------------------------------------------------------------------------------------------
# Training: the MMoE family trainer (plugs into mmoe_core.training)
# ---------------------------------------------------------------------------------------------

def hard_negative_batches(golds: Sequence[int], names: Sequence[str], batch_size: int, per_name: int,
                          rng: np.random.Generator) -> list[list[int]]:
    """Batches of mention rows in which every gold entity is distinct and entities sharing a name come
    together (up to ``per_name`` of one name per visit): in-batch negatives that are hard. Each mention
    is used at most once per epoch; a last batch smaller than 2 is dropped (it has no negative)."""
    queues: dict[int, list[int]] = {}
    for row in rng.permutation(len(golds)):
        queues.setdefault(int(golds[row]), []).append(int(row))
    by_name: dict[str, list[int]] = {}
    for entity in sorted(queues):
        by_name.setdefault(names[queues[entity][0]], []).append(entity)
    batches: list[list[int]] = []
    current: list[int] = []
    in_batch: set[int] = set()

    def flush() -> None:
        nonlocal current, in_batch
        if len(current) >= 2:
            batches.append(current)
        current, in_batch = [], set()

    while queues:
        added = 0
        name_order = sorted(n for n, es in by_name.items() if any(e in queues for e in es))
        for name_i in rng.permutation(len(name_order)):
            live = [e for e in by_name[name_order[name_i]] if e in queues and e not in in_batch]
            for j in rng.permutation(len(live))[:per_name]:
                entity = live[j]
                current.append(queues[entity].pop())
                in_batch.add(entity)
                added += 1
                if not queues[entity]:
                    del queues[entity]
                if len(current) == batch_size:
                    flush()
                    break
        if not added:  # only entities already in this batch are left: close it
            flush()
    flush()
    return batches


class MMoETrainer:
    """The MMoE :class:`mmoe_core.training.FamilyTrainer`.

    Family options (``TrainOptions.family_options``; CLI ``--opt key=value``): any :class:`MMoEConfig`
    field (``encoder`` as a tiny config name or a dict, ``text_hidden`` ...) plus ``per_name`` (hard
    negatives: entities of one name per batch, default 4).
    """

    family = FAMILY

    def __init__(self, options):
        self.options = options
        fam = dict(options.family_options or {})
        self.per_name = int(fam.pop("per_name", 4))
        encoder = fam.pop("encoder", None)
        cfg = MMoEConfig.from_dict(fam)
        if isinstance(encoder, str):
            cfg.encoder = EncoderSpec(name=encoder).to_dict()
        elif isinstance(encoder, dict):
            cfg.encoder = EncoderSpec.from_dict(encoder).to_dict()
        cfg.gate, cfg.num_experts, cfg.top_k = options.gate, options.experts, options.top_k
        if options.dme:
            cfg.mention_desc = "dme"
        self.cfg = cfg
        self.dataset = read_dataset(Path(options.data_dir), splits=("train",))
        self.train_mentions = list(self.dataset.splits["train"])
        self.golds = [int(m.answer_index) for m in self.train_mentions]
        self.names = [m.mention for m in self.train_mentions]
        self.device = torch.device("cpu")
        self.dme_descs: list[str | None] = [None] * len(self.train_mentions)

    # -- protocol ----------------------------------------------------------------------------------
    def model_config(self) -> dict:
        return self.cfg.to_dict()

    def data_config(self) -> dict:
        return {"root": str(Path(self.options.data_dir).resolve()), "name": self.dataset.name,
                "train_mentions": len(self.train_mentions), "entities": len(self.dataset.entities)}

    def build_model(self, config: dict) -> MMoEModel:
        return build_model(config)

    def setup(self, model: MMoEModel, device: torch.device) -> None:
        """Tokenise and load every training input once (steps then only index tensors)."""
        self.device = device
        towers = model.towers
        self.kb = kb_inputs(towers, self.dataset.entities, all_images=True)
        self.mention_pixels = pixels_for(towers, [m.image for m in self.train_mentions])
        if self.cfg.mention_desc == "dme":
            self.refresh_dme(model)
        self._tokenise_mentions(towers)

    def _tokenise_mentions(self, towers: ClipTowers) -> None:
        mode = self.cfg.mention_desc
        descs = self.dme_descs if mode == "dme" else [m.desc if mode == "dataset" else None
                                                       for m in self.train_mentions]
        self.mention_ids = towers.tokenize([mention_text(m.mention, m.sentence, d)
                                            for m, d in zip(self.train_mentions, descs)])

    def refresh_dme(self, model: MMoEModel) -> None:
        from mmoe_core.dme import EmbeddingChooser, choose_descriptions
        groups = [self.dataset.name_groups.get(m.mention, []) for m in self.train_mentions]
        cand_texts = [[entity_text(e.name, e.desc) for e in group] for group in groups]
        texts = [mention_text(m.mention, m.sentence) for m in self.train_mentions]
        choice = choose_descriptions(texts, cand_texts, EmbeddingChooser(model, self.device))
        self.dme_descs = [group[i].desc if i is not None else None for group, i in zip(groups, choice)]

    def steps_per_epoch(self) -> int:
        rng = np.random.default_rng(0)
        return len(hard_negative_batches(self.golds, self.names, self.options.batch_size, self.per_name, rng))

    def train_batches(self, rng: np.random.Generator, epoch: int) -> Iterable[dict]:
        for rows in hard_negative_batches(self.golds, self.names, self.options.batch_size, self.per_name, rng):
            rows_t = torch.tensor(rows)
            golds = [self.golds[r] for r in rows]
            # Training picks one entity image at random, evaluation the first one (as published).
            picks = [(self.kb.image_rows[g][int(rng.integers(len(self.kb.image_rows[g])))]
                      if self.kb.image_rows[g] else -1) for g in golds]
            zero = self.kb.first_pixels[:1].new_zeros(1, *self.kb.first_pixels.shape[1:])
            ent_pixels = torch.cat([self.kb.all_pixels[p:p + 1] if p >= 0 else zero for p in picks])
            yield {"mention_ids": self.mention_ids[rows_t], "mention_pixels": self.mention_pixels[rows_t],
                   "entity_ids": self.kb.ids[torch.tensor(golds)], "entity_pixels": ent_pixels,
                   "entity_index": golds, "example_ids": rows}

    def loss_parts(self, model: MMoEModel, batch: dict, recorder: RoutingRecorder | None) -> dict[str, Tensor]:
        scores = model(batch["entity_ids"], batch["entity_pixels"], batch["mention_ids"], batch["mention_pixels"],
                       recorder=recorder, entity_index=batch["entity_index"], example_ids=batch["example_ids"])
        return matching_loss(scores)

    def trainable_parameters(self, model: nn.Module, options) -> Iterable[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def on_epoch_end(self, model: MMoEModel, epoch: int, step: int) -> None:
        if self.cfg.mention_desc == "dme":  # DME reads the model's own text embeddings: refresh them
            self.refresh_dme(model)
            self._tokenise_mentions(model.towers)


