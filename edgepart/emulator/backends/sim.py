"""The ``sim`` backend: replays a scenario token by token on a virtual clock with the cost model.

Per generated token it applies the traces that are due and follows the live controller's
policy (``edgepart.controller.replan.ReplanPolicy``) with the cost model's times: a due re-plan
is planned at one boundary and weighed at the next (the live controller plans while a
token runs); a switch that pays is prepared in the background for its predicted prepare
time and committed, wave after wave (``edgepart.controller.switch.plan_switch``), at the first
boundary after that, charging the commit as the stall; a placement that stops fitting is
switched at once (both phases a stall), a device holding blocks that dies is recovered
(the survivors' moves, the lost blocks' loads and the re-prefill). It records every
token's latency and every device's memory. Prefill is not part of the per-token series.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edgepart.controller import cost, switch
from edgepart.controller.placement import NoFeasiblePlacement, Placement, PlacementAlgorithm
from edgepart.controller.replan import ReplanPolicy, place
from edgepart.controller.result import RunRecord, RunResult, SwitchRecord, TokenRecord
from edgepart.controller.switch import SwitchPlan, plan_switch
from edgepart.controller.view import PlanningWindow, ResourceView
from edgepart.emulator.scenario import Scenario
from edgepart.emulator.world import apply_due_traces, initial_state
from edgepart.llm.blocks import BlockTable, block_table
from edgepart.llm.model import ModelSpec


@dataclass
class Decision:
    """One planner run during a simulation, and what came of it."""

    token: int  # index of the generated token it precedes
    context: int  # cached positions when it was taken
    forced: bool  # triggered by a failure or a memory shortfall, not the schedule
    objective_s: float  # objective of the chosen placement on the decision's window
    moved_blocks: int  # blocks the chosen placement moves (0 when it was not taken)
    migration_s: float  # the stall it was predicted to cost (commits, recovery), s
    per_token_s: float  # predicted delay of the next token, s
    taken: bool = True  # whether the switch was carried out (the gate may decline it)
    #: the placement the decision started from and the one it chose (device per block)
    current: np.ndarray | None = field(default=None, repr=False)
    chosen: np.ndarray | None = field(default=None, repr=False)
    window: PlanningWindow | None = None  # the window the planner saw


@dataclass
class SimResult:
    """What a simulated generation measured."""

    algorithm: str
    per_token_s: list[float]
    migration_s: float  # commits of switches (s)
    migrations: int
    peak_memory_bytes: dict[str, float]
    replans: int
    decisions: list[Decision] = field(default_factory=list)
    infeasible_tokens: int = 0  # tokens run with some device over its memory
    failed_decisions: int = 0  # planner runs that found no placement fitting memory
    failure: str | None = None  # why generation stopped early, if it did
    placements: list[np.ndarray] = field(default_factory=list, repr=False)
    #: the token before which each of ``placements`` took effect (0: the first)
    placement_tokens: list[int] = field(default_factory=list)
    stall_s: float = 0.0  # every stall between tokens: commits, forced switches, recovery
    switches: list[SwitchRecord] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        """Decode time plus every stall (s)."""
        return float(sum(self.per_token_s) + self.stall_s)

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
            stall_s=float(self.stall_s),
            switches=list(self.switches),
        )
        return RunRecord(result, "sim", telemetry="configured")

    def to_json(self) -> dict:
        """The CLI's ``simulate --json`` object (docs/design.md's keys, exactly)."""
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


@dataclass
class _Underway:
    """A switch being carried out: its plan, the wave prepared, when that wave is ready."""

    plan: SwitchPlan
    wave: int
    ready_at: float  # virtual clock, s


class _Simulation:
    """One generation on the virtual clock (see the module)."""

    def __init__(self, scenario: Scenario, algorithm: PlacementAlgorithm) -> None:
        self.scenario = scenario
        self.algorithm = algorithm
        self.table = block_table(scenario.model_spec())
        self.state, self.pending = initial_state(scenario)
        self.policy = ReplanPolicy(
            scenario.replan_every, scenario.final_context, replans=algorithm.replans
        )
        self.n = scenario.prompt_tokens  # cached positions
        self.clock = 0.0
        self.planned: Placement | None = None  # planned at the last boundary, weighed now
        self.underway: _Underway | None = None
        names = self.state.names
        self.result = SimResult(algorithm.name, [], 0.0, 0, {n: 0.0 for n in names}, 0)
        self.placement: Placement | None = None

    def view(self, token: int) -> ResourceView:
        return self.state.view(self.scenario, self.policy.window(token, self.n))

    def run(self, progress: Callable[[int, int], None] | None) -> SimResult:
        r = self.result
        try:
            self.placement = place(self.algorithm, self.view(0), self.table, None)
        except NoFeasiblePlacement as exc:
            r.failed_decisions += 1
            r.failure = f"initial placement: {exc}"
            return r
        r.placements.append(self.placement.assignment)
        r.placement_tokens.append(0)
        total = self.scenario.generate_tokens
        for i in range(total):
            apply_due_traces(self.state, self.pending, i, self.clock)
            view = self.view(i)
            self.policy.observe(i, view)
            stall = self.boundary(i, view)
            if r.failure is not None:
                break
            self.clock += stall
            r.stall_s += stall
            self.decode(view)
            if progress is not None:
                progress(i + 1, total)
        return r

    # -- a token boundary ----------------------------------------------------------------
    def boundary(self, i: int, view: ResourceView) -> float:
        """What happens before token ``i``; the stall it costs (s)."""
        assert self.placement is not None
        x = self.placement.assignment
        if (~view.alive[x]).any():
            self.planned = self.underway = None
            return self.recover(i, view)
        fits_now = bool(cost.fits(self.table, view, x, self.n + 1))
        stall = 0.0
        if self.underway is not None:
            if not fits_now or not view.alive[self.underway.plan.target].all():
                self.underway = None  # abandoned: its prepared copies are discarded
            elif self.clock >= self.underway.ready_at:
                stall += self.commit(i)
        if not fits_now:
            self.planned = None
            return stall + self.forced(i, view)
        if self.planned is not None:
            new, self.planned = self.planned, None
            if self.underway is None:
                self.weigh(i, view, new)
        if self.planned is None and self.underway is None and self.policy.due(i, view):
            self.policy.decided(view)
            self.planned = self.plan(i, view, self.placement, forced=False)
        return stall

    def plan(
        self, i: int, view: ResourceView, current: Placement | None, forced: bool
    ) -> Placement | None:
        """The algorithm's decision, recorded (None when nothing fits)."""
        r = self.result
        try:
            new = place(self.algorithm, view, self.table, current)
        except NoFeasiblePlacement:
            r.failed_decisions += 1
            return None
        r.replans += 1
        x = self.placement.assignment  # type: ignore[union-attr]
        r.decisions.append(
            Decision(
                token=i,
                context=self.n,
                forced=forced,
                objective_s=float(cost.interval_objective_s(self.table, view, new.assignment, x)),
                moved_blocks=int((new.assignment != x).sum()),
                migration_s=0.0,
                per_token_s=float(cost.per_token_s(self.table, view, new.assignment, self.n + 1)),
                taken=False,
                current=x,
                chosen=new.assignment,
                window=view.window,
            )
        )
        return new

    def weigh(self, i: int, view: ResourceView, new: Placement) -> None:
        """Start the switch to ``new`` (planned at the boundary before) if it pays."""
        x = self.placement.assignment  # type: ignore[union-attr]
        plan = self.policy.weigh(self.table, view, x, new.assignment, self.n)
        if plan is None:
            return
        self.result.decisions[-1].taken = True
        self.result.decisions[-1].migration_s = plan.commit_s
        self.underway = _Underway(plan, 0, self.clock + plan.waves[0].prepare_s)

    def commit(self, i: int) -> float:
        """Commit the prepared wave (the stall, s); prepare the next or close the switch."""
        u = self.underway
        assert u is not None and self.placement is not None
        wave = u.plan.waves[u.wave]
        moved = self.placement.assignment.copy()
        moved[list(wave.blocks)] = u.plan.target[list(wave.blocks)]
        self.move_to(i, Placement(moved), len(wave.blocks), wave.commit_s)
        u.wave += 1
        if u.wave < len(u.plan.waves):
            u.ready_at = self.clock + wave.commit_s + u.plan.waves[u.wave].prepare_s
            return wave.commit_s
        self.underway = None
        self.closed(i, u.plan, forced=False)
        return wave.commit_s

    def forced(self, i: int, view: ResourceView) -> float:
        """The placement no longer fits: plan and switch at once (both phases a stall)."""
        self.policy.decided(view)
        current = self.placement if self.algorithm.replans else None
        new = self.plan(i, view, current, forced=True)
        if new is None:
            return 0.0  # keep the placement; tokens over memory are counted
        x = self.placement.assignment  # type: ignore[union-attr]
        plan = plan_switch(x, new.assignment, view, self.table, self.n)
        stall = plan.prepare_s + plan.commit_s
        self.result.decisions[-1].taken = True
        self.result.decisions[-1].migration_s = stall
        self.move_to(i, new, plan.blocks, plan.commit_s)
        self.closed(i, plan, forced=True)
        return stall

    def recover(self, i: int, view: ResourceView) -> float:
        """Devices holding blocks died: re-place, move the survivors, load the lost blocks
        and re-run the history (the stall, s)."""
        assert self.placement is not None
        x = self.placement.assignment
        lost = ~view.alive[x]
        self.policy.decided(view)
        new = self.plan(i, view, self.placement, forced=True)
        if new is None:
            self.result.failure = f"token {i}: no placement on the surviving devices"
            return 0.0
        interim = switch.survivors_first(x, new.assignment, lost)
        survivors = plan_switch(x, interim, view, self.table, self.n)
        loads = cost.prepare_s(self.table, view, np.where(lost, -1, x), new.assignment)
        stall = survivors.prepare_s + survivors.commit_s + float(loads)
        stall += recovery_s(self.table, view, lost, new.assignment, self.n)
        self.result.decisions[-1].taken = True
        self.result.decisions[-1].migration_s = stall
        self.move_to(i, new, int((new.assignment != x).sum()), stall)
        return stall

    def move_to(self, i: int, new: Placement, blocks: int, stall_s: float) -> None:
        self.placement = new
        self.result.migrations += blocks
        self.result.migration_s += stall_s
        self.result.placements.append(new.assignment)
        self.result.placement_tokens.append(i)

    def closed(self, i: int, plan: SwitchPlan, forced: bool) -> None:
        """A switch is done: recorded, and the policy told (predicted = measured here)."""
        self.result.switches.append(
            SwitchRecord(
                i, plan.blocks, forced, plan.prepare_s, plan.prepare_s, plan.commit_s,
                plan.commit_s,
            )
        )  # fmt: skip
        self.policy.switched(i, forced)
        self.policy.measured(plan.commit_s, plan.commit_s)

    # -- a token -------------------------------------------------------------------------
    def decode(self, view: ResourceView) -> None:
        r = self.result
        self.n += 1
        x = self.placement.assignment  # type: ignore[union-attr]
        if not cost.fits(self.table, view, x, self.n):
            r.infeasible_tokens += 1
        dt = float(cost.per_token_s(self.table, view, x, self.n))
        r.per_token_s.append(dt)
        self.clock += dt
        memory = cost.memory_use(self.table, view, x, self.n)
        for name, used in zip(self.state.names, memory, strict=True):
            r.peak_memory_bytes[name] = max(r.peak_memory_bytes[name], float(used))


def simulate(
    scenario: Scenario,
    algorithm: PlacementAlgorithm,
    progress: Callable[[int, int], None] | None = None,
) -> SimResult:
    """Run the scenario's generation under an algorithm on the virtual clock."""
    return _Simulation(scenario, algorithm).run(progress)


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
