"""Cached reads of a run: the store, its tables, its JSON files, the model's declaration, the live model.

Every cache is keyed by the run and its published version (:func:`run_version`: the manifest's hash and
the version directory), so a republished run is never served from a stale cache. Store handles and the
live model are ``st.cache_resource`` (one per process, shared by every session); tables and summaries are
``st.cache_data``. Nothing here draws anything: messages about a run that cannot be opened are the
business of :mod:`pages.state`.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from analysis import figures as F
from analysis.store import EXAMPLE_KEY, RunStore, list_runs, resolve_root, run_status
from mmoe_core.spec import ModelSpec, RoutedLayerSpec


def artifacts_root() -> Path:
    return resolve_root()


def available_runs() -> list[str]:
    """Published runs under the artifacts root (a directory listing: cheap, not cached)."""
    return list_runs(artifacts_root())


# ----------------------------------------------------------------------------------------- versions

_manifest_memo: dict[tuple, str] = {}


def run_version(run: str) -> str:
    """The cache key of a run's published version: the hash of its manifest plus a hash of the version
    directory's path (memoised on path, mtime and size: a stat per call). A republish (new version dir,
    new manifest) or another artifacts root gives a new value, so every cache keyed by it refreshes."""
    from analysis.hashing import file_sha256

    path = Path(os.path.realpath(artifacts_root() / "runs" / run)) / "manifest.json"
    try:
        st_ = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    key = (str(path), st_.st_mtime_ns, st_.st_size)
    h = _manifest_memo.get(key)
    if h is None:
        if len(_manifest_memo) >= 256:  # bounded: every republish adds a key
            _manifest_memo.clear()
        where = hashlib.sha256(str(path.parent).encode()).hexdigest()[:8]
        h = _manifest_memo[key] = f"{file_sha256(path)[:16]}-{where}"
    return h


@st.cache_resource(show_spinner=False, max_entries=16)
def _open_store(run: str, root: str, version: str) -> RunStore:
    return RunStore(run, root)


def store_for(run: str) -> RunStore:
    """The cached :class:`RunStore` of ``run`` (reopened when the run is republished)."""
    store = _open_store(run, str(artifacts_root()), run_version(run))
    if not store.is_current():  # republished between the version check and now
        _open_store.clear()
        store = _open_store(run, str(artifacts_root()), run_version(run))
    return store


@st.cache_data(show_spinner=False, ttl=15, max_entries=32)
def _status(run: str, root: str, version: str) -> tuple[str, str]:
    s = run_status(run, root)
    return s.state, s.message


def status(run: str) -> tuple[str, str]:
    """(state, message) of ``run``: "ready", "stale", "partial" or "missing" (cached for a few seconds)."""
    return _status(run, str(artifacts_root()), run_version(run))


# ----------------------------------------------------------------------------------------- declaration


@st.cache_resource(show_spinner=False, max_entries=32)
def _spec(run: str, version: str, _store: RunStore) -> ModelSpec | None:
    try:
        return _store.spec()
    except ValueError:  # a run built before the spec was stored: the status says stale, with the command
        return None


def spec(run: str) -> ModelSpec:
    """The model's declaration stored with ``run`` (an empty one, titled by the family, for a run built
    before declarations were stored: the status check asks for a rebuild)."""
    found = _spec(run, run_version(run), store_for(run))
    if found is not None:
        return found
    family = str(manifest(run).get("family") or "unknown")
    return ModelSpec(family=family, title=family)


def layer_specs(run: str) -> dict[str, RoutedLayerSpec]:
    """{layer name: its declaration} in declaration order."""
    return {layer.name: layer for layer in spec(run).routed_layers}


def layer_names(run: str) -> list[str]:
    return list(layer_specs(run))


def manifest(run: str) -> dict:
    return dict(store_for(run).manifest or {})


# ----------------------------------------------------------------------------------------- tables


@st.cache_data(show_spinner=False, max_entries=128)
def _table(run: str, version: str, name: str, columns: tuple | None, _store: RunStore) -> pd.DataFrame:
    return _store.table(name, columns=list(columns) if columns else None)


def table(run: str, name: str, columns: Sequence[str] | None = None) -> pd.DataFrame | None:
    """A whole table of ``run`` (cached); None when the run has no such table. Tables with a ``layer``
    column come in the run's declared layer order."""
    store = store_for(run)
    if not store.has(name):
        return None
    frame = _table(run, run_version(run), name, tuple(columns) if columns else None, store)
    return F.in_layer_order(frame, layer_names(run))


