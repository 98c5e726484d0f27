"""Hugging Face MoE family data: the JSONL reader's checks, the product-QA world read directly, the
corpus world."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mmoe_core.data.readers import DatasetError
from mmoe_core.families.hf_moe import corpus
from mmoe_core.families.hf_moe.data import load_examples, read_jsonl


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_records_become_examples(tmp_path):
    (tmp_path / "pics").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "pics" / "a.png")
    path = _write(
        tmp_path / "data.jsonl",
        [
            {
                "id": "x1",
                "text": "a red mug",
                "image": "pics/a.png",
                "answer": "red",
                "question": "colour?",
                "labels": {"source": "image", "n": 3},
            },
            "",
            {"text": "plain text only", "note": "kept aside"},
        ],
    )
    (tmp_path / "labels.json").write_text(
        json.dumps({"source": {"description": "where", "ground_truth": True, "decides": {"image": ["image"]}}})
    )
    examples, labels = load_examples(path, "test")
    assert [e["index"] for e in examples] == [0, 1]
    first, second = examples
    assert first["id"] == "x1" and first["image_path"] == str((tmp_path / "pics" / "a.png").resolve())
    assert first["labels"] == {"source": "image", "n": "3"} and first["question"] == "colour?"
    assert second["id"] == "data-3" and "image_path" not in second and second["extra"] == {"note": "kept aside"}
    assert labels[0].name == "source" and labels[0].ground_truth and labels[0].decides == {"image": ("image",)}
    assert [lab.name for lab in labels] == ["source", "n"]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"image": "a.png"}, "line 1, field 'text': required"),
        ({"text": ""}, "field 'text': required"),
        ({"text": "x", "image": "../outside.png"}, "field 'image'.*no '..'"),
        ({"text": "x", "image": "/etc/passwd"}, "field 'image'.*not absolute"),
        ({"text": "x", "image": "missing.png"}, "image not found"),
        ({"text": "x", "image": 3}, "expected a relative path string"),
        ({"text": "x", "labels": ["a"]}, "field 'labels': expected an object"),
        ({"text": "x", "labels": {"a": {"b": 1}}}, "labels.a"),
        ({"text": "x", "answer": 5}, "field 'answer': expected a string"),
        ("[1, 2]", "expected an object"),
        ("{not json", "line 1: invalid JSON"),
    ],
)
def test_jsonl_errors_name_line_and_field(tmp_path, record, message):
    path = _write(tmp_path / "bad.jsonl", [record])
    with pytest.raises(DatasetError, match=message):
        read_jsonl(path)


def test_jsonl_rejects_duplicates_and_empty(tmp_path):
    with pytest.raises(DatasetError, match="duplicate id 'a'"):
        read_jsonl(_write(tmp_path / "dup.jsonl", [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]))
    with pytest.raises(DatasetError, match="no records"):
        read_jsonl(_write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(DatasetError, match="no test.jsonl"):
        load_examples(tmp_path / "nothing_here", "test")


def test_symlink_out_of_folder_is_refused(tmp_path):
    outside = tmp_path / "outside.png"
    Image.new("RGB", (4, 4)).save(outside)
    inner = tmp_path / "data"
    inner.mkdir()
    (inner / "link.png").symlink_to(outside)
    with pytest.raises(DatasetError, match="leaves the data folder"):
        read_jsonl(_write(inner / "d.jsonl", [{"text": "x", "image": "link.png"}]))


def test_product_qa_world_read_directly(tmp_path):
    from mmoe_core.data.generate import generate_qa_world

    root = generate_qa_world(tmp_path / "qa", seed=0, scale="tiny", progress=False)
    examples, labels = load_examples(root, "test")
    assert examples and all(Path(e["image_path"]).is_file() for e in examples)
    assert {e["labels"]["answer_source"] for e in examples} == {"image", "context", "both"}
    assert all(e["text"] and e["question"] and e["answer"] for e in examples)
    decisive = next(lab for lab in labels if lab.decides)
    assert decisive.name == "answer_source" and decisive.decides["image"] == ("image",)


def test_corpus_world(tmp_path):
    out = corpus.write_corpus_world(tmp_path / "corpus", "tiny", seed=0)
    assert corpus.corpus_is_built(out, "tiny", 0) and not corpus.corpus_is_built(out, "default", 0)
    examples, labels = load_examples(out, "train")
    counts = {d: sum(e["labels"]["domain"] == d for e in examples) for d in corpus.DOMAINS}
    assert counts == {d: corpus.SCALES["tiny"]["train"] for d in corpus.DOMAINS}
    assert labels[0].name == "domain" and labels[0].ground_truth
    assert corpus.build_corpus(0, "tiny") == corpus.build_corpus(0, "tiny")  # deterministic
    arithmetic = next(e["text"] for e in examples if e["labels"]["domain"] == "arithmetic")
    for equation in arithmetic.split(" . "):
        left, right = equation.strip(" .").split(" = ")
        assert eval(left) == int(right)  # noqa: S307 -- generated digits and + - * only


@pytest.mark.parametrize("pack", [False, True])
def test_training_rows_start_with_the_inference_prompt(tmp_path, pack):
    """The VL trainer's sequences begin with exactly the prompt the adapter generates after."""
    import numpy as np

    from mmoe_core.data.generate import generate_qa_world
    from mmoe_core.families.hf_moe import encoding as enc
    from mmoe_core.families.hf_moe.build import build_vl_processor, build_word_tokenizer
    from mmoe_core.families.hf_moe.trainer import _qa_texts, qa_batch, qa_groups, qa_row, short_context

    root = generate_qa_world(tmp_path / "qa", seed=0, scale="tiny", progress=False)
    examples, _ = load_examples(root, "train")
    tok = build_word_tokenizer(_qa_texts(examples), vision=True)
    processor = build_vl_processor(tok)
    order = enc.QUESTION_LAST if pack else enc.QUESTION_FIRST
    group = [examples[i] for i in qa_groups(examples, pack, np.random.default_rng(0))[0]]
    row = qa_row(processor, group, order)
    prompt = enc.encode_vl(processor, [group[0]], order)["input_ids"][0].tolist()
    assert row["ids"][: len(prompt)] == prompt and not any(row["label"][: len(prompt)])
    answers = tok.decode([t for t, lab in zip(row["ids"], row["label"]) if lab and t != tok.eos_token_id])
    assert answers.split() == " ".join(e["answer"].lower() for e in group).split()
    short = short_context(group[0]["text"], [e["answer"] for e in group], 0.0, np.random.default_rng(0))
    assert len(short) < len(group[0]["text"])
    batch = qa_batch([row, qa_row(processor, group, order, short)], tok.pad_token_id, prompt_labels=True)
    assert batch["pixel_values"].shape[0] == 2 * int(batch["image_grid_thw"][0].prod())
    assert ((batch["labels"] != -100) & (batch["prompt_labels"] != -100)).sum() == 0


