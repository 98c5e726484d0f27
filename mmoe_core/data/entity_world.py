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
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from . import drawing

GENERATOR_VERSION = "entity-world/1"
DATASET_NAME = "DEMO"
SPLITS = ("train", "dev", "test")
SPLIT_SHARES = (0.7, 0.1, 0.2)
NO_IMAGE_SHARE = 0.30
NIL_SHARE = 0.01
MAX_NAMES = 60
MIN_GROUP, MAX_GROUP = 3, 10
MAX_SAME_TYPE_IN_GROUP = 3
LABELS = ("text", "image", "both")

# Random streams for pictures: each picture gets its own generator seeded by (seed, stream, index),
# so pictures do not depend on the order in which they are drawn.
_STREAM_ENTITY_PICTURE = 1
_STREAM_MENTION_PICTURE = 2


@dataclass(frozen=True)
class EntityScale:
    entities: int
    names: int
    mentions: int  # including nil mentions


SCALES: dict[str, EntityScale] = {
    "tiny": EntityScale(entities=60, names=12, mentions=400),
    "default": EntityScale(entities=400, names=58, mentions=3200),
}

NAMES = (
    "Jaguar", "Mercury", "Phoenix", "Apollo", "Orion", "Titan", "Atlas", "Nova", "Falcon", "Puma",
    "Cobra", "Viper", "Eclipse", "Aurora", "Zenith", "Vega", "Polaris", "Triton", "Pegasus", "Hercules",
    "Athena", "Genesis", "Odyssey", "Spirit", "Endeavour", "Voyager", "Pioneer", "Discovery", "Liberty",
    "Victory", "Empire", "Monarch", "Sparrow", "Raven", "Condor", "Panther", "Lynx", "Bison", "Mustang",
    "Stingray", "Marlin", "Kestrel", "Heron", "Cascade", "Sierra", "Avalon", "Olympus", "Everest",
    "Neptune", "Saturn", "Juno", "Helios", "Prometheus", "Trinity", "Meridian", "Horizon", "Tempest",
    "Blizzard", "Tornado", "Typhoon", "Cyclone", "Avalanche", "Comet", "Andromeda",
)

ORIGINS = ("British", "French", "German", "Italian", "Spanish", "Japanese", "American", "Brazilian",
           "Swedish", "Mexican", "Canadian", "Korean")
ERAS = ("1920s", "1930s", "1940s", "1950s", "1960s", "1970s", "1980s", "1990s", "2000s", "2010s")

# Entity colours exclude black and white, which are backgrounds here.
ENTITY_COLOURS = tuple(c for c in drawing.SHAPE_COLOURS if c not in ("black", "white"))
ENTITY_SHAPES = drawing.SHAPES
ENTITY_PATTERNS = drawing.PATTERNS
ENTITY_BACKGROUNDS = tuple(drawing.BACKGROUNDS)


@dataclass(frozen=True)
class EntityType:
    """A kind of entity: its type word, two type-specific attribute vocabularies and its phrasings.

    Templates use ``{name}``, ``{v}`` (the attribute value) and ``{a_v}`` (value with its article).
    """

    word: str
    keys: dict[str, tuple[str, ...]]
    description: str
    mention_templates: dict[str, tuple[str, ...]]


