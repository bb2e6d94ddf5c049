"""Contiguous layer splits: the shared machinery of the layer-based baselines.

A split is a list of shards ``(device, layer_count)`` covering the layers in order;
every block of a layer (its KV groups, projection and FFN) sits on the shard's device,
so each layer's KV cache stays with the layer for the whole generation.
"""

from __future__ import annotations

import numpy as np

from edgepart.controller.cost import fits, memory_use
from edgepart.controller.placement.base import NoFeasiblePlacement, Placement
from edgepart.controller.view import ResourceView
from edgepart.llm.blocks import BlockTable

Shard = tuple[int, int]  # (device index, number of consecutive layers)


def usable_devices(view: ResourceView) -> np.ndarray:
    """Indices of the devices a block may be placed on, ascending."""
    return np.flatnonzero(view.usable)


def require_source(view: ResourceView, model: BlockTable) -> None:
    """Raise NoFeasiblePlacement unless the source can run and hold the pinned blocks."""
    src = view.source
    if not view.usable[src]:
        raise NoFeasiblePlacement(
            f"source device {view.devices[src]!r} is not usable (dead, or no compute or "
            "memory left); it must hold the embedding and LM head"
        )
    if model.source_weight_bytes > view.memory_bytes[src]:
        raise NoFeasiblePlacement(
            f"source device {view.devices[src]!r} has {view.memory_bytes[src]:.0f} bytes "
            f"available but the embedding and LM head need {model.source_weight_bytes} bytes"
        )


def pinned_bytes(view: ResourceView, model: BlockTable) -> np.ndarray:
    """Bytes already taken on each device by the pinned source blocks: (D,)."""
    pinned = np.zeros(view.size)
    pinned[view.source] = model.source_weight_bytes
    return pinned


def layer_memory_bytes(model: BlockTable, n: float) -> np.ndarray:
    """Resident bytes of each layer (all its blocks, KV at context n): (L,)."""
    return np.bincount(model.layer, weights=model.memory_bytes(n), minlength=model.spec.layers)


def layer_flops(model: BlockTable, n: float) -> np.ndarray:
    """FLOPs of each layer (all its blocks) for one token at context n: (L,)."""
    return np.bincount(model.layer, weights=model.flops(n), minlength=model.spec.layers)


def shards_to_placement(model: BlockTable, shards: list[Shard]) -> Placement:
    """Placement putting each shard's consecutive layers, all their blocks, on its device."""
    counts = np.array([c for _, c in shards], dtype=np.int64)
    if (counts < 1).any() or counts.sum() != model.spec.layers:
        raise ValueError(
            f"shard layer counts {counts.tolist()} must be positive and sum to "
            f"{model.spec.layers} layers"
        )
    devices = np.array([d for d, _ in shards], dtype=np.int64)
    # Block ids run layer by layer, so a layer's blocks form one run of per_layer ids.
    return Placement(np.repeat(devices, counts * model.per_layer))


def placement_shards(model: BlockTable, placement: Placement) -> list[Shard]:
    """The split a layer-wise placement encodes; ValueError if a layer spans devices."""
    per_layer = placement.assignment.reshape(model.spec.layers, model.per_layer)
    if (per_layer != per_layer[:, :1]).any():
        raise ValueError("placement splits a layer across devices; it is not a layer split")
    shards: list[Shard] = []
    for d in per_layer[:, 0].tolist():
        if shards and shards[-1][0] == d:
            shards[-1] = (d, shards[-1][1] + 1)
        else:
            shards.append((d, 1))
    return shards


def split_memory_bytes(
    view: ResourceView, model: BlockTable, shards: list[Shard], n: float
) -> np.ndarray:
    """Resident bytes per device of a split at context n, pinned source blocks included: (D,)."""
    return memory_use(model, view, shards_to_placement(model, shards).assignment, n)


def split_fits(view: ResourceView, model: BlockTable, shards: list[Shard], n: float) -> bool:
    """Whether a split uses only usable devices and fits their memory at context n."""
    assignment = shards_to_placement(model, shards).assignment
    return bool(view.usable[assignment].all()) and bool(fits(model, view, assignment, n))


def largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers summing to total in proportion to weights (Hamilton's method); ties go first."""
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0 or w.sum() <= 0 or (w < 0).any():
        raise ValueError(f"weights must be non-negative with a positive sum, got {w.tolist()}")
    quotas = total * w / w.sum()
    counts = np.floor(quotas).astype(np.int64)
    left = total - int(counts.sum())
    # Stable sort: equal remainders favour the earlier entry (the caller's preferred order).
    order = np.argsort(-(quotas - counts), kind="stable")
    counts[order[:left]] += 1
    return counts


def proportional_split(
    view: ResourceView, amount: np.ndarray, total: int, planner: str
) -> tuple[np.ndarray, np.ndarray]:
    """The usable devices, largest ``amount`` first (ties: lower index first), and how many
    of ``total`` units (layers, KV groups) each gets in proportion to its amount (e.g. its
    GFLOP/s or bytes); NoFeasiblePlacement naming the planner when no device is usable."""
    dev = usable_devices(view)
    order = dev[np.argsort(-amount[dev], kind="stable")]
    if order.size == 0:
        raise NoFeasiblePlacement(f"{planner}: no usable device")
    return order, largest_remainder(total, amount[order])


def layer_split_candidates(view: ResourceView, model: BlockTable) -> list[Placement]:
    """Feasible EdgeShard and memory-proportional placements (distinct), to seed a planner."""
    # Imported here: both planners import this module.
    from edgepart.controller.placement.edgeshard import EdgeShardPlanner
    from edgepart.controller.placement.memory_proportional import MemoryProportionalPlanner

    found: list[Placement] = []
    for planner in (EdgeShardPlanner(), MemoryProportionalPlanner()):
        try:
            placement = planner.place(view, model, None)
        except NoFeasiblePlacement:
            continue
        if placement not in found:
            found.append(placement)
    return found
