"""Background CPU load on a device: child processes that burn a fraction of its cores.

A CPU trace makes the device busy with other work. ``Burners`` makes that load real: each
burner is a bare interpreter (a process, so its CPU is outside the agent's GIL) that burns
its duty cycle per period. Started by an agent inside the device's cgroup (or container),
or placed into one (any ``ProcessGroup``), they compete with the agent exactly as a
co-located workload would. The agent paces its own compute to what the load leaves
(``edgepart.device_agent.pacing``).
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import subprocess
import sys
from pathlib import Path
from typing import Protocol

BURN_PERIOD_S = 0.010  # seconds; one busy-then-sleep cycle of a burner
# periods of CPU a starved or throttled burner may owe and catch up on: keeps its average
# without a long full-core burst after a stall
BURN_DEBT_PERIODS = 10
_BURNER_START_TIMEOUT_S = 10.0  # an interpreter start on a loaded host
_BURNER_STOP_TIMEOUT_S = 5.0


class BurnerError(RuntimeError):
    """A burner process did not start, or did not exit when killed."""


class ProcessGroup(Protocol):
    """Where burners are placed (a cgroup): it takes processes by pid."""

    def add(self, pid: int) -> None: ...


# Runs in a bare interpreter (-I -S: nothing imported but the stdlib, fast start). Aims at a
# cumulative CPU time of duty * period per period, so the loop's own overhead counts, and CPU
# it was denied (starved, throttled) is caught up on, up to debt_periods' worth; CPU spent
# idling earns no credit beyond one period's worth. A busy phase lasts at most one period of
# wall time; then it sleeps to the next period boundary (if not behind) while listening on
# stdin for a new duty. Exits on EOF (the pipe's writer closed or died) or when its parent
# changes (the agent died).
_BURNER_CODE = """
import os, select, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
parent, period, debt_periods = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
fd = sys.stdin.fileno()
duty, buf = 0.0, b""
os.write(sys.stdout.fileno(), b"ready\\n")
next_t, target = time.monotonic(), time.process_time()
while os.getppid() == parent:
    start = time.monotonic()
    budget, now = duty * period, time.process_time()
    target = min(max(target, now - budget), now + budget * (debt_periods - 1)) + budget
    while time.process_time() < target and time.monotonic() - start < period:
        pass
    next_t = max(next_t + period, time.monotonic())
    while True:
        ready = select.select([fd], [], [], max(0.0, next_t - time.monotonic()))[0]
        if not ready:
            break
        data = os.read(fd, 4096)
        if not data:
            sys.exit(0)
        *lines, buf = (buf + data).split(b"\\n")
        for line in lines:
            if line.strip():
                duty = min(1.0, max(0.0, float(line)))
        if time.monotonic() >= next_t:
            break
"""


def _proc_cpu_s(pid: int) -> float | None:
    """CPU time (s) of process pid so far, also while a zombie; None if it is gone."""
    try:
        # schedstat: on-CPU time in ns; stat only has 10 ms ticks
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class Burners:
    """Background CPU load: a fraction of a device's cores, burnt by child processes.

    Processes, not threads, so the load is real CPU outside our GIL. Each burner takes at
    most one core; a load above one core is spread over several equal burners.
    """

    def __init__(self, cores: float, cgroup: ProcessGroup | None = None) -> None:
        """Burners for a device of cores CPU cores, placed into cgroup if given."""
        if not math.isfinite(cores) or cores <= 0:
            raise ValueError(f"cores must be > 0, got {cores}")
        self._cores = float(cores)
        self._cgroup = cgroup
        self._procs: list[subprocess.Popen[bytes]] = []
        self._fraction = 0.0
        self._spent_s = 0.0  # CPU time of burners already reaped

    @property
    def cores(self) -> float:
        """The device's CPU share (cores) the load is a fraction of."""
        return self._cores

    @property
    def load(self) -> float:
        """The fraction (0..1) of cores being burnt."""
        return self._fraction

    @property
    def pids(self) -> list[int]:
        """The running burner processes."""
        return [p.pid for p in self._procs]

    def set_load(self, fraction: float) -> None:
        """Burn fraction (0..1) of the device's cores from now on; 0 stops all burners.

        Starting burners blocks until they run (an interpreter start, tens of ms).
        """
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"load fraction must be in [0, 1], got {fraction}")
        total = fraction * self._cores
        count = math.ceil(total - 1e-9) if total > 0 else 0
        while len(self._procs) > count:
            self._stop_one(self._procs.pop())
        while len(self._procs) < count:
            self._procs.append(self._start())
        self._fraction = float(fraction)
        for proc in list(self._procs):
            self._send(proc, total / count)

    def _start(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [
                sys.executable,
                *("-I", "-S", "-c", _BURNER_CODE),
                *(str(os.getpid()), repr(BURN_PERIOD_S), repr(BURN_DEBT_PERIODS)),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            ready = select.select([proc.stdout], [], [], _BURNER_START_TIMEOUT_S)[0]
            line = proc.stdout.readline() if ready else b""
            if line != b"ready\n":
                raise BurnerError(f"burner {proc.pid} did not start")
            proc.stdout.close()
            # it idles until told its duty, so none of its load escapes the group
            if self._cgroup is not None:
                self._cgroup.add(proc.pid)
        except BaseException:
            self._stop_one(proc)
            raise
        return proc

    def _send(self, proc: subprocess.Popen[bytes], duty: float) -> None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(f"{duty!r}\n".encode())
            proc.stdin.flush()
        except BrokenPipeError:
            # it died (killed from outside): replace it so the load stays what was asked
            self._procs.remove(proc)
            self._stop_one(proc)
            replacement = self._start()
            self._procs.append(replacement)
            self._send(replacement, duty)

    def _stop_one(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.returncode is None:
            proc.kill()
        # the zombie still shows its CPU time until reaped
        self._spent_s += _proc_cpu_s(proc.pid) or 0.0
        try:
            proc.wait(timeout=_BURNER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise BurnerError(f"burner {proc.pid} did not exit on SIGKILL") from exc
        finally:
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()

    def stop(self) -> None:
        """Kill and reap every burner; idempotent."""
        while self._procs:
            self._stop_one(self._procs.pop())
        self._fraction = 0.0

    def cpu_seconds(self) -> float:
        """CPU time (s) all burners of this object have used so far."""
        live = sum(_proc_cpu_s(p.pid) or 0.0 for p in self._procs)
        return self._spent_s + live

    def __enter__(self) -> Burners:
        """Itself; stop() on exit."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop every burner."""
        self.stop()


class BackgroundLoad:
    """The CPU load a trace puts on the device: that fraction of its share, burnt.

    The burners start with the first load; an unpaced device (no share) burns nothing, as
    it has no share to take a fraction of.
    """

    def __init__(self, cores: float | None) -> None:
        """Load on a device of cores CPU cores (None: unpaced)."""
        self.cores = cores
        self._burners: Burners | None = None

    def set(self, fraction: float) -> None:
        """Burn fraction (0..1) of the device's cores from now on (blocks while burners start)."""
        if self.cores is None:
            return
        if self._burners is None:
            self._burners = Burners(self.cores)
        self._burners.set_load(fraction)

    def cpu_seconds(self) -> float:
        """CPU time (s) the burners have used so far."""
        return self._burners.cpu_seconds() if self._burners is not None else 0.0

    def stop(self) -> None:
        """Stop every burner (the agent stops)."""
        if self._burners is not None:
            self._burners.stop()
