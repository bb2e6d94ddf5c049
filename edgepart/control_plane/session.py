"""One role's session with the MQTT broker, for every role: agent, controller, emulator driver.

``BrokerSession`` keeps what each role used to hold a copy of:

- ``run()``, the one reconnect loop, in aiomqtt's documented pattern (a client context
  per attempt, ``MqttError`` caught around it, a pause, the next attempt), with a fresh
  client per attempt (one whose connect failed is not reused) and exponential backoff.
  A broker that does not answer within START_WINDOW_S at the start, or stays away
  BROKER_LOST_WINDOW_S after a loss, ends it with the role's error.
- After every connect: subscribe, then the role's ``on_connected`` (what a restarted broker
  forgot, e.g. a retained message); after a *re*connect also, in a task beside the
  reading, its ``before_resend`` (e.g. wait until the agents are back); then every
  request still unanswered goes out again, and the session is ready for publishing.
- ``request(topic, command, timeout_s)``: publish a command and wait for the Reply with
  its id; until answered it is sent again after every reconnect (receivers carry out an
  id once and answer a repeated one from what they kept).
- ``publish(topic, message, retry=...)`` on the ready session.
- ``messages(client)``: a client's messages decoded (``protocol.decode``); malformed ones
  are counted per topic kind (``dropped``) and the first of each kind is logged.

The role keeps only its own behaviour, as the callbacks of ``SessionHooks``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiomqtt
from pydantic import BaseModel

from edgepart.control_plane import mqtt
from edgepart.control_plane import protocol as proto

#: how long (s) a role retries the broker at its start (a testbed's services start in any
#: order, and a swarm's are restarted until their dependencies answer)
START_WINDOW_S = 90.0
#: how long (s) a broker lost mid-run is retried; every role keeps its state meanwhile
BROKER_LOST_WINDOW_S = 60.0
FIRST_RETRY_S = 0.2  # pause (s) before the first reconnect attempt; doubled per failure
LAST_RETRY_S = 2.0  # longest pause (s) between connect attempts
PUBLISH_ATTEMPTS = 5  # a retried publish failing on a connected client is tried this often
PUBLISH_PAUSE_S = 0.2  # times the attempt number: the pause (s) before a publish's next try


class SessionError(RuntimeError):
    """The broker stayed away (the default error; roles pass their own)."""


class MalformedCount:
    """Malformed input counted per kind; only the first of each kind is logged (a stream of
    bad messages must not flood the log)."""

    def __init__(
        self,
        log: logging.Logger,
        on_drop: Callable[[str], None] | None = None,
        what: str = "message",
    ) -> None:
        """``what``: the input's noun in the log line; ``on_drop(kind)`` (e.g. a metric) is
        called for every one dropped."""
        self.log = log
        self.on_drop = on_drop
        self.what = what
        self.by_kind: Counter[str] = Counter()

    def __call__(self, kind: str, reason: str) -> None:
        """Count one malformed input of ``kind`` (logged with ``reason`` if the first)."""
        if self.by_kind[kind] == 0:
            self.log.warning(
                "dropped a malformed %s %s (%s); logged once per kind", kind, self.what, reason
            )
        self.by_kind[kind] += 1
        if self.on_drop is not None:
            self.on_drop(kind)

    @property
    def total(self) -> int:
        """Malformed inputs of every kind so far."""
        return sum(self.by_kind.values())


class Publish(Protocol):
    """A publish on one connection (what ``on_connected`` gets)."""

    def __call__(
        self, topic: str, message: BaseModel | bytes, *, retain: bool = False
    ) -> Awaitable[None]: ...


async def _ignore(topic: proto.Topic, message: BaseModel) -> None:
    """The default message handler: the role reads nothing beyond replies."""


@dataclass(frozen=True)
class SessionHooks:
    """A role's own behaviour around its session (every hook optional)."""

    #: every well-formed message the role accepts, but the replies to its requests
    on_message: Callable[[proto.Topic, BaseModel], Awaitable[None]] = _ignore
    #: which topics the role reads at all (others are skipped unread: not counted)
    accepts: Callable[[proto.Topic], bool] | None = None
    #: after every connect, before anything is read: publish what a restarted broker
    #: forgot (e.g. a retained message) or what a connect announces (an online status)
    on_connected: Callable[[Publish], Awaitable[None]] | None = None
    #: after a reconnect, beside the reading: awaited before the unanswered requests go
    #: out again and the session is ready (e.g. until the agents are back)
    before_resend: Callable[[], Awaitable[None]] | None = None
    #: once per loss of a connected broker, with the error
    on_lost: Callable[[Exception], None] | None = None
    #: per malformed message dropped, its topic kind (e.g. for a metric)
    on_dropped: Callable[[str], None] | None = None


