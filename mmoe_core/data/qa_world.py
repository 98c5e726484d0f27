"""The product QA world: multi-source questions whose answer lives in the image, the context, or both.

World design
------------
* **Products** belong to a category (bag, shoe, mug, ...). Each has five *visual* attributes, drawn
  in its 64x64 picture (body colour, trim colour, pattern, shape, finish), and *textual* attributes
  that only the context states (material, brand, size, country of origin, ...); which textual types a
  product has depends on its category (a lamp has a power source, a jacket a closure).
* **Context** = a title (brand, category, model code) plus one sentence per textual attribute, plus,
  for each visual attribute, one of three things chosen at random:
    - ``state``: a sentence with the true value  -> questions about it have ``answer_source: both``;
    - ``omit``: nothing                           -> ``answer_source: image``;
    - ``contradict``: a sentence with a wrong value -> ``answer_source: image``, ``context_conflict: true``.
  A sentence about a visual attribute always contains its cue word ("colour", "trim", "pattern",
  "shape", "finish"), and no other sentence does, so a reader can tell stated from omitted.
* **Questions**: every visual type once per product, plus a few textual types (least used first, so
  every type is well represented); a few phrasing templates per type; answers are one or two words
  from a closed vocabulary per type. Textual questions have ``answer_source: context``.
* **Splits are by product** (70/10/20 of products): no product's picture or context is seen in two
  splits, so test questions are about unseen products.

:func:`check_qa_world` re-derives answers, sources and conflicts from the written files.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import drawing

GENERATOR_VERSION = "qa-world/1"
SPLITS = ("train", "dev", "test")
SPLIT_SHARES = (0.7, 0.1, 0.2)
SOURCES = ("image", "context", "both")
# How a context treats each visual attribute (state: source both; omit / contradict: source image).
CONTEXT_MODE_WEIGHTS = {"state": 0.38, "omit": 0.31, "contradict": 0.31}
_STREAM_PRODUCT_PICTURE = 3


@dataclass(frozen=True)
class QAScale:
    products: int
    textual_questions_per_product: int


SCALES: dict[str, QAScale] = {
    "tiny": QAScale(products=64, textual_questions_per_product=5),
    "default": QAScale(products=600, textual_questions_per_product=5),
}


@dataclass(frozen=True)
class QuestionType:
    """A question type: where its answer lives, its closed answer vocabulary and its phrasings.

    ``questions`` use ``{cat}``; ``statements`` (context sentences) use ``{cat}`` and ``{v}``.
    For visual types every statement contains ``cue``.
    """

    id: str
    modality: str  # "visual" or "textual"
    vocabulary: tuple[str, ...]
    questions: tuple[str, ...]
    statements: tuple[str, ...]
    cue: str | None = None


COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
SHAPE_DRAWN_AS = {
    "round": "circle",
    "square": "square",
    "triangular": "triangle",
    "hexagonal": "hexagon",
    "diamond": "diamond",
}

_VISUAL = [
    QuestionType(
        "colour",
        "visual",
        COLOURS,
        ("What colour is the {cat}?", "Which colour does this {cat} have?", "What is the main colour of this {cat}?"),
        ("The {cat} comes in {v} colour.", "Its main colour is {v}."),
        cue="colour",
    ),
    QuestionType(
        "trim_colour",
        "visual",
        COLOURS,
        ("What colour is the edging of the {cat}?", "Which colour is the border on this {cat}?"),
        ("It has {v} trim.", "The trim is {v}."),
        cue="trim",
    ),
    QuestionType(
        "pattern",
        "visual",
        drawing.PATTERNS,
        ("What pattern does the {cat} have?", "Which pattern is printed on this {cat}?"),
        ("It has a {v} pattern.", "The pattern is {v}."),
        cue="pattern",
    ),
    QuestionType(
        "shape",
        "visual",
        tuple(SHAPE_DRAWN_AS),
        ("What shape is the {cat}?", "Which outline does this {cat} have?"),
        ("It has a {v} shape.", "The {cat} is {v} in shape."),
        cue="shape",
    ),
    QuestionType(
        "finish",
        "visual",
        drawing.FINISHES,
        ("What finish does the {cat} have?", "Is this {cat} matte, glossy or metallic?"),
        ("It has a {v} finish.", "The finish is {v}."),
        cue="finish",
    ),
]

_TEXTUAL = [
    QuestionType(
        "material",
        "textual",
        ("leather", "cotton", "wool", "steel", "plastic", "wood", "glass", "ceramic", "bamboo", "linen"),
        ("What is the {cat} made of?", "Which material is this {cat} made from?"),
        ("It is made of {v}.", "Material: {v}."),
    ),
    QuestionType(
        "brand",
        "textual",
        ("Norvik", "Altura", "Lumo", "Tessa", "Vantor", "Oakline", "Brisa", "Zephra", "Marlo", "Quill"),
        ("Which brand makes this {cat}?", "What brand is the {cat}?"),
        ("Made by {v}.", "Brand: {v}."),
    ),
    QuestionType(
        "size",
        "textual",
        ("small", "medium", "large", "extra large"),
        ("What size is the {cat}?", "Which size is this {cat}?"),
        ("Size: {v}.", "It comes in size {v}."),
    ),
    QuestionType(
        "country_of_origin",
        "textual",
        ("Italy", "Japan", "Germany", "Portugal", "Mexico", "Vietnam", "Canada", "Sweden"),
        ("Where is the {cat} made?", "Which country does this {cat} come from?"),
        ("Made in {v}.", "Country of origin: {v}."),
    ),
    QuestionType(
        "price_band",
        "textual",
        ("budget", "mid-range", "premium", "luxury"),
        ("What price band is the {cat} in?", "How expensive is this {cat}?"),
        ("Price band: {v}.", "It sits in the {v} price band."),
    ),
    QuestionType(
        "warranty",
        "textual",
        ("6 months", "1 year", "2 years", "5 years", "lifetime"),
        ("How long is the warranty on this {cat}?", "What warranty does the {cat} come with?"),
        ("Warranty: {v}.", "The warranty period is {v}."),
    ),
    QuestionType(
        "weight_class",
        "textual",
        ("ultralight", "light", "standard", "heavy"),
        ("What weight class is the {cat}?", "How heavy is this {cat}?"),
        ("Weight class: {v}.", "It is rated {v} in weight."),
    ),
    QuestionType(
        "season",
        "textual",
        ("spring", "summer", "autumn", "winter", "all-season"),
        ("Which season is the {cat} made for?", "What season is this {cat} for?"),
        ("Season: {v}.", "Recommended season: {v}."),
    ),
    QuestionType(
        "gender",
        "textual",
        ("women", "men", "unisex"),
        ("Who is the {cat} designed for?", "Is this {cat} for men, women or both?"),
        ("Gender: {v}.", "Target gender: {v}."),
    ),
    QuestionType(
        "style",
        "textual",
        ("modern", "vintage", "classic", "minimalist", "rustic", "sporty"),
        ("What style is the {cat}?", "How would you describe the style of this {cat}?"),
        ("Style: {v}.", "Its style is {v}."),
    ),
    QuestionType(
        "closure",
        "textual",
        ("zipper", "buttons", "laces", "velcro", "magnetic", "buckle"),
        ("How does the {cat} close?", "What closure does this {cat} use?"),
        ("Closure: {v}.", "Fastening: {v}."),
    ),
    QuestionType(
        "capacity",
        "textual",
        ("300 ml", "500 ml", "1 litre", "10 litres", "30 litres"),
        ("What is the capacity of the {cat}?", "How much does this {cat} hold?"),
        ("Capacity: {v}.", "It holds {v}."),
    ),
    QuestionType(
        "power_source",
        "textual",
        ("battery", "mains", "solar", "USB", "hand crank"),
        ("What powers the {cat}?", "Which power source does this {cat} use?"),
        ("Power source: {v}.", "It runs on {v}."),
    ),
    QuestionType(
        "care",
        "textual",
        ("hand wash", "machine wash", "wipe clean", "dry clean"),
        ("How should the {cat} be cleaned?", "What are the care instructions for this {cat}?"),
        ("Care: {v}.", "Care instructions: {v}."),
    ),
    QuestionType(
        "certification",
        "textual",
        ("CE", "FSC", "Fairtrade", "OEKO-TEX", "organic"),
        ("Which certification does the {cat} have?", "What certificate does this {cat} carry?"),
        ("Certification: {v}.", "It carries the {v} label."),
    ),
    QuestionType(
        "water_resistance",
        "textual",
        ("waterproof", "splash-proof", "not resistant"),
        ("How water resistant is the {cat}?", "What water rating does this {cat} have?"),
        ("Water resistance: {v}.", "Water rating: {v}."),
    ),
    QuestionType(
        "age_group",
        "textual",
        ("adult", "teen", "child", "toddler"),
        ("Which age group is the {cat} for?", "Who is the target age group of this {cat}?"),
        ("Age group: {v}.", "Suitable for the {v} age group."),
    ),
]

QUESTION_TYPES: dict[str, QuestionType] = {t.id: t for t in _VISUAL + _TEXTUAL}
VISUAL_TYPES = tuple(t.id for t in _VISUAL)

COMMON_TEXTUAL = ("material", "brand", "size", "country_of_origin", "price_band", "warranty", "style")
CATEGORIES: dict[str, tuple[str, ...]] = {
    "bag": ("closure", "capacity", "care", "water_resistance", "gender"),
    "shoe": ("closure", "gender", "season", "care", "water_resistance", "age_group"),
    "mug": ("capacity", "care", "certification", "weight_class"),
    "lamp": ("power_source", "certification", "weight_class"),
    "chair": ("weight_class", "certification", "care", "age_group"),
    "hat": ("season", "gender", "care", "age_group"),
    "bottle": ("capacity", "certification", "weight_class", "water_resistance"),
    "watch": ("power_source", "water_resistance", "gender"),
    "jacket": ("closure", "season", "gender", "care", "water_resistance", "age_group"),
    "speaker": ("power_source", "water_resistance", "weight_class", "certification"),
    "tent": ("capacity", "season", "weight_class", "water_resistance"),
    "toy": ("age_group", "power_source", "certification"),
}


def textual_types_of(category: str) -> tuple[str, ...]:
    return COMMON_TEXTUAL + CATEGORIES[category]


def _assert_cues_are_exclusive() -> None:
    """Only a sentence about a visual attribute may contain that attribute's cue word."""
    cues = {t.cue for t in _VISUAL}
    for t in QUESTION_TYPES.values():
        for statement in t.statements:
            found = cues & set(words(statement))
            assert found == ({t.cue} if t.cue else set()), f"{t.id}: statement {statement!r} has cues {found}"
    for category in CATEGORIES:
        assert not cues & set(words(category)), category


