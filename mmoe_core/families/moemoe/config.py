"""The MoEMoE family's names and its model config (the ``model`` section of config.json).

:func:`default_model_config` is the schema: every key a MoEMoE model reads, with its default and why.
Named configs live in ``model_configs/*.json`` (read by :mod:`mmoe_core.factory`); a trainer starts
from one of them (``family_options["model_config"]``) or from these defaults.
"""
from __future__ import annotations

from collections.abc import Sequence

from mmoe_core.encoders import EncoderSpec
from mmoe_core.families.moemoe.vocab import SPECIAL_TOKENS

FAMILY = "moemoe"
DECODER_CALL = "decoder"
SLICE_LABELS = ("question_type", "answer_source", "category")
SOURCES = ("image", "context")


def default_model_config(answer_vocab: Sequence[str] | None = None, **overrides) -> dict:
    """The ``model`` section of config.json; ``overrides`` replace its keys."""
    config = {
        # Questions are <= 12 BPE tokens; demo contexts up to ~118: C and the joint sequence use 120.
        "question_encoder": EncoderSpec(kind="tiny", name="tiny-32",
                                        extra={"context_length": 16, "text_layers": 1}).to_dict(),
        "source_encoder": EncoderSpec(kind="tiny", name="tiny-32",
                                      extra={"context_length": 120, "text_layers": 1, "vision_layers": 1,
                                             "patch_size": 8}).to_dict(),
        "model_dim": 64,
        "decoder_layers": 4,
        "decoder_heads": 4,
        "ffn_mult": 2.0,
        "num_experts": 4,
        "top_k": 2,
        "gate": "topk_softmax",
        "max_answer_words": 3,
        "answer_vocab": list(answer_vocab) if answer_vocab is not None else list(SPECIAL_TOKENS),
        "aux_weight": 0.1,        # lambda: 0.01 ignores the MoE, 0.5 over-balances (paper)
        "align_weight": 1.0,
        # The alignment losses pull the question toward its sources, not the sources toward the question:
        # with gradients into C and I, 1 - cos is cheapest when every picture looks alike (measured: L_QIA
        # fell to 1e-4 within 300 steps while the decoder stopped reading the picture).
        "align_to_fixed_sources": True,
        "expert_only": False,
        "expert_only_after_steps": None,
        "qga_warmup_steps": 0,
        "image_warmup_steps": 0,
        "copy": True,             # pointer over the joint sequence: answer words copied from C's positions
    }
    config.update(overrides)
    return config


def default_config(answer_vocab: Sequence[str] | None = None, **overrides) -> dict:
    """A whole config.json (family + model section), as the training loop writes it."""
    return {"family": FAMILY, "model": default_model_config(answer_vocab, **overrides)}


def model_section(config: dict) -> dict:
    """The model sizes of a config.json (its ``model`` section; a bare section is accepted too)."""
    return config["model"] if "model" in config else config
