"""Make one host process behave like a small edge device: cgroup limits, CPU burners, pacing.

Three complementary tools, from strongest to weakest:

- ``CgroupLimits``: the kernel enforces the device's CPU share (CFS bandwidth quota) and
  memory size (OOM kill above it), one cgroup ``edgepart/<testbed>-<device>`` per device.
  Needs root and a writable cpu controller (cgroup v1 or v2).
- ``Burners``: background processes that eat a fraction of the device's CPU share, so a
  trace can make the device busy with other work; placed into the device's cgroup they
  compete with the agent exactly as a co-located workload would.
- ``Pacer``: time dilation without privileges: a piece of work that used ``cpu_s`` of
  CPU is stretched to last ``cpu_s / share`` of wall time, as on a device with ``share``
  of this host's core.

``host_cores`` says how much CPU this process may use at all, the budget the emulated
devices' shares are carved from.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

CgroupVersion = Literal["v1", "v2"]

PARENT_GROUP = "edgepart"  # every device group lives under this directory
MIN_QUOTA_US = 1000  # the kernel refuses CFS quotas below 1 ms
MAX_PERIOD_US = 1_000_000  # the kernel refuses CFS periods above 1 s
MIN_WEIGHT, MAX_WEIGHT = 1, 10_000  # cgroup v2 cpu.weight bounds; 100 is the default
DEFAULT_PERIOD_US = 10_000  # short: a device's work is spread evenly, not in 100 ms bursts
BURN_PERIOD_S = 0.010  # seconds; one busy-then-sleep cycle of a burner
# periods of CPU a starved or throttled burner may owe and catch up on: keeps its average
# without a long full-core burst after a stall
BURN_DEBT_PERIODS = 10

_MOUNTINFO = Path("/proc/self/mountinfo")
_SELF_CGROUP = Path("/proc/self/cgroup")
_GROUP_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_UNLIMITED_MEMORY = 1 << 62  # v1 reports "no limit" as a page-rounded 2^63 - 1
_REMOVE_TIMEOUT_S = 2.0  # exiting tasks may keep a group busy for a moment
_BURNER_START_TIMEOUT_S = 10.0  # an interpreter start on a loaded host
_BURNER_STOP_TIMEOUT_S = 5.0


class LimitsError(RuntimeError):
    """A cgroup operation failed: the file or directory involved and why."""

    def __init__(self, path: Path | str, reason: str) -> None:
        """Error about path (a cgroup file or directory) with a human-readable reason."""
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


# --------------------------------------------------------------------------- cgroupfs


@dataclass(frozen=True)
class _Mount:
    """One cgroup filesystem mount: where it is and which part of the hierarchy it shows."""

    version: CgroupVersion
    controllers: frozenset[str]  # v1: the controllers bound to this hierarchy; v2: empty
    root: str  # the hierarchy path the mount point shows (not "/" in some containers)
    point: Path


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _cgroup_mounts() -> list[_Mount]:
    """The cgroup v1 and v2 mounts of this mount namespace, in mountinfo order."""
    try:
        lines = _MOUNTINFO.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    mounts: list[_Mount] = []
    for line in lines:
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        fstype, super_options = tail[0], tail[2]
        root, point = _unescape(fields[3]), Path(_unescape(fields[4]))
        if fstype == "cgroup2":
            mounts.append(_Mount("v2", frozenset(), root, point))
        elif fstype == "cgroup":
            mounts.append(_Mount("v1", frozenset(super_options.split(",")), root, point))
    return mounts


def _v1_mount(mounts: list[_Mount], controller: str) -> _Mount | None:
    found = [m for m in mounts if m.version == "v1" and controller in m.controllers]
    # a bind mount of a sub-tree shows less of the hierarchy than the whole one
    found.sort(key=lambda m: m.root != "/")
    return found[0] if found else None


def _v2_mount(mounts: list[_Mount]) -> _Mount | None:
    found = sorted((m for m in mounts if m.version == "v2"), key=lambda m: m.root != "/")
    return found[0] if found else None


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup path per v1 controller, and under "" its v2 path."""
    try:
        lines = _SELF_CGROUP.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    own: dict[str, str] = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            own[""] = path
        for controller in controllers.split(","):
            own[controller] = path
    return own


