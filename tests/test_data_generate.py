"""Demo world generator: determinism, and the world's guarantees re-derived here from the written files.

The label checks below deliberately do not call the generator's own check: they recompute candidate
sets from kb_entity.json, the split files and ground_truth.json with their own tokeniser.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmoe_core.data import entity_world, qa_world
from mmoe_core.data.generate import WorldCheckError, check_entity_world, generate_entity_world, generate_qa_world

SPLITS = ("train", "dev", "test")
REPO_ROOT = Path(__file__).resolve().parent.parent


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("worlds")
    return {
        "entity": generate_entity_world(base / "entity", seed=0, scale="tiny", progress=False),
        "entity_again": generate_entity_world(base / "entity_again", seed=0, scale="tiny", progress=False),
        "entity_seed1": generate_entity_world(base / "entity_seed1", seed=1, scale="tiny", progress=False),
        "qa": generate_qa_world(base / "qa", seed=0, scale="tiny", progress=False),
        "qa_again": generate_qa_world(base / "qa_again", seed=0, scale="tiny", progress=False),
        "qa_seed1": generate_qa_world(base / "qa_seed1", seed=1, scale="tiny", progress=False),
    }


# ---------------------------------------------------------------------------------------- helpers


def tokens(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


class EntityFiles:
    """The entity world as written: KB, mention records per split and ground truth."""

    def __init__(self, root: Path):
        self.root = root
        self.kb = {e["id"]: e for e in json.loads((root / "kb_entity.json").read_text())}
        self.records = {s: json.loads((root / f"DEMO_{s}.json").read_text()) for s in SPLITS}
        self.truth = json.loads((root / "ground_truth.json").read_text())
        self.groups: dict[str, list[str]] = defaultdict(list)
        for qid, e in self.kb.items():
            self.groups[e["entity_name"]].append(qid)

    def linked(self) -> list[dict]:
        return [r for s in SPLITS for r in self.records[s] if r["answer"] != "nil"]


@pytest.fixture(scope="module")
def entity_files(worlds) -> EntityFiles:
    return EntityFiles(worlds["entity"])


# ------------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("world", ["entity", "qa"])
def test_same_seed_gives_identical_bytes(worlds, world):
    first, second = all_files(worlds[world]), all_files(worlds[f"{world}_again"])
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []
    assert any(name.endswith((".png", ".jpg")) for name in first)


@pytest.mark.parametrize("world", ["entity", "qa"])
def test_different_seed_gives_different_world(worlds, world):
    first, other = all_files(worlds[world]), all_files(worlds[f"{world}_seed1"])
    assert first != other
    json_name = "kb_entity.json" if world == "entity" else "products.jsonl"
    assert first[json_name] != other[json_name]


# ------------------------------------------------------------------------------------ entity world


def test_every_name_is_shared_by_three_or_more(entity_files):
    sizes = Counter(e["entity_name"] for e in entity_files.kb.values())
    assert len(sizes) <= 60
    assert min(sizes.values()) >= 3


def test_default_scale_plan_meets_the_minimum_counts():
    world = entity_world.build_entity_world(seed=0, scale="default")  # in memory: no pictures
    names = Counter(e.name for e in world.entities)
    assert len(world.entities) >= 300 and len(names) <= 60 and min(names.values()) >= 3
    assert len(world.mentions) >= 3000


def test_descriptions_contain_every_textual_attribute(entity_files):
    for qid, e in entity_files.kb.items():
        phrases = set(entity_files.truth["entities"][qid]["phrases"])
        assert phrases <= tokens(e["desc"]), qid


def test_members_of_a_name_group_look_different(entity_files):
    for members in entity_files.groups.values():
        visuals = [entity_files.truth["entities"][q]["visual"] for q in members]
        assert len({v["shape"] for v in visuals}) == len(visuals)
        assert len({v["colour"] for v in visuals}) == len(visuals)


def independent_label(text_cands: set[str], group: set[str]) -> str:
    if len(text_cands) == 1:
        return "text"
    if len(text_cands) in (2, 3) and text_cands != group:
        return "both"
    return "image"


def test_decisive_labels_hold(entity_files):
    truth = entity_files.truth
    entities = truth["entities"]
    text_vocab = set(truth["text_vocabulary"]) | {p for e in entities.values() for p in e["phrases"]}
    visual_vocab = {v for e in entities.values() for v in e["visual"].values()}
    linked = entity_files.linked()
    assert linked
    for record in linked:
        gt = truth["mentions"][record["id"]]
        gold, group = record["answer"], set(entity_files.groups[record["mentions"]])
        words = tokens(record["sentence"])
        assert gold in group and record["mentions"].lower() in words
        assert not words & visual_vocab, record["sentence"]  # pictures carry what the sentence cannot
        stated = words & text_vocab
        text_cands = {q for q in group if stated <= set(entities[q]["phrases"])}
        has_image = record["imgPath"] != ""
        image_cands = {q for q in group if not has_image or entities[q]["visual"] == gt["image_visual"]}
        if has_image:
            assert gt["image_visual"] == entities[gold]["visual"]
        label = independent_label(text_cands, group)
        assert label == gt["decisive"], (record["sentence"], sorted(text_cands))
        assert gold in text_cands
        if label == "text":
            assert text_cands == {gold}
        elif label == "both":
            assert has_image and text_cands & image_cands == {gold}
        else:
            assert has_image and len(text_cands) >= 3 and image_cands == {gold}


def colour_histogram(path: Path) -> np.ndarray:
    quantised = np.asarray(Image.open(path).convert("RGB")) // 64
    bins = quantised[..., 0] * 16 + quantised[..., 1] * 4 + quantised[..., 2]
    return np.bincount(bins.ravel(), minlength=64) / bins.size


def test_mention_pictures_show_their_gold_entity(entity_files):
    """Pixel-level: a crude colour histogram matches each mention picture to the gold's KB picture."""
    root = entity_files.root
    kb_features = {q: colour_histogram(root / "kb_image" / e["image_list"][0]) for q, e in entity_files.kb.items()}
    pictured = [r for r in entity_files.linked() if r["imgPath"]]
    hits = 0
    for record in pictured:
        feature = colour_histogram(root / "mention_image" / record["imgPath"])
        group = entity_files.groups[record["mentions"]]
        hits += min(group, key=lambda q: np.abs(kb_features[q] - feature).sum()) == record["answer"]
    assert hits / len(pictured) >= 0.97
    sizes = {Image.open(root / "mention_image" / r["imgPath"]).size for r in pictured[:20]}
    assert sizes == {(64, 64)}


