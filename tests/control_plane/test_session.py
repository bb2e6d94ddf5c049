"""BrokerSession against the real embedded broker: a request is answered, a request is sent
again after the broker restarted (once the role's before_resend hook lets it), malformed
messages are counted by kind and logged once per kind, and a broker that never answers
ends the session with the role's error."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable

import aiomqtt
import pytest
from pydantic import BaseModel

from edgepart.control_plane import protocol as proto
from edgepart.control_plane.session import BrokerSession, Publish, SessionHooks, first_error
from edgepart.emulator.broker import EmbeddedBroker, free_port

TESTBED = "session-test"
DEVICE = "d0"
TIMEOUT_S = 30.0  # bounds every wait here; only a broken session gets near it
log = logging.getLogger("edgepart.test-session")


class RoleError(RuntimeError):
    """The role's own error type, raised by the session."""


def _session(endpoint: str, hooks: SessionHooks | None = None, **kwargs) -> BrokerSession:
    kinds = ("reply", "telemetry", "status")
    return BrokerSession(
        endpoint,
        "edgepart-session-test",
        [proto.subscription(TESTBED, kind) for kind in kinds],
        log=log,
        hooks=hooks,
        error=RoleError,
        **kwargs,
    )


async def _answering(endpoint: str, subscribed: asyncio.Event, seen: list[str]) -> None:
    """An agent stand-in: answers every command on its cmd topic (ok), noting its id."""
    host, _, port = endpoint.rpartition(":")
    async with aiomqtt.Client(host, int(port), identifier="edgepart-session-agent") as client:
        await client.subscribe(proto.device_topic(TESTBED, DEVICE, "cmd"), qos=1)
        subscribed.set()
        async for message in client.messages:
            command = proto.decode("cmd", message.payload)
            assert not isinstance(command, proto.Malformed)
            seen.append(command.id)
            reply = proto.Reply(id=command.id, name=DEVICE, ok=True)
            await client.publish(proto.device_topic(TESTBED, DEVICE, "reply"), proto.encode(reply))


async def _with_session(session: BrokerSession, body: Callable[[], Awaitable[object]]):
    """Run the session beside ``body`` and return what body returns."""
    link = asyncio.create_task(session.run())
    try:
        return await asyncio.wait_for(body(), TIMEOUT_S)
    finally:
        link.cancel()
        await asyncio.gather(link, return_exceptions=True)


def test_a_request_is_answered() -> None:
    async def main(endpoint: str) -> proto.Reply:
        session = _session(endpoint)
        subscribed, seen = asyncio.Event(), []
        agent = asyncio.create_task(_answering(endpoint, subscribed, seen))

        async def body() -> proto.Reply:
            await subscribed.wait()
            command = proto.Reset(id="c0", op="reset")
            return await session.request(proto.device_topic(TESTBED, DEVICE, "cmd"), command, 10)

        try:
            return await _with_session(session, body)
        finally:
            agent.cancel()
            await asyncio.gather(agent, return_exceptions=True)

    with EmbeddedBroker() as broker:
        reply = asyncio.run(main(broker.endpoint))
    assert reply.id == "c0" and reply.ok


def test_a_request_is_sent_again_after_the_broker_restarts() -> None:
    """The command is lost with the broker (nobody was subscribed); after the restart the
    session publishes the retained message again, waits for the agent (before_resend) and
    sends the unanswered command again, which the agent then answers."""
    broker = EmbeddedBroker()
    events: list[str] = []
    subscribed, seen = asyncio.Event(), []
    agent: asyncio.Task | None = None

    async def on_connected(publish: Publish) -> None:
        events.append("connected")
        await publish(proto.placement_topic(TESTBED), b"{}", retain=True)

    async def before_resend() -> None:
        nonlocal agent
        events.append("before_resend")
        agent = asyncio.create_task(_answering(broker.endpoint, subscribed, seen))
        await subscribed.wait()

    hooks = SessionHooks(
        on_connected=on_connected,
        before_resend=before_resend,
        on_lost=lambda exc: events.append("lost"),
    )

    async def main() -> proto.Reply:
        session = _session(broker.endpoint, hooks)

        async def body() -> proto.Reply:
            await session.connected()
            topic = proto.device_topic(TESTBED, DEVICE, "cmd")
            command = proto.Reset(id="c7", op="reset")
            asked = asyncio.create_task(session.request(topic, command, 20))
            await asyncio.sleep(0.2)  # published to nobody: no agent yet
            assert not asked.done()
            await asyncio.to_thread(broker.stop)
            await asyncio.to_thread(broker.start)
            return await asked

        try:
            reply = await _with_session(session, body)
        finally:
            if agent is not None:
                agent.cancel()
                await asyncio.gather(agent, return_exceptions=True)
        assert session.losses == 1 and session.is_ready is False  # stopped with the test
        return reply

    with broker:
        reply = asyncio.run(main())
    assert reply.id == "c7" and reply.ok
    assert seen == ["c7"]  # sent again once, after the agent was there
    assert events == ["connected", "lost", "connected", "before_resend"]


