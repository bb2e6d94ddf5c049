"""Prepared blocks at the agent level: two real Agents (SmolLM2-135M) joined by their TCP
data planes on loopback, commands called as the agent's dispatch calls them.

A prepare admits blocks in order while they fit and names the rest, builds them beside the
live ones (from the weight cache, or with weights FETCHed from a peer), counts them in the
memory used and in telemetry; a discard, a budget cut and a reset free them and leave no
memory behind; loads and prepares report their install time per kind of block; the
fetches' large frames are not link-throughput samples."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest
import torch
from test_peer_weights import _disk, _epoch, _hidden, _run, _with_pair

from edgepart.control_plane import protocol as proto
from edgepart.device_agent.agent import Agent
from edgepart.device_agent.blocks import CommandRefused
from edgepart.llm.torch_blocks import KVGroupBlock

MIB = 1 << 20
FFNS = ("L0.ffn", "L1.ffn", "L2.ffn", "L3.ffn")
KINDS = {"L1.g0": "group", "L1.proj": "proj", "L1.ffn": "ffn"}


def _prepare(blocks, context: int = 8, **fields) -> proto.Prepare:
    return proto.Prepare(id="p", op="prepare", blocks=tuple(blocks), context=context, **fields)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def test_a_prepare_from_a_peer_builds_beside_the_live_blocks(tmp_path: Path) -> None:
    seen: dict[str, object] = {}

    async def body(src: Agent, dst: Agent) -> None:
        _epoch((src, dst), 0, ())
        peers = dict.fromkeys(KINDS, "src")
        seen["reply"] = await dst.staging.prepare(_prepare(KINDS, context=8, peers=peers))
        seen["prepared"] = {p.name: p.block for p in dst.blocks.prepared}
        seen["live"] = dict(dst.blocks.host.blocks)
        seen["need"] = sum(dst.blocks.block_bytes(b, 8) for b in KINDS)
        seen["used"] = dst.blocks.used_bytes()
        seen["telemetry"] = dst.telemetry()
        seen["fetches"] = src.plane.frames_received
        seen["src_measured"] = src.plane.measured_mbit()
        builders = [t for t in threading.enumerate() if t.name.startswith("dst-prepare")]
        seen["nice"] = [os.getpriority(os.PRIO_PROCESS, t.native_id) for t in builders]

    _with_pair(body, weight_cache=str(tmp_path))
    reply = seen["reply"]
    assert reply["refused"] == ()
    assert set(reply["install_s"]) == {"group", "proj", "ffn"}
    assert all(s > 0 for s in reply["install_s"].values())
    assert seen["live"] == {}  # prepared, not live: no token uses them yet
    assert seen["used"] == seen["need"]  # weights and caches at the context, from admission
    telemetry = seen["telemetry"]
    assert telemetry.prepared_bytes == telemetry.memory_used_bytes == seen["need"]
    assert telemetry.blocks == ()
    assert seen["fetches"] == len(KINDS)
    assert seen["nice"] == [19]  # one background thread, at the lowest priority
    # the weights' frames (an FFN's are 10 MiB) are migration traffic, not link samples
    assert seen["src_measured"] == {}
    for name, block in seen["prepared"].items():
        assert block.loaded_elements == 0, name  # built from the peer's bytes
        hidden = _hidden(2, 5)
        assert torch.equal(_run(block, hidden), _run(_disk(name), hidden)), name


def test_a_prepare_admits_in_order_while_blocks_fit_and_names_the_rest() -> None:
    seen: dict[str, object] = {}

    async def body(src: Agent, dst: Agent) -> None:
        _epoch((src, dst), 0, ())
        # an FFN is 10.6 MiB: two fit in 24 MiB, the third does not, nor anything after it
        seen["reply"] = await dst.staging.prepare(_prepare((*FFNS[:3], "L0.g0")))
        seen["prepared"] = sorted(p.name for p in dst.blocks.prepared)

    _with_pair(body, dst_budget=24 * MIB)
    assert seen["reply"]["refused"] == ("L2.ffn", "L0.g0")
    assert seen["prepared"] == ["L0.ffn", "L1.ffn"]
    assert set(seen["reply"]["install_s"]) == {"ffn"}


def test_discard_frees_what_was_prepared_and_repeats_leave_no_memory_behind(
    tmp_path: Path,
) -> None:
    seen: dict[str, object] = {}

    async def cycle(dst: Agent) -> None:
        await dst.staging.prepare(_prepare(FFNS))
        await dst.staging.discard(proto.Discard(id="d", op="discard"))

    async def body(src: Agent, dst: Agent) -> None:
        _epoch((src, dst), 0, ())
        await dst.blocks.load(proto.Load(id="l", op="load", blocks=("L9.g1",)))
        before = dst.blocks.used_bytes()
        await dst.staging.prepare(_prepare(FFNS))
        seen["prepared_used"] = dst.blocks.used_bytes() - before
        await dst.staging.discard(proto.Discard(id="d1", op="discard", blocks=FFNS[:2]))
        seen["left"] = sorted(p.name for p in dst.blocks.prepared)
        await dst.staging.discard(proto.Discard(id="d2", op="discard"))  # all
        seen["after"] = dst.blocks.used_bytes() - before
        seen["live"] = sorted(dst.blocks.host.blocks)
        for _ in range(3):  # allocator and page cache warm
            await cycle(dst)
        rss = _rss_bytes()
        for _ in range(10):
            await cycle(dst)
        seen["rss_growth"] = _rss_bytes() - rss

    _with_pair(body, weight_cache=str(tmp_path))
    assert seen["prepared_used"] > 4 * 10 * MIB
    assert seen["left"] == ["L2.ffn", "L3.ffn"]
    assert seen["after"] == 0 and seen["live"] == ["L9.g1"]
    # ten prepares of 42 MiB each, discarded: less than one FFN's weights stays
    assert seen["rss_growth"] < 10 * MIB, seen["rss_growth"]


def test_a_budget_cut_during_a_prepare_drops_the_prepared_blocks() -> None:
    seen: dict[str, object] = {}

    async def body(src: Agent, dst: Agent) -> None:
        _epoch((src, dst), 0, ())
        # a slow device (0.1 core) reading the checkpoint: the prepare takes a while
        task = asyncio.create_task(dst.staging.prepare(_prepare(FFNS)))
        while not any(p.block is not None for p in dst.blocks.prepared):
            await asyncio.sleep(0.01)
        assert not task.done()
        cut = proto.SetBudget(id="b", op="set_budget", memory_bytes=4 * MIB)
        await dst._set_budget(cut)
        seen["used_at_cut"] = dst.blocks.used_bytes()
        seen["reply"] = await task
        seen["prepared"] = list(dst.blocks.prepared)
        seen["used"] = dst.blocks.used_bytes()

    _with_pair(body, cpu_share=0.1)
    assert seen["used_at_cut"] == 0
    assert seen["reply"]["refused"] == FFNS  # none of them is prepared now
    assert seen["prepared"] == [] and seen["used"] == 0


def test_a_reset_frees_prepared_blocks_and_pinned_blocks_are_never_prepared() -> None:
    seen: dict[str, object] = {}

    async def body(src: Agent, dst: Agent) -> None:
        _epoch((src, dst), 0, ())
        await dst.staging.prepare(_prepare(("L4.g2",)))
        seen["prepared"] = [p.name for p in dst.blocks.prepared]
        await dst._reset(proto.Reset(id="r", op="reset"))
        seen["after"] = (list(dst.blocks.prepared), dst.blocks.used_bytes())
        with pytest.raises(ValueError, match="pinned"):
            await dst.staging.prepare(_prepare(("head",)))

    _with_pair(body)
    assert seen["prepared"] == ["L4.g2"]
    assert seen["after"] == ([], 0)


def test_loads_report_their_install_time_per_kind(tmp_path: Path) -> None:
    seen: dict[str, dict] = {}

    async def body(src: Agent, dst: Agent) -> None:
        _epoch((src, dst), 0, ())
        blocks = ("embed", "L0.g0", "L0.g1", "L0.proj", "L0.ffn")
        seen["load"] = await src.blocks.load(proto.Load(id="l", op="load", blocks=blocks))
        group = src.blocks.host["L0.g0"]
        assert isinstance(group, KVGroupBlock)

    _with_pair(body, weight_cache=str(tmp_path))
    install_s = seen["load"]["install_s"]
    assert set(install_s) == {"group", "proj", "ffn"}  # the embedding is no movable kind
    assert all(s > 0 for s in install_s.values())


def test_a_batch_is_taken_all_or_nothing() -> None:
    seen: dict[str, object] = {}
    moves = ("L2.g0", "L2.g1", "L2.ffn")

    async def body(src: Agent, dst: Agent) -> None:
        _epoch((src, dst), 0, ("L6.proj",))
        await src.blocks.load(proto.Load(id="s", op="load", blocks=(*moves, "L6.proj")))
        for name in ("L2.g0", "L2.g1"):
            group = src.blocks.host[name]
            assert isinstance(group, KVGroupBlock)
            group(_hidden(5, 3))  # a cache of 5 positions
        await dst.blocks.load(proto.Load(id="d", op="load", blocks=("L6.proj", "L2.ffn")))
        await dst.staging.prepare(_prepare(("L2.g0",), context=6))
        commit = proto.Commit(id="c", op="commit", epoch=1, moves=dict.fromkeys(moves, "dst"))
        # dst holds L2.ffn already: it refuses the whole batch
        with pytest.raises(CommandRefused, match=r"already holds L2\.ffn") as refused:
            await src.staging.commit(commit)
        seen["refused"] = refused.value.reply["refused"]
        seen["after_refusal"] = (
            sorted(dst.blocks.host.blocks),
            [p.name for p in dst.blocks.prepared],
        )
        await dst.blocks.drop(proto.Drop(id="x", op="drop", blocks=("L2.ffn",)))
        # L2.g0 was prepared, L2.g1 and L2.ffn were not: built on the spot
        seen["reply"] = await src.staging.commit(commit)
        seen["dst"] = dict(dst.blocks.host.blocks)
        seen["src"] = {n: src.blocks.host[n] for n in moves}  # kept until epoch 1
        seen["prepared"] = list(dst.blocks.prepared)

    _with_pair(body)
    assert seen["refused"] == ("L2.g0", "L2.g1", "L2.ffn")
    assert seen["after_refusal"] == (["L2.ffn", "L6.proj"], ["L2.g0"])
    assert seen["reply"]["bytes_moved"] > 0 and seen["prepared"] == []
    for name in moves:
        got, kept = seen["dst"][name], seen["src"][name]
        if isinstance(kept, KVGroupBlock):
            assert isinstance(got, KVGroupBlock) and got.length == 5
            assert torch.equal(got.keys, kept.keys) and torch.equal(got.values, kept.values)
        hidden = _hidden(1, 11)
        assert torch.equal(_run(got, hidden), _run(kept, hidden)), name


def test_a_batch_from_an_agent_that_does_not_hold_the_blocks_is_refused() -> None:
    seen: dict[str, object] = {}

    async def body(src: Agent, dst: Agent) -> None:
        _epoch((src, dst), 0, ("L4.g1",))  # dst holds L4.g1 in epoch 0
        await src.blocks.load(proto.Load(id="s", op="load", blocks=("L4.g1",)))
        commit = proto.Commit(id="c", op="commit", epoch=1, moves={"L4.g1": "dst"})
        with pytest.raises(CommandRefused, match=r"src does not hold L4\.g1") as refused:
            await src.staging.commit(commit)
        seen["refused"] = refused.value.reply["refused"]
        seen["dst"] = sorted(dst.blocks.host.blocks)

    _with_pair(body)
    assert seen["refused"] == ("L4.g1",) and seen["dst"] == []
