"""Full-page screenshots of chosen pages of a built artifacts root, for looking at (the browser test takes
its own of the tiny build; this one is for the default demo build's runs).

    python benchmarks/screenshots.py --root artifacts --out test-output/screenshots-default \\
        routing_explorer:hf-qwen3vl-qa:example=3 explanation_checks:mmoe-balanced

Each page is given as ``page:run[:key=value,...]`` (the URL's query parameters). It starts its own
loopback server (benchmarks/page_paint.py's ``Server`` and ``browser``), waits until the page has settled,
stretches the window to the page's height and saves ``<page>_<run>.png``; it prints each file with its
first-paint and settle times.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from urllib.parse import urlencode

from page_paint import REPO, Server, browser, url_path, wait_settled


def parse_page(spec: str) -> tuple[str, str, dict[str, str]]:
    """'page:run:a=1,b=2' -> (page, run, {"a": "1", "b": "2"})."""
    page, run, *rest = spec.split(":")
    params = dict(item.split("=", 1) for item in rest[0].split(",")) if rest and rest[0] else {}
    return page, run, params


def shoot(driver, url: str, path: Path) -> tuple[float | None, float | None]:
    started = time.monotonic()
    driver.get(url)
    first, settled = wait_settled(driver, started)
    height = driver.execute_script(
        "const m = document.querySelector('[data-testid=\"stMain\"]'); return m ? m.scrollHeight : 1000"
    )
    driver.set_window_size(1400, min(max(1000, int(height) + 200), 8000))
    time.sleep(1.0)  # charts re-lay out at the new size
    driver.save_screenshot(str(path))
    driver.set_window_size(1400, 1000)
    return first, settled


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pages", nargs="+", help="page:run[:key=value,...]")
    p.add_argument("--root", type=Path, required=True, help="artifacts root to serve")
    p.add_argument("--out", type=Path, default=REPO / "test-output" / "screenshots-default")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    server = Server(REPO, args.root.resolve())
    driver = browser()
    try:
        for spec in args.pages:
            page, run, params = parse_page(spec)
            url = f"{server.url}/{url_path(page)}?{urlencode({'run': run, **params})}"
            path = args.out / f"{page}_{run}.png"
            first, settled = shoot(driver, url, path)
            print(
                f"{path}: first paint {first if first is None else round(first, 2)} s, settled "
                f"{settled if settled is None else round(settled, 2)} s"
            )
    finally:
        driver.quit()
        server.stop()


if __name__ == "__main__":
    main()
