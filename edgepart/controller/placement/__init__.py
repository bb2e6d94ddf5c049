"""Placement algorithms, one module each, all behind ``place(view, model, current)``.

base: the ``PlacementAlgorithm`` protocol and the ``Placement`` it returns.

The planners:

myopic: the paper's policy: resource-aware head-level placement, re-planned.
optimal: the same decision as a mixed-integer program on HiGHS.
static_heads: myopic's head-level placement, decided once and never migrated.
edgeshard: EdgeShard's latency-optimal contiguous layer split.
memory_proportional: the layer split in proportion to memory (exo, llama.cpp RPC).
galaxy: Galaxy's static head-level split in proportion to compute speed.

Their parts:

seeds: myopic's seeds, placements built directly.
scored_placement: a placement that prices moves of a few blocks incrementally.
local_search: myopic's descent from each seed on the exact objective.
forced: forced re-plans relocate the fewest bytes within a slack of the best (shared with
optimal).
layers: contiguous layer splits, shared by the layer baselines and myopic's seeds.

``ALGORITHMS`` names every planner for the command line and the backends; ``make_algorithm``
makes a fresh one.

Imports: ``edgepart.llm.blocks``, ``edgepart.controller.view`` and ``edgepart.controller.cost`` only
(pure: no I/O, no MQTT); the live controller and the simulator build on the planners, never the
reverse.
"""

from __future__ import annotations

from collections.abc import Callable

from edgepart.controller.placement.base import NoFeasiblePlacement, Placement, PlacementAlgorithm
from edgepart.controller.placement.edgeshard import EdgeShardPlanner
from edgepart.controller.placement.galaxy import GalaxyPlanner
from edgepart.controller.placement.memory_proportional import MemoryProportionalPlanner
from edgepart.controller.placement.myopic import MyopicPlanner
from edgepart.controller.placement.optimal import OptimalPlanner
from edgepart.controller.placement.static_heads import StaticHeadsPlanner

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
