"""Forced re-plans: the fewest relocated bytes within FORCED_SLACK of the best objective."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

from edgepart.controller import cost
from edgepart.controller.placement import Placement
from edgepart.controller.placement.forced import FORCED_SLACK, is_forced, relocated_bytes
from edgepart.controller.placement.myopic import MyopicPlanner
from edgepart.controller.placement.optimal import OptimalPlanner
from edgepart.controller.view import PlanningWindow, ResourceView
from edgepart.llm.blocks import block_table
from edgepart.llm.model import ModelSpec

TABLE = block_table(
    ModelSpec("t2", layers=2, d_model=2048, heads=4, kv_heads=2, d_ff=8192, vocab=1000)
)
DEVICES = 3
ALL = np.array(list(itertools.product(range(DEVICES), repeat=TABLE.size)))
PLANNERS = {
    "myopic": MyopicPlanner,
    "myopic-heuristic": lambda: MyopicPlanner(exact=False),
    "optimal": OptimalPlanner,
}


def roomy_view(seed: int) -> ResourceView:
    """Three devices with memory for twice the model each, random speeds and links."""
    rng = np.random.default_rng(seed)
    window = PlanningWindow(64, 8, 200)
    total = TABLE.memory_bytes(window.final_context).sum() + TABLE.source_weight_bytes
    bw = rng.uniform(50, 2000, (DEVICES, DEVICES))
    lat = rng.uniform(0.0005, 0.003, (DEVICES, DEVICES))
    return ResourceView(
        tuple(f"d{i}" for i in range(DEVICES)),
        rng.uniform(5, 20, DEVICES),
        np.full(DEVICES, 2.0 * total),
        (bw + bw.T) / 2,
        (lat + lat.T) / 2,
        0,
        window,
    )


def spread_current(view: ResourceView) -> np.ndarray:
    """The fastest fresh placement that uses every device (a realistic current placement)."""
    objective = cost.interval_objective_s(TABLE, view, ALL, None)
    spread = np.array([np.unique(x).size == DEVICES for x in ALL])
    return ALL[np.argmin(np.where(spread, objective, np.inf))]


def brute_force(view: ResourceView, cur: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Every placement's objective and relocated bytes, and the optimum."""
    objective = cost.interval_objective_s(TABLE, view, ALL, cur)
    return objective, relocated_bytes(TABLE, view, ALL, cur), float(objective.min())


def cut_memory(view: ResourceView, cur: np.ndarray, device: int, keep: float) -> ResourceView:
    """The view with device's memory cut to keep x what its blocks use at the horizon's end."""
    use = cost.memory_use(TABLE, view, cur, view.window.interval_end_context)[device]
    memory = view.memory_bytes.copy()
    memory[device] = keep * use
    return replace(view, memory_bytes=memory)


def assert_least_relocation(view: ResourceView, cur: np.ndarray, chosen: np.ndarray) -> None:
    objective, moved, best = brute_force(view, cur)
    within = objective <= (1 + FORCED_SLACK) * best
    got = cost.interval_objective_s(TABLE, view, chosen, cur)
    assert got <= (1 + FORCED_SLACK) * best * (1 + 1e-9)
    assert relocated_bytes(TABLE, view, chosen, cur) == pytest.approx(moved[within].min(), rel=1e-6)


@pytest.mark.parametrize("name", PLANNERS)
@pytest.mark.parametrize("seed", range(8))
def test_memory_cut_relocates_the_fewest_bytes_within_the_slack(name, seed):
    view = roomy_view(seed)
    cur = spread_current(view)
    device = 1 + seed % (DEVICES - 1)  # a helper device, not the source
    cut = cut_memory(view, cur, device, keep=0.5)
    assert is_forced(TABLE, cut, cur)
    chosen = PLANNERS[name]().place(cut, TABLE, Placement(cur)).assignment
    assert_least_relocation(cut, cur, chosen)


def repairable_cuts(count: int) -> list[tuple[ResourceView, np.ndarray, int]]:
    """Memory cuts on a helper device where moving only its blocks is within the slack.

    Current placement: the optimum of the uncut view among those using every device.
    """
    found = []
    for seed in itertools.count(100):
        view = roomy_view(seed)
        cur = spread_current(view)
        device = 1 + seed % (DEVICES - 1)
        cut = cut_memory(view, cur, device, keep=0.7)
        objective, _, best = brute_force(cut, cur)
        repairs = ((cur == ALL) | (cur == device)).all(axis=1)
        if (objective[repairs] <= (1 + FORCED_SLACK) * best).any():
            found.append((cut, cur, device))
            if len(found) == count:
                return found
    raise AssertionError("unreachable")


REPAIRABLE = repairable_cuts(6)


@pytest.mark.parametrize("name", PLANNERS)
@pytest.mark.parametrize("case", range(len(REPAIRABLE)))
def test_memory_cut_moves_only_blocks_off_that_device(name, case):
    """When a repair (only the cut device's blocks move) is within the slack, nothing else
    moves."""
    cut, cur, device = REPAIRABLE[case]
    chosen = PLANNERS[name]().place(cut, TABLE, Placement(cur)).assignment
    assert ((chosen == cur) | (cur == device)).all()
    assert_least_relocation(cut, cur, chosen)


@pytest.mark.parametrize("name", PLANNERS)
@pytest.mark.parametrize("seed", range(4))
def test_dead_device_keeps_every_other_block_in_place_when_that_is_within_the_slack(name, seed):
    view = roomy_view(200 + seed)
    cur = spread_current(view)
    alive = np.ones(DEVICES, dtype=bool)
    alive[1 + seed % (DEVICES - 1)] = False
    dead = replace(view, alive=alive)
    lost = np.where(alive[cur], cur, -1)
    assert is_forced(TABLE, dead, lost)
    chosen = PLANNERS[name]().place(dead, TABLE, Placement(cur)).assignment
    assert alive[chosen].all()
    objective, moved, best = brute_force(dead, lost)
    within = objective <= (1 + FORCED_SLACK) * best
    assert cost.interval_objective_s(TABLE, dead, chosen, lost) <= (1 + FORCED_SLACK) * best * (
        1 + 1e-9
    )
    assert relocated_bytes(TABLE, dead, chosen, lost) == pytest.approx(
        moved[within].min(), rel=1e-6, abs=1.0
    )


def test_a_placement_that_fits_is_not_forced():
    view = roomy_view(0)
    cur = spread_current(view)
    assert not is_forced(TABLE, view, cur)
    assert not is_forced(TABLE, view, None)
