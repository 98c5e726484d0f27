"""Readers: a generated world reads back into the expected records; malformed input fails clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mmoe_core.data.generate import generate_entity_world, generate_qa_world
from mmoe_core.data.readers import (
    DatasetError,
    candidates_for,
    detect_dataset_name,
    entity_table,
    load_image,
    mention_table,
    qa_table,
    read_entity_dataset,
    read_qa_dataset,
)
from mmoe_core.data.records import Entity, Mention, QAItem

SPLITS = ("train", "dev", "test")


@pytest.fixture(scope="module")
def entity_root(tmp_path_factory) -> Path:
    return generate_entity_world(tmp_path_factory.mktemp("w") / "entity", seed=0, scale="tiny", progress=False)


@pytest.fixture(scope="module")
def qa_root(tmp_path_factory) -> Path:
    return generate_qa_world(tmp_path_factory.mktemp("w") / "qa", seed=0, scale="tiny", progress=False)


IMAGE_DIRS = ("kb_image", "mention_image", "images")


def copy_world(root: Path, tmp_path: Path, images: bool = False) -> Path:
    """A copy to break; picture folders are linked, not copied, unless the test deletes pictures."""
    target = tmp_path / root.name
    if images:
        shutil.copytree(root, target)
        return target
    target.mkdir()
    for path in root.iterdir():
        if path.name in IMAGE_DIRS:
            (target / path.name).symlink_to(path, target_is_directory=True)
        else:
            shutil.copy(path, target / path.name)
    return target


def load(path: Path):
    return json.loads(path.read_text())


def save(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))


def first_linked_index(records: list[dict], at_least: int = 0) -> int:
    return next(i for i, r in enumerate(records) if i >= at_least and r["answer"] != "nil")


# ------------------------------------------------------------------------------------- round trip


def test_entity_world_reads_back(entity_root):
    ds = read_entity_dataset(entity_root)
    kb = load(entity_root / "kb_entity.json")
    qid2id = load(entity_root / "qid2id.json")
    truth = load(entity_root / "ground_truth.json")
    assert ds.name == "DEMO" and ds.warnings == ()
    assert [e.id for e in ds.entities] == sorted(e["id"] for e in kb)
    assert all(isinstance(e, Entity) and e.index == qid2id[e.id] for e in ds.entities)
    assert all(p.is_file() for e in ds.entities for p in e.images)
    for split in SPLITS:
        records = load(entity_root / f"DEMO_{split}.json")
        linked = [r for r in records if r["answer"] != "nil"]
        assert ds.nil_skipped[split] == len(records) - len(linked)
        assert len(ds.splits[split]) == len(linked)
        for record, mention in zip(linked, ds.splits[split]):
            assert isinstance(mention, Mention)
            assert (mention.id, mention.mention, mention.entity_name, mention.sentence, mention.desc) == (
                record["id"],
                record["mentions"],
                record["entities"],
                record["sentence"],
                record["desc"],
            )
            assert mention.answer_qid == record["answer"] and mention.answer_index == qid2id[record["answer"]]
            assert (mention.image is None) == (record["imgPath"] == "")
            assert mention.decisive == truth["mentions"][record["id"]]["decisive"]
    assert sum(ds.nil_skipped.values()) >= 1


def test_candidates_and_tables(entity_root):
    ds = read_entity_dataset(entity_root)
    mention = ds.splits["test"][0]
    candidates = candidates_for(ds, mention)
    assert len(candidates) >= 3 and mention.answer_qid in {e.id for e in candidates}
    assert {e.id for e in candidates} == set(mention.meta["name_group"])
    entities, mentions = entity_table(ds), mention_table(ds)
    assert len(entities) == len(ds.entities) and entities["type"].notna().all()
    assert len(mentions) == sum(len(s) for s in ds.splits.values())
    assert set(mentions["decisive"]) == {"text", "image", "both"}


def test_qa_world_reads_back(qa_root):
    ds = read_qa_dataset(qa_root)
    for split in SPLITS:
        rows = [json.loads(line) for line in (qa_root / f"qa_{split}.jsonl").read_text().splitlines()]
        assert len(ds.splits[split]) == len(rows)
        for row, item in zip(rows, ds.splits[split]):
            assert isinstance(item, QAItem)
            assert (
                item.id,
                item.question,
                item.answer,
                item.question_type,
                item.answer_source,
                item.context,
                item.category,
                item.context_conflict,
                item.product_id,
            ) == (
                row["id"],
                row["question"],
                row["answer"],
                row["question_type"],
                row["answer_source"],
                row["context"],
                row["category"],
                row["context_conflict"],
                row["product_id"],
            )
            assert item.image == qa_root / row["image"] and item.image.is_file()
    assert len(ds.products) == 64 and ds.world["world"] == "qa"
    assert len(qa_table(ds)) == sum(len(s) for s in ds.splits.values())


def test_load_image_is_rgb_and_resizes(entity_root):
    ds = read_entity_dataset(entity_root)
    path = ds.entities[0].images[0]
    assert load_image(path).mode == "RGB" and load_image(path).size == (64, 64)
    assert load_image(path, 224).size == (224, 224)
    assert load_image(path, (32, 16)).size == (32, 16)


def test_real_sets_without_ground_truth_have_no_labels(entity_root, tmp_path):
    root = copy_world(entity_root, tmp_path)
    (root / "ground_truth.json").unlink()
    ds = read_entity_dataset(root)
    assert ds.ground_truth is None
    assert all(m.decisive is None and m.meta == {} for m in ds.mentions())


def test_dataset_name_is_detected_or_given(entity_root, tmp_path):
    assert detect_dataset_name(entity_root) == "DEMO"
    root = copy_world(entity_root, tmp_path)
    for split in SPLITS:
        (root / f"DEMO_{split}.json").rename(root / f"WIKIMEL_{split}.json")
    assert read_entity_dataset(root).name == "WIKIMEL"
    shutil.copy(root / "WIKIMEL_train.json", root / "OTHER_train.json")
    with pytest.raises(DatasetError, match="exactly one"):
        read_entity_dataset(root)
    assert read_entity_dataset(root, name="WIKIMEL", splits=("dev",)).splits.keys() == {"dev"}


def test_mention_image_follows_the_published_jpg_convention(entity_root, tmp_path):
    root = copy_world(entity_root, tmp_path)
    records = load(root / "DEMO_dev.json")
    i = next(i for i, r in enumerate(records) if r["imgPath"])
    stem = records[i]["imgPath"].split(".")[0]
    records[i]["imgPath"] = f"some/folder/{stem}.png"  # as RichpediaMEL lists it; the file is <stem>.jpg
    save(root / "DEMO_dev.json", records)
    mention = next(m for m in read_entity_dataset(root).splits["dev"] if m.id == records[i]["id"])
    assert mention.image == root / "mention_image" / f"{stem}.jpg"


def test_pretty_printed_qid2id_is_accepted_and_odd_order_warned(entity_root, tmp_path):
    root = copy_world(entity_root, tmp_path)
    qid2id = load(root / "qid2id.json")
    reversed_order = {q: len(qid2id) - 1 - i for q, i in qid2id.items()}
    (root / "qid2id.json").write_text(json.dumps(reversed_order, indent=2))
    ds = read_entity_dataset(root)
    assert ds.warnings and ds.entities[0].index == len(qid2id) - 1


# --------------------------------------------------------------------------------- malformed input


def test_bad_json_names_the_file(entity_root, tmp_path):
    root = copy_world(entity_root, tmp_path)
    text = (root / "DEMO_dev.json").read_text()
    (root / "DEMO_dev.json").write_text(text[: len(text) // 2])
    with pytest.raises(DatasetError, match=r"DEMO_dev\.json: invalid JSON at line \d+"):
        read_entity_dataset(root)


def test_missing_field_names_file_record_and_field(entity_root, tmp_path):
    root = copy_world(entity_root, tmp_path)
    records = load(root / "DEMO_dev.json")
    del records[3]["sentence"]
    save(root / "DEMO_dev.json", records)
    with pytest.raises(DatasetError, match=r"^DEMO_dev\.json record 3: field 'sentence': missing field$"):
        read_entity_dataset(root)


def test_missing_kb_field(entity_root, tmp_path):
    root = copy_world(entity_root, tmp_path)
    kb = load(root / "kb_entity.json")
    del kb[5]["desc"]
    save(root / "kb_entity.json", kb)
    with pytest.raises(DatasetError, match=r"^kb_entity\.json record 5: field 'desc': missing field$"):
        read_entity_dataset(root)


def test_missing_kb_image(entity_root, tmp_path):
    root = copy_world(entity_root, tmp_path, images=True)
    kb = load(root / "kb_entity.json")
    (root / "kb_image" / kb[7]["image_list"][0]).unlink()
    with pytest.raises(DatasetError, match=r"^kb_entity\.json record 7: field 'image_list': image not found"):
        read_entity_dataset(root)
    assert len(read_entity_dataset(root, check_images=False).entities) == len(kb)


def test_missing_mention_image(entity_root, tmp_path):
    root = copy_world(entity_root, tmp_path, images=True)
    records = load(root / "DEMO_test.json")
    i = next(i for i, r in enumerate(records) if r["imgPath"])
    (root / "mention_image" / records[i]["imgPath"]).unlink()
    with pytest.raises(DatasetError, match=rf"^DEMO_test\.json record {i}: field 'imgPath': image not found"):
        read_entity_dataset(root)
    ds = read_entity_dataset(root, check_images=False)
    assert next(m for m in ds.splits["test"] if m.id == records[i]["id"]).image is not None


def test_unknown_qid(entity_root, tmp_path):
    root = copy_world(entity_root, tmp_path)
    records = load(root / "DEMO_dev.json")
    i = first_linked_index(records, at_least=17)
    assert "Q0" not in load(root / "qid2id.json")
    records[i]["answer"] = "Q0"
    save(root / "DEMO_dev.json", records)
    with pytest.raises(DatasetError) as error:
        read_entity_dataset(root)
    assert str(error.value) == f"DEMO_dev.json record {i}: field 'answer': unknown QID 'Q0' (not in qid2id.json)"
    assert isinstance(error.value, ValueError)


def test_kb_entity_missing_from_qid2id(entity_root, tmp_path):
    root = copy_world(entity_root, tmp_path)
    kb = load(root / "kb_entity.json")
    qid2id = load(root / "qid2id.json")
    del qid2id[kb[2]["id"]]
    save(root / "qid2id.json", qid2id)
    with pytest.raises(DatasetError, match=r"^kb_entity\.json record 2: field 'id': QID 'Q\d+' not in qid2id\.json$"):
        read_entity_dataset(root)


def test_qa_malformed_inputs(qa_root, tmp_path):
    root = copy_world(qa_root, tmp_path, images=True)
    path = root / "qa_dev.jsonl"
    good = path.read_text().splitlines()

    def write(lines: list[str]) -> None:
        path.write_text("\n".join(lines) + "\n")

    write(good[:4] + ["{not json"] + good[4:])
    with pytest.raises(DatasetError, match=r"^qa_dev\.jsonl record 4: invalid JSON on line 5"):
        read_qa_dataset(root)

    row = json.loads(good[2])
    del row["answer"]
    write(good[:2] + [json.dumps(row)] + good[3:])
    with pytest.raises(DatasetError, match=r"^qa_dev\.jsonl record 2: field 'answer': missing field$"):
        read_qa_dataset(root)

    row = json.loads(good[1])
    row["answer_source"] = "radio"
    write(good[:1] + [json.dumps(row)] + good[2:])
    with pytest.raises(DatasetError, match=r"^qa_dev\.jsonl record 1: field 'answer_source'"):
        read_qa_dataset(root)

    write(good)
    (root / json.loads(good[0])["image"]).unlink()
    with pytest.raises(DatasetError, match=r"^qa_dev\.jsonl record 0: field 'image': image not found"):
        read_qa_dataset(root)
    assert read_qa_dataset(root, check_images=False).splits["dev"][0].image is not None


def test_extra_mention_fields_are_kept_in_meta(entity_root, tmp_path):
    root = copy_world(entity_root, tmp_path)
    (root / "ground_truth.json").unlink()
    records = load(root / "DEMO_dev.json")
    i = first_linked_index(records)
    records[i]["topic"] = "sports"
    save(root / "DEMO_dev.json", records)
    mention = next(m for m in read_entity_dataset(root).splits["dev"] if m.id == records[i]["id"])
    assert mention.meta == {"topic": "sports"}


def test_artifacts_root_follows_the_environment(monkeypatch, tmp_path):
    from mmoe_core import paths

    monkeypatch.delenv(paths.ARTIFACTS_ENV, raising=False)
    assert paths.artifacts_root() == paths.REPO_ROOT / "artifacts"
    monkeypatch.setenv(paths.ARTIFACTS_ENV, str(tmp_path))
    assert paths.artifacts_root() == tmp_path
    assert paths.demo_world_dir("qa") == tmp_path / "data" / "qa"
