"""The controller's line to its agents: its broker session and what the agents report.

``AgentLink`` keeps the controller's ``BrokerSession`` with the controller's own callbacks:
telemetry and status go into the telemetry view (and the run's peak memory and metrics);
after a broker loss the retained epoch goes out again at once, and the commands still
unanswered only once the agents that were online have rejoined (or REJOIN_GRACE_S
passed); an agent that comes back on its own gets what it was sent meanwhile. Commands to
agents and the waits on a device's liveness go through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from pydantic import BaseModel

from edgepart.control_plane import protocol as proto
from edgepart.control_plane.session import BrokerSession, Publish, SessionHooks
from edgepart.controller.config import ControllerConfig
from edgepart.controller.result import ControllerError, RunResult
from edgepart.controller.telemetry_view import TelemetryView

log = logging.getLogger("edgepart.controller")

JOIN_TIMEOUT_S = 120.0  # for every agent (or a started one) to come online, s
#: after a reconnect, how long (s) the controller waits for the agents that were online to
#: rejoin before it goes on (one that does not is then found dead by its silence)
REJOIN_GRACE_S = 5.0
DETECTION_TIMEOUT_S = 10.0  # longest wait (s) for a failed device to be seen gone
LIVENESS_POLL_S = 0.05  # how often (s) a wait on a device's liveness looks again
#: the device topics the controller reads (plus its world's run topics)
SUBSCRIBED: tuple[proto.TopicKind, ...] = ("status", "telemetry", "reply")


class AgentLink:
    """The controller's broker session and the agents' reports (see the module)."""

    def __init__(
        self,
        config: ControllerConfig,
        telemetry: TelemetryView,
        result: RunResult,
        current_epoch: Callable[[], proto.PlacementEpoch | None],
        run_topics: tuple[proto.RunKind, ...] = (),
        on_run_message: Callable[[BaseModel], None] | None = None,
        metrics=None,
    ) -> None:
        """``current_epoch``: the epoch the agents follow now (re-published after a broker
        loss); ``run_topics`` and ``on_run_message``: the world's run/* messages;
        ``metrics``: the controller's ControllerMetrics, if any."""
        self.config = config
        self.telemetry = telemetry
        self.result = result
        self.current_epoch = current_epoch
        self.run_topics = run_topics
        self.on_run_message = on_run_message
        self.metrics = metrics
        self.joined = asyncio.Event()  # set once every agent expected at the start reported
        self.rejoining: set[str] = set()  # after a broker loss, agents not back yet
        self.all_back = asyncio.Event()  # set once the rejoining agents are back
        kinds = (*SUBSCRIBED, *run_topics)
        self.session = BrokerSession(
            config.broker,
            f"edgepart-{config.testbed}-controller",
            [proto.subscription(config.testbed, kind) for kind in kinds],
            log=log,
            error=ControllerError,
            auth=config.broker_auth,
            hooks=SessionHooks(
                on_message=self._on_message,
                accepts=self._accepts,
                on_connected=self._republish_epoch,
                before_resend=self._await_rejoin,
                on_lost=self._on_lost,
                on_dropped=self._count_dropped,
            ),
        )

    # -- the session's callbacks ---------------------------------------------------------
    def _accepts(self, topic: proto.Topic) -> bool:
        return topic.device in self.telemetry.devices or topic.kind in self.run_topics

    async def _on_message(self, topic: proto.Topic, message: BaseModel) -> None:
        if topic.device is None:
            if self.on_run_message is not None:
                self.on_run_message(message)
            return
        if isinstance(message, proto.Telemetry):
            self.telemetry.take(topic.device, message)
            peak = self.result.peak_memory_bytes
            peak[topic.device] = max(peak.get(topic.device, 0.0), message.memory_used_bytes)
            if self.metrics is not None:
                self.metrics.telemetry(message)
        elif isinstance(message, proto.Status):
            self.telemetry.take(topic.device, message)
            if message.state == "online":
                await self._came_online(topic.device)
        if self.telemetry.all_joined():
            self.joined.set()

    async def _came_online(self, device: str) -> None:
        if device in self.rejoining:
            self.rejoining.discard(device)
            if not self.rejoining:
                self.all_back.set()
        elif self.session.is_ready:
            # it came back on its own (lost the broker alone, or late): what it was sent
            # meanwhile is sent again; it answers each command once
            await self.session.resend(proto.device_topic(self.config.testbed, device, "cmd"))

    def _on_lost(self, exc: Exception) -> None:
        self.result.broker_losses += 1
        # those that reported lately are waited for after the reconnect, whatever last
        # will a stopping broker may have sent for them
        self.rejoining = self.telemetry.reporting_lately()
        self.all_back = asyncio.Event()
        if not self.rejoining:
            self.all_back.set()

    async def _republish_epoch(self, publish: Publish) -> None:
        """After a reconnect the retained epoch goes out again at once (a restarted broker
        forgot it, and the agents follow it); there is none yet at the first connect."""
        epoch = self.current_epoch()
        if epoch is not None:
            await publish(proto.placement_topic(self.config.testbed), epoch, retain=True)

    async def _await_rejoin(self) -> None:
        """After a reconnect: until the agents that were online have rejoined (or
        REJOIN_GRACE_S passed); the unanswered commands go out again after it."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_back.wait(), REJOIN_GRACE_S)
        if self.rejoining:
            log.warning("not back after the broker's loss: %s", ", ".join(sorted(self.rejoining)))
        # none could report while the broker was away: silence counts from now, except for
        # those that did not come back (they stay as silent as they are)
        self.telemetry.silence_counts_from_now(but=self.rejoining)

    def _count_dropped(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.dropped_message(kind)

    # -- commands, publishing, liveness --------------------------------------------------
    async def command(self, device: str, command, timeout_s: float) -> proto.Reply:
        """Send one command to an agent and wait for its reply (raises ControllerError)."""
        topic = proto.device_topic(self.config.testbed, device, "cmd")
        try:
            return await self.session.request(topic, command, timeout_s)
        except TimeoutError:
            gone = f"{device} did not answer {command.op} in {timeout_s} s"
            raise ControllerError(gone) from None

    async def publish(
        self, topic: str, message: BaseModel | bytes, retain: bool = False, retry: bool = True
    ) -> None:
        """Publish on the controller's session (qos 1; see BrokerSession.publish)."""
        await self.session.publish(topic, message, retain=retain, retry=retry)

    async def until_joined(self) -> None:
        """Wait until every agent expected at the start is online and reporting."""
        try:
            await asyncio.wait_for(self.joined.wait(), JOIN_TIMEOUT_S)
        except TimeoutError:
            missing = ", ".join(self.telemetry.missing())
            raise ControllerError(
                f"agents not online after {JOIN_TIMEOUT_S:.0f} s: {missing}"
            ) from None

    async def until_gone(self, device: str, timeout_s: float | None = None) -> None:
        """Wait until this controller's own detection (status, telemetry) sees a device gone,
        at most timeout_s (wall; default DETECTION_TIMEOUT_S of scenario time); the time it
        took is the run's detection time (scenario s)."""
        if timeout_s is None:
            timeout_s = self.config.clock.wall_s(DETECTION_TIMEOUT_S)
        start = time.monotonic()
        while self.telemetry.is_alive(device):
            if time.monotonic() > start + timeout_s:
                raise ControllerError(
                    f"{device} still looks alive {timeout_s:.0f} s after it failed"
                )
            await asyncio.sleep(LIVENESS_POLL_S)
        self.result.detection_s.append(self.config.clock.scenario_s(time.monotonic() - start))

    async def until_online(self, device: str, timeout_s: float = JOIN_TIMEOUT_S) -> None:
        """Wait until this controller sees a (re)started device online and reporting."""
        deadline = time.monotonic() + timeout_s
        while not self.telemetry.is_alive(device):
            if time.monotonic() > deadline:
                raise ControllerError(f"{device} not online {timeout_s:.0f} s after it started")
            await asyncio.sleep(LIVENESS_POLL_S)
