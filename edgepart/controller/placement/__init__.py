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

plugins: planners of other installed packages (the ``edgepart.planners`` entry points),
their placements checked.

``ALGORITHMS`` names the built-in planners, ``algorithm_names`` these and the plugins' for the
command line and the backends; ``make_algorithm`` makes a fresh one of either.

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
from edgepart.controller.placement.plugins import PluginError, load_plugin, plugin_names
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


def algorithm_names() -> list[str]:
    """Every planner a run can name: the built-ins, then the installed plugins'."""
    return [*ALGORITHMS, *plugin_names(frozenset(ALGORITHMS))]


def make_algorithm(name: str) -> PlacementAlgorithm:
    """A fresh instance of the named algorithm, built-in or plugin; raises KeyError naming
    the known ones (PluginError when a plugin does not load)."""
    if name in ALGORITHMS:
        return ALGORITHMS[name]()
    try:
        return load_plugin(name)
    except KeyError:
        known = ", ".join(algorithm_names())
        raise KeyError(f"unknown algorithm {name!r}; known: {known}") from None


__all__ = [
    "ALGORITHMS",
    "LAYER_METHODS",
    "NoFeasiblePlacement",
    "Placement",
    "PlacementAlgorithm",
    "PluginError",
    "algorithm_names",
    "make_algorithm",
]
