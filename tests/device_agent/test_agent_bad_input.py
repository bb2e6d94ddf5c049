"""One real agent process fed every kind of bad input at once, over MQTT and its data port.

Payloads that once escaped the decoder (an integer of 5000 digits, arrays nested 100 000
deep) and data-plane input that parses but cannot be used (activations of the wrong dtype or
shape, a committed batch whose block state fails its checksum, a block state no agent sends
unasked) must each be dropped and counted under its kind; the agent answers the bad batch
with an ERROR naming the checksum, keeps answering commands, exports the counts on /metrics
with a ``kind`` label, and exits cleanly when told to.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess
import sys
import urllib.request

import aiomqtt
import torch
from prometheus_client.parser import text_string_to_metric_families

from edgepart.control_plane import protocol as proto
from edgepart.device_agent.dataplane import DataPlane
from edgepart.device_agent.wire import Frame, Kind, encode_batch, encode_frame, tensor_to_payload
from edgepart.emulator.broker import EmbeddedBroker
from edgepart.llm.model import preset
from edgepart.llm.state import BlockState, dump_state

TESTBED = "bad-input"
NAME = "dev"
PEER = "peer"
SPEC = preset("smollm2-135m")
TIMEOUT_S = 60.0

#: kinds the agent counts the bad MQTT payloads below under (their topic kinds)
MESSAGE_KINDS = {"cmd", "placement", "status"}
#: kinds the agent counts the bad data-plane input below under
FRAME_KINDS = {
    "not a frame",
    "frame over the limit",
    "unknown tensor dtype",
    "activation",
    "block batch",
    "unexpected frame",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _placement(ffn0_on: str) -> dict[str, str]:
    """Every block on the peer, but layer 0's FFN where told."""
    blocks = ["embed", "head"] + [
        f"L{layer}.{b}"
        for layer in range(SPEC.layers)
        for b in [*(f"g{g}" for g in range(SPEC.kv_heads)), "proj", "ffn"]
    ]
    placement = dict.fromkeys(blocks, PEER)
    placement["L0.ffn"] = ffn0_on
    return placement


async def _until(client: aiomqtt.Client, kind: str, check, timeout_s: float = TIMEOUT_S):
    """The first message of that kind for which check(decoded) holds."""

    async def scan():
        async for message in client.messages:
            topic = proto.parse_topic(message.topic.value)
            if topic is None or topic.kind != kind or topic.device not in (NAME, None):
                continue
            decoded = proto.decode(kind, message.payload)
            if not isinstance(decoded, proto.Malformed) and check(decoded):
                return decoded
        raise AssertionError("message stream ended")

    return await asyncio.wait_for(scan(), timeout_s)


async def _raw(peer: DataPlane, data: bytes) -> None:
    """Send bytes on a data-plane stream the peer opened properly (handshake and all)."""
    writer = await peer._writer(NAME)
    await writer.send(data)
    writer.close()
    peer._writers.pop(NAME, None)


