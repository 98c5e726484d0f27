"""Run a snippet in a fresh interpreter (what a test checks must not be touched by what pytest imported)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def printed_lines(code: str) -> list[str]:
    """The lines ``code`` printed, run with ``python -c`` in the repository root; fails the test on an error."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()
