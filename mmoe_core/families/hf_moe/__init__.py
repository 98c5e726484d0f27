"""The Hugging Face MoE family: local ``transformers`` MoE checkpoints (text and vision-language).

Registered as ``hf_moe``; it opens any folder whose ``config.json`` has a ``model_type`` and no
MoEscope ``family`` key (see :mod:`.loading`). Modules: :mod:`.loading` (open a folder),
:mod:`.routing` (routers: gate description, recording, knockout), :mod:`.encoding` (inputs and
position kinds), :mod:`.adapter` (the contract), :mod:`.data` (JSONL and product-QA examples),
:mod:`.corpus` (the corpus world), :mod:`.build` (small configs, tokenizer, processor),
:mod:`.trainer` and :mod:`.demo` (the two demo runs).
"""

from __future__ import annotations

from pathlib import Path

from mmoe_core.registry import Family, World, register, register_world

from .adapter import FAMILY, HFMoEAdapter
from .loading import load_snapshot, open_model, read_config, read_sidecar, recognises


def load(ckpt_dir: Path, device=None, snapshot: int | None = None) -> HFMoEAdapter:
    """Open a local Hugging Face model folder as an adapter (``snapshot``: snapshots/step_<N>)."""
    ckpt_dir = Path(ckpt_dir)
    model, tokenizer, processor, target = open_model(ckpt_dir, device)
    if snapshot is not None:
        load_snapshot(model, ckpt_dir, snapshot)
    return HFMoEAdapter(
        model,
        read_config(ckpt_dir) or {},
        target,
        tokenizer=tokenizer,
        processor=processor,
        path=ckpt_dir,
        sidecar=read_sidecar(ckpt_dir),
    )


def _demo_runs(scale: str):
    from .demo import demo_runs

    return demo_runs(scale)


def _build_corpus(out_dir: Path, scale: str, seed: int) -> None:
    from .corpus import write_corpus_world

    write_corpus_world(out_dir, scale, seed)


def _corpus_built(out_dir: Path, scale: str, seed: int) -> bool:
    from .corpus import corpus_is_built

    return corpus_is_built(out_dir, scale, seed)


CORPUS_WORLD = register_world(
    World(
        "corpus",
        _build_corpus,
        _corpus_built,
        "documents of four known domains (entity, product, arithmetic, code) for a text MoE language model",
    )
)
FAMILY_ENTRY = register(
    Family(FAMILY, HFMoEAdapter.title, HFMoEAdapter, load=load, recognises=recognises, demo_runs=_demo_runs)
)
