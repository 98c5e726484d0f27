"""State and URL: the run picker, the query params every page shares, and widgets kept in the URL.

* the sidebar (title, device badge, run picker kept as ``?run=NAME``), :func:`require_run` for a page;
* clear states: no runs yet (the exact build command), a stale or partial run (what changed and the
  rebuild command), a bad ``?run=`` / ``?example=`` / ``?layer=`` (a message; the page goes on with a
  valid choice);
* links to the routing explorer (``?run=..&example=..``) and widgets synced with a query param.

Importing this module first makes a deep link on a fresh server run through app.py (see
:func:`_route_through_app`).
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlencode

import streamlit as st

from analysis.store import RunStore
from mmoe_core.errors import UserError
from pages import reads

RUN_PARAM = "run"
EXAMPLE_PARAM = "example"
MAKE_COMMAND = "make demo"
BUILD_COMMAND = "python -m demo_build"
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


# ----------------------------------------------------------------------------------------- untrusted text

LITERAL_CHARS = 80
_ASCII_INT = re.compile(r"-?[0-9]{1,18}")


def literal(value: Any, limit: int = LITERAL_CHARS) -> str:
    """An untrusted value (a URL parameter, a name read from a file) as Markdown that shows it character for
    character: an inline code span, so no link, image, emphasis, directive, LaTeX or HTML can start inside
    it. Its fence is longer than any run of backticks in the value; line breaks and other control
    characters show as U+FFFD; a value longer than ``limit`` is cut (with "…" after the span)."""
    text = "" if value is None else str(value)
    cut = len(text) > limit
    text = "".join(ch if ch.isprintable() else "\ufffd" for ch in text[:limit])
    if not text.strip():
        return "(empty)" if not text else f"({len(text)} spaces)"
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}" + ("…" if cut else "")


# ASCII punctuation Markdown (CommonMark, GFM, Streamlit's directives and LaTeX) can give a meaning to;
# commas, semicolons, quotes, "%", "/" and "?" read as themselves.
_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~:$@&^=])")


def escape_markdown(text: Any) -> str:
    """Data text (a dataset's sentence, an entity's name) for a Markdown line: every punctuation mark that
    Markdown could read backslash-escaped (no emphasis, link, image, heading, list, directive, entity or
    LaTeX; "www." and "http://" cannot become links), line breaks as spaces."""
    value = " ".join(str(text).split()) if text is not None else ""
    return _MARKDOWN_PUNCTUATION.sub(r"\\\1", value)


def parse_index(raw: Any) -> int | None:
    """An example index from a URL value: ASCII digits only (``²`` or ``٣`` are digits to Python's
    ``int`` and ``str.isdigit``, not to a link), else None."""
    if raw is None:
        return None
    text = str(raw).strip()
    return int(text) if _ASCII_INT.fullmatch(text) else None


EXPECTED_ERRORS = (UserError, OSError, ValueError)


def show_failure(what: str, exc: BaseException) -> None:
    """One clear message for a failure: ``what`` and the exception's own words. An expected failure (a
    missing file, a stale or partial run, a refused config: :data:`EXPECTED_ERRORS`) shows no traceback;
    anything else is a bug, and its traceback waits in a closed expander for the report."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    st.error(f"{what}: {escape_markdown(message)}", icon=":material/error:")
    if not isinstance(exc, EXPECTED_ERRORS):
        with st.expander("Details for a bug report"):
            st.code("".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:], language=None)


# ----------------------------------------------------------------------------------------- device


def _gpu_driver_present() -> bool:
    """Cheap check (no torch import): an NVIDIA or ROCm driver on this machine."""
    return os.path.exists("/proc/driver/nvidia/gpus") or os.path.exists("/dev/nvidia0") or os.path.exists("/dev/kfd")


