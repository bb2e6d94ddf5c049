"""The controller's telemetry view: who is alive (asked as often as one likes, without
moving the planner's hysteresis), the deadband on measured speeds, the measured build
times per block kind, acknowledged budgets and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from edgepart.control_plane import protocol as proto
from edgepart.controller.config import ControllerConfig
from edgepart.controller.cost import install_prior_s
from edgepart.controller.telemetry_view import (
    TELEMETRY_STALE_S,
    TelemetryView,
    unmeasured_priors,
)
from edgepart.controller.view import PlanningWindow
from edgepart.llm.blocks import BlockKind, block_table
from edgepart.llm.model import ModelSpec

DEVICES = ("s", "a", "b")
WINDOW = PlanningWindow(8, 8, 64)
TABLE = block_table(ModelSpec("t", 1, 16, 2, 2, 32, 10, head_dim=8))


def _view(time_dilation: float = 1.0) -> TelemetryView:
    d = len(DEVICES)
    config = ControllerConfig(
        time_dilation=time_dilation,
        testbed="tb",
        broker="127.0.0.1:1883",
        algorithm="myopic",
        devices=DEVICES,
        source="s",
        nominal_gflops=np.full(d, 10.0),
        memory_bytes=np.full(d, 2.0**30),
        bandwidth_mbit=np.full((d, d), 100.0),
        latency_s=np.full((d, d), 0.001),
        table=TABLE,
        prompt_ids=(1,),
        generate_tokens=1,
    )
    return TelemetryView(config)


def _report(view: TelemetryView, name: str, gflops: float = 10.0, **extra) -> None:
    view.take(name, proto.Status(name=name, state="online", listen="127.0.0.1:1"))
    telemetry = proto.Telemetry(
        name=name,
        ts=1.0,
        cpu_used=0.5,
        available_gflops=gflops,
        memory_used_bytes=1e6,
        memory_budget_bytes=1e9,
        kv_bytes=0.0,
        **extra,
    )
    view.take(name, telemetry)


def test_asking_who_is_alive_changes_nothing_the_planner_sees() -> None:
    view = _view()
    for name in DEVICES:
        _report(view, name)
    assert view.view(WINDOW).compute_gflops.tolist() == [10.0, 10.0, 10.0]
    _report(view, "a", gflops=20.0)  # a big move: the next view takes it
    for _ in range(50):
        assert view.is_alive("a")
    assert view.measured_gflops["a"] == 10.0  # untouched until the planner looks
    assert view.view(WINDOW).compute_gflops[1] == 20.0


def test_a_small_change_of_speed_stays_inside_the_deadband() -> None:
    view = _view()
    for name in DEVICES:
        _report(view, name)
    view.view(WINDOW)
    _report(view, "a", gflops=11.0)  # 10 %: jitter
    assert view.view(WINDOW).compute_gflops[1] == 10.0
    _report(view, "a", gflops=12.0)  # 20 %: a change
    assert view.view(WINDOW).compute_gflops[1] == 12.0


def test_offline_silent_or_cut_off_devices_are_not_alive() -> None:
    view = _view()
    assert not view.alive().any()  # nobody reported yet
    for name in DEVICES:
        _report(view, name)
    assert view.alive().all() and view.all_joined()
    view.take("a", proto.Status(name="a", state="offline"))
    view.devices["b"].telemetry_at -= 2 * TELEMETRY_STALE_S
    assert view.alive().tolist() == [True, False, False]
    _report(view, "a")
    _report(view, "b")
    _report(view, "s", unreachable_peers=("b",))  # the source cannot reach b any more
    assert view.alive().tolist() == [True, True, False]
    assert not view.is_alive("b")


def test_build_times_start_from_the_prior_and_follow_measurements() -> None:
    view = _view()
    for name in DEVICES:
        _report(view, name)
    prior = install_prior_s(TABLE, np.full(3, 10.0))
    assert np.allclose(view.view(WINDOW).install_s, prior)
    # measured on a at half its nominal speed: at nominal it takes half as long
    view.installed("a", {"ffn": 0.08}, available_gflops=5.0)
    ffn = view.install_nominal_s[1, BlockKind.FFN]
    assert ffn == pytest.approx(0.5 * prior[1, BlockKind.FFN] + 0.5 * 0.04)
    _report(view, "a", gflops=2.5)  # a quarter of its speed now: four times as long
    assert view.view(WINDOW).install_s[1, BlockKind.FFN] == pytest.approx(4 * ffn)


def test_an_acknowledged_budget_counts_before_telemetry_says_so() -> None:
    view = _view()
    for name in DEVICES:
        _report(view, name)
    view.budget_acked("b", 5e8)
    assert view.view(WINDOW).memory_bytes[2] == 5e8  # telemetry still says 1e9
    view.take("b", proto.Telemetry(
        name="b", ts=2.0, cpu_used=0.1, available_gflops=10.0, memory_used_bytes=1e6,
        memory_budget_bytes=5e8, kv_bytes=0.0,
    ))  # fmt: skip
    assert view.view(WINDOW).memory_bytes[2] == 5e8
    assert "b" not in view.acked_budget  # telemetry caught up


def test_a_device_that_refused_looks_full_to_the_next_decision() -> None:
    view = _view()
    for name in DEVICES:
        _report(view, name)
    view.refused.add("a")
    assert view.view(WINDOW).memory_bytes[1] == 1e6  # what it holds: no room for more
    view.refused.clear()
    assert view.view(WINDOW).memory_bytes[1] == 1e9


def test_under_time_dilation_a_device_may_be_silent_k_times_longer() -> None:
    # an agent at share / k takes k times longer for anything, its telemetry included: the
    # silence that means a lost device is TELEMETRY_STALE_S of scenario time
    plain, dilated = _view(), _view(time_dilation=3.0)
    for view in (plain, dilated):
        for name in DEVICES:
            _report(view, name)
        view.devices["b"].telemetry_at -= 2 * TELEMETRY_STALE_S
    assert plain.alive().tolist() == [True, True, False]
    assert dilated.alive().tolist() == [True, True, True]
    dilated.devices["b"].telemetry_at -= 2 * TELEMETRY_STALE_S  # 4 x: beyond 3 x
    assert dilated.alive().tolist() == [True, True, False]


def test_under_time_dilation_telemetry_is_read_in_scenario_units() -> None:
    """A world run k times slower reports k times lower speeds and rates and k times longer
    times; the view plans with the scenario's."""
    k = 3.0
    view = _view(time_dilation=k)
    for name in DEVICES:
        _report(
            view, name, gflops=10.0 / k, peer_throughput_mbit={"s": 100.0 / k},
            peer_latency_s={"s": 0.003 * k}, send_overhead_s=0.0,
        )  # fmt: skip
    seen = view.view(WINDOW)
    assert seen.compute_gflops == pytest.approx([10.0] * 3)
    assert seen.bandwidth_mbit[1, 0] == pytest.approx(100.0)
    assert seen.latency_s[1, 0] == pytest.approx(0.003)
    view.installed("a", {"group": 0.03 * k}, available_gflops=10.0 / k)
    # the measured wall time, at full (scenario) speed: 0.03 s, smoothed with the prior
    prior = install_prior_s(TABLE, np.full(3, 10.0))[1, BlockKind.HEADS]
    assert view.install_nominal_s[1, BlockKind.HEADS] == pytest.approx(0.5 * prior + 0.015)


