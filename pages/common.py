"""Widgets and cached reads shared by every page.

* the run picker (sidebar), kept in the URL as ``?run=NAME`` so a link opens the same run;
* the device badge (GPU or CPU for live runs);
* cached access to a run: :func:`run_store` (one ``RunStore`` per run and manifest hash,
  ``st.cache_resource``) and cached tables / JSON / per-example routing (``st.cache_data`` keyed by run
  and manifest hash, so a republished run is never served from a stale cache);
* clear states: no runs yet (the exact build command), a stale or partial run (what changed and the
  rebuild command, from ``analysis.store.run_status``), a bad ``?run=`` / ``?example=`` (a message; the
  page goes on with a valid choice);
* links from any example to the routing explorer (``?run=..&example=..``).

Pages only lay out widgets and figures; everything they show comes from ``analysis`` through here.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlencode

import pandas as pd
import streamlit as st

from analysis import figures as F
from analysis.store import RunStore, list_runs, resolve_root, run_status

RUN_PARAM = "run"
EXAMPLE_PARAM = "example"
MAKE_COMMAND = "make demo"
BUILD_COMMAND = "python -m mmoe_core.demo"
EXPLORER_PAGE = "pages/routing_explorer.py"
EXPLORER_URL_PATH = "routing_explorer"

_PICKER_KEY = "moescope_run_picker"


def _route_through_app() -> None:
    """Deep links on a fresh server must run through app.py.

    With a ``pages/`` folder beside app.py, Streamlit starts every server in its v1 multipage mode and
    stays there until app.py has called ``st.navigation`` once. A first visit straight to
    ``/routing_explorer?run=..`` therefore ran the page file alone: no page config, no sidebar (run
    picker, device badge) and a navigation listing every file in pages/. When a page imports this module
    in that mode, switch the v1 mode off and rerun: the rerun executes app.py, whose navigation opens the
    same page (same URL path), with the query params kept."""
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # a Streamlit without the v1 shim
        return
    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()


_route_through_app()


# ----------------------------------------------------------------------------------------- device

def _gpu_driver_present() -> bool:
    """Cheap check (no torch import): an NVIDIA or ROCm driver on this machine."""
    return os.path.exists("/proc/driver/nvidia/gpus") or os.path.exists("/dev/nvidia0") or os.path.exists("/dev/kfd")


@st.cache_resource(show_spinner=False)
def device_label() -> str:
    """"GPU: <name>" or "CPU (no GPU found)": where live runs go. Imports torch only when a GPU driver is
    present (or torch is already loaded), so a CPU-only first render does not pay torch's import."""
    if "torch" not in sys.modules and not _gpu_driver_present():
        return "CPU (no GPU found)"
    import torch
    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)}"
    return "CPU (no GPU found)"


# ----------------------------------------------------------------------------------------- runs

def artifacts_root() -> Path:
    return resolve_root()


def available_runs() -> list[str]:
    """Published runs under the artifacts root (a directory listing: cheap, not cached)."""
    return list_runs(artifacts_root())


def no_runs_message() -> None:
    """The "nothing built yet" state, with the exact commands."""
    st.info(f"No runs are built yet under `{artifacts_root() / 'runs'}`. Build the demo worlds, runs and "
            f"artifacts with\n\n```\n{MAKE_COMMAND}\n```\n\nor, without serving the app,\n\n"
            f"```\n{BUILD_COMMAND}\n```\n\nthen reload this page.", icon=":material/info:")


def _on_pick() -> None:
    st.query_params[RUN_PARAM] = st.session_state[_PICKER_KEY]


def _sync_run_picker(runs: list[str]) -> list[str]:
    """Make the picker follow ``?run=`` when it names a run; return messages about bad URL values."""
    errors = []
    wanted = st.query_params.get(RUN_PARAM)
    state = st.session_state
    if wanted is not None and wanted in runs:
        if state.get(_PICKER_KEY) != wanted:
            state[_PICKER_KEY] = wanted
    else:
        if wanted is not None:
            errors.append(f"The link asks for run `{wanted}`, which does not exist here. Showing "
                          f"`{state.get(_PICKER_KEY) if state.get(_PICKER_KEY) in runs else runs[0]}` instead; "
                          f"available runs: {', '.join(f'`{r}`' for r in runs)}.")
        if state.get(_PICKER_KEY) not in runs:
            state[_PICKER_KEY] = runs[0]
    return errors