@st.cache_resource(show_spinner=False)
def device_label() -> str:
    """ "GPU: <name>" or "CPU (no GPU found)": where live runs go. Imports torch only when a GPU driver is
    present (or torch is already loaded), so a CPU-only first render does not pay torch's import."""
    if "torch" not in sys.modules and not _gpu_driver_present():
        return "CPU (no GPU found)"
    import torch

    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)}"
    return "CPU (no GPU found)"


# ----------------------------------------------------------------------------------------- the run


def no_runs_message() -> None:
    """The "nothing built yet" state, with the exact commands."""
    st.info(
        f"No runs are built yet under `{reads.artifacts_root() / 'runs'}`. Build the demo worlds, runs and "
        f"artifacts with\n\n```\n{MAKE_COMMAND}\n```\n\nor, without serving the app,\n\n"
        f"```\n{BUILD_COMMAND}\n```\n\nthen reload this page.",
        icon=":material/info:",
    )


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
            errors.append(
                f"The link asks for run {literal(wanted)}, which does not exist here. Showing "
                f"{literal(state.get(_PICKER_KEY) if state.get(_PICKER_KEY) in runs else runs[0])} "
                f"instead; available runs: {', '.join(literal(r) for r in runs)}."
            )
        if state.get(_PICKER_KEY) not in runs:
            state[_PICKER_KEY] = runs[0]
    return errors


def render_sidebar() -> None:
    """The sidebar every page shares: title, device badge and run picker (+ URL messages in the main area)."""
    runs = reads.available_runs()
    errors: list[str] = []
    if runs:
        errors = _sync_run_picker(runs)
    with st.sidebar:
        st.markdown("### MoEscope")
        label = device_label()
        st.badge(label, icon=":material/memory:", color="green" if label.startswith("GPU") else "gray")
        if runs:
            st.selectbox(
                "Run",
                runs,
                key=_PICKER_KEY,
                on_change=_on_pick,
                help="The run every page shows; kept in the URL (?run=...) so links open the same run.",
            )
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
        m = reads.manifest(run)
        title = reads.spec(run).title
    except (FileNotFoundError, ValueError):
        return ""
    n = m.get("num_examples")
    return f"{title} · {n} examples · split {m.get('split', '?')}" if n is not None else title


def selected_run() -> str | None:
    """The run picked in the sidebar (None when no run is built)."""
    runs = reads.available_runs()
    if not runs:
        return None
    run = st.session_state.get(_PICKER_KEY)
    if run in runs:
        return run
    wanted = st.query_params.get(RUN_PARAM)
    return wanted if wanted in runs else runs[0]


def show_status(run: str) -> str:
    """Warn (with the rebuild command) when ``run`` is stale or partial; return its state."""
    state, message = reads.status(run)
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
        return reads.store_for(run)
    except EXPECTED_ERRORS as exc:
        show_failure(f"Cannot open run {literal(run)}", exc)
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


def rebuild_hint(run: str) -> str:
    return f"rebuild it with `python -m analysis.precompute --run {run}`"


# ----------------------------------------------------------------------------------------- links


def example_url(run: str, example_index: int) -> str:
    """Relative URL of the routing explorer showing one example (for markdown links / link columns)."""
    return f"{EXPLORER_URL_PATH}?{urlencode({RUN_PARAM: run, EXAMPLE_PARAM: int(example_index)})}"


def example_link(run: str, example_index: int, label: str | None = None) -> None:
    """A link that opens ``example_index`` of ``run`` in the routing explorer."""
    st.page_link(
        EXPLORER_PAGE,
        label=label or f"Open example {int(example_index)} in the routing explorer",
        icon=":material/route:",
        query_params={RUN_PARAM: run, EXAMPLE_PARAM: str(int(example_index))},
    )


def open_example(run: str, example_index: int) -> None:
    """Switch to the routing explorer on ``example_index`` of ``run`` (e.g. after a row selection)."""
    st.switch_page(EXPLORER_PAGE, query_params={RUN_PARAM: run, EXAMPLE_PARAM: str(int(example_index))})