# ------------------------------------------------------------------------------------------ planning


@dataclass(frozen=True)
class ProductSpec:
    id: str
    category: str
    split: str
    attributes: dict[str, str]  # question type -> true value
    facts: dict[str, str | None]  # visual type -> value the context states (None: omitted)
    title: str
    context: str


@dataclass(frozen=True)
class QuestionSpec:
    id: str
    product_id: str
    question_type: str
    question: str
    answer: str
    answer_source: str
    context_conflict: bool


@dataclass(frozen=True)
class QAWorld:
    seed: int
    scale: str
    products: list[ProductSpec]
    questions: list[QuestionSpec]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _pick(values: tuple[str, ...] | list[str], rng: np.random.Generator) -> str:
    return values[int(rng.integers(len(values)))]


def draw_attributes(category: str, rng: np.random.Generator) -> dict[str, str]:
    attributes = {t: _pick(QUESTION_TYPES[t].vocabulary, rng) for t in VISUAL_TYPES}
    # The trim must differ from the body, or it would be invisible.
    attributes["trim_colour"] = _pick([c for c in COLOURS if c != attributes["colour"]], rng)
    attributes.update({t: _pick(QUESTION_TYPES[t].vocabulary, rng) for t in textual_types_of(category)})
    return attributes


def context_facts(attributes: dict[str, str], rng: np.random.Generator) -> dict[str, str | None]:
    """For each visual type: the true value (state), None (omit) or another value (contradict)."""
    modes, weights = list(CONTEXT_MODE_WEIGHTS), list(CONTEXT_MODE_WEIGHTS.values())
    facts: dict[str, str | None] = {}
    for t in VISUAL_TYPES:
        mode = modes[int(rng.choice(len(modes), p=weights))]
        true = attributes[t]
        if mode == "state":
            facts[t] = true
        elif mode == "omit":
            facts[t] = None
        else:
            facts[t] = _pick([v for v in QUESTION_TYPES[t].vocabulary if v != true], rng)
    return facts


