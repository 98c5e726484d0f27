"""Wall time of a job's named stages: what precompute spends where, logged and stored with the run.

    timer = StageTimer(log=print)
    with timer("routing"):
        ...
    timer.seconds  # {"routing": 12.3}

A stage entered twice adds up. Written by hand: the profilers (cProfile, torch.profiler) time functions,
not a job's own stages, and slow the job they measure.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator


class StageTimer:
    def __init__(self, log: Callable[[str], None] | None = None, clock: Callable[[], float] = time.perf_counter):
        self.seconds: dict[str, float] = {}
        self._log = log
        self._clock = clock

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = self._clock()
        try:
            yield
        finally:
            spent = self._clock() - started
            self.seconds[stage] = self.seconds.get(stage, 0.0) + spent
            if self._log is not None:
                self._log(f"{stage}: {spent:.1f} s")

    def rounded(self, digits: int = 2) -> dict[str, float]:
        return {stage: round(s, digits) for stage, s in self.seconds.items()}
