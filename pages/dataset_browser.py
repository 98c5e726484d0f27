"""Dataset browser: the entity world (KB and mentions) and the product QA world, with their ground truth.

Layout only: reading and tables come from mmoe_core.data.readers; worlds live under
<artifacts>/data/{entity,qa} (see mmoe_core.paths.artifacts_root).
"""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from mmoe_core.data.readers import (
    DatasetError, candidates_for, entity_table, entity_type, mention_table, qa_table, read_entity_dataset,
    read_qa_dataset,
)
from mmoe_core.data.records import EntityDataset, QADataset
from mmoe_core.paths import demo_world_dir

BUILD_COMMAND = "python -m mmoe_core.demo"
THUMB = 128  # px; pictures are 64x64
CARD_THUMB = 96
GALLERY_LIMIT = 24


def _stamp(root: Path) -> float:
    """Changes when a world is regenerated, so the cache does not serve a stale copy."""
    marker = root / "world.json"
    return marker.stat().st_mtime if marker.is_file() else 0.0


@st.cache_data(show_spinner="Reading the entity world…")
def load_entities(root: str, stamp: float) -> tuple[EntityDataset, object, object]:
    ds = read_entity_dataset(root)
    return ds, entity_table(ds), mention_table(ds)


@st.cache_data(show_spinner="Reading the QA world…")
def load_qa(root: str, stamp: float) -> tuple[QADataset, object]:
    ds = read_qa_dataset(root)
    return ds, qa_table(ds)


def missing_world(world: str, root: Path) -> None:
    st.info(f"No {world} world at `{root}`. Build the demo worlds with\n\n"
            f"```\n{BUILD_COMMAND}\n```\n\n(or `make demo`), then reload this page.", icon=":material/info:")


def show_entity_card(ds: EntityDataset, qid: str, label: str = "") -> None:
    entity = ds.by_qid[qid]
    if entity.images:
        st.image([str(p) for p in entity.images], width=CARD_THUMB)
    st.markdown(f"**{entity.name}** `{entity.id}` {label}  \n*{entity_type(ds, qid) or 'entity'}*")
    st.caption(entity.desc)


def entities_tab(ds: EntityDataset, table) -> None:
    left, right = st.columns(2)
    types = left.multiselect("Type", sorted(t for t in table["type"].dropna().unique()), key="ent_types")
    names = ["All"] + sorted(table["name"].unique())
    name = right.selectbox("Name group", names, key="ent_name")
    shown = table
    if types:
        shown = shown[shown["type"].isin(types)]
    if name != "All":
        shown = shown[shown["name"] == name]
    st.caption(f"{len(shown)} of {len(table)} entities, {table['name'].nunique()} names")
    st.dataframe(shown, hide_index=True, height=260)
    if len(shown) > GALLERY_LIMIT:
        st.caption(f"Pictures of the first {GALLERY_LIMIT}; pick a name group to see one group whole.")
    columns = st.columns(4)
    for i, qid in enumerate(shown["id"].head(GALLERY_LIMIT)):
        with columns[i % 4]:
            show_entity_card(ds, qid)


def mentions_tab(ds: EntityDataset, table) -> None:
    left, right = st.columns(2)
    split = left.selectbox("Split", list(ds.splits), key="men_split")
    labels = sorted(table["decisive"].dropna().unique())
    chosen = right.multiselect("Decisive modality", labels, key="men_labels",
                               help="Which modality identifies the entity (demo ground truth).")
    shown = table[table["split"] == split]
    if chosen:
        shown = shown[shown["decisive"].isin(chosen)]
    nil = ds.nil_skipped.get(split, 0)
    st.caption(f"{len(shown)} mentions shown; {nil} nil mention(s) in this split are skipped, "
               "as the published loader does")
    st.dataframe(shown, hide_index=True, height=260)
    if shown.empty:
        return
    mention_id = st.selectbox("Mention", list(shown["id"]), key="men_id")
    mention = next(m for m in ds.splits[split] if m.id == mention_id)
    picture, text = st.columns([1, 3])
    with picture:
        if mention.image is not None:
            st.image(str(mention.image), width=THUMB * 2)
        else:
            st.caption("no image")
    with text:
        st.markdown(f"> {mention.sentence}")
        gold_type = entity_type(ds, mention.answer_qid) or "entity"
        st.markdown(f"decisive: **{mention.decisive or 'unknown'}** · gold: **{mention.entity_name}** ({gold_type}) "
                    f"`{mention.answer_qid}`, KB row {mention.answer_index}")
        stated = mention.meta.get("stated_attributes")
        if stated:
            st.caption("attributes stated by the sentence: " + ", ".join(f"{k}={v}" for k, v in stated.items()))
    st.markdown("**Candidates sharing the name**")
    text_cands = set(mention.meta.get("text_candidates", []))
    image_cands = set(mention.meta.get("image_candidates", []))
    columns = st.columns(4)
    for i, entity in enumerate(candidates_for(ds, mention)):
        marks = ["gold" if entity.id == mention.answer_qid else "",
                 "fits text" if entity.id in text_cands else "", "fits image" if entity.id in image_cands else ""]
        with columns[i % 4]:
            show_entity_card(ds, entity.id, " · ".join(m for m in marks if m))


def qa_tab(ds: QADataset, table) -> None:
    left, middle, right = st.columns(3)
    split = left.selectbox("Split", list(ds.splits), key="qa_split")
    types = middle.multiselect("Question type", sorted(table["question_type"].dropna().unique()), key="qa_types")
    sources = right.multiselect("Answer source", sorted(table["answer_source"].dropna().unique()), key="qa_sources")
    shown = table[table["split"] == split]
    if types:
        shown = shown[shown["question_type"].isin(types)]
    if sources:
        shown = shown[shown["answer_source"].isin(sources)]
    st.caption(f"{len(shown)} questions shown")
    st.dataframe(shown, hide_index=True, height=260)
    if shown.empty:
        return
    item_id = st.selectbox("Question", list(shown["id"]), key="qa_id")
    item = next(q for q in ds.splits[split] if q.id == item_id)
    picture, text = st.columns([1, 3])
    with picture:
        if item.image is not None:
            st.image(str(item.image), width=THUMB * 2)
    with text:
        st.markdown(f"**Q:** {item.question}  \n**A:** {item.answer}")
        st.markdown(f"type: `{item.question_type}` · source: **{item.answer_source}** · category: {item.category}")
        if item.context_conflict:
            st.warning("The context states a different value: only the image is right.", icon=":material/warning:")
        st.caption(item.context)


st.title("Dataset browser")
entity_root, qa_root = demo_world_dir("entity"), demo_world_dir("qa")
tab_entities, tab_mentions, tab_qa = st.tabs(["Entities", "Mentions", "QA items"])

entity_data = None
if entity_root.is_dir():
    try:
        entity_data = load_entities(str(entity_root), _stamp(entity_root))
    except DatasetError as error:
        st.error(f"Cannot read the entity world: {error}")
with tab_entities:
    if entity_data is None:
        missing_world("entity", entity_root)
    else:
        entities_tab(entity_data[0], entity_data[1])
with tab_mentions:
    if entity_data is None:
        missing_world("entity", entity_root)
    else:
        mentions_tab(entity_data[0], entity_data[2])

with tab_qa:
    if not qa_root.is_dir():
        missing_world("qa", qa_root)
    else:
        try:
            qa_data = load_qa(str(qa_root), _stamp(qa_root))
        except DatasetError as error:
            st.error(f"Cannot read the QA world: {error}")
        else:
            qa_tab(*qa_data)
