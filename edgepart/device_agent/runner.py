"""Runs this device's part of each token: the program its placement epoch gives it.

For every token (a position) the agent follows ``Routes.program``
(``edgepart.device_agent.program``): wait for the named inputs (activations from peers land in the
``Mailbox``), run its blocks in the single compute thread, send each output to its consumers. The
compute thread runs every step it can without waiting, so a device holding a run of consecutive
blocks costs one thread hand-off, not one per block. Compute is paced to the device's speed
(``edgepart.device_agent.pacing``); decode steps feed the measured speed (``SpeedMeter``), and the
hand-off and wake-up delays around them are measured for telemetry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from edgepart.control_plane import protocol as proto
from edgepart.device_agent.blocks import DeviceBlocks
from edgepart.device_agent.dataplane import SEND_TIMEOUT_S, DataPlane, RecentMean
from edgepart.device_agent.epochs import Epoch, Epochs
from edgepart.device_agent.pacing import Pacer
from edgepart.device_agent.program import Routes, Step, activation_problem
from edgepart.device_agent.wire import Frame, FrameError, Kind, payload_to_tensor, tensor_to_payload
from edgepart.llm.blocks import BlockTable
from edgepart.llm.runtime import BlockHost
from edgepart.llm.torch_blocks import EmbedBlock, FFNBlock, HeadBlock, KVGroupBlock, ProjBlock

if TYPE_CHECKING:  # prometheus_client is imported only where metrics are served
    from edgepart.device_agent.metrics import AgentMetrics

log = logging.getLogger("edgepart.agent")

STEP_TIMEOUT_S = 60.0  # longest wait (s) for one input of a token
#: decode steps whose compute speed is averaged into the measured GFLOP/s
SPEED_WINDOW = 64
#: a measured speed older than this (s) is stale: the device has been idle since
SPEED_FRESH_S = 5.0
DONE_POSITIONS_KEPT = 256  # finished positions remembered, so late frames are recognised

Spawn = Callable[[Coroutine[Any, Any, Any]], asyncio.Task]


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


class SpeedMeter:
    """Measured compute speed over recent decode steps (reference-equivalent GFLOP/s), and
    the efficiency it showed against the device's nominal speed."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget what was measured (the device under a new load is another device)."""
        #: (reference FLOPs, seconds) per decode step; one deque, so a reset racing the
        #: compute thread's add never pairs one step's FLOPs with another's time
        self._samples: deque[tuple[float, float]] = deque(maxlen=SPEED_WINDOW)
        self.last = 0.0  # monotonic time of the last sample
        #: measured speed / nominal available speed on the blocks run last (1 until measured)
        self.efficiency = 1.0

    def add(self, flops: float, seconds: float) -> None:
        """One decode step of that many reference FLOPs took that many seconds."""
        self._samples.append((flops, seconds))
        self.last = time.monotonic()

    def gflops(self, fresh_s: float = SPEED_FRESH_S) -> float | None:
        """The measured speed (GFLOP/s); None before any sample or after fresh_s idle."""
        samples = list(self._samples)
        if not samples or time.monotonic() - self.last > fresh_s:
            return None
        total = sum(seconds for _, seconds in samples)
        return sum(flops for flops, _ in samples) / total / 1e9 if total > 0 else None

    def available_gflops(self, nominal: float) -> tuple[float, bool]:
        """The speed to report (GFLOP/s) given the nominal available one, and whether it was
        measured.

        Idle, the device reports its nominal speed as it ran its last blocks, not the bare
        nominal: a device that goes idle because its blocks moved away must not look faster
        for it, or the planner moves them back and forth.
        """
        measured = self.gflops()
        if measured is not None and nominal > 0:
            self.efficiency = measured / nominal
        available = measured if measured is not None else nominal * self.efficiency
        return max(0.0, available), measured is not None


@dataclass
class _Run:
    """One token's program on one device, as the compute thread advances through it."""

    steps: list[Step]
    have: dict[str, torch.Tensor]
    tokens: list[int] | None
    position: int
    epoch: Epoch
    send: Callable[[Step, bytes], None]  # hands an output to the event loop
    next: int = 0
    result: int | None = None


