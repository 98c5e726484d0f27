"""Headless-browser test: the real Streamlit server, every page in Chromium, no exception boxes or error
alerts, one screenshot per page under ``test-output/screenshots/<page>.png`` (git-ignored).

Needs /usr/bin/chromium and /usr/bin/chromedriver (skipped, saying so, when either is absent) and selenium.
The server runs ``python -m streamlit run app.py`` on a free port with MOESCOPE_ARTIFACTS pointing at the
tiny demo runs (the ``runs_root`` fixture of tests/test_pages_apptest.py: conftest's ``demo_artifacts``
when present). Every wait is bounded; the server is stopped at the end.
``MOESCOPE_SCREENSHOT_HEIGHT`` makes the window taller (to review whole pages by eye).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import pytest

from tests.test_pages_apptest import runs_root  # noqa: F401  (the session fixture with the demo runs)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "test-output" / "screenshots"
PAGE_TIMEOUT = 60.0
SERVER_TIMEOUT = 90.0
QUIET_S = 1.5  # the app counts as idle after this long without a running indicator

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason=f"headless browser test needs {CHROMIUM} and {CHROMEDRIVER} (not installed here)")

# (screenshot name, url path, run or None for the sidebar's default, extra query params, CSS selectors that
# must appear once the page is idle)
PLOT = '[data-testid="stPlotlyChart"] .main-svg'
TABLE = '[data-testid="stDataFrame"]'
PAGES = [
    ("overview", "overview", "mmoe-collapsing", {}, [PLOT, TABLE]),
    ("routing_explorer", "routing_explorer", "mmoe-reference-gate", {"example": "1"}, [PLOT, TABLE]),
    ("routing_explorer_patches", "routing_explorer", "mmoe-balanced",
     {"example": "1", "layer": "image_intra", "call": "mention"}, [PLOT, TABLE]),
    ("utilization", "utilization", "mmoe-collapsing", {}, [PLOT, TABLE]),
    ("dynamics", "dynamics", "mmoe-collapsing", {}, [PLOT]),
    ("dynamics_moemoe", "dynamics", "moemoe-qa", {}, [PLOT]),  # the training schedule's phase lines
    ("compare", "compare", "mmoe-balanced", {"compare": "mmoe-collapsing"}, [PLOT, TABLE]),
    ("export", "export", "mmoe-balanced", {}, ['[data-testid="stIFrame"]']),
    ("source_weights", "source_weights", "moemoe-qa", {}, [PLOT]),
    ("attributions", "attributions", "mmoe-balanced", {}, []),
    ("embedding_map", "embedding_map", "mmoe-balanced", {}, []),
    ("playground", "playground", "mmoe-balanced", {}, []),
    ("dataset_browser", "dataset_browser", None, {}, [TABLE]),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(runs_root):  # noqa: F811
    port = _free_port()
    env = {**os.environ, "MOESCOPE_ARTIFACTS": str(runs_root), "PYTHONPATH": str(REPO)}
    log = tempfile.NamedTemporaryFile(prefix="moescope-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"streamlit exited with {proc.returncode}: {Path(log.name).read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"streamlit did not become healthy in {SERVER_TIMEOUT:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        log.close()


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="moescope-chromium-")
    height = int(os.environ.get("MOESCOPE_SCREENSHOT_HEIGHT", "1000"))
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={profile}", f"--window-size=1400,{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait_idle(driver, expected: list[str], timeout: float) -> tuple[float, list[str]]:
    """Wait until the page title is drawn, no run indicator / skeleton / spinner has shown for QUIET_S,
    and every ``expected`` selector is present. Returns (seconds waited, selectors still missing)."""
    from selenium.webdriver.common.by import By

    busy = ('[data-testid="stStatusWidget"], [data-testid="stAppSkeleton"], [data-testid="stSkeleton"], '
            '[data-testid="stSpinner"]')
    failed = '[data-testid="stException"], [data-testid="stAlertContentError"]'
    start = time.monotonic()
    quiet_since = None
    missing = list(expected)
    while time.monotonic() - start < timeout:
        has_title = bool(driver.find_elements(By.CSS_SELECTOR, '[data-testid="stMain"] h1'))
        running = bool(driver.find_elements(By.CSS_SELECTOR, busy))
        missing = [sel for sel in expected if not driver.find_elements(By.CSS_SELECTOR, sel)]
        broken = bool(driver.find_elements(By.CSS_SELECTOR, failed))  # a failed page stops the wait early
        if not running and ((has_title and not missing) or broken):
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= QUIET_S:
                return quiet_since - start, missing
        else:
            quiet_since = None
        time.sleep(0.25)
    if not driver.find_elements(By.CSS_SELECTOR, '[data-testid="stMain"] h1'):
        missing = ["page title (h1)", *missing]
    return time.monotonic() - start, missing


def test_every_page_renders_in_the_browser(server, browser, runs_root):  # noqa: F811
    from selenium.webdriver.common.by import By

    from analysis.store import list_runs

    runs = list_runs(runs_root)
    SHOTS.mkdir(parents=True, exist_ok=True)
    problems, timings = [], {}
    for name, path, run, params, expected in PAGES:
        query = dict(params)
        if run is not None:
            query["run"] = run if run in runs else runs[0]
        url = f"{server}/{path}" + (f"?{urlencode(query)}" if query else "")
        browser.get(url)
        waited, missing = _wait_idle(browser, expected, PAGE_TIMEOUT)
        timings[name] = round(waited, 2)
        browser.save_screenshot(str(SHOTS / f"{name}.png"))
        if missing:
            problems.append(f"{name}: still missing after {PAGE_TIMEOUT:.0f} s: {missing}")
        for box in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]'):
            problems.append(f"{name}: exception box: {box.text[:600]}")
        for box in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stAlertContentError"]'):
            problems.append(f"{name}: error alert: {box.text[:600]}")
    (REPO / "test-output" / "browser_timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    assert not problems, "\n".join(problems)


def test_example_row_opens_the_routing_explorer(server, browser, runs_root):  # noqa: F811
    """Selecting an example row on the overview opens that example in the routing explorer (?example=)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    examples = '.st-key-overview_examples_mmoe-balanced [data-testid="stDataFrame"]'  # the element's key class
    browser.get(f"{server}/overview?run=mmoe-balanced")
    _, missing = _wait_idle(browser, [TABLE, examples], PAGE_TIMEOUT)
    assert not missing, missing
    table = browser.find_element(By.CSS_SELECTOR, examples)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", table)
    time.sleep(0.5)
    # The row-selection checkbox column is the grid's first column; the third data row sits below the header.
    height = table.size["height"]
    for _ in range(3):  # the grid can take a moment to accept clicks after it is drawn
        ActionChains(browser).move_to_element_with_offset(table, -table.size["width"] // 2 + 14,
                                                          -height // 2 + 35 * 3 + 17).click().perform()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "routing_explorer" not in browser.current_url:
            time.sleep(0.25)
        if "routing_explorer" in browser.current_url:
            break
    assert "routing_explorer" in browser.current_url and "example=" in browser.current_url, browser.current_url
    _, missing = _wait_idle(browser, [PLOT, TABLE], PAGE_TIMEOUT)
    browser.save_screenshot(str(SHOTS / "overview_row_to_explorer.png"))
    assert not missing, missing
    assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
