"""Switches on live agents (local backend, the real model): what must hold on any host.

A run where nothing changes never switches. A forced switch (a memory trace shrinks b
below what it holds) whose target refuses, because its budget was cut right as the
switch was prepared, or whose target is killed during the prepare, still generates the
monolithic reference's ids, and the refusal or the abandoned wave is counted and logged.

The scenario's traces land between tokens only, and a voluntary switch starts at the
boundary where its background plan is found finished, which depends on the host's
speed; a forced switch prepares and commits inside one boundary, where no trace lands.
So the faults are injected at the prepare itself: the controller's line to the agents
is wrapped (``_fault_at_first_prepare``) to cut the target's budget or kill its agent
around the first prepare sent to it, before, while or after it builds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from live_e2e import agent_pid, assert_no_orphans, make_scenario, reference_ids

from edgepart.control_plane import protocol as proto
from edgepart.controller import orchestrator
from edgepart.controller.deployment import Command, Deployment
from edgepart.emulator.backends.local import run_local
from edgepart.emulator.scenario import MIB

#: b is the fastest and holds all it can, c the next and has room to spare, the source
#: a is the slowest and could hold the model with b's 100 MiB (without c)
DEVICES = [
    {"name": "a", "compute_gflops": 0.8, "memory_mib": 600, "source": True},
    {"name": "b", "compute_gflops": 1.6, "memory_mib": 300},
    {"name": "c", "compute_gflops": 1.2, "memory_mib": 600},
]
#: b's memory shrinks below what it holds: the switch off it is forced, and c, faster than
#: a, takes most of what leaves b, in one wave (it has room: no swap for the agents to judge)
SHRINK_B = [{"at_token": 2, "device": "b", "memory_mib": 100}]
#: the forced switch before token 2, and a boundary after it to carry out what was refused
TOKENS = 4

#: what happens to a device, over the controller's line to the agents
Fault = Callable[[Command, str], Awaitable[None]]


async def _cut_budget(command: Command, device: str) -> None:
    """Another application takes all of the device's memory: it refuses every block."""
    cmd = proto.SetBudget(id=f"cut-{device}", op="set_budget", memory_bytes=1)
    await command(device, cmd, 30.0)


async def _restore_budget(command: Command, device: str) -> None:
    memory_mib = next(d["memory_mib"] for d in DEVICES if d["name"] == device)
    cmd = proto.SetBudget(id=f"restore-{device}", op="set_budget", memory_bytes=memory_mib * MIB)
    await command(device, cmd, 30.0)


async def _kill(command: Command, device: str) -> None:
    os.killpg(agent_pid(device), signal.SIGKILL)


def _fault_at_first_prepare(
    monkeypatch: pytest.MonkeyPatch,
    fault: Fault,
    when: str,
    undo: Fault | None = None,
) -> list[str]:
    """Have ``fault`` hit the target of the first prepare not sent to the source, once:
    ``when`` "before" the prepare is sent, "during" (sent with it, in no set order) or
    "after" it answered (before the commit); ``undo`` it before the first prepare sent
    after that answer (a later wave or switch). The devices hit are listed in the
    returned list as the run goes."""
    hit: list[str] = []
    answered: list[str] = []  # the prepare hit, once its reply is in

    class FaultyDeployment(Deployment):
        def __init__(self, config, telemetry, command: Command, publish, next_id) -> None:
            async def faulty(device: str, cmd, timeout_s: float) -> proto.Reply:
                if not isinstance(cmd, proto.Prepare):
                    return await command(device, cmd, timeout_s)
                if answered and undo is not None:  # a later wave or switch: undone first
                    await undo(command, answered.pop())
                if hit or device == config.source:
                    return await command(device, cmd, timeout_s)
                hit.append(device)
                try:
                    return await _faulty_prepare(command, device, cmd, timeout_s)
                finally:
                    answered.append(device)

            super().__init__(config, telemetry, faulty, publish, next_id)

    async def _faulty_prepare(command: Command, device: str, cmd, timeout_s: float):
        if when == "before":
            await fault(command, device)
            return await command(device, cmd, timeout_s)
        reply = asyncio.ensure_future(command(device, cmd, timeout_s))
        if when == "after":
            await asyncio.shield(reply)
        else:
            await asyncio.sleep(0)  # the prepare goes out first, or nearly
        await fault(command, device)
        return await reply

    monkeypatch.setattr(orchestrator, "Deployment", FaultyDeployment)
    return hit


def test_nothing_changing_makes_no_switch(tmp_path: Path) -> None:
    # re-plans come before tokens 2 and 4: each finds nothing worth a move
    scenario = make_scenario(devices=DEVICES, generate_tokens=6, traces=[])
    run = run_local(scenario, "myopic", telemetry="configured", work_dir=tmp_path)
    assert run.result.output_token_ids == reference_ids(6)
    assert run.result.switches == []
    assert run.result.migrations == 0
    assert run.result.failed_replans == 0
    assert_no_orphans(run.pids)


@pytest.mark.parametrize("when", ["before", "during", "after"])
def test_a_target_whose_budget_is_cut_mid_switch_refuses_and_the_ids_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, when: str
) -> None:
    # before: the prepare's admission refuses; after: the prepared copies are freed and
    # the commit's batch is refused; during: either, or the copies freed while building
    hit = _fault_at_first_prepare(monkeypatch, _cut_budget, when, undo=_restore_budget)
    scenario = make_scenario(devices=DEVICES, generate_tokens=TOKENS, traces=SHRINK_B)
    with caplog.at_level(logging.WARNING, logger="edgepart.controller"):
        run = run_local(scenario, "myopic", telemetry="configured", work_dir=tmp_path)
    assert hit == ["c"]
    assert run.result.output_token_ids == reference_ids(TOKENS)
    assert run.result.failed_replans >= 1
    # c's refusal stopped the switch: "c: no room for ..." (its prepare) or "b: c refused
    # ..." (b's commit to it)
    stopped = [r.getMessage() for r in caplog.records if "switch stopped" in r.getMessage()]
    assert any(": c: no room" in m or ": b: c refused" in m for m in stopped), stopped
    assert_no_orphans(run.pids)


def test_a_target_killed_during_a_prepare_is_recovered_and_the_ids_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    hit = _fault_at_first_prepare(monkeypatch, _kill, "during")
    scenario = make_scenario(devices=DEVICES, generate_tokens=TOKENS, traces=SHRINK_B)
    with caplog.at_level(logging.WARNING, logger="edgepart.controller"):
        run = run_local(scenario, "myopic", telemetry="configured", work_dir=tmp_path)
    assert hit == ["c"]
    assert run.result.output_token_ids == reference_ids(TOKENS)
    # the wave was dropped once c was seen gone (its prepare's answer never comes), and
    # c's blocks were re-placed on a and b
    assert any("abandoned" in r.getMessage() for r in caplog.records)
    assert run.result.recoveries == 1
    assert_no_orphans(run.pids)