class TokenRunner:
    """This device's programs of the tokens in flight, by position."""

    def __init__(
        self,
        blocks: DeviceBlocks,
        timed: BlockTable,
        plane: DataPlane,
        epochs: Epochs,
        pacer: Pacer,
        compute: Executor,
        spawn: Spawn,
        errors: Counter[str],
    ) -> None:
        self.name = blocks.name
        self.blocks = blocks
        self.timed = timed  # the block table with the host's calibrated speeds
        self.plane = plane
        self.epochs = epochs
        self.pacer = pacer
        self.compute = compute  # the agent's one compute thread
        self.spawn = spawn  # starts a task the agent cancels at shutdown
        self.errors = errors  # the agent's failure counts by kind
        self.mailbox = Mailbox()
        self.programs: dict[int, asyncio.Task] = {}  # position -> running program
        self.done_positions: deque[int] = deque(maxlen=DONE_POSITIONS_KEPT)
        self.speed = SpeedMeter()
        self.warmed: set[tuple[str, ...]] = set()  # steps (their blocks) decoded at least once
        self.handoff = RecentMean()  # compute thread -> event loop, per sent activation (s)
        self.wakeup = RecentMean()  # last input in -> its step started, per waiting step (s)
        self.metrics: AgentMetrics | None = None  # step timings, when metrics are served

    # -- commands and frames -----------------------------------------------------------
    async def decode(self, cmd: proto.Decode) -> dict:
        """Run the embedding's device's program of one token; the next token when done."""
        if cmd.position in self.programs or cmd.position in self.done_positions:
            raise ValueError(f"position {cmd.position} was already run")
        start = time.monotonic()
        task = self._start(cmd.epoch, cmd.position, list(cmd.tokens))
        token = await task
        return {"token_id": token, "seconds": time.monotonic() - start}

    async def reset(self, cmd: proto.Reset) -> None:
        """Stop every program and empty the KV caches (a new generation starts)."""
        self.cancel()
        self.done_positions.clear()
        # in the compute thread, after any step of a cancelled program still running there
        await self.blocks.reset_caches()

    def cancel(self) -> None:
        """Cancel every running program."""
        for task in list(self.programs.values()):
            task.cancel()

    def on_activation(self, frame: Frame) -> None:
        """A peer's activation: checked, delivered, and its token's program started here if
        this is the first input of it."""
        try:
            tensor = payload_to_tensor(frame.payload)
        except FrameError as exc:
            self.plane.count_bad(str(exc))
            return
        dtype = self.blocks.host.dtype
        if tensor.dtype != dtype:
            problem = f"{frame.name[:40]} is {tensor.dtype}, want {dtype}"
        else:
            problem = activation_problem(frame.name, tuple(tensor.shape), self.blocks.spec)
        if problem is not None:
            self.plane.count_bad(f"activation: {problem}")
            return
        if frame.token in self.done_positions:
            self.errors["late_frame"] += 1
            return
        if not self.mailbox.put(frame.token, frame.name, tensor):
            self.errors["duplicate_frame"] += 1
            return
        if frame.token not in self.programs:
            self._start(frame.epoch, frame.token, None)

    # -- programs ----------------------------------------------------------------------
    def _start(self, epoch: int, position: int, tokens: list[int] | None) -> asyncio.Task:
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

    async def _program(self, epoch_number: int, position: int, tokens: list[int] | None):
        """Run this device's steps of one token; the head's device returns the next token.

        The event loop waits for inputs from peers; the compute thread then runs every step
        it can without one, so a device holding a run of consecutive blocks costs one
        thread hand-off, not one per block. Outputs leave for peers as soon as computed.
        """
        epoch = await self.epochs.wait_for(epoch_number)
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
                sends.append(self.spawn(self.plane.send(peer, frame, SEND_TIMEOUT_S)))

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
                        timeout_s = self.plane.wall_s(STEP_TIMEOUT_S)
                        have[name] = await self.mailbox.get(position, name, timeout_s)
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
                out = forward(self.blocks.host, step, inputs, run.tokens, run.position, run.epoch)
            self.pacer.pace(time.thread_time() - cpu0, time.perf_counter() - start)
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

    def _timed_flops(self, step: Step, context: int) -> float:
        """Reference FLOPs of a decode step at that context length (calibrated table)."""
        if step.kind == "head":
            return float(self.timed.source_flops)
        flops = self.timed.flops(context)
        table = self.blocks.table
        return float(sum(flops[table.index(b)] for b in step.blocks))


def forward(host: BlockHost, step: Step, inputs, tokens, position: int, epoch: Epoch):
    """Run one step's blocks on its inputs (the head's step gives the next token id)."""
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
        heads = in_group_order(epoch.routes, step.layer, parts)
        return proj(heads, residual)
    if step.kind == "ffn":
        ffn = host[step.blocks[0]]
        assert isinstance(ffn, FFNBlock)
        return ffn(inputs[0])
    head = host["head"]
    assert isinstance(head, HeadBlock)
    return int(torch.argmax(head(inputs[0])))


def in_group_order(routes: Routes, layer: int, parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-device group outputs back into group order."""
    holders = routes.group_devices(layer)
    if len(holders) == 1:
        return parts[0]
    per_group: dict[int, torch.Tensor] = {}
    for groups, part in zip(holders.values(), parts, strict=True):
        for g, chunk in zip(groups, part.chunk(len(groups), dim=-1), strict=True):
            per_group[g] = chunk
    return torch.cat([per_group[g] for g in sorted(per_group)], dim=-1)
