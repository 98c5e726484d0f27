"""Checking untrusted model configs: sizes typed and in range, parameters and memory counted first.

A checkpoint's ``config.json`` decides how much memory building its model takes, so it is checked before
anything is allocated, in two steps:

1. every size against the limits its family's config module declares (:class:`Limit` tables checked by
   :func:`check_limits`; choices by :func:`check_choice`): a wrong type or an out-of-range value is
   refused naming the key, the value and the limit;
2. the model is built on PyTorch's ``meta`` device (shapes only, no storage) and its parameters and
   buffers are counted (:func:`meta_footprint`); :func:`check_footprint` refuses a model whose memory
   need exceeds the budget, with the numbers.

The budget is the memory available now (``MemAvailable``; on a CUDA device also its free memory), or
``$MOESCOPE_MAX_MODEL_BYTES`` when set. The need is the model's bytes times :data:`COPIES` for what is
being done: loading holds the model and the weights read from the file (2), training adds gradients and
two AdamW moments (4).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mmoe_core.errors import ConfigError

MAX_BYTES_ENV = "MOESCOPE_MAX_MODEL_BYTES"
COPIES = {"load": 2, "train": 4}


@dataclass(frozen=True)
class Limit:
    """A number a config may hold: its type (int or float), its inclusive range, and whether null is allowed."""

    lo: float
    hi: float
    kind: type = int
    optional: bool = False

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None if self.optional else "must be a number, not null"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be {'an integer' if self.kind is int else 'a number'}, not {type(value).__name__}"
        if self.kind is int and not isinstance(value, int):
            return "must be an integer"
        if not math.isfinite(value) or not self.lo <= value <= self.hi:
            return f"is out of range: allowed {_num(self.lo)} .. {_num(self.hi)}"
        return None


def _num(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


def check_limits(section: Mapping[str, Any], limits: Mapping[str, Limit], where: str) -> None:
    """ConfigError for the first key of ``section`` that ``limits`` lists and whose value breaks it."""
    for key, limit in limits.items():
        if key in section:
            problem = limit.problem(section[key])
            if problem:
                raise ConfigError(f"{where}: {key} = {section[key]!r} {problem}")


def check_choice(section: Mapping[str, Any], key: str, choices: Iterable[str], where: str) -> None:
    choices = tuple(choices)
    if key in section and section[key] not in choices:
        raise ConfigError(f"{where}: {key} = {section[key]!r} is not one of {', '.join(map(repr, choices))}")


def check_object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a JSON object, not {type(value).__name__}")
    return value


# ------------------------------------------------------------------------------------- footprint


@dataclass(frozen=True)
class Footprint:
    """What a model takes: parameter count and bytes of parameters and buffers (in their dtypes)."""

    parameters: int
    bytes: int

    def describe(self) -> str:
        return f"{self.parameters:,} parameters ({human_bytes(self.bytes)})"


def human_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def footprint_of(model) -> Footprint:
    params = list(model.parameters())
    buffers = list(model.buffers())
    return Footprint(sum(p.numel() for p in params), sum(t.numel() * t.element_size() for t in (*params, *buffers)))


def meta_footprint(build: Callable[[], Any]) -> tuple[Any, Footprint]:
    """(the model built on the meta device, its footprint): shapes only, nothing allocated."""
    import torch

    with torch.device("meta"):
        model = build()
    return model, footprint_of(model)


def available_memory(device: Any = None) -> tuple[int, str]:
    """(bytes the model may take, where that number comes from)."""
    override = os.environ.get(MAX_BYTES_ENV, "").strip()
    if override:
        return int(float(override)), f"the limit ${MAX_BYTES_ENV}"
    ram = _mem_available()
    if device is not None and str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            free, _total = torch.cuda.mem_get_info(torch.device(device))
            return int(free), f"the free memory of {device}"
    return ram, "the memory available on this machine"


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return 1 << 62  # no way to know: do not refuse on memory grounds


def check_footprint(footprint: Footprint, where: str, purpose: str = "load", device: Any = None) -> None:
    """ConfigError when ``purpose`` ("load" or "train") of this model needs more memory than the budget."""
    need = footprint.bytes * COPIES[purpose]
    budget, source = available_memory(device)
    if need > budget:
        verb = "train" if purpose == "train" else "load"
        raise ConfigError(
            f"{where} describes a model of {footprint.describe()}; to {verb} it needs about "
            f"{human_bytes(need)}, more than {source} ({human_bytes(budget)}). The config is damaged "
            f"or meant for a bigger machine: check its sizes, or raise ${MAX_BYTES_ENV} if it is right"
        )