class BrokerSession:
    """One role's session: connected, reconnected, read, and published on (see the module)."""

    def __init__(
        self,
        broker: str,
        identifier: str,
        subscriptions: Sequence[str],
        *,
        log: logging.Logger,
        hooks: SessionHooks | None = None,
        error: Callable[[str], Exception] = SessionError,
        auth: mqtt.BrokerAuth | None = None,
        will: aiomqtt.Will | None = None,
        keepalive: int = mqtt.DEFAULT_KEEPALIVE_S,
        start_window_s: float = START_WINDOW_S,
        lost_window_s: float = BROKER_LOST_WINDOW_S,
    ) -> None:
        """A session with the broker at ``host:port`` as ``identifier``, subscribed to the
        topic filters ``subscriptions``; failures are raised as ``error(message)`` (the
        role's own exception type) and logged on ``log``."""
        self.broker = broker
        self.identifier = identifier
        self.subscriptions = tuple(subscriptions)
        self.log = log
        self.hooks = hooks = hooks or SessionHooks()
        self.error = error
        self.auth = auth
        self.will = will
        self.keepalive = keepalive
        self.start_window_s = start_window_s
        self.lost_window_s = lost_window_s
        self.dropped = MalformedCount(log, hooks.on_dropped)
        self.losses = 0  # times a connected broker was lost
        self.ever_connected = False
        self._client: aiomqtt.Client | None = None  # while connected
        self._ready = asyncio.Event()  # set while publishing may go on
        #: set when the current connection is lost: what waits on it stops waiting
        self._connection_lost = asyncio.Event()
        self._resume: asyncio.Task | None = None
        self._pending: dict[str, asyncio.Future] = {}  # request id -> its reply, to come
        #: what goes out again after a reconnect until it is answered: key -> (topic, payload)
        self._unanswered: dict[str, tuple[str, bytes]] = {}

    # -- the connection ------------------------------------------------------------------
    async def run(self) -> None:
        """Keep the session up until cancelled (the one reconnect loop); raises the role's
        error once the broker does not answer within the start window, or stays away for
        the lost window after a loss."""
        try:
            await self._reconnect_loop()
        finally:  # cancelled, or gone for good: nothing is published on it any more
            self._client = None
            self._ready.clear()

    async def _reconnect_loop(self) -> None:
        deadline = time.monotonic() + self.start_window_s
        delay = FIRST_RETRY_S
        while True:
            # a fresh client per attempt: one whose connect failed is not reused
            client = mqtt.client(
                self.broker,
                identifier=self.identifier,
                auth=self.auth,
                will=self.will,
                keepalive=self.keepalive,
            )
            try:
                async with client:
                    await self._serve(client)
                lost = aiomqtt.MqttError("the broker ended the session")
            except aiomqtt.MqttError as exc:
                lost = exc
            if self._client is not None:  # it was connected: a new loss, a new window
                self._lose(lost)
                deadline = time.monotonic() + self.lost_window_s
                delay = FIRST_RETRY_S
            elif time.monotonic() + delay > deadline:
                raise self.error(self._gone(lost)) from None
            else:
                self.log.info("broker %s not reachable (%s), retrying", self.broker, lost)
            await asyncio.sleep(delay)
            delay = min(2 * delay, LAST_RETRY_S)

    def _gone(self, exc: Exception) -> str:
        if self.ever_connected:
            return f"the broker {self.broker} is gone for {self.lost_window_s:.0f} s: {exc}"
        return f"broker {self.broker} unreachable: {exc}"

    async def _serve(self, client: aiomqtt.Client) -> None:
        """One connection: subscribe, resume what a loss interrupted, read until it ends."""
        for topic in self.subscriptions:
            await client.subscribe(topic, qos=1)
        reconnect = self.ever_connected
        self._connection_lost = asyncio.Event()
        self._client = client
        self.ever_connected = True
        if self.hooks.on_connected is not None:
            await self.hooks.on_connected(self._publisher(client))
        self._resume = asyncio.create_task(self._resend_when_ready(reconnect))
        try:
            await self.read(client)
        finally:
            self._resume.cancel()

    async def _resend_when_ready(self, reconnect: bool) -> None:
        if reconnect and self.hooks.before_resend is not None:
            await self.hooks.before_resend()
        try:
            await self.resend()
        except aiomqtt.MqttError:
            return  # lost again: the next connection resumes once more
        self._ready.set()

    def _lose(self, exc: Exception) -> None:
        self._connection_lost.set()
        self._client = None
        self._ready.clear()
        self.losses += 1
        self.log.warning("lost the broker (%s), reconnecting", exc)
        if self.hooks.on_lost is not None:
            self.hooks.on_lost(exc)

    @property
    def is_ready(self) -> bool:
        """Whether the broker is connected and the session resumed (publishing goes out)."""
        return self._client is not None and self._ready.is_set()

    async def connected(self) -> aiomqtt.Client:
        """The connected client once the session is ready; the role's error when it is not
        within the start window (before the first connection) or the lost window."""
        window = self.lost_window_s if self.ever_connected else self.start_window_s
        deadline = time.monotonic() + window
        while not self.is_ready:
            try:
                await asyncio.wait_for(self._ready.wait(), deadline - time.monotonic())
            except TimeoutError:
                raise self.error(
                    f"no connection to the broker {self.broker} for {window:.0f} s"
                ) from None
            await asyncio.sleep(0)  # lost again at once: wait for the next connection
        assert self._client is not None
        return self._client

    # -- publishing ----------------------------------------------------------------------
    async def publish(
        self,
        topic: str,
        message: BaseModel | bytes,
        *,
        retain: bool = False,
        retry: bool = True,
        qos: int = 1,
    ) -> None:
        """Publish once the session is ready. ``retry``: a failed publish is tried again (on
        the next connection if the broker went), PUBLISH_ATTEMPTS times at the most, then
        the role's error. Without it a failure is only logged: for what a reconnect sends
        again anyway (requests, a retained message ``on_connected`` publishes)."""
        payload = message if isinstance(message, bytes) else proto.encode(message)
        for attempt in itertools.count():
            client = await self.connected()
            try:
                await self._until_lost(client.publish(topic, payload, qos=qos, retain=retain))
                return
            except aiomqtt.MqttError as exc:
                # a lost link is the reconnect loop's to notice; a slow one is tried again
                if not retry:
                    self.log.info("publish on %s waits for the broker (%s)", topic, exc)
                    return
                if attempt >= PUBLISH_ATTEMPTS:
                    raise self.error(f"cannot publish on {topic}") from None
                await asyncio.sleep(PUBLISH_PAUSE_S * (attempt + 1))

    async def _until_lost(self, operation: Awaitable[None]) -> None:
        """An operation on the current connection, given up (aiomqtt.MqttError) once that
        connection is lost: aiomqtt waits for a publish's acknowledgement until its timeout
        (30 s) even after the broker went, and the reconnect sends it again anyway."""
        lost = self._connection_lost
        waiting = asyncio.ensure_future(operation)
        watch = asyncio.ensure_future(lost.wait())
        try:
            await asyncio.wait({waiting, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not waiting.done():
                waiting.cancel()
        if not waiting.done() or waiting.cancelled():
            raise aiomqtt.MqttError("the connection to the broker was lost")
        waiting.result()

    @staticmethod
    def _publisher(client: aiomqtt.Client) -> Publish:
        async def publish(topic: str, message: BaseModel | bytes, *, retain: bool = False):
            payload = message if isinstance(message, bytes) else proto.encode(message)
            await client.publish(topic, payload, qos=1, retain=retain)

        return publish

    @contextlib.contextmanager
    def resent(self, key: str, topic: str, payload: bytes) -> Iterator[bytes]:
        """While inside: ``payload`` goes out on ``topic`` again after every reconnect (and on
        ``resend``), under ``key``. Yields the payload, for the caller's own publish."""
        self._unanswered[key] = (topic, payload)
        try:
            yield payload
        finally:
            self._unanswered.pop(key, None)

    async def resend(self, topic: str | None = None) -> None:
        """Publish again, on the current connection, what is still unanswered (only what went
        to ``topic``, if given): e.g. to an agent that came back on its own. MqttError when
        the connection goes meanwhile."""
        client = self._client
        if client is None:
            return
        for sent_to, payload in list(self._unanswered.values()):
            if topic is None or sent_to == topic:
                await client.publish(sent_to, payload, qos=1)

    async def request(self, topic: str, command: Any, timeout_s: float) -> proto.Reply:
        """Publish a command (a protocol message with an ``id``) and return the Reply with
        its id; sent again after every reconnect until answered. TimeoutError after
        ``timeout_s`` (s) without a reply."""
        answer: asyncio.Future[proto.Reply] = asyncio.get_running_loop().create_future()
        self._pending[command.id] = answer
        try:
            with self.resent(command.id, topic, proto.encode(command)) as payload:
                await self.publish(topic, payload, retry=False)
                return await asyncio.wait_for(answer, timeout_s)
        finally:
            self._pending.pop(command.id, None)

    # -- reading -------------------------------------------------------------------------
    async def messages(self, client: Any) -> AsyncIterator[tuple[proto.Topic, BaseModel]]:
        """The client's messages the role accepts, decoded; malformed ones are counted by
        their topic kind (``dropped``) and skipped."""
        async for message in client.messages:
            topic = proto.parse_topic(message.topic.value)
            if topic is None or (self.hooks.accepts is not None and not self.hooks.accepts(topic)):
                continue
            payload = message.payload if isinstance(message.payload, bytes) else b""
            decoded = proto.decode(topic.kind, payload)
            if isinstance(decoded, proto.Malformed):
                self.dropped(decoded.kind, decoded.reason)
                continue
            yield topic, decoded

    async def read(self, client: Any) -> None:
        """Take a client's messages until they end: a reply settles its request, every
        other message goes to the role's ``on_message``."""
        async for topic, message in self.messages(client):
            if isinstance(message, proto.Reply):
                answer = self._pending.get(message.id)
                if answer is not None and not answer.done():
                    answer.set_result(message)
                continue
            await self.hooks.on_message(topic, message)


def first_error(group: BaseExceptionGroup, kind: type[BaseException]) -> BaseException | None:
    """The first exception of ``kind`` in a (nested) exception group, None if there is none:
    a task group's failure as the one error it stands for. (Not ``except*``: before Python
    3.11.4 an exception raised in its handler stays wrapped in a group.)"""
    found = group.subgroup(kind)
    if found is None:
        return None
    first: BaseException = found
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first
