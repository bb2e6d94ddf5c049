"""Scenario time: what every time the controller measures and reports is counted in.

Where the host cannot give a scenario's devices their speeds, the emulator runs the world
``k`` times slower (time dilation: each device gets its CPU share / k, links their rate / k
and their latency x k), and every time measured in wall seconds is ``k`` times what the
scenario's devices would take. ``ScenarioClock`` turns wall time into scenario time (wall
/ k) for measurements, and scenario durations into wall time for waits and timeouts. With
k = 1 both are the identity. The controller's own work (planning, the broker's round
trips) is not dilated: it shows k times cheaper in scenario time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class ScenarioClock:
    """Wall time over the run's time dilation ``dilation`` (k >= 1)."""

    dilation: float = 1.0

    def __post_init__(self) -> None:
        if not self.dilation >= 1.0:
            raise ValueError(f"time dilation must be at least 1, got {self.dilation}")

    def now(self) -> float:
        """Scenario seconds (monotonic): only differences mean anything."""
        return time.monotonic() / self.dilation

    def scenario_s(self, wall_s: float) -> float:
        """A wall-clock duration in scenario seconds."""
        return wall_s / self.dilation

    def wall_s(self, scenario_s: float) -> float:
        """A scenario duration (e.g. a timeout) in wall seconds."""
        return scenario_s * self.dilation
