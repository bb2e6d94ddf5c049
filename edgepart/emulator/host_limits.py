"""Host tooling that makes one host process behave like a small edge device, and how a
scenario's devices fit this host (local and docker backends).

- ``fit_scenario``: each device's CPU share of this host and the time dilation k >= 1 the
  world runs at (k = 1 when the devices fit the free cores, else the smallest k whose
  shares / k fit); ``check_memory`` refuses a scenario whose agents cannot fit this host's
  memory, which no dilation fixes (``HostTooSmall``, bad input). Pure.
- ``CgroupLimits``: the kernel enforces the device's CPU share (CFS bandwidth quota) and
  memory size (OOM kill above it), one cgroup ``edgepart/<testbed>-<device>`` per device.
  Needs root and a writable cpu controller (cgroup v1 or v2). An agent inside it (and the
  CPU burners it starts, ``edgepart.device_agent.burners``) competes for the CPU as a device would.
- ``host_cores`` says how much CPU this process may use at all, the budget the emulated
  devices' shares are carved from.
- ``kernel_oom_kills`` counts the kernel's out-of-memory kills (a run must cause none);
  ``free_memory_bytes`` is the memory the agents may take.

Without root the agents still run at their devices' speeds by pacing
(``edgepart.device_agent.pacing``).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edgepart.emulator.scenario import MIB, MemoryTrace, Scenario
from edgepart.llm.blocks import block_table

CgroupVersion = Literal["v1", "v2"]

PARENT_GROUP = "edgepart"  # every device group lives under this directory
MIN_QUOTA_US = 1000  # the kernel refuses CFS quotas below 1 ms
MAX_PERIOD_US = 1_000_000  # the kernel refuses CFS periods above 1 s
MIN_WEIGHT, MAX_WEIGHT = 1, 10_000  # cgroup v2 cpu.weight bounds; 100 is the default
DEFAULT_PERIOD_US = 10_000  # short: a device's work is spread evenly, not in 100 ms bursts

_MOUNTINFO = Path("/proc/self/mountinfo")
_SELF_CGROUP = Path("/proc/self/cgroup")
_GROUP_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_UNLIMITED_MEMORY = 1 << 62  # v1 reports "no limit" as a page-rounded 2^63 - 1
_REMOVE_TIMEOUT_S = 2.0  # exiting tasks may keep a group busy for a moment


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


def _own_parts(mount: _Mount, own_path: str | None) -> list[str]:
    """The components of this process's cgroup path below the mount point ([] if not
    visible in the mount)."""
    if own_path is None:
        return []
    root = mount.root.rstrip("/")
    if own_path != root and not own_path.startswith(root + "/"):
        return []
    rel = own_path[len(root) :].strip("/")
    return rel.split("/") if rel else []


def _own_dir(mount: _Mount, own_path: str | None) -> Path:
    """The directory of this process's cgroup in the mount (the mount point if not visible)."""
    parts = _own_parts(mount, own_path)
    # an agent already inside a device group nests new groups beside it, not inside it
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


# --------------------------------------------------------------------------- host


def kernel_oom_kills() -> int | None:
    """The kernel's out-of-memory kills since boot (/proc/vmstat), None where unknown."""
    try:
        for line in Path("/proc/vmstat").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except OSError:
        return None
    return None


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
    return mount.point.joinpath(*_own_parts(mount, own_path))


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


def free_memory_bytes() -> float | None:
    """Memory (bytes) new processes may take here: the kernel's MemAvailable, capped by
    what this process's cgroup still allows; None where unknown."""
    try:
        lines = Path("/proc/meminfo").read_text(encoding="ascii").splitlines()
    except OSError:
        return None
    # "MemAvailable:   20867392 kB"
    found = [line.split()[1] for line in lines if line.startswith("MemAvailable:")]
    if not found:
        return None
    free = int(found[0]) * 1024.0
    headroom = _own_memory_headroom_bytes()
    return free if headroom is None else min(free, headroom)


def _own_memory_headroom_bytes() -> float | None:
    """Limit minus usage of our own memory cgroup (bytes), None if unlimited or unknown."""
    mounts, own = _cgroup_mounts(), _own_cgroups()
    memory = _v1_mount(mounts, "memory")
    try:
        if memory is not None:
            level = _own_dir_unstripped(memory, own.get("memory"))
            limit = int(_read_raw(level / "memory.limit_in_bytes"))
            used = int(_read_raw(level / "memory.usage_in_bytes"))
            return None if limit >= _UNLIMITED_MEMORY else float(max(0, limit - used))
        unified = _v2_mount(mounts)
        if unified is None:
            return None
        level = _own_dir_unstripped(unified, own.get(""))
        limit_text = _read_raw(level / "memory.max").strip()
        if limit_text == "max":
            return None
        return float(max(0, int(limit_text) - int(_read_raw(level / "memory.current"))))
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- a scenario here

#: CPU kept free for the broker, the controller and the agents' own event loops (cores)
RESERVED_CORES = 0.25
#: the most CPU one agent turns into compute (cores): it computes in one thread
#: (``edgepart.device_agent.agent``: one compute worker, torch at one thread), so a device worth
#: more than one core of this host would run at one core, slower than its scenario says
AGENT_MAX_CORES = 1.0
#: what one agent process holds besides its blocks (Python, torch, the opened checkpoint):
#: an idle agent of SmolLM2-135M is about 450 MiB resident
AGENT_RUNTIME_BYTES = 450 * MIB


