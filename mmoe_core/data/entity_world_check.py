"""Re-derive every label of a written entity world from its files and report violations.

Separate from generation (mmoe_core.data.entity_world) so that the check reads only the files, never
the generator's in-memory plan: what it verifies is what a reader of the dataset sees.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from PIL import Image

from . import drawing
from .entity_vocabulary import (
    DATASET_NAME,
    LABELS,
    MAX_NAMES,
    MIN_GROUP,
    NO_IMAGE_SHARE,
    SPLIT_SHARES,
    SPLITS,
    words,
)


def decisive_label(text_cands: set[str], group: set[str]) -> str:
    """The label implied by the text candidate set T inside the name group G (see module docstring)."""
    if len(text_cands) == 1:
        return "text"
    if 2 <= len(text_cands) <= 3 and text_cands != group:
        return "both"
    return "image"


def _check_mention(
    record: dict,
    gt: dict,
    groups: dict[str, set[str]],
    entities_gt: dict,
    directory: Path,
    text_vocab: set[str],
    visual_vocab: set[str],
) -> list[str]:
    where = f"mention {record['id']}"
    tokens = set(words(record["sentence"]))
    if record["answer"] == "nil":
        return [] if gt["nil"] else [f"{where}: answer nil but ground truth is not nil"]
    problems = []
    gold = record["answer"]
    group = groups.get(record["mentions"], set())
    if gold not in group:
        return [f"{where}: gold {gold} does not carry the name {record['mentions']!r}"]
    if record["mentions"].lower() not in tokens:
        problems.append(f"{where}: sentence does not contain the name")
    if tokens & visual_vocab:
        problems.append(f"{where}: sentence states visual words {sorted(tokens & visual_vocab)}")
    stated = tokens & text_vocab
    text_cands = {q for q in group if stated <= set(entities_gt[q]["phrases"])}
    has_image = record["imgPath"] != ""
    if has_image != gt["has_image"]:
        problems.append(f"{where}: imgPath and ground truth has_image disagree")
    if has_image and not (directory / "mention_image" / record["imgPath"]).is_file():
        problems.append(f"{where}: image {record['imgPath']} missing")
    visual = gt["image_visual"] if has_image else None
    if has_image and visual != entities_gt[gold]["visual"]:
        problems.append(f"{where}: picture does not show the gold's visual attributes")
    image_cands = {q for q in group if visual is None or entities_gt[q]["visual"] == visual}
    label = decisive_label(text_cands, group)
    if label != gt["decisive"]:
        problems.append(f"{where}: label {gt['decisive']!r} but sentence implies {label!r} (T={sorted(text_cands)})")
    if gold not in text_cands:
        problems.append(f"{where}: the sentence contradicts the gold entity")
    if label != "text" and text_cands & image_cands != {gold}:
        problems.append(f"{where}: label {label!r} but text and image together do not single out the gold")
    if not has_image and gt["decisive"] != "text":
        problems.append(f"{where}: no image but label {gt['decisive']!r}")
    if set(gt["text_candidates"]) != text_cands or set(gt["image_candidates"]) != image_cands:
        problems.append(f"{where}: recorded candidate sets differ from recomputed ones")
    return problems


def _check_entities(kb: list[dict], qid2id: dict, entities_gt: dict, directory: Path) -> list[str]:
    problems = []
    ids = sorted(e["id"] for e in kb)
    if qid2id != {qid: i for i, qid in enumerate(ids)}:
        problems.append("qid2id.json does not map each QID to its position in id order")
    groups: dict[str, list[dict]] = defaultdict(list)
    for e in kb:
        groups[e["entity_name"]].append(e)
        desc_tokens = set(words(e["desc"]))
        gt = entities_gt[e["id"]]
        missing = set(gt["phrases"]) - desc_tokens
        if missing:
            problems.append(f"entity {e['id']}: description lacks attribute words {sorted(missing)}")
        if not 1 <= len(e["image_list"]) <= 3:
            problems.append(f"entity {e['id']}: {len(e['image_list'])} images")
        for file_name in e["image_list"]:
            path = directory / "kb_image" / file_name
            if not path.is_file():
                problems.append(f"entity {e['id']}: image {file_name} missing")
            elif Image.open(path).size != (drawing.IMAGE_SIZE, drawing.IMAGE_SIZE):
                problems.append(f"entity {e['id']}: image {file_name} has the wrong size")
    if len(groups) > MAX_NAMES:
        problems.append(f"{len(groups)} names, more than {MAX_NAMES}")
    for name, members in groups.items():
        if len(members) < MIN_GROUP:
            problems.append(f"name {name!r} is shared by only {len(members)} entities")
        looks = [tuple(sorted(entities_gt[m["id"]]["visual"].items())) for m in members]
        if len(set(looks)) != len(looks):
            problems.append(f"name {name!r}: two members look the same")
    return problems


def _check_shares(records: dict[str, list[dict]], gt_mentions: dict) -> list[str]:
    problems = []
    total = sum(len(r) for r in records.values())
    for split, share in zip(SPLITS, SPLIT_SHARES):
        if abs(len(records[split]) / total - share) > 0.02:
            problems.append(f"split {split} holds {len(records[split])}/{total} mentions, expected ~{share:.0%}")
    linked = [g for g in gt_mentions.values() if not g["nil"]]
    without = sum(not g["has_image"] for g in linked) / len(linked)
    if abs(without - NO_IMAGE_SHARE) > 0.03:
        problems.append(f"{without:.1%} of mentions lack an image, expected ~{NO_IMAGE_SHARE:.0%}")
    pictured = Counter(g["decisive"] for g in linked if g["has_image"])
    for label in LABELS:
        share = pictured[label] / max(1, sum(pictured.values()))
        if abs(share - 1 / 3) > 0.05:
            problems.append(f"label {label!r} is {share:.1%} of mentions with an image, expected ~33%")
    return problems


def check_entity_world(directory: str | Path) -> list[str]:
    """Re-derive every guarantee of the entity world from its files; returns violations (empty when sound)."""
    directory = Path(directory)
    kb = json.loads((directory / "kb_entity.json").read_text(encoding="utf-8"))
    qid2id = json.loads((directory / "qid2id.json").read_text(encoding="utf-8").splitlines()[0])
    truth = json.loads((directory / "ground_truth.json").read_text(encoding="utf-8"))
    records = {s: json.loads((directory / f"{DATASET_NAME}_{s}.json").read_text(encoding="utf-8")) for s in SPLITS}
    text_vocab, visual_vocab = set(truth["text_vocabulary"]), set(truth["visual_vocabulary"])

    problems = _check_entities(kb, qid2id, truth["entities"], directory)
    groups: dict[str, set[str]] = defaultdict(set)
    for e in kb:
        groups[e["entity_name"]].add(e["id"])
    for split, split_records in records.items():
        for record in split_records:
            gt = truth["mentions"].get(record["id"])
            if gt is None or gt["split"] != split:
                problems.append(f"mention {record['id']}: ground truth missing or in another split")
                continue
            problems += _check_mention(record, gt, groups, truth["entities"], directory, text_vocab, visual_vocab)
    return problems + _check_shares(records, truth["mentions"])
