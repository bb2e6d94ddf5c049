"""The controller's telemetry view: who is alive (asked as often as one likes, without
moving the planner's hysteresis), the deadband on measured speeds, and the load time of
the devices that loaded nothing."""

from __future__ import annotations

import numpy as np
import pytest

from control_plane import protocol as proto
from controller.config import ControllerConfig
from controller.telemetry_view import (
    MOVE_S_PRIOR,
    TELEMETRY_STALE_S,
    TelemetryView,
    per_device_load_s,
)
from controller.view import PlanningWindow

DEVICES = ("s", "a", "b")
WINDOW = PlanningWindow(8, 8, 64)


def _view() -> TelemetryView:
    d = len(DEVICES)
    config = ControllerConfig(
        testbed="tb",
        broker="127.0.0.1:1883",
        algorithm="myopic",
        devices=DEVICES,
        source="s",
        nominal_gflops=np.full(d, 10.0),
        memory_bytes=np.full(d, 2.0**30),
        bandwidth_mbit=np.full((d, d), 100.0),
        latency_s=np.full((d, d), 0.001),
        table=None,  # type: ignore[arg-type]  # nothing is planned here
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


def test_devices_that_loaded_nothing_get_a_load_time_from_their_speed() -> None:
    load_s = per_device_load_s({0: 0.02, 1: 0.04}, np.array([4.0, 2.0, 1.0, 0.0]))
    assert load_s[:2].tolist() == [0.02, 0.04]
    assert load_s[2] == pytest.approx(0.08)  # 0.08 GFLOP per block at 1 GFLOP/s
    assert load_s[3] == 0.04  # no speed to scale by: the slowest measured
    assert (per_device_load_s({}, np.ones(2)) == MOVE_S_PRIOR).all()