def test_about_thirty_percent_have_no_image_and_those_are_text(entity_files):
    linked = entity_files.linked()
    without = [r for r in linked if r["imgPath"] == ""]
    assert abs(len(without) / len(linked) - 0.30) <= 0.03
    assert {entity_files.truth["mentions"][r["id"]]["decisive"] for r in without} == {"text"}


def test_labels_among_pictured_mentions_are_about_a_third_each(entity_files):
    labels = Counter(entity_files.truth["mentions"][r["id"]]["decisive"] for r in entity_files.linked() if r["imgPath"])
    total = sum(labels.values())
    for label in ("text", "image", "both"):
        assert abs(labels[label] / total - 1 / 3) <= 0.05, labels


def test_splits_are_70_10_20_and_contain_some_nil(entity_files):
    counts = {s: len(entity_files.records[s]) for s in SPLITS}
    total = sum(counts.values())
    for split, share in zip(SPLITS, (0.7, 0.1, 0.2)):
        assert abs(counts[split] / total - share) <= 0.02, counts
    nil = [r for s in SPLITS for r in entity_files.records[s] if r["answer"] == "nil"]
    assert 1 <= len(nil) <= 0.02 * total
    ids = [r["id"] for s in SPLITS for r in entity_files.records[s]]
    assert len(ids) == len(set(ids))


def test_qid2id_is_one_line_in_sorted_id_order(worlds, entity_files):
    lines = (worlds["entity"] / "qid2id.json").read_text().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == {q: i for i, q in enumerate(sorted(entity_files.kb))}


def test_world_json_records_seed_scale_counts(worlds):
    world = json.loads((worlds["entity"] / "world.json").read_text())
    assert (world["seed"], world["scale"], world["dataset_name"]) == (0, "tiny", "DEMO")
    assert world["counts"]["entities"] == 60 and world["generator_version"]


