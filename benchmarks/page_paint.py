"""First paint of every page (AppTest and a real browser), and what one large upload costs the playground.

Three measurements, each against the app in ``--repo`` (default: this checkout) and the artifacts under
``--root`` (default: ``MOESCOPE_ARTIFACTS`` or artifacts/):

* ``apptest``: per page, a fresh Python process runs the app with ``AppTest`` the way
  tests/test_pages_apptest.py does (the app's first run, page caches cleared, then the page; the
  overview, the default page: a fresh session after a first one) and times the page's first script run.
  AppTest runs a page's script to its end, so this is the time to the *whole* first run: on the
  playground, the first paint (inputs, stored results) up to where the live run is scheduled.
* ``browser``: one Streamlit server (loopback) and headless Chromium; per page a fresh page load, timing
  *first paint* (the page's title, ``stMain h1``, is in the DOM) and *settled* (no running indicator,
  skeleton or spinner for 1.5 s, as tests/test_browser.py waits), and listing every request the browser
  made to a host that is not this machine (Chrome's performance log).
* ``uploads``: on the live playground of ``--upload-run``, upload a 5000x5000 PNG and a 4032x3024 JPEG
  (both legal: under 5 MB and 25 megapixels) through the real file input and time until the page has
  settled showing the upload; the server's RSS (psutil, the server process) before, at peak while
  settling and after, and any error the browser logged (e.g. ``RangeError: Invalid string length``).

    python benchmarks/page_paint.py [--repo DIR] [--root DIR] [--only apptest browser uploads]
                                    [--label after] [--json OUT] [--record]

Numbers are reported, never asserted: the tests check behaviour, this script records timings.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode, urlparse

from _common import REPO, command_line, load_average, machine, record

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TARGET_S = 2.0
QUIET_S = 1.5
PAGE_TIMEOUT = 180.0
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}

# app.py's default page: st.navigation serves it at "/", and "/overview" is Streamlit's "Page not found"
DEFAULT_PAGE = "overview"


def url_path(page: str) -> str:
    """The URL path of a page file's name (pages/<page>.py)."""
    return "" if page == DEFAULT_PAGE else page


# what must be on a page before it counts as settled (beside its title and no running indicator)
SETTLED_WHEN = {"playground": '[data-testid="stMetric"]'}  # the live results, not only the first paint

# (name, page file / url path, run, extra query params)
PAGES = [
    ("overview", "overview", "mmoe-balanced", {}),
    ("routing_explorer", "routing_explorer", "mmoe-balanced", {"example": "1"}),
    ("utilization", "utilization", "mmoe-collapsing", {}),
    ("dynamics", "dynamics", "mmoe-collapsing", {}),
    ("source_weights", "source_weights", "moemoe-qa", {}),
    ("attributions", "attributions", "mmoe-balanced", {}),
    ("embedding_map", "embedding_map", "mmoe-balanced", {}),
    ("playground", "playground", "mmoe-balanced", {}),
    ("compare", "compare", "mmoe-balanced", {"compare": "mmoe-collapsing"}),
    ("export", "export", "mmoe-balanced", {}),
    ("dataset_browser", "dataset_browser", None, {}),
]

_APPTEST = r"""
import json, sys, time
import streamlit as st
from streamlit.testing.v1 import AppTest
page, run, params = sys.argv[1], sys.argv[2] or None, json.loads(sys.argv[3])
def fresh():
    at = AppTest.from_file("app.py", default_timeout=600)
    if run:
        at.query_params["run"] = run
    for k, v in params.items():
        at.query_params[k] = v
    return at
at = fresh()
if page == "overview":  # the default page: a first run warms the interpreter, a fresh session is timed
    at.run()
    st.cache_data.clear(); st.cache_resource.clear()
    at = fresh()
    t = time.perf_counter(); at.run(); seconds = time.perf_counter() - t
else:
    at.run()
    st.cache_data.clear(); st.cache_resource.clear()
    at.switch_page(f"pages/{page}.py")
    t = time.perf_counter(); at.run(); seconds = time.perf_counter() - t
print("RESULT " + json.dumps({"seconds": seconds, "exceptions": [e.message for e in at.exception],
                              "errors": [str(e.value)[:200] for e in at.error]}))
"""


# ------------------------------------------------------------------------------------------------ AppTest


