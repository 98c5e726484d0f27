"""MoEMoE: question-guided dense + sparse mixture of experts for multi-source multimodal QA.

Built from the description of arXiv 2503.06296 (no public code), at demo size:

* **Encoders.** An unshared question encoder Q (the text half of its own open_clip CLIP), and a
  context encoder C plus an image encoder I (the text and image halves of a second CLIP).
* **Lengths.** The joint sequence has the context's text length L. Image tokens ([CLS; P patches])
  are *repeated* to L (nearest index), not interpolated: linear interpolation along the row-major
  patch sequence would blend patches that are not spatial neighbours (the end of one row with the
  start of the next, the CLS with the first patch); repetition keeps every patch feature intact.
  The question is short, so Q runs at its own short length and each example's *question tokens*
  (SOT..EOT, no padding) are stretched over L the same way: every question token governs an equal
  share of the joint sequence, so the per-token weights shown are exactly the weights used.
* **QGA.** One linear layer on the question embedding ([token state; pooled question]) gives two
  logits per question token; a softmax over the two sources gives alpha (image) and beta (context),
  alpha + beta = 1, both in [0, 1]. The softmax (rather than two sigmoids) makes the sources
  compete: the model cannot simply switch both on and let the decoder sort them out, so the
  dominant weight says which source the question relies on. I and C are layer-normed before
  mixing so that feature norms cannot override the weights. e = alpha * I + beta * C.
* **Decoder.** Pre-norm transformer decoder over memory [Q tokens; e]. The question part tells the
  decoder *what* is asked; the answer itself can only come from e (Q never holds it), which is what
  forces QGA to weight the right source (and contexts that contradict the picture punish beta on
  visual questions). Odd layers (``decoder.1``, ``decoder.3``, ...) have a sparse switch-MoE FFN,
  even layers a dense FFN. Answers are 1-3 words of a closed vocabulary built from the training
  answers (stored in config.json); decoding is greedy.
* **Copy pointer** (``copy``, on by default): the output is a pointer-generator mixture,
  g * P_gen(w) + (1 - g) * P_copy(w), where P_copy attends over the positions of e and puts each
  position's weight on the answer word written at that context position. Without it a from-scratch
  decoder has to learn, for every value word, that a context token spells an answer word: it stayed
  at the per-question-type answer prior (exact match 0.25 after 1,500 steps); with it, questions
  answered by the context reach 0.98 in 600 steps. The pointer looks at e, not at C, so QGA still
  decides what it can see (with beta near 0 the context's words are invisible to it).
* **Loss.** CE + L_QCA + L_QIA + lambda * L_aux, with L_Q?A = 1 - cos(projected mean Q, mean C or I)
  and L_aux the switch balance loss summed over the decoder MoE layers (valid decoder steps only).
  The alignment pulls the question toward its sources; C and I are its fixed targets
  (``align_to_fixed_sources``, on by default): with gradients into them the loss is cheapest when
  every picture looks alike, and the decoder stopped reading pictures (colour questions at 0.2).
* **Image warm-up** (training, ``image_warmup_steps``): the paper's encoders are pretrained CLIP towers;
  ours are tiny and trained from scratch, and inside the QA model the image tower learned too slowly
  to read the pictures (exact match 0.59, visual types 0.06-0.38). The demo run therefore first trains
  the tower alone to answer the picture's questions (:class:`ImageReadingHead`, not kept), then freezes
  it, as a pretrained tower would be: exact match 0.86.
* **expert_only.** Encoders, QGA, attention, embeddings, dense FFNs and the answer head are frozen;
  only the experts and routers of the MoE layers train (encoding then also runs without autograd).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmoe_core.adapter import ModelAdapter, RunOutput
from mmoe_core.spec import (AttributionTarget, ExampleField, GateSpec, ImageGrid, InputSpec, LabelSpec, OutputSpec,
                            PredictionSpec, RoutedLayerSpec, SourceSpec, TrainingPhase)
from mmoe_core.encoders import ClipTowers, EncoderSpec, build_towers
from mmoe_core.moe import FeedForward, SwitchMoE, switch_balance_loss
from mmoe_core.qa_text import AnswerVocab, SPECIAL_TOKENS, exact_match, normalise_answer
from mmoe_core.routing_record import PositionMeta, RoutingRecorder

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


# ---------------------------------------------------------------------------------------------
# Small pure functions (the math of the model).
# ---------------------------------------------------------------------------------------------

def repeat_to_length(x: Tensor, length: int) -> Tensor:
    """[B, N, ...] -> [B, length, ...] by nearest-index repetition (each item kept intact).

    When ``length < N`` items are averaged in equal areas instead, so that none is dropped.
    """
    n = x.shape[1]
    if length >= n:
        index = torch.arange(length, device=x.device) * n // length
        return x[:, index]
    flat = x.reshape(x.shape[0], n, -1).transpose(1, 2)
    return F.adaptive_avg_pool1d(flat, length).transpose(1, 2).reshape(x.shape[0], length, *x.shape[2:])


def stretch_valid_tokens(x: Tensor, counts: Tensor, length: int) -> Tensor:
    """Per example b, repeat its first ``counts[b]`` items of x [B, N, ...] over ``length`` positions."""
    positions = torch.arange(length, device=x.device)
    index = positions[None, :] * counts.clamp_min(1)[:, None] // length          # [B, length]
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    return x[rows, index]


def copy_targets(word_pieces: Sequence[tuple[str, int]], vocab: AnswerVocab, length: int) -> Tensor:
    """[length] answer-vocabulary id written at each position of a tokenised text (``vocab.pad_id``: none).

    ``word_pieces`` lists the text's whitespace-separated words with the number of BPE tokens each
    becomes; position 0 is the start token, as in the tokenised text. Every piece of a word gets the
    word's id (normalised as answers are: "OEKO-TEX." -> "oeko-tex"), so a pointer at any piece copies
    the whole word: CLIP's BPE splits digits and hyphens ("300" -> 3 pieces), so pieces are not words.
    Positions past ``length - 1`` (the end token's place after truncation) are dropped.
    """
    out = torch.full((length,), vocab.pad_id, dtype=torch.long)
    position = 1
    for word, pieces in word_pieces:
        end = min(position + pieces, length - 1)
        normalised = normalise_answer(word)
        if end > position and normalised in vocab.index:
            out[position:end] = vocab.index[normalised]
        position += pieces
        if position >= length - 1:
            break
    return out


def text_copy_targets(texts: Sequence[str], towers: ClipTowers, vocab: AnswerVocab) -> Tensor:
    """[U, L] :func:`copy_targets` of texts as ``towers.tokenize`` lays them out (L = its context length)."""
    from open_clip.tokenizer import basic_clean, whitespace_clean
    tokenizer = towers.tokenizer
    rows = []
    for text in texts:
        words = whitespace_clean(basic_clean(text or "")).lower().split(" ")
        rows.append(copy_targets([(w, len(tokenizer.encode(w))) for w in words if w], vocab, towers.context_length))
    return torch.stack(rows) if rows else torch.zeros(0, towers.context_length, dtype=torch.long)


def qga_weights(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Two source logits per token [..., 2] -> (alpha image, beta context), a softmax over the sources."""
    weights = F.softmax(logits, dim=-1)
    return weights[..., 0], weights[..., 1]


def joint_embedding(alpha: Tensor, beta: Tensor, image_tokens: Tensor, context_tokens: Tensor) -> Tensor:
    """e = alpha * I + beta * C, with per-position weights [B, L] and token features [B, L, D]."""
    return alpha.unsqueeze(-1) * image_tokens + beta.unsqueeze(-1) * context_tokens


def alignment_loss(projected_question: Tensor, source: Tensor) -> Tensor:
    """1 - cos(projected question, source), averaged over the batch (0 aligned, 1 orthogonal, 2 opposite)."""
    return (1.0 - F.cosine_similarity(projected_question, source, dim=-1)).mean()


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x [B, L, D] over the positions where mask [B, L] is True."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def decoder_balance_loss(recorder: RoutingRecorder, valid: Tensor) -> Tensor:
    """Switch balance loss summed over the recorded MoE calls, over valid decoder steps only."""
    total = valid.new_zeros((), dtype=torch.float32)
    for call in recorder.calls:
        router = call.router
        keep = valid.to(router.probs.device)
        total = total + switch_balance_loss(router.probs[keep], router.topk_ids[keep], router.probs.shape[-1])
    return total


def dominant_source(alpha: Sequence[float] | np.ndarray, beta: Sequence[float] | np.ndarray) -> str:
    """'image' when mean alpha over the question's tokens exceeds mean beta, else 'context'."""
    return "image" if float(np.mean(alpha)) > float(np.mean(beta)) else "context"


def start_in_complementary_halves(image_proj: nn.Linear, context_proj: nn.Linear) -> None:
    """Initialise the two source projections to write into complementary halves of the joint space.

    e_t = alpha_t * I_t + beta_t * C_t puts a picture patch and a context token on the same position;
    started in one shared space, the decoder's keys at a position mix both and the context's
    strongly structured tokens drown the patches. Started in disjoint halves, I and C stay
    separable at QGA's neutral start (alpha = beta = 0.5). Only the start is split: training may mix.
    """
    half = image_proj.out_features // 2
    with torch.no_grad():
        image_proj.weight[half:].zero_()
        image_proj.bias[half:].zero_()
        context_proj.weight[:half].zero_()
        context_proj.bias[:half].zero_()


def augment_pictures(pixels: Tensor, rng: np.random.Generator) -> Tensor:
    """Each picture [U, 3, S, S] turned by a random multiple of 90 degrees and mirrored half the time.

    None of the world's visual attributes changes under these (a turned triangle is still triangular,
    turned stripes are still striped), so the image warm-up sees 8 times as many distinct pictures.
    """
    out = []
    for picture in pixels:
        picture = torch.rot90(picture, int(rng.integers(4)), dims=(1, 2))
        out.append(picture.flip(2) if rng.random() < 0.5 else picture)
    return torch.stack(out) if out else pixels


def is_expert_or_router(parameter_name: str) -> bool:
    """Parameters that stay trainable in expert_only mode: the MoE experts and their routers."""
    return ".moe.experts." in parameter_name or ".moe.gate." in parameter_name


# ---------------------------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------------------------

class QuestionGuidedAttention(nn.Module):
    """QGA: per question token, softmax over (image, context) of a linear map of [token; pooled question].

    The pooled question is appended because the text tower is causal: early tokens ("what") have
    not yet seen the words that say what is asked.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(2 * dim, len(SOURCES))
        # Start neutral (alpha = beta = 0.5 for every token): which source wins must be learned.
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, question_tokens: Tensor, question_pooled: Tensor) -> tuple[Tensor, Tensor]:
        pooled = question_pooled.unsqueeze(1).expand_as(question_tokens)
        return qga_weights(self.score(torch.cat([question_tokens, pooled], dim=-1)))


class ImageReadingHead(nn.Module):
    """Training-only head of the image warm-up: the question attends over the image tokens -> first answer word.

    CLIP's image tower comes pretrained; a tiny tower trained from scratch inside the QA model learns
    to see far too slowly (measured: colour questions at the answer prior after 1,200 steps, while
    the same tower read colour at 0.9 when trained on its own). The warm-up trains the tower (and the
    model's image norm and projection) to answer the picture's questions through this head, then the
    tower is frozen, as a pretrained CLIP tower would be. The head is not part of the model's checkpoint.
    """

    def __init__(self, dim: int, vocab_size: int, heads: int = 2):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.out = nn.Linear(dim, vocab_size)

    def forward(self, model: "MoEMoEModel", batch: dict) -> Tensor:
        image = model.encode_image_tokens(batch["pixels"])[batch["source_index"]]      # [B, 1 + P, D]
        query = model.encode_question(batch["question_ids"])[1].unsqueeze(1)          # the question at EOT
        read, _ = self.attention(query, image, image, need_weights=False)
        return self.out((read + query)[:, 0])


@dataclass
class Encoded:
    """Encoder side of a batch of B questions over U distinct sources (product context + picture).

    The decoder memory is [question tokens; e] with e = alpha * I + beta * C over the joint length L.
    It is kept factorised (sources once, weights per question) because keys and values are linear in
    e: W e = alpha * (W I) + beta * (W C), so each source is projected once for all its questions.
    """
    question: Tensor          # [B, Lq, D] projected question tokens (+ segment embedding)
    question_valid: Tensor    # [B, Lq] True for the question's own tokens (SOT..EOT)
    question_pooled: Tensor   # [B, D] the question at its EOT
    alpha: Tensor             # [B, Lq] image weight per question position (padding included)
    beta: Tensor              # [B, Lq] context weight
    alpha_joint: Tensor       # [B, L] alpha stretched over the joint sequence
    beta_joint: Tensor        # [B, L]
    image: Tensor             # [U, L, D] image tokens repeated to L (layer-normed)
    context: Tensor           # [U, L, D] context tokens (layer-normed)
    source_index: Tensor      # [B] source row of each question
    joint_segment: Tensor     # [D] segment embedding added to every position of e
    qca_loss: Tensor          # L_QCA
    qia_loss: Tensor          # L_QIA
    copy_ids: Tensor | None = None   # [U, L] answer word id at each context position (pad_id: none)

    @property
    def batch_size(self) -> int:
        return self.question.shape[0]

    def joint(self) -> Tensor:
        """e [B, L, D], materialised (the decoder never needs it whole)."""
        return joint_embedding(self.alpha_joint, self.beta_joint, self.image[self.source_index],
                               self.context[self.source_index]) + self.joint_segment

    def memory_padding(self) -> Tensor:
        """[B, Lq + L] True where attention must not look (question padding)."""
        joint = torch.zeros(self.alpha_joint.shape, dtype=torch.bool, device=self.alpha_joint.device)
        return torch.cat([~self.question_valid, joint], dim=1)

    def project(self, linear: nn.Linear) -> Tensor:
        """``linear`` applied to the memory [B, Lq + L, D_out], projecting each source only once."""
        image = F.linear(self.image, linear.weight)[self.source_index]
        context = F.linear(self.context, linear.weight)[self.source_index]
        joint = joint_embedding(self.alpha_joint, self.beta_joint, image, context) + linear(self.joint_segment)
        return torch.cat([linear(self.question), joint], dim=1)  # alpha + beta = 1: one bias


class CrossAttention(nn.Module):
    """Multi-head attention from decoder steps to precomputed memory keys and values."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"model_dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def keys_values(self, encoded: Encoded) -> tuple[Tensor, Tensor]:
        return self._heads(encoded.project(self.key)), self._heads(encoded.project(self.value))

    def _heads(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)   # [B, H, N, d_head]

    def forward(self, x: Tensor, keys: Tensor, values: Tensor, padding: Tensor) -> Tensor:
        b, t, d = x.shape
        if keys.shape[0] != b:  # one encoded example, several decoder rows
            keys, values, padding = keys.expand(b, -1, -1, -1), values.expand(b, -1, -1, -1), padding.expand(b, -1)
        attend = ~padding[:, None, None, :]
        out = F.scaled_dot_product_attention(self._heads(self.query(x)), keys, values, attn_mask=attend)
        return self.out(out.transpose(1, 2).reshape(b, t, d))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: causal self-attention, cross-attention to [Q; e], FFN (dense or MoE)."""

    def __init__(self, dim: int, heads: int, mult: float, moe: SwitchMoE | None = None):
        super().__init__()
        self.self_norm = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_norm = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, heads)
        self.ffn_norm = nn.LayerNorm(dim)
        if moe is not None:
            self.moe = moe
        else:
            self.ffn = FeedForward(dim, dim, mult)

    @property
    def is_moe(self) -> bool:
        return hasattr(self, "moe")

    def forward(self, x: Tensor, memory_kv: tuple[Tensor, Tensor], memory_padding: Tensor, causal: Tensor,
                recorder: RoutingRecorder | None = None, meta: PositionMeta | None = None,
                capture: dict | None = None) -> Tensor:
        h = self.self_norm(x)
        x = x + self.self_attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        x = x + self.cross_attn(self.cross_norm(x), *memory_kv, memory_padding)
        h = self.ffn_norm(x)
        if not self.is_moe:
            return x + self.ffn(h)
        if capture is not None:
            capture.setdefault(self.moe.name, h)
        return x + self.moe(h, recorder=recorder, meta=meta)


def _text_only(towers: ClipTowers) -> ClipTowers:
    """Drop the image half of a CLIP used as a text encoder only (no dead weights in checkpoints)."""
    towers.clip.visual = None
    return towers


class MoEMoEModel(nn.Module):
    """Q, C, I encoders -> QGA joint e -> decoder with sparse-MoE odd layers -> answer words."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config = model_section(config)
        self.vocab = AnswerVocab(config["answer_vocab"])
        self.question_encoder = _text_only(build_towers(config["question_encoder"]))
        self.source_encoder = build_towers(config["source_encoder"])  # text half = C, image half = I
        dim = int(config["model_dim"])
        self.question_proj = nn.Linear(self.question_encoder.text_width, dim)
        self.context_norm = nn.LayerNorm(self.source_encoder.text_width)
        self.image_norm = nn.LayerNorm(self.source_encoder.vision_width)
        self.context_proj = nn.Linear(self.source_encoder.text_width, dim)
        self.image_proj = nn.Linear(self.source_encoder.vision_width, dim)
        start_in_complementary_halves(self.image_proj, self.context_proj)
        self.qga = QuestionGuidedAttention(dim)
        self.align_to_fixed_sources = bool(config.get("align_to_fixed_sources", False))
        self.align_question_context = nn.Linear(dim, dim)
        self.align_question_image = nn.Linear(dim, dim)
        self.segment = nn.Embedding(2, dim)  # 0: question part of the memory, 1: joint e
        self.max_answer_words = int(config["max_answer_words"])
        self.answer_embedding = nn.Embedding(len(self.vocab), dim)
        self.step_embedding = nn.Embedding(self.max_answer_words + 1, dim)
        # The decoder is told the question (what is asked) at every step; the answer can only come from e.
        self.question_to_decoder = nn.Linear(dim, dim)
        layers = []
        for i in range(int(config["decoder_layers"])):
            moe = None
            if i % 2 == 1:
                moe = SwitchMoE(dim, dim, int(config["num_experts"]), int(config["top_k"]), gate=config["gate"],
                                mult=float(config["ffn_mult"]), name=f"decoder.{i}.moe")
            layers.append(DecoderLayer(dim, int(config["decoder_heads"]), float(config["ffn_mult"]), moe))
        self.decoder = nn.ModuleList(layers)
        self.final_norm = nn.LayerNorm(dim)
        self.answer_head = nn.Linear(dim, len(self.vocab))
        self.copy = bool(config.get("copy", False))
        if self.copy:  # pointer-generator: P(w) = g * P_gen(w) + (1 - g) * attention mass on C positions of w
            self.pointer_query = nn.Linear(dim, dim)
            self.pointer_key = nn.Linear(dim, dim)
            self.copy_gate = nn.Linear(dim, 1)

        self.expert_only = False
        self.set_expert_only(bool(config.get("expert_only", False)))

    # ---- training modes ------------------------------------------------------------------------
    def set_expert_only(self, enabled: bool) -> None:
        """Freeze everything but the experts and routers (True), or train everything (False)."""
        self.expert_only = enabled
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(is_expert_or_router(name) or not enabled)
        # CLIP's contrastive temperature is never used here
        self.source_encoder.clip.logit_scale.requires_grad_(False)
        self.question_encoder.clip.logit_scale.requires_grad_(False)

    def moe_layers(self) -> list[SwitchMoE]:
        return [layer.moe for layer in self.decoder if layer.is_moe]

    # ---- encoder side --------------------------------------------------------------------------
    def encode_question(self, question_ids: Tensor, question_embeds: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(question tokens [B, Lq, D], the question at its EOT [B, D]) in the model's width."""
        _, states = self.question_encoder.encode_text(question_ids, question_embeds)
        question = self.question_proj(states)
        rows = torch.arange(question.shape[0], device=question.device)
        return question, question[rows, question_ids.argmax(dim=-1)]     # EOT has the largest id

    def encode_image_tokens(self, pixels: Tensor, patch_embeds: Tensor | None = None) -> Tensor:
        """Image tokens [U, 1 + P, D] ([CLS; patches]) in the model's width, before repetition to L."""
        _, states = self.source_encoder.encode_image(pixels, patch_embeds)
        return self.image_proj(self.image_norm(states))

    def encode(self, question_ids: Tensor, context_ids: Tensor, pixels: Tensor, source_index: Tensor | None = None,
               question_embeds: Tensor | None = None, context_embeds: Tensor | None = None,
               patch_embeds: Tensor | None = None, copy_ids: Tensor | None = None) -> Encoded:
        """Encode Q, C, I and weight the sources; ``*_embeds`` replace the input embeddings (attribution).

        ``copy_ids`` [U, L] (:func:`text_copy_targets` of the contexts) enables the copy pointer.

        ``context_ids``/``pixels`` may hold each distinct (context, picture) source once, with
        ``source_index`` [B] naming each question's source row: a product's picture and context are
        then encoded once for all its questions (same result as one row per question).
        """
        if source_index is None:
            source_index = torch.arange(question_ids.shape[0], device=question_ids.device)
        question, question_pooled = self.encode_question(question_ids, question_embeds)
        _, context_states = self.source_encoder.encode_text(context_ids, context_embeds)
        context = self.context_proj(self.context_norm(context_states))      # [U, L, D]
        image = self.encode_image_tokens(pixels, patch_embeds)             # [U, 1 + P, D]
        question_valid = question_ids != 0
        alpha, beta = self.qga(question, question_pooled)
        length = context.shape[1]
        counts = question_valid.sum(dim=1)
        question_mean = masked_mean(question, question_valid)
        context_mean = masked_mean(context, context_ids != 0)[source_index]
        image_mean = image.mean(dim=1)[source_index]
        if self.align_to_fixed_sources:
            context_mean, image_mean = context_mean.detach(), image_mean.detach()
        qca = alignment_loss(self.align_question_context(question_mean), context_mean)
        qia = alignment_loss(self.align_question_image(question_mean), image_mean)
        return Encoded(
            question=question + self.segment.weight[0], question_valid=question_valid,
            question_pooled=question_pooled, alpha=alpha, beta=beta,
            alpha_joint=stretch_valid_tokens(alpha, counts, length),
            beta_joint=stretch_valid_tokens(beta, counts, length),
            image=repeat_to_length(image, length), context=context, source_index=source_index,
            joint_segment=self.segment.weight[1], qca_loss=qca, qia_loss=qia,
            copy_ids=copy_ids if self.copy else None)


    # ---- decoder side --------------------------------------------------------------------------
    def memory_keys_values(self, encoded: Encoded) -> list[tuple[Tensor, Tensor]]:
        """Per decoder layer, the cross-attention keys and values of the memory (reusable across steps)."""
        return [layer.cross_attn.keys_values(encoded) for layer in self.decoder]

    def decode(self, encoded: Encoded, decoder_input: Tensor, recorder: RoutingRecorder | None = None,
               meta: PositionMeta | None = None, capture: dict | None = None,
               memory_kv: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """Teacher-forced logits [B, T, V] for decoder inputs [B, T] (<bos> first)."""
        steps = decoder_input.shape[1]
        positions = torch.arange(steps, device=decoder_input.device)
        question = self.question_to_decoder(encoded.question_pooled).unsqueeze(1)
        x = self.answer_embedding(decoder_input) + self.step_embedding(positions) + question
        causal = torch.ones(steps, steps, dtype=torch.bool, device=x.device).triu(1)
        memory_kv = memory_kv if memory_kv is not None else self.memory_keys_values(encoded)
        padding = encoded.memory_padding()
        for layer, kv in zip(self.decoder, memory_kv):
            x = layer(x, kv, padding, causal, recorder, meta, capture)
        h = self.final_norm(x)
        generated = self.answer_head(h)
        if not self.copy or encoded.copy_ids is None:
            return generated
        return self.mix_in_copies(encoded, h, generated)

    def mix_in_copies(self, encoded: Encoded, h: Tensor, generated: Tensor) -> Tensor:
        """Log-probabilities [B, T, V] of the pointer-generator mixture g * P_gen + (1 - g) * P_copy.

        P_copy points at positions of the joint sequence e (so QGA's weights shape what the pointer
        sees: with beta near 0 the context's words are invisible to it) and puts each position's
        attention on the answer word written at that context position. Returned as log-probabilities,
        so the cross-entropy and greedy decoding downstream are unchanged.
        """
        keys = encoded.project(self.pointer_key)[:, encoded.question.shape[1]:]      # [B_enc, L, D]
        targets = encoded.copy_ids[encoded.source_index]                              # [B_enc, L]
        b, steps, dim = h.shape
        if keys.shape[0] != b:  # one encoded example, several decoder rows (attribution)
            keys, targets = keys.expand(b, -1, -1), targets.expand(b, -1)
        copyable = targets != self.vocab.pad_id
        scores = self.pointer_query(h) @ keys.transpose(1, 2) / math.sqrt(dim)          # [B, T, L]
        attention = scores.masked_fill(~copyable[:, None, :], float("-inf")).softmax(dim=-1).nan_to_num(0.0)
        copied = torch.zeros_like(generated).scatter_add(2, targets[:, None, :].expand(-1, steps, -1), attention)
        gate = torch.sigmoid(self.copy_gate(h))
        gate = torch.where(copyable.any(dim=-1)[:, None, None], gate, torch.ones_like(gate))
        probs = gate * generated.softmax(dim=-1) + (1 - gate) * copied
        return probs.clamp_min(1e-12).log()

    @torch.no_grad()
    def greedy(self, encoded: Encoded) -> tuple[Tensor, Tensor]:
        """Greedy answer words: (ids [B, S] ending in <eos> or truncated, log-prob of each step [B, S]).

        After an example's <eos>, its later steps repeat <eos> with log-prob 0.
        """
        batch, device = encoded.batch_size, encoded.question.device
        memory_kv = self.memory_keys_values(encoded)
        decoder_input = torch.full((batch, 1), self.vocab.bos_id, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        chosen, scores = [], []
        for _ in range(self.max_answer_words + 1):
            logits = self.decode(encoded, decoder_input, memory_kv=memory_kv)[:, -1]
            logits[:, [self.vocab.pad_id, self.vocab.bos_id]] = float("-inf")  # never valid outputs
            log_probs = logits.log_softmax(dim=-1)
            step_score, step_ids = log_probs.max(dim=-1)
            step_ids = torch.where(finished, torch.full_like(step_ids, self.vocab.eos_id), step_ids)
            scores.append(torch.where(finished, torch.zeros_like(step_score), step_score))
            chosen.append(step_ids)
            finished = finished | (step_ids == self.vocab.eos_id)
            if bool(finished.all()):
                break
            decoder_input = torch.cat([decoder_input, step_ids[:, None]], dim=1)
        return torch.stack(chosen, dim=1), torch.stack(scores, dim=1)

    def decoder_input_for(self, answer_ids: Tensor) -> Tensor:
        """Teacher-forcing input: <bos> followed by all but the last answer id."""
        bos = torch.full_like(answer_ids[:, :1], self.vocab.bos_id)
        return torch.cat([bos, answer_ids[:, :-1]], dim=1)


def valid_steps(answer_ids: Tensor, eos_id: int) -> Tensor:
    """[B, S] True up to and including each row's first <eos> (all True when there is none)."""
    is_eos = answer_ids == eos_id
    seen_before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()
    return seen_before == 0


def picture_questions(examples: Sequence[dict], source_groups: Sequence[Sequence[int]]) -> list[list[int]]:
    """Per source group, its questions the picture answers (answer_source image or both).

    Datasets without answer sources (every label "unknown") use all questions of the group.
    """
    sources = {e["labels"].get("answer_source", "unknown") for e in examples}
    if sources <= {"unknown"}:
        return [list(group) for group in source_groups]
    return [[q for q in group if examples[q]["labels"].get("answer_source") in ("image", "both")]
            for group in source_groups]


def build_model(config: dict) -> MoEMoEModel:
    return MoEMoEModel(config)


# ---------------------------------------------------------------------------------------------
# Examples -> tensors.
# ---------------------------------------------------------------------------------------------

def examples_from_dataset(items, split_offset: int = 0) -> list[dict]:
    """QAItems (from :func:`mmoe_core.data.readers.read_qa_dataset`) -> adapter examples."""
    examples = []
    for i, item in enumerate(items):
        examples.append({
            "index": split_offset + i, "id": item.id,
            "labels": {"question_type": item.question_type or "unknown",
                       "answer_source": item.answer_source or "unknown", "category": item.category or "unknown"},
            "question": item.question, "context": item.context,
            "image_path": str(item.image) if item.image is not None else None,
            "answer": item.answer, "product_id": item.product_id,
            "context_conflict": bool(item.context_conflict) if item.context_conflict is not None else None,
        })
    return examples


def load_qa_examples(data_dir: Path | str, split: str = "test") -> list[dict]:
    from mmoe_core.data.readers import read_qa_dataset
    dataset = read_qa_dataset(data_dir, check_images=True, splits=(split,))
    return examples_from_dataset(dataset.splits[split])


def source_key(example: dict) -> tuple:
    """What identifies an example's sources: its context and its picture (path, or the object itself)."""
    picture = example.get("image")
    return (example.get("context") or "", id(picture) if picture is not None else example.get("image_path"))


class QAFeaturizer:
    """Turns examples into tensors for a model: BPE ids for Q and C, pixels for I, answer word ids.

    Pictures are read once and cached by path (a product's picture serves all its questions).
    """

    def __init__(self, model: MoEMoEModel):
        self.model = model
        self._pixels: dict[str, Tensor] = {}

    def pixels_of(self, example: dict) -> Tensor:
        towers = self.model.source_encoder
        if example.get("image") is not None:  # a PIL image built by hand (live playground)
            return towers.preprocess([example["image"]])[0]
        path = example.get("image_path")
        if not path:
            return towers.preprocess([None])[0]
        if path not in self._pixels:
            from mmoe_core.data.readers import load_image
            self._pixels[path] = towers.preprocess([load_image(path)])[0]
        return self._pixels[path]

    def answer_ids(self, answers: Sequence[str]) -> Tensor:
        steps = self.model.max_answer_words + 1
        rows = [self.model.vocab.encode(a, self.model.max_answer_words) for a in answers]
        out = torch.full((len(rows), steps), self.model.vocab.pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, :len(row)] = torch.tensor(row)
        return out

    def batch(self, examples: Sequence[dict], with_answers: bool = True) -> dict:
        """Tensors of the examples; each distinct (context, picture) source appears once."""
        rows: dict[tuple, int] = {}
        sources, source_index = [], []
        for e in examples:
            key = source_key(e)
            if key not in rows:
                rows[key] = len(sources)
                sources.append(e)
            source_index.append(rows[key])
        batch = {
            "question_ids": self.model.question_encoder.tokenize([e["question"] for e in examples]),
            "context_ids": self.model.source_encoder.tokenize([e.get("context") or "" for e in sources]),
            "pixels": torch.stack([self.pixels_of(e) for e in sources]),
            "source_index": torch.tensor(source_index, dtype=torch.long),
            "example_ids": [int(e["index"]) for e in examples],
        }
        if self.model.copy:
            batch["copy_ids"] = text_copy_targets([e.get("context") or "" for e in sources],
                                                  self.model.source_encoder, self.model.vocab)
        if with_answers:
            batch["answer_ids"] = self.answer_ids([e.get("answer") or "" for e in examples])
        return batch


def batch_to(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}


def encode_batch(model: MoEMoEModel, batch: dict) -> Encoded:
    return model.encode(batch["question_ids"], batch["context_ids"], batch["pixels"], batch.get("source_index"),
                        copy_ids=batch.get("copy_ids"))


def decoder_meta(model: MoEMoEModel, example_ids: Sequence[int], decoder_input: Tensor,
                 valid: Tensor | None) -> PositionMeta:
    """Routing metadata of the decoder MoE calls: one ``decoder_step`` position per answer step."""
    tokens = [[model.vocab.words[i] for i in row] for row in decoder_input.tolist()]
    return PositionMeta.uniform(DECODER_CALL, list(example_ids), decoder_input.shape[1], "decoder_step",
                                routed="decoder", gate="decoder", tokens=tokens,
                                valid=None if valid is None else valid.cpu())


def loss_parts(model: MoEMoEModel, batch: dict, recorder: RoutingRecorder | None = None) -> dict[str, Tensor]:
    """CE + L_QCA + L_QIA + lambda * L_aux (balance over decoder MoE layers), as separate parts."""
    config = model.config
    if model.expert_only:  # frozen backbone: no graph through the encoders
        with torch.no_grad():
            encoded = encode_batch(model, batch)
    else:
        encoded = encode_batch(model, batch)
    answer_ids = batch["answer_ids"]
    decoder_input = model.decoder_input_for(answer_ids)
    valid = answer_ids != model.vocab.pad_id
    recorder = recorder if recorder is not None else RoutingRecorder(keep_graph=True)
    meta = decoder_meta(model, batch["example_ids"], decoder_input, valid)
    logits = model.decode(encoded, decoder_input, recorder=recorder, meta=meta)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), answer_ids.reshape(-1),
                         ignore_index=model.vocab.pad_id)
    moe_calls = RoutingRecorder(keep_graph=True,
                                calls=[c for c in recorder.calls if c.layer.startswith("decoder.")])
    align = float(config.get("align_weight", 1.0))
    return {
        "ce": ce,
        "qca": align * encoded.qca_loss,
        "qia": align * encoded.qia_loss,
        "aux": float(config.get("aux_weight", 0.1)) * decoder_balance_loss(moe_calls, valid),
    }


# ---------------------------------------------------------------------------------------------
# Adapter.
# ---------------------------------------------------------------------------------------------

def exact_match_summary(rows: Sequence[tuple[bool, dict]], slice_labels: Sequence[str] = SLICE_LABELS) -> dict:
    """{"overall": {exact_match, n}, "by_<label>": {value: {exact_match, n}}} from (correct, labels) rows."""
    def block(flags: list[bool]) -> dict:
        return {"exact_match": float(np.mean(flags)) if flags else float("nan"), "n": len(flags)}

    summary = {"overall": block([c for c, _ in rows])}
    for label in slice_labels:
        groups: dict[str, list[bool]] = {}
        for correct, labels in rows:
            groups.setdefault(str(labels.get(label, "unknown")), []).append(correct)
        summary[f"by_{label}"] = {value: block(flags) for value, flags in sorted(groups.items())}
    return summary


def qga_agreement(qga_rows: Sequence[dict], examples: Sequence[dict]) -> dict:
    """Share of single-source questions (image or context) whose dominant QGA source is the gold one."""
    by_index = {int(e["index"]): e for e in examples}
    hits: dict[str, list[bool]] = {s: [] for s in SOURCES}
    for row in qga_rows:
        source = by_index[int(row["index"])]["labels"].get("answer_source")
        if source in hits:
            hits[source].append(dominant_source(row["alpha"], row["beta"]) == source)
    flags = hits["image"] + hits["context"]
    return {"agreement": float(np.mean(flags)) if flags else float("nan"), "n": len(flags),
            **{f"agreement_{s}": float(np.mean(v)) if v else float("nan") for s, v in hits.items()}}


class MoEMoEAdapter(ModelAdapter):
    family = FAMILY
    model: MoEMoEModel

    def __init__(self, model: nn.Module, config: dict, device: torch.device | str = "cpu"):
        super().__init__(model, config, device)
        self.featurizer = QAFeaturizer(self.model)

    # ---- declarations --------------------------------------------------------------------------
    title = "MoEMoE: multi-source multimodal QA"

    def fields(self) -> list[ExampleField]:
        return [ExampleField("question", "Question", "text", editable=True, role="title", max_chars=200),
                ExampleField("context", "Context", "long_text", editable=True, max_chars=1500),
                ExampleField("image", "Product picture", "image", editable=True),
                ExampleField("answer", "Gold answer", "text", role="gold"),
                ExampleField("product_id", "Product", "id")]

    def input_spec(self) -> list[InputSpec]:
        side = self.model.source_encoder.clip.visual.grid_size[0]
        return [InputSpec("question", "text_tokens", "question BPE tokens (question encoder Q)", field="question"),
                InputSpec("context", "text_tokens", "product context BPE tokens (context encoder C)", field="context"),
                InputSpec("image", "image_patches", "product picture patches (image encoder I)", field="image",
                          grid=ImageGrid(side, side, 0))]

    def routed_layers(self) -> list[RoutedLayerSpec]:
        gate = GateSpec("topk_softmax", "softmax", "topk_renormalised")
        return [RoutedLayerSpec(moe.name, moe.num_experts, moe.top_k, gate,
                                routed="decoder hidden state at each answer step",
                                gate_sees="the same decoder hidden state", calls=(DECODER_CALL,))
                for moe in self.model.moe_layers()]

    def prediction_spec(self) -> PredictionSpec:
        return PredictionSpec("answer", "greedy answer words; exact match after normalisation",
                              headline=("exact_match",), item="answer")

    def attribution_targets(self) -> list[AttributionTarget]:
        return [AttributionTarget("answer_logit", "logit of the first answer word (gold if in the vocabulary, "
                                                  "else predicted) at decoder step 0"),
                AttributionTarget("router_logit", "router logit of (layer, expert, decoder step)", needs_layer=True)]

    def output_spec(self) -> list[OutputSpec]:
        return [OutputSpec("qga", "source_weights",
                           "question-guided attention: per question token (SOT..EOT), a weight alpha on the image "
                           "and beta on the context (alpha + beta = 1); the joint input is e = alpha I + beta C",
                           sources=(SourceSpec("image", "alpha", "alpha (image)", "#1f77b4"),
                                    SourceSpec("context", "beta", "beta (context)", "#ff7f0e")),
                           truth_label="answer_source", positions="tokens")]

    def label_spec(self) -> list[LabelSpec]:
        return [LabelSpec("question_type", "what the question asks (colour, brand, size ...)", ground_truth=True),
                LabelSpec("answer_source", "where the answer lives (generated with the world)", ground_truth=True,
                          decides={"image": ("image",), "context": ("context",)}),
                LabelSpec("category", "product category", ground_truth=True)]

    def training_phases(self) -> list[TrainingPhase]:
        """Phase switches of the schedule; each option holds the (absolute) step its phase starts."""
        cfg = model_section(self.config)
        last = (self.config.get("training") or {}).get("steps_done") or (self.config.get("training") or {}).get("steps")
        phases = []
        for option, label in (("image_warmup_steps", "image tower frozen"), ("qga_warmup_steps", "QGA free"),
                              ("expert_only_after_steps", "expert-only")):
            step = cfg.get(option)
            if isinstance(step, (int, float)) and step > 0 and (last is None or step < last):
                phases.append(TrainingPhase(option, int(step), label))
        return sorted(phases, key=lambda p: p.step)

    def model_card(self) -> dict[str, str]:
        cfg = model_section(self.config)
        return {"decoder": f"{cfg.get('decoder_layers')} layers, width {cfg.get('model_dim')}",
                "experts": f"{cfg.get('num_experts')} per MoE layer, top-{cfg.get('top_k')}",
                "lambda (aux weight)": str(cfg.get("aux_weight")), "copy pointer": str(cfg.get("copy")),
                "image warm-up steps": str(cfg.get("image_warmup_steps")),
                "QGA warm-up steps": str(cfg.get("qga_warmup_steps"))}

    # ---- data ----------------------------------------------------------------------------------
    def load_examples(self, data_dir: Path, split: str = "test") -> list[dict]:
        return load_qa_examples(data_dir, split)

    # ---- running -------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, examples: Sequence[dict], record: bool = True, batch_size: int = 32,
            progress: bool = False) -> RunOutput:
        model = self.model.eval()
        recorder = RoutingRecorder(keep_graph=False) if record else None
        predictions, qga_rows, representations = [], [], []
        starts = range(0, len(examples), batch_size)
        if progress:
            from tqdm import tqdm
            starts = tqdm(starts, desc="moemoe run", unit="batch")
        first_moe = model.moe_layers()[0].name if model.moe_layers() else None
        for start in starts:
            chunk = list(examples[start:start + batch_size])
            batch = batch_to(self.featurizer.batch(chunk, with_answers=False), self.device)
            encoded = encode_batch(model, batch)
            answer_ids, step_scores = model.greedy(encoded)
            # One more teacher-forced pass over the chosen words: same states as the greedy steps
            # (causal decoder), so each step is recorded exactly once.
            decoder_input = model.decoder_input_for(answer_ids)
            valid = valid_steps(answer_ids, model.vocab.eos_id)
            capture: dict = {}
            meta = decoder_meta(model, batch["example_ids"], decoder_input, valid)
            model.decode(encoded, decoder_input, recorder=recorder, meta=meta, capture=capture)
            if first_moe is not None:
                representations.append(capture[first_moe][:, 0].float().cpu())
            question_tokens = model.question_encoder.token_strings(batch["question_ids"].cpu())
            for row, example in enumerate(chunk):
                answer = model.vocab.decode(answer_ids[row].tolist())
                gold = example.get("answer")
                predictions.append({
                    "index": int(example["index"]), "id": example.get("id"),
                    "prediction": answer, "answer": answer, "gold": gold,
                    "correct": bool(exact_match(answer, gold)) if gold is not None else None,
                    "score": float(step_scores[row].sum()),
                })
                keep = encoded.question_valid[row].cpu()
                qga_rows.append({
                    "index": int(example["index"]),
                    "tokens": [t for t, k in zip(question_tokens[row], keep.tolist()) if k],
                    "alpha": encoded.alpha[row].cpu()[keep].float().tolist(),
                    "beta": encoded.beta[row].cpu()[keep].float().tolist(),
                })
        reps = torch.cat(representations) if representations else None
        return RunOutput(predictions, recorder, {"qga": qga_rows}, reps)

    def summarize(self, predictions: Sequence[dict], examples: Sequence[dict]) -> dict:
        """Exact match overall and by question type, answer source and category."""
        by_index = {int(e["index"]): e for e in examples}
        rows = []
        for p in predictions:
            example = by_index.get(int(p["index"]), {})
            gold = example.get("answer", p.get("gold"))
            rows.append((bool(exact_match(p.get("prediction"), gold)), example.get("labels", {})))
        return exact_match_summary(rows)

    # ---- attribution ---------------------------------------------------------------------------
    def _single_batch(self, example: dict) -> dict:
        return batch_to(self.featurizer.batch([example], with_answers=False), self.device)

    def attribution_inputs(self, example: dict) -> dict[str, Tensor]:
        batch = self._single_batch(example)
        model = self.model
        with torch.no_grad():
            return {
                "question": model.question_encoder.embed_text_tokens(batch["question_ids"]).detach(),
                "context": model.source_encoder.embed_text_tokens(batch["context_ids"]).detach(),
                "image": model.source_encoder.embed_image_patches(batch["pixels"]).detach(),
            }

    def attribution_forward(self, example: dict, target: str, layer: str | None = None,
                            expert: int | None = None, position: int | None = None,
                            call: str | None = None) -> Callable[..., Tensor]:
        model = self.model.eval()
        batch = self._single_batch(example)
        with torch.no_grad():
            predicted, _ = model.greedy(encode_batch(model, batch))

        def encode(question_embeds: Tensor, context_embeds: Tensor, patch_embeds: Tensor) -> Encoded:
            n = question_embeds.shape[0]
            copy_ids = batch.get("copy_ids")
            return model.encode(batch["question_ids"].expand(n, -1), batch["context_ids"].expand(n, -1),
                                batch["pixels"].expand(n, -1, -1, -1), None,
                                question_embeds, context_embeds, patch_embeds,
                                copy_ids=None if copy_ids is None else copy_ids.expand(n, -1))

        if target == "answer_logit":
            gold_first = model.vocab.encode(example.get("answer") or "", 1)[0]
            first_word = gold_first if gold_first not in (model.vocab.unk_id, model.vocab.eos_id) \
                else int(predicted[0, 0])

            def answer_logit(question_embeds, context_embeds, patch_embeds):
                encoded = encode(question_embeds, context_embeds, patch_embeds)
                bos = torch.full((question_embeds.shape[0], 1), model.vocab.bos_id, device=question_embeds.device)
                return model.decode(encoded, bos)[:, 0, first_word]
            return answer_logit

        if target == "router_logit":
            layers = {moe.name: moe for moe in model.moe_layers()}
            if layer not in layers:
                raise KeyError(f"unknown routed layer {layer!r}; layers: {sorted(layers)}")
            if call not in (None, DECODER_CALL):
                raise ValueError(f"{layer} is only called as {DECODER_CALL!r}, not {call!r}")
            decoder_input = model.decoder_input_for(predicted)
            steps = int(valid_steps(predicted, model.vocab.eos_id)[0].sum())
            if position is None or not 0 <= position < steps:
                raise ValueError(f"position must be a decoder step in 0..{steps - 1}, got {position}")
            if expert is None or not 0 <= expert < layers[layer].num_experts:
                raise ValueError(f"expert must be in 0..{layers[layer].num_experts - 1}, got {expert}")

            def router_logit(question_embeds, context_embeds, patch_embeds):
                encoded = encode(question_embeds, context_embeds, patch_embeds)
                recorder = RoutingRecorder(keep_graph=True)
                rows = decoder_input.expand(question_embeds.shape[0], -1)
                model.decode(encoded, rows, recorder=recorder)
                logits = next(c.router.logits for c in recorder.calls if c.layer == layer)
                return logits[:, position, expert]
            return router_logit

        raise ValueError(f"unknown attribution target {target!r}; choose answer_logit or router_logit")

    def input_labels(self, example: dict) -> dict[str, list[str]]:
        batch = self._single_batch(example)
        side = self.model.source_encoder.clip.visual.grid_size[0]
        return {
            "question": self.model.question_encoder.token_strings(batch["question_ids"].cpu())[0],
            "context": self.model.source_encoder.token_strings(batch["context_ids"].cpu())[0],
            "image": [f"patch {r},{c}" for r in range(side) for c in range(side)],
        }


# ---------------------------------------------------------------------------------------------
# Trainer hooks for ``python -m mmoe_core.train --family moemoe``.
# ---------------------------------------------------------------------------------------------

class MoEMoETrainer:
    """:class:`mmoe_core.training.FamilyTrainer` of the family.

    Batches hold whole products (every question of a product), ``batch_size`` questions on average,
    so that each picture and context is encoded once per step for all its questions.

    ``options.family_options`` (all optional): any key of :func:`default_model_config` (sizes,
    ``aux_weight`` = lambda, ``align_weight``); ``expert_only_after_steps`` (None: never; 0: expert-only
    from the start; N: backbone warm-up for N steps, then only experts and routers train);
    ``init_from`` (a checkpoint directory whose weights start the run, e.g. for an expert-only phase);
    ``qga_warmup_steps`` (QGA held at its neutral start, alpha = beta = 0.5, for the first N steps: the
    decoder first learns to read *both* sources; otherwise whichever source pays off first takes all the
    weight and the other, invisible to the decoder, is never learned).
    ``image_warmup_steps`` (N > 0: the first N steps train only the image tower, with the model's image
    norm and projection and the question encoder, to answer the picture's questions through an
    :class:`ImageReadingHead`, on ``image_warmup_products`` products per step (default 32) with turned and
    mirrored pictures; from step N on the tower is frozen). Step numbers (``qga_warmup_steps``,
    ``expert_only_after_steps``) count from the run's first step, warm-up included.
    lambda defaults to ``options.balance`` when that is set, else 0.1; the loop's own balance loss is
    then switched off (``options.balance = 0``) because it would also count the padding steps.
    """

    family = FAMILY

    def __init__(self, options):
        from mmoe_core.data.readers import read_qa_dataset
        self.options = options
        family_options = dict(options.family_options or {})
        self.expert_only_after = family_options.pop("expert_only_after_steps", None)
        self.init_from = family_options.pop("init_from", None)
        self.qga_warmup = int(family_options.pop("qga_warmup_steps", 0) or 0)
        self.image_warmup = int(family_options.pop("image_warmup_steps", 0) or 0)
        self.image_warmup_products = int(family_options.pop("image_warmup_products", 32))
        if self.image_warmup and self.expert_only_after is not None and self.expert_only_after < self.image_warmup:
            raise ValueError(f"image_warmup_steps={self.image_warmup} needs the backbone trainable during the warm-up; "
                             f"expert_only_after_steps={self.expert_only_after} freezes it before the warm-up ends")
        dataset = read_qa_dataset(options.data_dir, check_images=True, splits=("train",))
        self.examples = examples_from_dataset(dataset.splits["train"])
        if not self.examples:
            raise ValueError(f"{options.data_dir}: no training questions")
        vocab = AnswerVocab.build(e["answer"] for e in self.examples)
        aux_weight = family_options.pop("aux_weight", options.balance or 0.1)
        options.balance = 0.0
        unknown = sorted(set(family_options) - set(default_model_config()))
        if unknown:
            raise ValueError(f"unknown moemoe family options {unknown}")
        self._model_config = default_model_config(
            vocab.words, gate=options.gate, num_experts=options.experts, top_k=min(options.top_k, options.experts),
            aux_weight=float(aux_weight), expert_only=self.expert_only_after == 0,
            expert_only_after_steps=self.expert_only_after, qga_warmup_steps=self.qga_warmup,
            image_warmup_steps=self.image_warmup, **family_options)
        self.by_source: dict[tuple, list[int]] = {}
        for i, e in enumerate(self.examples):
            self.by_source.setdefault(source_key(e), []).append(i)
        self.model: MoEMoEModel | None = None
        self.reading_head: ImageReadingHead | None = None
        self._steps = 0

    # -- protocol --------------------------------------------------------------------------------
    def model_config(self) -> dict:
        return self._model_config

    def data_config(self) -> dict:
        return {"root": str(self.options.data_dir), "world": "qa", "split": "train",
                "questions": len(self.examples), "sources": len(self.by_source)}

    def build_model(self, config: dict) -> MoEMoEModel:
        model = MoEMoEModel(config)
        if self.init_from:
            from mmoe_core.checkpoint import load_config, load_into, load_state
            if model_section(load_config(self.init_from))["answer_vocab"] != model.vocab.words:
                raise ValueError(f"{self.init_from}: its answer vocabulary differs from this dataset's")
            load_into(model, load_state(self.init_from), source=str(self.init_from))
        return model

    def setup(self, model: MoEMoEModel, device) -> None:
        """Tokenise every question and source once; the batches then only index tensors."""
        self.model = model
        featurizer = QAFeaturizer(model)
        sources = [self.examples[questions[0]] for questions in self.by_source.values()]
        self.context_ids = model.source_encoder.tokenize([e["context"] for e in sources])
        self.copy_ids = (text_copy_targets([e["context"] for e in sources], model.source_encoder, model.vocab)
                         if model.copy else None)
        self.pixels = torch.stack([featurizer.pixels_of(e) for e in sources])
        self.question_ids = model.question_encoder.tokenize([e["question"] for e in self.examples])
        self.answer_ids = featurizer.answer_ids([e["answer"] for e in self.examples])
        self.source_groups = list(self.by_source.values())
        if self.image_warmup:
            self.reading_head = ImageReadingHead(int(model.config["model_dim"]), len(model.vocab)).to(device)
            self.picture_questions = picture_questions(self.examples, self.source_groups)
            if not any(len(q) for q in self.picture_questions):
                raise ValueError("image warm-up: no training question is answered by the picture")

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.source_groups) / self._sources_per_batch())

    def _sources_per_batch(self) -> int:
        per_source = len(self.examples) / max(1, len(self.source_groups))
        return max(1, round(self.options.batch_size / per_source))

    def train_batches(self, rng: np.random.Generator, epoch: int):
        while self._steps < self.image_warmup:  # the run's first steps, before any QA batch
            self._apply_phase(self._steps)
            self._steps += 1
            yield self._image_warmup_batch(rng)
        per_batch = self._sources_per_batch()
        order = rng.permutation(len(self.source_groups))
        for start in range(0, len(order), per_batch):
            self._apply_phase(self._steps)
            self._steps += 1
            chosen = order[start:start + per_batch]
            questions, source_index = [], []
            for row, g in enumerate(chosen):
                questions += self.source_groups[g]
                source_index += [row] * len(self.source_groups[g])
            q = torch.as_tensor(questions)
            src = torch.as_tensor(chosen)
            yield {
                "question_ids": self.question_ids[q],
                "context_ids": self.context_ids[src],
                "pixels": self.pixels[src],
                **({"copy_ids": self.copy_ids[src]} if self.copy_ids is not None else {}),
                "source_index": torch.as_tensor(source_index),
                "answer_ids": self.answer_ids[q],
                "example_ids": questions,
            }

    def _image_warmup_batch(self, rng: np.random.Generator) -> dict:
        """Pictures of ``image_warmup_products`` products (turned and mirrored) with their picture questions."""
        candidates = [g for g, questions in enumerate(self.picture_questions) if len(questions)]
        chosen = rng.choice(candidates, min(self.image_warmup_products, len(candidates)), replace=False)
        questions, source_index = [], []
        for row, g in enumerate(chosen):
            questions += self.picture_questions[g]
            source_index += [row] * len(self.picture_questions[g])
        q = torch.as_tensor(questions)
        return {"phase": "image_warmup", "pixels": augment_pictures(self.pixels[torch.as_tensor(chosen)], rng),
                "question_ids": self.question_ids[q], "source_index": torch.as_tensor(source_index),
                "first_answer_ids": self.answer_ids[q, 0]}

    def _apply_phase(self, step: int) -> None:
        """Switch the training phase before the batch of ``step`` (0-based) is trained."""
        model = self.model
        if self.image_warmup and step >= self.image_warmup:
            model.source_encoder.clip.visual.requires_grad_(False)   # as a pretrained CLIP tower
        if self.expert_only_after is not None and step >= self.expert_only_after:
            if not model.expert_only:
                model.set_expert_only(True)
        elif not model.expert_only:
            model.qga.requires_grad_(step >= self.qga_warmup)

    def loss_parts(self, model: MoEMoEModel, batch: dict, recorder: RoutingRecorder | None) -> dict[str, Tensor]:
        if batch.get("phase") == "image_warmup":
            logits = self.reading_head(model, batch)
            return {"image_reading": F.cross_entropy(logits, batch["first_answer_ids"])}
        return loss_parts(model, batch, recorder)

    def trainable_parameters(self, model: MoEMoEModel, options) -> list[tuple[str, nn.Parameter]]:
        """Every parameter that may train in this run (the experts and routers alone if expert-only
        from the start); a later expert-only switch freezes the rest through ``requires_grad``."""
        if self.expert_only_after == 0:
            return [(n, p) for n, p in model.named_parameters() if is_expert_or_router(n)]
        head = [] if self.reading_head is None else \
            [(f"image_reading_head.{n}", p) for n, p in self.reading_head.named_parameters()]
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad] + head