class HostTooSmall(ValueError):
    """The scenario cannot run on this host, not even slowed down (bad input: exit 2)."""


@dataclass(frozen=True)
class HostFit:
    """How a scenario's devices run on this host: each device's CPU share at the scenario's
    speed (cores, at k = 1) and the time dilation k >= 1 the world runs at, in which each
    device gets share / k (``dilated_shares``)."""

    shares: Mapping[str, float]
    time_dilation: float
    usable_cores: float  # this host's cores free for devices

    @property
    def dilated_shares(self) -> dict[str, float]:
        """Each device's CPU share of this host in the dilated world (cores)."""
        return {name: share / self.time_dilation for name, share in self.shares.items()}


def device_shares(scenario: Scenario, reference_gflops: float) -> dict[str, float]:
    """Each device's CPU share (cores) at the scenario's speed, from this CPU's speed per
    core (GFLOP/s, the calibrated host profile)."""
    if not reference_gflops > 0:
        raise ValueError(f"reference speed must be > 0 GFLOP/s, got {reference_gflops}")
    return {d.name: d.compute_gflops / reference_gflops for d in scenario.devices}


def fits(shares: Mapping[str, float], dilation: float, usable_cores: float) -> bool:
    """Whether the shares (cores) / dilation fit: together in usable_cores, each within
    AGENT_MAX_CORES."""
    dilated = [share / dilation for share in shares.values()]
    return sum(dilated) <= usable_cores and max(dilated, default=0.0) <= AGENT_MAX_CORES


def minimum_dilation(shares: Mapping[str, float], usable_cores: float) -> float:
    """The smallest k >= 1 for which the shares (cores) / k fit (see ``fits``)."""
    if not usable_cores > 0:
        raise ValueError(f"usable cores must be > 0, got {usable_cores}")
    total = sum(shares.values())
    biggest = max(shares.values(), default=0.0)
    k = max(1.0, total / usable_cores, biggest / AGENT_MAX_CORES)
    while not fits(shares, k, usable_cores):  # a rounding step or two above the quotient
        k = math.nextafter(k, math.inf)
    return k


def fit_scenario(
    scenario: Scenario,
    reference_gflops: float,
    cores: float,
    dilation: float | None = None,
) -> HostFit:
    """Each device's CPU share of a host of ``cores`` (its CPUs, RESERVED_CORES of them kept
    for the broker and the controller) and the time dilation to run at: the smallest that
    fits (1 when the scenario fits as it is), or ``dilation`` when given, which must be at
    least that (HostTooSmall otherwise)."""
    usable = cores - RESERVED_CORES
    if not usable > 0:
        raise HostTooSmall(
            f"devices: this host has {cores:.2f} cores, none free for devices once "
            f"{RESERVED_CORES} are kept for the broker and the controller"
        )
    shares = device_shares(scenario, reference_gflops)
    least = minimum_dilation(shares, usable)
    if dilation is None:
        dilation = least
    elif not math.isfinite(dilation) or not fits(shares, dilation, usable):
        detail = ", ".join(f"{n} {s:.2f}" for n, s in shares.items())
        raise HostTooSmall(
            f"time dilation {dilation:g}: this host needs at least {least:.3f}; the scenario "
            f"needs {sum(shares.values()):.2f} cores of it ({detail}; this CPU runs "
            f"{reference_gflops:.2f} GFLOP/s per core, an agent computes on at most "
            f"{AGENT_MAX_CORES:g}) and {usable:.2f} of its {cores:.2f} are free for devices"
        )
    return HostFit(shares, float(dilation), usable)


def model_footprint_bytes(scenario: Scenario) -> float:
    """The model's resident bytes at the last token: every block's weights and KV cache, and
    the source's embedding and LM head."""
    table = block_table(scenario.model_spec())
    blocks = table.memory_bytes(scenario.final_context).sum()
    return float(blocks + table.source_weight_bytes)


def memory_needed_bytes(scenario: Scenario, runtime_bytes: float = AGENT_RUNTIME_BYTES) -> float:
    """The most memory a scenario's agents take on one host (bytes): each agent's runtime,
    plus the model's blocks twice (a switch builds the new copies before the old ones go),
    or the devices' budgets together if they are less."""
    budgets = {d.name: d.memory_mib for d in scenario.devices}
    for trace in scenario.traces:  # a device may be given more memory later
        if isinstance(trace, MemoryTrace):
            budgets[trace.device] = max(budgets[trace.device], trace.memory_mib)
    blocks = min(sum(budgets.values()) * MIB, 2.0 * model_footprint_bytes(scenario))
    return len(scenario.devices) * runtime_bytes + blocks


def check_memory(
    scenario: Scenario, free_bytes: float | None, runtime_bytes: float = AGENT_RUNTIME_BYTES
) -> None:
    """Refuse (HostTooSmall) a scenario whose agents need more memory than free_bytes (None:
    unknown, nothing refused): running it slower would not make it smaller."""
    needed = memory_needed_bytes(scenario, runtime_bytes)
    if free_bytes is not None and needed > free_bytes:
        raise HostTooSmall(
            f"devices: the scenario's {len(scenario.devices)} agents need about "
            f"{needed / MIB:.0f} MiB of this host's memory ({runtime_bytes / MIB:.0f} MiB "
            f"each to run, plus the model's blocks) but {free_bytes / MIB:.0f} MiB are free; "
            "use fewer devices or the docker backend on more hosts"
        )