def examples(run: str) -> pd.DataFrame | None:
    """The run's examples table (keyed by ``example_index``), or None."""
    frame = table(run, "examples")
    return frame.sort_values(EXAMPLE_KEY, kind="stable").reset_index(drop=True) if frame is not None else None


def predictions(run: str) -> pd.DataFrame | None:
    return table(run, "predictions")


@st.cache_data(show_spinner=False, max_entries=64)
def _json(run: str, version: str, name: str, _store: RunStore) -> Any:
    return _store.read_json(name)


def read_json(run: str, name: str) -> Any:
    """``<name>.json`` of ``run`` (cached); None when absent or unreadable."""
    try:
        return _json(run, run_version(run), name, store_for(run))
    except (FileNotFoundError, ValueError):
        return None


@st.cache_data(show_spinner=False, max_entries=64)
def _loads(run: str, version: str, by: tuple, _store: RunStore) -> pd.DataFrame:
    return _store.layer_loads(by=list(by) or None)


def layer_loads(run: str, by: Sequence[str] = ()) -> pd.DataFrame | None:
    """Per (layer, expert) slots and combine weight with their shares (cached); None without routing."""
    store = store_for(run)
    if not (store.has("routing_loads") or store.has("routing")):
        return None
    return F.in_layer_order(_loads(run, run_version(run), tuple(by), store), layer_names(run))


@st.cache_data(show_spinner=False, max_entries=64)
def _entropies(run: str, version: str, layers: tuple, sample: int, _store: RunStore) -> dict:
    return {layer: _store.entropy_values(layer, sample=sample) for layer in layers}


def entropy_values(run: str, layers: Sequence[str], sample: int = 20_000) -> dict:
    """{layer: per-position router entropies} (a uniform sample of at most ``sample``), cached."""
    store = store_for(run)
    if not store.has("routing") and not store.has("routing_entropy_sample"):
        return {}
    return _entropies(run, run_version(run), tuple(layers), int(sample), store)


@st.cache_data(show_spinner=False, max_entries=256)
def _example_routing(run: str, version: str, example_index: int, _store: RunStore) -> pd.DataFrame:
    return _store.example_routing(example_index)


def example_routing(run: str, example_index: int) -> pd.DataFrame | None:
    """Every routed position of one example in every layer (cached); None without a routing table."""
    store = store_for(run)
    if not store.has("routing"):
        return None
    return _example_routing(run, run_version(run), int(example_index), store)


@st.cache_data(show_spinner="Summarising the source weights…", max_entries=16)
def _source_weights(run: str, version: str, output_name: str, _store: RunStore):
    from analysis.source_weights import long_weights, summarise

    output = next(o for o in spec(run).outputs if o.name == output_name)
    weights = _store.table(output_name)
    labels = [label.name for label in spec(run).labels]
    return long_weights(weights, output), summarise(weights, examples(run), output, labels)


def source_weights(run: str, output_name: str):
    """(weights one row per example and position, :class:`analysis.source_weights.SourceWeightsSummary`)
    of a declared ``source_weights`` output (cached)."""
    return _source_weights(run, run_version(run), output_name, store_for(run))


# ----------------------------------------------------------------------------------------- live model


@st.cache_resource(show_spinner=False, max_entries=4)
def _live_model(run: str, checkpoint_hash: str | None, root: str):
    from analysis.live import load_base_examples, load_live_adapter, warm_up

    adapter = load_live_adapter(run, root)
    base = load_base_examples(adapter, run, root)
    if base:  # lazy imports and caches are paid here, under the loading spinner, not by the first edit
        warm_up(adapter, base[0], attribution=False)
    return adapter, {int(ex["index"]): ex for ex in base}, threading.Lock()


def live_model(run: str):
    """(adapter, base examples by example_index, lock) of the run's checkpoint: loaded once per process
    and shared by every session and page. The lock serialises live runs (a knockout changes the shared
    model for the length of a run). Raises what loading raises (a checkpoint or dataset gone)."""
    from analysis.live import run_inputs

    inputs = run_inputs(run, artifacts_root())
    return _live_model(run, inputs.checkpoint_hash, str(artifacts_root()))
