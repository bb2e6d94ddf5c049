"""The data plane between two live DataPlanes on loopback: delivery, garbage, hop overhead."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_agent.dataplane import DataPlane, RecentMean
from device_agent.wire import Frame, Kind

TIMEOUT_S = 10.0  # bound on any network wait


async def _pair(on_frame):
    sender = DataPlane("s", lambda frame: asyncio.sleep(0))
    receiver = DataPlane("r", on_frame)
    s_host, s_port = await sender.start("127.0.0.1", 0)
    r_host, r_port = await receiver.start("127.0.0.1", 0)
    sender.set_endpoints({"r": f"{r_host}:{r_port}"})
    receiver.set_endpoints({"s": f"{s_host}:{s_port}"})
    return sender, receiver


def test_frames_arrive_in_order() -> None:
    got: list[int] = []
    all_in = asyncio.Event()

    async def on_frame(frame: Frame) -> None:
        got.append(frame.token)
        if len(got) == 20:
            all_in.set()

    async def main() -> None:
        sender, receiver = await _pair(on_frame)
        try:
            for token in range(20):
                frame = Frame(Kind.ACTIVATION, 0, token, "x", b"\0" * 2304)
                await sender.send("r", frame, TIMEOUT_S)
            await asyncio.wait_for(all_in.wait(), TIMEOUT_S)
        finally:
            await sender.close()
            await receiver.close()

    asyncio.run(main())
    assert got == list(range(20))


def test_probes_measure_the_shaped_latency_and_never_reach_the_agent() -> None:
    latency = 0.02  # each way; far above the software time of a loopback round trip
    seen: list[Frame] = []

    async def on_frame(frame: Frame) -> None:
        seen.append(frame)

    async def main() -> tuple[list[float | None], dict[str, float]]:
        sender, receiver = await _pair(on_frame)
        try:
            sender.shape("r", None, latency)
            receiver.shape("s", None, latency)
            rtts = [await sender.probe("r", TIMEOUT_S) for _ in range(5)]
            return rtts, sender.measured_latency_s()
        finally:
            await sender.close()
            await receiver.close()

    rtts, measured = asyncio.run(main())
    assert all(r is not None and r >= 2 * latency - 0.003 for r in rtts)  # timers may round
    assert latency - 0.0015 <= measured["r"] < latency + 0.01
    assert seen == []  # probes are the data plane's own business


def test_a_probe_to_a_silent_peer_gives_none() -> None:
    async def main() -> float | None:
        plane = DataPlane("s", lambda frame: asyncio.sleep(0))
        await plane.start("127.0.0.1", 0)
        try:
            return await plane.probe("nobody", 0.5)
        finally:
            await plane.close()

    assert asyncio.run(main()) is None


def test_no_frames_no_overhead() -> None:
    assert RecentMean().value() == 0.0


@given(st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=50), st.integers(1, 20))
def test_recent_mean_averages_only_the_latest_window(samples: list[float], window: int) -> None:
    mean = RecentMean(window)
    for s in samples:
        mean.add(s)
    latest = samples[-window:]
    assert mean.value() == pytest.approx(sum(latest) / len(latest))