ENTITY_TYPES: dict[str, EntityType] = {
    "band": EntityType(
        "band",
        {"genre": ("rock", "jazz", "punk", "metal", "reggae", "techno", "folk", "blues", "soul", "disco",
                   "grunge", "ska"),
         "instrument": ("guitar", "piano", "violin", "saxophone", "drums", "trumpet", "synthesizer", "cello",
                        "harp", "flute", "banjo", "accordion")},
        "{name} is {a_origin} {genre} band formed in the {era}, known for its {instrument} sound.",
        {"genre": ("{name} played {a_v} set to a packed hall.",
                   "Critics called the new {v} record by {name} their best so far.",
                   "I grew up listening to {v} songs by {name}."),
         "instrument": ("The {v} solo on the new {name} single is stunning.",
                        "{name} brought {a_v} on stage for the encore.",
                        "Nobody plays the {v} like the members of {name}.")},
    ),
    "animal": EntityType(
        "animal",
        {"habitat": ("rainforest", "savanna", "desert", "tundra", "wetland", "reef", "highlands", "grassland",
                     "mangrove", "steppe", "taiga", "marsh"),
         "prey": ("fish", "insects", "rodents", "fruit", "leaves", "seeds", "deer", "birds", "crabs", "worms",
                  "snails", "berries")},
        "{name} is an animal of the {origin} {habitat}, first described in the {era}, that feeds on {prey}.",
        {"habitat": ("A {name} was spotted moving through the {v} at dawn.",
                     "Rangers tracked a {name} across the {v}.",
                     "The {v} is home to the {name}."),
         "prey": ("A {name} was seen feeding on {v} near the water.",
                  "Biologists say the {name} eats mostly {v}.",
                  "Every evening the {name} goes looking for {v}.")},
    ),
    "ship": EntityType(
        "ship",
        {"vessel": ("frigate", "destroyer", "schooner", "cruiser", "submarine", "galleon", "tanker", "trawler",
                    "ferry", "clipper", "corvette", "icebreaker"),
         "sea": ("Atlantic", "Pacific", "Baltic", "Arctic", "Mediterranean", "Caribbean", "Adriatic", "Aegean",
                 "Caspian", "Barents", "Tasman", "Antarctic")},
        "{name} is {a_origin} {vessel} ship launched in the {era} that sailed the {sea}.",
        {"vessel": ("The {v} {name} left port before the storm.",
                    "Sailors remember serving on the {v} {name}.",
                    "The old {v} {name} is now a museum."),
         "sea": ("The {name} crossed the {v} in nine days.",
                 "Fishermen saw the {name} heading across the {v}.",
                 "The {name} spent years patrolling the {v}.")},
    ),
    "city": EntityType(
        "city",
        {"river": ("Danube", "Nile", "Rhine", "Volga", "Thames", "Tagus", "Loire", "Elbe", "Seine", "Vistula",
                   "Douro", "Ebro"),
         "landmark": ("cathedral", "harbour", "castle", "bridge", "university", "stadium", "market", "lighthouse",
                      "tower", "fortress", "aqueduct", "monastery")},
        "{name} is {a_origin} city on the {river}, founded in the {era} and famous for its {landmark}.",
        {"river": ("Tourists walk along the {v} in {name} every summer.",
                   "The {v} floods parts of {name} most winters.",
                   "She grew up in {name} on the banks of the {v}."),
         "landmark": ("The old {v} of {name} draws crowds every weekend.",
                      "Visitors to {name} should not miss its {v}.",
                      "The {v} in {name} was restored last year.")},
    ),
    "brand": EntityType(
        "brand",
        {"industry": ("car", "watch", "shoe", "perfume", "beer", "coffee", "phone", "bicycle", "chocolate",
                      "furniture", "tyre", "camera"),
         "hq": ("Milan", "Lyon", "Munich", "Osaka", "Seattle", "Porto", "Leeds", "Gothenburg", "Monterrey",
                "Toronto", "Valencia", "Kyoto")},
        "{name} is {a_origin} {industry} brand founded in the {era} and based in {hq}.",
        {"industry": ("{name} unveiled a new {v} line at the trade fair.",
                      "My first {v} was made by {name}.",
                      "Sales of {name} {v} models rose this year."),
         "hq": ("{name} opened a new office near its headquarters in {v}.",
                "Executives at {name} met in {v} this week.",
                "The {name} headquarters in {v} is expanding.")},
    ),
    "film": EntityType(
        "film",
        {"genre": ("thriller", "western", "comedy", "musical", "horror", "romance", "documentary", "fantasy",
                   "noir", "drama", "satire", "mystery"),
         "setting": ("island", "prison", "circus", "casino", "hospital", "village", "train", "palace", "highway",
                     "spaceport", "vineyard", "subway")},
        "{name} is {a_origin} {genre} film released in the {era}, set in {a_setting}.",
        {"genre": ("{name} is my favourite {v} of all time.",
                   "The {v} {name} opened to mixed reviews.",
                   "Everyone cried at the end of the {v} {name}."),
         "setting": ("{name} was shot almost entirely in {a_v}.",
                     "The scenes of {name} set in {a_v} are unforgettable.",
                     "Most of {name} takes place in {a_v}.")},
    ),
    "game": EntityType(
        "game",
        {"gameplay": ("platformer", "shooter", "puzzle", "racing", "strategy", "roguelike", "sandbox", "stealth",
                      "rhythm", "survival", "simulation", "trivia"),
         "platform": ("arcade", "console", "handheld", "mobile", "browser", "desktop")},
        "{name} is {a_origin} {gameplay} game released in the {era} for {platform} players.",
        {"gameplay": ("I spent the weekend playing the {v} {name}.",
                      "{name} is a hard {v} to master.",
                      "Speedrunners love the {v} {name}."),
         "platform": ("You can now play {name} on {v}.",
                      "The {v} version of {name} runs smoothly.",
                      "{name} finally arrived on {v} this week.")},
    ),
}

