"""The blocks a device holds, under its memory budget, and how they come and go.

``DeviceBlocks`` admits blocks against the budget before anything is fetched or allocated,
loads them (from this device's weight cache or checkpoint, or with weights FETCHed from a
peer over the data plane), drops them, and serves peers' fetches of its weights. Blocks
move between devices in a switch's two phases (``edgepart.device_agent.staging``). Torch work runs
in the agent's single compute thread; the event loop only waits.

``PreparedBlocks`` are the blocks built for a coming switch beside the live ones
(``edgepart.device_agent.staging``): their memory counts from admission on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from edgepart.control_plane import protocol as proto
from edgepart.device_agent.dataplane import SEND_TIMEOUT_S, DataPlane
from edgepart.device_agent.epochs import Epochs
from edgepart.device_agent.pacing import Pacer
from edgepart.device_agent.wire import Frame, Kind
from edgepart.llm.blocks import BlockTable
from edgepart.llm.runtime import BlockHost
from edgepart.llm.state import BlockState, dump_state, load_state
from edgepart.llm.torch_blocks import MOVABLE_KINDS, AnyBlock, KVGroupBlock, parse_block_name

log = logging.getLogger("edgepart.agent")

#: longest wait (s) for a peer's answer to a FETCH: its read of the block, one shaped send
FETCH_TIMEOUT_S = SEND_TIMEOUT_S + 30.0


class CommandRefused(RuntimeError):
    """A command the agent will not carry out (e.g. over its memory budget); ``reply``: the
    fields its Reply carries besides the reason (e.g. ``refused``)."""

    def __init__(self, reason: str, **reply) -> None:
        super().__init__(reason)
        self.reply = reply


@dataclass
class Prepared:
    """A block admitted for a coming switch: its memory, and the block once built."""

    name: str
    reserved_bytes: int  # its weights and its cache at the prepare's context
    block: AnyBlock | None = None  # None while it is being built


class PreparedBlocks:
    """The blocks prepared here, by name, apart from the live ones (event loop only)."""

    def __init__(self) -> None:
        self._by_name: dict[str, Prepared] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Prepared]:
        return iter(list(self._by_name.values()))

    def get(self, name: str) -> Prepared | None:
        """The prepared block of that name, if any."""
        return self._by_name.get(name)

    def reserve(self, name: str, reserved_bytes: int) -> Prepared:
        """Admit a block (not built yet)."""
        record = self._by_name[name] = Prepared(name, int(reserved_bytes))
        return record

    def free(self, name: str) -> Prepared | None:
        """Forget a prepared block (its memory goes with the last reference)."""
        return self._by_name.pop(name, None)

    def bytes(self) -> int:
        """Bytes reserved by every prepared block (built or being built)."""
        return sum(p.reserved_bytes for p in self._by_name.values())


def mean_by_kind(seconds: Mapping[str, list[float]]) -> dict[str, float]:
    """Mean seconds per block of each kind that has any."""
    return {kind: sum(times) / len(times) for kind, times in seconds.items() if times}


def timed(work: Callable[[], AnyBlock], pacer: Pacer) -> tuple[AnyBlock, float]:
    """Run a build in this thread; the block and the time (s) it takes at the device's
    speed: the wall time, stretched by ``pacer`` as its paced duration would be."""
    start = time.perf_counter()
    cpu0 = time.thread_time()
    block = work()
    cpu_s, wall_s = time.thread_time() - cpu0, time.perf_counter() - start
    return block, wall_s + pacer.pace_s(cpu_s, wall_s)


class DeviceBlocks:
    """One device's block host, its memory budget, and the weights fetched in and served out."""

    def __init__(
        self,
        host: BlockHost,
        table: BlockTable,
        budget_bytes: int,
        plane: DataPlane,
        epochs: Epochs,
        compute: Executor,
        errors: Counter[str],
        pacer: Pacer,
    ) -> None:
        self.name = host.name
        self.host = host
        self.spec = host.arch.spec
        self.table = table
        self.budget = int(budget_bytes)  # bytes the device offers to edgepart
        self.incoming = 0  # bytes of blocks on the way in (admitted, not yet held)
        self.plane = plane
        self.epochs = epochs
        self.compute = compute  # the agent's one compute thread
        self.errors = errors  # the agent's failure counts by kind
        self.pacer = pacer  # the compute thread's: the device's speed
        self.prepared = PreparedBlocks()  # built for a coming switch, not live yet
        #: (request number, block) -> the peer's answer to a FETCH: state bytes, or an error
        self.fetches: dict[tuple[int, str], asyncio.Future] = {}
        self.fetch_requests = 0  # FETCH request numbers start at 1 (a FETCH of token 0 is bad)

    # -- memory ------------------------------------------------------------------------
    def used_bytes(self) -> int:
        """Bytes of weights and KV caches held, arriving or prepared."""
        held = self.host.weight_bytes() + self.host.cache_bytes()
        return held + self.incoming + self.prepared.bytes()

    def block_bytes(self, block: str, length: int) -> int:
        """Bytes a block will take when held with ``length`` cached positions."""
        kind = parse_block_name(block).kind
        # the planner pins source_weight_bytes (embeddings, final norm and LM head) on the
        # source: "embed" and "head" split exactly that, so both sides count the same bytes
        spec = self.spec
        head = 0 if spec.tied_embeddings else spec.vocab * spec.d_model * spec.bytes_per_element
        if kind == "embed":
            return int(self.table.source_weight_bytes) - head
        if kind == "head":
            return head
        return int(self.table.memory_bytes(length)[self.table.index(block)])

    def admit(self, blocks: Sequence[str], length: int) -> None:
        """Refuse (CommandRefused) blocks that would not fit the budget next to what is held."""
        need = sum(self.block_bytes(b, length) for b in blocks)
        used = self.used_bytes()
        if used + need > self.budget:
            raise CommandRefused(
                f"{self.name}: holding {', '.join(blocks)} needs {need} bytes on top of "
                f"{used}, over the budget of {self.budget} bytes"
            )

    # -- loads and drops ---------------------------------------------------------------
    async def load(self, cmd: proto.Load) -> dict:
        """Hold the named blocks, read from disk (the weight cache, else the checkpoint) or
        with weights from the named peer. The reply's ``install_s``: per kind of movable
        block, the mean time (s) one took to fetch and build, its build at the device's
        speed (paced duration; a load itself runs unpaced, at the start)."""
        todo = [b for b in cmd.blocks if b not in self.host.blocks]
        order = sorted(todo, key=lambda b: b != "embed")  # a tied head needs the embedding
        peer = cmd.peer if cmd.weights_from == "peer" else None
        if cmd.weights_from == "peer" and peer is None:
            raise ValueError("a load with weights from a peer names no peer")
        if peer == self.name:
            peer = None  # the device with the checkpoint reads its own
        self.admit(order, 0)  # before anything is fetched or allocated
        start = time.monotonic()
        loop = asyncio.get_running_loop()
        install_s: dict[str, list[float]] = defaultdict(list)
        for block in order:
            fetch_start = time.monotonic()
            weights = None
            # admitted: counted while its weights are on the way
            need = self.block_bytes(block, 0) if peer is not None else 0
            self.incoming += need
            try:
                if peer is not None:
                    weights = (await self.fetch_weights(peer, block)).weights
                fetch_s = time.monotonic() - fetch_start
                _, build_s = await loop.run_in_executor(
                    self.compute, timed, lambda b=block, w=weights: self.host.load(b, w), self.pacer
                )
            finally:
                self.incoming -= need
            kind = parse_block_name(block).kind
            if kind in MOVABLE_KINDS:
                install_s[kind].append(fetch_s + build_s)
        return {"seconds": time.monotonic() - start, "install_s": mean_by_kind(install_s)}

    async def drop(self, cmd: proto.Drop) -> None:
        """Free the named blocks held here."""
        for block in cmd.blocks:
            if block in self.host.blocks:
                self.host.drop(block)

    def drop_unplaced(self, placement: Mapping[str, str]) -> None:
        """Free the blocks a placement puts elsewhere (old copies no longer routed to)."""
        for block in list(self.host.blocks):
            if placement.get(block) != self.name:
                self.host.drop(block)

    async def reset_caches(self) -> None:
        """Empty every KV cache held, in the compute thread (after any step still there)."""

        def reset() -> None:
            for block in self.host.held():
                if isinstance(block, KVGroupBlock):
                    block.reset()

        await asyncio.get_running_loop().run_in_executor(self.compute, reset)

    # -- weights from a peer -----------------------------------------------------------
    async def fetch_weights(self, peer: str, block: str) -> BlockState:
        """A block's weights from a peer over the data plane: FETCH, then its BLOCK_STATE
        (or ERROR) answer with the same request number; every wait is bounded."""
        await self.epochs.endpoint_known(peer)
        self.fetch_requests += 1
        key = (self.fetch_requests, block)
        fut = self.fetches[key] = asyncio.get_running_loop().create_future()
        epoch = max(self.epochs.current, 0)
        try:
            request = Frame(Kind.FETCH, epoch, key[0], block, self.name.encode())
            await self.plane.send(peer, request, SEND_TIMEOUT_S)
            kind, payload = await asyncio.wait_for(fut, self.plane.wall_s(FETCH_TIMEOUT_S))
        finally:
            self.fetches.pop(key, None)
        if kind == Kind.ERROR:
            raise RuntimeError(f"{peer} did not serve {block}: {payload.decode(errors='replace')}")
        state = load_state(payload, expect_model=self.spec.name)
        if state.block != block or not state.weights:
            raise ValueError(f"{peer} answered the fetch of {block} with no weights of it")
        return state

    async def serve_fetch(self, frame: Frame) -> None:
        """Answer a peer's FETCH: the block's weights (the copy held here, else read from this
        device's checkpoint) as a BLOCK_STATE, or an ERROR with the reason; same token."""
        try:
            requester = frame.payload.decode("utf-8")
        except UnicodeDecodeError:
            requester = ""
        if frame.token == 0 or not requester or requester == self.name:
            self.plane.count_bad(f"fetch: bad request (token {frame.token}, {frame.payload!r})")
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
            await self.epochs.endpoint_known(requester)
            reply = Frame(kind, frame.epoch, frame.token, frame.name, answer)
            await self.plane.send(requester, reply, SEND_TIMEOUT_S)
        except (ConnectionError, TimeoutError) as exc:
            self.errors["fetch"] += 1
            log.warning(
                "%s: answering %s's fetch of %s failed: %r", self.name, requester, frame.name, exc
            )

    def answer_fetch(self, frame: Frame) -> None:
        """A peer's answer (BLOCK_STATE or ERROR) to a FETCH of ours."""
        fut = self.fetches.get((frame.token, frame.name))
        if fut is None or fut.done():
            self.errors["late_fetch_answer"] += 1
            return
        fut.set_result((frame.kind, frame.payload))
