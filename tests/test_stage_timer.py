"""The stage timer precompute logs and stores its stages' wall time with."""

from __future__ import annotations

import pytest

from analysis.stage_timer import StageTimer


def fake_clock(ticks):
    values = iter(ticks)
    return lambda: next(values)


def test_stages_add_up_and_log_each_visit():
    logged = []
    timer = StageTimer(log=logged.append, clock=fake_clock([0.0, 1.5, 10.0, 10.25, 20.0, 23.0]))
    with timer("forward"):
        pass
    with timer("knockout"):
        pass
    with timer("forward"):
        pass
    assert timer.seconds == pytest.approx({"forward": 4.5, "knockout": 0.25})
    assert logged == ["forward: 1.5 s", "knockout: 0.2 s", "forward: 3.0 s"]
    assert timer.rounded(1) == {"forward": 4.5, "knockout": 0.2}


def test_a_failing_stage_is_still_timed_and_the_error_kept():
    timer = StageTimer(clock=fake_clock([0.0, 2.0]))
    with pytest.raises(ValueError, match="bad"):
        with timer("checks"):
            raise ValueError("bad")
    assert timer.seconds == {"checks": 2.0}
