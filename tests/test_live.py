"""analysis.live: upload checks, live examples (edited / drawn), live runs with a knockout, the QGA summary.

The live-run tests use the real tiny demo runs of the session fixture ``demo_artifacts`` (tests/conftest.py).
"""
from __future__ import annotations

import io
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis import live
from analysis.live import UploadError, check_upload

MMOE_RUN, QA_RUN = "mmoe-balanced", "moemoe-qa"


# ------------------------------------------------------------------------------------------ uploads

def _encoded(kind: str, size=(12, 10), colour="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, kind)
    return buf.getvalue()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _png_claiming(width: int, height: int) -> bytes:
    """A small, well-formed PNG whose header claims ``width`` x ``height`` pixels (data for a few rows)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


@pytest.mark.parametrize("kind", ["PNG", "JPEG", "WEBP"])
def test_check_upload_accepts_real_images_whatever_the_extension(kind):
    image = check_upload(_encoded(kind), "picture.png")  # a JPEG / WebP named .png is judged by its bytes
    assert image.mode == "RGB" and image.size == (12, 10)


def test_check_upload_rejects_a_text_file_renamed_png():
    with pytest.raises(UploadError, match=r"notes\.png is not a PNG, JPEG or WebP image"):
        check_upload(b"just some notes, not a picture\n" * 10, "notes.png")


def test_check_upload_rejects_an_oversized_file():
    data = b"\x89PNG\r\n\x1a\n" + b"\0" * (live.MAX_UPLOAD_BYTES + 1)
    with pytest.raises(UploadError, match=r"big\.png is 5\.0 MB; the limit is 5\.0 MB"):
        check_upload(data, "big.png")
    with pytest.raises(UploadError, match="limit is 1 KB"):
        check_upload(_encoded("PNG", size=(64, 64)) + b"\0" * 2048, "x.png", max_bytes=1024)


def test_check_upload_rejects_a_decompression_bomb_header():
    bomb = _png_claiming(100_000, 100_000)  # 10 gigapixels claimed by a ~100-byte file
    assert len(bomb) < 200
    with pytest.raises(UploadError, match="too many pixels to decode safely"):
        check_upload(bomb, "bomb.png")
    over_limit = _png_claiming(6_000, 5_000)  # 30 MP: under PIL's own guard, over ours
    with pytest.raises(UploadError, match=r"6000 x 5000 = 30\.0 megapixels; the limit is 25 megapixels"):
        check_upload(over_limit, "large.png")
    with pytest.raises(UploadError, match="megapixels"):  # a low limit for a real picture
        check_upload(_encoded("PNG", size=(40, 40)), "small.png", max_pixels=1_000)


def test_check_upload_rejects_damaged_and_empty_files():
    with pytest.raises(UploadError, match="damaged or truncated PNG"):
        check_upload(_png_claiming(32, 32), "broken.png")  # 64 zero bytes cannot fill 32 rows
    with pytest.raises(UploadError, match="empty"):
        check_upload(b"", "empty.png")


# ------------------------------------------------------------------------------------------ pure summaries

def test_qga_summary_agreement_and_confusion():
    qga = pd.DataFrame({"index": [0, 1, 2, 3],
                        "tokens": [["a", "b"], ["c"], ["d", "e"], ["f"]],
                        "alpha": [[0.9, 0.7], [0.2], [0.4, 0.3], [0.8]],
                        "beta": [[0.1, 0.3], [0.8], [0.6, 0.7], [0.2]]})
    examples = pd.DataFrame({"index": [0, 1, 2, 3], "question_type": ["colour", "brand", "colour", "size"],
                             "answer_source": ["image", "context", "image", "both"]})
    s = live.qga_summary(qga, examples)
    # dominant: 0 image (right), 1 context (right), 2 context (wrong), 3 image (both: not counted)
    assert s.agreement_n == 3 and s.agreement == pytest.approx(2 / 3)
    assert s.agreement_by_source == {"image": 0.5, "context": 1.0}
    assert s.confusion.loc["image", "image"] == 1 and s.confusion.loc["image", "context"] == 1
    assert s.confusion.loc["both", "image"] == 1
    colour = s.by_question_type.set_index("question_type").loc["colour"]
    assert colour["questions"] == 2 and colour["mean_alpha"] == pytest.approx((0.8 + 0.35) / 2)
    assert len(live.qga_tokens(qga)) == 6


def test_draw_image_and_unknown_attributes():
    img = live.draw_image({"shape": "star", "colour": "blue", "pattern": "dotted", "background": "navy"})
    assert img.size == (64, 64) and img.mode == "RGB"
    with pytest.raises(ValueError, match="unknown shape 'blob'"):
        live.draw_image({"shape": "blob"})


# ------------------------------------------------------------------------------------------ real runs

@pytest.fixture(scope="session")
def built_demo_root(demo_artifacts) -> Path:
    """The tiny demo runs (tests/conftest.py builds them once per session and sets MOESCOPE_ARTIFACTS)."""
    return Path(demo_artifacts)


@pytest.fixture(scope="session")
def live_models(built_demo_root):
    """(adapter, base examples) per run, loaded once (on the CPU, as a page would without a GPU)."""
    cache = {}

    def get(run: str):
        if run not in cache:
            adapter = live.load_live_adapter(run, built_demo_root, device="cpu")
            cache[run] = (adapter, live.load_base_examples(adapter, run, built_demo_root))
        return cache[run]
    return get


def _image_example(examples):
    return next(ex for ex in examples if ex.get("image_path"))


@pytest.mark.parametrize("run", ["mmoe-balanced", "mmoe-collapsing", "mmoe-reference-gate", "moemoe-qa"])
def test_knockout_changes_the_live_run_and_the_expert_is_never_chosen(live_models, run):
    adapter, examples = live_models(run)
    base = next((ex for ex in examples if ex.get("image_path")), examples[0])
    before = live.run_live(adapter, base, attribution=False)
    assert not before.routing.empty
    layer = adapter.routed_layers()[0].name
    mine = before.routing[before.routing["layer"] == layer]
    call = mine["call"].iloc[0]
    in_call = mine[mine["call"] == call]
    expert = int(in_call["top1"].value_counts().idxmax())  # the expert this example uses most there
    after = live.run_live(adapter, base, knockout=(layer, expert), attribution=False)

    knocked = after.routing[after.routing["layer"] == layer]
    assert len(knocked) == len(mine)
    assert all(expert not in ids for ids in knocked["topk_ids"]), "a knocked-out expert was still chosen"
    assert all(p[expert] == 0 for p in knocked["probs"])
    changes = live.routing_changes(before.routing, after.routing).set_index("layer")
    assert changes.loc[layer, "changed"] >= (in_call["top1"] == expert).sum() > 0
    assert after.knockout == (layer, expert)
    # the knockout is scoped to the call: the model is whole again afterwards
    again = live.run_live(adapter, base, attribution=False)
    pd.testing.assert_series_equal(again.routing["top1"], before.routing["top1"])


@pytest.mark.parametrize("run", [MMOE_RUN, QA_RUN])
def test_live_example_from_drawn_attributes_runs_end_to_end(live_models, built_demo_root, run):
    adapter, examples = live_models(run)
    base = examples[0]
    drawn = {"shape": "star", "colour": "blue", "pattern": "striped", "background": "beige"}
    example = live.live_example(adapter, base, drawn_attributes=drawn)
    assert example["live"] and example["id"].endswith("+live") and example["image"].size == (64, 64)
    assert "image" not in base or base["image"] is not example["image"]  # the base example is untouched

    result = live.run_live(adapter, example)
    assert result.timings["total"] >= result.timings["forward"] > 0
    assert not result.routing.empty
    assert set(result.routing["layer"]) == {spec.name for spec in adapter.routed_layers()}
    if result.kind == "ranking":
        assert 1 <= len(result.ranking) <= live.TOP_N
        assert result.ranking["rank"].tolist() == list(range(1, len(result.ranking) + 1))
        assert result.ranking["name"].map(lambda n: isinstance(n, str) and n != "").all()
    else:
        assert isinstance(result.answer, str)
        assert result.extras["qga"] and len(result.extras["qga"][0]["alpha"]) > 0
    assert result.attribution is not None, result.attribution_error
    image_inputs = [s.name for s in adapter.input_spec() if s.kind == "image_patches"]
    assert set(image_inputs) <= set(result.attribution["input"])
    assert math.isfinite(live.convergence_delta(result.attribution))

    # the drawn picture changes what the model sees
    plain = live.run_live(adapter, base, attribution=False)
    assert not np.allclose(plain.representation, result.representation)
    point = live.project_live(run, result.representation, root=built_demo_root)
    assert point is not None and math.isfinite(point["x"]) and math.isfinite(point["y"])


def test_live_example_text_edits_follow_the_input_spec(live_models):
    adapter, examples = live_models(MMOE_RUN)
    base = examples[0]
    assert live.text_fields(adapter, base) == {"mention_text": "sentence"}
    edited = live.live_example(adapter, base, text="Nothing here names anything.")
    assert edited["sentence"] == "Nothing here names anything." and base["sentence"] != edited["sentence"]
    with pytest.raises(ValueError, match="no question input"):
        live.live_example(adapter, base, question="What colour?")

    qa_adapter, qa_examples = live_models(QA_RUN)
    qa_base = qa_examples[0]
    assert live.text_fields(qa_adapter, qa_base) == {"question": "question", "context": "context"}
    asked = live.live_example(qa_adapter, qa_base, question="What brand is the bag?", context="Brand: Lumo.")
    assert asked["question"] == "What brand is the bag?" and asked["context"] == "Brand: Lumo."
    a = live.run_live(qa_adapter, qa_base, attribution=False)
    b = live.run_live(qa_adapter, asked, attribution=False)
    qa_a, qa_b = a.extras["qga"][0], b.extras["qga"][0]
    assert qa_a["tokens"] != qa_b["tokens"]  # the QGA weights follow the edited question


def test_uploaded_picture_is_what_the_model_sees(live_models):
    adapter, examples = live_models(MMOE_RUN)
    base = _image_example(examples)
    upload = check_upload(_encoded("JPEG", size=(80, 80), colour="green"), "green.jpg")
    example = live.live_example(adapter, base, image=upload)
    assert live.example_picture(example) is example["image"]
    out = live.run_live(adapter, example, attribution=False)
    ref = live.run_live(adapter, base, attribution=False)
    assert not np.allclose(out.representation, ref.representation)


def test_run_inputs_names_checkpoint_and_dataset(built_demo_root):
    inputs = live.run_inputs(MMOE_RUN, built_demo_root)
    assert (inputs.checkpoint / "config.json").is_file() and inputs.dataset.is_dir()
    assert inputs.family == "mmoe" and inputs.checkpoint_hash
    with pytest.raises(FileNotFoundError, match="not found"):
        live.run_inputs("no-such-run", built_demo_root)
