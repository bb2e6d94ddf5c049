"""The world of a live run: the scenario's traces applied to real agents as tokens come.

Backend-neutral: a backend supplies how a command reaches an agent (the controller's MQTT
connection in the local backend, the emulator driver's own in the docker testbed) and how
a device dies (``kill -9`` of its process session, ``docker kill`` of its container).
Under time dilation k (the host runs the world k times slower than its scenario) every
link is shaped at its rate / k and its latency x k, and a trace due at a scenario time
fires at k times that wall time.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable

import numpy as np

from edgepart.control_plane import protocol as proto
from edgepart.controller.view import PlanningWindow, ResourceView
from edgepart.emulator.scenario import (
    MIB,
    FailTrace,
    JoinTrace,
    LinkTrace,
    LoadTrace,
    MemoryTrace,
    Scenario,
    Trace,
)
from edgepart.emulator.world import apply_due_traces, initial_state

#: sends one command to a device's agent and returns its reply
SendCommand = Callable[[str, object], Awaitable[proto.Reply]]
#: makes a device fail for good (its agent and everything it started)
KillDevice = Callable[[str], Awaitable[None]]
#: starts a device's agent afresh (it holds nothing) and returns once it is online
StartDevice = Callable[[str], Awaitable[None]]
#: returns once the controller sees a device whose cut link was restored again
AwaitDevice = Callable[[str], Awaitable[None]]

#: a background load is a fraction of the device's share; all of it would leave no agent
MAX_BACKGROUND_LOAD = 0.99


class WorldError(RuntimeError):
    """A trace could not be applied (an agent refused or did not answer)."""


class World:
    """The emulated world during a run: the scenario's state plus the devices it acts on."""

    def __init__(
        self,
        scenario: Scenario,
        command: SendCommand,
        kill: KillDevice,
        start: StartDevice | None = None,
        reconnected: AwaitDevice | None = None,
        time_dilation: float = 1.0,
    ) -> None:
        """The world of a scenario; ``start`` (needed for join traces) starts an agent,
        ``reconnected`` (optional) waits until a device cut off is seen back;
        ``time_dilation`` (k >= 1) slows the links k times (see the module)."""
        if not time_dilation >= 1.0:
            raise ValueError(f"time dilation must be at least 1, got {time_dilation}")
        self.scenario = scenario
        self.time_dilation = float(time_dilation)
        self._command_fn = command
        self._kill = kill
        self._start = start
        self._reconnected = reconnected
        self.state, self.pending = initial_state(scenario)
        self.applied: list[Trace] = [t for t in scenario.traces if t not in self.pending]
        self.failed: list[str] = []  # devices killed so far, in order
        self.joined: list[str] = []  # devices started by join traces, in order
        self.offline: set[str] = set(scenario.offline_at_start)
        self.started = time.monotonic()
        self._ids = (f"w{i}" for i in itertools.count())

    def view(self, window: PlanningWindow) -> ResourceView:
        """The configured resources now (for ``--telemetry configured``)."""
        return self.state.view(self.scenario, window)

    async def setup(self) -> None:
        """Shape every link as configured and apply the traces due at token 0."""
        await self._shape_all()
        for trace in self.applied:
            await self._enact(trace)

    async def before_token(self, token: int) -> list[str]:
        """Apply the traces due before generated token ``token``; the devices it killed."""
        if token == 0:
            return []
        before = list(self.pending)
        was_reachable = self.state.reachable.copy()
        scenario_s = (time.monotonic() - self.started) / self.time_dilation
        apply_due_traces(self.state, self.pending, token, scenario_s)
        killed, started = [], []
        for trace in before:
            if trace not in self.pending:
                await self._enact(trace)
                if isinstance(trace, FailTrace):
                    killed.append(trace.device)
                elif isinstance(trace, JoinTrace):
                    started.append(trace.device)  # its start waited until it was online
        if self._reconnected is not None:
            for i in np.flatnonzero(self.state.reachable & ~was_reachable):
                if self.state.names[i] not in started:
                    await self._reconnected(self.state.names[i])
        return killed

    async def _command(self, device: str, command) -> None:
        if device in self.offline:
            return  # a trace of a device that is not there: its join restores the state
        reply = await self._command_fn(device, command)
        if not reply.ok:
            raise WorldError(f"{device} refused {command.op}: {reply.error}")

    async def _shape(self, a: str, b: str) -> None:
        """Shape the link a -> b as the world has it now, dilated."""
        i, j = self.state.index(a), self.state.index(b)
        k = self.time_dilation
        rate = 0.0 if self.state.cut[i, j] else float(self.state.bandwidth_mbit[i, j]) / k
        latency_ms = float(self.state.latency_s[i, j]) * 1000.0 * k
        cmd = proto.Shape(
            id=next(self._ids), op="shape", peer=b, bandwidth_mbit=rate, latency_ms=latency_ms
        )
        await self._command(a, cmd)

    async def _restore(self, device: str) -> None:
        """Give a freshly started agent the world's state of its device and links."""
        i = self.state.index(device)
        async with asyncio.TaskGroup() as tg:
            for other in self.state.names:
                if other != device:
                    tg.create_task(self._shape(device, other))
                    tg.create_task(self._shape(other, device))
        load = float(self.state.background_load[i])
        if load > 0:
            fraction = min(load, MAX_BACKGROUND_LOAD)
            cmd = proto.InjectLoad(id=next(self._ids), op="inject_load", fraction=fraction)
            await self._command(device, cmd)
        configured = self.scenario.device(device).memory_mib * MIB
        if self.state.memory_bytes[i] != configured:
            await self._set_budget(device, float(self.state.memory_bytes[i]))

    async def _set_budget(self, device: str, memory_bytes: float) -> None:
        # what the device had at the start and no longer offers, another app now holds
        configured = self.scenario.device(device).memory_mib * MIB
        occupied = max(0, int(configured) - int(memory_bytes))
        cmd = proto.SetBudget(
            id=next(self._ids),
            op="set_budget",
            memory_bytes=int(memory_bytes),
            occupied_bytes=occupied,
        )
        await self._command(device, cmd)

    async def _shape_all(self) -> None:
        names = self.state.names
        async with asyncio.TaskGroup() as tg:
            for a in names:
                for b in names:
                    if a != b:
                        tg.create_task(self._shape(a, b))

    async def _enact(self, trace: Trace) -> None:
        if isinstance(trace, LoadTrace):
            fraction = min(trace.background_load, MAX_BACKGROUND_LOAD)
            cmd = proto.InjectLoad(id=next(self._ids), op="inject_load", fraction=fraction)
            await self._command(trace.device, cmd)
        elif isinstance(trace, MemoryTrace):
            await self._set_budget(trace.device, trace.memory_mib * MIB)
        elif isinstance(trace, LinkTrace):
            a, b = trace.link
            await self._shape(a, b)
            await self._shape(b, a)
        elif isinstance(trace, FailTrace):
            await self._kill(trace.device)
            self.failed.append(trace.device)
            self.offline.add(trace.device)
        elif isinstance(trace, JoinTrace):
            if self._start is None:
                raise WorldError(f"this backend cannot start {trace.device} (a join trace)")
            await self._start(trace.device)
            self.offline.discard(trace.device)
            self.joined.append(trace.device)
            await self._restore(trace.device)
