"""Seeds of the myopic planner: placements built directly, to start the local search from.

The per-token latency of a placement without memory limits decomposes along the layer
chain (a layer only sees the device its input comes from), so a dynamic programme over
layers with the FFN device as state gives the unconstrained latency optimum
(``chain_optimum``); for fixed input and projection devices the best spread of a layer's
KV groups is a min-max allocation solved exactly by taking the G smallest per-device
finish times (``group_gather_s``; ``spread_groups`` for a batch of cases with their own
memory caps, which the local search's re-spread uses, and ``spread_to_groups`` turns
counts into devices, keeping groups where they are). A resource-aware greedy walks the
layers with the memory left on each device (``greedy_chain``: the paper's greedy, made
exact per layer), and on tiny instances a construction fixes blocks largest first
(``sequential_fix``).

Pure functions of the view and the block table; nothing here keeps state.
"""

from __future__ import annotations

import numpy as np

from edgepart.controller import cost
from edgepart.controller.view import ResourceView
from edgepart.llm.blocks import BlockTable, hidden_bytes

__all__ = [
    "chain_optimum",
    "greedy_chain",
    "group_gather_s",
    "groups_from_counts",
    "sequential_fix",
    "spread_groups",
    "spread_to_groups",
]


def group_gather_s(
    table: BlockTable,
    view: ResourceView,
    n: float,
    inputs: np.ndarray,
    caps: np.ndarray,
    projections: np.ndarray | None = None,
    links: cost.LinkTables | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Best gather time (s) of one layer's KV groups per (input device, projection device).

    A device d may take at most caps[d] groups. Returns (gather (A, P), counts (A, P, D)):
    counts[i, j, d] groups on device d achieve gather[i, j] for input inputs[i] and
    projection device projections[j] (default: every device); inf where the caps leave
    no room for all groups.
    """
    if projections is None:
        projections = np.arange(view.size)
    return spread_groups(
        table, view, n, np.asarray(inputs)[:, None], np.asarray(projections)[None, :], caps, links
    )


def spread_groups(
    table: BlockTable,
    view: ResourceView,
    n: float,
    inputs: np.ndarray,
    projections: np.ndarray,
    caps: np.ndarray,
    links: cost.LinkTables | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Best gather time (s) of one layer's KV groups for a batch of cases.

    inputs and projections (device indices) broadcast to the batch's shape S; caps
    (S..., D), or anything broadcasting to it, bounds the groups each device may take.
    Returns (gather S, counts S + (D,)); gather is inf where the caps leave no room.
    """
    d_count = view.size
    g = table.groups
    speed = view.compute_gflops * cost.GFLOP
    gid = table.group_ids(0)[0]
    if links is None:
        links = cost.LinkTables.of(view, hidden_bytes(table.spec))
    inputs, projections = np.broadcast_arrays(np.asarray(inputs), np.asarray(projections))
    with np.errstate(divide="ignore", invalid="ignore"):
        g_s = table.flops(n)[gid] / speed  # (D,)
        k = np.arange(1, g + 1)
        # finish[..., d, k-1]: when device d is done if it runs k groups
        fixed = links.hidden_hop_s[inputs] + links.latency_s.T[projections]  # S + (D,)
        slope = g_s + table.output_bytes[gid] * links.s_per_byte.T[projections]
        finish = fixed[..., None] + slope[..., None] * k
    allowed = (k <= np.asarray(caps)[..., None]) & view.usable[:, None]  # (..., D, G)
    finish = np.where(allowed, np.nan_to_num(finish, nan=np.inf), np.inf)
    flat = finish.reshape(*inputs.shape, d_count * g)
    kth = np.partition(flat, g - 1, axis=-1)[..., g - 1]  # the G-th smallest finish
    counts = (finish <= kth[..., None, None]).sum(axis=-1)
    # ties can count more than G groups; dropping any of them keeps the maximum at kth
    excess = counts.sum(axis=-1) - g
    for case in zip(*np.nonzero(excess > 0), strict=True):
        for d in np.argsort(-counts[case]):
            take = min(counts[case][d], excess[case])
            counts[case][d] -= take
            excess[case] -= take
            if excess[case] == 0:
                break
    gather = np.maximum(kth, links.hidden_hop_s[inputs, projections])
    return gather, counts


def greedy_chain(
    table: BlockTable,
    view: ResourceView,
    current: np.ndarray | None = None,
    next_start: np.ndarray | None = None,
) -> np.ndarray | None:
    """Resource-aware greedy along the layers: each layer gets its best spread within the room left.

    Layer by layer, from the device its input comes from: the KV groups' min-max spread
    under each device's remaining memory, then the projection and FFN devices that
    finish the layer first (the FFN also weighed by how cheaply the next layer can
    start from it). None when memory runs out.
    """
    w = view.window
    n = w.mean_context
    mem = table.memory_bytes(w.interval_end_context)
    g_mem, p_mem, f_mem = mem[table.group_ids(0)[0]], mem[table.proj_id(0)], mem[table.ffn_id(0)]
    room = view.memory_bytes.astype(np.float64).copy()
    room[view.source] -= table.source_weight_bytes
    room[~view.usable] = 0.0
    speed = view.compute_gflops * cost.GFLOP
    links = cost.LinkTables.of(view, hidden_bytes(table.spec))
    usable = view.usable
    with np.errstate(divide="ignore", invalid="ignore"):
        proj_s = np.where(usable, table.flops_fixed[table.proj_id(0)] / speed, np.inf)
        ffn_s = np.where(usable, table.flops_fixed[table.ffn_id(0)] / speed, np.inf)
    all_devices = np.arange(view.size)
    if next_start is None:  # how cheaply a layer can start from each input, memory aside
        full = np.full(view.size, table.groups)
        next_start = group_gather_s(table, view, n, all_devices, full)[0].min(axis=1)
    x = np.empty(table.size, dtype=np.int64)
    a = view.source
    for ell in range(table.spec.layers):
        caps = np.floor(np.maximum(room, 0.0) / g_mem).astype(np.int64)
        gather, counts = group_gather_s(table, view, n, np.array([a]), caps, links=links)
        gather, counts = gather[0], counts[0]  # (p,), (p, d)
        left = room[None, :] - counts * g_mem  # (p, d) room after the groups
        p_ok = left[all_devices, all_devices] >= p_mem  # (p,)
        left_p = left - np.where(np.eye(view.size, dtype=bool), p_mem, 0.0)
        f_ok = left_p >= f_mem  # (p, f)
        finish = (
            gather[:, None]
            + proj_s[:, None]
            + links.hidden_hop_s
            + ffn_s[None, :]
            + (next_start[None, :] if ell < table.spec.layers - 1 else 0.0)
        )
        finish = np.where(p_ok[:, None] & f_ok & np.isfinite(gather)[:, None], finish, np.inf)
        p, f = np.unravel_index(int(np.argmin(finish)), finish.shape)
        if not np.isfinite(finish[p, f]):
            return None
        gids = table.group_ids(ell)
        x[gids] = groups_from_counts(counts[p], gids, current)
        x[table.proj_id(ell)] = p
        x[table.ffn_id(ell)] = f
        room -= np.bincount(x[gids], minlength=view.size) * g_mem
        room[p] -= p_mem
        room[f] -= f_mem
        a = int(f)
    return x


def chain_optimum(
    table: BlockTable,
    view: ResourceView,
    current: np.ndarray | None = None,
    free_gather: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Assignment minimising the per-token delay at the window's mean context, memory ignored."""
    n = view.window.mean_context
    usable = view.usable
    speed = view.compute_gflops * cost.GFLOP
    hid = hidden_bytes(table.spec)
    d_count = view.size
    devices = np.arange(d_count)
    devices_all = np.arange(view.size)
    if free_gather is None:
        free_gather = group_gather_s(table, view, n, devices_all, np.full(view.size, table.groups))
    gather, counts = free_gather
    with np.errstate(divide="ignore", invalid="ignore"):
        proj_s = np.where(usable, table.flops_fixed[table.proj_id(0)] / speed, np.inf)
        ffn_s = np.where(usable, table.flops_fixed[table.ffn_id(0)] / speed, np.inf)
    hop = cost.transfer_s(view, devices[:, None], devices[None, :], hid)  # (p, f)
    # layer[a, p, f] = gather + projection + hop + FFN
    layer = gather[:, :, None] + proj_s[None, :, None] + hop[None, :, :] + ffn_s[None, None, :]
    best_p = layer.argmin(axis=1)  # (a, f)
    layer_cost = layer.min(axis=1)  # (a, f)
    tail = cost.source_overhead_s(table, view, devices)
    # DP over layers, state = device of the layer's FFN
    value = layer_cost[view.source].copy()
    back = []
    for _ in range(1, table.spec.layers):
        total = value[:, None] + layer_cost
        back.append(total.argmin(axis=0))
        value = total.min(axis=0)
    f = int(np.argmin(value + tail))
    ffns = [f]
    for arg in reversed(back):
        f = int(arg[f])
        ffns.append(f)
    ffns.reverse()
    x = np.empty(table.size, dtype=np.int64)
    a = view.source
    for ell, f in enumerate(ffns):
        p = int(best_p[a, f])
        x[table.proj_id(ell)] = p
        x[table.ffn_id(ell)] = f
        gids = table.group_ids(ell)
        x[gids] = groups_from_counts(counts[a, p], gids, current)
        a = f
    return x


def groups_from_counts(
    counts: np.ndarray, gids: np.ndarray, current: np.ndarray | None
) -> np.ndarray:
    """Give each group a device so devices get ``counts`` groups, keeping groups where they are."""
    return spread_to_groups(counts, None if current is None else current[gids])


def spread_to_groups(counts: np.ndarray, present: np.ndarray | None) -> np.ndarray:
    """Devices (..., G) for a layer's groups so that device d gets counts[..., d] of them.

    A group stays on its present device (present[..., i], -1 for none) while that device
    has count left, earlier groups first; the others fill the remaining counts in device
    order. Vectorised over the leading axes (present broadcasts against counts').
    """
    counts = np.asarray(counts, dtype=np.int64)
    d_count = counts.shape[-1]
    g = int(counts.sum(axis=-1).max()) if present is None else np.shape(present)[-1]
    if present is None:
        keep = np.zeros((*counts.shape[:-1], g), dtype=bool)
        out = np.zeros(keep.shape, dtype=np.int64)
        left = counts
    else:
        present = np.broadcast_to(present, (*counts.shape[:-1], g))
        earlier = np.tril(np.ones((g, g), dtype=bool), -1)  # [i, j]: j comes before i
        same = present[..., :, None] == present[..., None, :]
        rank = (same & earlier).sum(axis=-1)  # groups before i on i's device
        room = np.take_along_axis(counts, np.clip(present, 0, None), axis=-1)
        keep = (present >= 0) & (rank < room)
        out = np.where(keep, present, 0)
        kept = (keep[..., None] & (present[..., None] == np.arange(d_count))).sum(axis=-2)
        left = counts - kept
    # the q-th group not kept goes to the device whose share of the rest covers q
    q = np.cumsum(~keep, axis=-1) - 1
    filled = (left.cumsum(axis=-1)[..., None, :] <= q[..., :, None]).sum(axis=-1)
    return np.where(keep, out, filled)


def sequential_fix(
    table: BlockTable, view: ResourceView, tentative: np.ndarray, current: np.ndarray | None
) -> np.ndarray | None:
    """Greedy resource-aware construction: fix blocks largest first on their best device with room.

    Unfixed blocks stay at their tentative device while the candidates are scored on the
    exact objective (memory aside); None if some block finds no device with room.
    """
    w = view.window
    block_mem = table.memory_bytes(w.interval_end_context)
    room = view.memory_bytes.astype(np.float64).copy()
    room[view.source] -= table.source_weight_bytes
    room[~view.usable] = -1.0
    x = tentative.copy()
    targets = np.arange(view.size)
    order = np.lexsort((np.arange(table.size), -block_mem))
    for b in order:
        candidates = targets[room >= block_mem[b]]
        if candidates.size == 0:
            return None
        xs = np.broadcast_to(x, (candidates.size, x.size)).copy()
        xs[:, b] = candidates
        objective = w.horizon_tokens * np.atleast_1d(
            cost.per_token_s(table, view, xs, w.mean_context)
        ) + np.atleast_1d(cost.migration_s(table, view, current, xs, w.context_tokens))
        d = int(candidates[np.argmin(objective)])
        x[b] = d
        room[d] -= block_mem[b]
    return x