def test_malformed_messages_are_counted_per_kind_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    status = proto.Status(name=DEVICE, state="online")
    bad = [
        (proto.device_topic(TESTBED, DEVICE, "telemetry"), b"\xff not json"),
        (proto.device_topic(TESTBED, DEVICE, "telemetry"), b'{"v": 2, "name": "d0"}'),
        (proto.device_topic(TESTBED, DEVICE, "status"), b'{"v": 1, "name": "d0", "state": "x"}'),
        (proto.device_topic(TESTBED, DEVICE, "reply"), b'{"v": 1, "id": "c1", "ok": "maybe"}'),
        (proto.device_topic("other", DEVICE, "status"), b"skipped: not accepted, not counted"),
    ]
    good = [(proto.device_topic(TESTBED, DEVICE, "status"), proto.encode(status))]
    kinds: list[str] = []
    taken: list[BaseModel] = []
    done = asyncio.Event()

    async def on_message(topic: proto.Topic, message: BaseModel) -> None:
        taken.append(message)
        done.set()

    hooks = SessionHooks(
        on_message=on_message,
        accepts=lambda topic: topic.testbed == TESTBED,
        on_dropped=kinds.append,
    )

    async def main(endpoint: str) -> BrokerSession:
        session = _session(endpoint, hooks)
        session.subscriptions += (proto.subscription("other", "status"),)
        host, _, port = endpoint.rpartition(":")

        async def body() -> None:
            await session.connected()
            async with aiomqtt.Client(host, int(port), identifier="edgepart-session-bad") as c:
                for topic, payload in bad + good:  # one publisher, qos 1: kept in order
                    await c.publish(topic, payload, qos=1)
            await done.wait()

        await _with_session(session, body)
        return session

    with EmbeddedBroker() as broker, caplog.at_level(logging.WARNING, logger=log.name):
        session = asyncio.run(main(broker.endpoint))
    want = {"telemetry": 2, "status": 1, "reply": 1}
    assert dict(session.dropped.by_kind) == want and session.dropped.total == 4
    assert Counter(kinds) == want
    assert taken == [status]  # the loop went on to the valid message after the bad ones
    logged = Counter(r.args[0] for r in caplog.records if "once per kind" in r.getMessage())
    assert logged == {kind: 1 for kind in want}


def test_a_broker_that_never_answers_ends_the_session_with_the_roles_error() -> None:
    session = _session(f"127.0.0.1:{free_port()}", start_window_s=0.5)
    with pytest.raises(RoleError, match="unreachable"):
        asyncio.run(asyncio.wait_for(session.run(), TIMEOUT_S))


def test_first_error_finds_the_roles_error_in_nested_groups() -> None:
    inner = BaseExceptionGroup("inner", [KeyError("k"), RoleError("this one")])
    group = BaseExceptionGroup("outer", [inner])
    assert str(first_error(group, RoleError)) == "this one"
    assert first_error(group, TimeoutError) is None


def test_an_operation_on_a_lost_connection_is_given_up_at_the_loss() -> None:
    # aiomqtt waits for a publish's acknowledgement until its 30 s timeout even after the
    # broker went; the session gives such a wait up when it sees the loss (the reconnect
    # sends the request again), and lets one that finished through
    async def main() -> None:
        session = _session("127.0.0.1:1")
        done = await session._until_lost(asyncio.sleep(0))
        assert done is None
        never = asyncio.get_running_loop().create_future()
        waiting = asyncio.ensure_future(session._until_lost(never))
        await asyncio.sleep(0)
        assert not waiting.done()
        session._lose(aiomqtt.MqttError("gone"))
        with pytest.raises(aiomqtt.MqttError, match="lost"):
            await asyncio.wait_for(waiting, TIMEOUT_S)
        assert never.cancelled()  # nothing keeps waiting on the old connection
        assert session.losses == 1

    asyncio.run(main())
