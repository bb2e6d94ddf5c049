"""The agent's TCP data plane: one listening port, one shaped outbound stream per peer.

Inbound: every accepted connection is read frame by frame and handed to ``on_frame``.
Garbage (a FrameError) is counted, logged once per reason and the connection closed, since
a byte stream cannot be re-synchronised after a bad length; the port stays up.
Outbound: the first frame to a peer opens a connection to its endpoint (bounded wait),
wrapped in a ShapedWriter that applies the pair's bandwidth and latency. Large frames
measure the throughput the link actually gave, which telemetry reports.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from device_agent.shaping import ShapedWriter
from device_agent.wire import (
    DEFAULT_MAX_PAYLOAD,
    Frame,
    FrameError,
    Kind,
    StreamClosed,
    encode_frame,
    read_frame,
)

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
#: frames at least this large (bytes) are long enough on the wire to measure a rate from
MEASURE_MIN_BYTES = 32 * 1024
#: a throughput measurement is reported for this long (s) after it was taken
MEASURE_TTL_S = 30.0

#: latest samples a RecentMean averages (one per activation hop)
HOP_WINDOW = 256
#: latency probes per peer averaged into its measured latency (one per telemetry period)
PROBE_WINDOW = 16
PROBE_TIMEOUT_S = 5.0
#: unsent bytes the kernel may hold per data-plane socket (bytes)
NOTSENT_LOWAT = 16 * 1024

FrameHandler = Callable[[Frame], Awaitable[None]]


class RecentMean:
    """Mean of the latest samples (s); keeps its value while no new ones come.

    Hop overheads are a property of the runtime, not of the moment: a device that stops
    receiving activations keeps reporting what its hops last cost.
    """

    def __init__(self, window: int = HOP_WINDOW) -> None:
        self._samples: deque[float] = deque(maxlen=window)

    def add(self, seconds: float) -> None:
        """Record one sample (s)."""
        self._samples.append(seconds)

    def value(self) -> float:
        """Mean of the recorded samples (s); 0 before the first."""
        return sum(self._samples) / len(self._samples) if self._samples else 0.0


@dataclass
class LinkShape:
    """Shaping of the sends to one peer: Mbit/s (None = line rate) and added latency (s)."""

    rate_mbit: float | None = None
    latency_s: float = 0.0


class DataPlane:
    """Frames in from any peer, frames out to named peers, each outbound link shaped."""

    def __init__(self, name: str, on_frame: FrameHandler, max_payload: int = DEFAULT_MAX_PAYLOAD):
        self.name = name
        self._on_frame = on_frame
        self._max_payload = max_payload
        self._server: asyncio.base_events.Server | None = None
        self._endpoints: dict[str, tuple[str, int]] = {}
        self._shapes: dict[str, LinkShape] = {}
        self._writers: dict[str, ShapedWriter] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self._readers: set[asyncio.Task] = set()
        self._measured: dict[str, tuple[float, float]] = {}  # peer -> (Mbit/s, when)
        self.bad_frames: Counter[str] = Counter()  # reason kind -> count
        self.bytes_sent: Counter[str] = Counter()  # peer -> bytes
        self.bytes_received = 0
        self.frames_received = 0
        #: per peer: round trips of latency probes, loop to loop through both shaped links (s)
        self._round_trips: dict[str, RecentMean] = {}
        self._probes: dict[tuple[str, int], asyncio.Future] = {}
        self._probe_ids = itertools.count()

    # -- lifecycle --
    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port (0 = any free port); returns the bound address."""
        self._server = await asyncio.start_server(self._serve, host, port)
        sock = self._server.sockets[0].getsockname()
        return sock[0], sock[1]

    async def close(self) -> None:
        """Stop listening and close every stream."""
        if self._server is not None:
            self._server.close()
        for task in list(self._readers):
            task.cancel()
        for writer in list(self._writers.values()):
            writer.close()
        self._writers.clear()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            except TimeoutError:
                log.warning("%s: data-plane server did not close within 2 s", self.name)

    # -- peers --
    def set_endpoints(self, endpoints: dict[str, str]) -> None:
        """Where each peer listens ("host:port"); a changed endpoint drops its old stream."""
        for peer, text in endpoints.items():
            host, _, port = text.rpartition(":")
            new = (host, int(port))
            if self._endpoints.get(peer) not in (None, new):
                stale = self._writers.pop(peer, None)
                if stale is not None:
                    stale.close()
            self._endpoints[peer] = new

    def peers(self) -> list[str]:
        """The peers whose endpoints are known."""
        return list(self._endpoints)

    def shape(self, peer: str, rate_mbit: float | None, latency_s: float) -> None:
        """Shape the sends to a peer from the next frame on (Mbit/s, s)."""
        self._shapes[peer] = LinkShape(rate_mbit, latency_s)
        writer = self._writers.get(peer)
        if writer is not None:
            writer.set_rate(rate_mbit)
            writer.set_latency(latency_s)

    def shape_of(self, peer: str) -> LinkShape:
        """The shaping currently applied to a peer."""
        return self._shapes.get(peer, LinkShape())

    def measured_mbit(self, now: float | None = None) -> dict[str, float]:
        """Recently measured throughput per peer (Mbit/s), from large frames."""
        now = time.monotonic() if now is None else now
        return {p: r for p, (r, t) in self._measured.items() if now - t <= MEASURE_TTL_S}

    async def _writer(self, peer: str) -> ShapedWriter:
        writer = self._writers.get(peer)
        if writer is not None:
            return writer
        lock = self._connecting.setdefault(peer, asyncio.Lock())
        async with lock:
            writer = self._writers.get(peer)
            if writer is not None:
                return writer
            if peer not in self._endpoints:
                raise ConnectionError(f"{self.name}: no endpoint known for peer {peer}")
            host, port = self._endpoints[peer]
            _, raw = await asyncio.wait_for(
                asyncio.open_connection(host, port), timeout=CONNECT_TIMEOUT_S
            )
            sock = raw.get_extra_info("socket")
            if sock is not None and hasattr(socket, "TCP_NOTSENT_LOWAT"):
                # bytes wait in this process, not in the kernel, until the link takes them:
                # a frame's send then lasts as long as the (possibly kernel-shaped) link
                # needs, which is what its measured throughput must reflect
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
            shape = self.shape_of(peer)
            writer = ShapedWriter(raw, shape.rate_mbit, shape.latency_s)
            self._writers[peer] = writer
            return writer

    async def send(self, peer: str, frame: Frame, timeout_s: float) -> None:
        """Send one frame to a peer, shaped; raises on a broken or slow link (timeout in s)."""
        data = encode_frame(frame)
        try:
            writer = await self._writer(peer)
            start = time.monotonic()
            await asyncio.wait_for(writer.send(data), timeout=timeout_s)
        except (OSError, TimeoutError) as exc:
            broken = self._writers.pop(peer, None)
            if broken is not None:
                broken.close()
            raise ConnectionError(f"{self.name} -> {peer}: {exc!r}") from exc
        self.bytes_sent[peer] += len(data)
        if len(data) >= MEASURE_MIN_BYTES:
            on_wire = time.monotonic() - start - writer.latency_s
            if on_wire > 0:
                rate = len(data) * 8 / on_wire / 1e6
                cap = writer.rate_mbit
                self._measured[peer] = (min(rate, cap) if cap else rate, time.monotonic())

    async def probe(self, peer: str, timeout_s: float = PROBE_TIMEOUT_S) -> float | None:
        """One latency probe to a peer: the round trip (s), None if it got no answer."""
        token = next(self._probe_ids) % 2**32
        fut = asyncio.get_running_loop().create_future()
        self._probes[(peer, token)] = fut
        start = time.monotonic()
        try:
            await self.send(peer, Frame(Kind.PING, 0, token, self.name, b""), timeout_s)
            await asyncio.wait_for(fut, timeout_s)
        except (ConnectionError, TimeoutError):
            return None
        finally:
            self._probes.pop((peer, token), None)
        rtt = time.monotonic() - start
        self._round_trips.setdefault(peer, RecentMean(PROBE_WINDOW)).add(rtt)
        return rtt

    def measured_latency_s(self) -> dict[str, float]:
        """Per peer, half the mean probe round trip (s): the link's latency plus the
        software time of a frame between the two event loops."""
        return {p: m.value() / 2 for p, m in self._round_trips.items() if m.value() > 0}

    async def _answer_probe(self, frame: Frame) -> None:
        if frame.kind == Kind.PONG:
            fut = self._probes.get((frame.name, frame.token))
            if fut is not None and not fut.done():
                fut.set_result(None)
            return
        try:
            await self.send(frame.name, Frame(Kind.PONG, 0, frame.token, self.name, b""), 10.0)
        except ConnectionError as exc:  # an unknown or unreachable prober: nothing to answer
            self._count_bad(f"probe: {exc}")

    # -- inbound --
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._readers.add(task)
        try:
            while True:
                try:
                    frame = await read_frame(reader, self._max_payload)
                except StreamClosed:
                    return
                except FrameError as exc:
                    self._count_bad(str(exc))
                    return
                except (ConnectionError, OSError):
                    return
                self.frames_received += 1
                self.bytes_received += len(frame.payload)
                if frame.kind in (Kind.PING, Kind.PONG):
                    # answered here, not queued behind the agent's handling of other frames
                    self._answer_probe_soon(frame)
                    continue
                await self._on_frame(frame)
        finally:
            if task is not None:
                self._readers.discard(task)
            writer.close()

    def _answer_probe_soon(self, frame: Frame) -> None:
        task = asyncio.create_task(self._answer_probe(frame))
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    def _count_bad(self, reason: str) -> None:
        kind = reason.split(":", 1)[0]
        if self.bad_frames[kind] == 0:
            log.warning(
                "%s: dropped data-plane input (%s); logged once per kind", self.name, reason
            )
        self.bad_frames[kind] += 1

