"""The entity world's vocabulary: names, entity types with their attribute words, sentence templates.

Kept apart from the world's planning and writing (mmoe_core.data.entity_world) because it is data:
every attribute word is one token and belongs to exactly one attribute (checked at import).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
    "Jaguar",
    "Mercury",
    "Phoenix",
    "Apollo",
    "Orion",
    "Titan",
    "Atlas",
    "Nova",
    "Falcon",
    "Puma",
    "Cobra",
    "Viper",
    "Eclipse",
    "Aurora",
    "Zenith",
    "Vega",
    "Polaris",
    "Triton",
    "Pegasus",
    "Hercules",
    "Athena",
    "Genesis",
    "Odyssey",
    "Spirit",
    "Endeavour",
    "Voyager",
    "Pioneer",
    "Discovery",
    "Liberty",
    "Victory",
    "Empire",
    "Monarch",
    "Sparrow",
    "Raven",
    "Condor",
    "Panther",
    "Lynx",
    "Bison",
    "Mustang",
    "Stingray",
    "Marlin",
    "Kestrel",
    "Heron",
    "Cascade",
    "Sierra",
    "Avalon",
    "Olympus",
    "Everest",
    "Neptune",
    "Saturn",
    "Juno",
    "Helios",
    "Prometheus",
    "Trinity",
    "Meridian",
    "Horizon",
    "Tempest",
    "Blizzard",
    "Tornado",
    "Typhoon",
    "Cyclone",
    "Avalanche",
    "Comet",
    "Andromeda",
)

ORIGINS = (
    "British",
    "French",
    "German",
    "Italian",
    "Spanish",
    "Japanese",
    "American",
    "Brazilian",
    "Swedish",
    "Mexican",
    "Canadian",
    "Korean",
)
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
        {
            "genre": (
                "rock",
                "jazz",
                "punk",
                "metal",
                "reggae",
                "techno",
                "folk",
                "blues",
                "soul",
                "disco",
                "grunge",
                "ska",
            ),
            "instrument": (
                "guitar",
                "piano",
                "violin",
                "saxophone",
                "drums",
                "trumpet",
                "synthesizer",
                "cello",
                "harp",
                "flute",
                "banjo",
                "accordion",
            ),
        },
        "{name} is {a_origin} {genre} band formed in the {era}, known for its {instrument} sound.",
        {
            "genre": (
                "{name} played {a_v} set to a packed hall.",
                "Critics called the new {v} record by {name} their best so far.",
                "I grew up listening to {v} songs by {name}.",
            ),
            "instrument": (
                "The {v} solo on the new {name} single is stunning.",
                "{name} brought {a_v} on stage for the encore.",
                "Nobody plays the {v} like the members of {name}.",
            ),
        },
    ),
    "animal": EntityType(
        "animal",
        {
            "habitat": (
                "rainforest",
                "savanna",
                "desert",
                "tundra",
                "wetland",
                "reef",
                "highlands",
                "grassland",
                "mangrove",
                "steppe",
                "taiga",
                "marsh",
            ),
            "prey": (
                "fish",
                "insects",
                "rodents",
                "fruit",
                "leaves",
                "seeds",
                "deer",
                "birds",
                "crabs",
                "worms",
                "snails",
                "berries",
            ),
        },
        "{name} is an animal of the {origin} {habitat}, first described in the {era}, that feeds on {prey}.",
        {
            "habitat": (
                "A {name} was spotted moving through the {v} at dawn.",
                "Rangers tracked a {name} across the {v}.",
                "The {v} is home to the {name}.",
            ),
            "prey": (
                "A {name} was seen feeding on {v} near the water.",
                "Biologists say the {name} eats mostly {v}.",
                "Every evening the {name} goes looking for {v}.",
            ),
        },
    ),
    "ship": EntityType(
        "ship",
        {
            "vessel": (
                "frigate",
                "destroyer",
                "schooner",
                "cruiser",
                "submarine",
                "galleon",
                "tanker",
                "trawler",
                "ferry",
                "clipper",
                "corvette",
                "icebreaker",
            ),
            "sea": (
                "Atlantic",
                "Pacific",
                "Baltic",
                "Arctic",
                "Mediterranean",
                "Caribbean",
                "Adriatic",
                "Aegean",
                "Caspian",
                "Barents",
                "Tasman",
                "Antarctic",
            ),
        },
        "{name} is {a_origin} {vessel} ship launched in the {era} that sailed the {sea}.",
        {
            "vessel": (
                "The {v} {name} left port before the storm.",
                "Sailors remember serving on the {v} {name}.",
                "The old {v} {name} is now a museum.",
            ),
            "sea": (
                "The {name} crossed the {v} in nine days.",
                "Fishermen saw the {name} heading across the {v}.",
                "The {name} spent years patrolling the {v}.",
            ),
        },
    ),
    "city": EntityType(
        "city",
        {
            "river": (
                "Danube",
                "Nile",
                "Rhine",
                "Volga",
                "Thames",
                "Tagus",
                "Loire",
                "Elbe",
                "Seine",
                "Vistula",
                "Douro",
                "Ebro",
            ),
            "landmark": (
                "cathedral",
                "harbour",
                "castle",
                "bridge",
                "university",
                "stadium",
                "market",
                "lighthouse",
                "tower",
                "fortress",
                "aqueduct",
                "monastery",
            ),
        },
        "{name} is {a_origin} city on the {river}, founded in the {era} and famous for its {landmark}.",
        {
            "river": (
                "Tourists walk along the {v} in {name} every summer.",
                "The {v} floods parts of {name} most winters.",
                "She grew up in {name} on the banks of the {v}.",
            ),
            "landmark": (
                "The old {v} of {name} draws crowds every weekend.",
                "Visitors to {name} should not miss its {v}.",
                "The {v} in {name} was restored last year.",
            ),
        },
    ),
    "brand": EntityType(
        "brand",
        {
            "industry": (
                "car",
                "watch",
                "shoe",
                "perfume",
                "beer",
                "coffee",
                "phone",
                "bicycle",
                "chocolate",
                "furniture",
                "tyre",
                "camera",
            ),
            "hq": (
                "Milan",
                "Lyon",
                "Munich",
                "Osaka",
                "Seattle",
                "Porto",
                "Leeds",
                "Gothenburg",
                "Monterrey",
                "Toronto",
                "Valencia",
                "Kyoto",
            ),
        },
        "{name} is {a_origin} {industry} brand founded in the {era} and based in {hq}.",
        {
            "industry": (
                "{name} unveiled a new {v} line at the trade fair.",
                "My first {v} was made by {name}.",
                "Sales of {name} {v} models rose this year.",
            ),
            "hq": (
                "{name} opened a new office near its headquarters in {v}.",
                "Executives at {name} met in {v} this week.",
                "The {name} headquarters in {v} is expanding.",
            ),
        },
    ),
    "film": EntityType(
        "film",
        {
            "genre": (
                "thriller",
                "western",
                "comedy",
                "musical",
                "horror",
                "romance",
                "documentary",
                "fantasy",
                "noir",
                "drama",
                "satire",
                "mystery",
            ),
            "setting": (
                "island",
                "prison",
                "circus",
                "casino",
                "hospital",
                "village",
                "train",
                "palace",
                "highway",
                "spaceport",
                "vineyard",
                "subway",
            ),
        },
        "{name} is {a_origin} {genre} film released in the {era}, set in {a_setting}.",
        {
            "genre": (
                "{name} is my favourite {v} of all time.",
                "The {v} {name} opened to mixed reviews.",
                "Everyone cried at the end of the {v} {name}.",
            ),
            "setting": (
                "{name} was shot almost entirely in {a_v}.",
                "The scenes of {name} set in {a_v} are unforgettable.",
                "Most of {name} takes place in {a_v}.",
            ),
        },
    ),
    "game": EntityType(
        "game",
        {
            "gameplay": (
                "platformer",
                "shooter",
                "puzzle",
                "racing",
                "strategy",
                "roguelike",
                "sandbox",
                "stealth",
                "rhythm",
                "survival",
                "simulation",
                "trivia",
            ),
            "platform": ("arcade", "console", "handheld", "mobile", "browser", "desktop"),
        },
        "{name} is {a_origin} {gameplay} game released in the {era} for {platform} players.",
        {
            "gameplay": (
                "I spent the weekend playing the {v} {name}.",
                "{name} is a hard {v} to master.",
                "Speedrunners love the {v} {name}.",
            ),
            "platform": (
                "You can now play {name} on {v}.",
                "The {v} version of {name} runs smoothly.",
                "{name} finally arrived on {v} this week.",
            ),
        },
    ),
}

SHARED_TEMPLATES: dict[str, tuple[str, ...]] = {
    "era": (
        "{name} first made headlines in the {v}.",
        "People still talk about {name} from the {v}.",
        "Old newspapers from the {v} often mention {name}.",
    ),
    "origin": (
        "Everyone here has heard of the {v} {name}.",
        "I read a long article about the {v} {name}.",
        "The {v} {name} came up in conversation again.",
    ),
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
    groups = {
        "type": [t.word for t in ENTITY_TYPES.values()],
        "origin": ORIGINS,
        "era": ERAS,
        "visual": sorted(visual_vocabulary()),
        "name": NAMES,
    }
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
