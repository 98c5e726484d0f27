"""Shared fixtures.

``demo_artifacts`` builds the tiny demo once per test session, with the same command a user runs
(`python -m demo_build`, at ``--scale tiny``): tiny worlds, short trainings of the demo runs,
and their precomputed artifacts, all in a temporary artifacts root. It sets MOESCOPE_ARTIFACTS for
the session so that pages, the store and the CLIs all read that root.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_RUNS = ("mmoe-balanced", "mmoe-collapsing", "mmoe-reference-gate", "moemoe-qa")


@pytest.fixture(scope="session")
def demo_artifacts(tmp_path_factory) -> Path:
    root = Path(os.environ.get("MOESCOPE_TEST_ARTIFACTS") or tmp_path_factory.mktemp("artifacts"))
    env = {**os.environ, "MOESCOPE_ARTIFACTS": str(root)}
    done = subprocess.run([sys.executable, "-m", "demo_build", "--scale", "tiny", "--no-progress"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        pytest.fail(f"tiny demo build failed (rc {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    missing = [run for run in DEMO_RUNS if not (root / "runs" / run / "manifest.json").is_file()]
    assert not missing, f"demo build published no artifacts for {missing}:\n{done.stderr[-3000:]}"
    previous = os.environ.get("MOESCOPE_ARTIFACTS")
    os.environ["MOESCOPE_ARTIFACTS"] = str(root)
    yield root
    if previous is None:
        os.environ.pop("MOESCOPE_ARTIFACTS", None)
    else:
        os.environ["MOESCOPE_ARTIFACTS"] = previous