def compose_context(
    category: str, attributes: dict[str, str], facts: dict[str, str | None], rng: np.random.Generator
) -> tuple[str, str]:
    """(title, context): the title then the attribute sentences in random order."""
    code = f"{attributes['brand'][:2].upper()}-{int(rng.integers(100, 1000))}"
    title = f"{attributes['brand']} {category} {code}"
    stated = {t: attributes[t] for t in textual_types_of(category)}
    stated.update({t: v for t, v in facts.items() if v is not None})
    sentences = []
    for t, value in stated.items():
        template = _pick(QUESTION_TYPES[t].statements, rng)
        sentence = template.format(cat=category, v=value)
        sentences.append(sentence[0].upper() + sentence[1:])
    order = rng.permutation(len(sentences))
    return title, " ".join([f"{title}."] + [sentences[i] for i in order])


def split_of(position: int, total: int) -> str:
    train_end = round(total * SPLIT_SHARES[0])
    dev_end = train_end + round(total * SPLIT_SHARES[1])
    return "train" if position < train_end else "dev" if position < dev_end else "test"


def build_products(scale: QAScale, rng: np.random.Generator) -> list[ProductSpec]:
    categories = sorted(CATEGORIES)
    split_position = rng.permutation(scale.products)
    products = []
    for i in range(scale.products):
        category = categories[i % len(categories)]  # round robin: every category, and so every type, appears
        attributes = draw_attributes(category, rng)
        facts = context_facts(attributes, rng)
        title, context = compose_context(category, attributes, facts, rng)
        products.append(
            ProductSpec(
                id=f"P{i:04d}",
                category=category,
                split=split_of(int(split_position[i]), scale.products),
                attributes=attributes,
                facts=facts,
                title=title,
                context=context,
            )
        )
    return products


