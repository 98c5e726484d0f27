"""Property tests (hypothesis): the dataset readers never crash on arbitrary input (they return examples or
raise DatasetError naming the file), and the layer indicators keep their invariants on any routing."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analysis.routing import layer_summary, softmax
from mmoe_core.data.readers import DatasetError
from mmoe_core.families.hf_moe.data import load_examples, read_jsonl

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
RECORD_KEYS = st.sampled_from(["id", "text", "question", "image", "answer", "labels", "other"])
RECORDS = st.dictionaries(RECORD_KEYS, JSON_VALUES, max_size=6)
LINES = st.lists(
    st.one_of(RECORDS.map(json.dumps), JSON_VALUES.map(json.dumps), st.text(max_size=40)), min_size=1, max_size=6
)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(LINES)
def test_jsonl_reader_returns_examples_or_a_dataset_error(lines):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "test.jsonl"
        path.write_text("\n".join(lines), encoding="utf-8")
        try:
            examples = read_jsonl(path)
        except DatasetError as exc:
            assert path.name in str(exc)  # the message names the file
            return
        for example in examples:  # what the reader lets through is what the adapters rely on
            assert isinstance(example["text"], str) and example["text"].strip()
            assert isinstance(example["labels"], dict)
            assert all(isinstance(v, (str, int, float, bool)) for v in example["labels"].values())


@SETTINGS
@given(st.binary(max_size=200), st.sampled_from(["test.jsonl", "labels.json"]))
def test_a_folder_of_arbitrary_bytes_is_refused_cleanly(data, name):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "test.jsonl").write_text('{"text": "a b c"}\n')
        (root / name).write_bytes(data)
        try:
            examples, labels = load_examples(root, "test")
        except DatasetError:
            return
        assert isinstance(examples, list) and isinstance(labels, list)


@st.composite
def routings(draw):
    experts = draw(st.integers(1, 12))
    k = draw(st.integers(1, experts))
    positions = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([0.0, 0.1, 1.0, 10.0, 100.0]))  # uniform to nearly one-hot
    rng = np.random.default_rng(seed)
    probs = softmax(rng.normal(size=(positions, experts)) * scale)
    ids = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return probs, ids


@SETTINGS
@given(routings())
def test_layer_indicators_keep_their_invariants(routing):
    probs, ids = routing
    experts = probs.shape[1]
    s = layer_summary(probs, ids)
    assert math.isclose(sum(s["load"]), 1.0, abs_tol=1e-9) and min(s["load"]) >= 0
    assert math.isclose(sum(s["importance"]), 1.0, abs_tol=1e-9)
    assert -1e-9 <= s["token_entropy"] <= math.log(experts) + 1e-9
    assert -1e-9 <= s["marginal_entropy"] <= math.log(experts) + 1e-9
    assert 1 - 1e-9 <= s["effective_experts"] <= experts + 1e-9
    assert set(s["dead_experts"]) <= set(range(experts))