def render_sidebar() -> None:
    """The sidebar every page shares: title, device badge and run picker (+ URL messages in the main area)."""
    runs = available_runs()
    errors: list[str] = []
    if runs:
        errors = _sync_run_picker(runs)
    with st.sidebar:
        st.markdown("### MoEscope")
        label = device_label()
        st.badge(label, icon=":material/memory:", color="green" if label.startswith("GPU") else "gray")
        if runs:
            st.selectbox("Run", runs, key=_PICKER_KEY, on_change=_on_pick,
                         help="The run every page shows; kept in the URL (?run=...) so links open the same run.")
            run = st.session_state[_PICKER_KEY]
            if st.query_params.get(RUN_PARAM) != run:
                st.query_params[RUN_PARAM] = run
            info = _sidebar_info(run)
            if info:
                st.caption(info)
        else:
            st.caption(f"No runs yet: `{MAKE_COMMAND}`")
    for message in errors:
        st.warning(message, icon=":material/link_off:")


def _sidebar_info(run: str) -> str:
    try:
        m = manifest(run)
    except (FileNotFoundError, ValueError):
        return ""
    family = m.get("family", "?")
    n = m.get("num_examples")
    return f"{family} · {n} examples · split {m.get('split', '?')}" if n is not None else str(family)


def selected_run() -> str | None:
    """The run picked in the sidebar (None when no run is built)."""
    runs = available_runs()
    if not runs:
        return None
    run = st.session_state.get(_PICKER_KEY)
    if run in runs:
        return run
    wanted = st.query_params.get(RUN_PARAM)
    return wanted if wanted in runs else runs[0]


# ----------------------------------------------------------------------------------------- caching

_manifest_memo: dict[tuple, str] = {}


def run_version(run: str) -> str:
    """The cache key of a run's published version: the hash of its manifest plus a hash of the version
    directory's path (memoised on path, mtime and size: a stat per call). A republish (new version dir,
    new manifest) or another artifacts root gives a new value, so every cache keyed by it refreshes."""
    import hashlib

    from analysis.hashing import file_sha256
    link = artifacts_root() / "runs" / run
    path = Path(os.path.realpath(link)) / "manifest.json"
    try:
        st_ = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    key = (str(path), st_.st_mtime_ns, st_.st_size)
    h = _manifest_memo.get(key)
    if h is None:
        where = hashlib.sha256(str(path.parent).encode()).hexdigest()[:8]
        h = _manifest_memo[key] = f"{file_sha256(path)[:16]}-{where}"
    return h


@st.cache_resource(show_spinner=False, max_entries=16)
def _open_store(run: str, root: str, version: str) -> RunStore:
    return RunStore(run, root)


def store_for(run: str) -> RunStore:
    """The cached :class:`RunStore` of ``run`` (reopened when the run is republished)."""
    store = _open_store(run, str(artifacts_root()), run_version(run))
    if not store.is_current():  # republished between the version check and now
        _open_store.clear()
        store = _open_store(run, str(artifacts_root()), run_version(run))
    return store


@st.cache_data(show_spinner=False, ttl=15, max_entries=32)
def _status(run: str, root: str, version: str):
    s = run_status(run, root)
    return s.state, s.message


def show_status(run: str) -> str:
    """Warn (with the rebuild command) when ``run`` is stale or partial; return its state."""
    state, message = _status(run, str(artifacts_root()), run_version(run))
    if state == "stale":
        st.warning(f"**Stale run.** {message}", icon=":material/update:")
    elif state in ("partial", "missing"):
        st.warning(f"**Partial run: some tables may be missing.** {message}", icon=":material/warning:")
    return state