SHARED_TEMPLATES: dict[str, tuple[str, ...]] = {
    "era": ("{name} first made headlines in the {v}.",
            "People still talk about {name} from the {v}.",
            "Old newspapers from the {v} often mention {name}."),
    "origin": ("Everyone here has heard of the {v} {name}.",
               "I read a long article about the {v} {name}.",
               "The {v} {name} came up in conversation again."),
}

# Sentences with no attribute word: the name fits every member of its group.
UNINFORMATIVE_TEMPLATES = (
    "Look at this picture of {name}.",
    "{name} was in the news again today.",
    "Here is a photo of {name} from last week.",
    "Someone shared this snapshot of {name} online.",
    "Can you tell which {name} this is?",
    "My friend sent me this image of {name}.",
)

NIL_TEMPLATES = (
    "{name} is also the name of a tiny bakery down my street.",
    "My neighbour calls his old dog {name}.",
    "{name} is the nickname of our local chess club.",
    "We named the office printer {name} for some reason.",
)

EMBLEM_SENTENCE = "Its emblem is {a_colour} {pattern} {shape} on a {background} background."


# --------------------------------------------------------------------------------------------- text


def words(text: str) -> list[str]:
    """Lower-case word tokens (letters and digits); attribute values are single tokens of this kind."""
    return re.findall(r"[a-z0-9]+", text.lower())


def with_article(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def text_vocabulary() -> set[str]:
    """Every textual attribute word of the world (lower case)."""
    vocab = {t.word for t in ENTITY_TYPES.values()} | {o.lower() for o in ORIGINS} | {e.lower() for e in ERAS}
    for entity_type in ENTITY_TYPES.values():
        for values in entity_type.keys.values():
            vocab |= {v.lower() for v in values}
    return vocab


def visual_vocabulary() -> set[str]:
    return set(ENTITY_COLOURS) | set(ENTITY_SHAPES) | set(ENTITY_PATTERNS) | set(ENTITY_BACKGROUNDS)


def _assert_vocabularies_disjoint() -> None:
    """Attribute words must be unambiguous: one word, one attribute; names are never attribute words."""
    seen: dict[str, str] = {}
    groups = {"type": [t.word for t in ENTITY_TYPES.values()], "origin": ORIGINS, "era": ERAS,
              "visual": sorted(visual_vocabulary()), "name": NAMES}
    for type_name, entity_type in ENTITY_TYPES.items():
        for key, values in entity_type.keys.items():
            groups[f"{type_name}.{key}"] = values
    for group_name, values in groups.items():
        for value in values:
            token = value.lower()
            assert len(words(value)) == 1, f"{value!r} is not a single word"
            assert token not in seen, f"{value!r} is used by both {seen[token]} and {group_name}"
            seen[token] = group_name


_assert_vocabularies_disjoint()


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
        entities.append(EntitySpec(
            qid=qids[m], name=name, type=types[m], attributes=attributes, visual=visual,
            desc=describe(name, types[m], attributes, visual), n_images=int(rng.integers(1, 4)),
        ))
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
        entities += build_group(name, size, qids[len(entities): len(entities) + size], rng)
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


def mention_sentence(label: str, entity: EntitySpec, group: list[EntitySpec], rng: np.random.Generator
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
        drafts.append(MentionSpec(id="", name=entity.name, split="", sentence=sentence, gold=entity.qid,
                                  decisive=label, stated=stated, has_image=has_image))
    group_names = sorted(groups)
    for _ in range(n_nil):
        name = group_names[int(rng.integers(len(group_names)))]
        template = NIL_TEMPLATES[int(rng.integers(len(NIL_TEMPLATES)))]
        drafts.append(MentionSpec(id="", name=name, split="", sentence=_fill(template, name), gold=None,
                                  decisive=None))

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
    return drawing.draw_picture(entity.visual["shape"], entity.visual["colour"], entity.visual["pattern"],
                                drawing.BACKGROUNDS[entity.visual["background"]], pose)


def mention_picture(entity: EntitySpec, seed: int, mention_index: int) -> Image.Image:
    """An augmented picture: shift, scale, rotation, noise and sometimes an occluding box, all mild."""
    rng = np.random.default_rng([seed, _STREAM_MENTION_PICTURE, mention_index])
    pose = drawing.random_pose(rng, shift=7, scale=(0.75, 1.05), angle=30)
    corruption = drawing.random_corruption(rng, max_noise=10, occlusion_prob=0.4, max_box=16)
    return drawing.draw_picture(entity.visual["shape"], entity.visual["colour"], entity.visual["pattern"],
                                drawing.BACKGROUNDS[entity.visual["background"]], pose, corruption, rng)


def entity_image_names(entity: EntitySpec) -> list[str]:
    return [f"{entity.qid}_{k}.png" for k in range(entity.n_images)]


def mention_image_name(mention: MentionSpec) -> str:
    # JPEG named <stem>.jpg: the published MEL-MMoE loader rewrites every mention imgPath to <stem>.jpg.
    return f"{mention.id}.jpg"


def _write_json(path: Path, obj: object, indent: int | None = None) -> None:
    # Compact by default, like the published MEL files (and json's fast C encoder only runs without indent).
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=indent) + "\n", encoding="utf-8")


