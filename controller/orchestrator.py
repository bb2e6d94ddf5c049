"""The live controller: plans from telemetry, moves blocks between agents, drives decoding.

It never carries activations: it publishes placement epochs (who holds what, where each
agent listens), tells agents to load, migrate and drop blocks, and asks the source agent
to run each token. A new epoch is published only after every move of the plan has been
acknowledged by its target, so no token runs on a half-moved placement.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from asyncio import FIRST_COMPLETED
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import aiomqtt
import numpy as np

from control_plane import mqtt
from control_plane import protocol as proto
from controller import cost
from controller.placement import NoFeasiblePlacement, Placement, make_algorithm
from controller.replan import planning_window, scheduled, worth_switching
from controller.view import PlanningWindow, ResourceView, with_hop_overheads
from llm.blocks import PINNED_BLOCKS, BlockTable

log = logging.getLogger("edgepart.controller")
# aiomqtt warns whenever more than a few publishes wait, which a wave of migrations does
logging.getLogger("mqtt").setLevel(logging.ERROR)

TelemetryMode = Literal["measured", "configured"]
JOIN_TIMEOUT_S = 120.0  # for every agent to come online, s
LOAD_TIMEOUT_S = 300.0  # for initial loads, s
STEP_TIMEOUT_S = 120.0  # for one token, s
MIGRATE_TIMEOUT_S = 300.0  # for one plan's moves, s
TELEMETRY_STALE_S = 1.5  # a device silent this long is not planned on
LINKS_MEASURED_WAIT_S = 5  # longest wait (s) for the agents' first latency probes
BROKER_WINDOW_S = 90.0  # how long (s) the controller retries the broker at start
#: how long (s) a lost broker is retried mid-run; the agents keep their state meanwhile
BROKER_LOST_WINDOW_S = 60.0
#: after a reconnect, how long (s) the controller waits for the agents that were online to
#: rejoin before it goes on (one that does not is then found dead by its silence)
REJOIN_GRACE_S = 5.0
CONTROL_WINDOW = 8  # tokens whose control round trip the next prediction adds (median)
DEATH_CHECK_S = 0.1  # how often (s) a decode step looks whether its devices are still there
PUBLISH_ATTEMPTS = 5  # a publish failing on a connected client is tried this often
MQTT_TIMEOUT_S = 30  # per MQTT operation (s): an embedded broker on a loaded host is slow
#: a measured speed replaces the one planned with only when it differs by this much
#: (relative): measurements jitter with the host's load, and each flip would re-plan
MEASURED_DEADBAND = 0.15
#: what a migrated block is assumed to cost before any was measured (s): its weights load
#: from disk at the target and the move is acknowledged over MQTT
MOVE_S_PRIOR = 0.01
MOVE_S_SMOOTHING = 0.3  # weight of the newest switch in the running move-time calibration
#: how far one switch may pull the calibration (ratio of measured to predicted switch time):
#: a switch stalled by a busy host must not make every later move look free or ruinous
MOVE_RATIO_CLAMP = (0.25, 4.0)
#: a measured link latency or hop overhead replaces the one planned with only when it moved
#: by this much (relative) and by HOP_DEADBAND_S: each flip would shift every head-split
#: placement
HOP_DEADBAND = 0.25
HOP_DEADBAND_S = 0.0001


@dataclass(frozen=True)
class ControllerConfig:
    """What the controller runs: the devices as configured, the model's table, the job."""

    testbed: str
    broker: str  # host:port
    algorithm: str
    devices: tuple[str, ...]
    source: str
    nominal_gflops: np.ndarray  # (D,) GFLOP/s
    memory_bytes: np.ndarray  # (D,) bytes
    bandwidth_mbit: np.ndarray  # (D, D) configured links, Mbit/s
    latency_s: np.ndarray  # (D, D) s
    table: BlockTable  # block costs the planner and predictions use (calibrated)
    prompt_ids: tuple[int, ...]
    generate_tokens: int
    replan_every: int = 8
    weights_from: Literal["disk", "peer"] = "disk"
    telemetry: TelemetryMode = "measured"
    eos_token_id: int | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"  # where /metrics listens (0.0.0.0 in a container)
    #: publish each token on run/progress and the outcome on run/result (retained), for an
    #: emulator driver or anyone watching a testbed
    announce: bool = False
    broker_auth: mqtt.BrokerAuth | None = None  # None: anonymous (a broker on loopback)
    #: devices not expected at the start: they join later and are used once they are there
    late_devices: frozenset[str] = frozenset()


@dataclass
class TokenRecord:
    """One generated token: its id, measured and predicted latency (s), context after it."""

    token_id: int
    measured_s: float
    predicted_s: float
    context: int
    epoch: int


@dataclass(frozen=True)
class SwitchRecord:
    """One carried-out switch: blocks moved, the cost model's and the measured delay (s)."""

    token: int
    blocks: int
    predicted_s: float
    measured_s: float