def bad_example_message(raw: Any, options: Sequence[int], shown: str, among: str = "this run's examples") -> str:
    """The one message every page gives for an ``?example=`` value it cannot show: the value (literally),
    why, the valid range and what is shown instead."""
    values = sorted(int(o) for o in options)
    number = parse_index(raw)
    if number is None:
        why = "which is not an example number (digits 0-9) or id"
    else:
        why = f"which is not among {among}"
    span = f" (numbered {values[0]}..{values[-1]})" if values else ""
    return f"The link asks for example {literal(raw)}, {why}{span}. Showing {shown} instead."


def url_example(frame, key_column: str = "example_index") -> tuple[int | None, str | None]:
    """The example ``?example=`` names in ``frame`` (its index, or its id), and a message when the value
    is not one of them."""
    raw = st.query_params.get(EXAMPLE_PARAM)
    if raw is None:
        return None, None
    indices = [int(i) for i in frame[key_column]]
    value = parse_index(raw)
    if value is not None and value in set(indices):
        return value, None
    if "id" in frame:
        hit = frame.loc[frame["id"].astype(str) == str(raw), key_column]
        if len(hit):
            return int(hit.iloc[0]), None
    return None, bad_example_message(raw, indices, "the first example")


# ----------------------------------------------------------------------------------------- synced widgets


def synced_radio(label: str, options: Sequence[str], key: str, param: str, clears: Sequence[str] = (), **kwargs) -> str:
    """A radio whose choice is kept in the URL as ``?<param>=<value>`` (a link opens the same choice);
    a value the options do not have gets a message and the first option. A change by the user drops the
    URL params named in ``clears`` (choices that depend on this one)."""
    options = [str(o) for o in options]
    wanted = st.query_params.get(param)
    if wanted is not None and wanted not in options:
        st.warning(
            f"The link asks for {label.split(' (')[0].lower()} {literal(wanted)}, which is not one of "
            f"{', '.join(literal(o) for o in options)}; showing {literal(options[0])}.",
            icon=":material/link_off:",
        )
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


def synced_example(
    label: str,
    options: Sequence[int],
    key: str,
    format_func: Callable[[int], str],
    container: Any = st,
    warn: bool = True,
    among: str = "the examples this page shows",
    **kwargs,
) -> int:
    """A select box of example indices kept in the URL as ``?example=<index>``. A URL value that is not
    among ``options`` (not an ASCII number, or out of range) leaves the choice as it was, with
    :func:`bad_example_message` (unless ``warn`` is False)."""
    options = [int(o) for o in options]
    raw = st.query_params.get(EXAMPLE_PARAM)
    wanted = parse_index(raw)
    if wanted in options and st.session_state.get(key) != wanted:
        st.session_state[key] = wanted
    if st.session_state.get(key) not in options:
        st.session_state[key] = options[0]
    # the message stays until the person picks an example (the playground reruns itself once after its
    # first paint, and by then the URL holds the example shown instead)
    notice_key = f"{key}__bad_link"
    if raw is not None and wanted not in options and warn:
        shown = st.session_state[key]
        message = bad_example_message(raw, options, f"example {literal(format_func(shown))}", among)
        st.session_state[notice_key] = (shown, message)
    notice = st.session_state.get(notice_key)
    if notice is not None and notice[0] == st.session_state[key]:
        st.warning(notice[1], icon=":material/link_off:")

    def on_change() -> None:
        st.session_state.pop(notice_key, None)
        st.query_params[EXAMPLE_PARAM] = str(st.session_state[key])

    value = int(container.selectbox(label, options, key=key, format_func=format_func, on_change=on_change, **kwargs))
    if st.query_params.get(EXAMPLE_PARAM) != str(value):
        st.query_params[EXAMPLE_PARAM] = str(value)
    return value