def _own_dir(mount: _Mount, own_path: str | None) -> Path:
    """The directory of this process's cgroup in the mount (the mount point if not visible)."""
    if own_path is None:
        return mount.point
    root = mount.root.rstrip("/")
    if own_path != root and not own_path.startswith(root + "/"):
        return mount.point
    rel = own_path[len(root) :].strip("/")
    # an agent already inside a device group nests new groups beside it, not inside it
    parts = rel.split("/") if rel else []
    if PARENT_GROUP in parts:
        parts = parts[: parts.index(PARENT_GROUP)]
    return mount.point.joinpath(*parts)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii").strip()
    except OSError as exc:
        raise LimitsError(path, f"cannot read: {exc.strerror or exc}") from exc


def _write_raw(path: Path, value: str) -> None:
    # one write(2) per value: cgroupfs parses each write on its own, and errors show up here
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode("ascii"))
    finally:
        os.close(fd)


def _write(path: Path, value: str) -> None:
    try:
        _write_raw(path, value)
    except OSError as exc:
        raise LimitsError(path, f"cannot write {value!r}: {exc.strerror or exc}") from exc


def _keyed(text: str, key: str) -> int | None:
    """The integer after key in a "key value" per line file (cpu.stat, memory.events)."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return None


def _cpu_quota(share: float, period_us: int) -> tuple[int, int]:
    """(quota, period) in us for share cores, the period stretched to fit the minimum quota."""
    if not math.isfinite(share) or share <= 0:
        raise ValueError(f"cpu share must be a positive number of cores, got {share}")
    if not MIN_QUOTA_US <= period_us <= MAX_PERIOD_US:
        raise ValueError(
            f"period must be in [{MIN_QUOTA_US}, {MAX_PERIOD_US}] us, got {period_us} us"
        )
    period = max(period_us, math.ceil(MIN_QUOTA_US / share))
    if period > MAX_PERIOD_US:
        raise ValueError(
            f"cpu share {share} cores x {MAX_PERIOD_US} us period = "
            f"{share * MAX_PERIOD_US:.1f} us quota < {MIN_QUOTA_US} us minimum"
        )
    return max(MIN_QUOTA_US, round(share * period)), period


def _check_memory(memory_bytes: int | None) -> None:
    if memory_bytes is not None and memory_bytes <= 0:
        raise ValueError(f"memory limit must be > 0 bytes or None, got {memory_bytes}")


class CgroupLimits:
    """The kernel-enforced CPU share and memory size of one emulated device.

    v1 keeps cpu, cpuacct and memory in separate hierarchies (possibly separate mounts), so
    one device group is a directory in each; v2 has one directory. On v1 the groups nest
    under this process's own cgroup in each hierarchy, so outer limits and accounting still
    cover the device; on v2 they go under the root, as only leaves may hold processes and
    our own cgroup does.
    """

    def __init__(
        self,
        version: CgroupVersion,
        name: str,
        dirs: dict[str, Path],
        origins: dict[Path, Path],
        period_us: int,
    ) -> None:
        """Wrap existing group dirs (per controller); use ``create`` to make them."""
        self._version: CgroupVersion = version
        self._name = name
        self._dirs = dirs
        self._origins = origins  # group dir -> where its pids go back on remove()
        self._period_us = period_us
        self._share: float | None = None
        self._quota: tuple[int, int] | None = None

    # ---- discovery

    @staticmethod
    def detect() -> CgroupVersion | None:
        """Which cgroup version can limit CPU here, or None (not root, no writable cpu)."""
        if os.geteuid() != 0:
            return None
        mounts = _cgroup_mounts()
        own = _own_cgroups()
        cpu = _v1_mount(mounts, "cpu")
        if cpu is not None:
            base = _own_dir(cpu, own.get("cpu"))
            if (base / "cpu.cfs_quota_us").exists() and os.access(base, os.W_OK):
                return "v1"
        unified = _v2_mount(mounts)
        if unified is not None and os.access(unified.point, os.W_OK):
            try:
                controllers = _read(unified.point / "cgroup.controllers").split()
            except LimitsError:
                return None
            if "cpu" in controllers:
                return "v2"
        return None

    @classmethod
    def create(
        cls,
        name: str,
        cpu_share: float,
        memory_bytes: int | None,
        period_us: int = DEFAULT_PERIOD_US,
    ) -> CgroupLimits:
        """Group edgepart/<name> limited to cpu_share cores (and memory_bytes, None = none).

        An existing group of that name (a crashed agent's) is taken over and re-limited.
        """
        if not _GROUP_NAME.fullmatch(name):
            raise ValueError(f"group name must be one path component of [A-Za-z0-9_.-], {name!r}")
        _cpu_quota(cpu_share, period_us)  # refuse bad numbers before touching the system
        _check_memory(memory_bytes)
        version = cls.detect()
        if version is None:
            raise LimitsError(
                Path("/sys/fs/cgroup"), "no writable cgroup cpu controller (not root?)"
            )
        mounts, own = _cgroup_mounts(), _own_cgroups()
        dirs: dict[str, Path] = {}
        origins: dict[Path, Path] = {}
        if version == "v1":
            for controller in ("cpu", "cpuacct", "memory"):
                mount = _v1_mount(mounts, controller)
                if mount is None:
                    continue
                origin = _own_dir(mount, own.get(controller))
                group = origin / PARENT_GROUP / name
                dirs[controller] = group
                origins[group] = origin
        else:
            mount = _v2_mount(mounts)
            assert mount is not None  # detect() found it
            group = mount.point / PARENT_GROUP / name
            for controller in ("cpu", "cpuacct", "memory"):
                dirs[controller] = group
            origins[group] = mount.point
        if memory_bytes is not None and "memory" not in dirs:
            raise LimitsError(Path("/sys/fs/cgroup"), "no memory controller for a memory limit")
        limits = cls(version, name, dirs, origins, period_us)
        try:
            limits._make_dirs()
            limits.set_cpu_share(cpu_share)
            limits.set_memory_limit(memory_bytes)
        except BaseException:
            limits.remove()
            raise
        return limits

    def _make_dirs(self) -> None:
        for group in self.paths:
            # another agent may rmdir the shared parent between our mkdirs: retry once
            for attempt in range(2):
                try:
                    group.parent.mkdir(exist_ok=True)
                    if self._version == "v2":
                        self._enable_v2_controllers(group.parent)
                    group.mkdir(exist_ok=True)
                    break
                except FileNotFoundError as exc:
                    if attempt:
                        raise LimitsError(group, f"cannot create: {exc.strerror}") from exc
                except OSError as exc:
                    raise LimitsError(group, f"cannot create: {exc.strerror or exc}") from exc

    def _enable_v2_controllers(self, parent: Path) -> None:
        root = self._origins[parent / self._name]
        for level in (root, parent):
            available = _read(level / "cgroup.controllers").split()
            enabled = _read(level / "cgroup.subtree_control").split()
            for controller in ("cpu", "memory"):
                if controller in available and controller not in enabled:
                    control = level / "cgroup.subtree_control"
                    try:
                        _write_raw(control, f"+{controller}")
                    except OSError as exc:
                        reason = f"cannot enable {controller}: {exc.strerror or exc}"
                        if exc.errno == errno.EBUSY:
                            # v2 lets a cgroup hand controllers down only if it holds no
                            # processes (the real root excepted, not a namespace's root)
                            reason += " (processes live here: move them to a child first)"
                        raise LimitsError(control, reason) from exc
        if "cpu" not in _read(parent / "cgroup.subtree_control").split():
            raise LimitsError(parent / "cgroup.subtree_control", "cpu controller not enabled")

    # ---- properties

    @property
    def name(self) -> str:
        """The group's name under edgepart/."""
        return self._name

    @property
    def version(self) -> CgroupVersion:
        """The cgroup version in use."""
        return self._version

    @property
    def paths(self) -> tuple[Path, ...]:
        """The group's directories, one per hierarchy (one on v2)."""
        return tuple(dict.fromkeys(self._dirs.values()))

    @property
    def cpu_share(self) -> float | None:
        """The CPU share (cores) last set."""
        return self._share

    @property
    def cpu_quota_us(self) -> tuple[int, int] | None:
        """The (quota, period) in us last written."""
        return self._quota

    def _dir(self, controller: str) -> Path:
        group = self._dirs.get(controller)
        if group is None:
            reason = f"no {controller} controller for {self._name}"
            raise LimitsError(Path("/sys/fs/cgroup"), reason)
        return group

    # ---- membership

    def add(self, pid: int) -> None:
        """Move process pid (all its threads) into the group."""
        for group in self.paths:
            _write(group / "cgroup.procs", str(pid))

    def pids(self) -> list[int]:
        """The processes in the group (in any of its hierarchies)."""
        found: set[int] = set()
        for group in self.paths:
            with contextlib.suppress(FileNotFoundError):
                found.update(int(p) for p in _read_raw(group / "cgroup.procs").split())
        return sorted(found)

    # ---- limits

    def set_cpu_share(self, cores: float) -> None:
        """Limit the group to cores of CPU time per second of wall time (0.35 = 35% of a core)."""
        quota, period = _cpu_quota(cores, self._period_us)
        group = self._dir("cpu")
        if self._version == "v2":
            _write(group / "cpu.max", f"{quota} {period}")
        else:
            old_period = int(_read(group / "cpu.cfs_period_us"))
            # keep quota/period at most max(old, new) during the change: a limited parent
            # refuses any moment where the child would ask for more than it has
            if period >= old_period:
                _write(group / "cpu.cfs_period_us", str(period))
                _write(group / "cpu.cfs_quota_us", str(quota))
            else:
                _write(group / "cpu.cfs_quota_us", str(quota))
                _write(group / "cpu.cfs_period_us", str(period))
        self._share = float(cores)
        self._quota = (quota, period)

    def set_cpu_weight(self, weight: int) -> None:
        """Set the group's CPU weight under contention (v2 units 1..10000, default 100).

        The quota caps the device; the weight decides whether it reaches the cap when the
        host is oversubscribed. On v1 it becomes cpu.shares (weight x 1024 / 100).
        """
        if not MIN_WEIGHT <= weight <= MAX_WEIGHT:
            raise ValueError(f"cpu weight must be in [{MIN_WEIGHT}, {MAX_WEIGHT}], got {weight}")
        group = self._dir("cpu")
        if self._version == "v2":
            _write(group / "cpu.weight", str(weight))
        else:
            _write(group / "cpu.shares", str(max(2, weight * 1024 // 100)))

    def set_memory_limit(self, memory_bytes: int | None) -> None:
        """Limit the group's memory to memory_bytes (page-rounded by the kernel); None = none."""
        _check_memory(memory_bytes)
        if memory_bytes is None and "memory" not in self._dirs:
            return
        group = self._dir("memory")
        if self._version == "v2":
            value = "max" if memory_bytes is None else str(memory_bytes)
            _write(group / "memory.max", value)
        else:
            value = "-1" if memory_bytes is None else str(memory_bytes)
            _write(group / "memory.limit_in_bytes", value)

    def memory_limit_bytes(self) -> int | None:
        """The memory limit as the kernel reports it (bytes), None if unlimited."""
        if "memory" not in self._dirs:
            return None
        group = self._dir("memory")
        if self._version == "v2":
            text = _read(group / "memory.max")
            return None if text == "max" else int(text)
        value = int(_read(group / "memory.limit_in_bytes"))
        return None if value >= _UNLIMITED_MEMORY else value

    # ---- accounting

    def cpu_usage_s(self) -> float:
        """CPU time (s) used by the group's processes since it was created."""
        if self._version == "v2":
            usec = _keyed(_read(self._dir("cpu") / "cpu.stat"), "usage_usec")
            if usec is None:
                raise LimitsError(self._dir("cpu") / "cpu.stat", "no usage_usec")
            return usec / 1e6
        return int(_read(self._dir("cpuacct") / "cpuacct.usage")) / 1e9

    def memory_usage_bytes(self) -> int:
        """Memory (bytes) charged to the group now."""
        group = self._dir("memory")
        name = "memory.current" if self._version == "v2" else "memory.usage_in_bytes"
        return int(_read(group / name))

    def oom_kills(self) -> int:
        """Processes the kernel killed for exceeding the group's memory limit (0 if unknown)."""
        if "memory" not in self._dirs:
            return 0
        group = self._dir("memory")
        if self._version == "v2":
            kills = _keyed(_read(group / "memory.events"), "oom_kill")
        else:
            # kernels before 4.13 have no oom_kill counter in memory.oom_control
            kills = _keyed(_read(group / "memory.oom_control"), "oom_kill")
        return kills or 0

    # ---- teardown

    def remove(self) -> None:
        """Move remaining processes back to the parent cgroup and delete the group; idempotent."""
        deadline = time.monotonic() + _REMOVE_TIMEOUT_S
        for group in self.paths:
            self._remove_dir(group, self._origins[group], deadline)
            # the shared parent goes when the last device leaves, so no litter is left behind
            with contextlib.suppress(OSError):
                group.parent.rmdir()

    @staticmethod
    def _remove_dir(group: Path, origin: Path, deadline: float) -> None:
        while True:
            try:
                pids = _read_raw(group / "cgroup.procs").split()
            except FileNotFoundError:
                return
            except OSError as exc:
                raise LimitsError(group, f"cannot list processes: {exc.strerror}") from exc
            for pid in pids:
                try:
                    _write_raw(origin / "cgroup.procs", pid)
                except OSError as exc:
                    # ESRCH: it exited meanwhile, which is as good as moved
                    if exc.errno != errno.ESRCH:
                        raise LimitsError(
                            origin / "cgroup.procs", f"cannot move pid {pid} back: {exc.strerror}"
                        ) from exc
            try:
                group.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                # EBUSY: a task still exiting, or one that arrived since we listed
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise LimitsError(group, f"cannot remove: {exc.strerror}") from exc
            time.sleep(0.01)

    def __repr__(self) -> str:
        """Name, version and current CPU limit."""
        return f"CgroupLimits({self._name!r}, {self._version}, share={self._share})"


def _read_raw(path: Path) -> str:
    return path.read_text(encoding="ascii")


def group_name(testbed: str, device: str) -> str:
    """The cgroup name (under edgepart/) of one device of one testbed."""
    return f"{testbed}-{device}"


# --------------------------------------------------------------------------- burners

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


def kernel_oom_kills() -> int | None:
    """The kernel's out-of-memory kills since boot (/proc/vmstat), None where unknown."""
    try:
        for line in Path("/proc/vmstat").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Burners:
    """Background CPU load: a fraction of a device's cores, burnt by child processes.

    Processes, not threads, so the load is real CPU outside our GIL. Each burner takes at
    most one core; a load above one core is spread over several equal burners.
    """

    def __init__(self, cores: float, cgroup: CgroupLimits | None = None) -> None:
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
                raise LimitsError(Path(f"/proc/{proc.pid}"), "burner did not start")
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
            raise LimitsError(Path(f"/proc/{proc.pid}"), "burner did not exit on SIGKILL") from exc
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


# --------------------------------------------------------------------------- pacing


def effective_share(cores: float, background_fraction: float) -> float:
    """The cores left to our work on a device of cores with background_fraction (0..1) busy."""
    if not math.isfinite(cores) or cores < 0:
        raise ValueError(f"cores must be >= 0, got {cores}")
    if not 0.0 <= background_fraction <= 1.0:
        raise ValueError(f"background fraction must be in [0, 1], got {background_fraction}")
    return cores * (1.0 - background_fraction)


class Pacer:
    """Time dilation: work that used cpu_s of CPU here lasts cpu_s / share of wall time.

    Pure arithmetic; the caller measures (time.thread_time around the work), then sleeps
    the returned time with asyncio.
    """

    def __init__(self, share: float) -> None:
        """A device with share (cores, > 0) of this host's CPU speed."""
        self._share = _check_share(share)

    @property
    def share(self) -> float:
        """The device's share (cores) of this host's CPU."""
        return self._share

    def set_share(self, share: float) -> None:
        """Pace later work for share cores (> 0)."""
        self._share = _check_share(share)

    def pace_s(self, cpu_s: float, elapsed_s: float) -> float:
        """Extra wait (s) so work of cpu_s CPU seconds, elapsed_s in, lasts cpu_s / share."""
        if not math.isfinite(cpu_s) or cpu_s < 0:
            raise ValueError(f"cpu time must be >= 0 s, got {cpu_s}")
        if not math.isfinite(elapsed_s) or elapsed_s < 0:
            raise ValueError(f"elapsed time must be >= 0 s, got {elapsed_s}")
        return max(0.0, cpu_s / self._share - elapsed_s)


def _check_share(share: float) -> float:
    if not math.isfinite(share) or share <= 0:
        raise ValueError(f"share must be > 0 cores, got {share}")
    return float(share)


# --------------------------------------------------------------------------- host


def host_cores() -> float:
    """CPUs (cores) this process may use: its affinity, capped by its cgroups' CPU quotas."""
    cores = float(len(os.sched_getaffinity(0)))
    quota = _own_cpu_quota_cores()
    return min(cores, quota) if quota is not None else cores


def _own_cpu_quota_cores() -> float | None:
    """The tightest CPU quota (cores) of our cgroup and its ancestors, None if unlimited."""
    mounts, own = _cgroup_mounts(), _own_cgroups()
    cpu = _v1_mount(mounts, "cpu")
    if cpu is not None:
        mount, own_path, version = cpu, own.get("cpu"), "v1"
    else:
        unified = _v2_mount(mounts)
        if unified is None:
            return None
        mount, own_path, version = unified, own.get(""), "v2"
    best: float | None = None
    level = _own_dir_unstripped(mount, own_path)
    while True:
        limit = _level_quota_cores(level, version)
        if limit is not None:
            best = limit if best is None else min(best, limit)
        if level == mount.point or mount.point not in level.parents:
            return best
        level = level.parent


def _own_dir_unstripped(mount: _Mount, own_path: str | None) -> Path:
    """The directory of our own cgroup, even inside a device group (its quota binds us)."""
    if own_path is None:
        return mount.point
    root = mount.root.rstrip("/")
    if own_path != root and not own_path.startswith(root + "/"):
        return mount.point
    rel = own_path[len(root) :].strip("/")
    return mount.point / rel if rel else mount.point


def _level_quota_cores(level: Path, version: str) -> float | None:
    # unreadable or missing files mean no limit at that level (e.g. cpu not enabled there)
    try:
        if version == "v2":
            quota, _, period = (level / "cpu.max").read_text().strip().partition(" ")
            if quota == "max":
                return None
            return int(quota) / int(period)
        quota_us = int((level / "cpu.cfs_quota_us").read_text())
        period_us = int((level / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 else None
