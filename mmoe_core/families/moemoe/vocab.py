"""MoEMoE's answer vocabulary: whole answer words, not BPE pieces.

Answers in the product QA world are short (1-3 words from a closed set), so the MoEMoE decoder
predicts whole words from a vocabulary built from the training answers: a greedy decode of <= 3
words plus an end token. The vocabulary is a plain list of strings so that it can live in a
checkpoint's ``config.json``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from mmoe_core.qa_text import answer_words

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)


class AnswerVocab:
    """Word vocabulary of the answers: ids 0..3 are <pad>, <bos>, <eos>, <unk>."""

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if tuple(words[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"an answer vocabulary must start with {SPECIAL_TOKENS}")
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}
        if len(self.index) != len(words):
            raise ValueError("duplicate words in the answer vocabulary")

    @staticmethod
    def build(answers: Iterable[str], min_count: int = 1) -> AnswerVocab:
        """Every normalised answer word seen at least ``min_count`` times, in a stable (sorted) order."""
        counts = Counter(w for a in answers for w in answer_words(a))
        return AnswerVocab([*SPECIAL_TOKENS, *sorted(w for w, c in counts.items() if c >= min_count)])

    def __len__(self) -> int:
        return len(self.words)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    @property
    def unk_id(self) -> int:
        return 3

    def encode(self, answer: str, max_words: int) -> list[int]:
        """Word ids of the answer (truncated to ``max_words``) followed by <eos>."""
        ids = [self.index.get(w, self.unk_id) for w in answer_words(answer)[:max_words]]
        return ids + [self.eos_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first <eos>; special tokens other than <unk> are dropped."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            out.append(self.words[i] if 0 <= i < len(self.words) else UNK)
        return " ".join(out)
