"""Host tooling of the local backend: real cgroups (root only), the host's cores, burners
placed in a group."""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from device_agent.burners import Burners
from emulator.host_limits import CgroupLimits, LimitsError, group_name, host_cores

REPO = Path(__file__).resolve().parents[2]
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20

VERSION = CgroupLimits.detect()
needs_cgroups = pytest.mark.skipif(
    VERSION is None, reason="needs root and a writable cgroup cpu controller (v1 or v2)"
)
_names = itertools.count()


def _unique_name() -> str:
    return group_name(f"pytest{os.getpid()}", f"dev{next(_names)}")


def _cgroup_lines(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text()


@pytest.fixture
def make_group() -> Iterator[Callable[..., CgroupLimits]]:
    """Factory of real device groups, every one removed at teardown even after a failure."""
    made: list[CgroupLimits] = []

    def make(cpu_share: float = 0.25, memory_bytes: int | None = None) -> CgroupLimits:
        group = CgroupLimits.create(_unique_name(), cpu_share, memory_bytes)
        # the quota is under test, not the host's load: win every contest below the quota
        group.set_cpu_weight(10_000)
        made.append(group)
        return group

    yield make
    for group in made:
        group.remove()


# --------------------------------------------------------------------------- cgroups


def test_detect_is_none_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert CgroupLimits.detect() is None


def test_create_refuses_bad_numbers_before_touching_anything() -> None:
    with pytest.raises(ValueError, match="group name"):
        CgroupLimits.create("a/b", 0.5, None)
    with pytest.raises(ValueError, match="cpu share"):
        CgroupLimits.create("x", 0.0, None)
    # 0.0005 cores would need a 2 s period for a 1 ms quota; the kernel stops at 1 s
    with pytest.raises(ValueError, match=r"500\.0 us quota < 1000 us"):
        CgroupLimits.create("x", 0.0005, None)
    with pytest.raises(ValueError, match="memory"):
        CgroupLimits.create("x", 0.5, 0)


@needs_cgroups
def test_cpu_share_is_enforced_and_can_change(
    make_group: Callable[..., CgroupLimits],
    spawn: Callable[..., subprocess.Popen[bytes]],
    processes,
) -> None:
    group = make_group(0.25)
    assert group.cpu_quota_us == (2500, 10_000)
    busy = spawn()
    group.add(busy.pid)
    assert busy.pid in group.pids()
    processes.assert_cpu_rate(group.cpu_usage_s, 0.25)

    group.set_cpu_share(0.5)
    assert group.cpu_quota_us == (5000, 10_000)
    processes.assert_cpu_rate(group.cpu_usage_s, 0.5)


@needs_cgroups
def test_small_share_stretches_the_period(make_group: Callable[..., CgroupLimits]) -> None:
    group = make_group(0.05)
    # 0.05 x 10 ms = 0.5 ms is below the kernel's 1 ms minimum quota: 20 ms period instead
    assert group.cpu_quota_us == (1000, 20_000)
    group.set_cpu_share(1.5)
    assert group.cpu_quota_us == (15_000, 10_000)


@needs_cgroups
def test_cpu_weight_is_bounded(make_group: Callable[..., CgroupLimits]) -> None:
    group = make_group(0.25)
    group.set_cpu_weight(1)
    group.set_cpu_weight(100)
    for bad in (0, 10_001):
        with pytest.raises(ValueError, match="weight"):
            group.set_cpu_weight(bad)


@needs_cgroups
def test_memory_limit_reads_back_page_rounded(make_group: Callable[..., CgroupLimits]) -> None:
    asked = 64 * MIB + 123
    group = make_group(0.5, asked)
    got = group.memory_limit_bytes()
    assert got is not None
    assert got % PAGE == 0
    assert abs(got - asked) < PAGE
    group.set_memory_limit(None)
    assert group.memory_limit_bytes() is None
    assert group.memory_usage_bytes() >= 0
    assert group.oom_kills() == 0


@needs_cgroups
def test_memory_limit_oom_kills(
    make_group: Callable[..., CgroupLimits],
    spawn: Callable[..., subprocess.Popen[bytes]],
    deliberate_oom_kills: list[int],
    processes,
) -> None:
    group = make_group(1.0, 32 * MIB)
    # waits for the go-ahead so that its allocation is charged to the group
    hog = spawn(
        "import sys\nsys.stdin.readline()\nb = bytearray(256 << 20)\n",
        stdin=subprocess.PIPE,
    )
    group.add(hog.pid)
    assert hog.stdin is not None
    hog.stdin.write(b"go\n")
    hog.stdin.close()
    assert hog.wait(timeout=processes.TIMEOUT_S) == -9
    assert group.oom_kills() >= 1
    deliberate_oom_kills.append(group.oom_kills())  # the session's OOM check allows these


@needs_cgroups
def test_remove_leaves_no_directory_and_no_process(
    make_group: Callable[..., CgroupLimits],
    spawn: Callable[..., subprocess.Popen[bytes]],
    processes,
) -> None:
    group = make_group(0.25, 64 * MIB)
    busy = spawn()
    group.add(busy.pid)
    assert group.name in _cgroup_lines(busy.pid)

    group.remove()
    assert not any(path.exists() for path in group.paths)
    assert group.pids() == []
    # moved back, not killed: removing limits must not take the agent down
    assert busy.poll() is None
    assert group.name not in _cgroup_lines(busy.pid)
    group.remove()  # idempotent
    processes.reap(busy)
    assert processes.gone_or_zombie(busy.pid)


@needs_cgroups
def test_errors_name_the_path(make_group: Callable[..., CgroupLimits]) -> None:
    group = make_group(0.25)
    with pytest.raises(LimitsError) as info:
        group.add(2**22 + 12345)  # above pid_max defaults: no such process
    assert str(info.value.path).endswith("cgroup.procs")
    assert info.value.reason


@needs_cgroups
def test_host_cores_sees_the_group_quota(
    make_group: Callable[..., CgroupLimits],
    spawn: Callable[..., subprocess.Popen[bytes]],
    processes,
) -> None:
    group = make_group(0.5)
    child = spawn(
        "import sys\nsys.stdin.readline()\n"
        "from emulator.host_limits import host_cores\nprint(host_cores())\n",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    group.add(child.pid)
    out, _ = child.communicate(b"go\n", timeout=processes.TIMEOUT_S)
    assert float(out) == pytest.approx(0.5)


def test_host_cores_is_at_most_the_affinity() -> None:
    assert 0 < host_cores() <= len(os.sched_getaffinity(0))


@needs_cgroups
def test_burners_run_inside_the_group(
    make_group: Callable[..., CgroupLimits],
    burners: Callable[..., Burners],
    processes,
) -> None:
    group = make_group(0.5)
    b = burners(0.5, group)
    b.set_load(0.5)
    assert set(b.pids) <= set(group.pids())
    processes.assert_cpu_rate(group.cpu_usage_s, 0.25)
    b.stop()
    assert group.pids() == []
