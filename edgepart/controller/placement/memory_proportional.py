"""The memory-proportional layer split of exo and llama.cpp RPC.

exo orders the devices by memory, largest first, and gives each a contiguous run of
layers in proportion to its memory; llama.cpp RPC's default tensor split is the same
proportion. Here the proportion is over the usable devices' available memory (the
source's pinned embedding/LM head are not subtracted, as in exo), rounded by largest
remainder (ties: earlier device in the order), ties in memory broken by device index.
Devices that get no layer hold nothing.

Memory must hold until the end of generation (``window.final_context``, KV included). A
device whose share does not fit keeps what fits and passes the rest on to the next device
in the order with room; layers left over after the last device are taken back, from
the last device towards the first, by devices that still have room. Room is counted
with the largest layer's memory, which is exact for the uniform layers of a BlockTable.
"""

from __future__ import annotations

import numpy as np

from edgepart.controller.placement.base import NoFeasiblePlacement, Placement
from edgepart.controller.placement.layers import (
    Shard,
    layer_memory_bytes,
    pinned_bytes,
    proportional_split,
    require_source,
    shards_to_placement,
    split_fits,
)
from edgepart.controller.view import ResourceView
from edgepart.llm.blocks import BlockTable


def memory_proportional_split(view: ResourceView, model: BlockTable) -> list[Shard]:
    """exo's memory-proportional contiguous split, repaired to fit at the final context."""
    require_source(view, model)
    layers = model.spec.layers
    n = view.window.final_context
    # devices largest memory first, and their layer counts before any memory repair
    order, target = proportional_split(view, view.memory_bytes, layers, "memory-proportional")
    per_layer = float(layer_memory_bytes(model, n).max())
    room = view.memory_bytes[order] - pinned_bytes(view, model)[order]
    capacity = np.floor(np.maximum(room, 0.0) / per_layer).astype(np.int64)
    counts = np.zeros_like(target)
    carry = 0
    for i in range(order.size):  # forward: overflow moves on to the next device with room
        want = int(target[i]) + carry
        counts[i] = min(want, int(capacity[i]))
        carry = want - int(counts[i])
    for i in reversed(range(order.size)):  # leftover after the last device: take it back
        extra = min(carry, int(capacity[i] - counts[i]))
        counts[i] += extra
        carry -= extra
    if carry:
        raise NoFeasiblePlacement(
            f"memory-proportional: {layers} layers need {per_layer:.0f} bytes each at final "
            f"context {n}; the usable devices hold only {int(capacity.sum())} of them"
        )
    shards = [(int(d), int(c)) for d, c in zip(order, counts, strict=True) if c > 0]
    if not split_fits(view, model, shards, n):  # only for non-uniform layers
        raise NoFeasiblePlacement(
            f"memory-proportional: the repaired split {shards} does not fit at context {n}"
        )
    return shards


class MemoryProportionalPlanner:
    """Static layer split in proportion to device memory (exo / llama.cpp RPC)."""

    name = "memory-proportional"
    replans = False

    def place(
        self, view: ResourceView, model: BlockTable, current: Placement | None
    ) -> Placement:
        """The memory-proportional split for the view; ignores ``current``."""
        return shards_to_placement(model, memory_proportional_split(view, model))