# ---------------------------------------------------------------------------------------------
# The demo run.
# ---------------------------------------------------------------------------------------------

# Sizes small enough for the test suite (seconds on 2 CPU cores); the demo model uses the defaults.
TINY_MODEL = {
    "question_encoder": EncoderSpec(kind="tiny", name="tiny-32", extra={"context_length": 16, "text_layers": 1,
                                                                        "text_width": 16, "embed_dim": 16}).to_dict(),
    "source_encoder": EncoderSpec(kind="tiny", name="tiny-32",
                                  extra={"context_length": 48, "text_layers": 1, "text_width": 16,
                                         "vision_layers": 1, "vision_width": 16, "patch_size": 16,
                                         "embed_dim": 16}).to_dict(),
    "model_dim": 16, "decoder_heads": 2, "ffn_mult": 1.0,
}

# One torch thread, as the MMoE recipes: the same run whether it is built alone or beside another
# (thread counts change float reductions; measured EM 0.865 on one thread, 0.852 on two).
DEMO_IMAGE_WARMUP_STEPS = 800
DEMO_QA_STEPS = 900
DEMO_EXPERT_ONLY_STEPS = 300
DEMO_BACKBONE_STEPS = DEMO_IMAGE_WARMUP_STEPS + DEMO_QA_STEPS