def run_store(run: str, warn: bool = True) -> RunStore | None:
    """The cached store of ``run``; shows the stale/partial warning (``warn``) and returns None, after an
    error message, when the run cannot be opened."""
    try:
        if warn:
            show_status(run)
        return store_for(run)
    except (FileNotFoundError, ValueError) as exc:
        st.error(f"Cannot open run `{run}`: {exc}")
        return None


def require_run() -> tuple[str, RunStore]:
    """(run, store) of the selected run, or stop the page with the "no runs yet" message."""
    run = selected_run()
    if run is None:
        no_runs_message()
        st.stop()
    store = run_store(run)
    if store is None:
        st.stop()
    return run, store


@st.cache_data(show_spinner=False, max_entries=128)
def _table(run: str, version: str, name: str, columns: tuple | None, _store: RunStore) -> pd.DataFrame:
    return _store.table(name, columns=list(columns) if columns else None)


def table(run: str, name: str, columns: Sequence[str] | None = None) -> pd.DataFrame | None:
    """A whole table of ``run`` (cached); None when the run has no such table. Tables with a ``layer``
    column come in the run's declared layer order (the order of the manifest's layers)."""
    store = store_for(run)
    if not store.has(name):
        return None
    frame = _table(run, run_version(run), name, tuple(columns) if columns else None, store)
    return F.in_layer_order(frame, layer_names(run))


def layer_names(run: str) -> list[str]:
    """The run's routed layers in declaration order (manifest)."""
    return [s.get("name") for s in manifest(run).get("layers") or [] if s.get("name")]


@st.cache_data(show_spinner=False, max_entries=64)
def _json(run: str, version: str, name: str, _store: RunStore) -> Any:
    return _store.read_json(name)


def read_json(run: str, name: str) -> Any:
    """``<name>.json`` of ``run`` (cached); None when absent or unreadable."""
    try:
        return _json(run, run_version(run), name, store_for(run))
    except (FileNotFoundError, ValueError):
        return None


def manifest(run: str) -> dict:
    return dict(store_for(run).manifest or {})


@st.cache_data(show_spinner=False, max_entries=64)
def _loads(run: str, version: str, by: tuple, _store: RunStore) -> pd.DataFrame:
    return _store.layer_loads(by=list(by) or None)


def layer_loads(run: str, by: Sequence[str] = ()) -> pd.DataFrame | None:
    """Per (layer, expert) slots and combine weight with their shares (cached); None without routing."""
    store = store_for(run)
    if not (store.has("routing_loads") or store.has("routing")):
        return None
    return F.in_layer_order(_loads(run, run_version(run), tuple(by), store), layer_names(run))


@st.cache_data(show_spinner=False, max_entries=64)
def _entropies(run: str, version: str, layers: tuple, sample: int, _store: RunStore) -> dict:
    return {layer: _store.entropy_values(layer, sample=sample) for layer in layers}


def entropy_values(run: str, layers: Sequence[str], sample: int = 20_000) -> dict:
    """{layer: per-position router entropies} (a uniform sample of at most ``sample``), cached."""
    store = store_for(run)
    if not store.has("routing") and not store.has("routing_entropy_sample"):
        return {}
    return _entropies(run, run_version(run), tuple(layers), int(sample), store)


@st.cache_data(show_spinner=False, max_entries=256)
def _example_routing(run: str, version: str, example_index: int, _store: RunStore) -> pd.DataFrame:
    return _store.example_routing(example_index)


def example_routing(run: str, example_index: int) -> pd.DataFrame | None:
    """Every routed position of one example in every layer (cached); None without a routing table."""
    store = store_for(run)
    if not store.has("routing"):
        return None
    return _example_routing(run, run_version(run), int(example_index), store)


def examples(run: str) -> pd.DataFrame | None:
    return table(run, "examples")


def example_index_column(frame: pd.DataFrame) -> str:
    return "example_index" if "example_index" in frame else "index"


# ----------------------------------------------------------------------------------------- links

def example_url(run: str, example_index: int) -> str:
    """Relative URL of the routing explorer showing one example (for markdown links / link columns)."""
    return f"{EXPLORER_URL_PATH}?{urlencode({RUN_PARAM: run, EXAMPLE_PARAM: int(example_index)})}"


