"""Placement algorithms, one module each, all behind ``place(view, model, current)``.

- ``base``: the ``PlacementAlgorithm`` protocol and the ``Placement`` it returns.
- Planners: ``myopic`` (the paper's policy, re-planned), ``optimal`` (the same decision as
  a MILP on HiGHS), ``static_heads``, ``edgeshard``, ``memory_proportional``, ``galaxy``.
- The myopic planner's parts: ``seeds`` (placements built directly), ``scored_placement``
  (incremental pricing of moves) and ``local_search`` (the descent from each seed).
- ``layers``: contiguous layer splits, shared by the layer baselines and the myopic seeds.
"""

from __future__ import annotations

from collections.abc import Callable

from controller.placement.base import NoFeasiblePlacement, Placement, PlacementAlgorithm
from controller.placement.edgeshard import EdgeShardPlanner
from controller.placement.galaxy import GalaxyPlanner
from controller.placement.memory_proportional import MemoryProportionalPlanner
from controller.placement.myopic import MyopicPlanner
from controller.placement.optimal import OptimalPlanner
from controller.placement.static_heads import StaticHeadsPlanner

ALGORITHMS: dict[str, Callable[[], PlacementAlgorithm]] = {
    "myopic": MyopicPlanner,
    "optimal": OptimalPlanner,
    "static-heads": StaticHeadsPlanner,
    "edgeshard": EdgeShardPlanner,
    "memory-proportional": MemoryProportionalPlanner,
    "galaxy": GalaxyPlanner,
}

LAYER_METHODS = ("edgeshard", "memory-proportional")


def make_algorithm(name: str) -> PlacementAlgorithm:
    """A fresh instance of the named algorithm; raises KeyError naming the known ones."""
    try:
        return ALGORITHMS[name]()
    except KeyError:
        raise KeyError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)}") from None


__all__ = [
    "ALGORITHMS",
    "LAYER_METHODS",
    "NoFeasiblePlacement",
    "Placement",
    "PlacementAlgorithm",
    "make_algorithm",
]