def source_of(question_type: str, product: ProductSpec) -> tuple[str, bool]:
    """(answer_source, context_conflict) for a question of ``question_type`` about ``product``."""
    if question_type not in VISUAL_TYPES:
        return "context", False
    stated = product.facts[question_type]
    if stated is None:
        return "image", False
    if stated == product.attributes[question_type]:
        return "both", False
    return "image", True


def build_questions(products: list[ProductSpec], scale: QAScale, rng: np.random.Generator) -> list[QuestionSpec]:
    usage: Counter[str] = Counter()
    questions = []
    for product in products:
        textual = list(textual_types_of(product.category))
        # Least-used types first (random tie break), so rare category-specific types get asked too.
        textual.sort(key=lambda t: (usage[t], float(rng.random())))
        chosen = list(VISUAL_TYPES) + textual[: scale.textual_questions_per_product]
        usage.update(chosen)
        for j, question_type in enumerate(chosen):
            template = _pick(QUESTION_TYPES[question_type].questions, rng)
            source, conflict = source_of(question_type, product)
            questions.append(
                QuestionSpec(
                    id=f"{product.id}-q{j:02d}",
                    product_id=product.id,
                    question_type=question_type,
                    question=template.format(cat=product.category),
                    answer=product.attributes[question_type],
                    answer_source=source,
                    context_conflict=conflict,
                )
            )
    return questions


