"""The MoEMoE family's names and its model config (the ``model`` section of config.json).

:func:`default_model_config` is the schema: every key a MoEMoE model reads, with its default and why.
Named configs live in ``model_configs/*.json`` (read by :mod:`mmoe_core.factory`); a trainer starts
from one of them (``family_options["model_config"]``) or from these defaults.
"""

from __future__ import annotations

from collections.abc import Sequence

from mmoe_core.encoders import EncoderSpec, check_encoder_spec
from mmoe_core.errors import ConfigError
from mmoe_core.families.moemoe.vocab import SPECIAL_TOKENS
from mmoe_core.limits import Limit, check_choice, check_limits, check_object

FAMILY = "moemoe"
DECODER_CALL = "decoder"
SLICE_LABELS = ("question_type", "answer_source", "category")
SOURCES = ("image", "context")


def default_model_config(answer_vocab: Sequence[str] | None = None, **overrides) -> dict:
    """The ``model`` section of config.json; ``overrides`` replace its keys."""
    config = {
        # Questions are <= 12 BPE tokens; demo contexts up to ~118: C and the joint sequence use 120.
        "question_encoder": EncoderSpec(
            kind="tiny", name="tiny-32", extra={"context_length": 16, "text_layers": 1}
        ).to_dict(),
        "source_encoder": EncoderSpec(
            kind="tiny",
            name="tiny-32",
            extra={"context_length": 120, "text_layers": 1, "vision_layers": 1, "patch_size": 8},
        ).to_dict(),
        "model_dim": 64,
        "decoder_layers": 4,
        "decoder_heads": 4,
        "ffn_mult": 2.0,
        "num_experts": 4,
        "top_k": 2,
        "gate": "topk_softmax",
        "max_answer_words": 3,
        "answer_vocab": list(answer_vocab) if answer_vocab is not None else list(SPECIAL_TOKENS),
        "aux_weight": 0.1,  # lambda: 0.01 ignores the MoE, 0.5 over-balances (paper)
        "align_weight": 1.0,
        # The alignment losses pull the question toward its sources, not the sources toward the question:
        # with gradients into C and I, 1 - cos is cheapest when every picture looks alike (measured: L_QIA
        # fell to 1e-4 within 300 steps while the decoder stopped reading the picture).
        "align_to_fixed_sources": True,
        "expert_only": False,
        "expert_only_after_steps": None,
        "qga_warmup_steps": 0,
        "image_warmup_steps": 0,
        "copy": True,  # pointer over the joint sequence: answer words copied from C's positions
    }
    config.update(overrides)
    return config


def default_config(answer_vocab: Sequence[str] | None = None, **overrides) -> dict:
    """A whole config.json (family + model section), as the training loop writes it."""
    return {"family": FAMILY, "model": default_model_config(answer_vocab, **overrides)}


def model_section(config: dict) -> dict:
    """The model sizes of a config.json (its ``model`` section; a bare section is accepted too)."""
    return config["model"] if "model" in config else config


# What a checkpoint's "model" section may hold (config.json is untrusted: mmoe_core.limits).
LIMITS: dict[str, Limit] = {
    "model_dim": Limit(1, 16384),
    "decoder_layers": Limit(1, 256),
    "decoder_heads": Limit(1, 1024),
    "ffn_mult": Limit(0.0625, 64.0, float),
    "num_experts": Limit(1, 1024),
    "top_k": Limit(1, 1024),
    "max_answer_words": Limit(1, 1024),
    "aux_weight": Limit(0.0, 1e6, float),
    "align_weight": Limit(0.0, 1e6, float),
    "expert_only_after_steps": Limit(0, 1e9, optional=True),
    "qga_warmup_steps": Limit(0, 1e9),
    "image_warmup_steps": Limit(0, 1e9),
}
MAX_ANSWER_VOCAB = 1_000_000
REQUIRED = (
    "question_encoder",
    "source_encoder",
    "model_dim",
    "decoder_layers",
    "decoder_heads",
    "ffn_mult",
    "num_experts",
    "top_k",
    "gate",
    "max_answer_words",
    "answer_vocab",
)


def check_model_config(config: dict, where: str) -> None:
    """ConfigError unless config.json's "model" section is well typed and of sane sizes (before any build)."""
    section = check_object(model_section(config), f"{where}: model")
    missing = [key for key in REQUIRED if key not in section]
    if missing:
        raise ConfigError(f"{where}: model is missing {missing}")
    check_limits(section, LIMITS, f"{where}: model")
    check_choice(section, "gate", ("topk_softmax", "mmoe_reference"), f"{where}: model")
    if section["top_k"] > section["num_experts"]:
        raise ConfigError(f"{where}: model.top_k = {section['top_k']} exceeds num_experts = {section['num_experts']}")
    if section["model_dim"] % section["decoder_heads"]:
        raise ConfigError(
            f"{where}: model.model_dim {section['model_dim']} is not a multiple of decoder_heads "
            f"{section['decoder_heads']}"
        )
    vocab = section["answer_vocab"]
    if not isinstance(vocab, list) or len(vocab) > MAX_ANSWER_VOCAB or not all(isinstance(w, str) for w in vocab):
        raise ConfigError(f"{where}: model.answer_vocab must be a list of at most {MAX_ANSWER_VOCAB:,} strings")
    for key in ("question_encoder", "source_encoder"):
        check_encoder_spec(section[key], f"{where}: model.{key}")