DEMO_RECIPE = dict(
    run="moemoe-qa", world="qa",
    options=dict(family=FAMILY, steps=DEMO_BACKBONE_STEPS + DEMO_EXPERT_ONLY_STEPS, batch_size=64, lr=3e-3,
                 lr_schedule="cosine", warmup_steps=30, weight_decay=0.01, grad_clip=1.0, experts=4, top_k=2,
                 balance=0.0, snapshot_every=200, log_every=10, seed=0, threads=1,
                 family_options={"aux_weight": 0.1, "image_warmup_steps": DEMO_IMAGE_WARMUP_STEPS,
                                 "qga_warmup_steps": DEMO_IMAGE_WARMUP_STEPS + 300,
                                 "expert_only_after_steps": DEMO_BACKBONE_STEPS}),
    tiny=dict(steps=12, batch_size=20, warmup_steps=2, snapshot_every=4, log_every=2,
              family_options={"image_warmup_steps": 3, "qga_warmup_steps": 5, "expert_only_after_steps": 9,
                              **TINY_MODEL}),
    description=f"MoEMoE on the product QA world: {DEMO_IMAGE_WARMUP_STEPS} steps of image warm-up (the tiny image "
                f"tower learns to read the pictures, standing in for CLIP's pretraining, then is frozen), "
                f"{DEMO_QA_STEPS} steps of backbone warm-up on the QA loss (QGA neutral for the first 300), then "
                f"{DEMO_EXPERT_ONLY_STEPS} expert-only steps (encoders, QGA, attention frozen; experts and routers "
                "train) with lambda = 0.1",
)


def demo_recipe(scale: str = "default"):
    """The ``moemoe-qa`` demo run for :mod:`mmoe_core.demo` (``scale`` "tiny" is applied by the demo)."""
    from mmoe_core.demo import Recipe
    return Recipe(**DEMO_RECIPE)

