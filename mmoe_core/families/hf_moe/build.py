"""Small Hugging Face MoE models built offline: configs of the real ``transformers`` classes, a
word-level tokenizer trained on the data's own text, and (for vision-language) a Qwen3-VL processor.

Everything here runs without a network: configs come from ``AutoConfig.for_model``, the tokenizer from
the ``tokenizers`` library, the image processor from its constructor. The demo runs and the tests
build their models here; a user's checkpoint never goes through this module.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import AutoConfig, PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
VISION_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}
# Split on whitespace, then isolate punctuation except ' and - (so "mid-range" and "OEKO-TEX" stay whole).
_PUNCTUATION = r"[^\w\s'\-]"

# A chat template in the shape real Qwen-VL templates read (content parts of type image / text):
# "question: <q> <|vision_start|><|image_pad|><|vision_end|> <text> answer :" -- so the demo model and a user's
# instruct checkpoint take the same path (processor.apply_chat_template, then the processor).
DEMO_CHAT_TEMPLATE = (
    "{%- for message in messages -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] == 'text' -%} {{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endfor -%}{%- if add_generation_prompt %} answer :{%- endif -%}"
)


def build_word_tokenizer(texts: Iterable[str], vision: bool = False, min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over ``texts`` (plus digits 0-9 and the specials)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    specials = [PAD, UNK, BOS, EOS] + (list(VISION_TOKENS.values()) if vision else [])
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(_PUNCTUATION), "isolated")]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    trainer = trainers.WordLevelTrainer(special_tokens=specials, min_frequency=min_frequency)
    tok.train_from_iterator([*texts, " ".join(str(d) for d in range(10))], trainer)
    extra = VISION_TOKENS if vision else {}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens=extra or None,
    )
    fast.padding_side = "left"
    return fast


def build_vl_processor(
    tokenizer: PreTrainedTokenizerFast, image_size: int = 64, patch_size: int = 8, merge_size: int = 2
):
    """A Qwen3-VL processor: pictures resized to ``image_size`` square, patches of ``patch_size``."""
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": pixels, "longest_edge": pixels},
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=2,
    )
    video_processor = Qwen3VLVideoProcessor(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2)
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=DEMO_CHAT_TEMPLATE,
    )


def _special_ids(tokenizer) -> dict:
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def text_moe_config(
    model_type: str,
    vocab_size: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    experts: int = 8,
    top_k: int = 2,
    expert_hidden: int = 64,
    max_positions: int = 512,
    special_ids: dict | None = None,
    **extra,
):
    """A small config of a text MoE architecture: mixtral, olmoe, qwen3_moe, qwen2_moe or deepseek_v3."""
    base = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_positions,
        num_experts_per_tok=top_k,
        tie_word_embeddings=True,
        **(special_ids or {}),
    )
    if model_type == "mixtral":
        base.update(num_local_experts=experts, intermediate_size=expert_hidden)
    elif model_type == "olmoe":
        base.update(num_experts=experts, intermediate_size=expert_hidden, norm_topk_prob=False)
    elif model_type in ("qwen3_moe", "qwen2_moe"):
        base.update(
            num_experts=experts,
            moe_intermediate_size=expert_hidden,
            intermediate_size=expert_hidden * 2,
            head_dim=hidden // heads,
            norm_topk_prob=True,
        )
        if model_type == "qwen2_moe":
            base.update(shared_expert_intermediate_size=expert_hidden)
    elif model_type == "deepseek_v3":
        head = max(4, hidden // heads)
        base.update(
            n_routed_experts=experts,
            moe_intermediate_size=expert_hidden,
            intermediate_size=expert_hidden * 2,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=0,
            num_key_value_heads=heads,
            kv_lora_rank=hidden // 2,
            q_lora_rank=hidden // 2,
            qk_rope_head_dim=head // 2,
            qk_nope_head_dim=head // 2,
            v_head_dim=head,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
        )
    else:
        raise ValueError(f"no small config for {model_type!r}")
    base.update(extra)
    return AutoConfig.for_model(model_type, **base)


def vl_moe_config(
    tokenizer,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    experts: int = 8,
    top_k: int = 2,
    expert_hidden: int = 64,
    vision_hidden: int = 32,
    vision_depth: int = 1,
    patch_size: int = 8,
    merge_size: int = 2,
    image_size: int = 64,
    max_positions: int = 1024,
    **text_extra,
):
    """A small Qwen3-VL-MoE config whose special token ids are the tokenizer's."""
    head_dim = hidden // heads
    half = head_dim // 2  # M-RoPE sections (t, h, w) over half the head dim
    sections = [half - 2 * (half // 3), half // 3, half // 3]
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in VISION_TOKENS.items()}
    grid = image_size // patch_size
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=expert_hidden * 2,
        moe_intermediate_size=expert_hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=head_dim,
        num_experts=experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=max_positions,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": sections,
            "mrope_interleaved": True,
        },
        **_special_ids(tokenizer),
        **text_extra,
    )
    vision = dict(
        depth=vision_depth,
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 2,
        num_heads=max(1, vision_hidden // 16),
        patch_size=patch_size,
        spatial_merge_size=merge_size,
        temporal_patch_size=2,
        out_hidden_size=hidden,
        num_position_embeddings=grid * grid,
        deepstack_visual_indexes=[],
    )
    return AutoConfig.for_model(
        "qwen3_vl_moe",
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=True,
        image_token_id=ids["image_token"],
        video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_start_token"],
        vision_end_token_id=ids["vision_end_token"],
    )
