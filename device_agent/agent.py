"""The process on each device: holds blocks, runs them per token, moves them on command.

Control arrives over MQTT (``device_agent.protocol``); data travels agent to agent over
the TCP data plane (``device_agent.dataplane``). For every token each agent follows the
program its placement epoch gives it (``device_agent.program``): wait for the named
inputs, run its blocks in a single compute thread, send the output to the consumers.
Compute is paced to the device's speed (time dilation: a call that used c s of CPU lasts
c / share s) and background load runs as real CPU burners.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import aiomqtt
import torch

from control_plane import mqtt
from control_plane import protocol as proto
from device_agent.ballast import CGROUP_MARGIN_BYTES, Ballast, BallastError, cgroup_room_bytes
from device_agent.dataplane import DataPlane, RecentMean
from device_agent.program import Routes, Step, activation_problem
from device_agent.tc import TcShaper, TcUnavailable, interface_for
from device_agent.wire import Frame, FrameError, Kind, payload_to_tensor, tensor_to_payload
from llm.blocks import BlockTable, block_table
from llm.calibration import ComputeProfile, calibrated_table
from llm.loader import open_model
from llm.runtime import BlockHost
from llm.state import BlockState, block_state, dump_state, load_state
from llm.torch_blocks import (
    EmbedBlock,
    FFNBlock,
    HeadBlock,
    KVGroupBlock,
    ProjBlock,
    parse_block_name,
)

log = logging.getLogger("edgepart.agent")

TELEMETRY_PERIOD_S = 0.5
STEP_TIMEOUT_S = 60.0  # longest wait (s) for one input of a token
SEND_TIMEOUT_S = 120.0  # longest (s) one frame may take on a shaped link (a migration at 1 Mbit)
EPOCH_WAIT_S = 10.0  # how long (s) a frame or command may wait for its placement to arrive
#: longest wait (s) for a peer's answer to a FETCH: its read of the block, one shaped send
FETCH_TIMEOUT_S = SEND_TIMEOUT_S + 30.0
MQTT_KEEPALIVE_S = 5
MQTT_TIMEOUT_S = 30  # per MQTT operation (s): an embedded broker on a loaded host is slow
JOIN_WINDOW_S = 90.0  # how long (s) an agent keeps trying to reach the broker at start
#: how long (s) an agent that lost its broker keeps reconnecting before it gives up; its
#: blocks and caches stay, the data plane keeps running meanwhile
BROKER_LOST_WINDOW_S = 60.0
REPLIES_KEPT = 256  # answered commands whose replies are kept for a resent command
STOP_GRACE_S = 3.0  # longest orderly shutdown after SIGTERM before the process just exits
#: latency probes per telemetry period (to that many peers in turn)
PROBES_PER_PERIOD = 4
GIL_SWITCH_INTERVAL_S = 0.0005  # s; see run_agent
JOIN_POLL_S = 0.1  # how often a device that joins later looks for its join file (s)
PACE_MIN_SLEEP_S = 0.0005  # shorter dilation waits are owed, not slept (s)
#: decode steps whose compute speed is averaged into the measured GFLOP/s
SPEED_WINDOW = 64


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


@dataclass
class _Epoch:
    number: int
    placement: dict[str, str]
    routes: Routes
    endpoints: dict[str, str]


class Mailbox:
    """Tensors of the current steps by (position, name), awaited by the programs."""

    def __init__(self) -> None:
        self._slots: dict[tuple[int, str], asyncio.Future] = {}
        self._arrived: dict[tuple[int, str], float] = {}  # monotonic time of delivery

    def _slot(self, key: tuple[int, str]) -> asyncio.Future:
        fut = self._slots.get(key)
        if fut is None:
            fut = self._slots[key] = asyncio.get_running_loop().create_future()
        return fut

    def put(self, position: int, name: str, tensor: torch.Tensor) -> bool:
        """Deliver a tensor; False if one of that name was already delivered."""
        fut = self._slot((position, name))
        if fut.done():
            return False
        fut.set_result(tensor)
        self._arrived[(position, name)] = time.monotonic()
        return True

    def arrived(self, position: int, name: str) -> float | None:
        """When a delivered tensor arrived (monotonic s); None if made here or not yet in."""
        return self._arrived.get((position, name))

    async def get(self, position: int, name: str, timeout_s: float) -> torch.Tensor:
        """The tensor of that step and name, once delivered (raises TimeoutError)."""
        return await asyncio.wait_for(asyncio.shield(self._slot((position, name))), timeout_s)

    def discard(self, position: int) -> None:
        """Forget a finished step's tensors."""
        for key in [k for k in self._slots if k[0] == position]:
            self._arrived.pop(key, None)
            fut = self._slots.pop(key)
            if not fut.done():
                fut.cancel()


@dataclass
class _Speed:
    """Measured compute speed over recent decode steps (reference-equivalent GFLOP/s)."""

    flops: deque = field(default_factory=lambda: deque(maxlen=SPEED_WINDOW))
    seconds: deque = field(default_factory=lambda: deque(maxlen=SPEED_WINDOW))
    last: float = 0.0  # monotonic time of the last sample

    def add(self, flops: float, seconds: float) -> None:
        self.flops.append(flops)
        self.seconds.append(seconds)
        self.last = time.monotonic()

    def gflops(self, fresh_s: float = 5.0) -> float | None:
        if not self.seconds or time.monotonic() - self.last > fresh_s:
            return None
        total = sum(self.seconds)
        return sum(self.flops) / total / 1e9 if total > 0 else None


