"""Dataset files are untrusted: picture paths stay inside the dataset folder (no '..', no absolute paths, no
link out), pictures open only as PNG, JPEG or WebP within the upload pixel cap, JSON fields are
type-checked (ground truth included), files have size caps; every refusal names the file and the record.
Unit tier (tiny generated worlds)."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from mmoe_core.data import images, readers
from mmoe_core.data.readers import DatasetError, load_image, read_entity_dataset, read_qa_dataset
from mmoe_core.families.hf_moe.data import read_jsonl, read_label_specs


@pytest.fixture(scope="module")
def entity_world(tmp_path_factory):
    from mmoe_core.data.generate import generate_entity_world

    return generate_entity_world(tmp_path_factory.mktemp("world") / "entity", scale="tiny", progress=False)


@pytest.fixture(scope="module")
def qa_world(tmp_path_factory):
    from mmoe_core.data.generate import generate_qa_world

    return generate_qa_world(tmp_path_factory.mktemp("world") / "qa", scale="tiny", progress=False)


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def first_with_image(records):
    return next(i for i, r in enumerate(records) if r.get("imgPath"))


@pytest.mark.parametrize("value", ["../../../../etc/passwd", "/etc/hosts", "a/../../x.jpg", "C:/boot.ini", "~/x.png"])
def test_a_mention_picture_path_stays_in_the_folder(value, entity_world, tmp_path):
    root = shutil.copytree(entity_world, tmp_path / "w")
    records = json.loads((root / "DEMO_dev.json").read_text())
    i = first_with_image(records)
    records[i]["imgPath"] = value
    (root / "DEMO_dev.json").write_text(json.dumps(records))
    with pytest.raises(DatasetError, match=rf"^DEMO_dev\.json record {i}: field 'imgPath': .*(relative path|outside)"):
        read_entity_dataset(root)
    with pytest.raises(DatasetError, match="imgPath"):
        read_entity_dataset(root, check_images=False)  # the path is checked even when pictures are not


def test_a_kb_picture_path_and_a_link_out_are_refused(entity_world, tmp_path):
    root = shutil.copytree(entity_world, tmp_path / "w")
    edit_json(root / "kb_entity.json", lambda kb: kb[3]["image_list"].__setitem__(0, "../../secret.png"))
    with pytest.raises(DatasetError, match=r"^kb_entity\.json record 3: field 'image_list': .*no '\.\.'"):
        read_entity_dataset(root)
    root = shutil.copytree(entity_world, tmp_path / "w2")
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    name = json.loads((root / "kb_entity.json").read_text())[0]["image_list"][0]
    (root / "kb_image" / name).unlink()
    (root / "kb_image" / name).symlink_to(outside)
    with pytest.raises(DatasetError, match="leaves the data folder"):
        read_entity_dataset(root)


def _replace_first_kb_picture(root, write):
    name = json.loads((root / "kb_entity.json").read_text())[0]["image_list"][0]
    write(root / "kb_image" / name)
    return name


@pytest.mark.parametrize(
    "fault, words",
    [
        ("gif named png", ["not a PNG, JPEG or WebP"]),
        ("text named png", ["not a PNG, JPEG or WebP"]),
        ("over the pixel cap", ["megapixels", "the limit is 25 megapixels"]),
    ],
)
def test_pictures_open_only_in_the_expected_formats_and_within_the_pixel_cap(fault, words, entity_world, tmp_path):
    root = shutil.copytree(entity_world, tmp_path / "w")

    def write(path):
        if fault == "gif named png":
            Image.new("RGB", (8, 8)).save(path, format="GIF")
        elif fault == "text named png":
            path.write_text("<html>not a picture</html>")
        else:  # 5001 x 5001 = 25.01 MP of one colour: a tiny file, a huge decode
            Image.new("L", (5001, 5001)).save(path, format="PNG")

    name = _replace_first_kb_picture(root, write)
    with pytest.raises(DatasetError) as caught:
        read_entity_dataset(root)
    message = str(caught.value)
    assert message.startswith("kb_entity.json record") and name in message
    assert all(w in message for w in words), message
    with pytest.raises(DatasetError, match="|".join(words)):  # and the decode path refuses it too
        load_image(root / "kb_image" / name)


def test_a_truncated_picture_is_refused_when_decoded_naming_it(entity_world, tmp_path):
    root = shutil.copytree(entity_world, tmp_path / "w")

    def write(path):
        Image.new("RGB", (64, 64), (200, 10, 10)).save(path)
        path.write_bytes(path.read_bytes()[:60])

    name = _replace_first_kb_picture(root, write)
    read_entity_dataset(root)  # the header is fine
    with pytest.raises(DatasetError, match=rf"{name}.*damaged or truncated PNG"):
        load_image(root / "kb_image" / name, root=root)


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda t: t["mentions"].__setitem__("M00000", "both"), ["ground_truth.json", "mentions.M00000", "object"]),
        (lambda t: t["mentions"]["M00000"].update(decisive="smell"), ["mentions.M00000.decisive", "'smell'"]),
        (lambda t: t.update(entities=[1, 2]), ["ground_truth.json", "entities"]),
        (lambda t: t["entities"].__setitem__(next(iter(t["entities"])), {"type": 5}), ["string 'type'"]),
    ],
)
def test_ground_truth_entries_are_type_checked(change, words, entity_world, tmp_path):
    root = shutil.copytree(entity_world, tmp_path / "w", symlinks=True)
    edit_json(root / "ground_truth.json", change)
    with pytest.raises(DatasetError) as caught:
        read_entity_dataset(root, check_images=False)
    assert all(w in str(caught.value) for w in words), str(caught.value)


def test_json_fields_are_type_checked_with_file_and_record(entity_world, tmp_path):
    root = shutil.copytree(entity_world, tmp_path / "w")
    edit_json(root / "DEMO_test.json", lambda recs: recs[2].update(sentence=42))
    with pytest.raises(DatasetError, match=r"^DEMO_test\.json record 2: field 'sentence': expected str, got int"):
        read_entity_dataset(root, check_images=False)


def test_files_have_size_caps(entity_world, tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_DATA_FILE_BYTES", 1000)
    with pytest.raises(DatasetError, match=r"^qid2id\.json: .* GB a dataset file may have|^kb_entity"):
        read_entity_dataset(entity_world, check_images=False)
    monkeypatch.setattr(readers, "MAX_DATA_FILE_BYTES", 2 * 1024**3)
    monkeypatch.setattr(images, "MAX_IMAGE_FILE_BYTES", 100)
    picture = next((entity_world / "kb_image").iterdir())
    with pytest.raises(DatasetError, match=rf"{picture.name} is .* MB; a picture may have at most"):
        images.check_image_file(picture, max_bytes=images.MAX_IMAGE_FILE_BYTES)


def test_qa_records_and_world_file_are_checked(qa_world, tmp_path):
    root = shutil.copytree(qa_world, tmp_path / "qa")
    lines = (root / "qa_dev.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    for value, words in (("/etc/hosts", "relative path"), ("../outside.png", "no '..'")):
        (root / "qa_dev.jsonl").write_text("\n".join([lines[0], json.dumps({**record, "image": value}), *lines[2:]]))
        with pytest.raises(DatasetError, match=rf"^qa_dev\.jsonl record 1: field 'image': .*{words}"):
            read_qa_dataset(root, splits=("dev",))
    (root / "qa_dev.jsonl").write_text("\n".join(lines))
    (root / "world.json").write_text("[1, 2, 3]")
    with pytest.raises(DatasetError, match=r"^world\.json: expected a JSON object"):
        read_qa_dataset(root, splits=("dev",))


def test_hf_jsonl_pictures_and_label_descriptions_are_checked(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "anim.png", format="GIF")
    records = [{"text": "fine", "image": "ok.png"}, {"text": "bad", "image": "anim.png"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    with pytest.raises(DatasetError, match=r"^d\.jsonl, line 2, field 'image': .*not a PNG, JPEG or WebP"):
        read_jsonl(tmp_path / "d.jsonl")
    (tmp_path / "labels.json").write_text(json.dumps({"domain": {"decides": {"code": 3}}}))
    with pytest.raises(DatasetError, match=r"labels\.json: label 'domain': 'decides'"):
        read_label_specs(tmp_path)


def test_uploads_and_datasets_share_one_pixel_cap():
    from analysis.live import uploads

    assert uploads.MAX_UPLOAD_PIXELS == images.MAX_IMAGE_PIXELS == 25_000_000
    assert uploads.sniff_image_type is images.sniff_image_type
