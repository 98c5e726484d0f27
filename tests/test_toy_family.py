"""A third family, defined only under tests/ (tests/toy_family.py), through the whole house.

Registered through the public registry alone, it is trained a few steps here, precomputed into a
temporary artifacts root, and every page of the app renders for it under Streamlit's AppTest; the
playground builds its inputs from the family's declared fields. No line of ``pages/``, ``analysis/`` or
``app.py`` names it. Unit tier: no demo build.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

from mmoe_core import registry
from mmoe_core.adapter import ModelAdapter, RoutedModule, load_adapter
from mmoe_core.moe import SwitchMoE
from mmoe_core.training import TrainOptions, TrainResult, get_trainer, train
from tests import toy_family as toy

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "app.py"
RUN, RUN_B = "toy-runes", "toy-runes-topone"
STEPS = 90
TIMEOUT = 120
PRECOMPUTE = dict(attribution_sample=4, dynamics_sample=16, projection="pca", device="cpu", progress=False)


@dataclass
class ToyRuns:
    root: Path
    data: Path
    result: TrainResult


def _train(data: Path, out: Path, **overrides) -> TrainResult:
    settings = dict(
        steps=STEPS,
        batch_size=32,
        lr=3e-3,
        experts=4,
        top_k=2,
        balance=0.01,
        log_every=5,
        snapshot_every=STEPS // 3,
        progress=False,
        threads=1,
    )
    options = TrainOptions(family=toy.FAMILY, data_dir=str(data), **{**settings, **overrides})
    return train(get_trainer(toy.FAMILY)(options), options, out)


@pytest.fixture(scope="module", autouse=True)
def registered():
    """The toy family, world and view are registered for this module's tests only: no other test module
    (e.g. one counting the dataset browser's worlds) sees them. The registries offer no removal, so the
    clean-up pops their entries."""
    from mmoe_core.data import views

    toy.register()
    yield
    registry._FAMILIES.pop(toy.FAMILY, None)
    registry._WORLDS.pop(toy.WORLD, None)
    views._VIEWS.pop(toy.WORLD, None)


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory) -> ToyRuns:
    """The rune world, two trained checkpoints (top-2 and top-1 weave) and their precomputed runs."""
    from analysis.precompute import precompute

    root = tmp_path_factory.mktemp("toy-artifacts")
    world = registry.worlds()[toy.WORLD]
    data = root / "data" / toy.WORLD
    world.build(data, "tiny", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is fastest, and 2 cores are shared
    try:
        result = _train(data, root / "checkpoints" / RUN)
        _train(data, root / "checkpoints" / RUN_B, top_k=1, seed=1, snapshot_every=0)
        for run in (RUN, RUN_B):
            assert precompute(run, root=root, **PRECOMPUTE) == root / "runs" / run
    finally:
        torch.set_num_threads(threads)
    return ToyRuns(root, data, result)


@pytest.fixture
def toy_root(toy_runs, monkeypatch) -> Path:
    """The toy runs' artifacts root, for the app (MOESCOPE_ARTIFACTS) with cold Streamlit caches."""
    import streamlit as st

    monkeypatch.setenv("MOESCOPE_ARTIFACTS", str(toy_runs.root))
    st.cache_data.clear()
    st.cache_resource.clear()
    return toy_runs.root


# ------------------------------------------------------------------------------ family and training


def test_the_family_and_world_come_from_the_registry(toy_runs):
    family = registry.get(toy.FAMILY)
    assert family.adapter is toy.RuneAdapter and issubclass(family.adapter, ModelAdapter)
    assert toy.FAMILY in registry.families() and toy.WORLD in registry.worlds()
    assert registry.worlds()[toy.WORLD].is_built(toy_runs.data, "tiny", 0)
    assert not registry.worlds()[toy.WORLD].is_built(toy_runs.data, "default", 0)
    adapter = load_adapter(toy_runs.root / "checkpoints" / RUN, device="cpu")
    assert isinstance(adapter, toy.RuneAdapter)
    routed = adapter.routed_modules()
    assert set(routed) == {"weave", "sieve"}
    assert isinstance(routed["weave"], SwitchMoE)
    assert isinstance(routed["sieve"], RoutedModule) and not isinstance(routed["sieve"], SwitchMoE)


def test_it_really_trains_and_routes(toy_runs):
    log = toy_runs.result.log
    assert toy_runs.result.steps == STEPS
    assert log["loss.ce"].iloc[-3:].mean() < 0.5 * log["loss.ce"].iloc[:3].mean()
    adapter = load_adapter(toy_runs.root / "checkpoints" / RUN, device="cpu")
    examples = adapter.load_examples(toy_runs.data, "test")
    out = adapter.run(examples)
    summary = adapter.summarize(out.predictions, examples)
    assert summary["overall"]["hits@1"] > 0.8, summary  # chance is 0.25
    assert {"chant", "sigil"} == set(summary["by_witness"])

    # Routing depends on the ground truth: where the rune is written changes the weave's choices.
    from analysis.store import RunStore

    spec_table = RunStore(RUN, toy_runs.root).table("specialisation")
    witness = spec_table[(spec_table["layer"] == "weave") & (spec_table["label"] == "witness")]
    assert len(witness) == 1 and bool(witness["above_shuffled"].iloc[0]), spec_table

    # Knockout through the routed-module protocol, on the SwitchMoE and on the family's own layer.
    for layer in ("weave", "sieve"):
        with adapter.knockout(layer, 0):
            knocked = adapter.run(examples[:16]).recorder
        chosen = torch.cat([c.router.topk_ids.reshape(-1) for c in knocked.calls if c.layer == layer])
        assert 0 not in chosen.tolist()
    assert adapter.routed_modules()["sieve"].knocked_out == frozenset()


def test_an_untrusted_config_is_checked_by_the_family_before_any_allocation(toy_runs, tmp_path):
    import json
    import shutil

    from mmoe_core.errors import ConfigError

    ckpt = tmp_path / "ckpt"
    shutil.copytree(toy_runs.root / "checkpoints" / RUN, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["model"]["dim"] = 10**9
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"model: dim = 1000000000 is out of range"):
        load_adapter(ckpt, device="cpu")


def test_precompute_stores_the_declared_spec_and_tables(toy_runs):
    from analysis.store import RunStore

    store = RunStore(RUN, toy_runs.root)
    spec = store.spec()
    assert spec.family == toy.FAMILY
    assert [f.name for f in spec.editable_fields()] == ["chant", "sigil"]
    assert spec.deciding_label().name == "witness"
    assert spec.layer("sieve").gate.score == "sigmoid" and spec.layer("weave").top_k == 2
    assert [i.grid.rows for i in spec.image_inputs()] == [toy.GRID]
    routing = store.table("routing")
    assert set(routing["layer"]) == {"weave", "sieve"} and "example_index" in routing
    patches = routing[(routing["layer"] == "weave") & (routing["position_kind"] == "image_patch")]
    assert len(patches) and patches["grid_row"].between(0, toy.GRID - 1).all()
    assert (routing.loc[routing["position_kind"] != "image_patch", "grid_row"] == -1).all()
    assert set(store.table("layer_metrics")["layer"]) == {"weave", "sieve"}
    attributions = store.table("attributions")
    assert {"chant_tokens", "sigil_patches"} <= set(attributions["input"])
    assert len(store.table("dynamics"))


# ------------------------------------------------------------------------------ every page under AppTest


def _pages() -> list[str]:
    """Every page the app navigates to, as app.py lists them."""
    return re.findall(r"st\.Page\(\s*\"(pages/[\w/]+\.py)\"", APP.read_text())


def _render(page: str, run: str = RUN, **params: str) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.query_params["run"] = run
    for key, value in params.items():
        at.query_params[key] = value
    at.run()
    at.switch_page(page)
    at.run()
    return at


def _no_exception(at: AppTest) -> None:
    assert not at.exception, "\n\n".join(f"{e.message}\n{''.join(e.stack_trace)}" for e in at.exception)
    assert not at.error, [e.value for e in at.error]


def test_the_app_lists_pages():
    assert len(_pages()) >= 10


@pytest.mark.parametrize("page", _pages())
def test_every_page_renders_for_the_toy_run(toy_root, page):
    _no_exception(_render(page))


def test_compare_renders_the_two_toy_runs(toy_root):
    compare = next(p for p in _pages() if p.endswith("compare.py"))
    at = _render(compare)
    _no_exception(at)
    assert any(RUN_B in list(w.options) for w in at.selectbox), "run B is not offered"
    assert len(at.get("plotly_chart")) + len(at.dataframe) > 0, "two runs, nothing compared"


def test_the_dataset_browser_shows_the_registered_world(toy_root):
    browser = next(p for p in _pages() if p.endswith("dataset_browser.py"))
    at = _render(browser)
    _no_exception(at)
    assert "Rune world · Tablets" in [t.label for t in at.tabs]
    at.query_params["table"] = "Rune world · Tablets"  # tabs are lazy: open it (kept in the URL)
    at.run()
    _no_exception(at)
    tablets = [d.value for d in at.dataframe if isinstance(d.value, pd.DataFrame) and "witness" in d.value]
    assert tablets and len(tablets[0]) == toy.WORLD_SIZES["tiny"][1]  # the test split, picked first


def test_the_playground_builds_its_inputs_from_the_declared_fields(toy_root, toy_runs):
    from analysis.store import RunStore

    spec = RunStore(RUN, toy_runs.root).spec()
    playground = next(p for p in _pages() if p.endswith("playground.py"))
    at = _render(playground)
    _no_exception(at)
    labels = {
        w.label for kind in ("text_input", "text_area", "radio", "selectbox", "number_input") for w in at.get(kind)
    }
    for f in spec.editable_fields():
        assert any(f.label in label for label in labels), (f.label, sorted(labels))
    chant = next(w for w in [*at.text_input, *at.text_area] if w.label == "Chant")

    # An edit of the declared text field reaches the model: a chant naming a rune is ranked first.
    target = next(r for r in toy.RUNES if r not in str(chant.value).split())
    chant.set_value(f"the {target} sings under the moon").run()
    _no_exception(at)
    shown = "\n".join(
        [
            *(str(m.value) for m in at.metric),
            *(str(m.value) for m in at.markdown),
            *(d.value.to_string() for d in at.dataframe if isinstance(d.value, pd.DataFrame)),
        ]
    )
    assert target in shown


def test_no_line_of_pages_or_analysis_names_the_toy_family():
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, toy.DECLARED_NAMES)) + r")\b", re.IGNORECASE)
    hits = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for path in [APP, *sorted((REPO / "pages").rglob("*.py")), *sorted((REPO / "analysis").rglob("*.py"))]
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert not hits, "\n".join(hits)
