"""The MMoE family's names and its model config (the ``model`` section of config.json).

Config names and the published ones (MEL-MMoE ``config/*.yaml``, ``model:`` section)::

    image_dim    = dv                 text_hidden  = TGLU_hidden_dim    num_experts = num_experts
    image_hidden = IDLU_hidden_dim    cross_hidden = CMFU_hidden_dim    top_k       = top_experts
    input_hidden_dim = dt = the towers' projection width (must equal the text width, as in CLIP B/32)

Named configs live in ``model_configs/*.json`` (read by :mod:`mmoe_core.factory`); a trainer starts
from one of them (``family_options["model_config"]``) or from the defaults below.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

from mmoe_core.encoders import EncoderSpec, check_encoder_spec
from mmoe_core.errors import ConfigError
from mmoe_core.limits import Limit, check_choice, check_limits, check_object

FAMILY = "mmoe"
MODALITIES = ("text", "image", "cross")
LAYER_NAMES = {"text": "text_intra", "image": "image_intra", "cross": "cross_inter"}
TEXT_TO_IMAGE, IMAGE_TO_TEXT = "text_cls+image_tokens", "image_cls+text_tokens"
SEP = " [SEP] "


@dataclass
class MMoEConfig:
    """The ``model`` section of an MMoE checkpoint's config.json."""

    encoder: dict = field(default_factory=lambda: EncoderSpec().to_dict())
    image_dim: int = 32  # dv: image CLS and patch features after image_cls_fc / image_tokens_fc
    text_hidden: int = 32  # TGLU_hidden_dim: text IntraMoE output
    image_hidden: int = 32  # IDLU_hidden_dim: image IntraMoE output (published shapes need == image_dim)
    cross_hidden: int = 32  # CMFU_hidden_dim: InterMoE width
    num_experts: int = 4
    top_k: int = 3
    gate: str = "topk_softmax"  # "topk_softmax" | "mmoe_reference"
    capacity_factor: float = 1.0
    expert_mult: float = 4  # expert FFN inner width = mult * input width (published: 4)
    dispatch: str = "dense"  # "dense" (published) | "sparse" (same result)
    entity_chunk_size: int = 6000  # entities encoded per MoE call at eval (published eval_chunk_size)
    mention_desc: str = "none"  # what follows the sentence in a mention's text: none | dataset | dme

    @staticmethod
    def from_dict(d: dict) -> MMoEConfig:
        known = {f.name for f in dataclasses.fields(MMoEConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown MMoE model options {unknown}; known: {sorted(known)}")
        return MMoEConfig(**d)

    def to_dict(self) -> dict:
        return asdict(self)


# What a checkpoint's "model" section may hold (config.json is untrusted: mmoe_core.limits).
LIMITS: dict[str, Limit] = {
    "image_dim": Limit(1, 16384),
    "text_hidden": Limit(1, 16384),
    "image_hidden": Limit(1, 16384),
    "cross_hidden": Limit(1, 16384),
    "num_experts": Limit(1, 1024),
    "top_k": Limit(1, 1024),
    "capacity_factor": Limit(0.0, 1024.0, float),
    "expert_mult": Limit(0.0625, 64.0, float),
    "entity_chunk_size": Limit(1, 10_000_000),
}
CHOICES = {
    "gate": ("topk_softmax", "mmoe_reference"),
    "dispatch": ("dense", "sparse"),
    "mention_desc": ("none", "dataset", "dme"),
}


def check_model_config(config: dict, where: str) -> None:
    """ConfigError unless config.json's "model" section is well typed and of sane sizes (before any build)."""
    section = check_object(config.get("model", {}), f"{where}: model")
    MMoEConfig.from_dict(dict(section))  # unknown keys
    check_limits(section, LIMITS, f"{where}: model")
    for key, choices in CHOICES.items():
        check_choice(section, key, choices, f"{where}: model")
    experts, k = section.get("num_experts", MMoEConfig.num_experts), section.get("top_k", MMoEConfig.top_k)
    if k > experts:
        raise ConfigError(f"{where}: model.top_k = {k} exceeds model.num_experts = {experts}")
    check_encoder_spec(section.get("encoder", MMoEConfig().encoder), f"{where}: model.encoder")


def config_from_options(model_options: dict, gate: str, num_experts: int, top_k: int, dme: bool = False) -> MMoEConfig:
    """The model config a training run uses: ``model_options`` (a named config's model section with the
    run's family options on top; ``encoder`` may be a tiny config name or a spec dict), then the run's
    gate, E and k, and DME when asked."""
    options = dict(model_options)
    encoder = options.pop("encoder", None)
    cfg = MMoEConfig.from_dict(options)
    if isinstance(encoder, str):
        cfg.encoder = EncoderSpec(name=encoder).to_dict()
    elif isinstance(encoder, dict):
        cfg.encoder = EncoderSpec.from_dict(encoder).to_dict()
    cfg.gate, cfg.num_experts, cfg.top_k = gate, num_experts, top_k
    if dme:
        cfg.mention_desc = "dme"
    return cfg
