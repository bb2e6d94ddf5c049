"""Per-peer link shaping in the sender: a token bucket for bandwidth plus a per-frame latency.

The cost model charges every cross-device hop ``latency + bytes / bandwidth``; ``ShapedWriter``
reproduces exactly that on a real asyncio stream: each frame waits ``latency_s``, then its
bytes leave no faster than the bucket's rate. Clock and sleep are injectable so the timing can
be tested against a fake clock without real waits.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable

from edgepart.device_agent.wire import Frame, encode_frame

Clock = Callable[[], float]  # seconds, monotonic
Sleep = Callable[[float], Awaitable[None]]  # waits the given seconds

_CHUNK_S = 0.005  # seconds of traffic per paced write: fine pacing without a syscall per byte
_MIN_CHUNK = 1024  # bytes
_MAX_CHUNK = 256 * 1024  # bytes
_BURST_S = 0.005  # seconds of traffic the bucket may send at once after idling
_MIN_SLEEP_S = 0.002  # shorter latencies accumulate until they are worth a timer (s)


def mbit_to_bytes_per_s(rate_mbit: float) -> float:
    """Megabits (10^6 bits) per second as bytes per second."""
    return rate_mbit * 1e6 / 8


class TokenBucket:
    """Bandwidth limiter: up to burst_bytes at once, then rate_bytes_per_s sustained.

    ``consume`` may take more than the burst: the bucket goes into debt and the caller
    waits it off, so one large request costs ``(n - tokens) / rate`` seconds, not a deadlock.
    Concurrent consumers are served in turn (the lock), as frames share one link.
    """

    def __init__(
        self,
        rate_bytes_per_s: float,
        burst_bytes: float,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        """A full bucket of burst_bytes filling at rate_bytes_per_s."""
        _check_finite_rate(rate_bytes_per_s)
        if burst_bytes < 0:
            raise ValueError(f"burst must be >= 0 bytes, got {burst_bytes}")
        self._rate = float(rate_bytes_per_s)
        self._burst = float(burst_bytes)
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst_bytes)
        self._last = clock()
        self._lock = asyncio.Lock()

    @property
    def rate_bytes_per_s(self) -> float:
        """Sustained rate (bytes/s)."""
        return self._rate

    @property
    def burst_bytes(self) -> float:
        """Bucket capacity (bytes)."""
        return self._burst

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now

    def set_rate(self, rate_bytes_per_s: float, burst_bytes: float | None = None) -> None:
        """Change the rate (bytes/s) and optionally the burst (bytes) from now on."""
        _check_finite_rate(rate_bytes_per_s)
        # settle what accrued at the old rate before switching
        self._refill()
        self._rate = float(rate_bytes_per_s)
        if burst_bytes is not None:
            self._burst = float(burst_bytes)
            self._tokens = min(self._tokens, self._burst)

    async def consume(self, n: int) -> None:
        """Take n bytes' worth of tokens, waiting (seconds = debt / rate) if the bucket is short."""
        if n < 0:
            raise ValueError(f"cannot consume {n} bytes")
        async with self._lock:
            self._refill()
            self._tokens -= n
            if self._tokens < 0:
                # sleep overshoot is credited back by the next refill, so the average stays exact
                await self._sleep(-self._tokens / self._rate)


def _check_rate(rate: float) -> None:
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")


def _check_finite_rate(rate: float) -> None:
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"a token bucket needs a finite rate > 0, got {rate}")


def _chunk_bytes(rate_bytes_per_s: float) -> int:
    """Bytes per paced write at this rate (about _CHUNK_S seconds of traffic)."""
    if not math.isfinite(rate_bytes_per_s):
        return _MAX_CHUNK
    return int(min(_MAX_CHUNK, max(_MIN_CHUNK, rate_bytes_per_s * _CHUNK_S)))


def _burst_bytes(rate_bytes_per_s: float) -> float:
    """Default bucket capacity at this rate (bytes)."""
    return max(float(_chunk_bytes(rate_bytes_per_s)), rate_bytes_per_s * _BURST_S)