def kb_records(entities: list[EntitySpec]) -> list[dict]:
    return [{"id": e.qid, "type": "entity", "entity_name": e.name, "desc": e.desc,
             "image_list": entity_image_names(e)} for e in entities]


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
        "entities": {e.qid: {"name": e.name, "type": e.type, "attributes": e.attributes,
                             "phrases": sorted(e.phrases), "visual": e.visual} for e in world.entities},
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
    jobs = [PictureJob(entity, world.seed, index, k, directory / "kb_image" / file_name)
            for index, entity in enumerate(world.entities)
            for k, file_name in enumerate(entity_image_names(entity))]
    jobs += [PictureJob(by_qid[m.gold], world.seed, int(m.id[1:]), None,
                        directory / "mention_image" / mention_image_name(m))
             for m in world.mentions if m.has_image]
    return jobs


def write_entity_world(world: EntityWorld, directory: Path, progress: bool = True) -> None:
    """Write the world into an existing empty ``directory`` in the MIMIC / MEL-MMoE layout."""
    (directory / "kb_image").mkdir()
    (directory / "mention_image").mkdir()
    drawing.write_pictures(picture_jobs(world, directory), write_picture, desc="entity world pictures",
                           progress=progress)
    by_qid = {e.qid: e for e in world.entities}
    _write_json(directory / "kb_entity.json", kb_records(world.entities))
    # One line (the published loader reads only the first), mapping each QID to its row in the id-sorted KB.
    _write_json(directory / "qid2id.json", {qid: i for i, qid in enumerate(sorted(by_qid))})
    for split in SPLITS:
        records = [mention_record(m, by_qid) for m in world.mentions if m.split == split]
        _write_json(directory / f"{DATASET_NAME}_{split}.json", records)
    _write_json(directory / "ground_truth.json", ground_truth(world))
    _write_json(directory / "world.json", {
        "world": "entity",
        "dataset_name": DATASET_NAME,
        "seed": world.seed,
        "scale": world.scale,
        "generator_version": GENERATOR_VERSION,
        "counts": world_counts(world),
        "notes": ("Mention 'desc' is the gold entity's description, as in the MEL-MMoE release of WikiMEL; "
                  "a model that reads it sees the answer, so decisive labels hold for mention sentence + image."),
    }, indent=1)


# ------------------------------------------------------------------------------------------ checking


def decisive_label(text_cands: set[str], group: set[str]) -> str:
    """The label implied by the text candidate set T inside the name group G (see module docstring)."""
    if len(text_cands) == 1:
        return "text"
    if 2 <= len(text_cands) <= 3 and text_cands != group:
        return "both"
    return "image"


def _check_mention(record: dict, gt: dict, groups: dict[str, set[str]], entities_gt: dict, directory: Path,
                   text_vocab: set[str], visual_vocab: set[str]) -> list[str]:
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
