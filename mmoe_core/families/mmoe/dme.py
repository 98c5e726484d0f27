"""DME: description-aware mention enhancement (optional MMoE input option, ``--dme``).

For each mention, choose the description that best matches it among the candidate entities sharing its
name, and append it to the mention text (``mention [SEP] sentence [SEP] chosen description``).

A *chooser* is any callable ``chooser(mention_text, candidate_descs) -> index`` (an LLM behind an API,
a rule, a person). Offline, :class:`EmbeddingChooser` uses the model's own text tower: cosine similarity
between the mention's text CLS and each candidate's entity-text CLS (``name [SEP] desc``), batched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from mmoe_core.families.mmoe.data import entity_text, mention_text

Chooser = Callable[[str, Sequence[str]], int]


def best_by_similarity(query: torch.Tensor, candidates: torch.Tensor) -> int:
    """Index of the candidate row [C, D] with the highest cosine similarity to ``query`` [D]."""
    return int(F.cosine_similarity(candidates, query.unsqueeze(0), dim=-1).argmax())


class EmbeddingChooser:
    """Offline DME chooser: the model's text-embedding similarity (text CLS of the towers)."""

    def __init__(self, model, device: torch.device | str = "cpu", batch_size: int = 256):
        self.model, self.device, self.batch_size = model, torch.device(device), batch_size

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        towers = self.model.towers
        was_training = self.model.training
        self.model.eval()
        out = []
        for a in range(0, len(texts), self.batch_size):
            ids = towers.tokenize(texts[a : a + self.batch_size]).to(self.device)
            out.append(towers.encode_text(ids)[0].float().cpu())
        self.model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, towers.embed_dim)

    def __call__(self, mention: str, candidate_descs: Sequence[str]) -> int:
        vectors = self.embed([mention, *candidate_descs])
        return best_by_similarity(vectors[0], vectors[1:])

    def choose_many(self, mentions: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[int | None]:
        """Batched: every distinct text embedded once."""
        texts = sorted(set(mentions) | {d for c in candidates for d in c})
        row = {t: i for i, t in enumerate(texts)}
        vectors = self.embed(texts)
        return [
            best_by_similarity(vectors[row[m]], vectors[[row[d] for d in c]]) if c else None
            for m, c in zip(mentions, candidates)
        ]


def choose_descriptions(
    mentions: Sequence[str], candidates: Sequence[Sequence[str]], chooser: Chooser
) -> list[int | None]:
    """Index of the chosen description per mention (None when it has no candidate)."""
    many = getattr(chooser, "choose_many", None)
    if callable(many):
        return many(mentions, candidates)
    return [int(chooser(m, c)) if c else None for m, c in zip(mentions, candidates)]


def choose_for_examples(adapter, examples: Sequence[dict], chooser: Chooser | None = None) -> list[str | None]:
    """The description to append to each adapter example (candidates: the KB entities sharing its name).

    Candidates are compared as entity texts (``name [SEP] desc``), as the model reads them.
    """
    dataset = adapter.dataset
    if dataset is None:
        adapter.kb()
        dataset = adapter.dataset
    groups = dataset.name_groups
    cand_entities = [groups.get(ex["mention"], []) for ex in examples]
    cand_texts = [[entity_text(e.name, e.desc) for e in group] for group in cand_entities]
    plain = [mention_text(ex["mention"], ex["sentence"]) for ex in examples]
    chooser = chooser or EmbeddingChooser(adapter.model, adapter.device)
    choice = choose_descriptions(plain, cand_texts, chooser)
    return [group[i].desc if i is not None else None for group, i in zip(cand_entities, choice)]
