"""analysis.live and analysis.source_weights: upload checks, live examples built from the declared editable
fields (edited / drawn), live runs with a knockout, the generic source-weights summary, patch grids.

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

from analysis import live, source_weights
from analysis.live import UploadError, check_upload
from mmoe_core.spec import ExampleField, ImageGrid, ModelSpec, OutputSpec, SourceSpec

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
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


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


def _png_of(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_a_16_bit_grayscale_png_keeps_its_tones():
    """A 16-bit grayscale PNG is scaled to 8 bits, not clipped to white (PIL's convert("RGB") clips)."""
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    data = _png_of(Image.fromarray(ramp))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    rgb = np.asarray(check_upload(data, "ramp16.png"))
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 64, 3)
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    assert abs(float(rgb.mean()) - 127.5) < 2  # a clipped ramp would average about 254
    assert np.all(np.diff(rgb[..., 0].ravel().astype(int)) >= 0)  # the ramp stays a ramp


def test_alpha_and_palette_images_are_composited_over_white():
    clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    clear.putpixel((0, 0), (0, 0, 255, 255))
    rgb = np.asarray(check_upload(_png_of(clear), "alpha.png"))
    assert tuple(rgb[1, 1]) == (255, 255, 255) and tuple(rgb[0, 0]) == (0, 0, 255)
    half = np.asarray(check_upload(_png_of(Image.new("LA", (4, 4), (0, 128))), "la.png"))
    assert 120 <= int(half[0, 0, 0]) <= 135  # black at half opacity over white
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 200, 30] + [0, 0, 0] * 255)
    assert tuple(np.asarray(check_upload(_png_of(palette), "p.png"))[0, 0]) == (10, 200, 30)
    palette.info["transparency"] = 0
    assert tuple(np.asarray(check_upload(_png_of(palette), "p-clear.png"))[0, 0]) == (255, 255, 255)


