"""Pacing: this host's CPU made to run at an emulated device's speed, no privileges.

A piece of work that used ``cpu_s`` of CPU here is stretched to last ``cpu_s / share`` of
wall time, as on a device worth ``share`` of this host's cores. Background load (a CPU
trace, burnt by ``edgepart.device_agent.burners``) takes its fraction of the device: our work gets
the rest, ``share * (1 - background)``. The arithmetic (``Pacer.pace_s``, ``Pacer.owe``) is
pure; ``Pacer.pace`` sleeps in the calling thread (the agent's compute thread).
"""

from __future__ import annotations

import math
import time

#: shorter pacing waits (s) are owed, not slept: they add up until they are worth a sleep
PACE_MIN_SLEEP_S = 0.0005


class Pacer:
    """The device's CPU share (cores), the background load on it, and the wait owed.

    Sleeps shorter than PACE_MIN_SLEEP_S are owed and what a sleep overshoots is credited
    back, so the device's speed is right on average, not only per call.
    """

    def __init__(self, share: float | None) -> None:
        """A device of share (cores, > 0) of this host's CPU; None runs at host speed."""
        self._share = None if share is None else _check_share(share)
        self._background = 0.0
        self.debt_s = 0.0  # pacing wait owed (s), negative when a sleep overshot

    @property
    def share(self) -> float | None:
        """The device's share (cores) of this host's CPU; None when not paced."""
        return self._share

    def set_share(self, share: float) -> None:
        """Pace later work for share cores (> 0)."""
        self._share = _check_share(share)

    @property
    def background(self) -> float:
        """The fraction (0..1) of the device's CPU that other work takes."""
        return self._background

    def set_background(self, fraction: float) -> None:
        """Other work takes fraction (0..1) of the device's CPU from now on."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"background fraction must be in [0, 1], got {fraction}")
        self._background = float(fraction)

    @property
    def effective_share(self) -> float | None:
        """Cores left to our work after the background load (None: not paced)."""
        return None if self._share is None else self._share * (1.0 - self._background)

    def pace_s(self, cpu_s: float, elapsed_s: float) -> float:
        """Extra wait (s) so work of cpu_s CPU seconds, elapsed_s in, lasts cpu_s / share
        (the effective share; 0 when not paced)."""
        if not math.isfinite(cpu_s) or cpu_s < 0:
            raise ValueError(f"cpu time must be >= 0 s, got {cpu_s}")
        if not math.isfinite(elapsed_s) or elapsed_s < 0:
            raise ValueError(f"elapsed time must be >= 0 s, got {elapsed_s}")
        share = self.effective_share
        if share is None or share <= 0:
            return 0.0
        return max(0.0, cpu_s / share - elapsed_s)

    def owe(self, cpu_s: float, elapsed_s: float) -> float:
        """Add this work's wait to the debt; the sleep (s) due now, 0 while the debt is
        under PACE_MIN_SLEEP_S."""
        self.debt_s += self.pace_s(cpu_s, elapsed_s)
        return self.debt_s if self.debt_s >= PACE_MIN_SLEEP_S else 0.0

    def paid(self, slept_s: float) -> None:
        """A sleep of slept_s (s, as measured) paid that much of the debt."""
        self.debt_s -= slept_s

    def pace(self, cpu_s: float, elapsed_s: float) -> None:
        """Stretch work that used cpu_s of CPU in elapsed_s (s): sleep what is due (blocking)."""
        due_s = self.owe(cpu_s, elapsed_s)
        if due_s <= 0:
            return
        start = time.perf_counter()
        time.sleep(due_s)
        self.paid(time.perf_counter() - start)


def _check_share(share: float) -> float:
    if not math.isfinite(share) or share <= 0:
        raise ValueError(f"share must be > 0 cores, got {share}")
    return float(share)
