"""A switch in two phases between two real agent processes on the embedded broker.

Tokens run on epoch 0; the target prepares KV groups, a projection and an FFN in the
background; the holder commits them at a token boundary (one batch frame, their caches);
tokens then run on epoch 1 with the blocks on the target. A second commit to a target whose
budget cannot take the block is refused with the block named, and the holder's copy goes
on serving. The generated ids equal the monolithic reference throughout.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
from functools import cache
from pathlib import Path

import aiomqtt

from edgepart.control_plane import protocol as proto
from edgepart.emulator.broker import EmbeddedBroker
from edgepart.llm.blocks import block_table
from edgepart.llm.loader import open_model
from edgepart.llm.runtime import monolithic

TESTBED = "two-phase"
MODEL = "smollm2-135m"
TIMEOUT_S = 120.0
PROMPT = "The quick brown fox jumps over the lazy dog, and then"
BEFORE, AFTER, LAST = 3, 3, 2  # tokens decoded before the switch, after it, after the refusal
MOVED = ("L3.g0", "L3.g2", "L5.proj", "L7.ffn")  # from a to b at the switch
REFUSED = "L9.ffn"  # committed to b once its budget is cut below an FFN's weights
MIB = 1 << 20


@cache
def _prompt_and_reference() -> tuple[list[int], list[int]]:
    opened = open_model(MODEL)
    ids = opened.tokenizer.encode(PROMPT)
    return ids, monolithic(opened.source, opened.arch).greedy(ids, BEFORE + AFTER + LAST)


def _placement(on_b: tuple[str, ...]) -> dict[str, str]:
    names = (*block_table(open_model(MODEL).arch.spec).names, "embed", "head")
    return {n: "b" if n in on_b else "a" for n in names}


class Controller:
    """What the test drives the agents with: commands and their replies, epochs, telemetry."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.ids = (f"c{i}" for i in itertools.count())
        self.replies: dict[str, asyncio.Future[proto.Reply]] = {}
        self.telemetry: dict[str, proto.Telemetry] = {}
        self.online: dict[str, str] = {}  # device -> data endpoint

    async def read(self) -> None:
        async for message in self.client.messages:
            topic = proto.parse_topic(message.topic.value)
            if topic is None:
                continue
            decoded = proto.decode(topic.kind, message.payload)
            if isinstance(decoded, proto.Reply) and decoded.id in self.replies:
                self.replies[decoded.id].set_result(decoded)
            elif isinstance(decoded, proto.Telemetry):
                self.telemetry[decoded.name] = decoded
            elif isinstance(decoded, proto.Status) and decoded.state == "online":
                self.online[decoded.name] = decoded.listen or ""

    async def command(self, device: str, command_type, **fields) -> proto.Reply:
        cmd = command_type(id=next(self.ids), **fields)
        answer = self.replies[cmd.id] = asyncio.get_running_loop().create_future()
        topic = proto.device_topic(TESTBED, device, "cmd")
        await self.client.publish(topic, proto.encode(cmd), qos=1)
        return await asyncio.wait_for(answer, TIMEOUT_S)

    async def epoch(self, number: int, on_b: tuple[str, ...]) -> None:
        msg = proto.PlacementEpoch(epoch=number, placement=_placement(on_b), endpoints=self.online)
        await self.client.publish(proto.placement_topic(TESTBED), proto.encode(msg), qos=1)

    async def until(self, check, what: str) -> None:
        async with asyncio.timeout(TIMEOUT_S):
            while not check():
                await asyncio.sleep(0.05)
        assert check(), what

    async def decode(self, epoch: int, position: int, tokens: list[int]) -> int:
        reply = await self.command(
            "a", proto.Decode, op="decode", epoch=epoch, position=position, tokens=tuple(tokens)
        )
        assert reply.ok and reply.token_id is not None, reply.error
        return reply.token_id