def test_an_upload_is_kept_once_at_a_bounded_size():
    """A picture at the pixel limit (5000 x 5000) is kept as one copy for the model and a thumbnail;
    the aspect of a phone photo is kept."""
    from analysis.live import MODEL_SIDE, THUMB_SIDE, receive_upload

    big = Image.new("RGB", (5000, 5000), (240, 240, 240))
    big.paste((200, 20, 20), (1000, 1000, 4000, 4000))
    got = receive_upload(_png_of(big), "big.png")
    assert got.original_size == (5000, 5000)
    assert got.model.size == (MODEL_SIDE, MODEL_SIDE) and max(got.thumb.size) == THUMB_SIDE
    assert got.model.mode == "RGB" and tuple(np.asarray(got.model)[MODEL_SIDE // 2, MODEL_SIDE // 2]) == (200, 20, 20)
    assert got.detail == f"big.png: 5000 x 5000 pixels, kept at {MODEL_SIDE} x {MODEL_SIDE} for the model"
    assert got.caption == "uploaded: big.png" and len(got.digest) == 64
    buf = io.BytesIO()
    Image.new("RGB", (4032, 3024), (10, 120, 200)).save(buf, "JPEG", quality=80)
    photo = receive_upload(buf.getvalue(), "photo.jpg")
    assert max(photo.model.size) == MODEL_SIDE and abs(photo.model.size[0] / photo.model.size[1] - 4 / 3) < 0.01
    small = receive_upload(_encoded("PNG", size=(40, 30)), "small.png")
    assert small.model.size == (40, 30)  # a picture that fits is kept as it is


def test_thumbnail_array_bounds_what_a_chart_embeds():
    from analysis.live import thumbnail_array

    assert thumbnail_array(None) is None
    assert thumbnail_array(np.zeros((5000, 4000, 3), np.uint8), side=256).shape == (256, 205, 3)
    assert thumbnail_array(np.zeros((40, 30, 3), np.uint8)).shape == (40, 30, 3)
    assert thumbnail_array(Image.new("I;16", (600, 300))).shape == (128, 256, 3)


# ------------------------------------------------------------------------------------------ pure summaries

TWO_SOURCES = OutputSpec(
    "mix",
    "source_weights",
    "weights over two sources",
    sources=(
        SourceSpec("left", "w_left", "left source", "#111111"),
        SourceSpec("right", "w_right", "right source", "#222222"),
    ),
    truth_label="where",
    positions="tokens",
)


def test_source_weights_summary_agreement_and_confusion():
    rows = [
        {"index": 0, "tokens": ["a", "b"], "w_left": [0.9, 0.7], "w_right": [0.1, 0.3]},
        {"index": 1, "tokens": ["c"], "w_left": [0.2], "w_right": [0.8]},
        {"index": 2, "tokens": ["d", "e"], "w_left": [0.4, 0.3], "w_right": [0.6, 0.7]},
        {"index": 3, "tokens": ["f"], "w_left": [0.8], "w_right": [0.2]},
    ]
    examples = pd.DataFrame(
        {"example_index": [0, 1, 2, 3], "kind": ["x", "y", "x", "z"], "where": ["left", "right", "left", "both"]}
    )
    s = source_weights.summarise(rows, examples, TWO_SOURCES, labels=["kind"])
    # dominant: 0 left (right), 1 right (right), 2 right (wrong), 3 left (both: not counted)
    assert s.agreement_n == 3 and s.agreement == pytest.approx(2 / 3)
    assert s.agreement_by_source == {"left": 0.5, "right": 1.0}
    assert s.confusion.loc["left", "left"] == 1 and s.confusion.loc["left", "right"] == 1
    assert s.confusion.loc["both", "left"] == 1 and list(s.confusion.columns) == ["left", "right"]
    x = source_weights.by_label(s, "kind").set_index("kind").loc["x"]
    assert x["examples"] == 2 and x["mean_left"] == pytest.approx((0.8 + 0.35) / 2)
    assert "where" in s.definition and "left / right" in s.definition
    # the stored long layout (one float column per source name) gives the same summary
    long = source_weights.long_weights(rows, TWO_SOURCES)
    assert list(long.columns) == ["example_index", "position", "token", "left", "right"] and len(long) == 6
    again = source_weights.summarise(long, examples, TWO_SOURCES)
    assert again.agreement == s.agreement
    assert again.per_example["dominant"].tolist() == s.per_example["dominant"].tolist()


def test_source_weights_without_a_truth_label_scores_no_agreement():
    output = OutputSpec("mix", "source_weights", "", sources=TWO_SOURCES.sources)
    s = source_weights.summarise([{"index": 0, "w_left": [0.3], "w_right": [0.7]}], None, output)
    assert s.agreement_n == 0 and math.isnan(s.agreement) and s.confusion.empty
    assert s.per_example["dominant"].tolist() == ["right"]


def test_patch_grid_uses_the_declared_grid():
    rows = pd.DataFrame({"position": [0, 1, 2, 3, 4, 5, 6], "value": [9.0, 1, 2, 3, 4, 5, 6]})
    grid = live.patch_grid(rows, ImageGrid(2, 3, first_position=1))  # position 0 is not a patch (a CLS)
    assert grid.shape == (2, 3) and grid.tolist() == [[1, 2, 3], [4, 5, 6]]
    square = live.patch_grid(rows.iloc[1:5], None)  # no grid declared: a square in position order
    assert square.shape == (2, 2) and square[1, 1] == 4


def test_ranking_frame_shows_names_and_marks_the_gold():
    prediction = {
        "prediction": "Orion",
        "prediction_id": 7,
        "gold": "Vega",
        "gold_id": 3,
        "score": 2.0,
        "top_ids": [7, 3, 5],
        "top_names": ["Orion", "Vega", "Orion"],
        "top_scores": [2.0, 1.5, 1.0],
    }
    frame = live.ranking_frame(prediction)
    assert frame["name"].tolist() == ["Orion", "Vega", "Orion"] and frame["gold"].tolist() == [False, True, False]
    assert "id" not in frame and frame["rank"].tolist() == [1, 2, 3]


TOY_SPEC = ModelSpec(
    "toy",
    "toy",
    fields=(
        ExampleField("prompt", "Prompt", "text", editable=True, role="title", max_chars=10),
        ExampleField("notes", "Notes", "long_text", editable=True, max_chars=40),
        ExampleField("picture", "Picture", "image", editable=True),
        ExampleField("gold", "Gold", "text", role="gold"),
    ),
)


def test_live_example_edits_only_declared_fields_and_cuts_long_text():
    base = {"index": 4, "id": "e4", "prompt": "hello", "notes": "n", "gold": "g", "labels": {"k": "v"}}
    edited = live.live_example(TOY_SPEC, base, texts={"prompt": "a" * 25, "notes": ""})
    assert edited["prompt"] == "a" * 10 and edited["notes"] == "" and edited["gold"] == "g"
    assert edited["id"] == "e4+live" and edited["live"] and base["prompt"] == "hello"
    assert live.clip_text(TOY_SPEC.fields[0], "a" * 25)[1].startswith("Prompt: cut to its first 10 characters")
    assert "empty" in live.clip_text(TOY_SPEC.fields[1], "  ")[1]
    assert live.clip_text(TOY_SPEC.fields[0], "fine")[1] is None
    with pytest.raises(ValueError, match="'gold' is not an editable text field"):
        live.live_example(TOY_SPEC, base, texts={"gold": "x"})
    drawn = live.live_example(TOY_SPEC, base, drawn_attributes={"shape": "star"})
    assert drawn["picture"].size == (64, 64)
    with pytest.raises(ValueError, match="no editable image field"):
        live.live_example(ModelSpec("plain", "plain"), base, drawn_attributes={"shape": "star"})


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


def _image_example(adapter, examples):
    """An example with a picture (its declared image field, or the path datasets store beside it)."""
    keys = live.picture_keys([f.name for f in adapter.spec().fields if f.kind == "image"])
    return next(ex for ex in examples if any(isinstance(ex.get(k), str) and ex.get(k) for k in keys))


@pytest.mark.parametrize("run", ["mmoe-balanced", "mmoe-collapsing", "mmoe-reference-gate", "moemoe-qa"])
def test_knockout_changes_the_live_run_and_the_expert_is_never_chosen(live_models, run):
    adapter, examples = live_models(run)
    base = _image_example(adapter, examples)
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
    image = next(f.name for f in adapter.spec().editable_fields() if f.kind == "image")
    assert example["live"] and example["id"].endswith("+live") and example[image].size == (64, 64)
    assert image not in base or base[image] is not example[image]  # the base example is untouched

    result = live.run_live(adapter, example)
    assert result.timings["total"] >= result.timings["forward"] > 0
    assert not result.routing.empty
    assert set(result.routing["layer"]) == {spec.name for spec in adapter.routed_layers()}
    spec = adapter.spec()
    if result.kind == "ranking":
        assert 1 <= len(result.ranking) <= live.TOP_N
        assert result.ranking["rank"].tolist() == list(range(1, len(result.ranking) + 1))
        assert result.ranking["name"].map(lambda n: isinstance(n, str) and n != "" and not n.isdigit()).all()
        assert result.predicted == result.ranking["name"].iloc[0]
    else:
        assert isinstance(result.predicted, str)
    for output in spec.output("source_weights"):
        weights = source_weights.long_weights(result.extras[output.name], output)
        assert len(weights) > 0 and np.allclose(weights[[s.name for s in output.sources]].sum(axis=1), 1, atol=1e-4)
    assert result.attribution is not None, result.attribution_error
    image_inputs = [s.name for s in adapter.input_spec() if s.kind == "image_patches"]
    assert set(image_inputs) <= set(result.attribution["input"])
    assert math.isfinite(live.convergence_delta(result.attribution))

    # the drawn picture changes what the model sees
    plain = live.run_live(adapter, base, attribution=False)
    assert not np.allclose(plain.representation, result.representation)
    point = live.project_live(run, result.representation, root=built_demo_root)
    assert point is not None and math.isfinite(point["x"]) and math.isfinite(point["y"])


def test_live_example_text_edits_follow_the_declared_fields(live_models):
    for run in (MMOE_RUN, QA_RUN):
        adapter, examples = live_models(run)
        spec = adapter.spec()
        base = examples[0]
        texts = [f for f in spec.editable_fields() if f.kind in ("text", "long_text")]
        assert texts, f"{run} declares an editable text field"
        first = texts[0]
        edited = live.live_example(spec, base, texts={first.name: "Nothing here names anything."})
        assert edited[first.name] == "Nothing here names anything." and base[first.name] != edited[first.name]
        too_long = live.live_example(spec, base, texts={first.name: "x" * (first.max_chars + 50)})
        assert len(too_long[first.name]) == first.max_chars
        fixed = next(f for f in spec.fields if not f.editable)
        with pytest.raises(ValueError, match="not an editable text field"):
            live.live_example(spec, base, texts={fixed.name: "x"})
        a = live.run_live(adapter, base, attribution=False)
        b = live.run_live(adapter, edited, attribution=False)
        assert not np.allclose(a.representation, b.representation)  # the model sees the edit
        for output in spec.output("source_weights"):  # the demo QA run's weights sit on the edited question
            before = source_weights.long_weights(a.extras[output.name], output)
            after = source_weights.long_weights(b.extras[output.name], output)
            assert before["token"].tolist() != after["token"].tolist()


def test_uploaded_picture_is_what_the_model_sees(live_models):
    adapter, examples = live_models(MMOE_RUN)
    base = _image_example(adapter, examples)
    upload = check_upload(_encoded("JPEG", size=(80, 80), colour="green"), "green.jpg")
    spec = adapter.spec()
    example = live.live_example(spec, base, image=upload)
    image_fields = [f.name for f in spec.fields if f.kind == "image"]
    assert live.example_picture(example, image_fields) is example[image_fields[0]]
    out = live.run_live(adapter, example, attribution=False)
    ref = live.run_live(adapter, base, attribution=False)
    assert not np.allclose(out.representation, ref.representation)


def test_run_inputs_names_checkpoint_and_dataset(built_demo_root):
    inputs = live.run_inputs(MMOE_RUN, built_demo_root)
    assert (inputs.checkpoint / "config.json").is_file() and inputs.dataset.is_dir()
    assert inputs.family == "mmoe" and inputs.checkpoint_hash
    with pytest.raises(FileNotFoundError, match="not found"):
        live.run_inputs("no-such-run", built_demo_root)


def test_input_share_by_label_counts_each_example_once():
    table = pd.DataFrame(
        {
            "example_index": [0, 0, 1, 2, 2, 2],
            "method": "ig",
            "target": ["score", "score", "score", "score", "score", "router_logit"],
            "input": ["words", "picture", "words", "words", "picture", "words"],
            "share": [0.25, 0.75, 1.0, 0.5, 0.5, 1.0],
            "where": ["a", "a", "b", "a", "a", "a"],
        }
    )
    shares = live.input_share_by_label(table, "where", "ig", router_targets=["router_logit"])
    assert shares.loc["a", "picture"] == pytest.approx(0.625) and shares.loc["a", "words"] == pytest.approx(0.375)
    assert shares.loc["b", "picture"] == 0 and shares.loc["b", "n_examples"] == 1 and shares.loc["a", "n_examples"] == 2
