"""open_clip text and image towers that return CLS + token features, as the MoE models need them.

Two ways to get towers, both built by open_clip's own classes:

* a real open_clip model (``EncoderSpec(kind="open_clip", model_name="ViT-B-32", pretrained="openai"``
  or ``pretrained="/path/to/weights.safetensors|.bin|.pt"``): pretrained weights for users who have
  them. Offline, a tag that is not in the local cache fails at once with a clear message (no hang);
* a registered tiny config (``EncoderSpec(kind="tiny", name="tiny-64")``), trained from scratch with
  the model. Sizes are in ``TINY_CONFIGS``: they keep CPU training of the demo runs to minutes.

Outputs mirror what the published MEL-MMoE encoder takes from Hugging Face CLIP:
``text_cls`` [B, D] projected pooled text embedding; ``text_tokens`` [B, L, W_t] the final hidden
states of all L context positions (padding included, as published); ``image_cls`` [B, D] projected
pooled image embedding; ``image_tokens`` [B, 1 + P, W_v] final hidden states of the CLS and the P
patches (HF's ``vision_model_output[0]`` also keeps the CLS). The MMoE InterMoE routes
[text CLS; image tokens] by [image CLS; text tokens], so L must equal 1 + P: the tiny configs do.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from mmoe_core.errors import ConfigError, UserError
from mmoe_core.limits import Limit, check_choice, check_limits, check_object

# Registered tiny configs. image 64 px / patch 8 gives 64 patches + CLS = 65 image tokens, so the
# text context is 65 too (the InterMoE needs equal lengths).
TINY_CONFIGS: dict[str, dict] = {
    "tiny-64": dict(
        embed_dim=64,
        image_size=64,
        patch_size=8,
        vision_width=64,
        vision_layers=2,
        vision_heads=2,
        context_length=65,
        text_width=64,
        text_layers=2,
        text_heads=2,
    ),
    "tiny-32": dict(
        embed_dim=32,
        image_size=64,
        patch_size=8,
        vision_width=32,
        vision_layers=1,
        vision_heads=2,
        context_length=65,
        text_width=32,
        text_layers=1,
        text_heads=2,
    ),
}

# What a checkpoint's encoder spec may ask for (config.json is untrusted: see mmoe_core.limits).
ENCODER_KINDS = ("tiny", "open_clip", "hf_clip")
ENCODER_LIMITS: dict[str, Limit] = {
    "embed_dim": Limit(1, 16384),
    "image_size": Limit(8, 4096),
    "patch_size": Limit(1, 1024),
    "vision_width": Limit(1, 16384),
    "vision_layers": Limit(1, 256),
    "vision_heads": Limit(1, 1024),
    "context_length": Limit(2, 65536),
    "text_width": Limit(1, 16384),
    "text_layers": Limit(1, 256),
    "text_heads": Limit(1, 1024),
    "vocab_size": Limit(1, 2_000_000),
    "text_positions": Limit(2, 65536),
    "text_mlp_ratio": Limit(0.0625, 64, float),
    "vision_mlp_ratio": Limit(0.0625, 64, float),
    "pad_token_id": Limit(0, 2_000_000),
}

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class EncoderUnavailable(UserError, RuntimeError):
    """Pretrained encoder weights cannot be had here (offline, not cached, or a bad file)."""


@dataclass
class EncoderSpec:
    kind: str = "tiny"  # "tiny" | "open_clip"
    name: str = "tiny-64"  # tiny config name, or open_clip model name (e.g. "ViT-B-32")
    pretrained: str | None = None  # open_clip tag ("openai") or a local weight file path
    frozen: bool = False
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> EncoderSpec:
        return EncoderSpec(**d)


def check_encoder_spec(spec: object, where: str) -> None:
    """ConfigError unless ``spec`` (an encoder spec from a config.json) is well typed and of sane sizes."""
    spec = check_object(spec, where)
    unknown = sorted(set(spec) - set(EncoderSpec.__dataclass_fields__))
    if unknown:
        raise ConfigError(
            f"{where}: unknown keys {unknown}; an encoder spec has {sorted(EncoderSpec.__dataclass_fields__)}"
        )
    check_choice(spec, "kind", ENCODER_KINDS, where)
    for key, kinds in (("name", (str,)), ("pretrained", (str, type(None))), ("frozen", (bool,))):
        if key in spec and not isinstance(spec[key], kinds):
            raise ConfigError(f"{where}: {key} = {spec[key]!r} has the wrong type")
    extra = check_object(spec.get("extra", {}), f"{where}.extra")
    check_limits(extra, ENCODER_LIMITS, f"{where}.extra")
    kind, name = spec.get("kind", "tiny"), spec.get("name", EncoderSpec.name)
    if kind == "tiny" and name not in TINY_CONFIGS:
        raise ConfigError(f"{where}: unknown tiny encoder {name!r}; registered: {sorted(TINY_CONFIGS)}")
    sizes = {**TINY_CONFIGS.get(name, {}), **extra} if kind == "tiny" else dict(extra)
    for width, heads in (("text_width", "text_heads"), ("vision_width", "vision_heads")):
        if width in sizes and heads in sizes and sizes[width] % sizes[heads]:
            raise ConfigError(f"{where}: {width} {sizes[width]} is not a multiple of {heads} {sizes[heads]}")
    if "image_size" in sizes and "patch_size" in sizes and sizes["patch_size"] > sizes["image_size"]:
        raise ConfigError(f"{where}: patch_size {sizes['patch_size']} exceeds image_size {sizes['image_size']}")


def _tiny_clip(cfg: dict):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(
        layers=cfg["vision_layers"],
        width=cfg["vision_width"],
        head_width=cfg["vision_width"] // cfg["vision_heads"],
        patch_size=cfg["patch_size"],
        image_size=cfg["image_size"],
    )
    text = CLIPTextCfg(
        context_length=cfg["context_length"],
        width=cfg["text_width"],
        heads=cfg["text_heads"],
        layers=cfg["text_layers"],
    )
    return CLIP(embed_dim=cfg["embed_dim"], vision_cfg=vision, text_cfg=text)


def _offline() -> bool:
    return os.environ.get("MOESCOPE_ALLOW_DOWNLOAD", "0") != "1"


def _pretrained_clip(spec: EncoderSpec):
    """Build an open_clip model with pretrained weights, failing fast (never hanging) when offline."""
    import open_clip

    pretrained = spec.pretrained
    if pretrained and Path(pretrained).exists():
        model = open_clip.create_model(spec.name, pretrained=None)
        path = Path(pretrained)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing:
            raise EncoderUnavailable(f"{path}: weights do not fit open_clip {spec.name}: missing {missing[:8]}...")
        return model
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)
    try:
        if _offline():  # only the local hub cache: an uncached tag fails at once instead of retrying
            import huggingface_hub.constants as hf_constants

            previous, hf_constants.HF_HUB_OFFLINE = hf_constants.HF_HUB_OFFLINE, True
            try:
                return open_clip.create_model(spec.name, pretrained=pretrained)
            finally:
                hf_constants.HF_HUB_OFFLINE = previous
        return open_clip.create_model(spec.name, pretrained=pretrained)
    except Exception as exc:  # network refused, not cached, unknown tag: all end here with advice
        raise EncoderUnavailable(
            f"cannot load open_clip {spec.name!r} with pretrained={pretrained!r}: {exc}. Downloads are off "
            f"(set MOESCOPE_ALLOW_DOWNLOAD=1 to allow them); offline, download the weights elsewhere and pass the file path as the pretrained value, or use "  # noqa: E501
            f"a tiny config (EncoderSpec(kind='tiny'))."
        ) from exc
    finally:
        socket.setdefaulttimeout(old_timeout)


class ClipTowers(nn.Module):
    """Text and image towers of one open_clip CLIP model, returning (CLS, tokens) per modality."""

    def __init__(self, spec: EncoderSpec):
        super().__init__()
        self.spec = spec
        if spec.kind == "tiny":
            if spec.name not in TINY_CONFIGS:
                raise ValueError(f"unknown tiny encoder {spec.name!r}; registered: {sorted(TINY_CONFIGS)}")
            # ``extra`` may override sizes of the registered config (e.g. a longer text context).
            base = TINY_CONFIGS[spec.name]
            self.clip = _tiny_clip({**base, **{k: v for k, v in spec.extra.items() if k in base}})
        elif spec.kind == "open_clip":
            self.clip = _pretrained_clip(spec)
        else:
            raise ValueError(f"unknown encoder kind {spec.kind!r}; use 'tiny' or 'open_clip'")
        # The logit scale is CLIP's contrastive temperature; the MoE models do not use it.
        self.clip.logit_scale.requires_grad_(False)
        if spec.frozen:
            self.clip.requires_grad_(False)
        visual = self.clip.visual
        size = visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        grid = visual.grid_size
        self.num_patches = int(grid[0] * grid[1])
        self.context_length = int(self.clip.context_length)
        self.text_width = int(self.clip.transformer.width)
        self.vision_width = int(visual.transformer.width)
        self.embed_dim = int(self.clip.text_projection.shape[1])
        self._tokenizer = None

    # --- text -----------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from open_clip.tokenizer import SimpleTokenizer

            self._tokenizer = SimpleTokenizer(context_length=self.context_length)
        return self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """BPE-tokenise to [B, context_length] (SOT ... EOT, zero padded, truncated keeping EOT)."""
        return self.tokenizer(list(texts), context_length=self.context_length)

    def token_strings(self, ids: Tensor) -> list[list[str]]:
        """Readable string of each token id (for display), '' for padding."""
        dec = self.tokenizer.decoder
        out = []
        for row in ids.tolist():
            out.append([("" if t == 0 else dec.get(t, "?").replace("</w>", "")) for t in row])
        return out

    def embed_text_tokens(self, ids: Tensor) -> Tensor:
        """Input token embeddings [B, L, W] (the attribution target for text)."""
        return self.clip.token_embedding(ids)

    def encode_text(self, ids: Tensor, token_embeds: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(text_cls [B, D], text_tokens [B, L, W]); ``token_embeds`` replaces the embedding lookup."""
        clip = self.clip
        x = clip.token_embedding(ids) if token_embeds is None else token_embeds
        x = x + clip.positional_embedding[: x.shape[1]].to(x.dtype)
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]  # EOT has the largest id
        return pooled @ clip.text_projection, x

    # --- image ----------------------------------------------------------------------------------
    def preprocess(self, images: Sequence) -> Tensor:
        """PIL images (or uint8 HxWx3 arrays) -> normalised [B, 3, S, S]; None -> zeros (no image)."""
        from PIL import Image

        out = []
        mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        std = torch.tensor(CLIP_STD).view(3, 1, 1)
        for img in images:
            if img is None:  # a missing image is all zeros, as in the published collator
                out.append(torch.zeros(3, self.image_size, self.image_size))
                continue
            if not isinstance(img, Image.Image):
                img = Image.fromarray(np.asarray(img, dtype=np.uint8))
            img = img.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
            arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
            out.append((arr - mean) / std)
        return torch.stack(out) if out else torch.zeros(0, 3, self.image_size, self.image_size)

    def embed_image_patches(self, pixels: Tensor) -> Tensor:
        """Patch embeddings [B, P, W] before CLS/positions (the attribution target for images)."""
        x = self.clip.visual.conv1(pixels)
        return x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)

    def encode_image(self, pixels: Tensor, patch_embeds: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(image_cls [B, D], image_tokens [B, 1 + P, W_v]); ``patch_embeds`` replaces conv1."""
        visual = self.clip.visual
        x = self.embed_image_patches(pixels) if patch_embeds is None else patch_embeds
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.ln_pre(x)
        x = visual.transformer(x)
        x = visual.ln_post(x)
        pooled = x[:, 0] @ visual.proj
        return pooled, x


def token_mask(ids: Tensor) -> Tensor:
    """[B, L] True for SOT .. EOT of each row of tokenised ids, False for the padding after EOT.

    Found from EOT's place (it has the largest id in CLIP's vocabulary), not from ``ids != 0``:
    id 0 is also a real BPE token ("!").
    """
    eot = ids.argmax(dim=-1, keepdim=True)
    return torch.arange(ids.shape[1], device=ids.device)[None, :] <= eot


def build_towers(spec: EncoderSpec | dict) -> ClipTowers:
    """Factory: one call from a spec (or its dict, as stored in a checkpoint's config.json)."""
    return ClipTowers(EncoderSpec.from_dict(spec) if isinstance(spec, dict) else spec)
