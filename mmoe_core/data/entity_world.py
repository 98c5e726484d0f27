"""The entity world: a generated multimodal entity-linking benchmark with known ground truth.

World design
------------
* **Name groups.** Entities share a small pool of ambiguous names ("Jaguar", "Orion", ...); every
  name is carried by 3 to 10 entities (a *name group*). A mention's surface form is always the
  group's name, so the name alone never decides.
* **Textual attributes.** Each entity has a type (band, animal, ship, city, brand, film, game) and
  four textual attributes, each a single word that appears in its description:
    - two *type-specific* ones (e.g. a band's genre and instrument), drawn without replacement
      inside the group from per-type vocabularies that do not overlap: **unique in the group**;
    - an *era* (a decade) and an *origin* (a nationality). Inside a group these are handed out by
      blocks: the members are partitioned into blocks of 2 or 3 that share an era, and again into
      blocks that share an origin, so that every entity shares an era or an origin with exactly 1
      or 2 others and never with the whole group.
  The type word itself ("band") is a textual attribute too.
* **Visual attributes.** Each entity is drawn as a shape with a colour, a pattern and a background.
  Inside a group shapes are all different and colours are all different, so any picture of an
  entity identifies it within its group (visual combinations are distinct a fortiori).
* **Mentions.** A short sentence containing the name, plus (for ~70%) an augmented picture of the
  entity. Let G be the name group, T the members whose textual attributes include every attribute
  word found in the sentence, and I the members whose visual attributes match the picture (I = G
  without a picture). The label says which modality decides:
    - ``text``:  |T| = 1. The sentence names a type-specific (unique) attribute.
    - ``both``:  2 <= |T| <= 3 and T != G, and T ∩ I = {gold}. The sentence names the gold's era or
      origin block; the picture picks the gold inside that block.
    - ``image``: T = G (or |T| >= 4), and I = {gold}. The sentence holds no attribute word at all.
  Mentions without a picture are always ``text``. No mention sentence ever contains a visual word
  (colour, shape, pattern or background), so pictures carry information the sentence cannot.
* A few mentions (~1%) are ``nil``: the name refers to something outside the knowledge base.

:func:`check_entity_world` re-derives every label from the written files and reports violations.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from . import drawing
from .entity_vocabulary import (
    _STREAM_ENTITY_PICTURE,
    _STREAM_MENTION_PICTURE,
    DATASET_NAME,
    EMBLEM_SENTENCE,
    ENTITY_BACKGROUNDS,
    ENTITY_COLOURS,
    ENTITY_PATTERNS,
    ENTITY_SHAPES,
    ENTITY_TYPES,
    ERAS,
    GENERATOR_VERSION,
    LABELS,
    MAX_GROUP,
    MAX_NAMES,
    MAX_SAME_TYPE_IN_GROUP,
    MIN_GROUP,
    NAMES,
    NIL_SHARE,
    NIL_TEMPLATES,
    NO_IMAGE_SHARE,
    ORIGINS,
    SCALES,
    SHARED_TEMPLATES,
    SPLIT_SHARES,
    SPLITS,
    UNINFORMATIVE_TEMPLATES,
    EntityScale,
    text_vocabulary,
    visual_vocabulary,
    with_article,
    words,
)
from .entity_world_check import check_entity_world, decisive_label  # noqa: F401 -- part of this module's API

# ---------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class EntitySpec:
    qid: str
    name: str
    type: str
    attributes: dict[str, str]  # origin, era and the two type-specific keys -> display value
    visual: dict[str, str]  # shape, colour, pattern, background
    desc: str
    n_images: int

    @property
    def phrases(self) -> frozenset[str]:
        """The textual attribute words that describe this entity (lower case)."""
        return frozenset({self.type} | {v.lower() for v in self.attributes.values()})


@dataclass(frozen=True)
class MentionSpec:
    id: str
    name: str
    split: str
    sentence: str
    gold: str | None  # QID, None for nil
    decisive: str | None
    stated: dict[str, str] = field(default_factory=dict)  # attribute key -> value the sentence states
    has_image: bool = False


@dataclass(frozen=True)
class EntityWorld:
    seed: int
    scale: str
    entities: list[EntitySpec]
    mentions: list[MentionSpec]


def group_sizes(total: int, groups: int, rng: np.random.Generator) -> list[int]:
    """Sizes in [MIN_GROUP, MAX_GROUP] summing to ``total``: start all at the minimum, add one at a time."""
    if not MIN_GROUP * groups <= total <= MAX_GROUP * groups:
        raise ValueError(f"cannot split {total} entities into {groups} groups of {MIN_GROUP}..{MAX_GROUP}")
    sizes = [MIN_GROUP] * groups
    for _ in range(total - MIN_GROUP * groups):
        open_groups = [i for i, s in enumerate(sizes) if s < MAX_GROUP]
        sizes[int(rng.choice(open_groups))] += 1
    return sizes


def pick_types(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` entity types with at most MAX_SAME_TYPE_IN_GROUP of each."""
    pool = [t for t in ENTITY_TYPES for _ in range(MAX_SAME_TYPE_IN_GROUP)]
    return [pool[i] for i in rng.permutation(len(pool))[:n]]


