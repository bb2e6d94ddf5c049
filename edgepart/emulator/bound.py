"""The zero-lag bound: what a re-planner could reach if every switch were free and instant.

At every change of the world (a trace applied) the planner places the model afresh on the
new resources, as if no block had to move, and that placement runs from the very token the
change happened; the traces come from the scenario, not from telemetry, so nothing lags.
Per token the bound keeps the fastest of that placement and the given runs' tokens (the
placements they used are reachable too, at no cost here). A re-planner that pays for its
moves and learns of a change only from telemetry does not get below the sum with the
placements its planner finds: it is the floor under R = myopic / best static on the cost
model, and a target below it asks for a better planner or a world that announces changes.

Pure over the cost model; traces timed in seconds follow the bound's own clock.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgepart.controller import cost
from edgepart.controller.placement import NoFeasiblePlacement, PlacementAlgorithm
from edgepart.controller.replan import place
from edgepart.controller.view import PlanningWindow
from edgepart.emulator.scenario import Scenario
from edgepart.emulator.world import apply_due_traces, initial_state
from edgepart.llm.blocks import block_table

__all__ = ["zero_lag_per_token_s"]


def zero_lag_per_token_s(
    scenario: Scenario,
    algorithm: PlacementAlgorithm,
    runs: Sequence[Sequence[float]] = (),
) -> list[float]:
    """Per generated token, the delay (s) of the best placement for the world at that token,
    switched to at no cost; never more than any of ``runs`` (per-token delays, s)."""
    table = block_table(scenario.model_spec())
    state, pending = initial_state(scenario)
    context, clock_s = scenario.prompt_tokens, 0.0
    assignment: np.ndarray | None = None
    per_token: list[float] = []
    for token in range(scenario.generate_tokens):
        changes = len(pending)
        apply_due_traces(state, pending, token, clock_s)
        window = PlanningWindow(
            context, scenario.replan_every, scenario.final_context,
            payback_tokens=scenario.final_context - context,
        )
        view = state.view(scenario, window)
        if assignment is None or len(pending) != changes:
            try:
                assignment = place(algorithm, view, table, None).assignment
            except NoFeasiblePlacement:
                assignment = None
        context += 1
        best = np.inf
        if assignment is not None and cost.fits(table, view, assignment, context):
            best = float(cost.per_token_s(table, view, assignment, context))
        for run in runs:
            if token < len(run):
                best = min(best, run[token])
        per_token.append(best)
        clock_s += best if np.isfinite(best) else 0.0
    return per_token
