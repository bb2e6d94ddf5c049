"""The data plane between two live DataPlanes on loopback: delivery, garbage, hop overhead."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgepart.device_agent.dataplane import DataPlane, RecentMean
from edgepart.device_agent.wire import Frame, Kind, encode_frame

TIMEOUT_S = 10.0  # bound on any network wait


async def _pair(on_frame, sender_key: bytes | None = None, receiver_key: bytes | None = None):
    sender = DataPlane("s", lambda frame: asyncio.sleep(0), key=sender_key)
    receiver = DataPlane("r", on_frame, key=receiver_key)
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


KEY = b"0123456789abcdef0123456789abcdef"


async def _until(condition, timeout_s: float = TIMEOUT_S) -> None:
    """Wait for a condition on the event loop (bounded)."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def _keyed_pair(sender_key: bytes | None = KEY, receiver_key: bytes | None = KEY):
    """A sender and a receiver plane on loopback, and the frames the receiver took."""
    got: list[Frame] = []

    async def on_frame(frame: Frame) -> None:
        got.append(frame)

    sender, receiver = await _pair(on_frame, sender_key, receiver_key)
    try:
        yield sender, receiver, got
    finally:
        await sender.close()
        await receiver.close()


def test_peers_that_know_the_key_exchange_frames() -> None:
    async def main() -> list[Frame]:
        async with _keyed_pair() as (sender, receiver, got):
            await sender.send("r", Frame(Kind.ACTIVATION, 0, 1, "x", b"data"), TIMEOUT_S)
            await _until(lambda: got)
            assert receiver.bad_frames == {}
            return got

    got = asyncio.run(main())
    assert [(f.token, f.payload) for f in got] == [(1, b"data")]


@pytest.mark.parametrize("sender_key", [None, b"not-the-key-of-this-testbed-0000"])
def test_a_peer_without_the_key_is_refused(sender_key: bytes | None) -> None:
    async def main() -> None:
        async with _keyed_pair(sender_key) as (sender, receiver, got):
            with contextlib.suppress(ConnectionError):  # the refused stream may break first
                await sender.send("r", Frame(Kind.ACTIVATION, 0, 1, "x", b"data"), TIMEOUT_S)
            await _until(lambda: receiver.bad_frames["handshake"] == 1)
            assert got == []

    asyncio.run(main())


def test_a_connection_that_skips_the_handshake_is_closed_unread() -> None:
    async def main() -> None:
        async with _keyed_pair() as (_, receiver, got):
            host, port = receiver._server.sockets[0].getsockname()[:2]  # type: ignore[union-attr]
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(encode_frame(Frame(Kind.ACTIVATION, 0, 1, "x", b"data")))
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), TIMEOUT_S)  # the challenge, then EOF
            writer.close()
            await _until(lambda: receiver.bad_frames["handshake"] == 1)
            assert got == []

    asyncio.run(main())


def test_work_is_taken_only_from_the_admitted_peers_probes_from_any() -> None:
    async def main() -> list[Frame]:
        async with _keyed_pair() as (sender, receiver, got):
            receiver.admit({"someone-else"})
            for kind in (Kind.ACTIVATION, Kind.FETCH, Kind.BLOCK_BATCH):
                await sender.send("r", Frame(kind, 0, 0, "x", b"data"), TIMEOUT_S)
            # one stream, read in order: once the probe is answered, the frames were judged
            assert await sender.probe("r", TIMEOUT_S) is not None
            assert receiver.bad_frames["not admitted"] == 3
            assert got == []
            receiver.admit({"s"})
            await sender.send("r", Frame(Kind.ACTIVATION, 0, 2, "x", b"data"), TIMEOUT_S)
            await _until(lambda: got)
            return got

    got = asyncio.run(main())
    assert [f.token for f in got] == [2]


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=40), st.floats(0.0, 1.0))
def test_recent_low_is_a_nearest_rank_quantile(samples: list[float], quantile: float) -> None:
    recent = RecentMean(len(samples))
    for s in samples:
        recent.add(s)
    low = recent.low(quantile)
    assert low in samples
    # at most a quantile's share of the samples lies below it, and none below the least
    assert sum(s < low for s in samples) <= quantile * len(samples)
    assert recent.low(0.0) == min(samples)
    assert RecentMean().low(quantile) == 0.0


def test_a_cut_link_holds_frames_and_its_probes_fail_until_restored() -> None:
    async def main() -> list[Frame]:
        async with _keyed_pair() as (sender, _, got):
            assert await sender.probe("r", TIMEOUT_S) is not None  # connected and measured
            sender.shape("r", 0.0, 0.0)
            with pytest.raises(ConnectionError):
                await sender.send("r", Frame(Kind.ACTIVATION, 0, 1, "x", b"held"), 0.3)
            assert await sender.probe("r", 0.3) is None
            assert sender.unreachable == {"r"}
            sender.shape("r", None, 0.0)
            assert await sender.probe("r", TIMEOUT_S) is not None
            assert sender.unreachable == set()
            await sender.send("r", Frame(Kind.ACTIVATION, 0, 2, "x", b"after"), TIMEOUT_S)
            await _until(lambda: got)
            return got

    got = asyncio.run(main())
    assert [f.token for f in got] == [2]  # the frame sent while cut never arrived


def test_only_activations_are_link_throughput_samples() -> None:
    big = b"\0" * (256 * 1024)  # well over what a rate is measured from

    async def main() -> tuple[dict[str, float], dict[str, float]]:
        sender, receiver = await _pair(lambda frame: asyncio.sleep(0))
        try:
            # a migration's, a commit's and a fetch answer's frames: not what tokens send
            for kind in (Kind.BLOCK_STATE, Kind.BLOCK_BATCH, Kind.ERROR):
                await sender.send("r", Frame(kind, 1, 0, "L0.ffn", big), TIMEOUT_S)
            migrations = sender.measured_mbit()
            await sender.send("r", Frame(Kind.ACTIVATION, 1, 3, "x0", big), TIMEOUT_S)
            return migrations, sender.measured_mbit()
        finally:
            await sender.close()
            await receiver.close()

    migrations, activations = asyncio.run(main())
    assert migrations == {}
    assert set(activations) == {"r"} and activations["r"] > 0


def test_waits_on_a_dilated_world_are_k_times_longer() -> None:
    async def ignore(_frame: Frame) -> None:
        return None

    assert DataPlane("a", ignore).wall_s(2.0) == 2.0
    assert DataPlane("a", ignore, time_dilation=3.0).wall_s(2.0) == 6.0
    with pytest.raises(ValueError, match="at least 1"):
        DataPlane("a", ignore, time_dilation=0.5)
