"""The agent's TCP data plane: one listening port, one shaped outbound stream per peer.

Inbound: every accepted connection first proves which agent it comes from (the port sends a
nonce, the peer answers with its name and, when the testbed has a data-plane key, an HMAC of
both), then is read frame by frame and handed to ``on_frame``. Frames that start work or
state here (activations, committed batches, weight fetches) count only from the peers the
current placement epoch names (``admit``); answers to this agent's own requests are matched
to them. Garbage (a FrameError) is counted, logged once per reason and the connection
closed, since a byte stream cannot be re-synchronised after a bad length; the port stays up.
Outbound: the first frame to a peer opens a connection to its endpoint (bounded wait),
wrapped in a ShapedWriter that applies the pair's bandwidth and latency. Large activations
measure the throughput the link actually gave, which telemetry reports; migration frames
(block states, batches, fetches) do not: they meet a receiver busy installing blocks and
would report a link slower than the tokens see.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import logging
import math
import os
import socket
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from edgepart.device_agent.shaping import ShapedWriter
from edgepart.device_agent.wire import (
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
SEND_TIMEOUT_S = 120.0  # longest (s) one frame may take on a shaped link (a migration at 1 Mbit)
#: for a connecting peer to answer the challenge (and for the challenge to come), s
HANDSHAKE_TIMEOUT_S = 5.0
NONCE_BYTES = 16
#: frames that make this agent compute or hold something: only from admitted peers
ADMITTED_KINDS = frozenset({Kind.ACTIVATION, Kind.FETCH, Kind.BLOCK_BATCH})
#: frames at least this large (bytes) are long enough on the wire to measure a rate from
MEASURE_MIN_BYTES = 32 * 1024
#: the only kind of frame whose sends are link-throughput samples: what tokens send
MEASURED_KIND = Kind.ACTIVATION
#: a throughput measurement is reported for this long (s) after it was taken
MEASURE_TTL_S = 30.0

#: latest samples a RecentMean averages (one per activation hop)
HOP_WINDOW = 256
#: latency probes per peer kept for its measured latency (one per telemetry period)
PROBE_WINDOW = 16
#: quantile of the kept probe round trips taken as the link's: a probe that met a busy
#: peer (its compute thread holding the GIL, its cgroup throttled) measured the peer, not the
#: link; what an activation hop waits for a busy receiver is its receive overhead
PROBE_QUANTILE = 0.1
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

    def low(self, quantile: float) -> float:
        """The recorded samples' lower quantile (s; nearest rank, 0 = the least); 0 before
        the first."""
        if not self._samples:
            return 0.0
        ranked = sorted(self._samples)
        return ranked[min(len(ranked) - 1, int(quantile * len(ranked)))]


@dataclass
class LinkShape:
    """Shaping of the sends to one peer: Mbit/s (None = line rate, 0 = cut) and added
    latency (s)."""

    rate_mbit: float | None = None
    latency_s: float = 0.0

    @property
    def cut(self) -> bool:
        """Whether nothing gets through (frames wait until the link is restored)."""
        return self.rate_mbit == 0


class DataPlane:
    """Frames in from any peer, frames out to named peers, each outbound link shaped."""

    def __init__(
        self,
        name: str,
        on_frame: FrameHandler,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        key: bytes | None = None,
        time_dilation: float = 1.0,
    ):
        """A plane for agent ``name``; with ``key`` (the testbed's shared data-plane secret)
        peers must sign the connection nonce with it. ``time_dilation`` (k >= 1): the
        emulator runs the world k times slower, links at their rate / k, so every wait on
        a send, or on the work a frame asks of a peer, is k times longer (``wall_s``)."""
        if not time_dilation >= 1.0:
            raise ValueError(f"time dilation must be at least 1, got {time_dilation}")
        self.name = name
        self.time_dilation = float(time_dilation)
        self._on_frame = on_frame
        self._max_payload = max_payload
        self._key = key
        #: peers whose work-starting frames are taken (None: any authenticated peer)
        self.admitted: frozenset[str] | None = None
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
        #: peers whose latest probe got no answer (a probe that is answered clears it)
        self.unreachable: set[str] = set()
        self._answered_at: dict[str, float] = {}  # peer -> when a probe was last answered
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

    def admit(self, peers) -> None:
        """Take activations, committed batches and fetches only from these peers from now on."""
        self.admitted = frozenset(peers)

    def peers(self) -> list[str]:
        """The peers whose endpoints are known."""
        return list(self._endpoints)

    def shape(self, peer: str, rate_mbit: float | None, latency_s: float) -> None:
        """Shape the sends to a peer from the next frame on (Mbit/s, 0 = cut; s)."""
        shape = self._shapes[peer] = LinkShape(rate_mbit, latency_s)
        writer = self._writers.get(peer)
        if writer is not None:
            if not shape.cut:
                writer.set_rate(rate_mbit)
            writer.set_latency(latency_s)
            writer.set_cut(shape.cut)

    def shape_of(self, peer: str) -> LinkShape:
        """The shaping currently applied to a peer."""
        return self._shapes.get(peer, LinkShape())

    def measured_mbit(self, now: float | None = None) -> dict[str, float]:
        """Recently measured throughput per peer (Mbit/s), from large activations."""
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
            reader, raw = await asyncio.wait_for(
                asyncio.open_connection(host, port), timeout=CONNECT_TIMEOUT_S
            )
            try:
                await asyncio.wait_for(self._introduce(reader, raw), HANDSHAKE_TIMEOUT_S)
            except (FrameError, StreamClosed, TimeoutError) as exc:
                raw.close()
                raise ConnectionError(f"{self.name}: no handshake with {peer}: {exc}") from None
            sock = raw.get_extra_info("socket")
            if sock is not None and hasattr(socket, "TCP_NOTSENT_LOWAT"):
                # bytes wait in this process, not in the kernel, until the link takes them:
                # a frame's send then lasts as long as the (possibly kernel-shaped) link
                # needs, which is what its measured throughput must reflect
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
            shape = self.shape_of(peer)
            writer = ShapedWriter(raw, None if shape.cut else shape.rate_mbit, shape.latency_s)
            writer.set_cut(shape.cut)
            self._writers[peer] = writer
            return writer

    def _signature(self, nonce: bytes, name: str) -> bytes:
        if self._key is None:
            return b""
        return hmac.new(self._key, nonce + name.encode("utf-8"), hashlib.sha256).digest()

    async def _introduce(self, reader: asyncio.StreamReader, raw: asyncio.StreamWriter) -> None:
        """Answer a peer port's challenge with this agent's name and signature."""
        challenge = await read_frame(reader, NONCE_BYTES)
        if challenge.kind != Kind.CHALLENGE:
            raise FrameError(f"expected a challenge, got a {challenge.kind.name} frame")
        hello = Frame(Kind.HELLO, 0, 0, self.name, self._signature(challenge.payload, self.name))
        raw.write(encode_frame(hello))
        await raw.drain()

    async def _authenticate(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> str | None:
        """Challenge a new inbound connection; the peer's proven name, None if it failed."""
        nonce = os.urandom(NONCE_BYTES)
        writer.write(encode_frame(Frame(Kind.CHALLENGE, 0, 0, self.name, nonce)))
        try:
            await writer.drain()
            hello = await asyncio.wait_for(read_frame(reader, 64), HANDSHAKE_TIMEOUT_S)
        except FrameError as exc:
            self.count_bad(f"handshake: {exc}")
            return None
        except (StreamClosed, ConnectionError, OSError, TimeoutError):
            self.count_bad("handshake: no answer to the challenge")
            return None
        if hello.kind != Kind.HELLO:
            self.count_bad(f"handshake: expected a hello, got a {hello.kind.name} frame")
            return None
        if not hmac.compare_digest(hello.payload, self._signature(nonce, hello.name)):
            self.count_bad(f"handshake: bad signature from {hello.name!r}")
            return None
        return hello.name

    def wall_s(self, scenario_s: float) -> float:
        """A timeout of the scenario's world (s) in this dilated one (s)."""
        return scenario_s * self.time_dilation

    async def send(self, peer: str, frame: Frame, timeout_s: float) -> None:
        """Send one frame to a peer, shaped; raises on a broken or slow link (timeout in
        scenario s: k times longer under time dilation k)."""
        data = encode_frame(frame)
        try:
            writer = await self._writer(peer)
            start = time.monotonic()
            await asyncio.wait_for(writer.send(data), timeout=self.wall_s(timeout_s))
        except (OSError, TimeoutError) as exc:
            broken = self._writers.pop(peer, None)
            if broken is not None:
                broken.close()
            raise ConnectionError(f"{self.name} -> {peer}: {exc!r}") from exc
        self.bytes_sent[peer] += len(data)
        if frame.kind == MEASURED_KIND and len(data) >= MEASURE_MIN_BYTES:
            on_wire = time.monotonic() - start - writer.latency_s
            if on_wire > 0:
                rate = len(data) * 8 / on_wire / 1e6
                cap = writer.rate_mbit
                self._measured[peer] = (min(rate, cap) if cap else rate, time.monotonic())

    async def probe(self, peer: str, timeout_s: float = PROBE_TIMEOUT_S) -> float | None:
        """One latency probe to a peer: the round trip (wall s), None if it got no answer
        within timeout_s (scenario s)."""
        token = next(self._probe_ids) % 2**32
        fut = asyncio.get_running_loop().create_future()
        self._probes[(peer, token)] = fut
        start = time.monotonic()
        try:
            await self.send(peer, Frame(Kind.PING, 0, token, self.name, b""), timeout_s)
            await asyncio.wait_for(fut, self.wall_s(timeout_s))
        except (ConnectionError, TimeoutError):
            # a later probe may have been answered meanwhile (a peer back on a new port)
            if self._answered_at.get(peer, -math.inf) < start:
                self.unreachable.add(peer)
            return None
        finally:
            self._probes.pop((peer, token), None)
        self.unreachable.discard(peer)
        self._answered_at[peer] = time.monotonic()
        rtt = time.monotonic() - start
        self._round_trips.setdefault(peer, RecentMean(PROBE_WINDOW)).add(rtt)
        return rtt

    def measured_latency_s(self) -> dict[str, float]:
        """Per peer, half a low quantile of the recent probe round trips (s): the link's
        latency plus the software time of a frame between two idle event loops."""
        halves = {p: m.low(PROBE_QUANTILE) / 2 for p, m in self._round_trips.items()}
        return {p: t for p, t in halves.items() if t > 0}

    async def _answer_probe(self, peer: str, frame: Frame) -> None:
        if frame.kind == Kind.PONG:
            fut = self._probes.get((peer, frame.token))
            if fut is not None and not fut.done():
                fut.set_result(None)
            return
        try:
            await self.send(peer, Frame(Kind.PONG, 0, frame.token, self.name, b""), 10.0)
        except ConnectionError as exc:  # an unknown or unreachable prober: nothing to answer
            self.count_bad(f"probe: {exc}")

    # -- inbound --
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._readers.add(task)
        try:
            peer = await self._authenticate(reader, writer)
            if peer is None:
                return
            while True:
                try:
                    frame = await read_frame(reader, self._max_payload)
                except StreamClosed:
                    return
                except FrameError as exc:
                    self.count_bad(str(exc))
                    return
                except (ConnectionError, OSError):
                    return
                self.frames_received += 1
                self.bytes_received += len(frame.payload)
                if frame.kind in (Kind.PING, Kind.PONG):
                    # answered here, not queued behind the agent's handling of other frames
                    self._answer_probe_soon(peer, frame)
                    continue
                if not self._takes(peer, frame):
                    self.count_bad(
                        f"not admitted: {frame.kind.name} from {peer!r}, not in the placement"
                    )
                    continue
                await self._on_frame(frame)
        except asyncio.CancelledError:
            # close() cancels the stream's reader; Python 3.11's start_server then calls
            # task.exception() on it, which raises and logs a traceback for every stream
            # at shutdown: end as a hung-up stream ends (nothing awaits this task)
            return
        finally:
            if task is not None:
                self._readers.discard(task)
            writer.close()

    def _takes(self, peer: str, frame: Frame) -> bool:
        """Whether a frame from this (authenticated) peer may start work here."""
        if self.admitted is None or peer in self.admitted:
            return True
        return frame.kind not in ADMITTED_KINDS

    def _answer_probe_soon(self, peer: str, frame: Frame) -> None:
        task = asyncio.create_task(self._answer_probe(peer, frame))
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    def count_bad(self, reason: str) -> None:
        """Count one piece of malformed data-plane input under its kind (the reason up to
        its first colon), logged once per kind; the agent counts bad payloads here too."""
        kind = reason.split(":", 1)[0]
        if self.bad_frames[kind] == 0:
            log.warning(
                "%s: dropped data-plane input (%s); logged once per kind", self.name, reason
            )
        self.bad_frames[kind] += 1
