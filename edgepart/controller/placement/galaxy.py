"""Galaxy (arXiv 2405.17245): a static head-level split in proportion to compute speed.

Galaxy runs attention head-parallel across devices, in proportion to their speed, with
the same split in every layer, and the MLP tensor-parallel. Here:

1. In every layer the KV groups are split over the usable devices in proportion to their
   available GFLOP/s (largest remainder; devices too slow to earn a group get none),
   fastest devices taking the lowest group indices.
2. Our projection and FFN blocks are indivisible (no tensor parallelism), so each goes to
   the fastest device that can hold it next to the projections/FFNs already placed there.
3. Memory must hold until the end of generation (``window.final_context``, KV included):
   a device that overflows sheds KV groups, last layer first, each to the next slower
   device with room (wrapping round to the faster devices if no slower one has room).
   The per-layer split then differs in the layers whose groups moved.
"""

from __future__ import annotations

import numpy as np

from edgepart.controller.placement.base import NoFeasiblePlacement, Placement
from edgepart.controller.placement.layers import pinned_bytes, proportional_split, require_source
from edgepart.controller.view import ResourceView
from edgepart.llm.blocks import BlockKind, BlockTable


def galaxy_placement(view: ResourceView, model: BlockTable) -> Placement:
    """Galaxy's speed-proportional head split, repaired to fit at the final context."""
    require_source(view, model)
    n = view.window.final_context
    # devices fastest first, and how many KV groups of each layer each gets by speed
    order, counts = proportional_split(view, view.compute_gflops, model.groups, "galaxy")
    size = model.memory_bytes(n)
    room = view.memory_bytes - pinned_bytes(view, model)
    assignment = np.full(model.size, -1, dtype=np.int64)

    slot_device = np.repeat(order, counts)  # group g of any layer -> its device
    for layer in range(model.spec.layers):
        assignment[model.group_ids(layer)] = slot_device

    fixed = np.zeros(view.size)  # projection/FFN bytes per device: groups may not evict them
    for block in np.flatnonzero(model.kind != BlockKind.HEADS):
        hosts = [d for d in order if fixed[d] + size[block] <= room[d]]
        if not hosts:
            raise NoFeasiblePlacement(
                f"galaxy: block {model.names[block]} ({size[block]:.0f} bytes) fits no "
                "usable device"
            )
        assignment[block] = hosts[0]
        fixed[hosts[0]] += size[block]

    load = np.bincount(assignment, weights=size, minlength=view.size)
    # Groups of later layers move first; within a layer the highest group index first.
    groups_desc = np.flatnonzero(model.kind == BlockKind.HEADS)[::-1]
    for rank, d in enumerate(order):
        targets = np.concatenate([order[rank + 1 :], order[:rank]])
        for block in groups_desc:
            if load[d] <= room[d]:
                break
            if assignment[block] != d:
                continue
            dest = next((e for e in targets if load[e] + size[block] <= room[e]), None)
            if dest is None:
                raise NoFeasiblePlacement(
                    f"galaxy: device {view.devices[d]!r} overflows at final context {n} and "
                    "no usable device has room for its KV groups"
                )
            assignment[block] = dest
            load[d] -= size[block]
            load[dest] += size[block]
    return Placement(assignment)


class GalaxyPlanner:
    """Static speed-proportional head-level split (Galaxy); ignores ``current``."""

    name = "galaxy"
    replans = False

    def place(
        self, view: ResourceView, model: BlockTable, current: Placement | None
    ) -> Placement:
        """The Galaxy split for the view, fitting memory until the end of generation."""
        return galaxy_placement(view, model)
