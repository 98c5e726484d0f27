"""Headless-browser test: the real Streamlit server, every page in Chromium, no exception boxes or error
alerts, one screenshot per page under ``test-output/screenshots/<page>.png`` (git-ignored), and no request
to a host other than this machine (Chrome's performance log; the page icon is an inline emoji, not a
fetched icon font). Also: the playground's first paint (stored results before the live model), crafted
URL parameters shown as text, and a picture at the upload limit settling without a browser error.
Time to first paint and to idle per page go to ``test-output/browser_timings.json`` (never asserted).

Needs /usr/bin/chromium and /usr/bin/chromedriver (skipped, saying so, when either is absent) and selenium.
The server runs ``python -m streamlit run serve.py`` (what ``make serve`` runs) on a free port with
MOESCOPE_ARTIFACTS pointing at the tiny demo runs (the ``runs_root`` fixture of tests/test_pages_apptest.py:
conftest's ``demo_artifacts`` when present). Every wait is bounded; the server is stopped at the end.
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
    reason=f"headless browser test needs {CHROMIUM} and {CHROMEDRIVER} (not installed here)",
)

# (screenshot name, url path, run or None for the sidebar's default, extra query params, CSS selectors that
# must appear once the page is idle)
PLOT = '[data-testid="stPlotlyChart"] .main-svg'
TABLE = '[data-testid="stDataFrame"]'
PAGES = [
    ("overview", "", "mmoe-collapsing", {}, [PLOT, TABLE]),  # the default page's URL is "/"
    ("routing_explorer", "routing_explorer", "mmoe-reference-gate", {"example": "1"}, [PLOT, TABLE]),
    (
        "routing_explorer_patches",
        "routing_explorer",
        "mmoe-balanced",
        {"example": "1", "layer": "image_intra", "call": "mention"},
        [PLOT, TABLE],
    ),
    ("utilization", "utilization", "mmoe-collapsing", {}, [PLOT, TABLE]),
    ("dynamics", "dynamics", "mmoe-collapsing", {}, [PLOT]),
    ("dynamics_moemoe", "dynamics", "moemoe-qa", {}, [PLOT]),  # the training schedule's phase lines
    ("compare", "compare", "mmoe-balanced", {"compare": "mmoe-collapsing"}, [PLOT, TABLE]),
    ("export", "export", "mmoe-balanced", {}, ['[data-testid="stIFrame"]']),
    ("source_weights", "source_weights", "moemoe-qa", {}, [PLOT]),
    ("attributions", "attributions", "mmoe-balanced", {}, []),
    ("embedding_map", "embedding_map", "mmoe-balanced", {}, []),
    ("playground", "playground", "mmoe-balanced", {}, ['[data-testid="stMetric"]']),  # the live results
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
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            "serve.py",
            "--server.headless",
            "true",
            "--server.port",
            str(port),
            "--server.address",
            "127.0.0.1",
            "--browser.gatherUsageStats",
            "false",
            "--server.fileWatcherType",
            "none",
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
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
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        f"--window-size=1400,{height}",
    ):
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

    busy = (
        '[data-testid="stStatusWidget"], [data-testid="stAppSkeleton"], [data-testid="stSkeleton"], '
        '[data-testid="stSpinner"]'
    )
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


LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}
TIMINGS = REPO / "test-output" / "browser_timings.json"


def _record_timings(new: dict) -> None:
    """Merge ``new`` into test-output/browser_timings.json (reported, never asserted)."""
    try:
        old = json.loads(TIMINGS.read_text())
    except (OSError, ValueError):
        old = {}
    TIMINGS.parent.mkdir(parents=True, exist_ok=True)
    TIMINGS.write_text(json.dumps({**old, **new}, indent=2, sort_keys=True) + "\n")


def _outside_requests(driver) -> list[str]:
    """URLs of every request since the last call that went to a host other than this machine (from
    Chrome's performance log: documents, scripts, fonts, images, icons, XHR and websockets alike)."""
    from urllib.parse import urlparse

    urls = []
    for entry in driver.get_log("performance"):
        try:
            message = json.loads(entry["message"])["message"]
        except (KeyError, ValueError):
            continue
        if message.get("method") not in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            continue
        params = message.get("params", {})
        url = params.get("request", {}).get("url") or params.get("url") or ""
        parsed = urlparse(url)
        if parsed.scheme in ("data", "blob", "about", "chrome", "chrome-extension", ""):
            continue
        if (parsed.hostname or "") not in LOCAL_HOSTS:
            urls.append(url)
    return urls


def _icon_links(driver) -> list[str]:
    return (
        driver.execute_script("return Array.from(document.querySelectorAll('link[rel*=icon]')).map(l => l.href)") or []
    )


def _first_paint(driver, url: str, timeout: float = PAGE_TIMEOUT) -> float | None:
    """Load ``url`` and return the seconds until the page's title (``stMain h1``) is in the DOM."""
    from selenium.webdriver.common.by import By

    start = time.monotonic()
    driver.get(url)
    while time.monotonic() - start < timeout:
        if driver.find_elements(By.CSS_SELECTOR, '[data-testid="stMain"] h1'):
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def _severe_logs(driver) -> list[str]:
    return [e["message"][:400] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def test_playground_first_paint_shows_stored_results_before_the_live_model(server, browser):  # noqa: F811
    """A first visit to the playground paints the inputs and the stored prediction of the base example at
    once, then the live results arrive (the model loads after the first paint). Screenshots of both."""
    from selenium.webdriver.common.by import By

    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.get("about:blank")
    first = _first_paint(browser, f"{server}/playground?run=mmoe-balanced")
    assert first is not None, "the playground drew no title"
    deadline = time.monotonic() + PAGE_TIMEOUT
    stored = None
    while time.monotonic() < deadline and stored is None:
        hits = [
            e
            for e in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stCaptionContainer"]')
            if e.text.startswith("Stored prediction of the base example")
        ]
        stored = time.monotonic() if hits else None
        time.sleep(0.05)
    assert stored is not None, "the stored prediction of the base example is not shown"
    browser.save_screenshot(str(SHOTS / "playground_first_paint.png"))
    waited, missing = _wait_idle(browser, ['[data-testid="stMetric"]', PLOT], PAGE_TIMEOUT)
    browser.save_screenshot(str(SHOTS / "playground_live.png"))
    assert not missing, f"the live results did not arrive: {missing}"
    metrics = " ".join(e.text for e in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stMetric"]'))
    assert "gold rank" in metrics
    assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
    _record_timings(
        {"playground first paint (title)": round(first, 2), "playground live results settled": round(waited + first, 2)}
    )


def test_every_page_renders_in_the_browser(server, browser, runs_root):  # noqa: F811
    from selenium.webdriver.common.by import By

    from analysis.store import list_runs

    runs = list_runs(runs_root)
    SHOTS.mkdir(parents=True, exist_ok=True)
    problems, timings = [], {}
    browser.get_log("performance")
    for name, path, run, params, expected in PAGES:
        query = dict(params)
        if run is not None:
            query["run"] = run if run in runs else runs[0]
        url = f"{server}/{path}" + (f"?{urlencode(query)}" if query else "")
        browser.get("about:blank")
        first = _first_paint(browser, url)
        waited, missing = _wait_idle(browser, expected, PAGE_TIMEOUT)
        timings[name] = round(waited, 2)
        timings[f"{name} first paint"] = None if first is None else round(first, 2)
        browser.save_screenshot(str(SHOTS / f"{name}.png"))
        if missing:
            problems.append(f"{name}: still missing after {PAGE_TIMEOUT:.0f} s: {missing}")
        for box in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]'):
            problems.append(f"{name}: exception box: {box.text[:600]}")
        for box in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stAlertContentError"]'):
            problems.append(f"{name}: error alert: {box.text[:600]}")
        if "Page not found" in browser.find_element(By.TAG_NAME, "body").text:  # Streamlit's dialog for a bad URL
            problems.append(f"{name}: {url} is not a page of the app (Streamlit's 'Page not found')")
        problems += [f"{name}: request off this machine: {u}" for u in _outside_requests(browser)]
        problems += [
            f"{name}: page icon not inline or local: {h}"
            for h in _icon_links(browser)
            if not (h.startswith("data:") or h.startswith(server))
        ]
    _record_timings(timings)
    assert not problems, "\n".join(problems)


CRAFTED_RUN = "x` [a live link](http://evil.example/a) **bold** ![remote](http://evil.example/i.png)"


def test_crafted_url_params_show_as_text(server, browser):  # noqa: F811
    """?run= with Markdown renders no link, bold text or image inside the warning (and fetches nothing);
    ?example=² on the playground, attributions and source-weights pages is a warning, not a traceback."""
    from selenium.webdriver.common.by import By

    browser.get("about:blank")
    browser.get_log("performance")
    browser.get(f"{server}/?{urlencode({'run': CRAFTED_RUN})}")
    _, missing = _wait_idle(browser, ['[data-testid="stAlertContentWarning"]'], PAGE_TIMEOUT)
    assert not missing, missing
    alert = next(
        a
        for a in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stAlertContentWarning"]')
        if "The link asks for run" in a.text
    )
    assert not alert.find_elements(By.CSS_SELECTOR, "a, img, strong, b, em"), alert.get_attribute("innerHTML")
    codes = [c.text for c in alert.find_elements(By.CSS_SELECTOR, "code")]
    assert CRAFTED_RUN[:80] in codes, codes  # cut at 80 characters (pages.state.LITERAL_CHARS)
    assert not _outside_requests(browser)
    for path, run in (
        ("playground", "mmoe-balanced"),
        ("attributions", "mmoe-balanced"),
        ("source_weights", "moemoe-qa"),
    ):
        browser.get("about:blank")
        query = urlencode({"run": run, "example": "\u00b2"})
        browser.get(f"{server}/{path}?{query}")
        _, missing = _wait_idle(browser, ['[data-testid="stAlertContentWarning"]'], PAGE_TIMEOUT)
        assert not missing, f"{path}: {missing}"
        texts = [a.text for a in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stAlertContentWarning"]')]
        assert any("The link asks for example" in t and "\u00b2" in t for t in texts), (path, texts)
        assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]'), path


def test_a_picture_at_the_upload_limit_settles_without_a_browser_error(server, browser, tmp_path):  # noqa: F811
    """A 5000 x 5000 PNG (legal: 25 megapixels, under 5 MB) on the playground: the page settles showing it,
    with no "RangeError: Invalid string length" (the attribution chart used to embed the whole picture)
    and no error box. The time it takes goes to browser_timings.json."""
    from PIL import Image
    from selenium.webdriver.common.by import By

    picture = tmp_path / "big-5000x5000.png"
    image = Image.new("RGB", (5000, 5000), (235, 235, 240))
    image.paste((200, 30, 30), (1000, 1000, 4000, 4000))
    image.save(picture)
    browser.get("about:blank")
    browser.get(f"{server}/playground?run=mmoe-balanced")
    _, missing = _wait_idle(browser, ['[data-testid="stMetric"]'], PAGE_TIMEOUT)
    assert not missing, missing
    radio = next(
        e
        for e in browser.find_elements(By.CSS_SELECTOR, '[data-testid="stRadio"] label')
        if "upload a picture" in e.text
    )
    radio.click()
    _, missing = _wait_idle(browser, ['input[type="file"]'], PAGE_TIMEOUT)
    assert not missing, missing
    _severe_logs(browser)  # drop what came before
    start = time.monotonic()
    browser.find_element(By.CSS_SELECTOR, 'input[type="file"]').send_keys(str(picture))
    deadline = time.monotonic() + PAGE_TIMEOUT
    while (
        time.monotonic() < deadline
        and "5000 x 5000 pixels" not in browser.find_element(By.CSS_SELECTOR, '[data-testid="stMain"]').text
    ):
        time.sleep(0.1)
    waited, missing = _wait_idle(browser, ['[data-testid="stMetric"]', PLOT], PAGE_TIMEOUT)
    settled = time.monotonic() - start
    browser.save_screenshot(str(SHOTS / "playground_upload_5000.png"))
    assert "5000 x 5000 pixels" in browser.find_element(By.CSS_SELECTOR, '[data-testid="stMain"]').text
    assert not missing, missing
    errors = _severe_logs(browser)
    assert not [e for e in errors if "RangeError" in e or "Invalid string length" in e], errors
    boxes = browser.find_elements(By.CSS_SELECTOR, '[data-testid="stException"], [data-testid="stAlertContentError"]')
    assert not boxes, [b.text[:300] for b in boxes]
    _record_timings({"playground upload 5000x5000 settled": round(settled, 2)})


def test_example_row_opens_the_routing_explorer(server, browser, runs_root):  # noqa: F811
    """Selecting an example row on the overview opens that example in the routing explorer (?example=)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    examples = '.st-key-overview_examples_mmoe-balanced [data-testid="stDataFrame"]'  # the element's key class
    browser.get(f"{server}/?run=mmoe-balanced")
    _, missing = _wait_idle(browser, [TABLE, examples], PAGE_TIMEOUT)
    assert not missing, missing
    table = browser.find_element(By.CSS_SELECTOR, examples)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", table)
    time.sleep(0.5)
    # The row-selection checkbox column is the grid's first column; the third data row sits below the header.
    height = table.size["height"]
    for _ in range(3):  # the grid can take a moment to accept clicks after it is drawn
        ActionChains(browser).move_to_element_with_offset(
            table, -table.size["width"] // 2 + 14, -height // 2 + 35 * 3 + 17
        ).click().perform()
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
