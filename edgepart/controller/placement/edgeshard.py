"""EdgeShard (arXiv 2405.14371): the latency-optimal contiguous layer split, by dynamic programme.

The layers are cut into contiguous shards, each on a different usable device. A shard of
layers s+1..i on device j costs its compute at the decision's mean context plus the hop
of one hidden state from the previous shard's device (from the source for the first);
after the last shard the hidden state returns to the source for the LM head. Since every
block of a layer sits on one device, this sum is exactly ``cost.per_token_s``.

Memory is held until the end of generation (the split is static): each shard, KV cache
at ``window.final_context`` included, must fit its device, the source also holding the
embedding and LM head.

Exactness: with at most ``exact_max_devices`` (default 12) usable devices the DP state
is (used-device bitmask, last device, layers placed), which enforces one shard per device
exactly. Above that the state is (layers placed, last device) and each state remembers
the devices used along its best path, forbidding their reuse; this is a heuristic that
can miss the optimum (or a feasible split) when the best path to a state spends a device
a later shard needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgepart.controller.cost import GFLOP, transfer_s
from edgepart.controller.placement.base import NoFeasiblePlacement, Placement
from edgepart.controller.placement.layers import (
    Shard,
    layer_flops,
    layer_memory_bytes,
    pinned_bytes,
    require_source,
    shards_to_placement,
    usable_devices,
)
from edgepart.controller.view import ResourceView
from edgepart.llm.blocks import BlockTable, hidden_bytes

EXACT_MAX_DEVICES = 12


@dataclass(frozen=True)
class LayerSplit:
    """A contiguous layer split and its per-token delay (s) at the window's mean context."""

    shards: tuple[Shard, ...]
    per_token_s: float
    exact: bool  # whether the DP was the exact (bitmask) one


@dataclass(frozen=True)
class _Costs:
    """DP inputs over the usable devices only (reduced indices 0..m-1)."""

    devices: np.ndarray  # (m,) full device index of each reduced index
    shard: np.ndarray  # (m, L+1, L+1) compute s of layers i..i'-1 on j; inf if invalid/too big
    hop: np.ndarray  # (m, m) hidden-state hop s between usable devices (0 on the diagonal)
    hop_from_source: np.ndarray  # (m,)
    hop_to_source: np.ndarray  # (m,)
    head_s: float


def _costs(view: ResourceView, model: BlockTable) -> _Costs:
    w = view.window
    dev = usable_devices(view)
    speed = view.compute_gflops[dev] * GFLOP
    cum_flops = np.concatenate([[0.0], np.cumsum(layer_flops(model, w.mean_context))])
    cum_mem = np.concatenate([[0.0], np.cumsum(layer_memory_bytes(model, w.final_context))])
    start, end = np.meshgrid(np.arange(cum_flops.size), np.arange(cum_flops.size), indexing="ij")
    flops = cum_flops[None, end] - cum_flops[None, start]  # (1, L+1, L+1): layers start..end-1
    need = cum_mem[None, end] - cum_mem[None, start] + pinned_bytes(view, model)[dev, None, None]
    ok = (end > start)[None] & (need <= view.memory_bytes[dev, None, None])
    shard = np.where(ok, flops / speed[:, None, None], np.inf)
    hid = hidden_bytes(model.spec)
    return _Costs(
        devices=dev,
        shard=shard,
        hop=transfer_s(view, dev[:, None], dev[None, :], hid),
        hop_from_source=transfer_s(view, view.source, dev, hid),
        hop_to_source=transfer_s(view, dev, view.source, hid),
        head_s=model.source_flops / (view.compute_gflops[view.source] * GFLOP),
    )


def _exact(c: _Costs, layers: int) -> tuple[list[Shard], float]:
    """Bitmask DP: dp[mask, j, i] = best delay with layers 0..i-1 placed, last shard on j."""
    m = c.devices.size
    dp = np.full((1 << m, m, layers + 1), np.inf)
    prev_dev = np.full((1 << m, m, layers + 1), -1, dtype=np.int16)
    prev_end = np.zeros((1 << m, m, layers + 1), dtype=np.int32)
    for j in range(m):  # first shard: layers 0..i-1 on j, input from the source
        dp[1 << j, j] = c.hop_from_source[j] + c.shard[j, 0]
    # A state's only predecessor mask is its own mask without its last device, which is
    # numerically smaller, so increasing order finalises every state before it is used.
    for mask in range(1, 1 << m):
        cur = dp[mask]
        if not np.isfinite(cur[:, :layers]).any():
            continue
        free = np.array([j for j in range(m) if not mask >> j & 1], dtype=np.int64)
        if free.size == 0:
            continue
        via = cur[:, None, :] + c.hop[:, free, None]  # (from j, to free j', ending i)
        from_dev = via.argmin(axis=0)  # (free, i)
        arrive = via.min(axis=0)
        total = arrive[:, :, None] + c.shard[free]  # (free, i, i')
        from_end = total.argmin(axis=1)  # (free, i')
        targets = mask | (1 << free)
        dp[targets, free] = total.min(axis=1)
        prev_end[targets, free] = from_end
        prev_dev[targets, free] = np.take_along_axis(from_dev, from_end, axis=1)
    finish = dp[:, :, layers] + c.hop_to_source[None, :]
    mask, j = np.unravel_index(int(np.argmin(finish)), finish.shape)
    best = float(finish[mask, j])
    if not np.isfinite(best):
        return [], best
    shards: list[Shard] = []
    mask, j, i = int(mask), int(j), layers
    while j >= 0:
        s = int(prev_end[mask, j, i])
        k = int(prev_dev[mask, j, i])
        shards.append((int(c.devices[j]), i - s))
        mask, j, i = mask ^ (1 << j), k, s
    return shards[::-1], best + c.head_s