class Agent:
    """One device: a block host, its data plane and its MQTT control loop."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.name = config.name
        opened = open_model(config.model)
        self.arch = opened.arch
        self.spec = opened.arch.spec
        self.host = BlockHost(self.name, opened.source, self.arch, torch.float32)
        self.table: BlockTable = block_table(self.spec)
        self.timed = calibrated_table(self.table, config.profile) if config.profile else self.table
        self.budget = int(config.memory_bytes)
        self.pace_debt_s = 0.0  # time dilation owed (s), negative when a sleep overshot
        self.incoming = 0  # bytes of blocks being adopted (admitted, not yet held)
        self.share = config.cpu_share
        self.background = 0.0
        self.burners = None  # device_agent.limits.Burners, created on first inject_load
        self.epochs: dict[int, _Epoch] = {}
        self.epoch_changed = asyncio.Event()
        self.current_epoch = -1
        self.mailbox = Mailbox()
        self.programs: dict[int, asyncio.Task] = {}  # position -> running program
        self.done_positions: deque[int] = deque(maxlen=256)
        self.acks: dict[tuple[int, str], asyncio.Future] = {}  # (epoch, block) -> ack/error
        #: (request number, block) -> the peer's answer to a FETCH: state bytes, or an error
        self.fetches: dict[tuple[int, str], asyncio.Future] = {}
        self.fetch_requests = 0  # FETCH request numbers start at 1 (token 0 is a migration's)
        self.dropped_messages: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.speed = _Speed()
        #: measured speed / nominal available speed on the blocks run last (1 until measured)
        self.efficiency = 1.0
        self.ballast = Ballast()  # memory another application takes (memory traces)
        self.occupied_target = 0  # bytes the ballast is to hold once the blocks leave room
        self.ballast_lock = asyncio.Lock()
        self.warmed: set[tuple[str, ...]] = set()  # steps (their blocks) decoded at least once
        self.probe_turn = 0  # where the next telemetry period's latency probes start
        self.handoff = RecentMean()  # compute thread -> event loop, per sent activation (s)
        self.wakeup = RecentMean()  # last input in -> its step started, per waiting step (s)
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.name}-compute")
        self.plane = DataPlane(self.name, self._on_frame, key=config.dataplane_key)
        self.tc: TcShaper | None = None  # kernel shaping of this device's interface (tc mode)
        self.tc_rates: dict[str, float] = {}  # peer -> Mbit/s the last shape command set
        self.tc_applied: dict[str, tuple[str, float]] = {}  # peer -> (endpoint, Mbit/s) set
        self.tc_lock = asyncio.Lock()  # one kernel update at a time, the latest rate last
        self.endpoint = ""
        self.client: aiomqtt.Client | None = None
        self.tasks: set[asyncio.Task] = set()
        self.replies: OrderedDict[str, proto.Reply] = OrderedDict()  # by command id
        self.running: set[str] = set()  # ids of commands being carried out
        self.broker_losses = 0
        self.metrics = None
        self._cpu_mark = (time.monotonic(), time.process_time())

    # -- lifecycle ---------------------------------------------------------------------
    async def run(self) -> None:
        """Serve until cancelled or the broker connection is lost for good."""
        if self.config.shaping == "tc":
            self.tc = await asyncio.to_thread(self._start_tc)
        host, _, port = self.config.listen.rpartition(":")
        bound_host, bound_port = await self.plane.start(host, int(port))
        self.endpoint = self.config.advertise or f"{bound_host}:{bound_port}"
        if self.config.metrics_port is not None:
            from device_agent.metrics import AgentMetrics

            self.metrics = AgentMetrics(self)
            # beside the data plane: all interfaces in a container, loopback on a laptop
            listen_host = self.config.listen.rpartition(":")[0] or "127.0.0.1"
            self.metrics.serve(self.config.metrics_port, listen_host)
        if self.config.join_file is not None:
            await self._until_told_to_join(self.config.join_file)
        testbed = self.config.testbed
        status_topic = proto.device_topic(testbed, self.name, "status")
        offline = proto.Status(name=self.name, state="offline")
        # a broker slow to answer while a testbed starts is retried, and so is one lost
        # later (restarted): the agent rejoins with its blocks, caches and programs intact
        deadline = time.monotonic() + JOIN_WINDOW_S
        delay = 0.2
        try:
            while True:
                # a fresh client per attempt: one whose connect failed is not reused
                client = mqtt.client(
                    self.config.broker,
                    identifier=f"edgepart-{testbed}-{self.name}",
                    auth=self.config.broker_auth,
                    keepalive=MQTT_KEEPALIVE_S,
                    will=aiomqtt.Will(status_topic, proto.encode(offline), qos=1, retain=True),
                    timeout=MQTT_TIMEOUT_S,
                )
                try:
                    async with client:
                        await self._serve(client, status_topic)
                    return
                except (aiomqtt.MqttError, BrokerLost) as exc:
                    if self.client is not None:  # it was connected: a new loss
                        log.warning("%s: lost the broker (%s), reconnecting", self.name, exc)
                        self.client = None
                        self.broker_losses += 1
                        deadline = time.monotonic() + BROKER_LOST_WINDOW_S
                        delay = 0.2
                    if time.monotonic() + delay > deadline:
                        raise
                    log.info("%s: broker not reachable (%s), retrying", self.name, exc)
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, 2.0)
        finally:
            await self._shutdown()

    async def _until_told_to_join(self, path: str) -> None:
        """Wait (as long as it takes: a join may come late in a long run) for the file that
        lets this device join."""
        if not os.path.exists(path):
            log.info("%s: waiting for %s before joining", self.name, path)
        while not os.path.exists(path):
            await asyncio.sleep(JOIN_POLL_S)

    async def _serve(self, client: aiomqtt.Client, status_topic: str) -> None:
        testbed = self.config.testbed
        await client.subscribe(proto.device_topic(testbed, self.name, "cmd"), qos=1)
        await client.subscribe(proto.placement_topic(testbed), qos=1)
        # peers' retained statuses name their data ports: links are probed before any plan
        await client.subscribe(proto.subscription(testbed, "status"), qos=1)
        online = proto.Status(name=self.name, state="online", listen=self.endpoint, ts=time.time())
        await client.publish(status_topic, proto.encode(online), qos=1, retain=True)
        self.client = client
        log.info("%s: online, data plane on %s", self.name, self.endpoint)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._telemetry_loop())
                if self.config.exit_with_parent:
                    tg.create_task(self._watch_parent())
                await self._message_loop(client)
        # not except*: before Python 3.11.4 (Debian's 3.11.2 in the image) an exception
        # raised in an except* handler leaves it wrapped in a group
        except BaseExceptionGroup as group:
            lost = group.subgroup(aiomqtt.MqttError)
            if lost is None:
                raise
            first = lost
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise BrokerLost(str(first)) from None

    async def _shutdown(self) -> None:
        for task in list(self.programs.values()) + list(self.tasks):
            task.cancel()
        if self.burners is not None:
            self.burners.stop()
        self.ballast.stop()
        await self.plane.close()
        if self.tc is not None:
            with contextlib.suppress(TcUnavailable):
                await asyncio.to_thread(self.tc.clear)
        self.compute.shutdown(wait=False, cancel_futures=True)

    async def _watch_parent(self) -> None:
        parent = os.getppid()
        while True:
            await asyncio.sleep(0.5)
            if os.getppid() != parent:
                log.warning("%s: parent process gone, exiting", self.name)
                raise asyncio.CancelledError

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # -- MQTT --------------------------------------------------------------------------
    async def _message_loop(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = proto.parse_topic(message.topic.value)
            payload = message.payload if isinstance(message.payload, bytes) else b""
            if topic is None or topic.kind not in ("cmd", "placement", "status"):
                self._drop_message("topic", f"unexpected topic {message.topic.value}")
                continue
            decoded = proto.decode(topic.kind, payload)
            if isinstance(decoded, proto.Malformed):
                self._drop_message(topic.kind, decoded.reason)
                continue
            if isinstance(decoded, proto.PlacementEpoch):
                self._set_epoch(decoded)
            elif isinstance(decoded, proto.Status):
                if decoded.name != self.name and decoded.listen and decoded.state == "online":
                    self.plane.set_endpoints({decoded.name: decoded.listen})
            else:
                self._on_command(decoded)

    def _drop_message(self, kind: str, reason: str) -> None:
        if self.dropped_messages[kind] == 0:
            log.warning(
                "%s: dropped malformed %s message (%s); logged once per kind",
                self.name,
                kind,
                reason,
            )
        self.dropped_messages[kind] += 1

    async def _publish(self, kind: proto.TopicKind, message, retain: bool = False) -> None:
        assert self.client is not None
        topic = proto.device_topic(self.config.testbed, self.name, kind)
        await self.client.publish(
            topic, proto.encode(message), qos=1 if retain else 0, retain=retain
        )

    async def _reply(self, command_id: str, ok: bool, error: str | None = None, **extra) -> None:
        reply = proto.Reply(id=command_id, name=self.name, ok=ok, error=error, **extra)
        self.replies[command_id] = reply
        while len(self.replies) > REPLIES_KEPT:
            self.replies.popitem(last=False)
        await self._send_reply(reply)

    async def _send_reply(self, reply: proto.Reply) -> None:
        """Publish a reply; without a broker it stays kept for the command's resend."""
        client = self.client
        if client is None:
            return
        topic = proto.device_topic(self.config.testbed, self.name, "reply")
        try:
            await client.publish(topic, proto.encode(reply), qos=1)
        except aiomqtt.MqttError as exc:
            log.info("%s: reply %s kept until the broker is back (%s)", self.name, reply.id, exc)

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
            "load": self._load,
            "drop": self._drop,
            "migrate": self._migrate,
            "shape": self._shape,
            "inject_load": self._inject_load,
            "set_budget": self._set_budget,
            "decode": self._decode,
            "reset": self._reset,
        }
        try:
            extra = await handlers[cmd.op](cmd) or {}
        except CommandRefused as exc:
            await self._reply(cmd.id, False, str(exc))
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
            self._drop_message("placement", str(exc))
            return
        epoch = _Epoch(msg.epoch, dict(msg.placement), routes, dict(msg.endpoints))
        self.epochs[msg.epoch] = epoch
        for old in [e for e in self.epochs if e < msg.epoch - 2]:
            del self.epochs[old]
        self.plane.set_endpoints({k: v for k, v in msg.endpoints.items() if k != self.name})
        if self.tc is not None:
            self._spawn(self._retune_tc())
        if msg.epoch >= self.current_epoch:
            self.current_epoch = msg.epoch
            self.plane.admit(set(msg.endpoints) - {self.name})
            # the old copies of moved blocks are no longer routed to: free them
            for block in list(self.host.blocks):
                if msg.placement.get(block) != self.name:
                    self.host.drop(block)
        self.epoch_changed.set()
        self.epoch_changed = asyncio.Event()

    async def _epoch(self, number: int) -> _Epoch:
        deadline = time.monotonic() + EPOCH_WAIT_S
        while number not in self.epochs:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"placement epoch {number} never arrived")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.epoch_changed.wait(), left)
        return self.epochs[number]

    # -- memory ------------------------------------------------------------------------
    def used_bytes(self) -> int:
        """Bytes of weights and KV caches held."""
        return self.host.weight_bytes() + self.host.cache_bytes() + self.incoming

    def block_bytes(self, block: str, length: int) -> int:
        """Bytes a block will take when held with ``length`` cached positions."""
        kind = parse_block_name(block).kind
        if kind == "embed":
            return int(self.table.source_weight_bytes)
        if kind == "head":
            return 0 if self.spec.tied_embeddings else int(self.table.source_weight_bytes // 2)
        return int(self.table.memory_bytes(length)[self.table.index(block)])

    def _admit(self, blocks: Sequence[str], length: int) -> None:
        need = sum(self.block_bytes(b, length) for b in blocks)
        used = self.used_bytes()
        if used + need > self.budget:
            raise CommandRefused(
                f"{self.name}: holding {', '.join(blocks)} needs {need} bytes on top of "
                f"{used}, over the budget of {self.budget} bytes"
            )

    # -- commands ----------------------------------------------------------------------
    async def _load(self, cmd: proto.Load) -> dict:
        todo = [b for b in cmd.blocks if b not in self.host.blocks]
        order = sorted(todo, key=lambda b: b != "embed")  # a tied head needs the embedding
        peer = cmd.peer if cmd.weights_from == "peer" else None
        if cmd.weights_from == "peer" and peer is None:
            raise ValueError("a load with weights from a peer names no peer")
        if peer == self.name:
            peer = None  # the device with the checkpoint reads its own
        self._admit(order, 0)  # before anything is fetched or allocated
        start = time.monotonic()
        loop = asyncio.get_running_loop()
        for block in order:
            if peer is None:
                await loop.run_in_executor(self.compute, self.host.load, block)
                continue
            need = self.block_bytes(block, 0)
            self.incoming += need  # admitted: counted while its weights are on the way
            try:
                state = await self._fetch_weights(peer, block)
                await loop.run_in_executor(self.compute, self.host.load, block, state.weights)
            finally:
                self.incoming -= need
        return {"seconds": time.monotonic() - start}

    async def _fetch_weights(self, peer: str, block: str) -> BlockState:
        """A block's weights from a peer over the data plane: FETCH, then its BLOCK_STATE
        (or ERROR) answer with the same request number; every wait is bounded."""
        await self._endpoint_known(peer)
        self.fetch_requests += 1
        key = (self.fetch_requests, block)
        fut = self.fetches[key] = asyncio.get_running_loop().create_future()
        epoch = max(self.current_epoch, 0)
        try:
            request = Frame(Kind.FETCH, epoch, key[0], block, self.name.encode())
            await self.plane.send(peer, request, SEND_TIMEOUT_S)
            kind, payload = await asyncio.wait_for(fut, FETCH_TIMEOUT_S)
        finally:
            self.fetches.pop(key, None)
        if kind == Kind.ERROR:
            raise RuntimeError(f"{peer} did not serve {block}: {payload.decode(errors='replace')}")
        state = load_state(payload, expect_model=self.spec.name)
        if state.block != block or not state.weights:
            raise ValueError(f"{peer} answered the fetch of {block} with no weights of it")
        return state

    async def _endpoint_known(self, peer: str) -> None:
        """Wait (bounded) for a placement that names the peer's data-plane endpoint."""
        deadline = time.monotonic() + EPOCH_WAIT_S
        while not any(peer in e.endpoints for e in self.epochs.values()):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no placement epoch names the endpoint of {peer}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.epoch_changed.wait(), left)

    async def _serve_fetch(self, frame: Frame) -> None:
        """Answer a peer's FETCH: the block's weights (the copy held here, else read from this
        device's checkpoint) as a BLOCK_STATE, or an ERROR with the reason; same token."""
        try:
            requester = frame.payload.decode("utf-8")
        except UnicodeDecodeError:
            requester = ""
        if frame.token == 0 or not requester or requester == self.name:
            self.plane._count_bad(f"fetch: bad request (token {frame.token}, {frame.payload!r})")
            return
        loop = asyncio.get_running_loop()
        try:
            answer = await loop.run_in_executor(
                self.compute, lambda: dump_state(self.host.weights_of(frame.name))
            )
            kind = Kind.BLOCK_STATE
        except (ValueError, KeyError, OSError, RuntimeError) as exc:
            answer = f"{self.name} cannot serve the weights of {frame.name}: {exc}".encode()
            kind = Kind.ERROR
        try:
            await self._endpoint_known(requester)
            reply = Frame(kind, frame.epoch, frame.token, frame.name, answer)
            await self.plane.send(requester, reply, SEND_TIMEOUT_S)
        except (ConnectionError, TimeoutError) as exc:
            self.errors["fetch"] += 1
            log.warning(
                "%s: answering %s's fetch of %s failed: %r", self.name, requester, frame.name, exc
            )

    def _answer_fetch(self, frame: Frame) -> None:
        """A peer's answer (BLOCK_STATE or ERROR) to a FETCH of ours."""
        fut = self.fetches.get((frame.token, frame.name))
        if fut is None or fut.done():
            self.errors["late_fetch_answer"] += 1
            return
        fut.set_result((frame.kind, frame.payload))

    async def _drop(self, cmd: proto.Drop) -> None:
        for block in cmd.blocks:
            if block in self.host.blocks:
                self.host.drop(block)

    async def _reset(self, cmd: proto.Reset) -> None:
        for task in list(self.programs.values()):
            task.cancel()
        self.done_positions.clear()

        def reset_caches() -> None:
            for block in self.host.held():
                if isinstance(block, KVGroupBlock):
                    block.reset()

        # in the compute thread, after any step of a cancelled program still running there
        await asyncio.get_running_loop().run_in_executor(self.compute, reset_caches)

    async def _shape(self, cmd: proto.Shape) -> None:
        if self.tc is None:
            self.plane.shape(cmd.peer, cmd.bandwidth_mbit, cmd.latency_ms / 1000.0)
            return
        # tc mode: the kernel paces the bytes, the data plane adds only the latency (and
        # holds the frames of a cut link)
        self.plane.shape(cmd.peer, 0.0 if cmd.bandwidth_mbit == 0 else None, cmd.latency_ms / 1e3)
        if cmd.bandwidth_mbit == 0:
            return
        self.tc_rates[cmd.peer] = cmd.bandwidth_mbit
        await self._apply_tc(cmd.peer)

    def _start_tc(self) -> TcShaper:
        """Set up htb on the interface of the advertised (else listen) host (blocking)."""
        host = (self.config.advertise or self.config.listen).rpartition(":")[0]
        shaper = TcShaper(interface_for(host))
        shaper.setup()
        log.info("%s: kernel link shaping on %s", self.name, shaper.ifname)
        return shaper

    async def _apply_tc(self, peer: str) -> None:
        """Put a peer's last commanded rate (Mbit/s) into the kernel, once its endpoint is known.

        Shape commands may precede the first placement (which carries the endpoints): the
        rate is kept and applied when an epoch names the peer's host.
        """
        assert self.tc is not None
        async with self.tc_lock:
            epoch = self.epochs.get(self.current_epoch)
            endpoint = epoch.endpoints.get(peer) if epoch is not None else None
            rate = self.tc_rates[peer]
            if endpoint is None or self.tc_applied.get(peer) == (endpoint, rate):
                return
            host = endpoint.rpartition(":")[0]
            try:
                ip = await asyncio.to_thread(socket.gethostbyname, host)
            except OSError as exc:
                raise TcUnavailable(f"cannot resolve {peer}'s host {host!r}: {exc}") from exc
            await asyncio.to_thread(self.tc.shape, ip, rate)
            self.tc_applied[peer] = (endpoint, rate)

    async def _retune_tc(self) -> None:
        """Apply the kernel rates of peers whose endpoints a new placement may have named."""
        for peer in list(self.tc_rates):
            try:
                await self._apply_tc(peer)
            except TcUnavailable as exc:
                self.errors["tc"] += 1
                log.warning("%s: kernel shaping towards %s failed: %s", self.name, peer, exc)

    async def _set_budget(self, cmd: proto.SetBudget) -> None:
        self.budget = cmd.memory_bytes
        self.occupied_target = cmd.occupied_bytes
        await self._settle_ballast()

    async def _settle_ballast(self) -> None:
        """Bring the ballast to the memory other applications take: at once when it shrinks,
        when it grows only once this device's own blocks fit the budget (the controller
        moves the rest away first), so the two never exceed the device's memory."""
        async with self.ballast_lock:
            target, held = self.occupied_target, self.ballast.held_bytes
            if target == held or (target > held and self.used_bytes() > self.budget):
                return
            room = cgroup_room_bytes()
            if target > held and room is not None:
                # never into an OOM kill: freed blocks' pages may not be back yet
                target = min(target, held + max(0, room - CGROUP_MARGIN_BYTES))
                if target == held:
                    return
            try:
                await asyncio.to_thread(self.ballast.hold, target)
            except BallastError as exc:  # the trace's pressure is lost, the device goes on
                log.warning("%s: memory ballast of %d bytes failed: %s", self.name, target, exc)
                self.occupied_target = self.ballast.held_bytes  # not again every period

    async def _inject_load(self, cmd: proto.InjectLoad) -> None:
        from device_agent.limits import Burners

        self.background = cmd.fraction
        # what was measured before is not the device under this load
        self.speed = _Speed()
        self.efficiency = 1.0
        if self.share is None:
            return  # an unpaced device has no share to take a fraction of
        if self.burners is None:
            self.burners = Burners(self.share)
        self.burners.set_load(cmd.fraction)

    def effective_share(self) -> float | None:
        """Cores left to edgepart after background load (None: unpaced)."""
        return None if self.share is None else self.share * (1.0 - self.background)

    def nominal_available_gflops(self) -> float:
        """The configured speed after background load (GFLOP/s), 0 when unknown."""
        return (self.config.nominal_gflops or 0.0) * (1.0 - self.background)

    async def _migrate(self, cmd: proto.Migrate) -> dict:
        """Stream a block (a group's KV cache, weights if asked) to the target; done when it
        acks. Every kind travels as an llm.state blob; with weights the target reads nothing
        from its own disk."""
        block = self.host[cmd.block]
        if not isinstance(block, KVGroupBlock | ProjBlock | FFNBlock):
            raise ValueError(f"{cmd.block} is pinned to this device")
        payload = await asyncio.get_running_loop().run_in_executor(
            self.compute,
            lambda: dump_state(block_state(block, self.spec.name, with_weights=cmd.with_weights)),
        )
        key = (cmd.epoch, cmd.block)
        fut = self.acks[key] = asyncio.get_running_loop().create_future()
        start = time.monotonic()
        try:
            await self.plane.send(
                cmd.to, Frame(Kind.BLOCK_STATE, cmd.epoch, 0, cmd.block, payload), SEND_TIMEOUT_S
            )
            error = await asyncio.wait_for(fut, SEND_TIMEOUT_S)
        finally:
            self.acks.pop(key, None)
        if error:
            raise CommandRefused(error)
        # the target holds it now and no token runs during a switch: free it here at once,
        # so what this device receives in the same re-plan finds the room
        self.host.drop(cmd.block)
        return {"bytes_moved": float(len(payload)), "seconds": time.monotonic() - start}

    async def _receive_block(self, frame: Frame) -> None:
        """Take a migrated block, then acknowledge (or refuse) to the sender."""
        # the epoch the move leaves names the sender, and its switch may free memory here
        try:
            leaving = await self._epoch(frame.epoch - 1)
            sender = leaving.placement[frame.name]
        except (TimeoutError, KeyError):  # no one to answer: counted as bad input
            self.plane._count_bad(
                f"block state: {frame.name[:40]!r} has no sender in epoch {frame.epoch - 1}"
            )
            return
        error = ""
        try:
            state = (
                load_state(frame.payload, expect_model=self.spec.name) if frame.payload else None
            )
            if state is not None and state.block != frame.name:
                raise ValueError(f"the state sent as {frame.name} is of {state.block}")
            length = state.length if state is not None else 0
            if frame.name in self.host.blocks:
                raise CommandRefused(f"{self.name} already holds {frame.name}")
            self._admit([frame.name], length)
            need = self.block_bytes(frame.name, length)
            self.incoming += need
            try:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self.compute, self._adopt, frame.name, state)
            finally:
                self.incoming -= need
        except (CommandRefused, ValueError, KeyError) as exc:
            error = str(exc)
            if not isinstance(exc, CommandRefused):  # a bad blob, not a refusal: count it
                self.plane._count_bad(f"block state: {error}")
        kind = Kind.ERROR if error else Kind.ACK
        await self.plane.send(
            sender, Frame(kind, frame.epoch, 0, frame.name, error.encode()), SEND_TIMEOUT_S
        )

    def _adopt(self, name: str, state: BlockState | None) -> None:
        """Hold a received block: from the state's weights when it carries them (no disk
        read), else from this device's checkpoint; a group takes the state's cache."""
        if state is None:
            self.host.load(name)
            return
        self.host.restore(state)

    # -- data plane --------------------------------------------------------------------
    async def _on_frame(self, frame: Frame) -> None:
        if frame.kind == Kind.ACTIVATION:
            try:
                tensor = payload_to_tensor(frame.payload)
            except FrameError as exc:
                self.plane._count_bad(str(exc))
                return
            if tensor.dtype != self.host.dtype:
                problem = f"{frame.name[:40]} is {tensor.dtype}, want {self.host.dtype}"
            else:
                problem = activation_problem(frame.name, tuple(tensor.shape), self.spec)
            if problem is not None:
                self.plane._count_bad(f"activation: {problem}")
                return
            if frame.token in self.done_positions:
                self.errors["late_frame"] += 1
                return
            if not self.mailbox.put(frame.token, frame.name, tensor):
                self.errors["duplicate_frame"] += 1
                return
            if frame.token not in self.programs:
                self._start_program(frame.epoch, frame.token, None)
        elif frame.kind == Kind.FETCH:
            self._spawn(self._serve_fetch(frame))
        elif frame.token and frame.kind in (Kind.BLOCK_STATE, Kind.ERROR):
            self._answer_fetch(frame)  # a FETCH's answer: migrations' frames carry token 0
        elif frame.kind == Kind.BLOCK_STATE:
            self._spawn(self._receive_block(frame))
        elif frame.kind in (Kind.ACK, Kind.ERROR):
            fut = self.acks.get((frame.epoch, frame.name))
            if fut is not None and not fut.done():
                fut.set_result(
                    frame.payload.decode(errors="replace") if frame.kind == Kind.ERROR else ""
                )

    def _start_program(self, epoch: int, position: int, tokens) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(self._program(epoch, position, tokens))
        self.programs[position] = task

        def finished(t: asyncio.Task) -> None:
            self.programs.pop(position, None)
            self.done_positions.append(position)
            self.mailbox.discard(position)
            if not t.cancelled() and t.exception() is not None:
                self.errors["step"] += 1
                log.warning(
                    "%s: step at position %d failed: %r", self.name, position, t.exception()
                )

        task.add_done_callback(finished)
        return task

    async def _decode(self, cmd: proto.Decode) -> dict:
        if cmd.position in self.programs or cmd.position in self.done_positions:
            raise ValueError(f"position {cmd.position} was already run")
        start = time.monotonic()
        task = self._start_program(cmd.epoch, cmd.position, list(cmd.tokens))
        token = await task
        return {"token_id": token, "seconds": time.monotonic() - start}

    async def _program(self, epoch_number: int, position: int, tokens: list[int] | None):
        """Run this device's steps of one token; the head's device returns the next token.

        The event loop waits for inputs from peers; the compute thread then runs every step
        it can without one, so a device holding a run of consecutive blocks costs one
        thread hand-off, not one per block. Outputs leave for peers as soon as computed.
        """
        epoch = await self._epoch(epoch_number)
        steps = epoch.routes.program(self.name)
        if tokens is None and steps and steps[0].kind == "embed":
            raise ValueError("the embedding's device runs a step only when told to decode")
        loop = asyncio.get_running_loop()
        sends: list[asyncio.Task] = []
        have: dict[str, torch.Tensor] = {}  # inputs of later steps, received or made here

        def send(step: Step, payload: bytes, made: float) -> None:  # on the loop
            self.handoff.add(time.monotonic() - made)
            for peer in step.send_to:
                frame = Frame(Kind.ACTIVATION, epoch_number, position, step.output, payload)
                sends.append(self._spawn(self.plane.send(peer, frame, SEND_TIMEOUT_S)))

        run = _Run(
            steps,
            have,
            tokens,
            position,
            epoch,
            lambda st, p: loop.call_soon_threadsafe(send, st, p, time.monotonic()),
        )
        try:
            while run.next < len(steps):
                for name in steps[run.next].inputs:
                    if name not in have:
                        have[name] = await self.mailbox.get(position, name, STEP_TIMEOUT_S)
                await loop.run_in_executor(self.compute, self._run_steps, run)
            # the thread's last send callbacks run before this point: they were queued first
            await asyncio.sleep(0)
            if sends:
                await asyncio.gather(*sends)
        finally:
            for task in sends:
                task.cancel()
        return run.result

    def _run_steps(self, run: _Run) -> None:
        """In the compute thread: run steps while their inputs are at hand, paced."""
        while run.next < len(run.steps):
            step = run.steps[run.next]
            if any(name not in run.have for name in step.inputs):
                return
            inputs = [run.have[name] for name in step.inputs]
            self._note_wakeup(run.position, step.inputs)
            start = time.perf_counter()
            cpu0 = time.thread_time()
            with torch.no_grad():
                out = self._forward(step, inputs, run.tokens, run.position, run.epoch)
            self._pace(time.thread_time() - cpu0, time.perf_counter() - start)
            took = time.perf_counter() - start
            rows = inputs[0].shape[0] if inputs else len(run.tokens or ())
            if rows == 1 and step.kind != "embed":
                if step.blocks in self.warmed:
                    self.speed.add(self._timed_flops(step, run.position + 1), took)
                else:  # a step's first decode pays torch's one-off set-up: not its speed
                    self.warmed.add(step.blocks)
            if self.metrics is not None:
                self.metrics.step(step, took)
            run.next += 1
            if step.kind == "head":
                run.result = out
                continue
            if step.send_to:
                run.send(step, tensor_to_payload(out))
            if step.keep:
                run.have[step.output] = out

    def _note_wakeup(self, position: int, inputs: tuple[str, ...]) -> None:
        """Time from this step's last input arriving from a peer to the step starting."""
        arrived = [self.mailbox.arrived(position, name) for name in inputs]
        received = [t for t in arrived if t is not None]
        if received:
            self.wakeup.add(time.monotonic() - max(received))

    def _pace(self, cpu_s: float, elapsed_s: float) -> None:
        """Stretch a step that used cpu_s of CPU to cpu_s / share (time dilation).

        Sleeps shorter than PACE_MIN_SLEEP_S are owed and what a sleep overshoots is
        credited back, so the device's speed is right on average, not only per call.
        """
        share = self.effective_share()
        if share is None or share <= 0:
            return
        self.pace_debt_s += max(0.0, cpu_s / share - elapsed_s)
        if self.pace_debt_s < PACE_MIN_SLEEP_S:
            return
        start = time.perf_counter()
        time.sleep(self.pace_debt_s)
        self.pace_debt_s -= time.perf_counter() - start

    def _timed_flops(self, step: Step, context: int) -> float:
        if step.kind == "head":
            return float(self.timed.source_flops)
        flops = self.timed.flops(context)
        return float(sum(flops[self.table.index(b)] for b in step.blocks))

    def _forward(self, step: Step, inputs, tokens, position: int, epoch: _Epoch):
        host = self.host
        if step.kind == "embed":
            embed = host["embed"]
            assert isinstance(embed, EmbedBlock)
            return embed(torch.tensor(tokens, dtype=torch.long), position)
        if step.kind == "groups":
            outs = []
            for name in step.blocks:
                group = host[name]
                assert isinstance(group, KVGroupBlock)
                if group.length != position:
                    raise RuntimeError(
                        f"{name} caches {group.length} positions, the step starts at {position}"
                    )
                outs.append(group(inputs[0]))
            return torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        if step.kind == "proj":
            proj = host[step.blocks[0]]
            assert isinstance(proj, ProjBlock)
            *parts, residual = inputs
            heads = _in_group_order(epoch.routes, step.layer, parts)
            return proj(heads, residual)
        if step.kind == "ffn":
            ffn = host[step.blocks[0]]
            assert isinstance(ffn, FFNBlock)
            return ffn(inputs[0])
        head = host["head"]
        assert isinstance(head, HeadBlock)
        return int(torch.argmax(head(inputs[0])))

    # -- telemetry ---------------------------------------------------------------------
    def telemetry(self) -> proto.Telemetry:
        """What this device has and uses now."""
        measured = self.speed.gflops()
        nominal = self.nominal_available_gflops()
        if measured is not None and nominal > 0:
            self.efficiency = measured / nominal
        # idle, the device reports its nominal speed as it ran its last blocks, not the bare
        # nominal: a device that goes idle because its blocks moved away must not look
        # faster for it, or the planner moves them back and forth
        available = measured if measured is not None else nominal * self.efficiency
        return proto.Telemetry(
            name=self.name,
            ts=time.time(),
            cpu_used=self._cpu_used(),
            available_gflops=max(0.0, available),
            memory_used_bytes=float(self.used_bytes()),
            memory_budget_bytes=float(self.budget),
            kv_bytes=float(self.host.cache_bytes()),
            blocks=tuple(sorted(self.host.blocks)),
            peer_throughput_mbit=self.plane.measured_mbit(),
            compute_measured=measured is not None,
            dropped_messages=sum(self.dropped_messages.values()),
            dropped_frames=sum(self.plane.bad_frames.values()),
            peer_latency_s=self.plane.measured_latency_s(),
            send_overhead_s=max(0.0, self.handoff.value()),
            receive_overhead_s=max(0.0, self.wakeup.value()),
            occupied_bytes=float(self.ballast.held_bytes),
            unreachable_peers=tuple(sorted(self.plane.unreachable & set(self.plane.peers()))),
        )

    def _cpu_used(self) -> float:
        """Fraction of the device's share used since the last call (agent plus burners)."""
        now = time.monotonic()
        cpu = time.process_time() + (self.burners.cpu_seconds() if self.burners else 0.0)
        last_wall, last_cpu = self._cpu_mark
        self._cpu_mark = (now, cpu)
        wall = now - last_wall
        if wall <= 0:
            return 0.0
        return max(0.0, min(1.0, (cpu - last_cpu) / (wall * (self.share or 1.0))))

    async def _telemetry_loop(self) -> None:
        while True:
            # a ballast takes a process start and a memory fill: never in the way of telemetry
            if not self.ballast_lock.locked():
                self._spawn(self._settle_ballast())
            self._probe_peers()
            await self._publish("telemetry", self.telemetry())
            await asyncio.sleep(TELEMETRY_PERIOD_S)

    def _probe_peers(self) -> None:
        """Latency probes to the next few peers whose endpoints are known, in turn: a big
        testbed's probes must not eat a small device's CPU (answers come later)."""
        peers = sorted(self.plane.peers())
        if not peers:
            return
        count = min(PROBES_PER_PERIOD, len(peers))
        for k in range(count):
            self._spawn(self.plane.probe(peers[(self.probe_turn + k) % len(peers)]))
        self.probe_turn = (self.probe_turn + count) % len(peers)


@dataclass
class _Run:
    """One token's program on one device, as the compute thread advances through it."""

    steps: list[Step]
    have: dict[str, torch.Tensor]
    tokens: list[int] | None
    position: int
    epoch: _Epoch
    send: object  # (step, payload) -> None, hands an output to the event loop
    next: int = 0
    result: int | None = None


class BrokerLost(RuntimeError):
    """The MQTT connection broke while serving (the broker stopped or restarted)."""


class CommandRefused(RuntimeError):
    """A command the agent will not carry out (e.g. over its memory budget)."""


def _in_group_order(routes: Routes, layer: int, parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-device group outputs back into group order."""
    holders = routes.group_devices(layer)
    if len(holders) == 1:
        return parts[0]
    per_group: dict[int, torch.Tensor] = {}
    for groups, part in zip(holders.values(), parts, strict=True):
        for g, chunk in zip(groups, part.chunk(len(groups), dim=-1), strict=True):
            per_group[g] = chunk
    return torch.cat([per_group[g] for g in sorted(per_group)], dim=-1)


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
    except aiomqtt.MqttError as exc:
        log.error("%s: broker connection failed: %s", config.name, exc)
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
