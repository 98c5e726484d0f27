"""Small pure functions: the math of the MoEMoE model (lengths, QGA weights, losses, copy targets)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmoe_core.encoders import ClipTowers
from mmoe_core.families.moemoe.vocab import AnswerVocab
from mmoe_core.moe import switch_balance_loss
from mmoe_core.qa_text import normalise_answer
from mmoe_core.routing_record import RoutingRecorder


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
    index = positions[None, :] * counts.clamp_min(1)[:, None] // length  # [B, length]
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


def valid_steps(answer_ids: Tensor, eos_id: int) -> Tensor:
    """[B, S] True up to and including each row's first <eos> (all True when there is none)."""
    is_eos = answer_ids == eos_id
    seen_before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()
    return seen_before == 0