@dataclass
class RunResult:
    """What a live generation measured (DESIGN's emulate keys via ``to_json``)."""

    algorithm: str
    output_token_ids: list[int] = field(default_factory=list)
    tokens: list[TokenRecord] = field(default_factory=list)
    prefill_s: float = 0.0
    migrations: int = 0
    migration_s: float = 0.0
    migration_bytes: float = 0.0
    replans: int = 0
    replan_s: list[float] = field(default_factory=list)
    failed_replans: int = 0
    peak_memory_bytes: dict[str, float] = field(default_factory=dict)
    recoveries: int = 0
    recovery_s: float = 0.0
    #: per device, the install time per moved block it planned with last (s)
    move_s_per_block: dict[str, float] = field(default_factory=dict)
    #: per device, the (send, receive) software time per hop it planned with last (s)
    hop_overhead_s: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: per link "a->b", the measured one-way latency it planned with last (s)
    latency_s: dict[str, float] = field(default_factory=dict)
    #: every switch between placements, predicted beside measured
    switches: list[SwitchRecord] = field(default_factory=list)
    broker_losses: int = 0  # times the controller lost the broker and reconnected
    #: per device failure the emulator caused, the time (s) until the controller saw it
    detection_s: list[float] = field(default_factory=list)
    reprefill_s: float = 0.0  # of recovery_s, the time re-running the history took (s)
    control_overhead_s: float = 0.0  # median control round trip per token (s)
    wall_s: float = 0.0
    failure: str | None = None

    @property
    def per_token_s(self) -> list[float]:
        """Measured decode latency per token after the first (s)."""
        return [t.measured_s for t in self.tokens]

    @property
    def predicted_per_token_s(self) -> list[float]:
        """The cost model's prediction for the same tokens, placements and state (s)."""
        return [t.predicted_s for t in self.tokens]

    @property
    def total_s(self) -> float:
        """Decode time plus migration stalls (s), as the simulator counts it."""
        return float(sum(self.per_token_s) + self.migration_s)

    @classmethod
    def from_summary(cls, data: dict) -> RunResult:
        """A result back from its ``summary`` (e.g. sent by a controller in a container)."""
        tokens = [
            TokenRecord(token_id, measured, predicted, 0, 0)
            for token_id, measured, predicted in zip(
                data["output_token_ids"][1:],
                data["per_token_s"],
                data["predicted_per_token_s"],
                strict=False,
            )
        ]
        fields = {
            "algorithm", "output_token_ids", "prefill_s", "migrations", "migration_s",
            "migration_bytes", "replans", "failed_replans", "peak_memory_bytes", "recoveries",
            "recovery_s", "move_s_per_block", "wall_s", "latency_s", "broker_losses",
            "detection_s", "reprefill_s", "control_overhead_s",
        }  # fmt: skip
        kept = {k: v for k, v in data.items() if k in fields}
        overheads = {d: tuple(v) for d, v in data.get("hop_overhead_s", {}).items()}
        switches = [SwitchRecord(**s) for s in data.get("switches", [])]
        return cls(**kept, tokens=tokens, hop_overhead_s=overheads, switches=switches)

    def summary(self) -> dict:
        """DESIGN's emulate JSON keys a live run measures (the backend adds text and setup)."""
        return {
            "algorithm": self.algorithm,
            "per_token_s": self.per_token_s,
            "predicted_per_token_s": self.predicted_per_token_s,
            "total_s": self.total_s,
            "migrations": self.migrations,
            "migration_s": self.migration_s,
            "migration_bytes": self.migration_bytes,
            "peak_memory_bytes": self.peak_memory_bytes,
            "replans": self.replans,
            "failed_replans": self.failed_replans,
            "prefill_s": self.prefill_s,
            "recoveries": self.recoveries,
            "recovery_s": self.recovery_s,
            "move_s_per_block": self.move_s_per_block,
            "hop_overhead_s": {d: list(v) for d, v in self.hop_overhead_s.items()},
            "latency_s": self.latency_s,
            "switches": [asdict(s) for s in self.switches],
            "broker_losses": self.broker_losses,
            "detection_s": self.detection_s,
            "reprefill_s": self.reprefill_s,
            "control_overhead_s": self.control_overhead_s,
            "output_token_ids": self.output_token_ids,
            "wall_s": self.wall_s,
        }


@dataclass
class _Device:
    telemetry: proto.Telemetry | None = None
    telemetry_at: float = 0.0
    status: proto.Status | None = None


class ControllerError(RuntimeError):
    """The live run cannot go on (an agent refused, failed or vanished).

    ``partial`` holds what the run measured and generated until it stopped (set when the
    generation itself stops; None before it began)."""

    partial: RunResult | None = None
    partial_text: str = ""  # the partial output decoded (where a tokenizer was at hand)


class DevicesLost(Exception):
    """A device of the placement died while a token was being decoded."""


BeforeToken = Callable[[int], Awaitable[None]]
ConfiguredView = Callable[[PlanningWindow], ResourceView]
Progress = Callable[[int, "RunResult"], None]


