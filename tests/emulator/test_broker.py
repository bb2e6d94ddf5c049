"""The emulator's MQTT brokers: pub/sub, retained messages, last will, clean shutdown."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import aiomqtt
import pytest

import edgepart.emulator.broker as broker_mod
from edgepart.emulator.broker import (
    BrokerUnavailable,
    EmbeddedBroker,
    Mosquitto,
    SnapshotSubscriptions,
    free_port,
    mosquitto_available,
    parse_endpoint,
)

Broker = EmbeddedBroker | Mosquitto

# Every wait in these tests is on a condition; this only bounds how long a broken broker can hang.
TIMEOUT_S = 5.0

KINDS = [
    pytest.param("embedded", id="embedded"),
    pytest.param(
        "mosquitto",
        id="mosquitto",
        marks=pytest.mark.skipif(
            not mosquitto_available(), reason="mosquitto missing: apt-get install mosquitto"
        ),
    ),
]

# A client that registers a retained last will, says so once the broker has accepted it, then
# idles until it is killed -9, so the broker sees the connection die without a DISCONNECT.
WILL_CLIENT = """
import sys
import paho.mqtt.client as mqtt

host, port, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3]
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="edgepart-will-test")
client.will_set(topic, b"offline", qos=1, retain=True)

def on_connect(client, userdata, flags, reason_code, properties):
    print("refused" if reason_code.is_failure else "connected", flush=True)

client.on_connect = on_connect
client.connect(host, port, keepalive=60)
client.loop_forever()
"""


def make_broker(kind: str, port: int = 0) -> Broker:
    return EmbeddedBroker(port=port) if kind == "embedded" else Mosquitto(port=port)


@pytest.fixture(params=KINDS)
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    b = make_broker(request.param)
    b.start()
    try:
        yield b
    finally:
        b.stop()


async def next_message(client: aiomqtt.Client) -> aiomqtt.Message:
    return await asyncio.wait_for(anext(client.messages), TIMEOUT_S)


def test_publish_subscribe_round_trip(broker: Broker) -> None:
    async def scenario() -> None:
        async with (
            aiomqtt.Client(broker.host, broker.port) as sub,
            aiomqtt.Client(broker.host, broker.port) as pub,
        ):
            await sub.subscribe("edgepart/t/devices/+/telemetry", qos=1)
            await pub.publish("edgepart/t/devices/a/telemetry", b'{"v": 1}', qos=1)
            msg = await next_message(sub)
            assert msg.topic.value == "edgepart/t/devices/a/telemetry"
            assert msg.payload == b'{"v": 1}'

    asyncio.run(scenario())


def test_retained_message_reaches_later_subscriber(broker: Broker) -> None:
    async def scenario() -> None:
        async with aiomqtt.Client(broker.host, broker.port) as pub:
            await pub.publish("edgepart/t/placement", b"epoch-3", qos=1, retain=True)
        async with aiomqtt.Client(broker.host, broker.port) as late:
            await late.subscribe("edgepart/t/placement", qos=1)
            msg = await next_message(late)
            assert msg.payload == b"epoch-3"
            assert msg.retain

    asyncio.run(scenario())


def test_last_will_on_connection_death(broker: Broker) -> None:
    topic = "edgepart/t/devices/a/status"

    async def scenario() -> None:
        async with aiomqtt.Client(broker.host, broker.port) as sub:
            await sub.subscribe(topic, qos=1)
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                WILL_CLIENT,
                broker.host,
                str(broker.port),
                topic,
                stdout=asyncio.subprocess.PIPE,
            )
            try:
                assert proc.stdout is not None
                line = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT_S)
                assert line == b"connected\n"
            finally:
                proc.kill()
                await asyncio.wait_for(proc.wait(), TIMEOUT_S)
            msg = await next_message(sub)
            assert msg.topic.value == topic
            assert msg.payload == b"offline"
        # The will was retained, as a device's status must be for controllers that start later.
        async with aiomqtt.Client(broker.host, broker.port) as late:
            await late.subscribe(topic, qos=1)
            msg = await next_message(late)
            assert msg.payload == b"offline"
            assert msg.retain

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", KINDS)
def test_stop_frees_port_and_leaves_nothing(kind: str) -> None:
    b = make_broker(kind)
    b.start()
    assert b.running
    pid = b.pid if isinstance(b, Mosquitto) else None

    async def stop_under_live_client() -> None:
        async with aiomqtt.Client(b.host, b.port) as client:
            b.stop()
            # The client sees the connection end, rather than hanging on a half-dead broker.
            with pytest.raises(aiomqtt.MqttError):
                await next_message(client)

    asyncio.run(stop_under_live_client())
    b.stop()  # idempotent

    assert not b.running
    assert not [t for t in threading.enumerate() if t.name.startswith("edgepart-broker-")]
    if pid is not None:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    # Bind as any server would (SO_REUSEADDR tolerates the closed connections' TIME_WAIT).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((b.host, b.port))
        sock.listen()
    # And a broker can come back on the same endpoint.
    with make_broker(kind, b.port) as again:
        assert again.endpoint == b.endpoint
        assert again.running
    assert not again.running


@pytest.mark.skipif(
    not mosquitto_available(), reason="mosquitto missing: apt-get install mosquitto"
)
def test_mosquitto_does_not_outlive_an_interpreter_that_forgot_it() -> None:
    code = (
        "from edgepart.emulator.broker import Mosquitto\n"
        "m = Mosquitto()\nm.start()\nprint(m.pid)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=2 * TIMEOUT_S, check=True
    )
    with pytest.raises(ProcessLookupError):
        os.kill(int(done.stdout), 0)


@pytest.mark.parametrize("kind", KINDS)
def test_start_fails_clearly_when_port_taken(kind: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        b = make_broker(kind, port)
        with pytest.raises(RuntimeError, match=str(port)):
            b.start(timeout_s=TIMEOUT_S)
        assert not b.running
        b.stop()


def test_embedded_rejects_ipv6_literal() -> None:
    with pytest.raises(ValueError, match="IPv6"):
        EmbeddedBroker(host="::1")


def test_mosquitto_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_mod, "mosquitto_path", lambda: None)
    assert not broker_mod.mosquitto_available()
    with pytest.raises(BrokerUnavailable, match="apt-get install mosquitto"):
        Mosquitto().start()


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:  # pragma: no cover -- another process won the race
            assert exc.errno == errno.EADDRINUSE


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:1883", ("127.0.0.1", 1883)),
        ("broker.local:8883", ("broker.local", 8883)),
        (" localhost:1 ", ("localhost", 1)),
        ("[::1]:1883", ("::1", 1883)),
    ],
)
def test_parse_endpoint(text: str, expected: tuple[str, int]) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("localhost", "host:port"),
        (":1883", "host:port"),
        ("localhost:mqtt", "not a number"),
        ("localhost:0", "outside"),
        ("localhost:70000", "outside"),
        ("::1:1883", "brackets"),
        ("[]:1883", "empty host"),
    ],
)
def test_parse_endpoint_rejects(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_endpoint(text)


def test_subscriptions_change_while_the_broker_walks_them() -> None:
    # amqtt walks its table with an await per topic while another client may subscribe
    table = SnapshotSubscriptions({"a": [], "b": []})
    for topic in table:
        table[topic + "/new"] = []  # a plain dict raises "changed size during iteration"
    for topic, _ in table.items():
        del table[topic]
    assert table == {}
    broker = EmbeddedBroker()
    broker.start()
    try:
        assert isinstance(broker.subscriptions, SnapshotSubscriptions)  # the running table
    finally:
        broker.stop()
