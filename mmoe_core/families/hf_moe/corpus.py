"""The corpus world: short documents from four known domains, for a text MoE language model.

Domains (the ``domain`` label of every record, ground truth for expert specialisation):

* ``entity``: the entity world's knowledge-base descriptions and mention sentences
  (:func:`mmoe_core.data.entity_world.build_entity_world`, planned in memory, no pictures);
* ``product``: sentences of the product-QA world's product contexts
  (:func:`mmoe_core.data.qa_world.build_qa_world`);
* ``arithmetic``: chains of small sums, differences and products ("12 + 7 = 19 . 19 - 4 = 15 .");
* ``code``: code-like lines (assignments, loops, conditions, function definitions, calls).

Written as ``corpus_{train,dev,test}.jsonl`` records ``{"id", "text", "labels": {"domain"}}`` (the
family's JSONL format) plus ``labels.json`` and ``world.json`` (seed, scale, counts).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

GENERATOR_VERSION = "corpus-world/1"
DOMAINS = ("entity", "product", "arithmetic", "code")
SPLITS = ("train", "dev", "test")
# Documents per domain and split.
SCALES = {"tiny": {"train": 40, "dev": 8, "test": 12}, "default": {"train": 900, "dev": 60, "test": 120}}
SENTENCES_PER_DOC = (3, 5)

_VARS = ("x", "y", "n", "total", "count", "value", "step", "size")
_FUNCS = ("scale", "shift", "clip", "double", "square", "offset", "limit", "bump")
_OPS = ("+", "-", "*")


def _arithmetic(rng: np.random.Generator) -> str:
    value = int(rng.integers(1, 40))
    parts = []
    for _ in range(int(rng.integers(3, 6))):
        op = _OPS[int(rng.integers(0, 3))] if value < 60 else "-"
        n = int(rng.integers(2, 6)) if op == "*" else int(rng.integers(1, 30))
        if op == "-" and n > value:
            op = "+"
        result = value + n if op == "+" else value - n if op == "-" else value * n
        parts.append(f"{value} {op} {n} = {result} .")
        value = result
    return " ".join(parts)


def _code_line(rng: np.random.Generator) -> str:
    a, b = rng.choice(_VARS, 2, replace=False)
    n = int(rng.integers(1, 20))
    kind = int(rng.integers(0, 6))
    if kind == 0:
        return f"{a} = {b} {_OPS[int(rng.integers(0, 3))]} {n}"
    if kind == 1:
        return f"for i in range ( {n} ) : {a} = {a} + i"
    if kind == 2:
        return f"if {a} > {n} : {b} = {a} - {n}"
    if kind == 3:
        f = _FUNCS[int(rng.integers(0, len(_FUNCS)))]
        return f"def {f} ( {a} ) : return {a} {_OPS[int(rng.integers(0, 3))]} {n}"
    if kind == 4:
        return f"print ( {a} , {b} )"
    f = _FUNCS[int(rng.integers(0, len(_FUNCS)))]
    return f"{a} = {f} ( {b} )"


def _code(rng: np.random.Generator) -> str:
    return " ; ".join(_code_line(rng) for _ in range(int(rng.integers(3, 6))))


def _sentences(text: str) -> list[str]:
    return [s.strip() + "." for s in text.split(". ") if s.strip(" .")]


def _pool_docs(pool: list[str], count: int, rng: np.random.Generator) -> list[str]:
    docs = []
    for _ in range(count):
        k = int(rng.integers(SENTENCES_PER_DOC[0], SENTENCES_PER_DOC[1] + 1))
        picked = rng.choice(len(pool), size=min(k, len(pool)), replace=False)
        docs.append(" ".join(pool[int(i)].rstrip(".") + "." for i in picked))
    return docs


def build_corpus(seed: int = 0, scale: str = "default") -> dict[str, list[dict]]:
    """Records per split; a pure function of (seed, scale). Entity and product sentences of the test
    split come from entities / products the train split never shows."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {sorted(SCALES)}")
    from mmoe_core.data.entity_world import build_entity_world
    from mmoe_core.data.qa_world import build_qa_world

    rng = np.random.default_rng([seed, 7])
    world_scale = "tiny" if scale == "tiny" else "default"
    entity_world = build_entity_world(seed, world_scale)
    qa_world = build_qa_world(seed, world_scale)
    # Pools by split: entities in order (70/10/20), mention sentences by their own split; products by split.
    n = len(entity_world.entities)
    cut = {"train": (0, int(0.7 * n)), "dev": (int(0.7 * n), int(0.8 * n)), "test": (int(0.8 * n), n)}
    entity_pool = {
        s: [sent for e in entity_world.entities[a:b] for sent in _sentences(e.desc)]
        + [m.sentence for m in entity_world.mentions if m.split == s]
        for s, (a, b) in cut.items()
    }
    product_pool = {
        s: [sent for p in qa_world.products if p.split == s for sent in _sentences(p.context)] for s in SPLITS
    }
    out: dict[str, list[dict]] = {}
    for split in SPLITS:
        count = SCALES[scale][split]
        docs = {
            "entity": _pool_docs(entity_pool[split], count, rng),
            "product": _pool_docs(product_pool[split], count, rng),
            "arithmetic": [_arithmetic(rng) for _ in range(count)],
            "code": [_code(rng) for _ in range(count)],
        }
        rows = [
            {"id": f"{split}-{d}-{i:04d}", "text": text, "labels": {"domain": d}}
            for d in DOMAINS
            for i, text in enumerate(docs[d])
        ]
        order = rng.permutation(len(rows))
        out[split] = [rows[int(i)] for i in order]
    return out


LABELS = {
    "domain": {
        "description": "which generator wrote the document (entity, product, arithmetic, code)",
        "ground_truth": True,
    }
}


def write_corpus_world(out_dir: str | Path, scale: str = "default", seed: int = 0) -> Path:
    """Write the world into ``out_dir`` (files replaced atomically one by one; world.json last)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(seed, scale)
    for split, rows in corpus.items():
        tmp = out / f".corpus_{split}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(out / f"corpus_{split}.jsonl")
    (out / "labels.json").write_text(json.dumps(LABELS, indent=1))
    info = {
        "world": "corpus",
        "seed": seed,
        "scale": scale,
        "generator_version": GENERATOR_VERSION,
        "counts": {s: len(r) for s, r in corpus.items()},
        "domains": list(DOMAINS),
    }
    tmp = out / ".world.json.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(out / "world.json")
    return out


def corpus_is_built(out_dir: str | Path, scale: str = "default", seed: int = 0) -> bool:
    path = Path(out_dir) / "world.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (
        info.get("world") == "corpus"
        and info.get("scale") == scale
        and info.get("seed") == seed
        and info.get("generator_version") == GENERATOR_VERSION
        and all((Path(out_dir) / f"corpus_{s}.jsonl").is_file() for s in SPLITS)
    )