def test_generator_check_catches_a_wrong_label(worlds, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(worlds["entity"], broken)
    truth = json.loads((broken / "ground_truth.json").read_text())
    mention_id = next(m for m, g in truth["mentions"].items() if g["decisive"] == "image")
    truth["mentions"][mention_id]["decisive"] = "text"
    (broken / "ground_truth.json").write_text(json.dumps(truth))
    problems = check_entity_world(broken)
    assert any(mention_id in p for p in problems)


# ---------------------------------------------------------------------------------------- QA world


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def phrase_in(text: str, phrase: str) -> bool:
    return re.search(r"(?<![a-z0-9])" + re.escape(phrase.lower()) + r"(?![a-z0-9])", text.lower()) is not None


def test_qa_answers_sources_and_conflicts_hold(worlds):
    root = worlds["qa"]
    world = json.loads((root / "world.json").read_text())
    types = world["question_types"]
    products = {p["id"]: p for p in read_jsonl(root / "products.jsonl")}
    rows = {s: read_jsonl(root / f"qa_{s}.jsonl") for s in SPLITS}
    all_rows = [r for s in SPLITS for r in rows[s]]
    for row in all_rows:
        product, qtype = products[row["product_id"]], types[row["question_type"]]
        assert row["answer"] in qtype["vocabulary"] and row["answer"] == product["attributes"][row["question_type"]]
        assert (root / row["image"]).is_file() and row["context"] == product["context"]
        assert 1 <= len(row["answer"].split()) <= 2
        if qtype["modality"] == "textual":
            assert (row["answer_source"], row["context_conflict"]) == ("context", False)
            assert phrase_in(row["context"], row["answer"])
            continue
        stated = product["context_facts"][row["question_type"]]
        assert (qtype["cue"] in tokens(row["context"])) == (stated is not None)
        if stated is None:
            assert (row["answer_source"], row["context_conflict"]) == ("image", False)
        elif stated == row["answer"]:
            assert (row["answer_source"], row["context_conflict"]) == ("both", False)
            assert phrase_in(row["context"], stated)
        else:
            assert (row["answer_source"], row["context_conflict"]) == ("image", True)
            assert phrase_in(row["context"], stated)

    assert len({r["question_type"] for r in all_rows}) >= 20
    sources = Counter(r["answer_source"] for r in all_rows)
    assert all(sources[s] >= 0.1 * len(all_rows) for s in ("image", "context", "both")), sources
    assert any(r["context_conflict"] for r in all_rows)
    # Split by product: no product in two splits, about 70/10/20 of products.
    split_of = {}
    for split in SPLITS:
        for row in rows[split]:
            assert split_of.setdefault(row["product_id"], split) == split
    shares = Counter(split_of.values())
    for split, share in zip(SPLITS, (0.7, 0.1, 0.2)):
        assert abs(shares[split] / len(products) - share) <= 0.03


def test_qa_default_scale_plan_meets_the_minimum_counts():
    world = qa_world.build_qa_world(seed=0, scale="default")  # in memory: no pictures
    assert len(world.products) >= 500 and len(world.questions) >= 5000
    assert len({q.question_type for q in world.questions}) >= 20
    sources = Counter(q.answer_source for q in world.questions)
    shares = {s: sources[s] / len(world.questions) for s in ("image", "context", "both")}
    assert 0.25 <= shares["image"] <= 0.45 and 0.35 <= shares["context"] <= 0.55 and 0.15 <= shares["both"] <= 0.3


# ---------------------------------------------------------------------------------------- CLI & out


def test_cli_writes_a_tiny_entity_world(tmp_path):
    out = tmp_path / "cli_world"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmoe_core.data.generate",
            "--world",
            "entity",
            "--out",
            str(out),
            "--seed",
            "3",
            "--scale",
            "tiny",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "entity world pictures" in result.stderr  # the tqdm bar goes to stderr
    for name in (
        "kb_entity.json",
        "qid2id.json",
        "DEMO_train.json",
        "DEMO_dev.json",
        "DEMO_test.json",
        "ground_truth.json",
        "world.json",
    ):
        assert (out / name).is_file(), name
    assert json.loads((out / "world.json").read_text())["seed"] == 3
    assert not (tmp_path / "cli_world.partial").exists()


def test_refuses_to_replace_a_folder_that_is_not_a_world(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        generate_qa_world(precious, scale="tiny", progress=False)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_regenerating_replaces_a_previous_world(worlds, tmp_path):
    out = generate_qa_world(tmp_path / "qa", seed=1, scale="tiny", progress=False)
    generate_qa_world(out, seed=0, scale="tiny", progress=False)
    assert all_files(out) == all_files(worlds["qa"])


def test_world_check_error_is_raised_for_violations(monkeypatch, tmp_path):
    import mmoe_core.data.generate as generate

    monkeypatch.setattr(generate, "check_qa_world", lambda d: ["made-up violation"])
    with pytest.raises(WorldCheckError, match="made-up violation"):
        generate.generate_qa_world(tmp_path / "qa", scale="tiny", progress=False)
    assert not (tmp_path / "qa").exists()