def example_link(run: str, example_index: int, label: str | None = None) -> None:
    """A link that opens ``example_index`` of ``run`` in the routing explorer."""
    st.page_link(EXPLORER_PAGE, label=label or f"Open example {int(example_index)} in the routing explorer",
                 icon=":material/route:", query_params={RUN_PARAM: run, EXAMPLE_PARAM: str(int(example_index))})


def open_example(run: str, example_index: int) -> None:
    """Switch to the routing explorer on ``example_index`` of ``run`` (e.g. after a row selection)."""
    st.switch_page(EXPLORER_PAGE, query_params={RUN_PARAM: run, EXAMPLE_PARAM: str(int(example_index))})


def example_table(frame: pd.DataFrame, run: str, key: str, height: int | None = None, **kwargs) -> None:
    """A dataframe of examples (it must carry ``example_index`` or ``index``); selecting a row opens that
    example in the routing explorer."""
    column = example_index_column(frame)
    event = st.dataframe(frame, key=key, hide_index=True, on_select="rerun", selection_mode="single-row",
                         height=height if height is not None else "auto", **kwargs)
    rows = getattr(getattr(event, "selection", None), "rows", None) or []
    if rows:
        open_example(run, int(frame.iloc[rows[0]][column]))
    st.caption("Select a row to open that example in the routing explorer.")


def url_example(frame: pd.DataFrame) -> tuple[int | None, str | None]:
    """The example ``?example=`` names in ``frame`` (its index, or its id), and a message when the value
    is not one of them."""
    raw = st.query_params.get(EXAMPLE_PARAM)
    if raw is None:
        return None, None
    column = example_index_column(frame)
    indices = set(int(i) for i in frame[column])
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = None
    if value is not None and value in indices:
        return value, None
    if "id" in frame:
        hit = frame.loc[frame["id"].astype(str) == str(raw), column]
        if len(hit):
            return int(hit.iloc[0]), None
    return None, (f"The link asks for example `{raw}`, which this run does not have (examples are numbered "
                  f"{min(indices) if indices else 0}..{max(indices) if indices else 0}). Showing the first example "
                  "instead.")


# ----------------------------------------------------------------------------------------- routing views

def layer_specs(run: str) -> dict[str, dict]:
    """{layer name: RoutedLayerSpec dict} from the run's manifest, in declaration order."""
    return {s.get("name"): dict(s) for s in manifest(run).get("layers") or [] if s.get("name")}


def call_label(rows: pd.DataFrame, call: str) -> str:
    """"<call>: routes <modality> · gate sees <modality>" for a layer call's rows (majority over positions)."""
    part = rows[rows["call"] == call]
    if part.empty:
        return str(call)
    body = part[part["position_kind"] != "cls"] if (part["position_kind"] != "cls").any() else part
    routed = body["routed_modality"].mode().iloc[0] if "routed_modality" in body else "?"
    gate = body["gate_modality"].mode().iloc[0] if "gate_modality" in body else "?"
    kinds = ", ".join(sorted(set(body["position_kind"])))
    return f"{call}: routes {routed} ({kinds}) · gate sees {gate}"


def example_picture(example: dict | pd.Series | None):
    """The example's picture (PIL) when it has one, via analysis.live; else None."""
    if example is None:
        return None
    from analysis.live import example_picture as _picture
    row = {k: v for k, v in dict(example).items() if not (isinstance(v, float) and v != v)}
    return _picture(row)


_KIND_WORDS = {"text_token": "tokens", "question_token": "question tokens", "context_token": "context tokens",
               "joint_token": "joint tokens", "decoder_step": "decoder steps", "image_patch": "image patches"}


