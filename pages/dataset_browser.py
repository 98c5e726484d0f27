"""Dataset browser: the data worlds under ``<artifacts>/data``, with their ground truth.

The page builds itself from the worlds' declared views (:mod:`mmoe_core.data.views`: each table, its
filters, split, picture, detail columns and related rows), read through the same readers a user points
at real data. It shows data only, never a model.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from mmoe_core.data.readers import DatasetError
from mmoe_core.data.views import DatasetView, TableView, views, world_stamp
from mmoe_core.paths import demo_world_dir
from pages.state import escape_markdown as esc
from pages.state import literal

BUILD_COMMAND = "python -m demo_build"
THUMB = 128  # px; pictures are 64x64
CARD_THUMB = 96
GALLERY_LIMIT = 24
TAB_KEY = "table"  # the open tab, kept in the URL (?table=...): only its table is read and drawn


@st.cache_data(show_spinner="Reading the world…", max_entries=16)
def read_table(world: str, table: str, root: str, stamp: float) -> pd.DataFrame:
    view = next(t for v in views() if v.world == world for t in v.tables if t.name == table)
    return view.read(Path(root))


def missing_world(view: DatasetView, root: Path) -> None:
    st.info(
        f"No {view.title.lower()} at `{root}`. Build the demo worlds with\n\n```\n{BUILD_COMMAND}\n```\n\n"
        "(or `make demo`), then reload this page.",
        icon=":material/info:",
    )


def _filtered(view: TableView, table: pd.DataFrame, key: str) -> pd.DataFrame:
    shown = table
    if view.split and view.split in table:
        splits = list(dict.fromkeys(table[view.split].astype(str)))
        split = st.selectbox("Split", splits, key=f"{key}_split", index=splits.index("test") if "test" in splits else 0)
        shown = shown[shown[view.split].astype(str) == split]
    filters = [c for c in view.filters if c in table]
    for column, slot in zip(filters, st.columns(len(filters)) if filters else []):
        values = sorted(table[column].dropna().astype(str).unique())
        chosen = slot.multiselect(column.replace("_", " ").capitalize(), values, key=f"{key}_{column}")
        if chosen:
            shown = shown[shown[column].astype(str).isin(chosen)]
    return shown


def cards(rows: pd.DataFrame, view: TableView, marks: str = "") -> None:
    columns = st.columns(4)
    for i, row in enumerate(rows.head(GALLERY_LIMIT).to_dict("records")):
        with columns[i % 4]:
            if view.image and isinstance(row.get(view.image), str):
                st.image(row[view.image], width=CARD_THUMB)
            head = str(row.get(view.title) or row.get("name") or row.get(view.key, ""))
            extra = f" {row[marks]}" if marks and row.get(marks) else ""
            st.markdown(f"**{esc(head)}** {literal(row.get(view.key, ''))}{esc(extra)}")
            if "desc" in row and isinstance(row["desc"], str):
                st.caption(esc(row["desc"]))


def one_row(view: TableView, root: Path, shown: pd.DataFrame, key: str) -> None:
    if view.key not in shown or shown.empty:
        return
    titles = dict(
        zip(
            shown[view.key].astype(str),
            shown[view.title].astype(str) if view.title in shown else shown[view.key].astype(str),
        )
    )
    picked = st.selectbox("Row", list(titles), key=f"{key}_row", format_func=lambda k: f"{k} · {titles[k][:90]}")
    row = shown[shown[view.key].astype(str) == picked].iloc[0].to_dict()
    picture, text = st.columns([1, 3]) if view.image else (None, st.container())  # text-only: full width
    if picture is not None:
        with picture:
            if isinstance(row.get(view.image), str):
                st.image(row[view.image], width=THUMB * 2)
            else:
                st.caption("no picture")
    with text:
        if view.long_text and isinstance(row.get(view.long_text), str):
            st.markdown(f"> {esc(row[view.long_text])}")
        details = [c for c in view.details if c in row and c != view.long_text]
        st.markdown(" · ".join(f"{c.replace('_', ' ')}: **{esc(row[c])}**" for c in details))
    if view.related is not None:
        st.markdown(f"**{view.related_title or 'Related rows'}**")
        cards(view.related(root, picked), view, marks="marks")


def table_tab(dataset: DatasetView, view: TableView, root: Path) -> None:
    key = f"ds_{dataset.world}_{view.name}".replace(" ", "_")
    try:
        table = read_table(dataset.world, view.name, str(root), world_stamp(root))
    except (DatasetError, OSError) as error:
        st.error(f"Cannot read {dataset.title.lower()}: {error}")
        return
    st.caption(f"{dataset.title}: {view.description}.")
    shown = _filtered(view, table, key)
    st.caption(f"{len(shown)} of {len(table)} rows shown")
    st.dataframe(
        shown.drop(columns=[view.image], errors="ignore") if view.image else shown, hide_index=True, height=260
    )
    if view.gallery:
        if len(shown) > GALLERY_LIMIT:
            st.caption(f"Pictures of the first {GALLERY_LIMIT}; filter to see one group whole.")
        cards(shown, view)
    else:
        one_row(view, root, shown, key)


def render() -> None:
    st.title("Dataset browser")
    declared = views()
    # Lazy tabs: reading a world checks every picture file (type, size, pixel count), about 1 s per world
    # of the demo; only the open tab's world is read, the others when opened.
    tabs = st.tabs(
        [f"{d.title} · {t.name}" for d in declared for t in d.tables],
        key=TAB_KEY,
        on_change="rerun",
        bind="query-params",
    )
    slots = iter(tabs)
    for dataset in declared:
        root = demo_world_dir(dataset.world)
        for view in dataset.tables:
            tab = next(slots)
            if not tab.open:
                continue
            with tab:
                if root.is_dir():
                    table_tab(dataset, view, root)
                else:
                    missing_world(dataset, root)


render()
