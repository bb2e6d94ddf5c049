"""The process on each device: holds blocks, runs them per token, moves them on command.

Control arrives over MQTT (``edgepart.control_plane.protocol``) through the agent's
``edgepart.control_plane.session.BrokerSession`` (connects, reconnects, decodes, counts malformed
messages); the agent keeps only its own callbacks: announce itself online after every
connect (its last will says offline), carry out each command once (a resent one gets the
kept reply), follow placement epochs, learn peers' data ports from their statuses. Data
travels agent to agent over the TCP data plane (``edgepart.device_agent.dataplane``). ``Agent``
dispatches commands, placements and frames to the parts of the device:

- ``blocks.DeviceBlocks``: the blocks held under the memory budget; loads, drops, weights
  fetched from and served to peers;
- ``staging.Staging``: a switch in two phases: blocks prepared in a background thread,
  committed in one batch per target, discarded;
- ``epochs.Epochs``: the placement epochs known, waited for by frames and commands;
- ``runner.TokenRunner``: each token's program (``edgepart.device_agent.program``), run in a single
  compute thread, paced to the device's speed (``pacing.Pacer``);
- ``burners.BackgroundLoad`` and ``ballast.MemoryPressure``: the CPU and memory other
  applications take (traces), made real;
- ``links.LinkShaping``: shape commands, in the data plane or the kernel (tc mode);
- ``telemetry``: CPU use and latency probes for the telemetry published every period.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import aiomqtt
import torch
from pydantic import BaseModel

from edgepart.control_plane import mqtt
from edgepart.control_plane import protocol as proto
from edgepart.control_plane.session import BrokerSession, Publish, SessionHooks, first_error
from edgepart.device_agent.ballast import MemoryPressure
from edgepart.device_agent.blocks import CommandRefused, DeviceBlocks
from edgepart.device_agent.burners import BackgroundLoad
from edgepart.device_agent.dataplane import DataPlane
from edgepart.device_agent.epochs import Epoch, Epochs
from edgepart.device_agent.links import LinkShaping
from edgepart.device_agent.pacing import Pacer
from edgepart.device_agent.program import Routes
from edgepart.device_agent.runner import TokenRunner
from edgepart.device_agent.staging import Staging
from edgepart.device_agent.tc import TcUnavailable
from edgepart.device_agent.telemetry import CpuMeter, PeerProbes
from edgepart.device_agent.wire import Frame, FrameError, Kind
from edgepart.llm.blocks import block_table
from edgepart.llm.calibration import ComputeProfile, calibrated_table
from edgepart.llm.loader import OpenModel, open_model
from edgepart.llm.runtime import BlockHost
from edgepart.llm.weight_cache import WeightCache

log = logging.getLogger("edgepart.agent")

TELEMETRY_PERIOD_S = 0.5
#: s; short, so that the broker publishes a lost device's last will (offline) soon
MQTT_KEEPALIVE_S = 5
#: the topic kinds an agent reads: its commands, the placement, every device's status
READS: frozenset[str] = frozenset({"cmd", "placement", "status"})
REPLIES_KEPT = 256  # answered commands whose replies are kept for a resent command
STOP_GRACE_S = 3.0  # longest orderly shutdown after SIGTERM before the process just exits
GIL_SWITCH_INTERVAL_S = 0.0005  # s; see run_agent
JOIN_POLL_S = 0.1  # how often a device that joins later looks for its join file (s)


@dataclass
class AgentConfig:
    """Everything an agent needs to start (the CLI builds it)."""

    name: str
    broker: str  # host:port
    listen: str  # host:port (port 0 = any free)
    model: str = "smollm2-135m"
    testbed: str = "default"
    memory_bytes: int = 1 << 30
    cpu_share: float | None = None  # cores this device is worth; None = run at host speed
    nominal_gflops: float | None = None  # the device's speed without background load, GFLOP/s
    profile: ComputeProfile | None = None  # the host's calibrated block speeds
    advertise: str | None = None  # host:port peers should use (default: the bound address)
    metrics_port: int | None = None
    exit_with_parent: bool = False
    #: who paces link bandwidth: the data plane, or the kernel (htb on this device's interface)
    shaping: Literal["software", "tc"] = "software"
    broker_auth: mqtt.BrokerAuth | None = None  # None: anonymous (a broker on loopback)
    #: the testbed's shared data-plane secret: peers prove themselves with it (None: by name)
    dataplane_key: bytes | None = None
    #: a device that joins later: it joins once this file exists (None: at once)
    join_file: str | None = None
    #: where dequantised block weights are cached, shared by the agents of a host (None:
    #: no cache, every block is read from the checkpoint)
    weight_cache: str | None = None
    #: the emulator runs the world this many times slower than its scenario (k >= 1;
    #: cpu_share, nominal_gflops and the link rates are already divided by it): waits on
    #: links and on peers' work are k times longer
    time_dilation: float = 1.0
    #: the model as the command line already opened it (None: opened from ``model``);
    #: opening SmolLM2's GGUF takes a second of start-up, so it is done once
    opened: OpenModel | None = field(default=None, repr=False, compare=False)


class Agent:
    """One device: its MQTT session, and the dispatch of commands, placements and frames to
    its blocks, token programs, links and load."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.name = config.name
        opened = config.opened or open_model(config.model)
        self.spec = opened.arch.spec
        cache = _weight_cache(config.weight_cache, opened.file.path)
        host = BlockHost(self.name, opened.source, opened.arch, torch.float32, cache)
        table = block_table(self.spec)
        timed = calibrated_table(table, config.profile) if config.profile else table
        self.errors: Counter[str] = Counter()  # failures by kind (command op, step, ...)
        self.epochs = Epochs()
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.name}-compute")
        self.plane = DataPlane(
            self.name, self._on_frame, key=config.dataplane_key, time_dilation=config.time_dilation
        )
        self.pacer = Pacer(config.cpu_share)  # the device's CPU share and background load
        self.blocks = DeviceBlocks(
            host, table, config.memory_bytes, self.plane, self.epochs, self.compute, self.errors,
            self.pacer,
        )  # fmt: skip
        self.runner = TokenRunner(
            self.blocks, timed, self.plane, self.epochs, self.pacer, self.compute, self._spawn,
            self.errors,
        )  # fmt: skip
        self.staging = Staging(
            self.blocks, self.plane, self.epochs, self.compute, config.cpu_share, self.errors,
            running=lambda: bool(self.runner.programs),
        )  # fmt: skip
        self.load = BackgroundLoad(config.cpu_share)  # CPU burners (cpu traces)
        self.pressure = MemoryPressure(  # a memory ballast (memory traces)
            self.name, lambda: self.blocks.used_bytes() > self.blocks.budget
        )
        self.links = LinkShaping(self.name, self.plane, self.epochs.endpoint, self.errors)
        self.probes = PeerProbes(self.plane, self._spawn)
        self.endpoint = ""
        self.tasks: set[asyncio.Task] = set()
        self.replies: OrderedDict[str, proto.Reply] = OrderedDict()  # by command id
        self.running: set[str] = set()  # ids of commands being carried out
        self.metrics = None
        self.cpu = CpuMeter(config.cpu_share)
        testbed = config.testbed
        offline = proto.Status(name=self.name, state="offline")
        # a broker slow to answer while a testbed starts is retried, and so is one lost
        # later (restarted): the agent rejoins with its blocks, caches and programs intact
        self.session = BrokerSession(
            config.broker,
            f"edgepart-{testbed}-{self.name}",
            [
                proto.device_topic(testbed, self.name, "cmd"),
                proto.placement_topic(testbed),
                # peers' retained statuses name their data ports: links are probed before
                # any plan
                proto.subscription(testbed, "status"),
            ],
            log=logging.getLogger(f"edgepart.agent.{self.name}"),
            hooks=SessionHooks(
                on_message=self._on_message,
                accepts=lambda topic: topic.kind in READS,
                on_connected=self._announce,
            ),
            error=BrokerGone,
            auth=config.broker_auth,
            will=aiomqtt.Will(self._topic("status"), proto.encode(offline), qos=1, retain=True),
            keepalive=MQTT_KEEPALIVE_S,
        )

    @property
    def dropped_messages(self) -> Counter[str]:
        """Malformed MQTT messages dropped so far, by topic kind."""
        return self.session.dropped.by_kind

    def _topic(self, kind: proto.TopicKind) -> str:
        return proto.device_topic(self.config.testbed, self.name, kind)

    # -- lifecycle ---------------------------------------------------------------------
    async def run(self) -> None:
        """Serve until cancelled or the broker stays away (BrokerGone)."""
        if self.config.shaping == "tc":
            # htb on the interface of the advertised (else listen) host
            await self.links.start_kernel(
                (self.config.advertise or self.config.listen).rpartition(":")[0]
            )
        host, _, port = self.config.listen.rpartition(":")
        bound_host, bound_port = await self.plane.start(host, int(port))
        self.endpoint = self.config.advertise or f"{bound_host}:{bound_port}"
        if self.config.metrics_port is not None:
            from edgepart.device_agent.metrics import AgentMetrics

            self.metrics = self.runner.metrics = AgentMetrics(self)
            # beside the data plane: all interfaces in a container, loopback on a laptop
            listen_host = self.config.listen.rpartition(":")[0] or "127.0.0.1"
            self.metrics.serve(self.config.metrics_port, listen_host)
        if self.config.join_file is not None:
            await self._until_told_to_join(self.config.join_file)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._telemetry_loop())
                if self.config.exit_with_parent:
                    tg.create_task(self._exit_with_parent(asyncio.current_task()))
                await self.session.run()
        except BaseExceptionGroup as group:
            gone = first_error(group, BrokerGone)
            if gone is None:
                raise
            raise gone from None
        finally:
            await self._shutdown()

    async def _until_told_to_join(self, path: str) -> None:
        """Wait (as long as it takes: a join may come late in a long run) for the file that
        lets this device join."""
        if not os.path.exists(path):
            log.info("%s: waiting for %s before joining", self.name, path)
        while not os.path.exists(path):
            await asyncio.sleep(JOIN_POLL_S)

    async def _announce(self, publish: Publish) -> None:
        """After every connect: online, with the data plane's endpoint (retained)."""
        online = proto.Status(name=self.name, state="online", listen=self.endpoint, ts=time.time())
        await publish(self._topic("status"), online, retain=True)
        log.info("%s: online, data plane on %s", self.name, self.endpoint)

    async def _shutdown(self) -> None:
        self.runner.cancel()
        for task in list(self.tasks):
            task.cancel()
        self.load.stop()
        self.pressure.stop()
        await self.plane.close()
        await self.links.clear()
        self.compute.shutdown(wait=False, cancel_futures=True)
        self.staging.shutdown()

    async def _exit_with_parent(self, main: asyncio.Task | None) -> None:
        """Cancel the agent's main task once the parent process is gone."""
        parent = os.getppid()
        while os.getppid() == parent:
            await asyncio.sleep(0.5)
        log.warning("%s: parent process gone, exiting", self.name)
        if main is not None:
            main.cancel()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # -- MQTT --------------------------------------------------------------------------
    async def _on_message(self, topic: proto.Topic, message: BaseModel) -> None:
        if isinstance(message, proto.PlacementEpoch):
            self._set_epoch(message)
        elif isinstance(message, proto.Status):
            if message.name != self.name and message.listen and message.state == "online":
                self.plane.set_endpoints({message.name: message.listen})
        else:
            self._on_command(message)

    async def _reply(self, command_id: str, ok: bool, error: str | None = None, **extra) -> None:
        reply = proto.Reply(id=command_id, name=self.name, ok=ok, error=error, **extra)
        self.replies[command_id] = reply
        while len(self.replies) > REPLIES_KEPT:
            self.replies.popitem(last=False)
        await self._send_reply(reply)

    async def _send_reply(self, reply: proto.Reply) -> None:
        """Publish a reply; without a broker it stays kept for the command's resend."""
        if self.session.is_ready:
            await self.session.publish(self._topic("reply"), reply, retry=False)

    def _on_command(self, cmd) -> None:
        """Run a command once: a resent one (the controller lost the broker meanwhile) gets
        the kept reply, or nothing while the first is still running."""
        if cmd.id in self.running:
            return
        kept = self.replies.get(cmd.id)
        if kept is not None:
            self._spawn(self._send_reply(kept))
            return
        self.running.add(cmd.id)
        task = self._spawn(self._command(cmd))
        task.add_done_callback(lambda _: self.running.discard(cmd.id))

    async def _command(self, cmd) -> None:
        handlers = {
            "load": self.blocks.load,
            "drop": self.blocks.drop,
            "prepare": self.staging.prepare,
            "commit": self.staging.commit,
            "discard": self.staging.discard,
            "shape": self.links.shape,
            "inject_load": self._inject_load,
            "set_budget": self._set_budget,
            "decode": self.runner.decode,
            "reset": self._reset,
        }
        try:
            extra = await handlers[cmd.op](cmd) or {}
        except CommandRefused as exc:
            await self._reply(cmd.id, False, str(exc), **exc.reply)
        except (
            ValueError,
            KeyError,
            ConnectionError,
            TimeoutError,
            FrameError,
            RuntimeError,
        ) as exc:
            self.errors[cmd.op] += 1
            log.warning("%s: %s failed: %r", self.name, cmd.op, exc)
            await self._reply(cmd.id, False, f"{cmd.op} failed: {exc!r}")
        else:
            await self._reply(cmd.id, True, **extra)

    # -- placement epochs --------------------------------------------------------------
    def _set_epoch(self, msg: proto.PlacementEpoch) -> None:
        if msg.epoch in self.epochs:
            return  # a re-delivered retained message
        try:
            routes = Routes(msg.placement, self.spec.layers, self.spec.kv_heads)
        except ValueError as exc:
            self.session.dropped("placement", str(exc))
            return
        newest = self.epochs.add(Epoch(msg.epoch, dict(msg.placement), routes, dict(msg.endpoints)))
        self.plane.set_endpoints({k: v for k, v in msg.endpoints.items() if k != self.name})
        if self.links.in_kernel:
            self._spawn(self.links.retune())
        if newest:
            self.plane.admit(set(msg.endpoints) - {self.name})
            # the old copies of moved blocks are no longer routed to: free them
            self.blocks.drop_unplaced(msg.placement)

    # -- commands that reach several parts --------------------------------------------
    async def _set_budget(self, cmd: proto.SetBudget) -> None:
        self.blocks.budget = cmd.memory_bytes
        self.staging.fit_budget()  # prepared blocks go first
        await self.pressure.set_target(cmd.occupied_bytes)

    async def _reset(self, cmd: proto.Reset) -> None:
        self.staging.free_all()
        await self.runner.reset(cmd)

    async def _inject_load(self, cmd: proto.InjectLoad) -> None:
        self.pacer.set_background(cmd.fraction)
        self.staging.set_background(cmd.fraction)
        # what was measured before is not the device under this load
        self.runner.speed.reset()
        self.load.set(cmd.fraction)

    def nominal_available_gflops(self) -> float:
        """The configured speed after background load (GFLOP/s), 0 when unknown."""
        return (self.config.nominal_gflops or 0.0) * (1.0 - self.pacer.background)

    # -- data plane --------------------------------------------------------------------
    async def _on_frame(self, frame: Frame) -> None:
        if frame.kind == Kind.ACTIVATION:
            self.runner.on_activation(frame)
        elif frame.kind == Kind.FETCH:
            self._spawn(self.blocks.serve_fetch(frame))
        elif frame.token and frame.kind in (Kind.BLOCK_STATE, Kind.ERROR):
            self.blocks.answer_fetch(frame)  # a FETCH's answer: its request number, from 1
        elif frame.kind == Kind.BLOCK_BATCH:
            self._spawn(self.staging.receive_batch(frame))
        elif frame.kind in (Kind.ACK, Kind.ERROR):  # a batch's answer (token 0)
            if not self.staging.answered(frame):
                self.errors["late_batch_answer"] += 1  # its commit gave up waiting
        else:  # no agent sends these here (a block state unasked for, a second handshake)
            self.plane.count_bad(f"unexpected frame: {frame.kind.name} {frame.name[:40]!r}")

    # -- telemetry ---------------------------------------------------------------------
    def telemetry(self) -> proto.Telemetry:
        """What this device has and uses now."""
        available, measured = self.runner.speed.available_gflops(self.nominal_available_gflops())
        host = self.blocks.host
        return proto.Telemetry(
            name=self.name,
            ts=time.time(),
            cpu_used=self.cpu.used(self.load.cpu_seconds),
            available_gflops=available,
            memory_used_bytes=float(self.blocks.used_bytes()),
            memory_budget_bytes=float(self.blocks.budget),
            kv_bytes=float(host.cache_bytes()),
            blocks=tuple(sorted(host.blocks)),
            peer_throughput_mbit=self.plane.measured_mbit(),
            compute_measured=measured,
            dropped_messages=self.session.dropped.total,
            dropped_frames=sum(self.plane.bad_frames.values()),
            peer_latency_s=self.plane.measured_latency_s(),
            send_overhead_s=max(0.0, self.runner.handoff.value()),
            receive_overhead_s=max(0.0, self.runner.wakeup.value()),
            occupied_bytes=float(self.pressure.held_bytes),
            unreachable_peers=tuple(sorted(self.plane.unreachable & set(self.plane.peers()))),
            prepared_bytes=float(self.blocks.prepared.bytes()),
        )

    async def _telemetry_loop(self) -> None:
        while True:
            # a ballast takes a process start and a memory fill: never in the way of telemetry
            if not self.pressure.settling:
                self._spawn(self.pressure.settle())
            self.probes.probe_next()
            if self.session.is_ready:  # none while the broker is away: it would be stale
                await self.session.publish(
                    self._topic("telemetry"), self.telemetry(), retry=False, qos=0
                )
            await asyncio.sleep(TELEMETRY_PERIOD_S)


