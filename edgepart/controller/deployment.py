"""The placement as the agents hold it: epochs published, blocks loaded and moved.

``Deployment`` carries out what the controller decides, over the controller's commands:
it publishes each placement as an epoch (retained: every agent follows it), has every
device load its blocks at the start, carries a switch out in the waves
``edgepart.controller.switch.plan_switch`` orders, each in two phases: ``prepare`` has the targets
build their incoming blocks in the background (tokens go on meanwhile), ``commit`` (at a
token boundary) has the sources hand the targets the moved caches and publishes the epoch
that names the new holders; ``abandon`` drops a prepared wave that will not commit. It
also loads the blocks of dead devices again and resets the caches for a re-prefill. It
measures what it did; the controller keeps the account.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from edgepart.control_plane import protocol as proto
from edgepart.controller.config import ControllerConfig
from edgepart.controller.placement import Placement
from edgepart.controller.result import ControllerError
from edgepart.controller.switch import SwitchPlan, Wave
from edgepart.controller.telemetry_view import TelemetryView

log = logging.getLogger("edgepart.controller")

LOAD_TIMEOUT_S = 300.0  # for initial loads, s
PREPARE_TIMEOUT_S = 300.0  # for a target to build a wave's blocks, s
COMMIT_TIMEOUT_S = 120.0  # for a source to hand a wave's state over, s
DISCARD_TIMEOUT_S = 30.0  # for a target to free prepared blocks, s
RESET_TIMEOUT_S = 120.0  # for an agent to drop its caches, s
#: positions the caches of prepared blocks may grow by before the commit (memory is
#: admitted for them at prepare): the tokens decoded while the targets build
PREPARE_CONTEXT_MARGIN = 8

#: sends one command to a device's agent and returns its reply (the controller's)
Command = Callable[[str, object, float], Awaitable[proto.Reply]]
#: publishes a protocol message, retained or not
Publish = Callable[..., Awaitable[None]]


@dataclass
class PreparedWave:
    """A wave whose targets are building its blocks: the prepare commands in flight, by
    target device, and when they were sent (monotonic s)."""

    wave: Wave
    targets: np.ndarray  # the switch's target placement (device index per block)
    context: int  # cached positions when the wave was planned
    started: float
    replies: dict[str, asyncio.Task] = field(default_factory=dict)  # target -> its reply
    answered: float = 0.0  # when the last target answered (monotonic s)

    @property
    def ready(self) -> bool:
        """Whether every target answered (built its blocks, refused some, or failed)."""
        return all(task.done() for task in self.replies.values())

    @property
    def prepare_s(self) -> float:
        """From the prepares sent to the last answer (s)."""
        return max(0.0, self.answered - self.started)


@dataclass(frozen=True)
class WaveDone:
    """What one committed wave did: the blocks it moved (and their state's bytes), its
    measured prepare and commit time (s), and why blocks stayed where they were."""

    moved: tuple[int, ...]
    moved_bytes: float
    prepare_s: float
    commit_s: float
    refusals: tuple[str, ...]
    refused_devices: frozenset[str]


class Deployment:
    """Epochs, loads and moves of blocks on the agents (see the module)."""

    def __init__(
        self,
        config: ControllerConfig,
        telemetry: TelemetryView,
        command: Command,
        publish: Publish,
        next_id: Callable[[], str],
    ) -> None:
        """``command`` sends a command to an agent and waits for its reply, ``publish``
        publishes on the broker, ``next_id`` gives a fresh command id."""
        self.config = config
        self.clock = config.clock
        self.telemetry = telemetry
        self.command = command
        self.publish = publish
        self.next_id = next_id
        self.epoch = -1
        self.placement: Placement | None = None
        self.epoch_message: proto.PlacementEpoch | None = None  # the retained one, current

    # -- epochs --------------------------------------------------------------------------
    def mapping(self, placement: Placement) -> dict[str, str]:
        """Block name -> device name, pinned source blocks included."""
        cfg = self.config
        return placement.to_dict(cfg.table, cfg.devices, cfg.source_index)

    async def publish_epoch(self, placement: Placement) -> None:
        """Publish the placement as the next epoch (retained), with the members' endpoints;
        a publish lost with the broker is published again after the reconnect."""
        self.epoch += 1
        msg = proto.PlacementEpoch(
            epoch=self.epoch,
            placement=self.mapping(placement),
            endpoints=self.telemetry.endpoints(),
        )
        self.epoch_message = msg
        topic = proto.placement_topic(self.config.testbed)
        await self.publish(topic, msg, retain=True, retry=False)
        self.placement = placement

    async def name_members(self) -> None:
        """Publish the placement again as a new epoch if devices came or went since the last:
        agents take data-plane work only from the devices an epoch names."""
        if (
            self.epoch_message is not None
            and self.telemetry.endpoints() != self.epoch_message.endpoints
        ):
            assert self.placement is not None
            await self.publish_epoch(self.placement)

    # -- loads -----------------------------------------------------------------------------
    async def start(self, placement: Placement) -> None:
        """Publish epoch 0 and have every device load its blocks; the loads' measured build
        time per block kind is each device's first measure of a prepare."""
        await self.publish_epoch(placement)
        by_device: dict[str, list[str]] = {}
        for block, device in self.mapping(placement).items():
            by_device.setdefault(device, []).append(block)

        async def load(device: str, blocks: list[str]) -> None:
            cmd = self.load_command(device, blocks)
            reply = await self.command(device, cmd, self.clock.wall_s(LOAD_TIMEOUT_S))
            if not reply.ok:
                raise ControllerError(f"{device} refused to load: {reply.error}")
            if reply.install_s:
                self.telemetry.installed(device, reply.install_s, self._available(device))

        await _all(load(device, blocks) for device, blocks in by_device.items())

    def load_command(self, device: str, blocks: list[str]) -> proto.Load:
        """Load blocks: from the device's own checkpoint, or, when weights come from peers,
        over the data plane from the source device (the one that has the checkpoint)."""
        cfg = self.config
        if cfg.weights_from == "peer" and device != cfg.source:
            return proto.Load(
                id=self.next_id(),
                op="load",
                blocks=tuple(blocks),
                weights_from="peer",
                peer=cfg.source,
            )
        return proto.Load(id=self.next_id(), op="load", blocks=tuple(blocks))

    async def reload(self, blocks: np.ndarray, target: Placement) -> None:
        """Load ``blocks`` (a mask: those of dead devices) on their devices in ``target``,
        then publish ``target`` as the next epoch."""
        cfg = self.config
        names = cfg.table.names
        by_device: dict[str, list[str]] = {}
        for b in np.flatnonzero(blocks):
            by_device.setdefault(cfg.devices[target.assignment[b]], []).append(names[b])
        await _all(
            self.expect_ok(
                device, self.load_command(device, lost), self.clock.wall_s(LOAD_TIMEOUT_S)
            )
            for device, lost in by_device.items()
        )
        await self.publish_epoch(target)

    async def reset(self, devices: list[str]) -> None:
        """Have every one of ``devices`` drop its caches (for a re-prefill)."""
        await _all(
            self.expect_ok(
                device,
                proto.Reset(id=self.next_id(), op="reset"),
                self.clock.wall_s(RESET_TIMEOUT_S),
            )
            for device in devices
        )

    async def expect_ok(self, device: str, command, timeout_s: float) -> proto.Reply:
        """A command's reply, which must be ok (ControllerError with the agent's reason)."""
        reply = await self.command(device, command, timeout_s)
        if not reply.ok:
            raise ControllerError(f"{device} refused {command.op}: {reply.error}")
        return reply

    # -- switches --------------------------------------------------------------------------
    def prepare(self, plan: SwitchPlan, wave: Wave, context: int) -> PreparedWave:
        """Send the wave's prepare commands (one per target), without waiting: the targets
        build their blocks in the background while tokens go on."""
        cfg = self.config
        assert self.placement is not None
        current = self.placement.assignment
        names = cfg.table.names
        by_target = _by_target(wave, plan.target, cfg.devices)
        prepared = PreparedWave(wave, plan.target, context, self.clock.now())

        async def ask(device: str, cmd: proto.Prepare) -> proto.Reply:
            try:
                return await self.command(device, cmd, self.clock.wall_s(PREPARE_TIMEOUT_S))
            finally:
                prepared.answered = self.clock.now()

        for device, blocks in by_target.items():
            peers = {}
            if cfg.weights_from == "peer":
                peers = {names[b]: cfg.devices[current[b]] for b in blocks}
            cmd = proto.Prepare(
                id=self.next_id(),
                op="prepare",
                blocks=tuple(names[b] for b in blocks),
                context=context + PREPARE_CONTEXT_MARGIN,
                peers=peers,
            )
            prepared.replies[device] = asyncio.create_task(ask(device, cmd))
        return prepared

    async def commit(self, prepared: PreparedWave) -> WaveDone:
        """Hand the prepared blocks over: each source sends its targets their state (one
        commit per source, in parallel), then the epoch that names the new holders goes
        out. Blocks a target refused to prepare, or to take, stay where they are (their
        prepared copies are discarded)."""
        cfg = self.config
        names = cfg.table.names
        assert self.placement is not None
        current = self.placement.assignment.copy()
        ok, refusals, refused_devices = await self._prepared(prepared)
        start = self.clock.now()
        # weights that came from peers during the prepare are moved data too
        fetched = sum(
            t.result().bytes_moved
            for t in prepared.replies.values()
            if t.done() and not t.cancelled() and t.exception() is None
        )
        by_source: dict[str, dict[str, str]] = {}
        for b in ok:
            source = cfg.devices[current[b]]
            by_source.setdefault(source, {})[names[b]] = cfg.devices[prepared.targets[b]]
        committed: list[int] = []
        moved_bytes = float(fetched)

        async def hand_over(source: str, moves: dict[str, str]) -> None:
            nonlocal moved_bytes
            cmd = proto.Commit(id=self.next_id(), op="commit", epoch=self.epoch + 1, moves=moves)
            try:
                reply = await self.command(source, cmd, self.clock.wall_s(COMMIT_TIMEOUT_S))
            except ControllerError as exc:  # gone meanwhile: its blocks stay (and are lost)
                refusals.append(str(exc))
                return
            refused = set(reply.refused or moves) if not reply.ok else set()
            if not reply.ok:
                refusals.append(f"{source}: {reply.error}")
                refused_devices.update(moves[b] for b in refused if b in moves)
            committed.extend(cfg.table.index(b) for b in moves if b not in refused)
            moved_bytes += reply.bytes_moved

        await _all(hand_over(source, moves) for source, moves in by_source.items())
        current[committed] = prepared.targets[committed]
        if committed:
            await self.publish_epoch(Placement(current))
        commit_s = self.clock.now() - start
        leftover = [b for b in prepared.wave.blocks if b not in set(committed)]
        await self._discard(leftover, prepared.targets)
        return WaveDone(
            tuple(sorted(committed)), moved_bytes, prepared.prepare_s, commit_s,
            tuple(refusals), frozenset(refused_devices),
        )  # fmt: skip

    async def abandon(self, prepared: PreparedWave) -> None:
        """Drop a prepared wave that will not commit: its commands are no longer waited for
        and its targets free what they built (those still there)."""
        for task in prepared.replies.values():
            task.cancel()
        await asyncio.gather(*prepared.replies.values(), return_exceptions=True)
        await self._discard(list(prepared.wave.blocks), prepared.targets)

    async def _prepared(self, prepared: PreparedWave) -> tuple[list[int], list[str], set[str]]:
        """The wave's blocks their targets built, the refusals, and the refusing devices."""
        names = self.config.table.names
        ok: list[int] = []
        refusals: list[str] = []
        refused_devices: set[str] = set()
        by_target = _by_target(prepared.wave, prepared.targets, self.config.devices)
        for device, task in prepared.replies.items():
            try:
                wait_s = self.clock.wall_s(PREPARE_TIMEOUT_S)
                reply = await asyncio.wait_for(asyncio.shield(task), wait_s)
            except (ControllerError, TimeoutError) as exc:
                refusals.append(f"{device}: {exc}")
                refused_devices.add(device)
                continue
            if not reply.ok:
                refusals.append(f"{device}: {reply.error}")
                refused_devices.add(device)
                continue
            if reply.install_s:
                self.telemetry.installed(device, reply.install_s, self._available(device))
            if reply.refused:
                refusals.append(f"{device}: no room for {', '.join(reply.refused[:4])}")
                refused_devices.add(device)
            ok.extend(b for b in by_target[device] if names[b] not in set(reply.refused))
        return ok, refusals, refused_devices

    async def _discard(self, blocks: list[int], targets: np.ndarray) -> None:
        """Have the targets of ``blocks`` (those alive) free their prepared copies."""
        cfg = self.config
        names = cfg.table.names
        by_target: dict[str, list[str]] = {}
        for b in blocks:
            by_target.setdefault(cfg.devices[targets[b]], []).append(names[b])
        alive = self.telemetry.alive()

        async def discard(device: str, dropped: list[str]) -> None:
            cmd = proto.Discard(id=self.next_id(), op="discard", blocks=tuple(dropped))
            try:
                await self.command(device, cmd, self.clock.wall_s(DISCARD_TIMEOUT_S))
            except ControllerError as exc:  # gone meanwhile: nothing of it is left to free
                log.info("discard on %s: %s", device, exc)

        await _all(
            discard(device, dropped)
            for device, dropped in by_target.items()
            if alive[self.telemetry.index[device]]
        )

    def _available(self, device: str) -> float:
        """The device's available speed as it reported it last (GFLOP/s; 0 if unknown)."""
        t = self.telemetry.devices[device].telemetry
        return float(t.available_gflops) if t is not None else 0.0


async def _all(calls: Iterable[Awaitable[object]]) -> None:
    """Await calls concurrently; the first ControllerError among them is raised as itself
    (a TaskGroup would wrap it in an exception group the callers do not expect)."""
    try:
        async with asyncio.TaskGroup() as tg:
            for call in calls:
                tg.create_task(call)  # type: ignore[arg-type]
    except BaseExceptionGroup as group:
        errors = group.subgroup(ControllerError)
        if errors is None:
            raise
        first: BaseException = errors
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


def _by_target(wave: Wave, targets: np.ndarray, devices: tuple[str, ...]) -> dict[str, list[int]]:
    by_target: dict[str, list[int]] = {}
    for b in wave.blocks:
        by_target.setdefault(devices[targets[b]], []).append(b)
    return by_target
