"""One real agent process on the embedded broker: bad input is counted and ignored, a load
over the memory budget is refused with a reason instead of an out-of-memory kill, and the
memory another app takes is held for real once the agent's blocks leave room for it."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import aiomqtt

from edgepart.control_plane import protocol as proto
from edgepart.emulator.broker import EmbeddedBroker

TESTBED = "agent-test"
MIB = 1024 * 1024
NAME = "dev"


async def _until(client: aiomqtt.Client, kind: str, check, timeout_s: float = 60.0):
    """The first message of that kind for which check(decoded) holds."""

    async def scan():
        async for message in client.messages:
            topic = proto.parse_topic(message.topic.value)
            if topic is None or topic.kind != kind:
                continue
            decoded = proto.decode(kind, message.payload)
            if not isinstance(decoded, proto.Malformed) and check(decoded):
                return decoded
        raise AssertionError("message stream ended")

    return await asyncio.wait_for(scan(), timeout_s)


async def _scenario(endpoint: str) -> None:
    host, _, port = endpoint.rpartition(":")
    async with aiomqtt.Client(host, int(port), identifier="test-controller") as client:
        for kind in ("status", "telemetry", "reply"):
            await client.subscribe(proto.subscription(TESTBED, kind, NAME), qos=1)
        status = await _until(client, "status", lambda s: s.state == "online" and s.listen)
        cmd = proto.device_topic(TESTBED, NAME, "cmd")
        # three kinds of bad control input
        await client.publish(cmd, b"\xff\x00 not json", qos=1)
        await client.publish(cmd, b'{"v": 99, "op": "drop"}', qos=1)
        await client.publish(cmd, b'{"v": 1, "op": "load", "id": "x", "blocks": ["L1.bogus"]}')
        # garbage on the data port
        d_host, _, d_port = status.listen.rpartition(":")
        _, writer = await asyncio.wait_for(asyncio.open_connection(d_host, int(d_port)), 5)
        writer.write(b"GET / HTTP/1.1\r\n\r\n" + bytes(range(256)))
        await writer.drain()
        writer.close()
        telemetry = await _until(
            client, "telemetry", lambda t: t.dropped_messages >= 3 and t.dropped_frames >= 1
        )
        assert telemetry.blocks == ()
        # still serving: a load over its 64 MiB budget is refused with the reason
        ffns = tuple(f"L{layer}.ffn" for layer in range(8))
        load = proto.Load(id="big", op="load", blocks=ffns)
        await client.publish(cmd, proto.encode(load), qos=1)
        reply = await _until(client, "reply", lambda r: r.id == "big")
        assert not reply.ok and "over the budget" in reply.error
        small = proto.Load(id="small", op="load", blocks=("L0.ffn",))
        await client.publish(cmd, proto.encode(small), qos=1)
        reply = await _until(client, "reply", lambda r: r.id == "small")
        assert reply.ok, reply.error
        await _until(client, "telemetry", lambda t: t.blocks == ("L0.ffn",))
        # another app takes 16 MiB: its ballast is real at once, as the block still fits
        await _command(
            client,
            proto.SetBudget(
                id="b1", op="set_budget", memory_bytes=48 * MIB, occupied_bytes=16 * MIB
            ),
        )
        await _until(client, "telemetry", lambda t: t.occupied_bytes == 16 * MIB)
        # it wants 56 MiB: the ballast waits until the block has left the 8 MiB budget
        await _command(
            client,
            proto.SetBudget(
                id="b2", op="set_budget", memory_bytes=8 * MIB, occupied_bytes=56 * MIB
            ),
        )
        telemetry = await _until(client, "telemetry", lambda t: t.memory_budget_bytes == 8 * MIB)
        assert telemetry.occupied_bytes == 16 * MIB
        await _command(client, proto.Drop(id="d", op="drop", blocks=("L0.ffn",)))
        await _until(client, "telemetry", lambda t: t.occupied_bytes == 56 * MIB)
        # the app ends
        await _command(client, proto.SetBudget(id="b3", op="set_budget", memory_bytes=64 * MIB))
        await _until(client, "telemetry", lambda t: t.occupied_bytes == 0)


async def _command(client: aiomqtt.Client, command) -> None:
    await client.publish(proto.device_topic(TESTBED, NAME, "cmd"), proto.encode(command), qos=1)
    reply = await _until(client, "reply", lambda r: r.id == command.id)
    assert reply.ok, reply.error


def test_bad_input_is_counted_and_budgets_are_enforced() -> None:
    with EmbeddedBroker() as broker:
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgepart.device_agent",
                "--name",
                NAME,
                "--broker",
                broker.endpoint,
                "--testbed",
                TESTBED,
                "--memory-mib",
                "64",
            ]
        )
        try:
            asyncio.run(_scenario(broker.endpoint))
        finally:
            agent.terminate()
            agent.wait(timeout=10)
    assert agent.returncode == 0
