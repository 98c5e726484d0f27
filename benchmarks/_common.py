"""Shared helpers of the benchmark scripts: machine details and appending a section to BENCHMARKS.md."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

HEADER = (
    "# Benchmarks\n\n## Current results\n\n| target | measured | baseline, same run | ratio | date (UTC) "
    "| section |\n|---|---|---|---|---|---|\n\n## History\n\nDated sections, newest last.\n"
)


def load_average() -> str | None:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return None


def machine() -> dict:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": cores,
        "memory": mem,
        "load_avg_1_5_15": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "platform": platform.platform(),
    }


def command_line() -> str:
    return shlex.join(["python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


def record(
    title: str, info: dict, command: str, body: str, note: str | None = None, path: Path = REPO / "BENCHMARKS.md"
) -> None:
    """Append (never rewrite) a dated section to the history: machine, load average at start and end,
    command, body. The current-results table at the top of the file is updated by hand."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = [
        f"\n### {title} ({now})\n",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory']} RAM, device {info['device']}, "
        f"load average {info['load_avg_1_5_15']} at start and {load_average()} at end (shared machine); "
        f"Python {info['python']}, torch {info['torch']} ({info['torch_threads']} threads; "
        f"{info['platform']}).\n",
        f"Command: `{command}`\n",
    ]
    if note:
        section.append(f"Note: {note}\n")
    section.append(body.rstrip() + "\n")
    new = not path.exists()
    with open(path, "a") as f:
        if new:
            f.write(HEADER)
        f.write("\n".join(section))
