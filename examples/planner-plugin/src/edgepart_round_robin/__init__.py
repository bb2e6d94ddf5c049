"""A minimal edgepart planner plugin: every block dealt to the devices in turn.

It implements ``edgepart.controller.placement.PlacementAlgorithm``: a ``name``, whether it
``replans``, and a pure ``place(view, model, current)`` that returns one device index per
placeable block (``model.names``). Memory must hold until the view's window ends
(``view.window.interval_end_context`` cached positions), on devices that are alive;
edgepart checks both and fails the run naming this plugin when they do not.
"""

from __future__ import annotations

import numpy as np

from edgepart.controller.placement import NoFeasiblePlacement, Placement
from edgepart.controller.view import ResourceView
from edgepart.llm.blocks import BlockTable

__all__ = ["RoundRobinPlanner"]


class RoundRobinPlanner:
    """Block i goes to the i-th usable device in turn, skipping one whose memory is full."""

    name = "round-robin"
    replans = False  # decided once (and again only when a device is lost)

    def place(self, view: ResourceView, model: BlockTable, current: Placement | None) -> Placement:
        """One device index per block of ``model``; NoFeasiblePlacement when a block fits
        nowhere. ``current`` (the placement running now, or None) is not needed here."""
        need = model.memory_bytes(view.window.interval_end_context)
        room = np.asarray(view.memory_bytes, dtype=float).copy()
        room[view.source] -= model.source_weight_bytes  # embedding and LM head live there
        usable = [int(d) for d in np.flatnonzero(view.usable)]
        assignment = np.empty(model.size, dtype=np.int64)
        turn = 0
        for block, bytes_ in enumerate(need):
            for step in range(len(usable)):
                device = usable[(turn + step) % len(usable)]
                if room[device] >= bytes_:
                    break
            else:
                raise NoFeasiblePlacement(f"{model.names[block]} fits on no device")
            assignment[block] = device
            room[device] -= bytes_
            turn = usable.index(device) + 1
        return Placement(assignment)