@pytest.mark.parametrize("pack", [False, True])
def test_curriculum_rows_spliced_equal_the_processors(tmp_path, pack):
    """The curriculum's shortened contexts are spliced into the cached rows (no processor call per step):
    every spliced row equals the processor's own row for that text, token for token, pixels included."""
    import numpy as np
    import torch

    from mmoe_core.data.generate import generate_qa_world
    from mmoe_core.families.hf_moe import encoding as enc
    from mmoe_core.families.hf_moe.build import build_vl_processor, build_word_tokenizer
    from mmoe_core.families.hf_moe.trainer import _qa_texts, qa_groups, qa_row, short_context, with_context

    root = generate_qa_world(tmp_path / "qa", seed=0, scale="tiny", progress=False)
    examples, _ = load_examples(root, "train")
    tok = build_word_tokenizer(_qa_texts(examples), vision=True)
    processor = build_vl_processor(tok)
    order = enc.QUESTION_LAST if pack else enc.QUESTION_FIRST
    rng = np.random.default_rng(0)
    groups = qa_groups(examples, pack, rng)[:12]
    checked = 0
    for g in groups:
        group = [examples[i] for i in g]
        row = qa_row(processor, group, order)
        for share in (0.0, 0.5, 1.0):
            text = short_context(group[0]["text"], [e["answer"] for e in group], share, rng)
            spliced = with_context(row, tok, group[0]["text"], text)
            assert spliced is not None
            expected = qa_row(processor, group, order, text)
            assert {k: spliced[k] for k in ("ids", "label", "mm")} == {k: expected[k] for k in ("ids", "label", "mm")}
            assert torch.equal(spliced["pixels"], expected["pixels"]) if expected["pixels"] is not None else True
            checked += 1
    assert checked == 3 * len(groups)
    assert with_context(row, tok, "words that are not in the row at all", "x") is None
