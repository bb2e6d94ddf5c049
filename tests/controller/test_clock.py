"""Scenario time: wall time over the run's time dilation, and back for timeouts."""

from __future__ import annotations

import time

import pytest

from edgepart.controller.clock import ScenarioClock


def test_scenario_time_is_wall_time_over_k() -> None:
    clock = ScenarioClock(2.5)
    assert clock.scenario_s(5.0) == 2.0
    assert clock.wall_s(2.0) == 5.0
    wall = time.monotonic()
    assert wall / 2.5 <= clock.now() <= time.monotonic() / 2.5


def test_no_dilation_is_the_wall_clock() -> None:
    clock = ScenarioClock()
    assert clock.scenario_s(1.25) == 1.25 and clock.wall_s(1.25) == 1.25


@pytest.mark.parametrize("k", [0.5, 0.0, -1.0, float("nan")])
def test_a_world_faster_than_the_scenario_is_refused(k: float) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ScenarioClock(k)
