"""The placement as the agents hold it: epochs published, blocks loaded and moved.

``Deployment`` carries out what the controller decides, over the controller's commands:
it publishes each placement as an epoch (retained: every agent follows it), has every
device load its blocks at the start, moves blocks between agents in the waves
``controller.switch.plan_moves`` orders (one acknowledged epoch per wave, so no token
runs on a half-moved placement), loads the blocks of dead devices again and resets the
caches for a re-prefill. It measures what it did; the controller keeps the account.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from control_plane import protocol as proto
from controller import cost, switch
from controller.config import ControllerConfig
from controller.placement import Placement
from controller.result import ControllerError
from controller.telemetry_view import TelemetryView
from controller.view import ResourceView

log = logging.getLogger("edgepart.controller")

LOAD_TIMEOUT_S = 300.0  # for initial loads, s
MIGRATE_TIMEOUT_S = 300.0  # for one plan's moves, s
RESET_TIMEOUT_S = 120.0  # for an agent to drop its caches, s

#: sends one command to a device's agent and returns its reply (the controller's)
Command = Callable[[str, object, float], Awaitable[proto.Reply]]
#: publishes a protocol message, retained or not
Publish = Callable[..., Awaitable[None]]


@dataclass(frozen=True)
class SwitchDone:
    """What one switch did: blocks moved (and their bytes), its measured and predicted
    time (s), the blocks it left unmoved and why."""

    moved: int
    moved_bytes: float
    took_s: float
    predicted_s: float
    done_s: float  # what the model charges for the moves that happened (s)
    unmoved: int
    reason: str


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
        """Publish epoch 0 and have every device load its blocks; the loads' measured time
        per block calibrates the cost of a move."""
        await self.publish_epoch(placement)
        by_device: dict[str, list[str]] = {}
        for block, device in self.mapping(placement).items():
            by_device.setdefault(device, []).append(block)
        per_block: dict[int, float] = {}

        async def load(device: str, blocks: list[str]) -> None:
            cmd = self.load_command(device, blocks)
            reply = await self.command(device, cmd, LOAD_TIMEOUT_S)
            if not reply.ok:
                raise ControllerError(f"{device} refused to load: {reply.error}")
            if reply.seconds:
                per_block[self.telemetry.index[device]] = reply.seconds / len(blocks)

        async with asyncio.TaskGroup() as tg:
            for device, blocks in by_device.items():
                tg.create_task(load(device, blocks))
        self.telemetry.loaded(per_block)

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
        async with asyncio.TaskGroup() as tg:
            for device, lost in by_device.items():
                cmd = self.load_command(device, lost)
                tg.create_task(self.expect_ok(device, cmd, LOAD_TIMEOUT_S))
        await self.publish_epoch(target)

    async def reset(self, devices: list[str]) -> None:
        """Have every one of ``devices`` drop its caches (for a re-prefill)."""
        async with asyncio.TaskGroup() as tg:
            for device in devices:
                cmd = proto.Reset(id=self.next_id(), op="reset")
                tg.create_task(self.expect_ok(device, cmd, RESET_TIMEOUT_S))

    async def expect_ok(self, device: str, command, timeout_s: float) -> proto.Reply:
        """A command's reply, which must be ok (ControllerError with the agent's reason)."""
        reply = await self.command(device, command, timeout_s)
        if not reply.ok:
            raise ControllerError(f"{device} refused {command.op}: {reply.error}")
        return reply

    # -- switches --------------------------------------------------------------------------
    async def switch(self, new: Placement, view: ResourceView, context: int) -> SwitchDone:
        """Move the blocks that change device, in the waves ``plan_moves`` orders, one acked
        epoch per wave.

        A move is acknowledged once its target holds the block, and its source frees it
        then (no token runs during a switch), so every block is held exactly once and each
        wave's epoch is a complete placement. A refused move stays where it is and the
        waves are planned again from the placement reached; the switch ends when a wave
        moves nothing, on the placement reached.
        """
        assert self.placement is not None
        await self.name_members()
        table = self.config.table
        current = self.placement.assignment.copy()
        before = current.copy()
        predicted = float(cost.migration_s(table, view, current, new.assignment, context))
        start = time.monotonic()
        moved, moved_bytes, refused = 0, 0.0, []
        reported = self.telemetry.reported_memory_bytes
        while waves := switch.plan_moves(current, new.assignment, view, table, context, reported()):
            for wave in waves:
                done, refused = await self._move(wave, current, new.assignment)
                if done:
                    blocks = [b for b, _ in done]
                    current[blocks] = new.assignment[blocks]
                    moved += len(done)
                    moved_bytes += sum(r.bytes_moved for _, r in done)
                    await self.publish_epoch(Placement(current.copy()))
                if refused or not done:
                    break  # plan the waves again from the placement reached
            if not done:
                break  # a wave moved nothing: the switch ends where it is
        took = time.monotonic() - start
        unmoved = int((current != new.assignment).sum())
        return SwitchDone(
            moved=moved,
            moved_bytes=moved_bytes,
            took_s=took,
            predicted_s=predicted,
            done_s=float(cost.migration_s(table, view, before, current, context)),
            unmoved=unmoved,
            reason=refused[0] if refused else "no move fits",
        )

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
                id=self.next_id(),
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
