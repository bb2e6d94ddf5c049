"""Planners from other installed packages: the ``edgepart.planners`` entry-point group.

A distribution adds a planner with one entry in its ``pyproject.toml``::

    [project.entry-points."edgepart.planners"]
    round-robin = "my_planners.round_robin:RoundRobinPlanner"

The object named is called with no arguments and returns a ``PlacementAlgorithm``
(``edgepart.controller.placement.base``): ``name``, ``replans`` and
``place(view, model, current)``. Its name then works wherever a built-in's does
(``--algorithm``, ``plan``, ``simulate``, ``emulate``). A built-in name cannot be taken.

Every placement a plugin returns is checked before anything acts on it
(``checked_placement``): one device index per block, each a device that is alive, and
every device's memory holding its blocks until the view's window ends. A plugin that
breaks that, or raises, fails with ``PluginError`` naming the plugin and its distribution;
``NoFeasiblePlacement`` passes through as from a built-in.
"""

from __future__ import annotations

from functools import cache
from importlib import metadata

import numpy as np

from edgepart.controller.cost import memory_use
from edgepart.controller.placement.base import NoFeasiblePlacement, Placement, PlacementAlgorithm
from edgepart.controller.view import ResourceView
from edgepart.llm.blocks import BlockTable

GROUP = "edgepart.planners"

__all__ = [
    "GROUP",
    "CheckedPlanner",
    "PluginError",
    "load_plugin",
    "placement_problem",
    "plugin_names",
]


class PluginError(RuntimeError):
    """A plugin planner could not be loaded, raised, or returned a placement that cannot
    run; the message names the plugin and its distribution."""


@cache
def _entry_points() -> dict[str, metadata.EntryPoint]:
    found: dict[str, metadata.EntryPoint] = {}
    for entry in metadata.entry_points(group=GROUP):
        found.setdefault(entry.name, entry)  # the first installed wins, as for scripts
    return found


def plugin_names(builtin: frozenset[str] = frozenset()) -> list[str]:
    """The names of the installed plugin planners, built-in names left out."""
    return sorted(name for name in _entry_points() if name not in builtin)


def _origin(entry: metadata.EntryPoint) -> str:
    dist = entry.dist
    where = f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"
    return f"plugin {entry.name!r} ({entry.value}, from {where})"


def load_plugin(name: str) -> PlacementAlgorithm:
    """A fresh instance of the plugin planner ``name``, its placements checked; KeyError
    when no plugin has that name, PluginError when it does not load."""
    entry = _entry_points().get(name)
    if entry is None:
        raise KeyError(name)
    origin = _origin(entry)
    try:
        planner = entry.load()()
    except Exception as exc:  # anything a foreign package raises: it did not load
        raise PluginError(f"{origin} failed to load: {exc!r}") from exc
    missing = [a for a in ("name", "replans", "place") if not hasattr(planner, a)]
    if missing:
        raise PluginError(f"{origin} is not a PlacementAlgorithm: it has no {', '.join(missing)}")
    return CheckedPlanner(planner, name, origin)


class CheckedPlanner:
    """A plugin planner whose every placement is checked before it is used."""

    def __init__(self, inner: PlacementAlgorithm, name: str, origin: str) -> None:
        self.inner = inner
        self.name = name  # what --algorithm said, whatever the plugin calls itself
        self.replans = bool(inner.replans)
        self.origin = origin

    def place(self, view: ResourceView, model: BlockTable, current: Placement | None) -> Placement:
        """The plugin's placement; PluginError when it raised or returned one that cannot
        run."""
        try:
            placement = self.inner.place(view, model, current)
        except NoFeasiblePlacement:
            raise
        except Exception as exc:  # a foreign planner's bug: named, not a controller crash
            raise PluginError(f"{self.origin} raised {exc!r}") from exc
        problem = placement_problem(view, model, placement)
        if problem is not None:
            raise PluginError(f"{self.origin} returned a placement that cannot run: {problem}")
        return placement


def placement_problem(view: ResourceView, model: BlockTable, placement: object) -> str | None:
    """Why a placement cannot run on the view's devices (None: it can)."""
    if not isinstance(placement, Placement):
        return f"a {type(placement).__name__}, not a Placement"
    x = placement.assignment
    if x.shape != (model.size,):
        return f"{x.shape[0] if x.ndim == 1 else x.shape} device indices for {model.size} blocks"
    if len(x) and (x.min() < 0 or x.max() >= view.size):
        return f"device indices outside 0..{view.size - 1}"
    dead = sorted({view.devices[d] for d in x if not view.alive[d]})
    if dead:
        return f"blocks on devices that are gone: {', '.join(dead)}"
    n = view.window.interval_end_context
    used = memory_use(model, view, x, n)
    over = np.flatnonzero(used > view.memory_bytes)
    if len(over):
        worst = ", ".join(
            f"{view.devices[d]} {used[d]:.0f} of {view.memory_bytes[d]:.0f} bytes" for d in over
        )
        return f"over memory at context {n}: {worst}"
    return None