def build_qa_world(seed: int = 0, scale: str = "default") -> QAWorld:
    """Plan the whole world in memory (no pictures yet); a pure function of (seed, scale)."""
    rng = np.random.default_rng(seed)
    products = build_products(SCALES[scale], rng)
    questions = build_questions(products, SCALES[scale], rng)
    return QAWorld(seed=seed, scale=scale, products=products, questions=questions)


# ------------------------------------------------------------------------------------------- writing


def product_picture(product: ProductSpec, seed: int, index: int) -> Image.Image:
    rng = np.random.default_rng([seed, _STREAM_PRODUCT_PICTURE, index])
    a = product.attributes
    pose = drawing.random_pose(rng, shift=3, scale=(0.88, 1.0), angle=8)
    return drawing.draw_picture(
        SHAPE_DRAWN_AS[a["shape"]],
        a["colour"],
        a["pattern"],
        drawing.PRODUCT_BACKGROUND,
        pose,
        finish=a["finish"],
        trim=a["trim_colour"],
    )


def image_path(product: ProductSpec) -> str:
    return f"images/{product.id}.png"


def question_record(q: QuestionSpec, product: ProductSpec) -> dict:
    return {
        "id": q.id,
        "product_id": q.product_id,
        "question": q.question,
        "answer": q.answer,
        "question_type": q.question_type,
        "answer_source": q.answer_source,
        "context": product.context,
        "image": image_path(product),
        "category": product.category,
        "context_conflict": q.context_conflict,
    }


def product_record(p: ProductSpec) -> dict:
    return {
        "id": p.id,
        "category": p.category,
        "split": p.split,
        "title": p.title,
        "context": p.context,
        "image": image_path(p),
        "attributes": p.attributes,
        "context_facts": p.facts,
    }


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def world_counts(world: QAWorld) -> dict:
    split_of_product = {p.id: p.split for p in world.products}
    return {
        "products": len(world.products),
        "products_per_split": dict(Counter(p.split for p in world.products)),
        "questions": len(world.questions),
        "questions_per_split": dict(Counter(split_of_product[q.product_id] for q in world.questions)),
        "question_types": len({q.question_type for q in world.questions}),
        "questions_per_source": {s: sum(q.answer_source == s for q in world.questions) for s in SOURCES},
        "context_conflicts": sum(q.context_conflict for q in world.questions),
        "questions_per_type": dict(sorted(Counter(q.question_type for q in world.questions).items())),
    }


def write_picture(job: tuple[ProductSpec, int, int, Path]) -> None:
    product, seed, index, path = job
    drawing.save_png(product_picture(product, seed, index), path)


