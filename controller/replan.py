"""When a planner runs again: the shared policy of the simulator and the live controller."""

from __future__ import annotations

import numpy as np

from controller.cost import interval_objective_s
from controller.view import PlanningWindow, ResourceView
from llm.blocks import BlockTable

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