def apptest_page(repo: Path, root: Path, page: str, run: str | None, params: dict) -> dict:
    env = {**os.environ, "MOESCOPE_ARTIFACTS": str(root), "PYTHONPATH": str(repo)}
    done = subprocess.run(
        [sys.executable, "-c", _APPTEST, page, run or "", json.dumps(params)],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return {"seconds": None, "failed": (done.stderr or done.stdout)[-600:]}
    return json.loads(line[len("RESULT ") :])


def bench_apptest(repo: Path, root: Path, runs: list[str]) -> dict:
    out = {}
    for name, page, run, params in PAGES:
        if run is not None and run not in runs:
            continue
        result = apptest_page(repo, root, page, run, params)
        out[name] = result
        print(
            f"[apptest] {name}: {result.get('seconds') and round(result['seconds'], 2)} s"
            + (f" exceptions {result['exceptions']}" if result.get("exceptions") else ""),
            file=sys.stderr,
        )
    return out


# ------------------------------------------------------------------------------------------------ browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, repo: Path, root: Path):
        self.port = _free_port()
        env = {**os.environ, "MOESCOPE_ARTIFACTS": str(root), "PYTHONPATH": str(repo)}
        self.log = tempfile.NamedTemporaryFile(prefix="moescope-bench-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "streamlit",
                "run",
                # what `make serve` runs (serve.py warms the pages' imports); app.py in older checkouts
                "serve.py" if (repo / "serve.py").is_file() else "app.py",
                "--server.headless",
                "true",
                "--server.port",
                str(self.port),
                "--server.address",
                "127.0.0.1",
                "--browser.gatherUsageStats",
                "false",
                "--server.fileWatcherType",
                "none",
            ],
            cwd=repo,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"streamlit exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("streamlit did not become healthy")

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="moescope-bench-chromium-")
    options = Options()
    options.binary_location = CHROMIUM
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
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT)
    return driver


BUSY = (
    '[data-testid="stStatusWidget"], [data-testid="stAppSkeleton"], [data-testid="stSkeleton"], '
    '[data-testid="stSpinner"]'
)


def wait_settled(driver, start: float, timeout: float = PAGE_TIMEOUT, must=None) -> tuple[float | None, float | None]:
    """(first paint: seconds until the title is in the DOM, settled: seconds until nothing has run for QUIET_S
    and ``must()`` holds), both from ``start`` (time.monotonic())."""
    from selenium.webdriver.common.by import By

    first = None
    quiet_since = None
    while time.monotonic() - start < timeout:
        now = time.monotonic()
        if first is None and driver.find_elements(By.CSS_SELECTOR, '[data-testid="stMain"] h1'):
            first = now - start
        running = bool(driver.find_elements(By.CSS_SELECTOR, BUSY))
        ok = first is not None and not running and (must is None or must())
        if ok:
            quiet_since = quiet_since or now
            if now - quiet_since >= QUIET_S:
                return first, quiet_since - start
        else:
            quiet_since = None
        time.sleep(0.05)
    return first, None


def _present(driver, selector: str | None):
    from selenium.webdriver.common.by import By

    if selector is None:
        return None
    return lambda: bool(driver.find_elements(By.CSS_SELECTOR, selector))


