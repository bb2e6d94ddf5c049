"""Link shaping: token bucket and ShapedWriter timing on a fake clock, plus one loopback check."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, cast

import pytest

from edgepart.device_agent.shaping import ShapedWriter, TokenBucket, mbit_to_bytes_per_s
from edgepart.device_agent.wire import Frame, Kind, decode_frame, encode_frame

TIMEOUT_S = 10.0  # bound on any real network wait


class FakeClock:
    """Virtual time: sleep advances it instantly and records how long was asked."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)  # still yield, as a real sleep would


class FakeWriter:
    """Records every write with the virtual time it happened at."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.writes: list[tuple[float, bytes]] = []
        self.on_write: Callable[[], None] | None = None

    def write(self, data: bytes | memoryview) -> None:
        self.writes.append((self.clock.now, bytes(data)))
        if self.on_write is not None:
            self.on_write()

    async def drain(self) -> None:
        await asyncio.sleep(0)

    @property
    def data(self) -> bytes:
        return b"".join(d for _, d in self.writes)


def shaped(
    rate_mbit: float | None, latency_s: float = 0.0
) -> tuple[ShapedWriter, FakeWriter, FakeClock]:
    clock = FakeClock()
    fake = FakeWriter(clock)
    writer = ShapedWriter(cast(Any, fake), rate_mbit, latency_s, clock=clock, sleep=clock.sleep)
    return writer, fake, clock


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --- TokenBucket ---------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [1e3, 125_000.0, 12.5e6])
@pytest.mark.parametrize("chunk", [1, 1500, 65_536])
def test_bucket_time_to_send_is_bytes_over_rate(rate: float, chunk: int) -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate, burst_bytes=chunk, clock=clock, sleep=clock.sleep)
    total = 400 * chunk + chunk // 2  # the free first burst is under 1% of it; ends mid-chunk

    async def main() -> None:
        sent = 0
        while sent < total:
            n = min(chunk, total - sent)
            await bucket.consume(n)
            sent += n

    run(main())
    # the first burst is free; everything after it costs bytes / rate
    assert clock.now == pytest.approx(total / rate, rel=0.01)
    assert clock.now == pytest.approx((total - chunk) / rate, rel=1e-9)
    assert max(clock.sleeps) <= chunk / rate * (1 + 1e-6)  # paced per chunk, not in one lump


def test_bucket_burst_is_free_then_paced() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000.0, burst_bytes=500, clock=clock, sleep=clock.sleep)

    async def main() -> None:
        await bucket.consume(500)
        assert clock.now == 0.0  # a full bucket sends its burst at once
        await bucket.consume(100)
        assert clock.now == pytest.approx(0.1)
        clock.now += 100.0  # a long idle refills only up to the burst, not beyond
        await bucket.consume(500)
        assert clock.now == pytest.approx(100.1)
        await bucket.consume(1)
        assert clock.now == pytest.approx(100.101)

    run(main())


def test_bucket_request_larger_than_burst_goes_into_debt() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000.0, burst_bytes=100, clock=clock, sleep=clock.sleep)

    async def main() -> None:
        await bucket.consume(2100)  # no deadlock: waits (2100 - 100) / 1000 s
        assert clock.now == pytest.approx(2.0)
        await bucket.consume(0)
        assert clock.now == pytest.approx(2.0)

    run(main())


def test_bucket_rate_change_applies_from_now() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000.0, burst_bytes=0, clock=clock, sleep=clock.sleep)

    async def main() -> None:
        await bucket.consume(1000)
        assert clock.now == pytest.approx(1.0)
        bucket.set_rate(250.0)
        await bucket.consume(1000)
        assert clock.now == pytest.approx(5.0)

    run(main())


def test_bucket_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0.0, 10)
    with pytest.raises(ValueError):
        TokenBucket(float("inf"), 10)
    with pytest.raises(ValueError):
        TokenBucket(10.0, -1)


# --- ShapedWriter on a fake clock -----------------------------------------------------------


@pytest.mark.parametrize("rate_mbit", [1.0, 10.0, 100.0])
def test_shaped_writer_paces_at_rate(rate_mbit: float) -> None:
    writer, fake, clock = shaped(rate_mbit)
    rate = mbit_to_bytes_per_s(rate_mbit)
    data = bytes(range(256)) * int(rate * 2 / 256)  # about two seconds of traffic

    run(writer.send(data))
    assert fake.data == data
    assert writer.bytes_sent == len(data)
    assert clock.now == pytest.approx(len(data) / rate, rel=0.01)
    # bytes leave steadily, not all at the end: half the data is out by about half the time
    half_t = next(t for t, _ in _cumulative(fake.writes) if _ >= len(data) / 2)
    assert half_t == pytest.approx(len(data) / 2 / rate, rel=0.02)


def _cumulative(writes: list[tuple[float, bytes]]) -> list[tuple[float, int]]:
    out, total = [], 0
    for t, d in writes:
        total += len(d)
        out.append((t, total))
    return out


def test_shaped_writer_adds_latency_once_per_frame() -> None:
    latency = 0.02
    writer, fake, clock = shaped(100.0, latency)
    frames = [Frame(Kind.ACTIVATION, 0, i, "h", b"x" * 10) for i in range(10)]

    async def main() -> list[float]:
        starts = []
        for f in frames:
            starts.append(clock.now)
            await writer.write_frame(f)
        return starts

    starts = run(main())
    assert clock.sleeps.count(latency) == len(frames)
    # small frames fit in the burst, so each costs exactly its latency
    assert clock.now == pytest.approx(len(frames) * latency)
    first_write = {}
    for t, d in fake.writes:
        first_write.setdefault(decode_frame(d).token, t)
    for i, start in enumerate(starts):
        assert first_write[i] == pytest.approx(start + latency)
    assert fake.data == b"".join(encode_frame(f) for f in frames)


def test_shaped_writer_latency_plus_transfer() -> None:
    writer, _, clock = shaped(8.0, 0.05)  # 1 MB/s
    run(writer.send(b"\0" * 1_000_000))
    assert clock.now == pytest.approx(0.05 + 1.0, rel=0.01)


def test_rate_change_takes_effect_for_next_frame() -> None:
    writer, fake, clock = shaped(8.0)  # 1 MB/s
    size = 2_000_000  # large enough that the free first burst (5 ms of traffic) is negligible

    def slow_down_mid_frame() -> None:
        if len(fake.writes) == 3:
            writer.set_rate(0.8)  # 100 kB/s, requested while frame 1 is in flight

    fake.on_write = slow_down_mid_frame

    async def main() -> tuple[float, float]:
        await writer.send(b"a" * size)
        t1 = clock.now
        assert writer.rate_mbit == pytest.approx(0.8)
        await writer.send(b"b" * size)
        return t1, clock.now - t1

    first, second = run(main())
    assert first == pytest.approx(size / 1e6, rel=0.01)  # frame 1 kept the old rate
    assert second == pytest.approx(size / 1e5, rel=0.01)  # frame 2 got the new one


def test_latency_change_takes_effect_for_next_frame() -> None:
    writer, _, clock = shaped(None, 0.1)

    async def main() -> None:
        await writer.send(b"a")
        writer.set_latency(0.3)
        await writer.send(b"b")

    run(main())
    assert clock.sleeps == [0.1, 0.3]


def test_unshaped_writer_never_sleeps() -> None:
    writer, fake, clock = shaped(None)
    run(writer.send(b"z" * 3_000_000))
    assert clock.sleeps == []
    assert len(fake.data) == 3_000_000
    assert writer.rate_mbit is None


def test_concurrent_frames_are_not_interleaved() -> None:
    writer, fake, _ = shaped(1.0)
    frames = [Frame(Kind.BLOCK_STATE, 1, i, f"b{i}", bytes([i]) * 20_000) for i in range(4)]

    async def main() -> None:
        await asyncio.gather(*(writer.write_frame(f) for f in frames))

    run(main())
    assert fake.data == b"".join(encode_frame(f) for f in frames)


def test_shaped_writer_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        shaped(0.0)
    with pytest.raises(ValueError):
        shaped(10.0, -0.1)


# --- real loopback --------------------------------------------------------------------------


def test_loopback_throughput_at_10_mbit() -> None:
    rate_mbit = 10.0
    rate = mbit_to_bytes_per_s(rate_mbit)
    total = int(rate * 0.5)  # about half a second of traffic
    frame_payload = 25_000
    arrivals: list[tuple[float, int]] = []
    done = asyncio.Event()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received = 0
        while True:
            chunk = await reader.read(65_536)
            if not chunk:
                break
            received += len(chunk)
            arrivals.append((time.monotonic(), len(chunk)))
        done.set()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(sink, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            _, raw = await asyncio.open_connection("127.0.0.1", port)
            out = ShapedWriter(raw, rate_mbit)
            sent = 0
            token = 0
            while sent < total:
                await out.write_frame(Frame(Kind.ACTIVATION, 0, token, "x", b"\0" * frame_payload))
                sent = out.bytes_sent
                token += 1
            out.close()
            await out.wait_closed()
            await asyncio.wait_for(done.wait(), TIMEOUT_S)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())
    received = sum(n for _, n in arrivals)
    assert received == out_bytes(total, frame_payload)
    # measure from the first arrival: what came after it arrived at the shaped rate
    window_s = arrivals[-1][0] - arrivals[0][0]
    measured = (received - arrivals[0][1]) / window_s
    assert measured == pytest.approx(rate, rel=0.05)


def out_bytes(total: int, payload: int) -> int:
    """Bytes the loopback test writes: whole frames until at least total bytes."""
    frame = len(encode_frame(Frame(Kind.ACTIVATION, 0, 0, "x", b"\0" * payload)))
    return -(-total // frame) * frame


def test_sub_millisecond_latency_is_exact_on_average() -> None:
    latency = 0.0003  # a LAN hop: shorter than an event-loop timer can resolve
    writer, _fake, clock = shaped(None, latency)

    async def run() -> None:
        for _ in range(100):
            await writer.send(b"x" * 100)

    asyncio.run(run())
    # owed until 2 ms add up, then slept in one go: 100 frames, 30 ms in all
    assert all(s >= 0.002 - 1e-12 for s in clock.sleeps)
    assert clock.now == pytest.approx(100 * latency, abs=0.002)
