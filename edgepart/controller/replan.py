"""When a planner runs again: the shared policy of the simulator and the live controller."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgepart.controller import cost
from edgepart.controller.cost import interval_objective_s
from edgepart.controller.payback import (
    DEFAULT_PERSISTENCE_INTERVALS,
    ChangeHistory,
    SwitchCalibration,
    SwitchEstimate,
)
from edgepart.controller.payback import worth_switching as payback_worth
from edgepart.controller.placement import NoFeasiblePlacement, Placement, PlacementAlgorithm
from edgepart.controller.switch import SwitchPlan, plan_switch
from edgepart.controller.view import PlanningWindow, ResourceView
from edgepart.llm.blocks import BlockTable

#: relative change of a device's available compute or a link's bandwidth, since the last
#: decision, that makes a re-planning algorithm re-plan before its next scheduled turn
REPLAN_ON_CHANGE = 0.2
#: on live telemetry, a voluntary switch must save at least this fraction of the interval's
#: delay with the current placement: measured speeds and latencies jitter by about as much,
#: and a switch that chases the jitter pays real migrations for an imagined gain
LIVE_MIN_GAIN = 0.05


def planning_window(context: int, every: int, final: int) -> PlanningWindow:
    """The window of a decision at ``context`` cached positions (re-plans every ``every``
    tokens, generation ends at ``final``): a switch may pay back over the rest of the
    generation, not only the interval, since its placement stays until something changes
    (a one-interval payback leaves the planner on a slowed device for the whole run)."""
    return PlanningWindow(context, every, max(final, context), payback_tokens=final - context)


def resources_changed(before: ResourceView, now: ResourceView, threshold: float) -> bool:
    """Whether a device's GFLOP/s or a link's Mbit/s moved by at least threshold (relative)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        compute = np.abs(now.compute_gflops - before.compute_gflops) / before.compute_gflops
        links = np.abs(now.bandwidth_mbit - before.bandwidth_mbit) / before.bandwidth_mbit
    return bool(
        (np.nan_to_num(compute) >= threshold).any() or (np.nan_to_num(links) >= threshold).any()
    )


def scheduled(
    token: int, every: int, replans: bool, before: ResourceView, now: ResourceView
) -> bool:
    """Whether a re-planning algorithm's turn has come before generated token ``token``."""
    return replans and (
        (token > 0 and token % every == 0) or resources_changed(before, now, REPLAN_ON_CHANGE)
    )


def worth_switching(
    table: BlockTable,
    view: ResourceView,
    new: np.ndarray,
    current: np.ndarray,
    min_gain: float = LIVE_MIN_GAIN,
) -> bool:
    """Whether moving to ``new`` (migrations included) beats keeping ``current`` over the
    interval by more than ``min_gain`` of the current placement's delay."""
    keep, move = interval_objective_s(table, view, np.stack([current, new]), current)
    if not np.isfinite(move):
        return False
    return bool(not np.isfinite(keep) or move < (1.0 - min_gain) * keep)


def place(
    algorithm: PlacementAlgorithm,
    view: ResourceView,
    table: BlockTable,
    current: Placement | None,
) -> Placement:
    """The algorithm's decision with memory holding until the generation's end, or, where
    nothing fits that long, until the horizon's end (raises NoFeasiblePlacement)."""
    try:
        return algorithm.place(view, table, current)
    except NoFeasiblePlacement:
        if view.window.memory_tokens is not None:
            raise
        return algorithm.place(view.at(view.window.memory_to_horizon()), table, current)


#: tokens after start-up or a switch in which a change of the measured resources starts
#: no re-plan: the first measurements, and those of devices a switch emptied or filled,
#: move by more than REPLAN_ON_CHANGE while nothing changed in the world
SETTLE_TOKENS = 2


