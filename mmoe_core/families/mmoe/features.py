"""Tensors passed between the MMoE sides, and the routing metadata of each side's positions.

All dataclasses here share the leading row axis (entity or mention); :class:`SideLayout` describes one
side's batch position by position so that each MoE call can be recorded with its PositionMeta.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mmoe_core.encoders import token_mask
from mmoe_core.families.mmoe.config import IMAGE_TO_TEXT, MODALITIES, TEXT_TO_IMAGE
from mmoe_core.routing_record import PositionMeta


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

    text_cls: Tensor  # [N, D]   projected pooled text embedding
    text_tokens: Tensor  # [N, L, D] final text hidden states (padding included, as published)
    image_cls: Tensor  # [N, dv]  image_cls_fc(projected pooled image embedding)
    image_tokens: Tensor  # [N, 1+P, dv] image_tokens_fc(ViT CLS + patch hidden states)


@dataclass
class EntityFeatures(_Rows):
    """Entity side, ready for :meth:`MMoEModel.match` (cacheable: it does not depend on mentions)."""

    index: Tensor  # [N] entity index in the KB
    text_cls: Tensor  # [N, D]   normalised text CLS (global-to-global score)
    text_cls_moe: Tensor  # [N, Ht]  IntraMoE output at the CLS (global side of global-to-local)
    text_query: Tensor  # [N, L, Ht] fc_query of the routed text tokens
    image_cls: Tensor  # [N, dv]
    image_cls_moe: Tensor  # [N, Hv]
    image_query: Tensor  # [N, 1+P, Hv]
    cross_text_image: Tensor  # [N, C] gated text-CLS -> image-token context
    cross_image_text: Tensor  # [N, C] gated image-CLS -> text-token context


@dataclass
class MentionFeatures(_Rows):
    """Mention side, ready for :meth:`MMoEModel.match`."""

    text_cls: Tensor  # [B, D]
    text_key: Tensor  # [B, L, Ht]
    text_value: Tensor  # [B, L, Ht]
    image_cls: Tensor  # [B, dv]
    image_key: Tensor  # [B, 1+P, Hv]
    image_value: Tensor  # [B, 1+P, Hv]
    cross_text_image: Tensor  # [B, C]
    cross_image_text: Tensor  # [B, C]
    representation: Tensor  # [B, Ht+Hv+C] mean routed MoE output of each layer (for the embedding map)


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

    role: str  # "entity" | "mention"
    example_ids: list[int]
    text_valid: Tensor  # [N, 1+L] bool: CLS + non-padding tokens
    text_strings: list[list[str]] | None  # [N][1+L]: "[CLS]" + token strings
    num_patches: int
    grid: int

    @property
    def subject(self) -> str:
        """Entities are knowledge-base items, not the run's examples: their ids index the KB."""
        return "kb" if self.role == "entity" else "example"

    def image_labels(self) -> list[str]:
        return ["[CLS]", "[ViT CLS]"] + [f"patch {r},{c}" for r in range(self.grid) for c in range(self.grid)]

    def patch_cells(self) -> list[tuple[int, int] | None]:
        """Grid cell of each position of [CLS; ViT CLS; patches] (None for the two CLS)."""
        return [None, None] + [(r, c) for r in range(self.grid) for c in range(self.grid)]

    def text_intra(self) -> PositionMeta:
        length = self.text_valid.shape[1]
        return PositionMeta.uniform(
            self.role,
            self.example_ids,
            length,
            "text_token",
            "text",
            "text",
            first_kind="cls",
            tokens=self.text_strings,
            valid=self.text_valid,
            subject=self.subject,
        )

    def image_intra(self) -> PositionMeta:
        labels = self.image_labels()
        kinds = ["cls", "cls"] + ["image_patch"] * self.num_patches
        n = len(labels)
        return PositionMeta(
            self.role,
            self.example_ids,
            kinds,
            ["image"] * n,
            ["image"] * n,
            tokens=[labels] * len(self.example_ids) if self.text_strings is not None else None,
            subject=self.subject,
            grid=self.patch_cells(),
        )

    def cross_text_image(self) -> PositionMeta:
        """[text CLS; image tokens] routed by [image CLS; text tokens]."""
        labels = ["[text CLS]"] + self.image_labels()[1:]
        n = len(labels)
        kinds = ["cls", "cls"] + ["image_patch"] * self.num_patches
        return PositionMeta(
            f"{self.role}:{TEXT_TO_IMAGE}",
            self.example_ids,
            kinds,
            ["text"] + ["image"] * (n - 1),
            ["image"] + ["text"] * (n - 1),
            tokens=[labels] * len(self.example_ids) if self.text_strings is not None else None,
            subject=self.subject,
            grid=[None] + self.patch_cells()[1:],
        )

    def cross_image_text(self) -> PositionMeta:
        """[image CLS; text tokens] routed by [text CLS; image tokens]; text padding is invalid."""
        n = self.text_valid.shape[1]
        tokens = None if self.text_strings is None else [["[image CLS]"] + row[1:] for row in self.text_strings]
        return PositionMeta(
            f"{self.role}:{IMAGE_TO_TEXT}",
            self.example_ids,
            ["cls"] + ["text_token"] * (n - 1),
            ["image"] + ["text"] * (n - 1),
            ["text"] + ["image"] * (n - 1),
            tokens=tokens,
            valid=self.text_valid,
            subject=self.subject,
        )


def text_valid_mask(ids: Tensor) -> Tensor:
    """[N, 1+L] bool for [CLS; text tokens]: the CLS and every token up to EOT (the rest is padding)."""
    return torch.cat([torch.ones_like(ids[:, :1], dtype=torch.bool), token_mask(ids)], dim=1)


def valid_mean(x: Tensor, valid: Tensor | None) -> Tensor:
    """Mean over the position axis of [N, L, H], counting only valid positions."""
    if valid is None:
        return x.mean(dim=1)
    w = valid.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
