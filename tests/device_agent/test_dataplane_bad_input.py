"""A real data plane fed bad frames over TCP: each is counted under a fixed kind, the first
of each kind is logged, the port keeps serving, and the kinds reach the agent's Prometheus
exposition with a ``kind`` label."""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import Counter
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edgepart.device_agent.dataplane import DataPlane
from edgepart.device_agent.metrics import AgentCollector
from edgepart.device_agent.wire import Frame, Kind, encode_frame

TIMEOUT_S = 10.0
LIMIT = 1024  # the receiver's frame limit (bytes of payload)


def _good(kind: Kind = Kind.ACK, payload: bytes = b"abc") -> bytes:
    return encode_frame(Frame(kind, 1, 2, "x0", payload))


def _patched(offset: int, value: bytes) -> bytes:
    raw = bytearray(_good())
    raw[offset : offset + len(value)] = value
    return bytes(raw)


#: what a connected peer sends, and the kind the receiver counts it under
BAD_STREAMS: dict[str, bytes] = {
    "not a frame": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "unsupported frame version": _patched(4, b"\x07"),
    "unknown frame kind": _patched(5, b"\x05"),
    "frame name is not UTF-8": _patched(16, b"\xff\xfe"),
    # the header alone claims more than the limit: refused before reading any payload
    "frame over the limit": _good()[:-11] + struct.pack("<Q", LIMIT + 1),
    # the peer closes in the middle of a frame
    "frame truncated": _good(Kind.ACTIVATION, b"\x00" * 64)[:-10],
}


@dataclass
class _Host:
    blocks: dict[str, object] = field(default_factory=dict)

    def cache_bytes(self) -> int:
        return 0


@dataclass
class _Blocks:
    budget: int = 1 << 20
    host: _Host = field(default_factory=_Host)

    def used_bytes(self) -> int:
        return 0


@dataclass
class _StandIn:
    """The agent state the metrics collector reads, around a real data plane."""

    plane: DataPlane
    name: str = "rx"
    blocks: _Blocks = field(default_factory=_Blocks)
    dropped_messages: Counter[str] = field(default_factory=Counter)


async def _until(condition, timeout_s: float = TIMEOUT_S) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


def test_bad_frames_are_counted_per_kind_logged_once_and_exported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    received: list[Frame] = []

    async def on_frame(frame: Frame) -> None:
        received.append(frame)

    async def main() -> DataPlane:
        rx = DataPlane("rx", on_frame, max_payload=LIMIT)
        tx = DataPlane("tx", lambda frame: asyncio.sleep(0))
        host, port = await rx.start("127.0.0.1", 0)
        tx.set_endpoints({"rx": f"{host}:{port}"})
        try:
            for round_ in (1, 2):  # each kind twice: counted twice, logged once
                for kind, raw in BAD_STREAMS.items():
                    # a stream the peer opened properly (handshake and all), then garbage
                    writer = await tx._writer("rx")
                    await writer.send(raw)
                    writer.close()
                    tx._writers.pop("rx", None)
                    await _until(lambda k=kind, n=round_: rx.bad_frames[k] == n)
            # the port still serves: a good frame on a new stream arrives
            await tx.send("rx", Frame(Kind.ACTIVATION, 1, 7, "x0", b"ok"), TIMEOUT_S)
            await _until(lambda: received)
        finally:
            await tx.close()
            await rx.close()
        return rx

    with caplog.at_level(logging.WARNING, logger="edgepart.device_agent.dataplane"):
        rx = asyncio.run(main())
    assert dict(rx.bad_frames) == {kind: 2 for kind in BAD_STREAMS}
    assert [(f.token, f.payload) for f in received] == [(7, b"ok")]
    logged = Counter(
        str(r.args[1]).split(":", 1)[0]
        for r in caplog.records
        if r.name == "edgepart.device_agent.dataplane" and "once per kind" in r.getMessage()
    )
    assert logged == {kind: 1 for kind in BAD_STREAMS}

    registry = CollectorRegistry()
    registry.register(AgentCollector(_StandIn(rx)))
    text = generate_latest(registry).decode("utf-8")
    exported = {
        s.labels["kind"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "edgepart_agent_dropped_frames_total" and s.labels["device"] == "rx"
    }
    assert exported == {kind: 2.0 for kind in BAD_STREAMS}