def test_a_device_that_ran_nothing_is_planned_at_the_others_efficiency() -> None:
    view = _view()
    _report(view, "s", gflops=6.0, compute_measured=True, send_overhead_s=0.001,
            receive_overhead_s=0.003)  # fmt: skip
    _report(view, "a", gflops=5.0, compute_measured=True, send_overhead_s=0.002,
            receive_overhead_s=0.004)  # fmt: skip
    _report(view, "b", gflops=10.0)  # idle: its nominal speed, no hop measured
    seen = view.view(WINDOW)
    # the measured devices reach 0.6 and 0.5 of nominal: the idle one is planned at 0.55
    assert seen.compute_gflops.tolist() == pytest.approx([6.0, 5.0, 5.5])
    # and a hop through it costs what a hop through the others costs (the median, s)
    assert seen.latency_s[2, 0] == pytest.approx(0.001 + 0.0015 + 0.003)
    _report(view, "b", gflops=7.0, compute_measured=True)  # it ran blocks: its own figure
    assert view.view(WINDOW).compute_gflops[2] == pytest.approx(7.0)


def test_priors_never_make_a_device_faster_or_touch_measured_ones() -> None:
    compute = np.array([12.0, 4.0, 8.0])
    overheads = np.array([[0.001, 0.002], [0.0, 0.0], [0.003, 0.004]])
    measured = np.array([True, False, True])
    # the measured devices beat nominal (1.2 and 1.6): the idle one keeps what it reports
    planned, hops = unmeasured_priors(compute, overheads, np.full(3, 5.0), measured)
    assert planned.tolist() == [12.0, 4.0, 8.0]
    assert hops[1].tolist() == pytest.approx([0.002, 0.003])
    assert hops[[0, 2]].tolist() == overheads[[0, 2]].tolist()
    nothing, _ = unmeasured_priors(compute, overheads, np.full(3, 5.0), np.zeros(3, bool))
    assert nothing.tolist() == compute.tolist()  # nothing measured yet: nothing to scale by
