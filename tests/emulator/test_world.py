"""The emulated world's state: built from a scenario, changed by traces, seen as snapshots."""

from __future__ import annotations

import numpy as np
import pytest

from edgepart.controller.view import PlanningWindow
from edgepart.emulator.scenario import MIB, parse_scenario
from edgepart.emulator.world import WorldState

WINDOW = PlanningWindow(8, 8, 28)


@pytest.fixture
def scenario(scenario_data):
    return parse_scenario(
        scenario_data(
            weights_from="peer",
            links={
                "default": {"bandwidth_mbit": 100, "latency_ms": 1},
                "pairs": [{"a": "s", "b": "b", "bandwidth_mbit": 20, "latency_ms": 5}],
            },
            traces=[
                {"at_token": 1, "device": "a", "background_load": 0.25},
                {"at_token": 2, "device": "b", "memory_mib": 16},
                {"at_token": 3, "link": ["a", "b"], "bandwidth_mbit": 7},
                {"at_token": 4, "link": ["s", "a"], "bandwidth_mbit": 9, "latency_ms": 12},
                {"at_token": 5, "device": "a", "fail": True},
            ],
        ),
        "world-test",
    )


def test_from_scenario(scenario):
    w = WorldState.from_scenario(scenario)
    assert w.names == ("s", "a", "b")
    np.testing.assert_array_equal(w.nominal_gflops, [20, 10, 5])
    np.testing.assert_array_equal(w.available_gflops, [20, 10, 5])
    np.testing.assert_array_equal(w.background_load, 0.0)
    np.testing.assert_array_equal(w.memory_bytes, [64 * MIB] * 3)
    np.testing.assert_array_equal(w.alive, True)
    # pair s-b is special, both directions; the rest take the default; no self links
    assert w.bandwidth_mbit[0, 2] == w.bandwidth_mbit[2, 0] == 20
    assert w.latency_s[0, 2] == w.latency_s[2, 0] == pytest.approx(0.005)
    assert w.bandwidth_mbit[0, 1] == w.bandwidth_mbit[2, 1] == 100
    assert w.latency_s[1, 2] == pytest.approx(0.001)
    np.testing.assert_array_equal(np.diag(w.bandwidth_mbit), 0.0)
    np.testing.assert_array_equal(np.diag(w.latency_s), 0.0)
    assert w.index("b") == 2


def test_initial_view(scenario):
    view = WorldState.from_scenario(scenario).view(scenario, WINDOW)
    assert view.devices == ("s", "a", "b")
    assert view.source == 0 and view.window == WINDOW and view.weights_from == "peer"
    np.testing.assert_array_equal(view.compute_gflops, [20, 10, 5])
    np.testing.assert_array_equal(view.memory_bytes, [64 * MIB] * 3)
    assert view.usable.all()


def test_load_trace_reduces_available_compute(scenario):
    w = WorldState.from_scenario(scenario)
    w.apply(scenario.traces[0])
    assert w.background_load[1] == 0.25
    np.testing.assert_allclose(w.available_gflops, [20, 7.5, 5])
    np.testing.assert_allclose(w.view(scenario, WINDOW).compute_gflops, [20, 7.5, 5])
    np.testing.assert_array_equal(w.nominal_gflops, [20, 10, 5])


def test_memory_trace_sets_available_memory(scenario):
    w = WorldState.from_scenario(scenario)
    w.apply(scenario.traces[1])
    np.testing.assert_array_equal(
        w.view(scenario, WINDOW).memory_bytes, [64 * MIB, 64 * MIB, 16 * MIB]
    )


def test_link_trace_is_symmetric_and_keeps_latency_unless_given(scenario):
    w = WorldState.from_scenario(scenario)
    w.apply(scenario.traces[2])
    assert w.bandwidth_mbit[1, 2] == w.bandwidth_mbit[2, 1] == 7
    assert w.latency_s[1, 2] == w.latency_s[2, 1] == pytest.approx(0.001)
    assert w.bandwidth_mbit[0, 2] == 20  # other links untouched
    w.apply(scenario.traces[3])
    assert w.bandwidth_mbit[0, 1] == w.bandwidth_mbit[1, 0] == 9
    assert w.latency_s[0, 1] == w.latency_s[1, 0] == pytest.approx(0.012)
    view = w.view(scenario, WINDOW)
    assert view.bandwidth_mbit[1, 0] == 9 and view.latency_s[1, 0] == pytest.approx(0.012)


