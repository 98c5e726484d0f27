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
    done = subprocess.run(
        [sys.executable, "-m", "demo_build", "--scale", "tiny", "--no-progress"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
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


# ---------------------------------------------------------------------------------------------- test tiers
# Two tiers: the unit tier (`pytest -m "not e2e"`, `make test-unit`) needs no demo build; the end-to-end
# tier is every test that uses the tiny demo build. A test joins it by requesting ``demo_artifacts``, or
# ``runs_root`` (tests/test_pages_apptest.py), which asks for ``demo_artifacts`` lazily unless
# $MOESCOPE_TEST_RUNS_ROOT names a built root. No test is marked by hand.
E2E_FIXTURES = frozenset({"demo_artifacts", "runs_root"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


class _TierGuard:
    """A test outside the e2e tier that reaches the demo build (through request.getfixturevalue, say)
    fails at once instead of making the unit tier build the demo. A plugin of its own, not a conftest
    hook: session-scoped fixtures are set up through the session's hooks, which skip tests/conftest.py."""

    def __init__(self) -> None:
        self.item: pytest.Item | None = None

    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        self.item = item

    def pytest_fixture_setup(self, fixturedef, request) -> None:
        item = self.item
        if fixturedef.argname == "demo_artifacts" and item is not None and item.get_closest_marker("e2e") is None:
            pytest.fail(
                f"{item.nodeid} needs the demo build but is not in the e2e tier: request one of "
                f"{sorted(E2E_FIXTURES)} as a fixture argument (tests/conftest.py marks those)"
            )


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_TierGuard(), "moescope-tier-guard")
