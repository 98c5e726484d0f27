"""The dashboard's pages: widgets and figures only, built from what the run declares.

Every page shows a run through its stored declaration (:class:`mmoe_core.spec.ModelSpec`, read with
``pages.reads.spec(run)``) and its tables; none names a model family or one family's fields.

Entry convention
----------------
A page is one file ``pages/<name>.py``, listed in ``app.py``'s navigation, laid out in this order:

1. a docstring: what the page shows and from which declarations and tables;
2. imports (``streamlit``, ``analysis`` modules, and the three shared modules below);
3. small functions, one per section of the page, each taking the run (and what it needs) as arguments;
4. ``def render() -> None:`` which draws the title first, then picks the run with
   ``state.require_run()`` and calls the section functions in page order;
5. a last line ``render()``.

Nothing slow runs before the title: stored results come first, and work that takes time (loading a
model, a live run) follows under a spinner; the playground's first run of a session only paints (the
inputs and the stored results) and starts the live run right after it (a fragment that reruns the
page). Pictures are drawn as thumbnails (``analysis.live.thumbnail``), never at full resolution.

Text from outside the app is shown as text: a URL value or a name echoed in Markdown goes through
``state.literal`` (a code span), data text (a dataset's sentence, an entity's name) through
``state.escape_markdown``; ``?example=`` is read with ``state.parse_index`` (ASCII digits only). An
expected failure (a file gone, a stale run, a refused config) is one message (``state.show_failure``;
app.py catches those a page lets through), never a traceback.

A page file is never imported by another page; what pages share lives in:

* :mod:`pages.state`: state and URL (sidebar and run picker, ``?run=`` / ``?example=`` and widgets
  synced with query params, the clear states: no runs, stale or partial runs, bad links; untrusted
  text and expected failures);
* :mod:`pages.reads`: cached reads (the store, tables, JSON, the run's declaration, summaries of
  declared outputs, the live model shared by every session);
* :mod:`pages.widgets`: shared widgets and figures (example titles, fields and pictures, the routing of
  one layer call, verdict lines, attributions).
"""
