"""A switch in two phases, the agent's side: prepare, commit, discard (``proto.Prepare``...).

Prepare (on a target): memory is admitted first, the blocks in the order given while they
fit (weights and their caches at the prepare's context), the rest refused; the admitted
ones are then built in a background thread, beside the compute thread: at the lowest
priority (nice 19, per thread on Linux) and paced to the device's share by a Pacer of its
own, so that pacing holds for background work too. Weights come from the weight
cache or checkpoint (``BlockHost.build``) or, for blocks with a named peer, are FETCHed
from it. Built blocks wait in ``DeviceBlocks.prepared``, counted in the memory used.

Commit (on a block's current holder, at a token boundary): the moves grouped by target,
each moved group's KV cache dumped in the compute thread (no weights), ONE BLOCK_BATCH
frame per target (``wire.encode_batch``), then the target's ACK or ERROR, every wait
bounded. The holder keeps its copies: the next epoch frees them (``drop_unplaced``).

The batch (on the target): all or nothing. Each block's prepared copy takes its cache (a
block not prepared, e.g. freed by a budget cut, is built on the spot, within the budget)
and becomes live; ACK, or ERROR with the reason and nothing adopted.

Discard, a budget cut below what the device holds and a reset free prepared blocks; a
block freed while it is being built is dropped once built.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor

from edgepart.control_plane import protocol as proto
from edgepart.device_agent.blocks import CommandRefused, DeviceBlocks, Prepared, mean_by_kind
from edgepart.device_agent.dataplane import SEND_TIMEOUT_S, DataPlane
from edgepart.device_agent.epochs import Epochs
from edgepart.device_agent.pacing import Pacer
from edgepart.device_agent.wire import Frame, FrameError, Kind, decode_batch, encode_batch
from edgepart.llm.state import BlockState, block_state, dump_state, load_state
from edgepart.llm.torch_blocks import MOVABLE_KINDS, AnyBlock, KVGroupBlock, parse_block_name

log = logging.getLogger("edgepart.agent")

#: the background thread's niceness: the compute thread (and the host) come first
BACKGROUND_NICE = 19
#: longest wait (s) for a target's ACK or ERROR of a batch once sent: it may build blocks
#: that were not prepared, at its device's speed
BATCH_ANSWER_TIMEOUT_S = SEND_TIMEOUT_S
#: longest wait (s) at a commit for the token still finishing here (its last sends)
TOKEN_END_TIMEOUT_S = 5.0


def _lower_priority() -> None:
    """In the background thread: run at the lowest priority (Linux: per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except OSError as exc:  # not fatal: the pacing still holds
        log.warning("the prepare thread keeps its priority: %s", exc)


class Staging:
    """Prepared blocks: built in the background, committed in batches, discarded."""

    def __init__(
        self,
        blocks: DeviceBlocks,
        plane: DataPlane,
        epochs: Epochs,
        compute: Executor,
        share: float | None,
        errors: Counter[str],
        running: Callable[[], bool] = lambda: False,
    ) -> None:
        """``share``: the device's cores (the background pacer's; None: host speed);
        ``running()``: whether a token's program runs here now."""
        self.name = blocks.name
        self.blocks = blocks
        self.host = blocks.host
        self.prepared = blocks.prepared
        self.plane = plane
        self.epochs = epochs
        self.compute = compute  # the agent's one compute thread (KV dumps, on-the-spot builds)
        self.errors = errors
        self.running = running
        self.pacer = Pacer(share)  # the background thread's own debt, the device's share
        self.background = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"{self.name}-prepare", initializer=_lower_priority
        )
        #: (epoch, target) -> the target's answer to a batch: "" (ACK) or the reason
        self.answers: dict[tuple[int, str], asyncio.Future[str]] = {}

    def set_background(self, fraction: float) -> None:
        """Other work takes this fraction of the device (a CPU trace): background work too
        gets only the rest."""
        self.pacer.set_background(fraction)

    def shutdown(self) -> None:
        """Stop the background thread (builds in progress are abandoned)."""
        self.background.shutdown(wait=False, cancel_futures=True)

    # -- prepare -----------------------------------------------------------------------
    async def prepare(self, cmd: proto.Prepare) -> dict:
        """Admit, then build in the background; the reply's ``install_s`` (mean s per built
        block of each kind) and ``refused`` (did not fit, or freed before built)."""
        for block in cmd.blocks:
            if parse_block_name(block).kind not in MOVABLE_KINDS:
                raise ValueError(f"{block} is pinned to the source: it is never prepared")
        start = time.monotonic()
        admitted, refused = self._admit(cmd.blocks, cmd.context)
        install_s: dict[str, list[float]] = defaultdict(list)
        fetched = 0  # bytes of weights that came from peers
        try:
            for record in admitted:
                took, nbytes = await self._build(record, cmd.peers.get(record.name))
                fetched += nbytes
                if took is not None:
                    install_s[parse_block_name(record.name).kind].append(took)
        except BaseException:
            for record in admitted:  # nothing of a failed prepare stays behind
                if self.prepared.get(record.name) is record:
                    self.prepared.free(record.name)
            raise
        # freed meanwhile (a discard, a budget cut): not prepared either
        refused += [r.name for r in admitted if self.prepared.get(r.name) is not r]
        return {
            "seconds": time.monotonic() - start,
            "install_s": mean_by_kind(install_s),
            "refused": tuple(refused),
            "bytes_moved": float(fetched),
        }

    def _admit(self, blocks: tuple[str, ...], context: int) -> tuple[list[Prepared], list[str]]:
        """Reserve memory for the blocks in order while they fit: (admitted, refused). A
        block held or prepared here already needs nothing."""
        admitted: list[Prepared] = []
        todo = [b for b in dict.fromkeys(blocks) if b not in self.host.blocks]
        for i, block in enumerate(todo):
            if block in self.prepared:
                continue
            need = self.blocks.block_bytes(block, context)
            if self.blocks.used_bytes() + need > self.blocks.budget:
                return admitted, [b for b in todo[i:] if b not in self.prepared]
            admitted.append(self.prepared.reserve(block, need))
        return admitted, []

    async def _build(self, record: Prepared, peer: str | None) -> tuple[float | None, int]:
        """Build one admitted block in the background (weights from ``peer`` if named):
        the seconds it took (None if it was freed meanwhile: the block is then dropped) and
        the bytes of weights fetched for it."""
        start = time.monotonic()
        weights = None
        fetched = 0
        if peer is not None and peer != self.name:
            weights = (await self.blocks.fetch_weights(peer, record.name)).weights
            fetched = sum(t.numel() * t.element_size() for t in weights.values())
        if self.prepared.get(record.name) is not record:
            return None, fetched
        loop = asyncio.get_running_loop()
        block = await loop.run_in_executor(self.background, self._paced_build, record.name, weights)
        if self.prepared.get(record.name) is not record:
            return None, fetched
        record.block = block
        return time.monotonic() - start, fetched

    def _paced_build(self, name: str, weights) -> AnyBlock:
        """In the background thread: build a block, then sleep what the device's share owes
        for the CPU it took."""
        start = time.perf_counter()
        cpu0 = time.thread_time()
        block = self.host.build(name, weights)
        self.pacer.pace(time.thread_time() - cpu0, time.perf_counter() - start)
        return block

    # -- discard, budget cuts, resets ---------------------------------------------------
    async def discard(self, cmd: proto.Discard) -> None:
        """Free the named prepared blocks (every one when none is named)."""
        names = cmd.blocks or [p.name for p in self.prepared]
        for name in names:
            self.prepared.free(name)

    def free_all(self) -> None:
        """Free every prepared block (a reset: a new generation starts)."""
        for record in self.prepared:
            self.prepared.free(record.name)

    def fit_budget(self) -> list[str]:
        """Free prepared blocks, the last admitted first, until what the device holds fits
        its budget (or none is left); the names freed."""
        freed = []
        for record in reversed(list(self.prepared)):
            if self.blocks.used_bytes() <= self.blocks.budget:
                break
            self.prepared.free(record.name)
            freed.append(record.name)
        if freed:
            log.info("%s: budget cut, prepared blocks freed: %s", self.name, ", ".join(freed))
        return freed

    # -- commit: the holder's side ------------------------------------------------------
    async def commit(self, cmd: proto.Commit) -> dict:
        """Send every target the states of its blocks in one frame and wait for its answer;
        CommandRefused (with ``refused``: the blocks of the targets that refused) if any
        target did not take them."""
        start = time.monotonic()
        by_target: dict[str, list[str]] = defaultdict(list)
        for block, target in cmd.moves.items():
            if block not in self.host.blocks:
                raise ValueError(f"{self.name} holds no {block} to commit")
            if parse_block_name(block).kind not in MOVABLE_KINDS:
                raise ValueError(f"{block} is pinned to the source: it never moves")
            if target == self.name:
                raise ValueError(f"{block} cannot move to {target}, where it is")
            by_target[target].append(block)
        await self._token_boundary()
        loop = asyncio.get_running_loop()
        # in the compute thread: after any step still there, and no token runs during it
        payloads = await loop.run_in_executor(self.compute, self._dump_batches, by_target)
        answers = await asyncio.gather(
            *(self._hand_over(cmd.epoch, target, payloads[target]) for target in by_target)
        )
        errors = dict(zip(by_target, answers, strict=True))
        moved = sum(len(payloads[t]) for t, error in errors.items() if not error)
        extra = {"bytes_moved": float(moved), "seconds": time.monotonic() - start}
        refusing = [t for t, error in errors.items() if error]
        if refusing:
            reason = "; ".join(
                f"{t} refused {', '.join(by_target[t])}: {errors[t]}" for t in refusing
            )
            refused = tuple(b for t in refusing for b in by_target[t])
            raise CommandRefused(reason, refused=refused, **extra)
        return extra

    async def _token_boundary(self) -> None:
        """Wait (bounded) until no token runs here: a cache dumped mid-token would miss or
        half-hold its position. The controller commits between tokens; this only lets the
        last token's program finish its sends."""
        deadline = time.monotonic() + self.plane.wall_s(TOKEN_END_TIMEOUT_S)
        while self.running():
            if time.monotonic() > deadline:
                raise CommandRefused(f"{self.name}: a token still runs, no commit mid-token")
            await asyncio.sleep(0.005)

    def _dump_batches(self, by_target: Mapping[str, list[str]]) -> dict[str, bytes]:
        """In the compute thread: per target, the batch of its blocks' states (a group's
        cache without weights; a projection or FFN is only named)."""
        model = self.blocks.spec.name
        batches = {}
        for target, names in by_target.items():
            entries = []
            for name in names:
                block = self.host[name]
                blob = b""
                if isinstance(block, KVGroupBlock):
                    blob = dump_state(block_state(block, model, with_weights=False))
                entries.append((name, blob))
            batches[target] = encode_batch(entries)
        return batches

    async def _hand_over(self, epoch: int, target: str, payload: bytes) -> str:
        """Send one batch and wait for the target's answer: "" when it took the blocks,
        else why not (its reason, or the link's failure)."""
        key = (epoch, target)
        answer = self.answers[key] = asyncio.get_running_loop().create_future()
        try:
            frame = Frame(Kind.BLOCK_BATCH, epoch, 0, self.name, payload)
            await self.plane.send(target, frame, SEND_TIMEOUT_S)
            return await asyncio.wait_for(answer, self.plane.wall_s(BATCH_ANSWER_TIMEOUT_S))
        except (ConnectionError, TimeoutError) as exc:
            self.errors["commit"] += 1
            return f"no answer from {target}: {exc!r}"
        finally:
            self.answers.pop(key, None)

    def answered(self, frame: Frame) -> bool:
        """A target's ACK or ERROR of a batch sent from here (False: not one of ours)."""
        answer = self.answers.get((frame.epoch, frame.name))
        if answer is None:
            return False
        if not answer.done():
            refused = frame.kind == Kind.ERROR
            reason = frame.payload.decode(errors="replace") or "refused, no reason given"
            answer.set_result(reason if refused else "")
        return True

    # -- commit: the target's side ------------------------------------------------------
    async def receive_batch(self, frame: Frame) -> None:
        """Take a batch from its sender all or nothing, then answer ACK or ERROR."""
        sender = frame.name
        try:
            states = self._parse_batch(frame.payload)
        except (FrameError, ValueError) as exc:
            error = str(exc)
            # counted under the kind "block batch" (FrameErrors of a batch start with it)
            self.plane.count_bad(error if isinstance(exc, FrameError) else f"block batch: {error}")
        else:
            error = await self._take(sender, states)
        kind = Kind.ERROR if error else Kind.ACK
        answer = Frame(kind, frame.epoch, 0, self.name, error.encode())
        try:
            await self.plane.send(sender, answer, SEND_TIMEOUT_S)
        except ConnectionError as exc:
            self.errors["commit_answer"] += 1
            log.warning("%s: answering %s's batch failed: %r", self.name, sender, exc)

    def _parse_batch(self, payload: bytes) -> dict[str, BlockState | None]:
        """block -> its state (None for a projection or FFN); FrameError/ValueError."""
        states: dict[str, BlockState | None] = {}
        for name, blob in decode_batch(payload):
            kind = parse_block_name(name).kind  # ValueError for no block name
            if kind not in MOVABLE_KINDS:
                raise ValueError(f"{name} is pinned: it is never committed")
            state = load_state(blob, expect_model=self.blocks.spec.name) if blob else None
            if state is not None and state.block != name:
                raise ValueError(f"the state sent as {name} is of {state.block}")
            if (kind == "group") != (state is not None and state.has_cache):
                raise ValueError(f"{name} came {'without' if kind == 'group' else 'with'} a cache")
            states[name] = state
        return states

    async def _take(self, sender: str, states: dict[str, BlockState | None]) -> str:
        """Adopt a batch's blocks, all or none; "" or why not."""
        epoch = self.epochs.get(self.epochs.current)
        foreign = [n for n in states if epoch is None or epoch.placement.get(n) != sender]
        if foreign:
            return f"{sender} does not hold {', '.join(foreign)} in epoch {self.epochs.current}"
        held = [n for n in states if n in self.host.blocks]
        if held:
            return f"{self.name} already holds {', '.join(held)}"
        ready = {n: p.block for n in states if (p := self.prepared.get(n)) is not None and p.block}
        reserved = sum(p.reserved_bytes for n in ready if (p := self.prepared.get(n)))
        length = {n: s.length if s is not None else 0 for n, s in states.items()}
        need = sum(self.blocks.block_bytes(n, length[n]) for n in states) - reserved
        used = self.blocks.used_bytes()
        if used + need > self.blocks.budget:
            return (
                f"{self.name}: taking {', '.join(states)} needs {need} bytes on top of {used}, "
                f"over the budget of {self.blocks.budget} bytes"
            )
        missing = [n for n in states if n not in ready]
        on_the_spot = sum(self.blocks.block_bytes(n, length[n]) for n in missing)
        self.blocks.incoming += on_the_spot
        loop = asyncio.get_running_loop()
        try:
            built = await loop.run_in_executor(self.compute, self._install, states, ready)
        except (ValueError, KeyError, OSError, RuntimeError) as exc:
            return f"{self.name} could not take {', '.join(states)}: {exc}"
        finally:
            self.blocks.incoming -= on_the_spot
        held = [n for n in built if n in self.host.blocks]  # loaded meanwhile
        if held:
            return f"{self.name} already holds {', '.join(held)}"
        for name, block in built.items():  # at once, on the event loop: all or none
            self.prepared.free(name)
            self.host.adopt(block)
        return ""

    def _install(
        self, states: Mapping[str, BlockState | None], ready: Mapping[str, AnyBlock]
    ) -> dict[str, AnyBlock]:
        """In the compute thread: every block of the batch, built where not prepared, each
        group with its cache; on a failure the prepared ones are left as they were."""
        built = dict(ready)
        for name in states:
            if name not in built:
                built[name] = self.host.build(name)
        caches: list[KVGroupBlock] = []
        try:
            for name, state in states.items():
                block = built[name]
                if isinstance(block, KVGroupBlock):
                    assert state is not None and state.keys is not None
                    assert state.values is not None
                    block.set_cache(state.keys, state.values)
                    caches.append(block)
        except ValueError:
            for block in caches:
                block.reset()
            raise
        return built