@dataclass
class ReplanPolicy:
    """When to re-plan and whether to switch: one policy for the simulator and the live
    controller, fed the same views, so both decide alike on the same telemetry.

    Re-plans come every ``every`` tokens and when a resource moved by REPLAN_ON_CHANGE
    since the last decision, never within one interval of the last unforced switch; the
    horizon is the tokens left cut to how long changes have lasted (``ChangeHistory``);
    a switch must pay ``alpha`` x its stall over that horizon (``payback``).
    """

    every: int
    final_context: int
    replans: bool = True
    history: ChangeHistory = field(default_factory=ChangeHistory)
    calibration: SwitchCalibration = field(default_factory=SwitchCalibration)
    decided_on: ResourceView | None = None
    settled_at: int = SETTLE_TOKENS  # from this token on, changes start re-plans
    last_switch: int | None = None  # token of the last unforced switch

    def observe(self, token: int, view: ResourceView) -> None:
        """The resources seen before generated token ``token``."""
        if token < self.settled_at or self.decided_on is None:
            self.history.rebase(token, view.compute_gflops, view.bandwidth_mbit)
            self.decided_on = view
            return
        self.history.observe(token, view.compute_gflops, view.bandwidth_mbit)

    def window(self, token: int, context: int) -> PlanningWindow:
        """The window of a decision before ``token`` at ``context`` cached positions."""
        left = max(0, self.final_context - context)
        default = DEFAULT_PERSISTENCE_INTERVALS * self.every
        horizon = min(left, self.history.expected_persistence(token, default))
        return PlanningWindow(
            context, self.every, max(self.final_context, context), payback_tokens=horizon
        )

    def due(self, token: int, view: ResourceView) -> bool:
        """Whether a re-planning algorithm's turn has come before generated ``token``."""
        if not self.replans:
            return False
        if self.last_switch is not None and token - self.last_switch < self.every:
            return False
        if token > 0 and token % self.every == 0:
            return True
        before = self.decided_on
        return before is not None and resources_changed(before, view, REPLAN_ON_CHANGE)

    def decided(self, view: ResourceView) -> None:
        """A decision was taken on ``view``: changes count from it."""
        self.decided_on = view

    def estimate(self, table: BlockTable, view: ResourceView, plan: SwitchPlan) -> SwitchEstimate:
        """What carrying ``plan`` out costs and saves, on the view's window: the per-token
        delay before and after (inf where memory does not hold over the horizon), the
        plan's prepare time and commit stall."""
        w = view.window
        pair = np.stack([plan.current, plan.target])
        fits = cost.fits(table, view, pair, w.interval_end_context)
        token_s = np.where(fits, cost.per_token_s(table, view, pair, w.mean_context), np.inf)
        return SwitchEstimate(
            current_token_s=float(token_s[0]),
            new_token_s=float(token_s[1]),
            prepare_s=plan.prepare_s,
            commit_s=plan.commit_s,
            horizon_tokens=w.horizon_tokens,
            tokens_left=max(1, w.final_context - w.context_tokens),
            waves=len(plan.waves),
        )

    def accept(self, estimate: SwitchEstimate, forced: bool) -> bool:
        """Whether to carry out the switch (always when forced by memory or a failure)."""
        return forced or payback_worth(estimate, self.calibration.alpha)

    def weigh(
        self,
        table: BlockTable,
        view: ResourceView,
        current: np.ndarray,
        new: np.ndarray,
        context: int,
        reported_bytes: np.ndarray | None = None,
    ) -> SwitchPlan | None:
        """The unforced switch from ``current`` to ``new`` (device per block) at ``context``
        cached positions, in waves (``plan_switch``; ``reported_bytes``: what the agents
        report holding), if it pays; None to stay. The one gate of the simulator and the
        live controller."""
        if np.array_equal(current, new):
            return None
        plan = plan_switch(current, new, view, table, context, reported_bytes)
        if not plan.waves or not self.accept(self.estimate(table, view, plan), forced=False):
            return None
        return plan

    def switched(self, token: int, forced: bool) -> None:
        """A switch was committed before generated ``token``."""
        if not forced:
            self.last_switch = token
        self.settled_at = token + SETTLE_TOKENS

    def measured(self, predicted_s: float, measured_s: float) -> None:
        """A committed switch's predicted and measured stall (s): alpha follows."""
        self.calibration.record(predicted_s, measured_s)
