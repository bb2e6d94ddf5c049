"""The sim backend: token-by-token replay of a scenario on the virtual clock."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgepart.controller import cost
from edgepart.controller.placement import ALGORITHMS, make_algorithm
from edgepart.controller.view import PlanningWindow
from edgepart.emulator.backends.sim import SimResult, first_decision, simulate
from edgepart.emulator.scenario import MIB, load_scenario, parse_scenario
from edgepart.emulator.world import WorldState
from edgepart.llm.blocks import block_table

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
STATIC = ("static-heads", "edgeshard", "memory-proportional", "galaxy")
JSON_KEYS = {
    "algorithm",
    "backend",
    "per_token_s",
    "total_s",
    "migrations",
    "migration_s",
    "peak_memory_bytes",
    "replans",
}


FAST_LINKS = {"default": {"bandwidth_mbit": 1000, "latency_ms": 0.01}}
#: a model and devices where a token takes tens of milliseconds: a switch's commit (a
#: control round trip, about 3 ms) and prepare can pay for themselves within a few tokens
#: (on the tiny model a token takes microseconds and no switch ever pays)
MID_MODEL = {
    "layers": 4, "d_model": 512, "heads": 8, "kv_heads": 4, "d_ff": 1536, "vocab": 1000,
    "dtype": "float32",
}  # fmt: skip
SLOW_DEVICES = [
    {"name": "s", "compute_gflops": 1.0, "memory_mib": 64, "source": True},
    {"name": "a", "compute_gflops": 0.5, "memory_mib": 64},
    {"name": "b", "compute_gflops": 0.25, "memory_mib": 64},
]


def run(data: dict, algorithm: str) -> SimResult:
    return simulate(parse_scenario(data, "sim-test"), make_algorithm(algorithm))


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_one_latency_per_generated_token(scenario_data, algorithm):
    result = run(scenario_data(), algorithm)
    assert result.failure is None
    assert len(result.per_token_s) == 20
    assert all(t > 0 for t in result.per_token_s)
    assert result.total_s == pytest.approx(sum(result.per_token_s) + result.stall_s)
    assert result.algorithm == algorithm


@pytest.mark.parametrize(("generate", "replans"), [(20, 2), (8, 0), (9, 1), (17, 2), (33, 4)])
def test_myopic_replans_on_schedule(scenario_data, generate, replans):
    result = run(scenario_data(generate_tokens=generate), "myopic")
    assert result.replans == replans
    assert [d.token for d in result.decisions] == list(range(8, generate, 8))
    assert not any(d.forced for d in result.decisions)
    # each decision is taken at the context reached so far
    assert [d.context for d in result.decisions] == [8 + t for t in range(8, generate, 8)]


@pytest.mark.parametrize(
    ("trace", "early"),
    [
        ({"at_token": 5, "device": "a", "background_load": 0.5}, True),  # 50 % less compute
        ({"at_token": 5, "device": "a", "background_load": 0.1}, False),  # 10 %: below 20 %
        ({"at_token": 5, "link": ["s", "a"], "bandwidth_mbit": 40}, True),
        ({"at_token": 5, "link": ["s", "a"], "bandwidth_mbit": 90}, False),
    ],
)
def test_a_large_resource_change_brings_the_next_replan_forward(scenario_data, trace, early):
    myopic = run(scenario_data(traces=[trace]), "myopic")
    assert [d.token for d in myopic.decisions] == ([5, 8, 16] if early else [8, 16])
    assert not any(d.forced for d in myopic.decisions)
    # static algorithms do not re-plan for it
    assert run(scenario_data(traces=[trace]), "edgeshard").replans == 0


@pytest.mark.parametrize("algorithm", STATIC)
def test_static_algorithms_never_replan_without_traces(scenario_data, algorithm):
    result = run(scenario_data(generate_tokens=33), algorithm)
    assert result.replans == 0 and result.migrations == 0 and result.migration_s == 0.0
    assert result.decisions == [] and len(result.placements) == 1


def test_to_json_has_exactly_the_design_keys(scenario_data):
    result = run(scenario_data(), "myopic")
    out = result.to_json()
    assert set(out) == JSON_KEYS
    assert out["backend"] == "sim" and out["algorithm"] == "myopic"
    assert out["per_token_s"] == result.per_token_s
    assert out["total_s"] == pytest.approx(sum(out["per_token_s"]) + result.stall_s)
    assert set(out["peak_memory_bytes"]) == {"s", "a", "b"}
    assert out["replans"] == 2 and isinstance(out["migrations"], int)


def test_total_includes_migration_stalls(scenario_data):
    # the source slows down at token 8: myopic moves blocks, and pays for it
    data = scenario_data(
        model=MID_MODEL,
        devices=SLOW_DEVICES,
        links=FAST_LINKS,
        traces=[{"at_token": 8, "device": "s", "background_load": 0.9}],
    )
    result = run(data, "myopic")
    assert result.migrations > 0 and result.migration_s > 0
    taken = [d for d in result.decisions if d.taken]
    assert result.migration_s == pytest.approx(sum(d.migration_s for d in taken))
    assert result.stall_s == pytest.approx(result.migration_s)  # nothing else stalled
    assert result.total_s == pytest.approx(sum(result.per_token_s) + result.stall_s)
    # planned at the change, weighed a token later, committed once prepared
    (switch,) = result.switches
    assert switch.token > 8 and not switch.forced


def test_a_switch_that_does_not_pay_back_is_not_taken(scenario_data):
    """The tiny model's tokens take microseconds: no switch pays for a commit's round trip."""
    data = scenario_data(
        links=FAST_LINKS, traces=[{"at_token": 8, "device": "s", "background_load": 0.9}]
    )
    result = run(data, "myopic")
    assert result.replans >= 1 and result.migrations == 0 and result.stall_s == 0.0
    assert not any(d.taken for d in result.decisions)


def test_per_token_latency_follows_the_cost_model(scenario_data):
    sc = parse_scenario(scenario_data(), "t")
    result = simulate(sc, make_algorithm("edgeshard"))
    placement = first_decision(sc, make_algorithm("edgeshard")).placement
    table = block_table(sc.model_spec())
    view = WorldState.from_scenario(sc).view(sc, PlanningWindow(8, 8, 28))
    expected = [cost.per_token_s(table, view, placement.assignment, 8 + i + 1) for i in range(20)]
    np.testing.assert_allclose(result.per_token_s, expected, rtol=1e-12)


@pytest.mark.parametrize("algorithm", ["edgeshard", "galaxy", "memory-proportional"])
def test_load_trace_slows_a_static_algorithm_from_that_token_on(scenario_data, algorithm):
    base = run(scenario_data(), algorithm)
    load = [{"at_token": 5, "device": d, "background_load": 0.5} for d in ("s", "a", "b")]
    loaded = run(scenario_data(traces=load), algorithm)
    assert loaded.replans == 0
    assert loaded.per_token_s[:5] == base.per_token_s[:5]
    assert all(x > y for x, y in zip(loaded.per_token_s[5:], base.per_token_s[5:], strict=True))


def test_failure_forces_a_replan_of_a_static_algorithm(scenario_data):
    # memory-proportional on three equal devices with two layers: s and a get one each
    data = scenario_data(traces=[{"at_token": 5, "device": "a", "fail": True}])
    result = run(data, "memory-proportional")
    first = result.placements[0]
    assert (first == 1).any(), "the test needs a placement that uses device a"
    assert result.failure is None
    assert result.replans == 1
    (decision,) = result.decisions
    assert decision.token == 5 and decision.forced and decision.taken
    assert decision.moved_blocks == int((first == 1).sum())
    assert decision.migration_s > 0  # the lost KV caches are recomputed
    assert not (result.placements[-1] == 1).any()
    assert len(result.per_token_s) == 20 and all(np.isfinite(result.per_token_s))


def test_failure_of_an_unused_device_changes_nothing(scenario_data):
    base = run(scenario_data(), "edgeshard")
    assert not (base.placements[0] == 2).any()
    result = run(scenario_data(traces=[{"at_token": 3, "device": "b", "fail": True}]), "edgeshard")
    assert result.replans == 0 and result.per_token_s == base.per_token_s


def test_failure_forces_myopic_off_the_dead_device(scenario_data):
    data = scenario_data(
        model=MID_MODEL,
        devices=SLOW_DEVICES,
        links=FAST_LINKS,
        traces=[
            {"at_token": 0, "device": "s", "background_load": 0.95},
            {"at_token": 10, "device": "a", "fail": True},
        ],
    )
    result = run(data, "myopic")
    assert (result.placements[0] == 1).any()
    forced = [d for d in result.decisions if d.forced]
    assert [d.token for d in forced] == [10]
    assert not (result.placements[-1] == 1).any()


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_peak_memory_stays_within_capacity(scenario_data, algorithm):
    # each device holds one layer at most (0.2 MiB), so every algorithm must spread
    data = scenario_data()
    for device, mib in zip(data["devices"], (0.25, 0.2, 0.2), strict=True):
        device["memory_mib"] = mib
    result = run(data, algorithm)
    assert result.failure is None and result.infeasible_tokens == 0
    for device in data["devices"]:
        assert 0 <= result.peak_memory_bytes[device["name"]] <= device["memory_mib"] * MIB
    assert sum(v > 0 for v in result.peak_memory_bytes.values()) >= 2


def test_at_s_trace_applies_once_the_clock_passes_it(scenario_data):
    base = run(scenario_data(), "edgeshard")
    clock = np.concatenate([[0.0], np.cumsum(base.per_token_s)])  # clock before token i
    at_s = float((clock[5] + clock[6]) / 2)  # passed once token 5 is done
    load = [{"at_s": at_s, "device": d, "background_load": 0.5} for d in ("s", "a", "b")]
    result = run(scenario_data(traces=load), "edgeshard")
    assert result.per_token_s[:6] == base.per_token_s[:6]
    assert all(x > y for x, y in zip(result.per_token_s[6:], base.per_token_s[6:], strict=True))


def test_memory_trace_forces_a_replan_when_the_placement_stops_fitting(scenario_data):
    base = run(scenario_data(), "edgeshard")
    used = int(np.bincount(base.placements[0], minlength=3).argmax())
    name = ("s", "a", "b")[used]
    data = scenario_data(traces=[{"at_token": 4, "device": name, "memory_mib": 0.15}])
    result = run(data, "edgeshard")
    assert result.failure is None
    assert [d.token for d in result.decisions] == [4]
    assert result.decisions[0].forced
    assert result.peak_memory_bytes[name] > 0.15 * MIB  # before the trace it held more


def test_progress_is_reported_per_token(scenario_data):
    seen: list[tuple[int, int]] = []
    simulate(
        parse_scenario(scenario_data(), "t"),
        make_algorithm("edgeshard"),
        progress=lambda done, total: seen.append((done, total)),
    )
    assert seen == [(i, 20) for i in range(1, 21)]


def test_myopic_is_not_slower_than_edgeshard_on_the_demo():
    sc = load_scenario(SCENARIOS / "demo.yaml")
    myopic = simulate(sc, make_algorithm("myopic"))
    edgeshard = simulate(sc, make_algorithm("edgeshard"))
    assert myopic.failure is None and edgeshard.failure is None
    assert myopic.total_s <= edgeshard.total_s


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_source_death_stops_generation(scenario_data, algorithm):
    data = scenario_data(traces=[{"at_token": 3, "device": "s", "fail": True}])
    result = run(data, algorithm)
    assert result.failure is not None and result.failure.startswith("token 3:")
    assert len(result.per_token_s) == 3
    assert all(np.isfinite(result.per_token_s))


def _placements_by_token(result: SimResult) -> dict[int, np.ndarray]:
    """The placement in effect from each token on (0: the first)."""
    return dict(zip(result.placement_tokens, result.placements, strict=True))


def test_a_device_is_used_only_once_it_joins(scenario_data):
    # a is the fast device but joins at token 6; the source would rather hand it work
    data = scenario_data(
        model=MID_MODEL,
        devices=SLOW_DEVICES,
        links=FAST_LINKS,
        traces=[
            {"at_token": 0, "device": "s", "background_load": 0.9},
            {"at_token": 6, "device": "a", "join": True},
        ],
    )
    data["traces"].insert(0, {"at_token": 0, "device": "a", "fail": True})
    result = run(data, "myopic")
    by_token = _placements_by_token(result)
    used = [t for t, p in by_token.items() if (p == 1).any()]
    assert used and min(used) >= 6


def test_a_device_back_after_a_fail_is_used_again(scenario_data):
    data = scenario_data(
        model=MID_MODEL,
        devices=SLOW_DEVICES,
        links=FAST_LINKS,
        generate_tokens=32,
        traces=[
            {"at_token": 0, "device": "s", "background_load": 0.9},
            {"at_token": 4, "device": "a", "fail": True},
            {"at_token": 10, "device": "a", "join": True},
        ],
    )
    result = run(data, "myopic")
    by_token = _placements_by_token(result)
    assert (by_token[0] == 1).any()  # used before the fail
    assert not any((p == 1).any() for t, p in by_token.items() if 4 <= t < 10)
    assert any((p == 1).any() for t, p in by_token.items() if t >= 10)


def test_a_device_cut_off_the_source_is_lost_until_the_link_is_back(scenario_data):
    data = scenario_data(
        model=MID_MODEL,
        devices=SLOW_DEVICES,
        links=FAST_LINKS,
        generate_tokens=32,
        traces=[
            {"at_token": 0, "device": "s", "background_load": 0.9},
            {"at_token": 4, "link": ["s", "a"], "bandwidth_mbit": 0},
            {"at_token": 10, "link": ["s", "a"], "bandwidth_mbit": 1000},
        ],
    )
    result = run(data, "myopic")
    by_token = _placements_by_token(result)
    assert (by_token[0] == 1).any()  # used before the cut
    assert [d.token for d in result.decisions if d.forced] == [4]  # the cut forced recovery
    assert not any((p == 1).any() for t, p in by_token.items() if 4 <= t < 10)
    assert any((p == 1).any() for t, p in by_token.items() if t >= 10)