async def _scenario(endpoint: str) -> dict:
    prompt, _ = _prompt_and_reference()
    host, _, port = endpoint.rpartition(":")
    seen: dict = {"ids": []}
    async with aiomqtt.Client(host, int(port), identifier="test-controller") as client:
        for kind in ("status", "telemetry", "reply"):
            await client.subscribe(proto.subscription(TESTBED, kind), qos=1)
        c = Controller(client)
        reader = asyncio.create_task(c.read())
        try:
            await c.until(lambda: {"a", "b"} <= set(c.online), "both agents online")
            await c.epoch(0, ())
            everything = tuple(_placement(()))
            load = await c.command("a", proto.Load, op="load", blocks=everything)
            assert load.ok, load.error
            seen["load_install_s"] = load.install_s
            # tokens on epoch 0: the prompt, then one at a time
            ids, position, token = seen["ids"], 0, await c.decode(0, 0, prompt)
            ids.append(token)
            position = len(prompt)
            for _ in range(BEFORE - 1):
                token = await c.decode(0, position, [token])
                ids.append(token)
                position += 1
            # phase one: b builds the blocks while nothing changes for the tokens
            prepare = await c.command(
                "b", proto.Prepare, op="prepare", blocks=MOVED, context=position + AFTER
            )
            assert prepare.ok and prepare.refused == (), prepare
            seen["prepare_install_s"] = prepare.install_s
            await c.until(lambda: c.telemetry["b"].prepared_bytes > 0, "b reports them")
            seen["b_prepared"] = c.telemetry["b"]
            # phase two, at a token boundary: a hands over the caches, then epoch 1
            commit = await c.command(
                "a", proto.Commit, op="commit", epoch=1, moves=dict.fromkeys(MOVED, "b")
            )
            assert commit.ok, commit.error
            seen["bytes_moved"] = commit.bytes_moved
            await c.epoch(1, MOVED)
            for _ in range(AFTER):
                token = await c.decode(1, position, [token])
                ids.append(token)
                position += 1
            await c.until(lambda: set(MOVED) <= set(c.telemetry["b"].blocks), "b holds them")
            await c.until(lambda: not set(MOVED) & set(c.telemetry["a"].blocks), "a freed them")
            seen["b_after"] = c.telemetry["b"]
            seen["a_measured"] = c.telemetry["a"].peer_throughput_mbit
            # a commit b refuses: its budget no longer has room for an FFN
            budget = int(c.telemetry["b"].memory_used_bytes) + 2 * MIB
            cut = await c.command("b", proto.SetBudget, op="set_budget", memory_bytes=budget)
            assert cut.ok, cut.error
            refused = await c.command("a", proto.Commit, op="commit", epoch=2, moves={REFUSED: "b"})
            seen["refused"] = refused
            for _ in range(LAST):  # epoch 1 goes on: a still serves the block
                token = await c.decode(1, position, [token])
                ids.append(token)
                position += 1
        finally:
            reader.cancel()
    return seen


def _agent(name: str, broker: str, cache_dir: Path) -> subprocess.Popen:
    args = ["--name", name, "--broker", broker, "--testbed", TESTBED, "--model", MODEL]
    args += ["--memory-mib", "2048", "--cpu-share", "1", "--weight-cache", str(cache_dir)]
    return subprocess.Popen([sys.executable, "-m", "edgepart.device_agent", *args])


def test_prepare_then_commit_moves_blocks_between_tokens(tmp_path: Path) -> None:
    _, reference = _prompt_and_reference()
    with EmbeddedBroker() as broker:
        agents = [_agent(name, broker.endpoint, tmp_path) for name in ("a", "b")]
        try:
            seen = asyncio.run(_scenario(broker.endpoint))
        finally:
            for agent in agents:
                agent.terminate()
            for agent in agents:
                agent.wait(timeout=20)
    assert seen["ids"] == reference
    assert [agent.returncode for agent in agents] == [0, 0]
    for key in ("load_install_s", "prepare_install_s"):
        assert set(seen[key]) == {"group", "proj", "ffn"}, key
        assert all(s > 0 for s in seen[key].values()), key
    prepared = seen["b_prepared"]
    assert prepared.blocks == () and prepared.prepared_bytes == prepared.memory_used_bytes
    assert seen["b_after"].prepared_bytes == 0
    # two groups' caches of BEFORE + prompt positions (K and V, 64 dims, float32) and more
    assert seen["bytes_moved"] > 0
    assert seen["a_measured"] == {}  # the batch and the loads are no link samples
    refused = seen["refused"]
    assert not refused.ok and refused.refused == (REFUSED,)
    assert "over the budget" in (refused.error or "")