def blocks_of_two_or_three(members: list[int], rng: np.random.Generator) -> list[list[int]]:
    """Partition ``members`` (at least 2) into consecutive blocks of size 2 or 3, in random sizes."""
    blocks, rest = [], list(members)
    while rest:
        if len(rest) <= 3:
            size = len(rest)
        elif len(rest) == 4:
            size = 2  # 3 would leave a lone member
        else:
            size = int(rng.choice([2, 3]))
        blocks.append(rest[:size])
        rest = rest[size:]
    return blocks


def shared_blocks(n: int, rng: np.random.Generator) -> tuple[list[list[int]], list[list[int]]]:
    """(era blocks, origin blocks) over members 0..n-1 so that each member shares an era or an origin
    with exactly 1 or 2 others, and no block is the whole group."""
    order = [int(i) for i in rng.permutation(n)]
    if n == 3:
        # A block of 3 would be the whole group; pair two by era and pair the third with one of them by origin.
        a, b, c = order
        return [[a, b], [c]], [[c, a], [b]]
    era = blocks_of_two_or_three(order, rng)
    origin = blocks_of_two_or_three([int(i) for i in rng.permutation(n)], rng)
    return era, origin


def describe(name: str, type_name: str, attributes: dict[str, str], visual: dict[str, str]) -> str:
    """One sentence with every textual attribute, then one with every visual attribute."""
    values = dict(attributes)
    values.update({f"a_{k}": with_article(v) for k, v in attributes.items()})
    text = ENTITY_TYPES[type_name].description.format(name=name, **values)
    emblem = EMBLEM_SENTENCE.format(a_colour=with_article(visual["colour"]), **visual)
    return f"{text} {emblem}"


def build_group(name: str, size: int, qids: list[str], rng: np.random.Generator) -> list[EntitySpec]:
    types = pick_types(size, rng)
    era_blocks, origin_blocks = shared_blocks(size, rng)
    eras = rng.permutation(len(ERAS))[: len(era_blocks)]
    origins = rng.permutation(len(ORIGINS))[: len(origin_blocks)]
    era_of = {m: ERAS[eras[b]] for b, block in enumerate(era_blocks) for m in block}
    origin_of = {m: ORIGINS[origins[b]] for b, block in enumerate(origin_blocks) for m in block}

    # Type-specific values: without replacement inside the group, so they are unique in it.
    specific: dict[int, dict[str, str]] = {m: {} for m in range(size)}
    for type_name, entity_type in ENTITY_TYPES.items():
        members = [m for m in range(size) if types[m] == type_name]
        for key, vocabulary in entity_type.keys.items():
            chosen = rng.permutation(len(vocabulary))[: len(members)]
            for m, v in zip(members, chosen):
                specific[m][key] = vocabulary[v]

    shapes = rng.permutation(len(ENTITY_SHAPES))[:size]
    colours = rng.permutation(len(ENTITY_COLOURS))[:size]
    entities = []
    for m in range(size):
        attributes = {"origin": origin_of[m], "era": era_of[m], **specific[m]}
        visual = {
            "shape": ENTITY_SHAPES[shapes[m]],
            "colour": ENTITY_COLOURS[colours[m]],
            "pattern": ENTITY_PATTERNS[int(rng.integers(len(ENTITY_PATTERNS)))],
            "background": ENTITY_BACKGROUNDS[int(rng.integers(len(ENTITY_BACKGROUNDS)))],
        }
        entities.append(
            EntitySpec(
                qid=qids[m],
                name=name,
                type=types[m],
                attributes=attributes,
                visual=visual,
                desc=describe(name, types[m], attributes, visual),
                n_images=int(rng.integers(1, 4)),
            )
        )
    return entities


def unique_qids(n: int, rng: np.random.Generator) -> list[str]:
    """Wikidata-like ids of varying length (so that string order differs from numeric order, as in real KBs)."""
    numbers = rng.choice(10_000_000 - 100, size=n, replace=False) + 100
    return [f"Q{int(x)}" for x in numbers]


