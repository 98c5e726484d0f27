"""Hugging Face ``CLIPModel`` weights on open_clip towers, computing what the published MEL-MMoE reads.

The published MEL-MMoE encoder is a Hugging Face ``CLIPModel`` (``encoder.clip``). MoEscope's towers are
open_clip models, so an imported checkpoint keeps open_clip's classes (attribution hooks, tokenizer,
preprocessing, every page) and only its weights are renamed:

    HF CLIPModel key                                        open_clip CLIP key
    text_model.embeddings.token_embedding.weight            token_embedding.weight
    text_model.embeddings.position_embedding.weight         positional_embedding
    text_model.encoder.layers.<i>.self_attn.{q,k,v}_proj    transformer.resblocks.<i>.attn.in_proj_{weight,bias} (q;k;v)
    ....self_attn.out_proj / layer_norm1 / layer_norm2      ....attn.out_proj / ln_1 / ln_2
    ....mlp.fc1 / mlp.fc2                                   ....mlp.c_fc / mlp.c_proj
    text_model.final_layer_norm                             ln_final
    text_projection.weight  [D, W_t]                        text_projection [W_t, D]   (transposed)
    vision_model.embeddings.class_embedding                 visual.class_embedding
    vision_model.embeddings.patch_embedding.weight          visual.conv1.weight
    vision_model.embeddings.position_embedding.weight       visual.positional_embedding
    vision_model.pre_layrnorm / post_layernorm              visual.ln_pre / visual.ln_post
    vision_model.encoder.layers.<i>.*                       visual.transformer.resblocks.<i>.* (as for text)
    visual_projection.weight [D, W_v]                       visual.proj [W_v, D]        (transposed)
    logit_scale                                             logit_scale
    *.embeddings.position_ids (a buffer in transformers < 4.31)   checked to be 0..n-1, then dropped

The forward of :class:`HFClipTowers` reproduces the published encoder's outputs (transformers 4.27):

* activation QuickGELU (``hidden_act="quick_gelu"``), layer-norm eps 1e-5 (open_clip's default);
* text: HF pads with ``pad_token_id`` (49407 for the OpenAI tokenizer: the end-of-text id) and passes
  an ``attention_mask``, which masks padding *keys* on top of the causal mask. Positions before the
  end-of-text token never see padding anyway (causal), but the hidden states *of* padding positions
  change, and the published matcher reads every position (``text_model_output[0]``), so the mask
  matters. open_clip's own pad mask (``TextTransformer(use_pad_mask=...)``) is not usable here: it is
  only applied without a causal mask and it keys on ``text != pad_id``, which would also mask the real
  end-of-text token when pad and end-of-text share an id. So the mask is built here: causal plus
  "key after the first end-of-text token". MoEscope's tokenizer pads with 0; padding ids are replaced by
  ``pad_token_id`` before the embedding lookup, so both paddings give HF's numbers;
* text CLS = L2-normalised ``text_projection(final_layer_norm(h)[first EOT])`` (``CLIPModel`` returns
  normalised ``text_embeds``); text tokens = ``final_layer_norm(h)`` at every position;
* image CLS = L2-normalised ``visual_projection(post_layernorm(h[:, 0]))``; image tokens = the last
  encoder layer's hidden states of CLS + patches *without* ``post_layernorm`` (HF's
  ``vision_model_output[0]`` is taken before it);
* images are resized to the tower's size with LANCZOS (the published collator's
  ``Image.resize((224, 224), LANCZOS)``; the CLIP processor's own resize and crop are then no-ops) and
  normalised with the CLIP mean and std; a missing image is all zeros, as published.

Text length: HF CLIP has 77 position embeddings, the published data pipeline pads to
``text_max_length`` (50 in every published config, equal to 1 + 49 patches of ViT-B/32 at 224 px, as
the InterMoE needs). The towers tokenise to ``context_length`` (from the spec) and use the first
``context_length`` position embeddings, as HF does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmoe_core.encoders import CLIP_MEAN, CLIP_STD, ClipTowers, EncoderSpec

KIND = "hf_clip"
OPENAI_PAD_TOKEN_ID = 49407  # "<|endoftext|>": the OpenAI CLIP tokenizer pads with its end-of-text token
DEFAULT_HEAD_WIDTH = 64  # every OpenAI CLIP: heads = width // 64 (B/32: 12 vision, 8 text heads)


class HFClipMapError(ValueError):
    """HF CLIP weights that cannot be placed on open_clip towers (names the keys)."""


# ---------------------------------------------------------------------------------------------
# Key mapping
# ---------------------------------------------------------------------------------------------

_LAYER_RE = re.compile(r"^(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)$")
_LAYER_PARTS = {
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
}
_QKV_RE = re.compile(r"^self_attn\.([qkv])_proj\.(weight|bias)$")
_PLAIN = {
    "logit_scale": "logit_scale",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
}
_TRANSPOSED = {"text_projection.weight": "text_projection", "visual_projection.weight": "visual.proj"}
_POSITION_IDS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def _tower_prefix(model: str) -> str:
    return "transformer.resblocks." if model == "text_model" else "visual.transformer.resblocks."


def hf_clip_to_open_clip(hf: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename (and reshape) HF ``CLIPModel`` weights, keys relative to the CLIPModel, to open_clip CLIP
    keys. Returns ``(mapped, unmapped)``: ``unmapped`` lists every input key that found no place (an
    incomplete q/k/v triple included). ``position_ids`` buffers are checked and dropped."""
    out: dict[str, Tensor] = {}
    unmapped: list[str] = []
    qkv: dict[tuple[str, int, str], dict[str, tuple[str, Tensor]]] = {}
    for key, value in hf.items():
        if key in _PLAIN:
            out[_PLAIN[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif key in _POSITION_IDS:
            ids = value.reshape(-1)
            if not torch.equal(ids.long(), torch.arange(ids.numel())):
                raise HFClipMapError(f"{key} is not 0..{ids.numel() - 1}: custom position ids are not supported")
        elif m := _LAYER_RE.match(key):
            model, layer, rest = m.group(1), int(m.group(2)), m.group(3)
            if rest in _LAYER_PARTS:
                out[f"{_tower_prefix(model)}{layer}.{_LAYER_PARTS[rest]}"] = value
            elif q := _QKV_RE.match(rest):
                qkv.setdefault((model, layer, q.group(2)), {})[q.group(1)] = (key, value)
            else:
                unmapped.append(key)
        else:
            unmapped.append(key)
    for (model, layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            unmapped.extend(k for k, _ in parts.values())
            continue
        out[f"{_tower_prefix(model)}{layer}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"][1], parts["k"][1], parts["v"][1]], dim=0
        )
    return out, sorted(unmapped)


def open_clip_to_hf_clip(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse renaming (open_clip CLIP keys -> HF ``CLIPModel`` keys), e.g. to export a model.
    ``position_ids`` are not produced (transformers >= 4.31 does not store them)."""
    plain = {v: k for k, v in _PLAIN.items()}
    transposed = {v: k for k, v in _TRANSPOSED.items()}
    parts = {v: k for k, v in _LAYER_PARTS.items()}
    out: dict[str, Tensor] = {}
    block = re.compile(r"^(visual\.transformer|transformer)\.resblocks\.(\d+)\.(.+)$")
    for key, value in state.items():
        if key in plain:
            out[plain[key]] = value
        elif key in transposed:
            out[transposed[key]] = value.t().contiguous()
        elif m := block.match(key):
            model = "vision_model" if m.group(1).startswith("visual") else "text_model"
            head = f"{model}.encoder.layers.{m.group(2)}."
            rest = m.group(3)
            if rest in parts:
                out[head + parts[rest]] = value
            elif rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]
                for letter, chunk in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{head}self_attn.{letter}_proj.{kind}"] = chunk.contiguous()
    return out


# ---------------------------------------------------------------------------------------------
# Sizes from the weights
# ---------------------------------------------------------------------------------------------


def _count_layers(hf: Mapping[str, Tensor], model: str) -> int:
    layers = {int(m.group(2)) for k in hf if (m := _LAYER_RE.match(k)) and m.group(1) == model}
    return max(layers) + 1 if layers else 0


def _heads(width: int, given: int | None, what: str) -> int:
    if given:
        if width % given:
            raise HFClipMapError(f"{what} width {width} is not divisible by {given} heads")
        return int(given)
    if width % DEFAULT_HEAD_WIDTH:
        raise HFClipMapError(
            f"cannot infer the {what} heads from the weights (width {width} is not a multiple of "
            f"{DEFAULT_HEAD_WIDTH}): pass them (--{what}-heads)"
        )
    return width // DEFAULT_HEAD_WIDTH


def hf_clip_encoder_spec(
    hf: Mapping[str, Tensor],
    *,
    context_length: int | None = None,
    text_heads: int | None = None,
    vision_heads: int | None = None,
    pad_token_id: int = OPENAI_PAD_TOKEN_ID,
    name: str | None = None,
) -> dict:
    """An ``EncoderSpec`` dict (kind ``hf_clip``) with every size read off HF CLIP weights. Head counts are
    not in the weights: OpenAI CLIPs use 64-wide heads, which is the default. ``context_length`` defaults
    to 1 + the number of patches (what the MMoE InterMoE needs; the published ``text_max_length``)."""
    need = [
        "text_projection.weight",
        "visual_projection.weight",
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.position_embedding.weight",
        "text_model.encoder.layers.0.mlp.fc1.weight",
        "vision_model.encoder.layers.0.mlp.fc1.weight",
    ]
    missing = [k for k in need if k not in hf]
    if missing:
        raise HFClipMapError(f"not a Hugging Face CLIPModel state dict: missing {missing}")
    embed_dim, text_width = hf["text_projection.weight"].shape
    vocab_size = hf["text_model.embeddings.token_embedding.weight"].shape[0]
    text_positions = hf["text_model.embeddings.position_embedding.weight"].shape[0]
    vision_width, _, patch, patch_w = hf["vision_model.embeddings.patch_embedding.weight"].shape
    if patch != patch_w:
        raise HFClipMapError(f"non-square patches {patch}x{patch_w} are not supported")
    positions = hf["vision_model.embeddings.position_embedding.weight"].shape[0]
    grid = int(round(math.sqrt(positions - 1)))
    if grid * grid != positions - 1:
        raise HFClipMapError(f"{positions - 1} vision positions (+CLS) are not a square grid")
    text_mlp = hf["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    vision_mlp = hf["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    context_length = int(context_length or grid * grid + 1)
    if context_length > text_positions:
        raise HFClipMapError(f"text length {context_length} exceeds the {text_positions} text positions")
    extra = dict(
        embed_dim=int(embed_dim),
        vocab_size=int(vocab_size),
        text_positions=int(text_positions),
        context_length=context_length,
        text_width=int(text_width),
        text_layers=_count_layers(hf, "text_model"),
        text_heads=_heads(int(text_width), text_heads, "text"),
        text_mlp_ratio=text_mlp / text_width,
        vision_width=int(vision_width),
        vision_layers=_count_layers(hf, "vision_model"),
        vision_heads=_heads(int(vision_width), vision_heads, "vision"),
        vision_mlp_ratio=vision_mlp / vision_width,
        patch_size=int(patch),
        image_size=int(grid * patch),
        pad_token_id=int(pad_token_id),
        activation="quick_gelu",
        image_resample="lanczos",
    )
    if name is None:
        known = {
            (768, 12, 32, 224, 512): "ViT-B-32",
            (768, 12, 16, 224, 512): "ViT-B-16",
            (1024, 24, 14, 224, 768): "ViT-L-14",
            (1024, 24, 14, 336, 768): "ViT-L-14-336",
        }
        name = known.get(
            (
                extra["vision_width"],
                extra["vision_layers"],
                extra["patch_size"],
                extra["image_size"],
                extra["embed_dim"],
            ),
            "custom",
        )
    return EncoderSpec(kind=KIND, name=name, pretrained=None, frozen=False, extra=extra).to_dict()


# ---------------------------------------------------------------------------------------------
# The towers
# ---------------------------------------------------------------------------------------------


def _open_clip_model(extra: dict):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(
        layers=extra["vision_layers"],
        width=extra["vision_width"],
        head_width=extra["vision_width"] // extra["vision_heads"],
        mlp_ratio=extra["vision_mlp_ratio"],
        patch_size=extra["patch_size"],
        image_size=extra["image_size"],
    )
    text = CLIPTextCfg(
        context_length=extra["text_positions"],
        vocab_size=extra["vocab_size"],
        width=extra["text_width"],
        heads=extra["text_heads"],
        layers=extra["text_layers"],
        mlp_ratio=extra["text_mlp_ratio"],
    )
    if extra.get("activation", "quick_gelu") != "quick_gelu":
        raise ValueError(f"unsupported activation {extra.get('activation')!r} (HF CLIP uses quick_gelu)")
    return CLIP(embed_dim=extra["embed_dim"], vision_cfg=vision, text_cfg=text, quick_gelu=True)


class HFClipTowers(ClipTowers):
    """open_clip towers holding HF CLIP weights and computing the published encoder's features (see the
    module docstring). Same interface as :class:`ClipTowers`."""

    def __init__(self, spec: EncoderSpec):
        if spec.kind != KIND:
            raise ValueError(f"HFClipTowers needs an encoder spec of kind {KIND!r}, got {spec.kind!r}")
        nn.Module.__init__(self)  # ClipTowers.__init__ builds only its own kinds; the attributes are set here
        self.spec = spec
        extra = dict(spec.extra)
        self.clip = _open_clip_model(extra)
        self.clip.logit_scale.requires_grad_(False)
        if spec.frozen:
            self.clip.requires_grad_(False)
        visual = self.clip.visual
        size = visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        grid = visual.grid_size
        self.num_patches = int(grid[0] * grid[1])
        self.context_length = int(extra["context_length"])
        self.text_width = int(self.clip.transformer.width)
        self.vision_width = int(visual.transformer.width)
        self.embed_dim = int(self.clip.text_projection.shape[1])
        self.pad_token_id = int(extra.get("pad_token_id", OPENAI_PAD_TOKEN_ID))
        self.text_heads = int(extra["text_heads"])
        self.image_resample = str(extra.get("image_resample", "lanczos"))
        self._tokenizer = None

    # --- text -----------------------------------------------------------------------------------
    @staticmethod
    def text_valid(ids: Tensor) -> Tensor:
        """[B, L] bool: start-of-text .. first end-of-text (the end-of-text id is the largest id, so
        argmax finds its first occurrence with either padding)."""
        eot = ids.argmax(dim=-1, keepdim=True)
        return torch.arange(ids.shape[1], device=ids.device).unsqueeze(0) <= eot

    def _hf_ids(self, ids: Tensor) -> Tensor:
        return torch.where(self.text_valid(ids), ids, torch.full_like(ids, self.pad_token_id))

    def embed_text_tokens(self, ids: Tensor) -> Tensor:
        return self.clip.token_embedding(self._hf_ids(ids))

    def text_attention_mask(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        """Additive mask [B * heads, L, L]: causal, and no key after the first end-of-text token."""
        b, length = ids.shape
        causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).triu(1)
        blocked = causal.unsqueeze(0) | ~self.text_valid(ids).unsqueeze(1)  # [B, Q, K]
        mask = torch.zeros(b, length, length, dtype=dtype, device=ids.device).masked_fill(blocked, float("-inf"))
        return mask.repeat_interleave(self.text_heads, dim=0)

    def encode_text(self, ids: Tensor, token_embeds: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(L2-normalised projected text CLS [B, D], final-layer-normed hidden states [B, L, W])."""
        clip = self.clip
        x = self.embed_text_tokens(ids) if token_embeds is None else token_embeds
        x = x + clip.positional_embedding[: x.shape[1]].to(x.dtype)
        x = clip.transformer(x, attn_mask=self.text_attention_mask(ids, x.dtype))
        x = clip.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
        return F.normalize(pooled @ clip.text_projection, dim=-1), x

    # --- image ----------------------------------------------------------------------------------
    def preprocess(self, images: Sequence) -> Tensor:
        """As the published collator: resize to the tower's size (LANCZOS), CLIP-normalise; None -> zeros."""
        from PIL import Image

        resample = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC}[self.image_resample]
        mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        std = torch.tensor(CLIP_STD).view(3, 1, 1)
        out = []
        for img in images:
            if img is None:
                out.append(torch.zeros(3, self.image_size, self.image_size))
                continue
            if not isinstance(img, Image.Image):
                img = Image.fromarray(np.asarray(img, dtype=np.uint8))
            img = img.convert("RGB").resize((self.image_size, self.image_size), resample)
            arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
            out.append((arr - mean) / std)
        return torch.stack(out) if out else torch.zeros(0, 3, self.image_size, self.image_size)

    def encode_image(self, pixels: Tensor, patch_embeds: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(L2-normalised projected image CLS [B, D], last hidden states of CLS + patches [B, 1 + P, W_v]
        *before* ``ln_post``, as HF's ``vision_model_output[0]``)."""
        visual = self.clip.visual
        x = self.embed_image_patches(pixels) if patch_embeds is None else patch_embeds
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.ln_pre(x)
        x = visual.transformer(x)
        pooled = visual.ln_post(x[:, 0]) @ visual.proj
        return F.normalize(pooled, dim=-1), x


def build_hf_clip_towers(spec: EncoderSpec | dict) -> HFClipTowers:
    return HFClipTowers(EncoderSpec.from_dict(spec) if isinstance(spec, dict) else spec)