class Controller:
    """Plans, migrates and decodes one generation over live agents."""

    def __init__(
        self,
        config: ControllerConfig,
        before_token: BeforeToken | None = None,
        configured_view: ConfiguredView | None = None,
        progress: Progress | None = None,
    ) -> None:
        if config.telemetry == "configured" and configured_view is None:
            raise ValueError("configured telemetry needs the world's view (configured_view)")
        self.config = config
        self.algorithm = make_algorithm(config.algorithm)
        self.before_token = before_token
        self.configured_view = configured_view
        self.progress = progress
        self.devices = {name: _Device() for name in config.devices}
        self.index = {name: i for i, name in enumerate(config.devices)}
        self.pending: dict[str, asyncio.Future] = {}
        self.ids = (f"c{i}" for i in itertools.count())
        self.epoch = -1
        self.placement: Placement | None = None
        self.result = RunResult(config.algorithm)
        self.joined = asyncio.Event()
        self.client: aiomqtt.Client | None = None
        self.connection = asyncio.Event()  # set while the broker is connected
        #: commands still waiting for a reply, by id: (topic, payload) to resend after a loss
        self.unanswered: dict[str, tuple[str, bytes]] = {}
        self.epoch_message: proto.PlacementEpoch | None = None  # the retained one, current
        self.rejoining: set[str] = set()  # after a reconnect, agents not back yet
        self.control_s: list[float] = []  # per decode step, its control round trip (s)
        self.all_back = asyncio.Event()
        self.rejoin: asyncio.Task | None = None
        self.dropped_messages = 0  # all kinds together (the local backend's result)
        self.dropped_by_kind: Counter[str] = Counter()  # topic kind -> malformed messages
        self.measured_gflops: dict[str, float] = {}  # device -> speed planned with, GFLOP/s
        #: measured latencies and hop overheads as planned with (s), by (device, peer) or
        #: (device, "send" | "receive")
        self.held_s: dict[tuple[str, str], float] = {}
        #: per device, the time (s) to load one block at its nominal speed, from the first
        #: loads; times the switch calibration and the device's slowdown, a move's install
        self.load_s_per_block = np.full(len(config.devices), MOVE_S_PRIOR)
        self.move_scale = 1.0  # measured / predicted switch time, smoothed over switches
        self.metrics = None
        #: awaited once every agent is online, before the first plan (the world's setup)
        self.on_joined: Callable[[], Awaitable[None]] | None = None
        #: run/* topics to follow (e.g. an emulator driver's world_ready) and their handler
        self.run_topics: tuple[proto.RunKind, ...] = ()
        self.on_run_message: Callable[[object], None] | None = None

    # -- MQTT --------------------------------------------------------------------------
    async def _connect(self, host: str, port: int) -> None:
        """Wait until the broker answers: retried while a testbed starts (services of a
        swarm stack start in any order)."""
        deadline = time.monotonic() + BROKER_WINDOW_S
        delay = 0.2
        while True:
            probe = mqtt.client(
                self.config.broker, auth=self.config.broker_auth, timeout=MQTT_TIMEOUT_S
            )
            try:
                async with probe:
                    break
            except aiomqtt.MqttError as exc:
                if time.monotonic() + delay > deadline:
                    raise ControllerError(f"broker {host}:{port} unreachable: {exc}") from None
                log.info("broker not reachable yet (%s), retrying", exc)
            await asyncio.sleep(delay)
            delay = min(2 * delay, 2.0)

    async def run(self) -> RunResult:
        """Connect, wait for the agents, then generate; returns the measurements."""
        host, _, port = self.config.broker.rpartition(":")
        if self.config.metrics_port is not None:
            from controller.metrics import ControllerMetrics

            self.metrics = ControllerMetrics()
            self.metrics.serve(self.config.metrics_port, self.config.metrics_host)
        start = time.monotonic()
        await self._connect(host, int(port))
        link = asyncio.create_task(self._broker_link(host, int(port)))
        generation = asyncio.create_task(self._generation(start))
        try:
            done, _ = await asyncio.wait({link, generation}, return_when=FIRST_COMPLETED)
            if generation not in done:
                link.result()  # the broker was lost for good: raises ControllerError
            return generation.result()
        finally:
            tasks = [t for t in (generation, link, self.rejoin) if t is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _generation(self, start: float) -> RunResult:
        await self._connected()
        try:
            await self._generate()
        except (ControllerError, NoFeasiblePlacement) as exc:
            self._finish(start)
            if self.config.announce:
                outcome = proto.RunOutcome(ok=False, error=str(exc), result=self.result.summary())
                await self._announce(outcome)
            if isinstance(exc, ControllerError):
                exc.partial = self.result  # the tokens generated until then are kept
            raise
        self._finish(start)
        if self.config.announce:
            await self._announce(proto.RunOutcome(ok=True, result=self.result.summary()))
        return self.result

    async def _broker_link(self, host: str, port: int) -> None:
        """Keep the MQTT session: subscribe, read, and after a lost broker reconnect, then
        publish again what a restarted broker forgot (the placement epoch, every command
        still waiting for its reply; agents answer a resent command from their kept
        replies). Raises ControllerError once the broker stays away BROKER_LOST_WINDOW_S."""
        lost_at: float | None = None
        delay = 0.2
        while True:
            # a fresh client per attempt: one whose connect failed is not reused
            client = mqtt.client(
                self.config.broker,
                identifier=f"edgepart-{self.config.testbed}-controller",
                auth=self.config.broker_auth,
                timeout=MQTT_TIMEOUT_S,
            )
            try:
                async with client:
                    for kind in ("status", "telemetry", "reply", *self.run_topics):
                        await client.subscribe(proto.subscription(self.config.testbed, kind), qos=1)
                    self.client = client
                    if lost_at is None:
                        self.connection.set()
                    else:
                        await self._resume(client)
                        lost_at, delay = None, 0.2
                    await self._read(client)
            except aiomqtt.MqttError as exc:
                self.connection.clear()
                self.client = None
                if self.rejoin is not None:
                    self.rejoin.cancel()
                now = time.monotonic()
                if lost_at is None:
                    lost_at = now
                    self.result.broker_losses += 1
                    log.warning("lost the broker (%s), reconnecting", exc)
                    # those that reported lately are waited for after the reconnect, whatever
                    # last will a stopping broker may have sent for them
                    self.rejoining = {
                        name
                        for name, d in self.devices.items()
                        if d.telemetry is not None and now - d.telemetry_at <= TELEMETRY_STALE_S
                    }
                if now - lost_at > BROKER_LOST_WINDOW_S:
                    raise ControllerError(
                        f"the broker is gone for {BROKER_LOST_WINDOW_S:.0f} s: {exc}"
                    ) from None
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)

    async def _resume(self, client: aiomqtt.Client) -> None:
        """After a reconnect: the retained epoch goes out again at once, and once the agents
        that were online have rejoined (or REJOIN_GRACE_S passed) the unanswered commands
        do, and generation goes on."""
        if self.epoch_message is not None:
            topic = proto.placement_topic(self.config.testbed)
            await client.publish(topic, proto.encode(self.epoch_message), qos=1, retain=True)
        self.all_back = asyncio.Event()
        if not self.rejoining:
            self.all_back.set()
        self.rejoin = asyncio.create_task(self._after_rejoin(client))

    async def _after_rejoin(self, client: aiomqtt.Client) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_back.wait(), REJOIN_GRACE_S)
        if self.rejoining:
            log.warning("not back after the broker's loss: %s", ", ".join(sorted(self.rejoining)))
        # none could report while the broker was away: silence counts from now, except for
        # those that did not come back (they stay as silent as they are)
        now = time.monotonic()
        for name, device in self.devices.items():
            if name not in self.rejoining:
                device.telemetry_at = max(device.telemetry_at, now)
        try:
            for topic, payload in list(self.unanswered.values()):
                await client.publish(topic, payload, qos=1)
        except aiomqtt.MqttError:
            return  # lost again: the link resumes once more
        self.connection.set()

    def _unanswered_for(self, device: str) -> list[tuple[str, bytes]]:
        """The unanswered commands sent to one device: (topic, payload)."""
        topic = proto.device_topic(self.config.testbed, device, "cmd")
        return [item for item in self.unanswered.values() if item[0] == topic]

    async def _connected(self) -> aiomqtt.Client:
        """The connected client, once the broker is there (bounded wait)."""
        deadline = time.monotonic() + BROKER_LOST_WINDOW_S
        while self.client is None or not self.connection.is_set():
            try:
                await asyncio.wait_for(self.connection.wait(), deadline - time.monotonic())
            except TimeoutError:
                raise ControllerError("no broker connection") from None
            await asyncio.sleep(0)  # lost again at once: wait for the next connection
        return self.client

    async def _publish_kept(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish (qos 1) on the current connection; a publish lost with the broker is
        the reconnect's to repeat, so it is not retried here."""
        client = await self._connected()
        try:
            await client.publish(topic, payload, qos=1, retain=retain)
        except aiomqtt.MqttError as exc:
            log.info("publish on %s waits for the broker (%s)", topic, exc)

    def _finish(self, start: float) -> None:
        self.result.wall_s = time.monotonic() - start
        self.result.hop_overhead_s = {
            d: (self.held_s.get((d, "send"), 0.0), self.held_s.get((d, "receive"), 0.0))
            for d in self.config.devices
        }
        self.result.latency_s = {
            f"{a}->{b}": s for (a, b), s in self.held_s.items() if b in self.index
        }
        self.result.control_overhead_s = float(np.median(self.control_s)) if self.control_s else 0.0
        move_s = self._move_s(self.config.nominal_gflops.astype(float))
        self.result.move_s_per_block = dict(zip(self.config.devices, move_s.tolist(), strict=True))

    async def _announce(self, outcome: proto.RunOutcome) -> None:
        topic = proto.run_topic(self.config.testbed, "result")
        await self.publish(topic, outcome, retain=True)

    def _drop_message(self, bad: proto.Malformed) -> None:
        """Count a malformed message by its topic kind; the first of each kind is logged."""
        if self.dropped_by_kind[bad.kind] == 0:
            log.warning(
                "dropped a malformed %s message (%s); logged once per kind", bad.kind, bad.reason
            )
        self.dropped_by_kind[bad.kind] += 1
        self.dropped_messages += 1
        if self.metrics is not None:
            self.metrics.dropped_message(bad.kind)

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = proto.parse_topic(message.topic.value)
            payload = message.payload if isinstance(message.payload, bytes) else b""
            known = topic is not None and (
                topic.device in self.devices or topic.kind in self.run_topics
            )
            if topic is None or not known:
                continue
            decoded = proto.decode(topic.kind, payload)
            if isinstance(decoded, proto.Malformed):
                self._drop_message(decoded)
                continue
            if topic.device is None:
                if self.on_run_message is not None:
                    self.on_run_message(decoded)
                continue
            device = self.devices[topic.device]
            if isinstance(decoded, proto.Telemetry):
                device.telemetry, device.telemetry_at = decoded, time.monotonic()
                peak = self.result.peak_memory_bytes
                peak[topic.device] = max(peak.get(topic.device, 0.0), decoded.memory_used_bytes)
                if self.metrics is not None:
                    self.metrics.telemetry(decoded)
            elif isinstance(decoded, proto.Status):
                device.status = decoded
                if decoded.state == "online" and topic.device in self.rejoining:
                    self.rejoining.discard(topic.device)
                    if not self.rejoining:
                        self.all_back.set()
                elif decoded.state == "online" and self.connection.is_set():
                    # it came back on its own (lost the broker alone, or late): what it
                    # was sent meanwhile is sent again; it answers each command once
                    for cmd_topic, payload in self._unanswered_for(topic.device):
                        await client.publish(cmd_topic, payload, qos=1)
            elif isinstance(decoded, proto.Reply):
                fut = self.pending.get(decoded.id)
                if fut is not None and not fut.done():
                    fut.set_result(decoded)
            if self._all_joined():
                self.joined.set()

    def _all_joined(self) -> bool:
        return all(
            d.status is not None and d.status.state == "online" and d.telemetry is not None
            for n, d in self.devices.items()
            if n not in self.config.late_devices
        )

    async def command(self, device: str, command, timeout_s: float) -> proto.Reply:
        """Send one command to an agent and wait for its reply (raises ControllerError)."""
        fut = asyncio.get_running_loop().create_future()
        self.pending[command.id] = fut
        topic = proto.device_topic(self.config.testbed, device, "cmd")
        self.unanswered[command.id] = (topic, proto.encode(command))
        try:
            await self._publish_kept(topic, self.unanswered[command.id][1])
            reply = await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            raise ControllerError(
                f"{device} did not answer {command.op} in {timeout_s} s"
            ) from None
        finally:
            self.pending.pop(command.id, None)
            self.unanswered.pop(command.id, None)
        return reply

    async def publish(self, topic: str, message, retain: bool = False) -> None:
        """Publish a protocol message on the controller's connection (qos 1)."""
        for attempt in itertools.count():
            client = await self._connected()
            try:
                await client.publish(topic, proto.encode(message), qos=1, retain=retain)
                return
            except aiomqtt.MqttError:
                # a lost link is the link task's to notice and reconnect; a slow one is
                # tried again, a few times
                if attempt >= PUBLISH_ATTEMPTS:
                    raise ControllerError(f"cannot publish on {topic}") from None
                await asyncio.sleep(0.2 * (attempt + 1))

    async def until_gone(self, device: str, timeout_s: float = 10.0) -> None:
        """Wait until this controller's own detection (status, telemetry) sees a device gone."""
        index = self.index[device]
        window = PlanningWindow(1, 1, 1)
        start = time.monotonic()
        while self.view(window).alive[index]:
            if time.monotonic() > start + timeout_s:
                raise ControllerError(
                    f"{device} still looks alive {timeout_s:.0f} s after it failed"
                )
            await asyncio.sleep(0.05)
        self.result.detection_s.append(time.monotonic() - start)

    async def until_online(self, device: str, timeout_s: float = JOIN_TIMEOUT_S) -> None:
        """Wait until this controller sees a (re)started device online and reporting."""
        index = self.index[device]
        window = PlanningWindow(1, 1, 1)
        deadline = time.monotonic() + timeout_s
        while not self.view(window).alive[index]:
            if time.monotonic() > deadline:
                raise ControllerError(f"{device} not online {timeout_s:.0f} s after it started")
            await asyncio.sleep(0.05)

    def _id(self) -> str:
        return next(self.ids)

    # -- resource view -----------------------------------------------------------------
    def view(self, window: PlanningWindow) -> ResourceView:
        """The resources as the controller knows them now, with the measured cost of a move."""
        view = self._resources(window)
        return replace(view, move_s_per_block=self._move_s(view.compute_gflops))

    def _move_s(self, available_gflops: np.ndarray) -> np.ndarray:
        """Install time (s) of one moved block per device: its measured load time, slowed as
        its available speed is below nominal, calibrated on the switches measured so far."""
        nominal = self.config.nominal_gflops.astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            slowdown = np.where(available_gflops > 0, nominal / available_gflops, 1.0)
        return self.move_scale * self.load_s_per_block * np.maximum(slowdown, 1.0)

    def _alive(self) -> np.ndarray:
        """Per device, whether it is online, reported within TELEMETRY_STALE_S and the source
        reaches it over the data plane (a cut link counts as the device's loss)."""
        now = time.monotonic()
        source = self.devices[self.config.source].telemetry
        cut_off = set(source.unreachable_peers) if source is not None else set()
        alive = []
        for name in self.config.devices:
            d = self.devices[name]
            alive.append(
                d.telemetry is not None
                and d.status is not None
                and d.status.state == "online"
                and now - d.telemetry_at <= TELEMETRY_STALE_S
                and name not in cut_off
            )
        return np.array(alive)

    def _resources(self, window: PlanningWindow) -> ResourceView:
        alive = self._alive()
        if self.config.telemetry == "configured":
            # configured resources, but a device that died is dead (e.g. killed by hand)
            assert self.configured_view is not None
            view = self.configured_view(window)
            alive &= view.alive
            return replace(
                view,
                alive=alive,
                compute_gflops=np.where(alive, view.compute_gflops, 0.0),
                memory_bytes=np.where(alive, view.memory_bytes, 0.0),
            )
        cfg = self.config
        count = len(cfg.devices)
        compute = cfg.nominal_gflops.astype(float).copy()
        memory = cfg.memory_bytes.astype(float).copy()
        bandwidth = cfg.bandwidth_mbit.astype(float).copy()
        overheads = np.zeros((count, 2))  # (send, receive) software time per hop, s
        latency = cfg.latency_s.astype(float).copy()
        for i, name in enumerate(cfg.devices):
            dev = self.devices[name]
            t = dev.telemetry
            if not alive[i] or t is None:
                continue
            if t.available_gflops > 0:
                seen = self.measured_gflops.get(name)
                if seen is None or abs(t.available_gflops / seen - 1.0) >= MEASURED_DEADBAND:
                    self.measured_gflops[name] = seen = t.available_gflops
                compute[i] = seen
            memory[i] = t.memory_budget_bytes
            overheads[i] = (
                self._held((name, "send"), t.send_overhead_s),
                self._held((name, "receive"), t.receive_overhead_s),
            )
            for peer, seconds in t.peer_latency_s.items():
                if peer in self.index and peer != name:
                    latency[i, self.index[peer]] = self._held((name, peer), seconds)
            for peer, rate in t.peer_throughput_mbit.items():
                if peer in self.index and rate > 0:
                    bandwidth[i, self.index[peer]] = rate
        return ResourceView(
            devices=cfg.devices,
            compute_gflops=np.where(alive, compute, 0.0),
            memory_bytes=np.where(alive, memory, 0.0),
            bandwidth_mbit=bandwidth,
            latency_s=with_hop_overheads(latency, overheads[:, 0], overheads[:, 1]),
            source=self.index[cfg.source],
            window=window,
            weights_from=cfg.weights_from,
            alive=alive,
        )

    def _held(self, key: tuple[str, str], seconds: float) -> float:
        """A measured time (s) as planned with: replaced only once it moved enough."""
        seen = self.held_s.get(key)
        if seen is None or abs(seconds - seen) >= max(HOP_DEADBAND * seen, HOP_DEADBAND_S):
            self.held_s[key] = seen = seconds
        return seen

    async def _links_measured(self) -> None:
        """Before the first plan: wait (bounded) until every device reports a measured
        latency to every other, so the plan does not start from the configured ones."""
        if self.config.telemetry != "measured" or len(self.config.devices) < 2:
            return
        deadline = time.monotonic() + LINKS_MEASURED_WAIT_S
        names = set(self.config.devices) - self.config.late_devices
        while time.monotonic() < deadline:
            if all(
                d.telemetry is not None and set(d.telemetry.peer_latency_s) >= names - {n}
                for n, d in self.devices.items()
                if n in names
            ):
                return
            await asyncio.sleep(0.1)
        log.warning(
            "planning without every link's measured latency (not all came within %ds)",
            LINKS_MEASURED_WAIT_S,
        )

    def _window(self, context: int) -> PlanningWindow:
        cfg = self.config
        final = len(cfg.prompt_ids) + cfg.generate_tokens
        return planning_window(context, cfg.replan_every, final)

    # -- generation --------------------------------------------------------------------
    async def _generate(self) -> None:
        cfg = self.config
        try:
            await asyncio.wait_for(self.joined.wait(), JOIN_TIMEOUT_S)
        except TimeoutError:
            missing = [n for n, d in self.devices.items() if d.telemetry is None]
            raise ControllerError(
                f"agents not online after {JOIN_TIMEOUT_S:.0f} s: {', '.join(missing)}"
            ) from None
        if self.on_joined is not None:
            await self.on_joined()
        await self._links_measured()
        prompt = list(cfg.prompt_ids)
        context = len(prompt)
        view = self.view(self._window(context))
        placement = await self._plan(view, None)
        await self._start_epoch(placement)
        start = time.monotonic()
        first = await self._decode(0, prompt)
        self.result.prefill_s = time.monotonic() - start
        out = self.result.output_token_ids
        out.append(first)
        self._progress()
        await self._announce_token()
        decided_on = view
        for i in range(1, cfg.generate_tokens):
            if out[-1] == cfg.eos_token_id:
                break
            if self.before_token is not None:
                await self.before_token(i)
            # who is alive is only known with the broker there and the agents back on it
            await self._connected()
            view = self.view(self._window(context))
            x = self.placement.assignment  # type: ignore[union-attr]
            if not view.alive[view.source]:
                raise ControllerError(f"token {i}: the source device {cfg.source} is gone")
            if not view.alive[x].all():
                token = await self._recovered(view, prompt + out, context)
                decided_on = view
            else:
                fits_now = bool(cost.fits(cfg.table, view, x, context + 1))
                due = scheduled(i, cfg.replan_every, self.algorithm.replans, decided_on, view)
                if due or not fits_now:
                    decided_on = view
                    await self._replan(i, view, context, forced=not fits_now)
                # the cost model's delay of the placement, plus the control round trip
                # measured on the tokens before (never on this one)
                predicted = self.control_overhead_s + float(
                    cost.per_token_s(cfg.table, view, self.placement.assignment, context + 1)
                )
                start = time.monotonic()
                try:
                    token = await self._decode_watched(context, [out[-1]])
                except DevicesLost:  # one died during the token: run again after recovery
                    view = self.view(self._window(context))
                    if not view.alive[view.source]:
                        gone = f"token {i}: the source device {cfg.source} is gone"
                        raise ControllerError(gone) from None
                    token = await self._recovered(view, prompt + out, context)
                    decided_on = view
                else:
                    measured = time.monotonic() - start
                    record = TokenRecord(token, measured, predicted, context + 1, self.epoch)
                    self.result.tokens.append(record)
                    if self.metrics is not None:
                        self.metrics.token(measured, predicted)
            context += 1
            out.append(token)
            self._progress()
            await self._announce_token()

    async def _replan(self, i: int, view: ResourceView, context: int, forced: bool) -> None:
        """Plan again before token i and switch if it pays (always when forced by memory)."""
        try:
            new = await self._plan(
                view, None if forced and not self.algorithm.replans else self.placement
            )
        except NoFeasiblePlacement as exc:
            self.result.failed_replans += 1
            log.warning("token %d: no feasible placement (%s); keeping the current", i, exc)
            return
        assert self.placement is not None
        current = self.placement.assignment
        if new != self.placement and (
            forced or worth_switching(self.config.table, view, new.assignment, current)
        ):
            await self._switch(new, view, context)

    def _progress(self) -> None:
        if self.progress is not None:
            self.progress(len(self.result.output_token_ids), self.result)

    async def _announce_token(self) -> None:
        """Publish the newest token on run/progress (when announcing)."""
        if not self.config.announce:
            return
        r = self.result
        last = r.tokens[-1] if r.tokens else None
        message = proto.Progress(
            token=len(r.output_token_ids),
            token_id=r.output_token_ids[-1],
            measured_s=last.measured_s if last else 0.0,
            predicted_s=last.predicted_s if last else 0.0,
            migrations=r.migrations,
        )
        await self.publish(proto.run_topic(self.config.testbed, "progress"), message)

    async def _plan(self, view: ResourceView, current: Placement | None) -> Placement:
        start = time.monotonic()
        placement = await asyncio.to_thread(self.algorithm.place, view, self.config.table, current)
        took = time.monotonic() - start
        self.result.replans += 1
        self.result.replan_s.append(took)
        if self.metrics is not None:
            self.metrics.replan(took)
        return placement

    def _mapping(self, placement: Placement) -> dict[str, str]:
        names = self.config.table.names
        mapping = {b: self.config.source for b in PINNED_BLOCKS}
        mapping.update(
            (n, self.config.devices[d]) for n, d in zip(names, placement.assignment, strict=True)
        )
        return mapping

    def _endpoints(self) -> dict[str, str]:
        """Where each online device's data plane listens: the members of a new epoch."""
        return {
            n: d.status.listen
            for n, d in self.devices.items()
            if d.status is not None and d.status.state == "online" and d.status.listen is not None
        }

    async def _publish_epoch(self, placement: Placement) -> None:
        self.epoch += 1
        msg = proto.PlacementEpoch(
            epoch=self.epoch, placement=self._mapping(placement), endpoints=self._endpoints()
        )
        self.epoch_message = msg
        topic = proto.placement_topic(self.config.testbed)
        await self._publish_kept(topic, proto.encode(msg), retain=True)
        self.placement = placement

    async def _name_members(self) -> None:
        """Publish the placement again as a new epoch if devices came or went since the last:
        agents take data-plane work only from the devices an epoch names."""
        if self.epoch_message is not None and self._endpoints() != self.epoch_message.endpoints:
            assert self.placement is not None
            await self._publish_epoch(self.placement)

    async def _start_epoch(self, placement: Placement) -> None:
        """Publish epoch 0 and have every device load its blocks."""
        await self._publish_epoch(placement)
        by_device: dict[str, list[str]] = {}
        for block, device in self._mapping(placement).items():
            by_device.setdefault(device, []).append(block)

        per_block: dict[int, float] = {}

        async def load(device: str, blocks: list[str]) -> None:
            cmd = self._load_command(device, blocks)
            reply = await self.command(device, cmd, LOAD_TIMEOUT_S)
            if not reply.ok:
                raise ControllerError(f"{device} refused to load: {reply.error}")
            if reply.seconds:
                per_block[self.index[device]] = reply.seconds / len(blocks)

        async with asyncio.TaskGroup() as tg:
            for device, blocks in by_device.items():
                tg.create_task(load(device, blocks))
        self.load_s_per_block = _per_device_load_s(per_block, self.config.nominal_gflops)

    def _load_command(self, device: str, blocks: list[str]) -> proto.Load:
        """Load blocks: from the device's own checkpoint, or, when weights come from peers,
        over the data plane from the source device (the one that has the checkpoint)."""
        cfg = self.config
        if cfg.weights_from == "peer" and device != cfg.source:
            return proto.Load(
                id=self._id(), op="load", blocks=tuple(blocks), weights_from="peer", peer=cfg.source
            )
        return proto.Load(id=self._id(), op="load", blocks=tuple(blocks))

    async def _switch(self, new: Placement, view: ResourceView, context: int) -> None:
        """Move the blocks that change device, in waves that fit, one acked epoch per wave.

        A move is acknowledged once its target holds the block, and its source frees it
        then (no token runs during a switch), so every block is held exactly once and each
        wave's epoch is a complete placement. Waves put first the moves whose targets have
        room now, so a plan that only works once some blocks have left a device moves
        those first. A refused move stays where it is; the switch ends when a wave moves
        nothing, on the placement reached.
        """
        assert self.placement is not None
        await self._name_members()
        current = self.placement.assignment.copy()
        before = current.copy()
        predicted = float(
            cost.migration_s(self.config.table, view, current, new.assignment, context)
        )
        remaining = set(np.flatnonzero(new.assignment != current).tolist())
        start = time.monotonic()
        moved = 0
        moved_bytes = 0.0
        refused: list[str] = []
        while remaining:
            wave = self._wave(sorted(remaining), current, new.assignment, view, context)
            done, refused = await self._move(wave, current, new.assignment)
            if done:
                blocks = [b for b, _ in done]
                current[blocks] = new.assignment[blocks]
                remaining -= set(blocks)
                moved += len(done)
                moved_bytes += sum(r.bytes_moved for _, r in done)
                await self._publish_epoch(Placement(current.copy()))
            if not done:
                break
        if remaining:
            self.result.failed_replans += 1
            reason = refused[0] if refused else "no move fits"
            log.warning("re-plan stopped with %d blocks unmoved: %s", len(remaining), reason)
        took = time.monotonic() - start
        if moved:
            # what the model would have charged for the moves that happened
            done = float(cost.migration_s(self.config.table, view, before, current, context))
            if done > 0:
                ratio = float(np.clip(took / done, *MOVE_RATIO_CLAMP))
                self.move_scale *= 1 - MOVE_S_SMOOTHING + MOVE_S_SMOOTHING * ratio
            token = len(self.result.output_token_ids)
            self.result.switches.append(SwitchRecord(token, moved, predicted, took))
        self.result.migrations += moved
        self.result.migration_s += took
        self.result.migration_bytes += moved_bytes
        if self.metrics is not None:
            self.metrics.migration(moved, moved_bytes, took)

    def _wave(
        self,
        blocks: list[int],
        current: np.ndarray,
        target: np.ndarray,
        view: ResourceView,
        context: int,
    ) -> list[int]:
        """The moves whose targets hold them on top of what they hold now (all if none does)."""
        table = self.config.table
        used = cost.memory_use(table, view, current, context).astype(float)
        # the agents' own count may run ahead of the table's (e.g. a cache grown by a token)
        for i, name in enumerate(self.config.devices):
            t = self.devices[name].telemetry
            if t is not None:
                used[i] = max(used[i], t.memory_used_bytes)
        need = table.memory_bytes(context)
        wave = []
        for b in blocks:
            t = target[b]
            if used[t] + need[b] <= view.memory_bytes[t]:
                used[t] += need[b]
                wave.append(b)
        return wave or blocks  # a full cycle of swaps: let the agents judge

    async def _move(
        self, wave: list[int], current: np.ndarray, target: np.ndarray
    ) -> tuple[list[tuple[int, proto.Reply]], list[str]]:
        """Migrate a wave's blocks in parallel; (acknowledged moves, refusals)."""
        cfg = self.config
        names = cfg.table.names
        done: list[tuple[int, proto.Reply]] = []
        failed: list[str] = []

        async def move(b: int) -> None:
            cmd = proto.Migrate(
                id=self._id(),
                op="migrate",
                block=names[b],
                to=cfg.devices[target[b]],
                epoch=self.epoch + 1,
                with_weights=cfg.weights_from == "peer",
            )
            reply = await self.command(cfg.devices[current[b]], cmd, MIGRATE_TIMEOUT_S)
            if reply.ok:
                done.append((b, reply))
            else:
                failed.append(f"{names[b]}: {reply.error}")

        async with asyncio.TaskGroup() as tg:
            for b in wave:
                tg.create_task(move(b))
        return done, failed

    async def _recovered(self, view: ResourceView, history: list[int], context: int) -> int:
        """Recover from the devices of the placement the view sees gone (counted and timed);
        the next token."""
        assert self.placement is not None
        lost = ~view.alive[self.placement.assignment]
        start = time.monotonic()
        token = await self._recover(view, lost, history, context)
        self.result.recoveries += 1
        self.result.recovery_s += time.monotonic() - start
        return token

    async def _decode_watched(self, position: int, tokens: list[int]) -> int:
        """A decode step that gives up (DevicesLost) once a device of the placement is seen
        gone: its outputs would never come, and the step waits for them."""
        step = asyncio.create_task(self._decode(position, tokens))
        window = PlanningWindow(1, 1, 1)
        try:
            while True:
                done, _ = await asyncio.wait({step}, timeout=DEATH_CHECK_S)
                if done:
                    return step.result()
                # who is alive is only known while the broker is there
                placement = self.placement
                if (
                    self.connection.is_set()
                    and placement is not None
                    and not self.view(window).alive[placement.assignment].all()
                ):
                    raise DevicesLost
        finally:
            if not step.done():
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)

    async def _recover(
        self, view: ResourceView, lost: np.ndarray, history: list[int], context: int
    ) -> int:
        """Re-place after devices died, then rebuild every cache by re-running the history.

        The lost blocks load on their new devices (from disk, or from the source's when
        weights come from peers); surviving blocks move as in
        any re-plan; all caches are reset and the prompt plus the tokens generated so far
        run again as one prefill, which yields the next token.
        """
        cfg = self.config
        assert self.placement is not None
        dead = sorted({cfg.devices[d] for d in self.placement.assignment[lost]})
        log.warning("devices lost: %s; re-placing their blocks", ", ".join(dead))
        try:
            new = await self._plan(view, self.placement)
        except NoFeasiblePlacement as exc:
            raise ControllerError(f"the surviving devices cannot hold the model: {exc}") from None
        # survivors first, so the devices they leave have room for the lost blocks
        survivors_moved = new.assignment.copy()
        survivors_moved[lost] = self.placement.assignment[lost]
        if not np.array_equal(survivors_moved, self.placement.assignment):
            await self._switch(Placement(survivors_moved), view, context)
            if not np.array_equal(self.placement.assignment, survivors_moved):
                raise ControllerError("the survivors refused the blocks moved to recover")
        await self._name_members()
        names = cfg.table.names
        by_device: dict[str, list[str]] = {}
        for b in np.flatnonzero(lost):
            by_device.setdefault(cfg.devices[new.assignment[b]], []).append(names[b])
        async with asyncio.TaskGroup() as tg:
            for device, blocks in by_device.items():
                cmd = self._load_command(device, blocks)
                tg.create_task(self._expect_ok(device, cmd, LOAD_TIMEOUT_S))
        await self._publish_epoch(new)
        # every device still there (not only those this loss spared: earlier losses too)
        alive = [n for i, n in enumerate(cfg.devices) if view.alive[i] and n not in dead]
        async with asyncio.TaskGroup() as tg:
            for device in alive:
                tg.create_task(
                    self._expect_ok(device, proto.Reset(id=self._id(), op="reset"), STEP_TIMEOUT_S)
                )
        start = time.monotonic()
        token = await self._decode(0, history)
        self.result.reprefill_s += time.monotonic() - start
        return token

    async def _expect_ok(self, device: str, command, timeout_s: float) -> proto.Reply:
        reply = await self.command(device, command, timeout_s)
        if not reply.ok:
            raise ControllerError(f"{device} refused {command.op}: {reply.error}")
        return reply

    async def _decode(self, position: int, tokens: list[int]) -> int:
        cmd = proto.Decode(
            id=self._id(), op="decode", epoch=self.epoch, position=position, tokens=tuple(tokens)
        )
        start = time.monotonic()
        reply = await self.command(self.config.source, cmd, STEP_TIMEOUT_S)
        if not reply.ok or reply.token_id is None:
            raise ControllerError(f"decode at position {position} failed: {reply.error}")
        if len(tokens) == 1:  # one decode step: its way over the broker and back
            self.control_s.append(max(0.0, time.monotonic() - start - reply.seconds))
        return reply.token_id

    @property
    def control_overhead_s(self) -> float:
        """Median time (s) of the recent tokens' command and reply over the broker, beyond
        the source's own program time: every token pays it, whatever the placement."""
        recent = self.control_s[-CONTROL_WINDOW:]
        return float(np.median(recent)) if recent else 0.0


def _per_device_load_s(measured: dict[int, float], nominal_gflops: np.ndarray) -> np.ndarray:
    """Load time (s) per block of every device from those measured (device index -> s): a
    device that loaded nothing is estimated at the measured ones' time x speed, over its
    own speed (GFLOP/s); MOVE_S_PRIOR everywhere when nothing was measured."""
    nominal = np.asarray(nominal_gflops, dtype=float)
    if not measured:
        return np.full(nominal.shape, MOVE_S_PRIOR)
    known = np.array(list(measured))
    seconds = np.array(list(measured.values()))
    work = float(np.median(seconds * nominal[known]))
    with np.errstate(divide="ignore"):
        load_s = np.where(nominal > 0, work / nominal, seconds.max())
    load_s[known] = seconds
    return load_s