def test_fail_trace_kills_the_device(scenario):
    w = WorldState.from_scenario(scenario)
    w.apply(scenario.traces[4])
    np.testing.assert_array_equal(w.alive, [True, False, True])
    view = w.view(scenario, WINDOW)
    np.testing.assert_array_equal(view.alive, [True, False, True])
    assert view.compute_gflops[1] == 0.0 and view.memory_bytes[1] == 0.0
    np.testing.assert_array_equal(view.usable, [True, False, True])
    assert w.memory_bytes[1] == 64 * MIB  # the world remembers; only the view hides it


def test_view_is_a_snapshot(scenario):
    w = WorldState.from_scenario(scenario)
    before = w.view(scenario, WINDOW)
    kept = (
        before.compute_gflops.copy(),
        before.memory_bytes.copy(),
        before.bandwidth_mbit.copy(),
        before.latency_s.copy(),
        before.alive.copy(),
    )
    for trace in scenario.traces:
        w.apply(trace)
    after = w.view(scenario, WINDOW)
    for old, now in zip(
        kept,
        (
            before.compute_gflops,
            before.memory_bytes,
            before.bandwidth_mbit,
            before.latency_s,
            before.alive,
        ),
        strict=True,
    ):
        np.testing.assert_array_equal(old, now)
    assert not after.alive[1] and before.alive[1]
    assert after.bandwidth_mbit[1, 2] == 7 and before.bandwidth_mbit[1, 2] == 100
    assert after.memory_bytes[2] == 16 * MIB and before.memory_bytes[2] == 64 * MIB
    # and the view's arrays are not the world's: writing into one leaves the other alone
    after.latency_s[0, 1] = 99.0
    after.compute_gflops[0] = 99.0
    assert w.latency_s[0, 1] == pytest.approx(0.012)
    assert w.available_gflops[0] == 20


def test_at_s_traces_apply_the_same_way(scenario_data):
    sc = parse_scenario(
        scenario_data(traces=[{"at_s": 0.5, "device": "b", "background_load": 0.5}]), "t"
    )
    w = WorldState.from_scenario(sc)
    w.apply(sc.traces[0])
    np.testing.assert_allclose(w.available_gflops, [20, 10, 2.5])


def test_a_late_device_is_offline_until_its_join(scenario_data):
    s = parse_scenario(
        scenario_data(
            traces=[
                {"at_token": 2, "device": "b", "join": True},
                {"at_token": 4, "device": "b", "fail": True},
                {"at_token": 6, "device": "b", "join": True},
            ]
        ),
        "join-test",
    )
    state = WorldState.from_scenario(s)
    b = state.index("b")
    seen = [bool(state.alive[b])]
    for trace in s.traces:
        state.apply(trace)
        seen.append(bool(state.alive[b]))
        view = state.view(s, WINDOW)
        assert (view.compute_gflops[b] > 0) == seen[-1]
    assert seen == [False, True, False, True]


def test_a_cut_link_to_the_source_loses_the_device_until_restored(scenario_data):
    s = parse_scenario(
        scenario_data(
            traces=[
                {"at_token": 2, "link": ["a", "s"], "bandwidth_mbit": 0},
                {"at_token": 4, "link": ["s", "a"], "bandwidth_mbit": 50},
            ]
        ),
        "cut-test",
    )
    state = WorldState.from_scenario(s)
    a = state.index("a")
    before = state.view(s, WINDOW)
    state.apply(s.traces[0])
    cut = state.view(s, WINDOW)
    assert not cut.alive[a] and cut.compute_gflops[a] == 0 and cut.memory_bytes[a] == 0
    assert cut.bandwidth_mbit[a, 0] == before.bandwidth_mbit[a, 0]  # no zero rate to plan on
    assert cut.alive[state.index("b")]
    state.apply(s.traces[1])
    back = state.view(s, WINDOW)
    assert back.alive[a] and back.bandwidth_mbit[a, 0] == back.bandwidth_mbit[0, a] == 50
