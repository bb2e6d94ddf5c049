"""The ``sim`` backend: replays a scenario token by token on a virtual clock with the cost model.

Per generated token it applies the traces that are due, re-plans every
``replan_every`` tokens (and whenever the placement stops fitting or a device
holding blocks dies), charges migrations and recovery, and records the token's
latency and every device's memory. Prefill is not part of the per-token series.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from controller import cost
from controller.placement import NoFeasiblePlacement, Placement, PlacementAlgorithm
from controller.replan import planning_window, scheduled
from controller.result import RunRecord, RunResult, TokenRecord
from controller.view import PlanningWindow, ResourceView
from emulator.scenario import Scenario, Trace
from emulator.world import WorldState
from llm.blocks import BlockTable, block_table
from llm.model import ModelSpec


@dataclass
class Decision:
    """One planner run during a simulation."""

    token: int  # index of the generated token it precedes
    context: int  # cached positions when it was taken
    forced: bool  # triggered by a failure or a memory shortfall, not the schedule
    objective_s: float  # interval objective of the chosen placement
    moved_blocks: int
    migration_s: float  # migration delay plus recovery of lost state, s
    per_token_s: float  # predicted delay of the next token, s


@dataclass
class SimResult:
    """What a simulated generation measured."""

    algorithm: str
    per_token_s: list[float]
    migration_s: float
    migrations: int
    peak_memory_bytes: dict[str, float]
    replans: int
    decisions: list[Decision] = field(default_factory=list)
    infeasible_tokens: int = 0  # tokens run with some device over its memory
    failed_decisions: int = 0  # planner runs that found no placement fitting memory
    failure: str | None = None  # why generation stopped early, if it did
    placements: list[np.ndarray] = field(default_factory=list, repr=False)

    @property
    def total_s(self) -> float:
        """Decode time plus migration stalls (s)."""
        return float(sum(self.per_token_s) + self.migration_s)

    def record(self) -> RunRecord:
        """The run as every backend records it (the cost model's prediction is the run)."""
        tokens = [TokenRecord(0, float(t), float(t), 0, 0) for t in self.per_token_s]
        result = RunResult(
            self.algorithm,
            tokens=tokens,
            migrations=self.migrations,
            migration_s=float(self.migration_s),
            replans=self.replans,
            failed_replans=self.failed_decisions,
            peak_memory_bytes={k: float(v) for k, v in self.peak_memory_bytes.items()},
            failure=self.failure,
        )
        return RunRecord(result, "sim", telemetry="configured")

    def to_json(self) -> dict:
        """The CLI's ``simulate --json`` object (DESIGN's keys, exactly)."""
        return self.record().to_json()


def recovery_s(
    table: BlockTable, view: ResourceView, lost: np.ndarray, placement: np.ndarray, n: int
) -> float:
    """Time (s) to rebuild lost blocks' state: their FLOPs over the n cached positions, batched."""
    if not lost.any():
        return 0.0
    flops = table.flops(n / 2) * n
    speed = view.compute_gflops[placement[lost]] * cost.GFLOP
    per_device = np.bincount(placement[lost], weights=flops[lost] / speed, minlength=view.size)
    return float(per_device.max())


def apply_due_traces(state: WorldState, pending: list[Trace], token: int, clock_s: float) -> None:
    """Apply (and drop from ``pending``) the traces due before generated token ``token``."""
    due = [
        t
        for t in pending
        if (t.at_token is not None and t.at_token <= token)
        or (t.at_s is not None and t.at_s <= clock_s)
    ]
    for trace in due:
        state.apply(trace)
        pending.remove(trace)


def initial_state(scenario: Scenario) -> tuple[WorldState, list[Trace]]:
    """The world when generation starts (traces at token 0 applied) and the traces still due."""
    state = WorldState.from_scenario(scenario)
    pending = list(scenario.traces)
    apply_due_traces(state, pending, 0, 0.0)
    return state, pending


def simulate(
    scenario: Scenario,
    algorithm: PlacementAlgorithm,
    progress: Callable[[int, int], None] | None = None,
) -> SimResult:
    """Run the scenario's generation under an algorithm on the virtual clock."""
    table = block_table(scenario.model_spec())
    state, pending = initial_state(scenario)
    every = scenario.replan_every
    final = scenario.final_context
    n = scenario.prompt_tokens
    clock = 0.0

    def window() -> PlanningWindow:
        return planning_window(n, every, final)

    result = SimResult(algorithm.name, [], 0.0, 0, {name: 0.0 for name in state.names}, 0)
    try:
        placement = algorithm.place(state.view(scenario, window()), table, None)
    except NoFeasiblePlacement as exc:
        result.failed_decisions += 1
        result.failure = f"initial placement: {exc}"
        return result
    result.placements.append(placement.assignment)
    decided_on = state.view(scenario, window())
    for i in range(scenario.generate_tokens):
        apply_due_traces(state, pending, i, clock)
        view = state.view(scenario, window())
        x = placement.assignment
        lost = ~view.alive[x]
        fits_now = bool(cost.fits(table, view, x, n + 1))
        due = scheduled(i, every, algorithm.replans, decided_on, view)
        if due or lost.any() or not fits_now:
            decided_on = view
            forced = bool(lost.any() or not fits_now)
            current = None if (forced and not algorithm.replans) else placement
            try:
                new = algorithm.place(view, table, current)
            except NoFeasiblePlacement as exc:
                result.failed_decisions += 1
                if lost.any():
                    result.failure = f"token {i}: {exc}"
                    break
                new = placement  # keep the old placement; tokens over memory are counted
            else:
                cur = np.where(lost, -1, x)
                stall = float(cost.migration_s(table, view, cur, new.assignment, n))
                stall += recovery_s(table, view, lost, new.assignment, n)
                moved = int((new.assignment != x).sum())
                result.decisions.append(
                    Decision(
                        token=i,
                        context=n,
                        forced=forced,
                        objective_s=float(
                            cost.interval_objective_s(table, view, new.assignment, cur)
                        ),
                        moved_blocks=moved,
                        migration_s=stall,
                        per_token_s=float(cost.per_token_s(table, view, new.assignment, n + 1)),
                    )
                )
                result.replans += 1
                result.migrations += moved
                result.migration_s += stall
                clock += stall
                placement = new
                result.placements.append(new.assignment)
        n += 1
        x = placement.assignment
        if not cost.fits(table, view, x, n):
            result.infeasible_tokens += 1
        dt = float(cost.per_token_s(table, view, x, n))
        result.per_token_s.append(dt)
        clock += dt
        memory = cost.memory_use(table, view, x, n)
        for name, used in zip(state.names, memory, strict=True):
            result.peak_memory_bytes[name] = max(result.peak_memory_bytes[name], float(used))
        if progress is not None:
            progress(i + 1, scenario.generate_tokens)
    return result


@dataclass(frozen=True)
class FirstDecision:
    """An algorithm's placement from a scenario's initial state."""

    placement: Placement
    objective_s: float  # interval objective (migration + decode until the next re-plan)
    mapping: dict[str, str]  # block name -> device name, pinned source blocks included


def first_decision(scenario: Scenario, algorithm: PlacementAlgorithm) -> FirstDecision:
    """The algorithm's placement from the scenario's initial state (raises NoFeasiblePlacement)."""
    table = block_table(scenario.model_spec())
    state, _ = initial_state(scenario)
    view = state.view(
        scenario,
        PlanningWindow(scenario.prompt_tokens, scenario.replan_every, scenario.final_context),
    )
    placement = algorithm.place(view, table, None)
    objective = float(cost.interval_objective_s(table, view, placement.assignment, None))
    return FirstDecision(placement, objective, placement.to_dict(table, view.devices, view.source))


def place_model(
    scenario: Scenario,
    algorithm: PlacementAlgorithm,
    spec: ModelSpec,
    prompt_tokens: int,
    new_tokens: int,
) -> dict[str, str]:
    """Block name -> device name for running ``spec`` on the scenario's devices as they start.

    The model may differ from the scenario's own (``generate`` runs the model it is given).
    """
    table = block_table(spec)
    state, _ = initial_state(scenario)
    window = PlanningWindow(prompt_tokens, scenario.replan_every, prompt_tokens + new_tokens)
    view = state.view(scenario, window)
    return algorithm.place(view, table, None).to_dict(table, view.devices, view.source)