def build_entities(scale: EntityScale, rng: np.random.Generator) -> list[EntitySpec]:
    if scale.names > min(MAX_NAMES, len(NAMES)):
        raise ValueError(f"at most {min(MAX_NAMES, len(NAMES))} names")
    names = [NAMES[i] for i in rng.permutation(len(NAMES))[: scale.names]]
    sizes = group_sizes(scale.entities, scale.names, rng)
    qids = unique_qids(scale.entities, rng)
    entities: list[EntitySpec] = []
    for name, size in zip(names, sizes):
        entities += build_group(name, size, qids[len(entities) : len(entities) + size], rng)
    return entities


def shared_keys_that_narrow(entity: EntitySpec, group: list[EntitySpec]) -> list[str]:
    """Shared attributes ('era', 'origin') of ``entity`` held by 2 or 3 members of its group, not all."""
    keys = []
    for key in ("era", "origin"):
        holders = [e for e in group if e.attributes[key] == entity.attributes[key]]
        if 2 <= len(holders) <= 3 and len(holders) < len(group):
            keys.append(key)
    return keys


def _fill(template: str, name: str, value: str = "") -> str:
    return template.format(name=name, v=value, a_v=with_article(value) if value else "")


def mention_sentence(
    label: str, entity: EntitySpec, group: list[EntitySpec], rng: np.random.Generator
) -> tuple[str, dict[str, str]]:
    """A sentence for ``entity`` whose textual content makes ``label`` true; returns it with the stated attributes."""
    if label == "text":
        key = str(rng.choice(sorted(ENTITY_TYPES[entity.type].keys)))
        templates = ENTITY_TYPES[entity.type].mention_templates[key]
    elif label == "both":
        key = str(rng.choice(shared_keys_that_narrow(entity, group)))
        templates = SHARED_TEMPLATES[key]
    else:
        template = UNINFORMATIVE_TEMPLATES[int(rng.integers(len(UNINFORMATIVE_TEMPLATES)))]
        return _fill(template, entity.name), {}
    value = entity.attributes[key]
    template = templates[int(rng.integers(len(templates)))]
    return _fill(template, entity.name, value), {key: value}


def split_of(position: int, total: int) -> str:
    """Split of the item at ``position`` of ``total`` shuffled items: first 70% train, next 10% dev, last 20% test."""
    train_end = round(total * SPLIT_SHARES[0])
    dev_end = train_end + round(total * SPLIT_SHARES[1])
    return "train" if position < train_end else "dev" if position < dev_end else "test"


def mention_labels(n_linked: int, rng: np.random.Generator) -> list[tuple[str, bool]]:
    """(label, has_image) for each linked mention: ~30% without image (text), the rest a third each."""
    n_without = round(NO_IMAGE_SHARE * n_linked)
    with_image = [(LABELS[i % 3], True) for i in range(n_linked - n_without)]
    plan = [("text", False)] * n_without + with_image
    return [plan[i] for i in rng.permutation(n_linked)]