def write_qa_world(world: QAWorld, directory: Path, progress: bool = True) -> None:
    """Write the world into an existing empty ``directory``."""
    (directory / "images").mkdir()
    jobs = [(p, world.seed, index, directory / image_path(p)) for index, p in enumerate(world.products)]
    drawing.write_pictures(jobs, write_picture, desc="qa world pictures", progress=progress)
    by_id = {p.id: p for p in world.products}
    for split in SPLITS:
        rows = [question_record(q, by_id[q.product_id]) for q in world.questions if by_id[q.product_id].split == split]
        _write_jsonl(directory / f"qa_{split}.jsonl", rows)
    _write_jsonl(directory / "products.jsonl", [product_record(p) for p in world.products])
    (directory / "world.json").write_text(
        json.dumps(
            {
                "world": "qa",
                "seed": world.seed,
                "scale": world.scale,
                "generator_version": GENERATOR_VERSION,
                "split_by": "product",
                "counts": world_counts(world),
                "question_types": {
                    t.id: {"modality": t.modality, "vocabulary": list(t.vocabulary), "cue": t.cue}
                    for t in QUESTION_TYPES.values()
                },
            },
            ensure_ascii=False,
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )


# ------------------------------------------------------------------------------------------ checking


def contains_phrase(text: str, phrase: str) -> bool:
    """Whole-word, case-insensitive phrase match."""
    return re.search(r"(?<![A-Za-z0-9])" + re.escape(phrase.lower()) + r"(?![A-Za-z0-9])", text.lower()) is not None


def _check_question(row: dict, product: dict, types: dict, directory: Path) -> list[str]:
    where = f"question {row['id']}"
    qtype = types.get(row["question_type"])
    if qtype is None:
        return [f"{where}: unknown question type {row['question_type']!r}"]
    problems = []
    answer = row["answer"]
    if answer not in qtype["vocabulary"]:
        problems.append(f"{where}: answer {answer!r} not in the {row['question_type']} vocabulary")
    if answer != product["attributes"].get(row["question_type"]):
        problems.append(f"{where}: answer differs from the product's attribute")
    if row["context"] != product["context"] or row["image"] != product["image"]:
        problems.append(f"{where}: context or image differs from its product's")
    if qtype["modality"] == "textual":
        expected = ("context", False)
        if not contains_phrase(row["context"], answer):
            problems.append(f"{where}: textual answer {answer!r} not in the context")
    else:
        stated = product["context_facts"][row["question_type"]]
        cue_present = qtype["cue"] in words(row["context"])
        if cue_present != (stated is not None):
            problems.append(f"{where}: cue {qtype['cue']!r} present={cue_present} but stated={stated!r}")
        if stated is not None and not contains_phrase(row["context"], stated):
            problems.append(f"{where}: stated value {stated!r} not in the context")
        expected = ("image", False) if stated is None else ("both", False) if stated == answer else ("image", True)
    if (row["answer_source"], row["context_conflict"]) != expected:
        problems.append(
            f"{where}: source/conflict {(row['answer_source'], row['context_conflict'])} but expected {expected}"
        )
    return problems


def check_qa_world(directory: str | Path) -> list[str]:
    """Re-derive every guarantee of the QA world from its files; returns violations (empty when sound)."""
    directory = Path(directory)
    world = json.loads((directory / "world.json").read_text(encoding="utf-8"))
    types = world["question_types"]
    products = {}
    for line in (directory / "products.jsonl").read_text(encoding="utf-8").splitlines():
        p = json.loads(line)
        products[p["id"]] = p
    problems = []
    for p in products.values():
        path = directory / p["image"]
        if not path.is_file():
            problems.append(f"product {p['id']}: image missing")
        elif Image.open(path).size != (drawing.IMAGE_SIZE, drawing.IMAGE_SIZE):
            problems.append(f"product {p['id']}: image has the wrong size")

    seen_in_split: dict[str, str] = {}
    used_types, sources, conflicts, total = set(), Counter(), 0, 0
    for split in SPLITS:
        for line in (directory / f"qa_{split}.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            total += 1
            product = products.get(row["product_id"])
            if product is None:
                problems.append(f"question {row['id']}: unknown product")
                continue
            if seen_in_split.setdefault(row["product_id"], split) != split:
                problems.append(f"product {row['product_id']} appears in two splits")
            problems += _check_question(row, product, types, directory)
            used_types.add(row["question_type"])
            sources[row["answer_source"]] += 1
            conflicts += row["context_conflict"]

    if len(used_types) < 20:
        problems.append(f"only {len(used_types)} question types are asked (need >= 20)")
    for source in SOURCES:
        if sources[source] < 0.1 * total:
            problems.append(f"answer source {source!r} has only {sources[source]} of {total} questions")
    if conflicts == 0:
        problems.append("no question has a conflicting context")
    split_counts = Counter(seen_in_split.values())
    for split, share in zip(SPLITS, SPLIT_SHARES):
        if abs(split_counts[split] / max(1, len(products)) - share) > 0.03:
            problems.append(f"split {split} holds {split_counts[split]} of {len(products)} products")
    return problems


_assert_cues_are_exclusive()
