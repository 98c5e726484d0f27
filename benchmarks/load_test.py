"""Load test of the live playground: N concurrent headless Chromium sessions for D seconds, one server.

It starts its own server (``streamlit run app.py`` on a free loopback port, ``MOESCOPE_ARTIFACTS`` set to
``--artifacts``; benchmarks/page_paint.py's ``Server``, browser and settle wait are reused) and stops it at
the end. Each session opens the playground of ``--run`` at a random example, then for ``--seconds``
(counted from the end of that first load, which counts as an interaction too) repeats a random
interaction, each rerunning the live model:

* ``example``: pick another base example in the select box;
* ``text``: replace one editable text with a few words (Enter, or Ctrl+Enter in a text area);
* ``knockout``: pick another layer in the knockout select box (none or a routed layer);
* ``reload``: open the page afresh at a random example from the URL (``?example=N``), as a link would.

Each is checked once settled (the select box shows the new choice, the field holds the words typed).
An interaction's latency runs from the action until the page has settled (no running indicator for
1.5 s, the live results on screen). Errors: exception boxes (Streamlit's ``stException``), error alerts,
page loads that never paint, interactions that never settle, and uncaught script errors in the browser
console (e.g. ``RangeError``). A widget the harness could not find or drive is a *harness* error, counted
apart (the session reloads the page). The server's resident memory (psutil: the server and its children)
is sampled every 0.5 s.

    python benchmarks/load_test.py --sessions 8 --seconds 120 --artifacts DIR [--run RUN] [--json OUT]

Prints a JSON summary, then the same as a Markdown table. Needs /usr/bin/chromium and
/usr/bin/chromedriver (Debian's chromium, chromium-driver), selenium and psutil. Numbers are reported,
never asserted.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode

from _common import REPO, command_line, load_average
from page_paint import BUSY, Server, browser, wait_settled

LIVE = '[data-testid="stMetric"]'  # the live results
EXCEPTION = '[data-testid="stException"]'
ERROR_ALERT = '[data-testid="stAlertContentError"]'
TEXT_FIELDS = '[data-testid="stMain"] [data-testid="stTextInput"] input, [data-testid="stMain"] textarea'
SAMPLE_EVERY_S = 0.5
RERUN_START_S = 15.0  # how long to wait for an action's rerun to start before waiting for the page to settle
WORDS = "red square striped cat river tower blue small old bright glass stone city bird music field".split()
ACTIONS = ("example", "text", "knockout", "reload")


# ------------------------------------------------------------------------------------------------ memory


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its children (0 once it has gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class MemorySampler(threading.Thread):
    """Samples :func:`tree_rss` of the server every ``SAMPLE_EVERY_S`` until stopped; keeps start, peak, last."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.stop = threading.Event()
        self.start_bytes = tree_rss(pid)
        self.peak = self.last = self.start_bytes
        self.samples = 0

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_EVERY_S):
            self.last = tree_rss(self.pid)
            self.peak = max(self.peak, self.last)
            self.samples += 1


# ------------------------------------------------------------------------------------------------ sessions


class HarnessError(RuntimeError):
    """The harness could not find or drive a widget (not the app's failure)."""