def _greedy(c: _Costs, layers: int) -> tuple[list[Shard], float]:
    """(layers, device) DP; each state forbids the devices its best path already used."""
    m = c.devices.size
    dp = np.full((layers + 1, m), np.inf)
    used = np.zeros((layers + 1, m, m), dtype=bool)  # used[i, j]: devices on that best path
    prev_dev = np.full((layers + 1, m), -1, dtype=np.int64)
    prev_end = np.zeros((layers + 1, m), dtype=np.int64)
    cols = np.arange(m)
    for i in range(1, layers + 1):
        first = c.hop_from_source + c.shard[:, 0, i]  # (j,)
        dp[i] = first
        if i > 1:
            # via[s, k, j]: the shard s+1..i on j after the best path ending at s+1 on k;
            # a path that used j already is barred (so is k == j: a path uses its last device)
            via = dp[1:i, :, None] + c.hop[None, :, :] + c.shard[:, 1:i, i].T[:, None, :]
            via = np.where(used[1:i], np.inf, via)
            flat = via.reshape(-1, m)
            arg = flat.argmin(axis=0)
            better = flat[arg, cols] < first
            s_idx, k_idx = np.unravel_index(arg, via.shape[:2])
            dp[i] = np.where(better, flat[arg, cols], first)
            prev_end[i] = np.where(better, s_idx + 1, 0)
            prev_dev[i] = np.where(better, k_idx, -1)
            used[i] = np.where(better[:, None], used[s_idx + 1, k_idx], False)
        used[i, cols, cols] = True
    finish = dp[layers] + c.hop_to_source
    j = int(np.argmin(finish))
    best = float(finish[j])
    if not np.isfinite(best):
        return [], best
    shards: list[Shard] = []
    i = layers
    while j >= 0:
        s = int(prev_end[i, j])
        shards.append((int(c.devices[j]), i - s))
        i, j = s, int(prev_dev[i, j])
    return shards[::-1], best + c.head_s


def edgeshard_split(
    view: ResourceView, model: BlockTable, exact_max_devices: int = EXACT_MAX_DEVICES
) -> LayerSplit:
    """EdgeShard's latency-optimal split and its per-token delay (s); raises NoFeasiblePlacement."""
    require_source(view, model)
    c = _costs(view, model)
    if c.devices.size == 0:
        raise NoFeasiblePlacement("edgeshard: no usable device")
    exact = c.devices.size <= exact_max_devices
    shards, best = (_exact if exact else _greedy)(c, model.spec.layers)
    if not shards:
        n = view.window.final_context
        need = layer_memory_bytes(model, n).sum() + model.source_weight_bytes
        have = view.memory_bytes[c.devices].sum()
        raise NoFeasiblePlacement(
            f"edgeshard: no contiguous layer split (one shard per device) fits the usable "
            f"devices at final context {n}: the model needs {need:.0f} bytes, the usable "
            f"devices have {have:.0f} bytes"
            + ("" if exact else " (heuristic DP: more than "
               f"{exact_max_devices} usable devices)")
        )
    return LayerSplit(tuple(shards), best, exact)


class EdgeShardPlanner:
    """Static latency-optimal contiguous layer split (EdgeShard); ignores ``current``."""

    name = "edgeshard"
    replans = False

    def __init__(self, exact_max_devices: int = EXACT_MAX_DEVICES) -> None:
        self.exact_max_devices = exact_max_devices

    def place(
        self, view: ResourceView, model: BlockTable, current: Placement | None
    ) -> Placement:
        """The EdgeShard split for the view, fitting memory until the end of generation."""
        split = edgeshard_split(view, model, self.exact_max_devices)
        return shards_to_placement(model, list(split.shards))