class ShapedWriter:
    """Wraps a StreamWriter: each frame waits latency_s, then is paced at rate_mbit.

    Latencies under 2 ms are kept exact on average over frames, not per frame.

    ``rate_mbit=None`` (or inf) sends at line rate. ``set_rate``/``set_latency`` take effect
    from the next frame; a frame in flight finishes at the parameters it started with.
    """

    def __init__(
        self,
        writer: asyncio.StreamWriter,
        rate_mbit: float | None,
        latency_s: float = 0.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        """Shape writer at rate_mbit (Mbit/s) with latency_s (s) added to every frame."""
        self._writer = writer
        self._sleep = sleep
        self._check_latency(latency_s)
        self._latency = latency_s
        self._clock = clock
        self._rate = self._to_bytes(rate_mbit)
        self._bucket = self._new_bucket(self._rate)
        self._pending_rate: float | None = None
        self._frame_lock = asyncio.Lock()  # frames go out whole and in order
        self._open = asyncio.Event()  # cleared while the link is cut: frames wait
        self._open.set()
        self.bytes_sent = 0  # total bytes written through the shaper
        self._owed_s = 0.0  # sub-millisecond latency not yet slept (s; < 0: overslept)

    def _new_bucket(self, rate: float) -> TokenBucket | None:
        if math.isinf(rate):
            return None  # unshaped: nothing to pace
        return TokenBucket(rate, _burst_bytes(rate), clock=self._clock, sleep=self._sleep)

    @staticmethod
    def _to_bytes(rate_mbit: float | None) -> float:
        if rate_mbit is None:
            return math.inf
        _check_rate(rate_mbit)
        return mbit_to_bytes_per_s(rate_mbit)

    @staticmethod
    def _check_latency(latency_s: float) -> None:
        if not latency_s >= 0:
            raise ValueError(f"latency must be >= 0 s, got {latency_s}")

    @property
    def rate_mbit(self) -> float | None:
        """Rate the next frame will use (Mbit/s), None when unshaped."""
        rate = self._pending_rate if self._pending_rate is not None else self._rate
        return None if math.isinf(rate) else rate * 8 / 1e6

    @property
    def latency_s(self) -> float:
        """Latency added to the next frame (s)."""
        return self._latency

    @property
    def writer(self) -> asyncio.StreamWriter:
        """The underlying stream."""
        return self._writer

    def set_rate(self, rate_mbit: float | None) -> None:
        """New rate (Mbit/s, None = unshaped) for frames started after this call."""
        self._pending_rate = self._to_bytes(rate_mbit)

    @property
    def cut(self) -> bool:
        """Whether the link is cut (frames wait until it is restored)."""
        return not self._open.is_set()

    def set_cut(self, cut: bool) -> None:
        """Cut the link (frames not yet started wait) or restore it."""
        if cut:
            self._open.clear()
        else:
            self._open.set()

    def set_latency(self, latency_s: float) -> None:
        """New per-frame latency (s) for frames started after this call."""
        self._check_latency(latency_s)
        self._latency = latency_s

    async def send(self, data: bytes) -> None:
        """Send data as one frame: wait the latency, then pace its bytes at the rate."""
        async with self._frame_lock:
            await self._open.wait()
            if self._pending_rate is not None:
                self._rate, self._pending_rate = self._pending_rate, None
                if self._bucket is None or math.isinf(self._rate):
                    self._bucket = self._new_bucket(self._rate)
                else:
                    self._bucket.set_rate(self._rate, _burst_bytes(self._rate))
            await self._wait_latency(self._latency)
            bucket = self._bucket
            step = _chunk_bytes(self._rate)
            view = memoryview(data)
            for start in range(0, len(view), step):
                chunk = view[start : start + step]
                if bucket is not None:
                    await bucket.consume(len(chunk))
                self._writer.write(chunk)
                self.bytes_sent += len(chunk)
                # drain per chunk so the kernel buffer, not the shaper, never runs ahead by much
                await self._writer.drain()

    async def _wait_latency(self, latency_s: float) -> None:
        """Delay a frame by latency_s (s), exactly on average.

        Event-loop timers wake up to a millisecond late (epoll counts whole milliseconds),
        which would turn a 0.3 ms LAN hop into 1.3 ms. Latencies that short are owed until
        they add up to a sleep worth taking, and a sleep's overshoot is credited back, so
        the delay over a run of frames is right even where one frame's is not.
        """
        if latency_s >= _MIN_SLEEP_S:
            await self._sleep(latency_s)
            return
        self._owed_s += latency_s
        if self._owed_s >= _MIN_SLEEP_S:
            start = self._clock()
            await self._sleep(self._owed_s)
            self._owed_s -= self._clock() - start

    async def write_frame(self, frame: Frame) -> None:
        """Encode and send one wire frame, shaped."""
        await self.send(encode_frame(frame))

    def close(self) -> None:
        """Close the underlying stream."""
        self._writer.close()

    async def wait_closed(self) -> None:
        """Wait until the underlying stream is closed."""
        await self._writer.wait_closed()
