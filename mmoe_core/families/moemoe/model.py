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
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmoe_core.encoders import ClipTowers, build_towers
from mmoe_core.families.moemoe.config import DECODER_CALL, SOURCES, model_section
from mmoe_core.families.moemoe.ops import (
    alignment_loss,
    is_expert_or_router,
    joint_embedding,
    masked_mean,
    qga_weights,
    repeat_to_length,
    start_in_complementary_halves,
    stretch_valid_tokens,
)
from mmoe_core.families.moemoe.vocab import AnswerVocab
from mmoe_core.moe import FeedForward, SwitchMoE
from mmoe_core.routing_record import PositionMeta, RoutingRecorder


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


@dataclass
class Encoded:
    """Encoder side of a batch of B questions over U distinct sources (product context + picture).

    The decoder memory is [question tokens; e] with e = alpha * I + beta * C over the joint length L.
    It is kept factorised (sources once, weights per question) because keys and values are linear in
    e: W e = alpha * (W I) + beta * (W C), so each source is projected once for all its questions.
    """

    question: Tensor  # [B, Lq, D] projected question tokens (+ segment embedding)
    question_valid: Tensor  # [B, Lq] True for the question's own tokens (SOT..EOT)
    question_pooled: Tensor  # [B, D] the question at its EOT
    alpha: Tensor  # [B, Lq] image weight per question position (padding included)
    beta: Tensor  # [B, Lq] context weight
    alpha_joint: Tensor  # [B, L] alpha stretched over the joint sequence
    beta_joint: Tensor  # [B, L]
    image: Tensor  # [U, L, D] image tokens repeated to L (layer-normed)
    context: Tensor  # [U, L, D] context tokens (layer-normed)
    source_index: Tensor  # [B] source row of each question
    joint_segment: Tensor  # [D] segment embedding added to every position of e
    qca_loss: Tensor  # L_QCA
    qia_loss: Tensor  # L_QIA
    copy_ids: Tensor | None = None  # [U, L] answer word id at each context position (pad_id: none)

    @property
    def batch_size(self) -> int:
        return self.question.shape[0]

    def joint(self) -> Tensor:
        """e [B, L, D], materialised (the decoder never needs it whole)."""
        return (
            joint_embedding(
                self.alpha_joint, self.beta_joint, self.image[self.source_index], self.context[self.source_index]
            )
            + self.joint_segment
        )

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
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # [B, H, N, d_head]

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

    def forward(
        self,
        x: Tensor,
        memory_kv: tuple[Tensor, Tensor],
        memory_padding: Tensor,
        causal: Tensor,
        recorder: RoutingRecorder | None = None,
        meta: PositionMeta | None = None,
        capture: dict | None = None,
    ) -> Tensor:
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
                moe = SwitchMoE(
                    dim,
                    dim,
                    int(config["num_experts"]),
                    int(config["top_k"]),
                    gate=config["gate"],
                    mult=float(config["ffn_mult"]),
                    name=f"decoder.{i}.moe",
                )
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
        return question, question[rows, question_ids.argmax(dim=-1)]  # EOT has the largest id

    def encode_image_tokens(self, pixels: Tensor, patch_embeds: Tensor | None = None) -> Tensor:
        """Image tokens [U, 1 + P, D] ([CLS; patches]) in the model's width, before repetition to L."""
        _, states = self.source_encoder.encode_image(pixels, patch_embeds)
        return self.image_proj(self.image_norm(states))

    def encode(
        self,
        question_ids: Tensor,
        context_ids: Tensor,
        pixels: Tensor,
        source_index: Tensor | None = None,
        question_embeds: Tensor | None = None,
        context_embeds: Tensor | None = None,
        patch_embeds: Tensor | None = None,
        copy_ids: Tensor | None = None,
    ) -> Encoded:
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
        context = self.context_proj(self.context_norm(context_states))  # [U, L, D]
        image = self.encode_image_tokens(pixels, patch_embeds)  # [U, 1 + P, D]
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
            question=question + self.segment.weight[0],
            question_valid=question_valid,
            question_pooled=question_pooled,
            alpha=alpha,
            beta=beta,
            alpha_joint=stretch_valid_tokens(alpha, counts, length),
            beta_joint=stretch_valid_tokens(beta, counts, length),
            image=repeat_to_length(image, length),
            context=context,
            source_index=source_index,
            joint_segment=self.segment.weight[1],
            qca_loss=qca,
            qia_loss=qia,
            copy_ids=copy_ids if self.copy else None,
        )

    # ---- decoder side --------------------------------------------------------------------------
    def memory_keys_values(self, encoded: Encoded) -> list[tuple[Tensor, Tensor]]:
        """Per decoder layer, the cross-attention keys and values of the memory (reusable across steps)."""
        return [layer.cross_attn.keys_values(encoded) for layer in self.decoder]

    def decode(
        self,
        encoded: Encoded,
        decoder_input: Tensor,
        recorder: RoutingRecorder | None = None,
        meta: PositionMeta | None = None,
        capture: dict | None = None,
        memory_kv: list[tuple[Tensor, Tensor]] | None = None,
    ) -> Tensor:
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
        keys = encoded.project(self.pointer_key)[:, encoded.question.shape[1] :]  # [B_enc, L, D]
        targets = encoded.copy_ids[encoded.source_index]  # [B_enc, L]
        b, steps, dim = h.shape
        if keys.shape[0] != b:  # one encoded example, several decoder rows (attribution)
            keys, targets = keys.expand(b, -1, -1), targets.expand(b, -1)
        copyable = targets != self.vocab.pad_id
        scores = self.pointer_query(h) @ keys.transpose(1, 2) / math.sqrt(dim)  # [B, T, L]
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


def build_model(config: dict) -> MoEMoEModel:
    return MoEMoEModel(config)


def encode_batch(model: MoEMoEModel, batch: dict) -> Encoded:
    return model.encode(
        batch["question_ids"],
        batch["context_ids"],
        batch["pixels"],
        batch.get("source_index"),
        copy_ids=batch.get("copy_ids"),
    )


def decoder_meta(
    model: MoEMoEModel, example_ids: Sequence[int], decoder_input: Tensor, valid: Tensor | None
) -> PositionMeta:
    """Routing metadata of the decoder MoE calls: one ``decoder_step`` position per answer step."""
    tokens = [[model.vocab.words[i] for i in row] for row in decoder_input.tolist()]
    return PositionMeta.uniform(
        DECODER_CALL,
        list(example_ids),
        decoder_input.shape[1],
        "decoder_step",
        routed="decoder",
        gate="decoder",
        tokens=tokens,
        valid=None if valid is None else valid.cpu(),
    )
