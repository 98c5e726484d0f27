"""Answer text of QA families: normalisation and exact match (the QA metric), shared by every family
that answers questions (MoEMoE, the Hugging Face vision-language MoE). MoEMoE's closed answer
vocabulary lives with that family (``mmoe_core.families.moemoe.vocab``).
"""

from __future__ import annotations

import re
import string

_SPACES = re.compile(r"\s+")
_EDGE_PUNCTUATION = string.punctuation + "“”‘’"


def normalise_answer(text: str | None) -> str:
    """Lower-case, trim punctuation at word edges and collapse spaces ("Navy  Blue." -> "navy blue")."""
    if text is None:
        return ""
    words = (w.strip(_EDGE_PUNCTUATION) for w in _SPACES.split(str(text).lower()))
    return " ".join(w for w in words if w)


def answer_words(text: str) -> list[str]:
    return normalise_answer(text).split()


def exact_match(prediction: str | None, gold: str | None) -> bool:
    """Exact match after :func:`normalise_answer` (the QA metric)."""
    return normalise_answer(prediction) == normalise_answer(gold)