async def _scenario(endpoint: str, metrics_port: int) -> str:
    host, _, port = endpoint.rpartition(":")
    answers: list[Frame] = []

    async def on_frame(frame: Frame) -> None:
        answers.append(frame)

    peer = DataPlane(PEER, on_frame)
    p_host, p_port = await peer.start("127.0.0.1", 0)
    try:
        async with aiomqtt.Client(host, int(port), identifier="test-controller") as client:
            for kind in ("status", "telemetry", "reply"):
                await client.subscribe(proto.subscription(TESTBED, kind, NAME), qos=1)
            status = await _until(client, "status", lambda s: s.state == "online" and s.listen)
            cmd = proto.device_topic(TESTBED, NAME, "cmd")
            placement = proto.placement_topic(TESTBED)
            endpoints = {NAME: status.listen, PEER: f"{p_host}:{p_port}"}
            for epoch, ffn0 in ((0, PEER), (1, NAME)):
                msg = proto.PlacementEpoch(
                    epoch=epoch, placement=_placement(ffn0), endpoints=endpoints
                )
                await client.publish(placement, proto.encode(msg), qos=1)

            # -- MQTT: the last two used to raise inside the agent's message loop
            await client.publish(cmd, b"\xff\x00 not json", qos=1)
            huge = b'{"v": 1, "id": "x", "op": "reset", "n": ' + b"9" * 5000 + b"}"
            await client.publish(cmd, huge, qos=1)
            await client.publish(cmd, b"[" * 100_000, qos=1)
            await client.publish(cmd, b'{"v": true, "id": "x", "op": "reset"}', qos=1)
            await client.publish(placement, b'{"v": 1, "epoch": 2, "placement": {"x": 1}}', qos=1)
            other = proto.device_topic(TESTBED, "other", "status")
            await client.publish(other, b'{"v": 1, "name": "other", "state": "dozing"}', qos=1)

            # -- data plane
            peer.set_endpoints({NAME: status.listen})
            await _raw(peer, b"GET /metrics HTTP/1.1\r\n\r\n")
            oversized = encode_frame(Frame(Kind.ACTIVATION, 1, 9, "x0", b""))[:-8]
            await _raw(peer, oversized + struct.pack("<Q", 2**40))
            unknown_dtype = b"\x09\x02" + struct.pack("<II", 1, 1) + b"\x00" * 4
            forged = [
                Frame(Kind.ACTIVATION, 1, 50, "x0", unknown_dtype),
                # parse, but cannot be what x0 carries: (tokens, 576) float32
                Frame(Kind.ACTIVATION, 1, 51, "x0", tensor_to_payload(torch.zeros(1, 576).half())),
                Frame(Kind.ACTIVATION, 1, 52, "x0", tensor_to_payload(torch.zeros(1, 7))),
                Frame(Kind.ACTIVATION, 1, 53, "o0:0,9", tensor_to_payload(torch.zeros(1, 64))),
            ]
            blob = bytearray(dump_state(BlockState(SPEC.name, "L0.ffn", "float32")))
            blob[12] ^= 0x01  # in the JSON header: the checksum no longer matches
            forged += [
                Frame(Kind.BLOCK_BATCH, 1, 0, PEER, encode_batch([("L0.ffn", bytes(blob))])),
                Frame(Kind.BLOCK_STATE, 1, 0, "L0.ffn", b"whatever"),  # only a FETCH's answer
            ]
            for frame in forged:
                await peer.send(NAME, frame, TIMEOUT_S)

            # everything counted (6 messages, 8 frames), and the agent still answers
            telemetry = await _until(
                client, "telemetry", lambda t: t.dropped_messages >= 6 and t.dropped_frames >= 8
            )
            assert (telemetry.dropped_messages, telemetry.dropped_frames) == (6, 8)
            await client.publish(cmd, proto.encode(proto.Reset(id="r", op="reset")), qos=1)
            reply = await _until(client, "reply", lambda r: r.id == "r")
            assert reply.ok, reply.error
        # the bad batch was answered, naming why
        async with asyncio.timeout(TIMEOUT_S):
            while not any(f.kind == Kind.ERROR and f.name == NAME for f in answers):
                await asyncio.sleep(0.05)
        errors = [f for f in answers if f.kind == Kind.ERROR and f.name == NAME]
        assert b"checksum" in errors[0].payload, errors
    finally:
        await peer.close()
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode("utf-8")


def _by_kind(text: str, name: str) -> dict[str, float]:
    return {
        s.labels["kind"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and s.labels.get("device") == NAME
    }


def test_every_kind_of_bad_input_is_counted_by_kind_and_survived() -> None:
    metrics_port = _free_port()
    with EmbeddedBroker() as broker:
        args = ["--name", NAME, "--broker", broker.endpoint, "--testbed", TESTBED]
        args += ["--memory-mib", "256", "--metrics-port", str(metrics_port)]
        agent = subprocess.Popen([sys.executable, "-m", "edgepart.device_agent", *args])
        try:
            text = asyncio.run(_scenario(broker.endpoint, metrics_port))
        finally:
            agent.terminate()
            agent.wait(timeout=20)
    assert agent.returncode == 0
    messages = _by_kind(text, "edgepart_agent_dropped_messages_total")
    assert messages == {"cmd": 4, "placement": 1, "status": 1}
    frames = _by_kind(text, "edgepart_agent_dropped_frames_total")
    assert frames == {
        "not a frame": 1,
        "frame over the limit": 1,
        "unknown tensor dtype": 1,
        "activation": 3,
        "block batch": 1,
        "unexpected frame": 1,
    }
    assert set(messages) == MESSAGE_KINDS and set(frames) == FRAME_KINDS
