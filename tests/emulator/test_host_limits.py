"""Host tooling of the local and docker backends: real cgroups (root only), the host's
cores and memory, burners placed in a group, and how a scenario fits the host (its CPU
shares and time dilation, its memory)."""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgepart.device_agent.burners import Burners
from edgepart.emulator.host_limits import (
    AGENT_MAX_CORES,
    AGENT_RUNTIME_BYTES,
    RESERVED_CORES,
    CgroupLimits,
    HostTooSmall,
    LimitsError,
    check_memory,
    fit_scenario,
    fits,
    free_memory_bytes,
    group_name,
    host_cores,
    memory_needed_bytes,
    minimum_dilation,
)
from edgepart.emulator.scenario import parse_scenario

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
        "from edgepart.emulator.host_limits import host_cores\nprint(host_cores())\n",
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


# ------------------------------------------------------------ a scenario on this host

SHARES = st.dictionaries(
    st.text("abcdefgh", min_size=1, max_size=3),
    st.floats(0.001, 8.0, allow_nan=False),
    min_size=1,
    max_size=8,
)
USABLE_CORES = st.floats(0.05, 64.0, allow_nan=False)


@given(SHARES, USABLE_CORES)
def test_the_dilated_shares_always_fit(shares: dict[str, float], usable: float) -> None:
    k = minimum_dilation(shares, usable)
    assert k >= 1.0
    assert fits(shares, k, usable)
    assert sum(s / k for s in shares.values()) <= usable
    assert max(s / k for s in shares.values()) <= AGENT_MAX_CORES


@given(SHARES, USABLE_CORES)
def test_no_dilation_when_the_shares_fit(shares: dict[str, float], usable: float) -> None:
    if fits(shares, 1.0, usable):
        assert minimum_dilation(shares, usable) == 1.0


@given(SHARES, USABLE_CORES)
def test_the_dilation_is_the_least_that_fits(shares: dict[str, float], usable: float) -> None:
    k = minimum_dilation(shares, usable)
    if k > 1.0:
        assert not fits(shares, k * (1 - 1e-9), usable)


def _devices(*gflops: float, memory_mib: float = 512) -> object:
    devices = [
        {"name": f"d{i}", "compute_gflops": g, "memory_mib": memory_mib, "source": i == 0}
        for i, g in enumerate(gflops)
    ]
    data = {
        "version": 1, "name": "fit", "model": {"preset": "smollm2-135m"}, "prompt_tokens": 16,
        "generate_tokens": 16, "devices": devices,
        "links": {"default": {"bandwidth_mbit": 100, "latency_ms": 1}},
    }  # fmt: skip
    return parse_scenario(data, "fit")


def test_the_dilation_is_chosen_from_the_free_cores() -> None:
    scenario = _devices(3.0, 3.0, 2.0)  # 8 GFLOP/s: 2 cores at 4 GFLOP/s per core
    roomy = fit_scenario(scenario, 4.0, cores=4.0)
    assert roomy.time_dilation == 1.0
    assert roomy.dilated_shares == pytest.approx({"d0": 0.75, "d1": 0.75, "d2": 0.5})
    # 2 cores, 1.75 free for devices: 2 / 1.75 times slower
    tight = fit_scenario(scenario, 4.0, cores=2.0)
    assert tight.usable_cores == 2.0 - RESERVED_CORES
    assert tight.time_dilation == pytest.approx(2.0 / 1.75)
    assert sum(tight.dilated_shares.values()) == pytest.approx(1.75)
    assert tight.shares == roomy.shares  # at the scenario's speed, whatever the host
    # one core free: twice as slow again
    assert fit_scenario(scenario, 4.0, cores=1.25).time_dilation == pytest.approx(2.0)


def test_a_device_faster_than_one_core_is_dilated_to_one() -> None:
    # an agent computes in one thread: a device worth 1.5 cores needs k = 1.5, however many
    # cores the host has
    fit = fit_scenario(_devices(6.0, 1.0), 4.0, cores=16.0)
    assert fit.time_dilation == pytest.approx(1.5)
    assert fit.dilated_shares["d0"] == pytest.approx(AGENT_MAX_CORES)


def test_a_forced_dilation_must_fit() -> None:
    scenario = _devices(3.0, 3.0, 2.0)
    assert fit_scenario(scenario, 4.0, cores=4.0, dilation=2.5).time_dilation == 2.5
    with pytest.raises(HostTooSmall, match=r"time dilation 1\.1: this host needs at least 1\.14"):
        fit_scenario(scenario, 4.0, cores=2.0, dilation=1.1)


def test_a_host_without_free_cores_is_refused() -> None:
    with pytest.raises(HostTooSmall, match="none free for devices"):
        fit_scenario(_devices(1.0, 1.0), 4.0, cores=RESERVED_CORES)


def test_memory_no_dilation_fixes_is_refused_with_the_numbers() -> None:
    scenario = _devices(1.0, 1.0, memory_mib=4096)
    needed = memory_needed_bytes(scenario)
    # two agents' runtimes, plus the model twice (less than the budgets together)
    assert 2 * AGENT_RUNTIME_BYTES < needed < 2 * AGENT_RUNTIME_BYTES + 2 * 4096 * MIB
    check_memory(scenario, free_bytes=needed)
    check_memory(scenario, free_bytes=None)  # unknown: nothing refused
    with pytest.raises(HostTooSmall, match=r"2 agents need about \d+ MiB .* but 100 MiB are free"):
        check_memory(scenario, free_bytes=100 * MIB)


def test_small_budgets_bound_the_memory_needed() -> None:
    # the devices hold the model (515 MiB) with little to spare: never twice the model
    scenario = _devices(1.0, 1.0, memory_mib=300)
    assert memory_needed_bytes(scenario, runtime_bytes=0) == 600 * MIB


def test_this_host_reports_its_free_memory() -> None:
    free = free_memory_bytes()
    assert free is None or free > 0
