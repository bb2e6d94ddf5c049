"""Weights from a peer, at the agent level: two real Agents (SmolLM2-135M) joined by their
TCP data planes on loopback. A device loads blocks by FETCHing their weights from the one
with the checkpoint, and a switch prepares every block kind with weights from the holder,
then commits the caches; either way the block built from the peer's weights reads nothing
from disk and computes exactly what the block loaded from disk computes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import cache

import pytest
import torch

from edgepart.control_plane import protocol as proto
from edgepart.device_agent.agent import Agent, AgentConfig
from edgepart.device_agent.blocks import CommandRefused
from edgepart.llm.blocks import block_table
from edgepart.llm.loader import OpenModel, open_model
from edgepart.llm.runtime import BlockHost
from edgepart.llm.torch_blocks import KVGroupBlock, ProjBlock

MODEL = "smollm2-135m"
TIMEOUT_S = 120.0  # bound on each test's whole exchange
FETCHED = ("L0.g1", "L3.proj", "L29.ffn")


@cache
def _model() -> OpenModel:
    return open_model(MODEL)


def _disk(name: str):
    opened = _model()
    return BlockHost("disk", opened.source, opened.arch).load(name)


def _hidden(rows: int, seed: int) -> torch.Tensor:
    d = _model().arch.spec.d_model
    return torch.randn(rows, d, generator=torch.Generator().manual_seed(seed))


def _run(block, hidden: torch.Tensor) -> torch.Tensor:
    if isinstance(block, ProjBlock):
        spec = _model().arch.spec
        heads = torch.tanh(hidden[:, :1] * torch.linspace(-1, 1, spec.heads * spec.head_dim))
        return block(heads, hidden)
    return block(hidden)


def _placement(on_dst: tuple[str, ...]) -> dict[str, str]:
    names = (*block_table(_model().arch.spec).names, "embed", "head")
    return {n: "dst" if n in on_dst else "src" for n in names}


Pair = tuple[Agent, Agent]


def _with_pair(
    body: Callable[[Agent, Agent], Awaitable[None]], dst_budget: int = 1 << 30, **config
) -> None:
    """Run body(src, dst) with two agents whose data planes listen on loopback (``config``:
    more AgentConfig fields of both)."""
    src = Agent(
        AgentConfig("src", broker="127.0.0.1:1", listen="127.0.0.1:0", model=MODEL, **config)
    )
    dst = Agent(
        AgentConfig(
            "dst",
            broker="127.0.0.1:1",
            listen="127.0.0.1:0",
            model=MODEL,
            memory_bytes=dst_budget,
            **config,
        )
    )

    async def main() -> None:
        endpoints = {}
        for agent in (src, dst):
            host, port = await agent.plane.start("127.0.0.1", 0)
            endpoints[agent.name] = f"{host}:{port}"
        src.endpoints = dst.endpoints = endpoints  # type: ignore[attr-defined]
        try:
            await asyncio.wait_for(body(src, dst), TIMEOUT_S)
        finally:
            for agent in (src, dst):
                for task in list(agent.tasks):
                    task.cancel()
                await agent.plane.close()
                agent.compute.shutdown(wait=False, cancel_futures=True)
                agent.staging.shutdown()

    asyncio.run(main())


def _epoch(agents: Pair, number: int, on_dst: tuple[str, ...]) -> None:
    for agent in agents:
        agent._set_epoch(
            proto.PlacementEpoch(
                epoch=number,
                placement=_placement(on_dst),
                endpoints=agent.endpoints,  # type: ignore[attr-defined]
            )
        )


def test_blocks_loaded_from_a_peer_compute_like_blocks_loaded_from_disk() -> None:
    held: dict[str, object] = {}
    stats: dict[str, int] = {}

    async def body(src: Agent, dst: Agent) -> None:
        _epoch((src, dst), 0, FETCHED)
        # the source holds one of them (its copy is served), the others it reads for the peer
        await src.blocks.load(proto.Load(id="s", op="load", blocks=("L3.proj",)))
        load = proto.Load(id="d", op="load", blocks=FETCHED, weights_from="peer", peer="src")
        await dst.blocks.load(load)
        held.update(dst.blocks.host.blocks)
        stats["fetches"] = src.plane.frames_received
        stats["received"] = dst.plane.bytes_received
        stats["incoming"] = dst.blocks.incoming
        stats["src_holds"] = len(src.blocks.host.blocks)

    _with_pair(body)
    assert set(held) == set(FETCHED)
    assert stats["fetches"] == len(FETCHED)  # one FETCH per block, nothing else
    table = block_table(_model().arch.spec)
    weights = sum(table.weight_bytes[table.index(n)] for n in FETCHED)
    assert stats["received"] >= weights  # the weights travelled over the data plane
    assert stats["incoming"] == 0 and stats["src_holds"] == 1  # served, not taken over
    for name, block in held.items():
        disk = _disk(name)
        assert block.loaded_elements == 0, name  # built from the peer's bytes, no disk read
        assert block.weight_bytes() == disk.weight_bytes() > 0
        for key, t in disk.weight_tensors().items():
            assert torch.equal(block.weight_tensors()[key], t), (name, key)
        for seed in (1, 2):  # a prompt, then a decode step (groups continue their caches)
            hidden = _hidden(3 if seed == 1 else 1, seed)
            assert torch.equal(_run(block, hidden), _run(disk, hidden)), name


def test_a_switch_prepared_from_the_peer_carries_every_kind_and_its_cache() -> None:
    moved = ("L5.g2", "L5.proj", "L5.ffn")
    got: dict[str, object] = {}
    seen: dict[str, float] = {}
    before: dict[str, torch.Tensor] = {}

    async def body(src: Agent, dst: Agent) -> None:
        _epoch((src, dst), 0, ())
        await src.blocks.load(proto.Load(id="s", op="load", blocks=moved))
        group = src.blocks.host["L5.g2"]
        assert isinstance(group, KVGroupBlock)
        group(_hidden(4, 7))  # a cache of 4 positions
        before["keys"] = group.keys.clone()
        peers = dict.fromkeys(moved, "src")
        prepare = proto.Prepare(id="p", op="prepare", blocks=moved, context=5, peers=peers)
        await dst.staging.prepare(prepare)
        seen["weights_received"] = dst.plane.bytes_received
        # epoch 1 (dst holds them) is published only once the commit is acknowledged
        commit = proto.Commit(id="c", op="commit", epoch=1, moves=dict.fromkeys(moved, "dst"))
        await src.staging.commit(commit)
        got.update(dst.blocks.host.blocks)

    _with_pair(body)
    table = block_table(_model().arch.spec)
    assert seen["weights_received"] >= sum(table.weight_bytes[table.index(n)] for n in moved)
    for name in moved:
        block = got[name]
        assert block.loaded_elements == 0, name  # nothing read from dst's disk
        disk = _disk(name)
        if isinstance(block, KVGroupBlock):
            assert block.length == 4 and torch.equal(block.keys, before["keys"])
            disk(_hidden(4, 7))  # the same history on the disk copy
        hidden = _hidden(1, 9)
        assert torch.equal(_run(block, hidden), _run(disk, hidden)), name


def test_a_peer_that_cannot_serve_is_an_error_and_the_budget_is_checked_first() -> None:
    outcome: dict[str, object] = {}

    async def body(src: Agent, dst: Agent) -> None:
        _epoch((src, dst), 0, ("L0.ffn",))
        # over budget: refused before any FETCH leaves
        big = proto.Load(id="b", op="load", blocks=("L0.ffn",), weights_from="peer", peer="src")
        with pytest.raises(CommandRefused, match="over the budget"):
            await dst.blocks.load(big)
        outcome["fetches_after_refusal"] = src.plane.frames_received
        # a block the source will not hand out: the ERROR answer names why
        pinned = proto.Load(id="p", op="load", blocks=("head",), weights_from="peer", peer="src")
        with pytest.raises(RuntimeError, match=r"src did not serve head.*pinned"):
            await dst.blocks.load(pinned)
        outcome["held"] = dict(dst.blocks.host.blocks)
        outcome["incoming"] = dst.blocks.incoming
        no_peer = proto.Load(id="n", op="load", blocks=("L0.g0",), weights_from="peer")
        with pytest.raises(ValueError, match="names no peer"):
            await dst.blocks.load(no_peer)

    _with_pair(body, dst_budget=4 << 20)  # 4 MiB: an FFN (10 MiB) does not fit, the head does
    assert outcome["fetches_after_refusal"] == 0
    assert outcome["held"] == {} and outcome["incoming"] == 0