def build_mentions(entities: list[EntitySpec], scale: EntityScale, rng: np.random.Generator) -> list[MentionSpec]:
    groups: dict[str, list[EntitySpec]] = defaultdict(list)
    for e in entities:
        groups[e.name].append(e)
    n_nil = max(1, round(NIL_SHARE * scale.mentions))
    n_linked = scale.mentions - n_nil
    # Every entity is mentioned about equally often.
    reps = -(-n_linked // len(entities))
    golds = np.concatenate([rng.permutation(len(entities)) for _ in range(reps)])[:n_linked]

    # Drafts first; ids and splits are given once the order is shuffled.
    drafts: list[MentionSpec] = []
    for gold_index, (label, has_image) in zip(golds, mention_labels(n_linked, rng)):
        entity = entities[int(gold_index)]
        sentence, stated = mention_sentence(label, entity, groups[entity.name], rng)
        drafts.append(
            MentionSpec(
                id="",
                name=entity.name,
                split="",
                sentence=sentence,
                gold=entity.qid,
                decisive=label,
                stated=stated,
                has_image=has_image,
            )
        )
    group_names = sorted(groups)
    for _ in range(n_nil):
        name = group_names[int(rng.integers(len(group_names)))]
        template = NIL_TEMPLATES[int(rng.integers(len(NIL_TEMPLATES)))]
        drafts.append(MentionSpec(id="", name=name, split="", sentence=_fill(template, name), gold=None, decisive=None))

    splits = stratified_splits([(d.decisive, d.has_image) for d in drafts], rng)
    order = rng.permutation(len(drafts))
    return [replace(drafts[int(i)], id=f"M{position:05d}", split=splits[int(i)]) for position, i in enumerate(order)]


def stratified_splits(strata: list[tuple], rng: np.random.Generator) -> list[str]:
    """A split per item, 70/10/20 inside every stratum, so each split has the same label and image mix."""
    members: dict[tuple, list[int]] = defaultdict(list)
    for i, key in enumerate(strata):
        members[key].append(i)
    splits = [""] * len(strata)
    for key in sorted(members, key=repr):
        group = members[key]
        for position, i in enumerate(rng.permutation(len(group))):
            splits[group[int(i)]] = split_of(position, len(group))
    return splits


def build_entity_world(seed: int = 0, scale: str = "default") -> EntityWorld:
    """Plan the whole world in memory (no pictures yet); a pure function of (seed, scale)."""
    rng = np.random.default_rng(seed)
    entities = build_entities(SCALES[scale], rng)
    mentions = build_mentions(entities, SCALES[scale], rng)
    return EntityWorld(seed=seed, scale=scale, entities=entities, mentions=mentions)


# ------------------------------------------------------------------------------------------ writing


def entity_picture(entity: EntitySpec, seed: int, entity_index: int, k: int) -> Image.Image:
    """The k-th KB picture of an entity: the first one canonical, others slightly moved."""
    rng = np.random.default_rng([seed, _STREAM_ENTITY_PICTURE, entity_index, k])
    pose = drawing.Pose() if k == 0 else drawing.random_pose(rng, shift=3, scale=(0.9, 1.05), angle=10)
    return drawing.draw_picture(
        entity.visual["shape"],
        entity.visual["colour"],
        entity.visual["pattern"],
        drawing.BACKGROUNDS[entity.visual["background"]],
        pose,
    )


def mention_picture(entity: EntitySpec, seed: int, mention_index: int) -> Image.Image:
    """An augmented picture: shift, scale, rotation, noise and sometimes an occluding box, all mild."""
    rng = np.random.default_rng([seed, _STREAM_MENTION_PICTURE, mention_index])
    pose = drawing.random_pose(rng, shift=7, scale=(0.75, 1.05), angle=30)
    corruption = drawing.random_corruption(rng, max_noise=10, occlusion_prob=0.4, max_box=16)
    return drawing.draw_picture(
        entity.visual["shape"],
        entity.visual["colour"],
        entity.visual["pattern"],
        drawing.BACKGROUNDS[entity.visual["background"]],
        pose,
        corruption,
        rng,
    )


def entity_image_names(entity: EntitySpec) -> list[str]:
    return [f"{entity.qid}_{k}.png" for k in range(entity.n_images)]


def mention_image_name(mention: MentionSpec) -> str:
    # JPEG named <stem>.jpg: the published MEL-MMoE loader rewrites every mention imgPath to <stem>.jpg.
    return f"{mention.id}.jpg"


def _write_json(path: Path, obj: object, indent: int | None = None) -> None:
    # Compact by default, like the published MEL files (and json's fast C encoder only runs without indent).
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=indent) + "\n", encoding="utf-8")


def kb_records(entities: list[EntitySpec]) -> list[dict]:
    return [
        {"id": e.qid, "type": "entity", "entity_name": e.name, "desc": e.desc, "image_list": entity_image_names(e)}
        for e in entities
    ]


def mention_record(m: MentionSpec, by_qid: dict[str, EntitySpec]) -> dict:
    gold = by_qid.get(m.gold) if m.gold else None
    return {
        "id": m.id,
        "mentions": m.name,
        "entities": gold.name if gold else "nil",
        "sentence": m.sentence,
        "imgPath": mention_image_name(m) if m.has_image else "",
        "answer": m.gold or "nil",
        "desc": gold.desc if gold else "",
    }


def text_candidates(sentence: str, group: list[EntitySpec]) -> list[str]:
    stated = set(words(sentence)) & text_vocabulary()
    return [e.qid for e in group if stated <= e.phrases]


def image_candidates(visual: dict[str, str] | None, group: list[EntitySpec]) -> list[str]:
    return [e.qid for e in group if visual is None or e.visual == visual]