def show_call_routing(rows: pd.DataFrame, layer: str, call: str, num_experts: int | None, key: str,
                      picture=None, title_prefix: str = "", wrap: int = 12) -> None:
    """The routing of one layer call of one example: image patches on their grid (beside the example's
    picture when given), other positions (text tokens, CLS, decoder steps) as a strip of ``wrap`` cells per
    row, coloured by top-1 expert; grey cells are positions the layer did not route (all-zero combine
    weights). ``title_prefix`` (e.g. a run name) replaces "<layer> · <call>" in the figure titles."""
    part = rows[(rows["layer"] == layer) & (rows["call"] == call)]
    if part.empty:
        st.info(f"No routed positions for {layer} / {call} in this example.")
        return
    patches, others = F.split_call_rows(part)
    prefix = title_prefix or f"{layer} · {call}"
    config = {"displayModeBar": False}  # hover is the interaction here; the bar would cover the title
    if len(patches):
        if picture is not None:
            left, right = st.columns([1, 2])
            left.image(picture, caption="the example's image", width=240)
        else:
            right = st.container()
        with right:
            st.plotly_chart(F.patch_grid(part, f"{prefix}: image patches by top-1 expert", num_experts),
                            key=f"{key}_grid", config=config)
    if len(others):
        kinds = set(others["position_kind"]) - {"cls"}
        what = (_KIND_WORDS.get(kinds.pop(), "positions") if len(kinds) == 1 else
                "positions" if kinds else "CLS positions")
        st.plotly_chart(F.token_strip(others, f"{prefix}: {what} by top-1 expert", num_experts, wrap=wrap),
                        key=f"{key}_strip", config=config)
    unrouted = int((~part["routed"].astype(bool)).sum()) if "routed" in part else 0
    if unrouted:
        st.caption(f"{unrouted} of {len(part)} positions are **{F.NOT_ROUTED_LABEL}** (grey): their combine "
                   "weights are all zero, so the layer passed them through with no expert output.")


TEXT_FIELDS = ("sentence", "mention", "text", "question", "answer", "context")


def own_side(rows: pd.DataFrame, example: pd.Series | dict) -> str | None:
    """The call prefix (the part before ':') whose token strings overlap the example's own text the most:
    its calls are shown first (e.g. a mention's own positions before those of a paired knowledge-base item)."""
    words = {w.strip(".,;:!?'\"()").lower() for f in TEXT_FIELDS if isinstance(example.get(f), str)
             for w in example[f].split()}
    words.discard("")
    if not words or "token" not in rows or rows.empty:
        return None
    side = rows["call"].astype(str).str.split(":").str[0]
    tokens = rows["token"].astype(str).str.lower().str.strip("\u0120 ")
    overlap = tokens.isin(words).groupby(side).sum()
    return str(overlap.idxmax()) if len(overlap) and overlap.max() > 0 else None


def order_calls(calls: Sequence[str], side: str | None) -> list[str]:
    """``calls`` with those of ``side`` first (stable)."""
    calls = list(calls)
    return calls if side is None else sorted(calls, key=lambda c: str(c).split(":")[0] != side)


def synced_radio(label: str, options: Sequence[str], key: str, param: str, clears: Sequence[str] = (),
                 **kwargs) -> str:
    """A radio whose choice is kept in the URL as ``?<param>=<value>`` (a link opens the same choice);
    a value the options do not have gets a message and the first option. A change by the user drops the
    URL params named in ``clears`` (choices that depend on this one)."""
    options = [str(o) for o in options]
    wanted = st.query_params.get(param)
    if wanted is not None and wanted not in options:
        st.warning(f"The link asks for {label.split(' (')[0].lower()} `{wanted}`, which is not one of "
                   f"{', '.join(f'`{o}`' for o in options)}; showing `{options[0]}`.", icon=":material/link_off:")
        st.session_state[key] = options[0]
    elif wanted is not None and st.session_state.get(key) != wanted:
        st.session_state[key] = wanted
    if st.session_state.get(key) not in options:
        st.session_state[key] = options[0]

    def on_change() -> None:
        st.query_params[param] = st.session_state[key]
        for name in clears:
            st.query_params.pop(name, None)

    value = st.radio(label, options, key=key, on_change=on_change, **kwargs)
    if st.query_params.get(param) != value:
        st.query_params[param] = value
    return value