class PageLoadError(RuntimeError):
    """The browser could not load the page (the server refused, reset or timed out): the app's failure."""


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (linear between closest ranks); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class Session(threading.Thread):
    """One browser on the playground: a first page load, then interactions for ``seconds``."""

    def __init__(self, number: int, url: str, run: str, examples: list[int], seconds: float, timeout: float):
        super().__init__(daemon=True)
        self.number = number
        self.url, self.run_name, self.examples = url, run, examples
        self.seconds, self.timeout = seconds, timeout
        self.rng = random.Random(number)
        self.records: list[dict] = []
        self.driver = None

    # -- the page
    def _find(self, selector: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, selector)

    def _combobox(self, label: str):
        found = self._find(f'[data-testid="stMain"] [data-testid="stSelectbox"] input[aria-label="{label}"]')
        if not found:
            raise HarnessError(f"no select box labelled {label!r}")
        return found[0]

    def _choose(self, label: str) -> Callable[[], None]:
        """Open the select box, click another option than the one shown; returns the check that it took."""
        box = self._combobox(label)
        before = box.get_attribute("value")
        box.click()
        deadline = time.monotonic() + 10
        options = []
        while time.monotonic() < deadline and not options:
            options = [o for o in self._find('[role="option"]') if o.get_attribute("aria-selected") != "true"]
            time.sleep(0.1)
        if not options:
            raise HarnessError(f"the select box {label!r} opened no other option")
        self.rng.choice(options).click()

        def check() -> None:
            if self._combobox(label).get_attribute("value") == before:
                raise HarnessError(f"the select box {label!r} still shows {before!r}")

        return check

    def _type(self) -> Callable[[], None]:
        """Replace one editable text with a few words and commit it; returns the check that it took."""
        from selenium.webdriver.common.keys import Keys

        fields = self._find(TEXT_FIELDS)
        if not fields:
            raise HarnessError("no editable text field on the playground")
        index = self.rng.randrange(len(fields))
        field = fields[index]
        words = " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(2, 6)))
        field.click()
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(words)
        if field.tag_name == "textarea":  # a text area applies on Ctrl+Enter, a text input on Enter
            field.send_keys(Keys.CONTROL, Keys.ENTER)
        else:
            field.send_keys(Keys.ENTER)

        def check() -> None:
            now = self._find(TEXT_FIELDS)
            value = now[index].get_attribute("value") if index < len(now) else None
            if not value or not words.startswith(value):  # cut at max_chars is fine
                raise HarnessError(f"the text field holds {value!r}, not the words typed")

        return check

    def _settle(self, start: float, rerun: bool) -> tuple[float | None, str | None]:
        """(latency, failure) after an action: wait for the rerun to start (``rerun``), then to settle."""
        if rerun:
            deadline = time.monotonic() + RERUN_START_S
            while time.monotonic() < deadline and not self._find(BUSY):
                time.sleep(0.05)
        first, settled = wait_settled(self.driver, start, timeout=self.timeout, must=lambda: bool(self._find(LIVE)))
        if first is None:
            return None, "page_load"
        if settled is None:
            return None, "timeout"
        return settled, None

    def _page_errors(self) -> list[tuple[str, str]]:
        found = [("exception", e.text[:300]) for e in self._find(EXCEPTION)]
        found += [("error_alert", e.text[:300]) for e in self._find(ERROR_ALERT)]
        for entry in self.driver.get_log("browser"):
            message = entry.get("message", "")
            if entry.get("level") == "SEVERE" and ("Uncaught" in message or "RangeError" in message):
                found.append(("browser_console", message[:300]))
        return found

    # -- the interactions
    def load(self) -> None:
        from selenium.common.exceptions import WebDriverException

        query = {"run": self.run_name, "example": str(self.rng.choice(self.examples))}
        try:
            self.driver.get(f"{self.url}/playground?{urlencode(query)}")
        except WebDriverException as exc:
            raise PageLoadError(str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__) from exc

    def act(self, action: str) -> Callable[[], None] | None:
        """Do ``action``; returns the check that it took (None for a reload, which navigates instead)."""
        if action == "reload":
            self.load()
            return None
        if action == "example":
            return self._choose("Base example")
        if action == "knockout":
            return self._choose("Layer")
        return self._type()

    def interaction(self, action: str) -> None:
        self.driver.get_log("browser")  # what came before belongs to the previous interaction
        start = time.monotonic()
        record = {"session": self.number, "action": action, "latency_s": None, "errors": []}
        try:
            check = self.act(action)
            record["latency_s"], failure = self._settle(start, rerun=check is not None)
            if failure:
                record["errors"].append((failure, f"{action}: not settled in {self.timeout:.0f} s"))
            record["errors"] += self._page_errors()
            if check is not None and not failure:
                check()
        except PageLoadError as exc:
            record["errors"].append(("page_load", str(exc)))
        except HarnessError as exc:
            record["harness"], record["latency_s"] = str(exc), None  # the action did not take: no latency
        except Exception as exc:  # a driver failure (page gone, element stale): the harness's, reported apart
            record["harness"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        self.records.append(record)
        latency = "-" if record["latency_s"] is None else f"{record['latency_s']:.2f} s"
        problems = [kind for kind, _ in record["errors"]] + (
            ["harness: " + record["harness"]] if "harness" in record else []
        )
        print(f"[session {self.number}] {action}: {latency} {' '.join(problems)}".rstrip(), file=sys.stderr, flush=True)
        if "harness" in record or record["errors"]:
            self._recover()

    def _recover(self) -> None:
        try:
            self.load()
            wait_settled(self.driver, time.monotonic(), timeout=self.timeout, must=lambda: bool(self._find(LIVE)))
        except Exception:
            pass

    def run(self) -> None:
        try:
            self.driver = browser()
        except Exception as exc:
            self.records.append({"session": self.number, "action": "start", "harness": f"browser: {exc}"[:300]})
            return
        try:
            self.interaction("reload")  # the first page load (the first session's loads the model)
            end = time.monotonic() + self.seconds  # the interactions' time starts once the page is up
            while time.monotonic() < end:
                self.interaction(self.rng.choice(ACTIONS))
        finally:
            profile = (self.driver.capabilities.get("chrome") or {}).get("userDataDir")
            try:
                self.driver.quit()
            except Exception:
                pass
            if profile and Path(profile).name.startswith("moescope-bench-chromium-"):  # browser()'s temp profile
                shutil.rmtree(profile, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ report


def summarize(records: list[dict], sampler: MemorySampler, args, wall_s: float, load_start) -> dict:
    done = [r for r in records if r["action"] != "start"]
    latencies = [r["latency_s"] for r in done if r.get("latency_s") is not None]
    errors = [e for r in done for e in r.get("errors", [])]
    by_action = {}
    for action in ACTIONS:
        lat = [r["latency_s"] for r in done if r["action"] == action and r.get("latency_s") is not None]
        by_action[action] = {
            "interactions": sum(r["action"] == action for r in done),
            "median_s": percentile(lat, 50),
            "p95_s": percentile(lat, 95),
        }
    mb = 1 / 2**20
    return {
        "command": command_line(),
        "run": args.run,
        "sessions": args.sessions,
        "seconds": args.seconds,
        "wall_s": round(wall_s, 1),
        "interactions": len(done),
        "errors": len(errors),
        "errors_by_kind": dict(Counter(kind for kind, _ in errors)),
        "error_samples": [f"{kind}: {text}" for kind, text in errors[:10]],
        "harness_errors": sum("harness" in r for r in records),
        "harness_samples": [r["harness"] for r in records if "harness" in r][:10],
        "latency_s": {
            "median": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
            "max": max(latencies) if latencies else None,
            "settled": len(latencies),
        },
        "by_action": by_action,
        "server_rss_mb": {
            "start": round(sampler.start_bytes * mb, 1),
            "peak": round(sampler.peak * mb, 1),
            "end": round(sampler.last * mb, 1),
            "samples": sampler.samples,
        },
        "load_avg_start": load_start,
        "load_avg_end": load_average(),
    }


def _s(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def markdown(s: dict) -> str:
    lat, rss = s["latency_s"], s["server_rss_mb"]
    lines = [
        "| sessions | seconds | interactions | errors | harness errors | median s | p95 s | server RSS start "
        "-> peak MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {s['sessions']} | {s['seconds']:g} | {s['interactions']} | {s['errors']} | {s['harness_errors']} | "
        f"{_s(lat['median'])} | {_s(lat['p95'])} | {rss['start']} -> {rss['peak']} |",
        "",
        "| action | interactions | median s | p95 s |",
        "|---|---:|---:|---:|",
    ]
    for action, a in s["by_action"].items():
        lines.append(f"| {action} | {a['interactions']} | {_s(a['median_s'])} | {_s(a['p95_s'])} |")
    if s["errors_by_kind"]:
        lines += ["", "Errors: " + ", ".join(f"{k} {v}" for k, v in s["errors_by_kind"].items())]
    lines.append(f"\nLoad average {s['load_avg_start']} at start, {s['load_avg_end']} at end.")
    return "\n".join(lines)


def examples_of(root: Path, run: str) -> list[int]:
    from analysis.store import RunStore

    with RunStore(run, root) as store:
        return [int(i) for i in store.table("examples", columns=["example_index"])["example_index"]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=8, help="concurrent browser sessions (default 8)")
    p.add_argument("--seconds", type=float, default=120.0, help="how long each session interacts (default 120)")
    p.add_argument("--artifacts", type=Path, required=True, help="artifacts root the server reads (built runs)")
    p.add_argument("--run", default="mmoe-balanced", help="the run whose playground is driven")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds an interaction may take to settle")
    p.add_argument("--stagger", type=float, default=1.0, help="seconds between session starts")
    p.add_argument("--json", type=Path, default=None, help="also write the summary and every interaction here")
    args = p.parse_args(argv)
    if args.sessions < 1 or args.seconds <= 0:
        p.error("--sessions must be at least 1 and --seconds positive")
    root = args.artifacts.resolve()
    try:
        examples = examples_of(root, args.run)
    except (OSError, ValueError) as exc:
        p.error(f"cannot read run {args.run!r} under {root}: {exc}")
    load_start = load_average()
    server = Server(REPO, root)
    sampler = MemorySampler(server.proc.pid)
    sampler.start()
    start = time.monotonic()
    try:
        sessions = []
        for n in range(args.sessions):
            sessions.append(Session(n, server.url, args.run, examples, args.seconds, args.timeout))
            sessions[-1].start()
            time.sleep(args.stagger)
        for s in sessions:
            s.join()
    finally:
        sampler.stop.set()
        sampler.join(timeout=5)
        server.stop()
    records = [r for s in sessions for r in s.records]
    summary = summarize(records, sampler, args, time.monotonic() - start, load_start)
    print(json.dumps(summary, indent=2))
    print()
    print(markdown(summary))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "interactions": records}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