def ground_truth(world: EntityWorld) -> dict:
    by_qid = {e.qid: e for e in world.entities}
    groups: dict[str, list[EntitySpec]] = defaultdict(list)
    for e in world.entities:
        groups[e.name].append(e)
    mentions = {}
    for m in world.mentions:
        group = groups[m.name]
        gold = by_qid.get(m.gold) if m.gold else None
        visual = gold.visual if (gold and m.has_image) else None
        mentions[m.id] = {
            "split": m.split,
            "nil": gold is None,
            "decisive": m.decisive,
            "entity_type": gold.type if gold else None,
            "name": m.name,
            "name_group": [e.qid for e in group],
            "has_image": m.has_image,
            "stated_attributes": m.stated,
            "image_visual": visual,
            "text_candidates": text_candidates(m.sentence, group) if gold else [],
            "image_candidates": image_candidates(visual, group) if gold else [],
        }
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": world.seed,
        "label_rules": {
            "text": "exactly one name-group member has every textual attribute word in the sentence",
            "both": "2 or 3 members (not the whole group) fit the sentence; the picture picks the gold among them",
            "image": "the sentence fits the whole group (or >= 4 members); the picture alone picks the gold",
        },
        "text_vocabulary": sorted(text_vocabulary()),
        "visual_vocabulary": sorted(visual_vocabulary()),
        "entities": {
            e.qid: {
                "name": e.name,
                "type": e.type,
                "attributes": e.attributes,
                "phrases": sorted(e.phrases),
                "visual": e.visual,
            }
            for e in world.entities
        },
        "mentions": mentions,
    }


def world_counts(world: EntityWorld) -> dict:
    per_split = Counter(m.split for m in world.mentions)
    labels = Counter(f"{m.split}/{m.decisive or 'nil'}" for m in world.mentions)
    return {
        "entities": len(world.entities),
        "names": len({e.name for e in world.entities}),
        "entity_images": sum(e.n_images for e in world.entities),
        "mentions": len(world.mentions),
        "mentions_per_split": {s: per_split[s] for s in SPLITS},
        "mentions_with_image": sum(m.has_image for m in world.mentions),
        "nil_mentions": sum(m.gold is None for m in world.mentions),
        "labels_per_split": dict(sorted(labels.items())),
    }


@dataclass(frozen=True)
class PictureJob:
    """One picture to draw: KB picture ``k`` of entity number ``index``, or (k None) mention number ``index``."""

    entity: EntitySpec
    seed: int
    index: int
    k: int | None
    path: Path


def write_picture(job: PictureJob) -> None:
    if job.k is None:
        drawing.save_jpeg(mention_picture(job.entity, job.seed, job.index), job.path)
    else:
        drawing.save_png(entity_picture(job.entity, job.seed, job.index, job.k), job.path)


def picture_jobs(world: EntityWorld, directory: Path) -> list[PictureJob]:
    by_qid = {e.qid: e for e in world.entities}
    jobs = [
        PictureJob(entity, world.seed, index, k, directory / "kb_image" / file_name)
        for index, entity in enumerate(world.entities)
        for k, file_name in enumerate(entity_image_names(entity))
    ]
    jobs += [
        PictureJob(by_qid[m.gold], world.seed, int(m.id[1:]), None, directory / "mention_image" / mention_image_name(m))
        for m in world.mentions
        if m.has_image
    ]
    return jobs


def write_entity_world(world: EntityWorld, directory: Path, progress: bool = True) -> None:
    """Write the world into an existing empty ``directory`` in the MIMIC / MEL-MMoE layout."""
    (directory / "kb_image").mkdir()
    (directory / "mention_image").mkdir()
    drawing.write_pictures(
        picture_jobs(world, directory), write_picture, desc="entity world pictures", progress=progress
    )
    by_qid = {e.qid: e for e in world.entities}
    _write_json(directory / "kb_entity.json", kb_records(world.entities))
    # One line (the published loader reads only the first), mapping each QID to its row in the id-sorted KB.
    _write_json(directory / "qid2id.json", {qid: i for i, qid in enumerate(sorted(by_qid))})
    for split in SPLITS:
        records = [mention_record(m, by_qid) for m in world.mentions if m.split == split]
        _write_json(directory / f"{DATASET_NAME}_{split}.json", records)
    _write_json(directory / "ground_truth.json", ground_truth(world))
    _write_json(
        directory / "world.json",
        {
            "world": "entity",
            "dataset_name": DATASET_NAME,
            "seed": world.seed,
            "scale": world.scale,
            "generator_version": GENERATOR_VERSION,
            "counts": world_counts(world),
            "notes": (
                "Mention 'desc' is the gold entity's description, as in the MEL-MMoE release of WikiMEL; "
                "a model that reads it sees the answer, so decisive labels hold for mention sentence + image."
            ),
        },
        indent=1,
    )