def outside_requests(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        try:
            message = json.loads(entry["message"])["message"]
        except (KeyError, ValueError):
            continue
        if message.get("method") != "Network.requestWillBeSent":
            continue
        url = message["params"]["request"]["url"]
        parsed = urlparse(url)
        if parsed.scheme in ("data", "blob", "about", "chrome", "chrome-extension"):
            continue
        if (parsed.hostname or "") not in LOCAL_HOSTS:
            urls.append(url)
    return urls


def bench_browser(repo: Path, root: Path, runs: list[str]) -> dict:
    server = Server(repo, root)
    driver = browser()
    out = {}
    try:
        for name, page, run, params in PAGES:
            if run is not None and run not in runs:
                continue
            query = {**({"run": run} if run else {}), **params}
            url = f"{server.url}/{url_path(page)}" + (f"?{urlencode(query)}" if query else "")
            driver.get("about:blank")
            driver.get_log("performance")
            start = time.monotonic()
            driver.get(url)
            first, settled = wait_settled(driver, start, must=_present(driver, SETTLED_WHEN.get(name)))
            out[name] = {
                "first_paint_s": first,
                "settled_s": settled,
                "outside_requests": outside_requests(driver),
                "rss_mb": round(server.rss_mb(), 1),
            }
            print(
                f"[browser] {name}: first paint {first and round(first, 2)} s, settled "
                f"{settled and round(settled, 2)} s, outside requests {len(out[name]['outside_requests'])}",
                file=sys.stderr,
            )
    finally:
        driver.quit()
        server.stop()
    return out


# ------------------------------------------------------------------------------------------------ uploads


def make_uploads(folder: Path) -> dict[str, Path]:
    """A 5000x5000 PNG (simple shapes: compresses to well under 1 MB) and a 4032x3024 JPEG (a phone-size
    photo-like picture: gradients and noise, about 2-4 MB)."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    png = folder / "big-5000x5000.png"
    if not png.exists():
        img = Image.new("RGB", (5000, 5000), (235, 235, 240))
        d = ImageDraw.Draw(img)
        d.ellipse((900, 900, 4100, 4100), fill=(200, 30, 30))
        d.rectangle((2000, 300, 3000, 4700), fill=(30, 30, 200))
        img.save(png, optimize=True)
    jpg = folder / "photo-4032x3024.jpg"
    if not jpg.exists():
        rng = np.random.default_rng(0)
        y, x = np.mgrid[0:3024, 0:4032].astype(np.float32)
        base = np.stack([x / 4032 * 255, y / 3024 * 255, (x + y) / 7056 * 255], axis=-1)
        noise = rng.normal(0, 18, size=base.shape).astype(np.float32)
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(jpg, quality=85)
    return {"png 5000x5000": png, "jpeg 4032x3024": jpg}


def _sample_rss(server: Server, stop: threading.Event, peak: list[float]) -> None:
    while not stop.is_set():
        try:
            peak[0] = max(peak[0], server.rss_mb())
        except Exception:
            return
        time.sleep(0.1)


def upload_once(repo: Path, root: Path, run: str, path: Path) -> dict:
    """A fresh server and browser: open the playground, let it settle, pick "upload a picture", send the file,
    time until the page settles showing it; RSS before, peak and after; the browser's errors."""
    from selenium.webdriver.common.by import By

    server = Server(repo, root)
    driver = browser()
    try:
        start = time.monotonic()
        driver.get(f"{server.url}/playground?{urlencode({'run': run})}")
        _, settled = wait_settled(driver, start, must=_present(driver, SETTLED_WHEN["playground"]))
        time.sleep(2)
        rss_before = server.rss_mb()
        radio = next(
            e
            for e in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stRadio"] label')
            if "upload a picture" in e.text
        )
        radio.click()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not driver.find_elements(By.CSS_SELECTOR, 'input[type="file"]'):
            time.sleep(0.1)
        wait_settled(driver, time.monotonic())
        driver.get_log("browser")
        file_input = driver.find_element(By.CSS_SELECTOR, 'input[type="file"]')
        peak, stop = [rss_before], threading.Event()
        sampler = threading.Thread(target=_sample_rss, args=(server, stop, peak), daemon=True)
        sampler.start()
        start = time.monotonic()
        file_input.send_keys(str(path))
        busy_deadline = time.monotonic() + 30  # the file travels first; settling starts once the page runs
        while time.monotonic() < busy_deadline and not driver.find_elements(By.CSS_SELECTOR, BUSY):
            time.sleep(0.05)

        def shown() -> bool:  # the live results of the uploaded picture (its caption beside the prediction)
            captions = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stImageCaption"]')
            return any(f"uploaded: {path.name}" in c.text for c in captions) and bool(
                driver.find_elements(By.CSS_SELECTOR, '[data-testid="stMetric"]')
            )

        _, upload_settled = wait_settled(driver, start, timeout=300, must=shown)
        stop.set()
        sampler.join(timeout=2)
        rss_after = server.rss_mb()
        time.sleep(10)
        rss_later = server.rss_mb()
        errors = [e["message"][:300] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        alerts = [
            a.text[:300]
            for a in driver.find_elements(
                By.CSS_SELECTOR, '[data-testid="stException"], [data-testid="stAlertContentError"]'
            )
        ]
        # the reference: the same live rerun with the example's own picture again
        back = next(
            e
            for e in driver.find_elements(By.CSS_SELECTOR, '[data-testid="stRadio"] label')
            if "the example's picture" in e.text
        )
        start = time.monotonic()
        back.click()

        def own() -> bool:
            captions = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stImageCaption"]')
            return not any("uploaded:" in c.text for c in captions) and bool(
                driver.find_elements(By.CSS_SELECTOR, '[data-testid="stMetric"]')
            )

        busy_deadline = time.monotonic() + 30
        while time.monotonic() < busy_deadline and not driver.find_elements(By.CSS_SELECTOR, BUSY):
            time.sleep(0.05)
        _, reference = wait_settled(driver, start, timeout=300, must=own)
        return {
            "file": path.name,
            "bytes": path.stat().st_size,
            "page_settled_s": settled,
            "upload_settled_s": upload_settled,
            "own_picture_settled_s": reference,
            "rss_before_mb": round(rss_before, 1),
            "rss_peak_mb": round(peak[0], 1),
            "rss_after_mb": round(rss_after, 1),
            "rss_10s_later_mb": round(rss_later, 1),
            "browser_errors": errors,
            "error_boxes": alerts,
        }
    finally:
        driver.quit()
        server.stop()


def bench_uploads(repo: Path, root: Path, run: str) -> dict:
    files = make_uploads(Path(tempfile.gettempdir()) / "moescope-bench-uploads")
    out = {}
    for name, path in files.items():
        out[name] = upload_once(repo, root, run, path)
        r = out[name]
        print(
            f"[uploads] {name}: settled {r['upload_settled_s'] and round(r['upload_settled_s'], 2)} s, RSS "
            f"{r['rss_before_mb']} -> peak {r['rss_peak_mb']} -> {r['rss_after_mb']} MB "
            f"({r['rss_10s_later_mb']} MB 10 s later), browser errors {len(r['browser_errors'])}",
            file=sys.stderr,
        )
    return out


# ------------------------------------------------------------------------------------------------ report


def _s(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def markdown(results: dict) -> str:
    lines = []
    label = results.get("label") or ""
    if "apptest" in results or "browser" in results:
        lines += [
            f"**Per-page first paint{f' ({label})' if label else ''}** (target {TARGET_S:g} s)",
            "",
            "| page | AppTest first run s | browser first paint s | browser settled s | requests off this machine |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, *_ in PAGES:
            a = results.get("apptest", {}).get(name, {})
            b = results.get("browser", {}).get(name, {})
            if not a and not b:
                continue
            lines.append(
                f"| {name} | {_s(a.get('seconds'))} | {_s(b.get('first_paint_s'))} | "
                f"{_s(b.get('settled_s'))} | {len(b.get('outside_requests') or []) if b else '–'} |"
            )
        outside = sorted({u for b in results.get("browser", {}).values() for u in b.get("outside_requests") or []})
        if outside:
            lines += ["", "Requests to hosts off this machine: " + ", ".join(f"`{u}`" for u in outside[:8])]
        lines.append("")
    if "uploads" in results:
        lines += [
            f"**One upload on the live playground{f' ({label})' if label else ''}**",
            "",
            "| upload | bytes | settled s | same rerun, example's own picture s | server RSS before MB "
            "| peak MB | after MB | 10 s later MB | browser errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name, r in results["uploads"].items():
            found = {m.group(0) for e in r["browser_errors"] for m in [re.search(r"\w+Error: [\w ]+", e)] if m}
            errs = "; ".join(sorted(found)) or ("none" if not r["browser_errors"] else "other console errors")
            lines.append(
                f"| {name} | {r['bytes']:,} | {_s(r['upload_settled_s'])} | "
                f"{_s(r.get('own_picture_settled_s'))} | {r['rss_before_mb']} | "
                f"{r['rss_peak_mb']} | {r['rss_after_mb']} | {r['rss_10s_later_mb']} | {errs} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, default=REPO, help="the checkout whose app is measured")
    p.add_argument("--root", type=Path, default=None, help="artifacts root (default MOESCOPE_ARTIFACTS or artifacts/)")
    p.add_argument(
        "--only", nargs="+", choices=("apptest", "browser", "uploads"), default=["apptest", "browser", "uploads"]
    )
    p.add_argument("--upload-run", default="mmoe-balanced")
    p.add_argument("--label", default="", help="a word for the tables, e.g. before / after")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    p.add_argument("--record", action="store_true", help="append a section to BENCHMARKS.md")
    args = p.parse_args()
    root = (args.root or Path(os.environ.get("MOESCOPE_ARTIFACTS") or REPO / "artifacts")).resolve()
    repo = args.repo.resolve()
    runs = sorted(q.parent.name for q in (root / "runs").glob("*/manifest.json"))
    info = machine()
    results: dict = {"label": args.label, "repo": str(repo), "root": str(root), "load_avg_start": load_average()}
    if "apptest" in args.only:
        results["apptest"] = bench_apptest(repo, root, runs)
    if "browser" in args.only:
        results["browser"] = bench_browser(repo, root, runs)
    if "uploads" in args.only:
        results["uploads"] = bench_uploads(repo, root, args.upload_run)
    results["load_avg_end"] = load_average()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    body = markdown(results)
    print(body)
    if args.record:
        record("Page first paint and uploads (page_paint)", info, command_line(), body)


if __name__ == "__main__":
    main()
