"""Device limits: real cgroups (root only), CPU burners, and the pacer's arithmetic."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_agent.limits import (
    Burners,
    CgroupLimits,
    LimitsError,
    Pacer,
    effective_share,
    group_name,
    host_cores,
)

REPO = Path(__file__).resolve().parents[2]
WINDOW_S = 1.0  # wall time of one CPU-rate measurement
POLL_S = 0.05
TOLERANCE = 0.05  # cores
ATTEMPTS = 3  # a loaded host may starve one window; too much CPU is never excused
TIMEOUT_S = 10.0  # bound on any wait for a process to start or die
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20

VERSION = CgroupLimits.detect()
needs_cgroups = pytest.mark.skipif(
    VERSION is None, reason="needs root and a writable cgroup cpu controller (v1 or v2)"
)

# Busy until its parent (pytest) goes, so a crashed run leaves no spinning process behind.
_BUSY = (
    "import os, sys\n"
    "parent = int(sys.argv[1])\n"
    "while os.getppid() == parent:\n"
    "    for _ in range(10000):\n"
    "        pass\n"
)
_names = itertools.count()


def _unique_name() -> str:
    return group_name(f"pytest{os.getpid()}", f"dev{next(_names)}")


def _spawn(
    code: str, *, stdin: int | None = None, stdout: int | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """A Python child running code, with our pid as its argv[1]."""
    return subprocess.Popen(
        [sys.executable, "-c", code, str(os.getpid())], stdin=stdin, stdout=stdout, cwd=cwd
    )


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=TIMEOUT_S)


def _rate(read_cpu_s: Callable[[], float]) -> float:
    """CPU time per wall second (cores) of read_cpu_s over one window."""
    start, used0 = time.monotonic(), read_cpu_s()
    # a deadline loop: a late wake-up lengthens the window instead of skewing the result
    while time.monotonic() - start < WINDOW_S:
        time.sleep(POLL_S)
    used1, end = read_cpu_s(), time.monotonic()
    return (used1 - used0) / (end - start)


def _assert_rate(read_cpu_s: Callable[[], float], expected: float) -> float:
    """Measure until within expected +- TOLERANCE cores; retried only when too low."""
    rates: list[float] = []
    for _ in range(ATTEMPTS):
        rate = _rate(read_cpu_s)
        rates.append(rate)
        if abs(rate - expected) <= TOLERANCE:
            return rate
        if rate > expected + TOLERANCE:
            break
    pytest.fail(f"CPU rates {rates} cores, expected {expected} +- {TOLERANCE}")


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(POLL_S)


def _gone_or_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def _cgroup_lines(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text()


# --------------------------------------------------------------------------- fixtures


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


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Factory of child processes, every one killed and reaped at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(
        code: str = _BUSY,
        *,
        stdin: int | None = None,
        stdout: int | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        proc = _spawn(code, stdin=stdin, stdout=stdout, cwd=cwd)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        _reap(proc)


@pytest.fixture
def burners() -> Iterator[Callable[..., Burners]]:
    """Factory of Burners, every one stopped at teardown."""
    made: list[Burners] = []

    def make(cores: float, cgroup: CgroupLimits | None = None) -> Burners:
        made.append(Burners(cores, cgroup))
        return made[-1]

    yield make
    for b in made:
        b.stop()


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
    make_group: Callable[..., CgroupLimits], spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    group = make_group(0.25)
    assert group.cpu_quota_us == (2500, 10_000)
    busy = spawn()
    group.add(busy.pid)
    assert busy.pid in group.pids()
    _assert_rate(group.cpu_usage_s, 0.25)

    group.set_cpu_share(0.5)
    assert group.cpu_quota_us == (5000, 10_000)
    _assert_rate(group.cpu_usage_s, 0.5)


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
    assert hog.wait(timeout=TIMEOUT_S) == -9
    assert group.oom_kills() >= 1
    deliberate_oom_kills.append(group.oom_kills())  # the session's OOM check allows these


@needs_cgroups
def test_remove_leaves_no_directory_and_no_process(
    make_group: Callable[..., CgroupLimits], spawn: Callable[..., subprocess.Popen[bytes]]
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
    _reap(busy)
    assert _gone_or_zombie(busy.pid)


@needs_cgroups
def test_errors_name_the_path(make_group: Callable[..., CgroupLimits]) -> None:
    group = make_group(0.25)
    with pytest.raises(LimitsError) as info:
        group.add(2**22 + 12345)  # above pid_max defaults: no such process
    assert str(info.value.path).endswith("cgroup.procs")
    assert info.value.reason


@needs_cgroups
def test_host_cores_sees_the_group_quota(
    make_group: Callable[..., CgroupLimits], spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    group = make_group(0.5)
    child = spawn(
        "import sys\nsys.stdin.readline()\n"
        "from device_agent.limits import host_cores\nprint(host_cores())\n",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    group.add(child.pid)
    out, _ = child.communicate(b"go\n", timeout=TIMEOUT_S)
    assert float(out) == pytest.approx(0.5)


def test_host_cores_is_at_most_the_affinity() -> None:
    assert 0 < host_cores() <= len(os.sched_getaffinity(0))


# --------------------------------------------------------------------------- burners


def test_burners_use_their_fraction_and_are_reaped(burners: Callable[..., Burners]) -> None:
    b = burners(0.5)
    b.set_load(0.5)
    pids = b.pids
    assert len(pids) == 1
    _assert_rate(b.cpu_seconds, 0.25)

    spent = b.cpu_seconds()
    b.stop()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()  # reaped: no zombie left
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert b.pids == []
    # what the burners used stays counted after they are gone
    assert b.cpu_seconds() >= spent
    b.stop()  # idempotent


def test_burners_spread_more_than_a_core(burners: Callable[..., Burners]) -> None:
    b = burners(2.0)
    b.set_load(0.75)  # 1.5 cores: two burners at 0.75 each
    assert len(b.pids) == 2
    b.set_load(0.25)  # 0.5 cores: one is enough
    assert len(b.pids) == 1
    b.set_load(0.0)
    assert b.pids == []
    with pytest.raises(ValueError, match="fraction"):
        b.set_load(1.5)


def test_burners_die_with_their_parent(spawn: Callable[..., subprocess.Popen[bytes]]) -> None:
    parent = spawn(
        "import sys, time\nfrom device_agent.limits import Burners\n"
        "b = Burners(0.2)\nb.set_load(1.0)\nprint(*b.pids, flush=True)\ntime.sleep(60)\n",
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    assert parent.stdout is not None
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 1
    assert not _gone_or_zombie(pids[0])
    _reap(parent)
    # orphans are reaped by whoever inherits them; a zombie is dead enough
    _wait_until(lambda: all(_gone_or_zombie(pid) for pid in pids), "orphaned burners to exit")


@needs_cgroups
def test_burners_run_inside_the_group(
    make_group: Callable[..., CgroupLimits], burners: Callable[..., Burners]
) -> None:
    group = make_group(0.5)
    b = burners(0.5, group)
    b.set_load(0.5)
    assert set(b.pids) <= set(group.pids())
    _assert_rate(group.cpu_usage_s, 0.25)
    b.stop()
    assert group.pids() == []


# --------------------------------------------------------------------------- pacing

_shares = st.floats(min_value=1e-3, max_value=64.0)
_times = st.floats(min_value=0.0, max_value=1e4)


@given(share=_shares, cpu_s=_times, elapsed_s=_times)
def test_pace_is_never_negative_and_tops_up_to_cpu_over_share(
    share: float, cpu_s: float, elapsed_s: float
) -> None:
    pace = Pacer(share).pace_s(cpu_s, elapsed_s)
    target = cpu_s / share
    assert pace >= 0.0
    if target > elapsed_s:
        assert pace == target - elapsed_s
        assert math.isclose(elapsed_s + pace, target, rel_tol=1e-12, abs_tol=1e-12)
    else:
        assert pace == 0.0


@given(share=_shares, new_share=_shares, cpu_s=_times)
def test_set_share_paces_later_work(share: float, new_share: float, cpu_s: float) -> None:
    pacer = Pacer(share)
    pacer.set_share(new_share)
    assert pacer.share == new_share
    assert pacer.pace_s(cpu_s, 0.0) == cpu_s / new_share


def test_pace_examples() -> None:
    pacer = Pacer(0.25)
    assert pacer.pace_s(0.1, 0.1) == pytest.approx(0.3)  # 0.1 s of CPU lasts 0.4 s
    assert pacer.pace_s(0.1, 0.5) == 0.0  # already slower than the device
    assert Pacer(2.0).pace_s(1.0, 0.0) == 0.5  # a device faster than this host


@pytest.mark.parametrize("share", [0.0, -1.0, math.inf, math.nan])
def test_pacer_refuses_bad_shares(share: float) -> None:
    with pytest.raises(ValueError, match="share"):
        Pacer(share)
    with pytest.raises(ValueError, match="share"):
        Pacer(1.0).set_share(share)


def test_pace_refuses_negative_times() -> None:
    with pytest.raises(ValueError, match="cpu time"):
        Pacer(1.0).pace_s(-1.0, 0.0)
    with pytest.raises(ValueError, match="elapsed"):
        Pacer(1.0).pace_s(1.0, -1.0)


@given(
    cores=st.floats(min_value=0.0, max_value=64.0),
    fraction=st.floats(min_value=0.0, max_value=1.0),
)
def test_effective_share_is_what_the_background_leaves(cores: float, fraction: float) -> None:
    share = effective_share(cores, fraction)
    assert share == cores * (1.0 - fraction)
    assert 0.0 <= share <= cores


def test_effective_share_refuses_bad_fractions() -> None:
    with pytest.raises(ValueError, match="fraction"):
        effective_share(1.0, 1.5)
    with pytest.raises(ValueError, match="cores"):
        effective_share(-1.0, 0.5)
