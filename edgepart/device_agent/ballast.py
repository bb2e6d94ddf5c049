"""Memory another application takes on a device: resident bytes in a child process.

A memory trace lowers a device's budget because something else on the device now uses
that memory. The agent makes it real with a ballast: a child process (so in the agent's
cgroup or container) holding that many touched bytes, so the kernel sees the pressure the
budget describes and a plan that ignored the budget would meet the cgroup's limit.
``MemoryPressure`` settles the ballast at the size the controller names, never ahead of
the device's own blocks leaving room for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("edgepart.agent")

#: how long (s) the child may take to start or to take a new size
REPLY_TIMEOUT_S = 30.0

# Reads one size (bytes) per line from stdin and holds that many bytes, every page
# written (b"\x01" * n is a memset, not lazily mapped zero pages); stdin closing (the
# agent gone) ends it, so a killed agent leaves no ballast behind.
_BALLAST_CODE = r"""
import sys
held = b""
sys.stdout.write("ready\n")
sys.stdout.flush()
for line in sys.stdin:
    held = b""
    size = int(line)
    held = b"\x01" * size
    sys.stdout.write(f"{size}\n")
    sys.stdout.flush()
"""


class BallastError(RuntimeError):
    """The ballast process did not start or did not take its size in time."""


class Ballast:
    """Resident memory (bytes) held on the device's behalf by one child process."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._held = 0

    @property
    def held_bytes(self) -> int:
        """Bytes the ballast holds now."""
        return self._held

    @property
    def pid(self) -> int | None:
        """The ballast process (None while it holds nothing)."""
        return None if self._proc is None else self._proc.pid

    def hold(self, nbytes: int) -> None:
        """Hold nbytes (bytes) from now on; 0 ends the process. Blocks until it holds them."""
        if nbytes < 0:
            raise ValueError(f"ballast size must be >= 0 bytes, got {nbytes}")
        if nbytes == 0:
            self.stop()
            return
        if self._proc is None:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _BALLAST_CODE],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            self._expect(b"ready")
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(f"{int(nbytes)}\n".encode())
            self._proc.stdin.flush()
        except BrokenPipeError:
            self.stop()
            raise BallastError("the ballast process died") from None
        self._expect(str(int(nbytes)).encode())
        self._held = int(nbytes)

    def _expect(self, answer: bytes) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        ready = select.select([self._proc.stdout], [], [], REPLY_TIMEOUT_S)[0]
        line = self._proc.stdout.readline().strip() if ready else b""
        if line != answer:
            self.stop()
            raise BallastError(f"the ballast answered {line!r}, expected {answer!r}")

    def stop(self) -> None:
        """End the process and free what it held."""
        proc, self._proc, self._held = self._proc, None, 0
        if proc is None:
            return
        with contextlib.suppress(OSError):
            proc.kill()
        proc.wait(timeout=REPLY_TIMEOUT_S)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


#: what the ballast leaves free in the device's memory cgroup (bytes): the agent's own
#: allocator keeps freed blocks' pages for a while, and the kernel must not OOM-kill
CGROUP_MARGIN_BYTES = 64 * 1024 * 1024


def cgroup_room_bytes() -> int | None:
    """Bytes this process's memory cgroup still allows (limit - usage), None when unlimited
    or unknown (no memory cgroup, or the host's root group)."""
    for limit_file, usage_file in (
        ("memory.limit_in_bytes", "memory.usage_in_bytes"),  # cgroup v1
        ("memory.max", "memory.current"),  # cgroup v2
    ):
        for base in _cgroup_dirs():
            try:
                limit = (base / limit_file).read_text().strip()
                usage = int((base / usage_file).read_text().strip())
            except (OSError, ValueError):
                continue
            if limit == "max" or int(limit) >= 1 << 60:
                return None
            return int(limit) - usage
    return None


def _cgroup_dirs() -> list[Path]:
    """Where this process's memory cgroup files may be: its own group's directory, then
    the mount's root (a container sees its own group there)."""
    dirs = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "memory":
                dirs.append(Path("/sys/fs/cgroup/memory") / path.lstrip("/"))
            elif controllers == "":
                dirs.append(Path("/sys/fs/cgroup") / path.lstrip("/"))
    except (OSError, ValueError):
        pass
    return [*dirs, Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")]


def resident_bytes(pid: int) -> int:
    """Resident set size (bytes) of a process, from /proc."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for process {pid}")


class MemoryPressure:
    """The memory other applications take on a device, held by a Ballast once there is room.

    ``over_budget()`` says whether the device's own blocks still exceed its budget (the
    controller moves the excess away first): until they fit, the ballast does not grow.
    """

    def __init__(self, name: str, over_budget: Callable[[], bool]) -> None:
        self.name = name  # the device's, for the log
        self.over_budget = over_budget
        self.ballast = Ballast()
        self.target_bytes = 0  # bytes the ballast is to hold once the blocks leave room
        self._lock = asyncio.Lock()  # one settling at a time

    @property
    def held_bytes(self) -> int:
        """Bytes the ballast holds now."""
        return self.ballast.held_bytes

    @property
    def settling(self) -> bool:
        """Whether a settling runs now (a process start and a memory fill may take a while)."""
        return self._lock.locked()

    async def set_target(self, occupied_bytes: int) -> None:
        """Other applications take occupied_bytes from now on: settle towards it."""
        self.target_bytes = occupied_bytes
        await self.settle()

    async def settle(self) -> None:
        """Bring the ballast to the target: at once when it shrinks, when it grows only once
        this device's own blocks fit the budget, so the two never exceed the device's
        memory."""
        async with self._lock:
            target, held = self.target_bytes, self.ballast.held_bytes
            if target == held or (target > held and self.over_budget()):
                return
            room = cgroup_room_bytes()
            if target > held and room is not None:
                # never into an OOM kill: freed blocks' pages may not be back yet
                target = min(target, held + max(0, room - CGROUP_MARGIN_BYTES))
                if target == held:
                    return
            try:
                await asyncio.to_thread(self.ballast.hold, target)
            except BallastError as exc:  # the trace's pressure is lost, the device goes on
                log.warning("%s: memory ballast of %d bytes failed: %s", self.name, target, exc)
                self.target_bytes = self.ballast.held_bytes  # not again every period

    def stop(self) -> None:
        """End the ballast (the agent stops)."""
        self.ballast.stop()
