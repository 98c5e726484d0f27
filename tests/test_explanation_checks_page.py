"""AppTest of the explanation-checks page on a run of the tiny probe model (tests/test_explanation_checks.py),
precomputed into a temporary artifacts root with the real write_run (so the checks step runs as in a
precompute). Unit tier: no demo build."""

from __future__ import annotations

from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from analysis import precompute as P
from analysis import precompute_steps as S
from analysis.attribution import attribution_table
from analysis.sharding import Dist
from analysis.store import RunStore
from tests.test_explanation_checks import train_probe

REPO = Path(__file__).resolve().parents[1]
RUN = "probe-checks"
TIMEOUT = 120


@pytest.fixture(scope="module")
def probe_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("probe-artifacts")
    adapter = train_probe()
    examples = adapter.load_examples(Path("."))
    params = {
        **P.DEFAULT_PARAMS,
        "attribution_sample": 6,
        "dynamics_sample": 30,
        "projection": "pca",
        "sanity_ig_steps": 8,
        "randomisation_stages": 3,
    }
    part = S.run_examples(adapter, adapter.spec(), examples, 32, Dist(), progress=False)
    merged = S.merge_parts([part])
    merged["attributions"] = attribution_table(
        adapter, examples, sample_size=6, stratify_by="side", progress=False, n_steps=8, router_target=None
    )
    ckpt, data = root / "ckpt", root / "data"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"family": "probe"}')
    (ckpt / "model.safetensors").write_bytes(b"weights")
    data.mkdir()
    P.write_run(RUN, root, adapter, ckpt, data, examples, merged, params)
    return root


@pytest.fixture
def page(probe_root, monkeypatch) -> AppTest:
    monkeypatch.setenv("MOESCOPE_ARTIFACTS", str(probe_root))
    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(str(REPO / "pages" / "explanation_checks.py"), default_timeout=TIMEOUT)
    at.query_params["run"] = RUN
    return at


def _text(at: AppTest) -> str:
    return "\n".join([m.value for m in at.markdown] + [c.value for c in at.caption] + [s.value for s in at.subheader])


def test_the_run_has_the_tables_and_the_json(probe_root):
    store = RunStore(RUN, probe_root)
    for name in ("explanation_checks", "knockout_effects", "detector_suite"):
        assert store.has(name), name
    summary = store.read_json("explanation_checks")
    assert summary["knockout"]["moe"]["0"]["Hits@1"] < -0.4 and "sieve" in summary["knockout_notes"]


def test_the_page_shows_agreement_sanity_flags_knockout_and_the_detector(page, probe_root):
    at = page.run()
    assert not at.exception, [e.message for e in at.exception]
    text = _text(at)
    for heading in ("Ground-truth agreement", "Sanity checks", "Expert knockout", "collapse detector"):
        assert heading in text, heading
    assert "side" in text  # the declared decisive label, by name
    frames = [df.value for df in at.dataframe]
    flags = [f for frame in frames if "flag" in getattr(frame, "columns", []) for f in frame["flag"]]
    assert "flagged" in flags and "ok" in flags  # the input-norm control is flagged, IG is not
    charts = [c for c in at.get("plotly_chart")]
    assert len(charts) >= 4  # specialisation, randomisation, knockout, load
    assert "sieve: not removable" in text  # a routed layer without the ablation switch
    assert at.selectbox(key="ec_metric").options == ["Hits@1"]  # the declared headline metric
    at.selectbox(key="ec_slice").set_value("side = left").run()
    assert not at.exception, [e.message for e in at.exception]
    assert any("side = left" in c.value for c in at.caption)


def test_a_run_without_checks_says_how_to_build_them(probe_root, monkeypatch, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(probe_root, root, symlinks=True)
    run_dir = (root / "runs" / RUN).resolve()
    for name in (
        "explanation_checks.parquet",
        "knockout_effects.parquet",
        "detector_suite.parquet",
        "explanation_checks.json",
    ):
        (run_dir / name).unlink()
    monkeypatch.setenv("MOESCOPE_ARTIFACTS", str(root))
    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(str(REPO / "pages" / "explanation_checks.py"), default_timeout=TIMEOUT)
    at.query_params["run"] = RUN
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert any("--force" in i.value for i in at.info)
