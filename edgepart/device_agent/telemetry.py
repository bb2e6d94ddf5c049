"""What an agent measures for its telemetry besides its blocks and links: CPU use and probes.

``CpuMeter`` gives the fraction of the device's CPU share used between two readings (the
agent's process plus its burners). ``PeerProbes`` sends the data plane's latency probes to
a few peers per telemetry period, in turn, so a big testbed's probes do not eat a small
device's CPU; the answers come in later and the data plane keeps them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from edgepart.device_agent.dataplane import DataPlane
from edgepart.device_agent.runner import Spawn

#: latency probes per telemetry period (to that many peers in turn)
PROBES_PER_PERIOD = 4


class CpuMeter:
    """CPU used since the last reading, as a fraction (0..1) of the device's share."""

    def __init__(self, share: float | None) -> None:
        """A device of share cores (None: unpaced, counted against one core)."""
        self.share = share
        self._mark = (time.monotonic(), time.process_time())

    def used(self, extra_cpu_s: Callable[[], float]) -> float:
        """Fraction of the share used since the last call by this process plus the CPU
        seconds extra_cpu_s() reports (its burners)."""
        now = time.monotonic()
        cpu = time.process_time() + extra_cpu_s()
        last_wall, last_cpu = self._mark
        self._mark = (now, cpu)
        wall = now - last_wall
        if wall <= 0:
            return 0.0
        return max(0.0, min(1.0, (cpu - last_cpu) / (wall * (self.share or 1.0))))


class PeerProbes:
    """Latency probes to the next few peers whose endpoints are known, in turn."""

    def __init__(self, plane: DataPlane, spawn: Spawn) -> None:
        self.plane = plane
        self.spawn = spawn  # starts a task the agent cancels at shutdown
        self.turn = 0  # where the next period's probes start

    def probe_next(self) -> None:
        """Start this period's probes (their answers come later)."""
        peers = sorted(self.plane.peers())
        if not peers:
            return
        count = min(PROBES_PER_PERIOD, len(peers))
        for k in range(count):
            self.spawn(self.plane.probe(peers[(self.turn + k) % len(peers)]))
        self.turn = (self.turn + count) % len(peers)