def _weight_cache(directory: str | None, checkpoint: os.PathLike | str) -> WeightCache | None:
    """The checkpoint's weight cache under ``directory``; None without one, or when it
    cannot be written (the agent then reads every block from the checkpoint)."""
    if directory is None:
        return None
    try:
        cache = WeightCache.for_checkpoint(checkpoint, directory)
        cache.directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("no weight cache in %s: %s", directory, exc)
        return None
    if not os.access(cache.directory, os.W_OK):
        log.warning("no weight cache: %s is not writable", cache.directory)
        return None
    return cache


class BrokerGone(RuntimeError):
    """The broker did not answer at the start, or stayed away after a loss."""


def run_agent(config: AgentConfig) -> int:
    """Run an agent until SIGTERM/SIGINT; returns the exit code."""
    torch.set_num_threads(1)
    # the compute thread holds the GIL between torch calls: an activation that arrives
    # while it runs waits for the interpreter's switch interval (5 ms by default) before
    # the event loop can take it, a delay no probe or hop measurement sees
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    async def main() -> None:
        agent = Agent(config)
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()

        def stop() -> None:
            task.cancel()  # type: ignore[union-attr]
            # a device that is told to stop stops: if an orderly shutdown hangs (a broker
            # that does not answer the disconnect), the process still ends in bounded time
            loop.call_later(STOP_GRACE_S, _exit_now, 0)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        await agent.run()

    try:
        asyncio.run(main())
    except (asyncio.CancelledError, KeyboardInterrupt):
        code = 0
    except BrokerGone as exc:
        log.error("%s: %s", config.name, exc)
        code = 1
    except TcUnavailable as exc:
        log.error("%s: %s", config.name, exc)
        code = 2
    else:
        code = 0
    _exit_now(code)
    return code  # pragma: no cover - _exit_now does not return


def _exit_now(code: int) -> None:
    """End the process now (logs flushed): worker threads must not hold it open."""
    logging.shutdown()
    os._exit(code)
