"""The simulator and the live controller decide alike on the same telemetry.

Both follow ``edgepart.controller.replan.ReplanPolicy`` with their own boundary loop: the sim's
``_Simulation.boundary`` on the virtual clock, the controller's ``Switching.at_boundary``
over its deployment. Here the controller's loop is driven, token by token, with the views
the configured telemetry of a live run gives (the scenario's world state after the traces
due, ``edgepart.emulator.world``), over a deployment on the sim's virtual clock (a wave takes its
predicted prepare and commit time) and with a background plan that finishes during the
token; the sim runs the same scenario. Every re-plan, every switch (its token, blocks,
whether forced) and every placement they switch to must agree.

The two count tokens alike (a trace at token t lands before the boundary of token t, a
re-plan is due every ``replan_every`` tokens) but not positions: the sim's token t decodes
with t more positions cached than the prompt, the live one's with t - 1 (its first token
comes with the prompt's prefill). The tokens left, which a switch pays back over, agree.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from test_sim import FAST_LINKS, MID_MODEL, SLOW_DEVICES

from edgepart.controller import cost
from edgepart.controller.deployment import PreparedWave, WaveDone
from edgepart.controller.placement import Placement, make_algorithm
from edgepart.controller.result import RunResult
from edgepart.controller.switch import SwitchPlan, Wave
from edgepart.controller.switching import Switching
from edgepart.emulator.backends.sim import simulate
from edgepart.emulator.job import controller_config
from edgepart.emulator.scenario import Scenario, parse_scenario
from edgepart.emulator.world import apply_due_traces, initial_state
from edgepart.llm.blocks import block_table

TRACES = {
    "nothing changes": [],
    "the source slows down": [{"at_token": 5, "device": "s", "background_load": 0.9}],
    "a slows down, then recovers": [
        {"at_token": 3, "device": "a", "background_load": 0.8},
        {"at_token": 9, "device": "a", "background_load": 0.0},
    ],
    "the source's memory shrinks": [{"at_token": 4, "device": "s", "memory_mib": 10}],
    "the source slows down, then its link to a": [
        {"at_token": 4, "device": "s", "background_load": 0.5},
        {"at_token": 6, "link": ["s", "a"], "bandwidth_mbit": 5},
    ],
}


@dataclass
class _TimedWave(PreparedWave):
    """A prepared wave ready once the virtual clock passed its predicted prepare time."""

    ready_at_s: float = 0.0
    clock_s: Callable[[], float] = lambda: 0.0

    @property
    def ready(self) -> bool:
        return self.clock_s() >= self.ready_at_s


class _VirtualDeployment:
    """What ``Switching`` uses of a ``Deployment``, with no agents, on the sim's virtual
    clock (``clock_s``): a wave's targets build it in its predicted prepare time (in the
    background, or as a stall when the switch is forced), and its commit moves every block
    of it in its predicted commit time (a stall)."""

    def __init__(self, devices: tuple[str, ...]) -> None:
        self.devices = devices
        self.placement: Placement | None = None
        self.clock_s = 0.0
        self.forced: Callable[[], bool] = lambda: False

    def prepare(self, plan: SwitchPlan, wave: Wave, context: int) -> PreparedWave:
        prepared = _TimedWave(wave, plan.target, context, self.clock_s)
        prepared.clock_s = lambda: self.clock_s
        prepared.ready_at_s = self.clock_s + wave.prepare_s
        if self.forced():
            self.clock_s = prepared.ready_at_s
        for device in {self.devices[plan.target[b]] for b in wave.blocks}:
            answer = asyncio.get_running_loop().create_future()
            answer.set_result(None)  # what the agents would say is not what is compared
            prepared.replies[device] = answer
        return prepared

    async def commit(self, prepared: PreparedWave) -> WaveDone:
        assert self.placement is not None
        moved = list(prepared.wave.blocks)
        x = self.placement.assignment.copy()
        x[moved] = prepared.targets[moved]
        self.placement = Placement(x)
        self.clock_s += prepared.wave.commit_s
        return WaveDone(tuple(moved), 0.0, 0.0, 0.0, (), frozenset())

    async def abandon(self, prepared: PreparedWave) -> None:
        raise AssertionError("no target is lost or refuses here: nothing is abandoned")


class _Reports:
    """What ``Switching`` reads of the agents' reports: nothing held beyond the table's
    count, no refusal, every device there."""

    def __init__(self, devices: int) -> None:
        self.devices = devices
        self.refused: set[str] = set()

    def reported_memory_bytes(self) -> np.ndarray:
        return np.zeros(self.devices)

    def is_alive(self, device: str) -> bool:
        return True


async def _controller_decisions(scenario: Scenario, algorithm: str):
    """The live controller's re-plans, switches and placements on the configured views."""
    table = block_table(scenario.model_spec())
    prompt = tuple(range(scenario.prompt_tokens))
    config = controller_config(
        scenario, table, list(prompt), "-", "parity", algorithm, telemetry="configured"
    )
    deployment = _VirtualDeployment(config.devices)
    result = RunResult(algorithm)
    switching = Switching(
        config, make_algorithm(algorithm), deployment, _Reports(len(config.devices)), result
    )
    deployment.forced = lambda: switching.active is not None and switching.active.forced
    state, pending = initial_state(scenario)
    context = len(prompt)
    view = state.view(scenario, switching.window(0, context))
    deployment.placement = await switching.plan(view, None)
    placements = [deployment.placement.assignment]
    for i in range(1, config.generate_tokens):
        apply_due_traces(state, pending, i, 0.0)
        view = state.view(scenario, switching.window(i, context))
        await switching.at_boundary(i, view, context)
        if switching.planning is not None:  # it finishes while the token runs
            await asyncio.wait({switching.planning})
        x = deployment.placement.assignment
        deployment.clock_s += float(cost.per_token_s(table, view, x, context + 1))
        if not np.array_equal(deployment.placement.assignment, placements[-1]):
            placements.append(deployment.placement.assignment)
        context += 1
    await switching.abandon(config.generate_tokens)
    return result.replans - 1, result.switches, placements  # the first plan is no re-plan


@pytest.mark.parametrize("trace", list(TRACES))
def test_the_sim_and_the_controller_decide_alike(scenario_data, trace: str) -> None:
    # tokens of tens of milliseconds: switches can pay; a re-plan is due every 2 tokens
    data = scenario_data(
        model=MID_MODEL,
        devices=SLOW_DEVICES,
        links=FAST_LINKS,
        generate_tokens=16,
        replan_every=2,
        traces=TRACES[trace],
    )
    scenario = parse_scenario(data, "parity")
    sim = simulate(scenario, make_algorithm("myopic"))
    replans, switches, placements = asyncio.run(_controller_decisions(scenario, "myopic"))
    assert replans == sim.replans
    assert [(s.token, s.blocks, s.forced) for s in switches] == [
        (s.token, s.blocks, s.forced) for s in sim.switches
    ]
    assert len(placements) == len(sim.placements)
    for live, simulated in zip(placements, sim.placements, strict=True):
        np.testing.assert_array_equal(live, simulated)
