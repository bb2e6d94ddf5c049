"""The world of a live run: the traces it sends to the agents, shaped for time dilation."""

from __future__ import annotations

import asyncio

import pytest

from edgepart.control_plane import protocol as proto
from edgepart.emulator.live_world import World
from edgepart.emulator.scenario import parse_scenario


def _world(scenario_data, time_dilation: float) -> tuple[World, list[tuple[str, object]]]:
    sent: list[tuple[str, object]] = []

    async def command(device: str, cmd: object) -> proto.Reply:
        sent.append((device, cmd))
        return proto.Reply(id=cmd.id, name=device, ok=True)  # type: ignore[attr-defined]

    async def kill(device: str) -> None:
        raise AssertionError(f"nothing fails here, {device} was killed")

    scenario = parse_scenario(
        scenario_data(
            links={
                "default": {"bandwidth_mbit": 100, "latency_ms": 1},
                "pairs": [{"a": "s", "b": "b", "bandwidth_mbit": 20, "latency_ms": 5}],
            },
            traces=[{"at_token": 2, "link": ["s", "a"], "bandwidth_mbit": 30, "latency_ms": 4}],
        ),
        "live-world-test",
    )
    return World(scenario, command, kill, time_dilation=time_dilation), sent


def _shapes(sent: list[tuple[str, object]]) -> dict[tuple[str, str], tuple[float, float]]:
    """(device, peer) -> (Mbit/s, ms) of the shape commands sent."""
    return {
        (device, cmd.peer): (cmd.bandwidth_mbit, cmd.latency_ms)
        for device, cmd in sent
        if isinstance(cmd, proto.Shape)
    }


def test_links_are_shaped_as_the_scenario_says_without_dilation(scenario_data) -> None:
    world, sent = _world(scenario_data, 1.0)
    asyncio.run(world.setup())
    shapes = _shapes(sent)
    assert shapes[("s", "b")] == pytest.approx((20.0, 5.0))
    assert shapes[("a", "b")] == pytest.approx((100.0, 1.0))


def test_a_dilated_world_shapes_links_k_times_slower(scenario_data) -> None:
    k = 2.5
    world, sent = _world(scenario_data, k)
    asyncio.run(world.setup())
    shapes = _shapes(sent)
    assert len(shapes) == 6  # every ordered pair of 3 devices
    assert shapes[("s", "b")] == pytest.approx((20.0 / k, 5.0 * k))
    assert shapes[("b", "s")] == pytest.approx((20.0 / k, 5.0 * k))
    assert shapes[("a", "b")] == pytest.approx((100.0 / k, 1.0 * k))
    # a trace that changes a link at run time is dilated too
    sent.clear()
    asyncio.run(world.before_token(2))
    shapes = _shapes(sent)
    assert set(shapes) == {("s", "a"), ("a", "s")}
    assert shapes[("s", "a")] == shapes[("a", "s")] == pytest.approx((30.0 / k, 4.0 * k))


def test_a_world_faster_than_its_scenario_is_refused(scenario_data) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        _world(scenario_data, 0.5)


def test_a_timed_trace_is_due_at_its_scenario_time(scenario_data) -> None:
    async def command(device: str, cmd: object) -> proto.Reply:
        return proto.Reply(id=cmd.id, name=device, ok=True)  # type: ignore[attr-defined]

    async def kill(device: str) -> None:
        raise AssertionError(device)

    data = scenario_data(traces=[{"at_s": 0.001, "device": "a", "background_load": 0.5}])
    scenario = parse_scenario(data, "timed")
    # 1 ms of scenario time is 1000 s of wall time in a world 10^6 times slower
    slow = World(scenario, command, kill, time_dilation=1e6)
    asyncio.run(slow.before_token(1))
    assert slow.pending
    fast = World(scenario, command, kill)
    asyncio.run(asyncio.sleep(0.01))
    asyncio.run(fast.before_token(1))
    assert not fast.pending
