"""Local search of the myopic planner on the exact objective of ``edgepart.controller.cost``.

``improve`` descends from a seed with single-block moves, moves of a layer's
projection+FFN pair and of whole layers, an exact re-spread of a layer's KV groups,
moving or exchanging everything two devices hold, and swaps when memory is tight; each
kind of move only where the cheaper ones are stuck. ``repair_memory`` turns a
memory-blind seed into a feasible start. Candidates are priced by ``ScoredPlacement``.
"""

from __future__ import annotations

import numpy as np

from edgepart.controller import cost
from edgepart.controller.placement.scored_placement import MEMORY_SLACK_BYTES, ScoredPlacement
from edgepart.controller.placement.seeds import spread_groups, spread_to_groups
from edgepart.controller.view import ResourceView
from edgepart.llm.blocks import BlockTable

__all__ = ["MIN_GAIN", "improve", "repair_memory", "respread_candidates"]

#: Smallest objective change (s) that counts as a gain; the search scales it by the objective
#: (at least 1 s). Changes within float rounding must not count, or moves between placements
#: that tie could follow one another until max_rounds runs out.
MIN_GAIN = 1e-12


def improve(search: ScoredPlacement, max_rounds: int, swap_budget: int = 0) -> None:
    """Descend with moves (and up to swap_budget scored swaps) until nothing improves.

    Only layers changed in the previous round (and their neighbours) are searched
    again: a move elsewhere cannot have changed what a block there would gain,
    except through the shared migration maximum, which the final full round checks.
    """
    layer_count = search.table.spec.layers
    dirty = np.ones(layer_count, dtype=bool)
    full_check_done = False
    for _ in range(max_rounds):
        layers = np.nonzero(dirty)[0]
        changed = _single_move_pass(search, layers)
        if not changed.any():
            changed |= _layer_move_pass(search, layers)
        if not changed.any():
            changed |= _rebalance_pass(search, layers)
        if not changed.any():
            changed |= _device_pass(search)
        if not changed.any() and swap_budget > 0:
            changed |= _swap_pass(search, swap_budget)
        if not changed.any():
            if full_check_done or dirty.all():
                return
            dirty[:] = True  # one last full round before declaring a local optimum
            full_check_done = True
            continue
        full_check_done = False
        dirty = changed | np.roll(changed, 1) | np.roll(changed, -1)


def _is_gain(search: ScoredPlacement, delta: float) -> bool:
    """Whether an objective change (s) improves the placement beyond rounding (MIN_GAIN)."""
    return bool(delta < -MIN_GAIN * max(1.0, search.objective()))


def _single_move_pass(search: ScoredPlacement, layers: np.ndarray) -> np.ndarray:
    """Move single blocks of the given layers where that gains; the layers it changed."""
    t = search.table
    changed = np.zeros(t.spec.layers, dtype=bool)
    blocks = [b for ell in layers for b in range(ell * t.per_layer, (ell + 1) * t.per_layer)]
    reps = np.array(search.classes(blocks), dtype=np.int64)
    deltas = search.single_moves(reps)
    best_to = deltas.argmin(axis=1)
    gains = deltas[np.arange(reps.size), best_to]
    mig_at_scoring = search.mig_s
    # most promising first; a move whose layers (or the migration maximum) another
    # move changed meanwhile is scored again against the state it meets
    for i in np.argsort(gains):
        if not _is_gain(search, gains[i]):
            break
        b = int(reps[i])
        ell = int(search.block_layer[b])
        near = changed[max(ell - 1, 0) : ell + 2].any()
        d = int(best_to[i])
        fresh = (
            not near
            and search.mig_s == mig_at_scoring
            and search.used[d] + search.block_mem[b] <= search.cap[d] + MEMORY_SLACK_BYTES
        )
        if not fresh:
            delta, d = search.best_single_move(b)
            if not _is_gain(search, delta):
                continue
        search.apply(np.array([b]), np.array([d]))
        changed[ell] = True
    return changed


def _layer_move_pass(search: ScoredPlacement, layers: np.ndarray) -> np.ndarray:
    """Move a layer's projection+FFN pair, or the whole layer, to one device; changed layers.

    Compound moves run only where single moves are stuck: screened for all layers at once
    on latency and memory, then scored exactly one by one.
    """
    t = search.table
    changed = np.zeros(t.spec.layers, dtype=bool)
    all_targets = np.arange(search.view.size)[:, None]
    for slots in (np.array([t.groups, t.groups + 1]), np.arange(t.per_layer)):
        screen = search.layer_moves_latency(layers, slots)
        for i in np.argsort(screen.min(axis=1)):
            if not _is_gain(search, screen[i].min()):
                break
            ell = int(layers[i])
            group = ell * t.per_layer + slots
            delta = search.score(group, np.repeat(all_targets, len(group), axis=1))
            d = int(np.argmin(delta))
            if _is_gain(search, delta[d]):
                search.apply(group, np.full(len(group), d))
                changed[ell] = True
    return changed


def _rebalance_pass(search: ScoredPlacement, layers: np.ndarray) -> np.ndarray:
    """Re-spread each layer's KV groups exactly (min-max in memory) per projection device.

    For a fixed layer input and projection device the best spread of the groups is
    exact (``spread_groups``); trying it for each projection device moves a
    layer's heads as a whole, which single moves cannot (each alone adds a hop). Every
    layer's candidates are priced in one batch against the state the pass starts from;
    once a layer has changed, the next is priced again exactly before it is applied.
    """
    t = search.table
    changed = np.zeros(t.spec.layers, dtype=bool)
    if layers.size == 0:
        return changed
    rows, delta = respread_candidates(search, layers)
    best = delta.argmin(axis=1)
    gains = delta[np.arange(layers.size), best]
    for i in np.argsort(gains, kind="stable"):
        if not _is_gain(search, gains[i]):
            break
        ell = int(layers[i])
        blocks = np.r_[t.group_ids(ell), t.proj_id(ell)]
        row = rows[i, best[i]]
        if changed.any() and not _is_gain(search, search.score(blocks, row[None])[0]):
            continue  # an earlier change took its room or moved the migration maximum
        search.apply(blocks, row)
        changed[ell] = True
    return changed


#: projection devices a re-spread tries per layer: where it is, the layer input and the
#: fastest devices with room for it
_RESPREAD_FASTEST = 4


def respread_candidates(
    search: ScoredPlacement, layers: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each layer's re-spread candidates and their exact objective change (s).

    Returns rows (R, T, G + 1): the devices of the layer's groups and projection; and
    delta (R, T), inf where a candidate does not fit.
    """
    t, view = search.table, search.view
    r_count, d_count, g = layers.size, view.size, t.groups
    gids = layers[:, None] * t.per_layer + np.arange(g)  # (R, G)
    pids = layers * t.per_layer + g
    ffns = pids + 1
    blocks = np.concatenate([gids, pids[:, None]], axis=1)  # (R, G + 1)
    prev = np.where(layers > 0, search.x[np.maximum(ffns - t.per_layer, 0)], view.source)
    # memory as if each layer's groups and projection were lifted off their devices
    lifted = np.zeros((r_count, d_count))
    np.add.at(lifted, (np.arange(r_count)[:, None], search.x[blocks]), search.block_mem[blocks])
    room = (search.cap - search.used)[None, :] + lifted  # (R, D)
    g_mem, p_mem = search.block_mem[gids[0, 0]], search.block_mem[pids[0]]
    caps = np.floor(np.maximum(room, 0.0) / g_mem).astype(np.int64)
    speed = view.compute_gflops * search.usable * (room >= p_mem)  # (R, D)
    fastest = np.argsort(-speed, axis=1, kind="stable")[:, :_RESPREAD_FASTEST]
    tries = np.concatenate([search.x[pids][:, None], prev[:, None], fastest], axis=1)
    gather, counts = spread_groups(
        t, view, search.n, prev[:, None], tries, caps[:, None, :], search.links
    )
    # the layer's new delay: gather, then projection, hop to the FFN and FFN (which stays)
    f = search.x[ffns][:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        speed_flops = view.compute_gflops * cost.GFLOP
        proj_s = t.flops_fixed[pids[0]] / speed_flops
        ffn_s = t.flops_fixed[ffns[0]] / speed_flops
        new_layer = gather + proj_s[tries] + search.links.hidden_hop_s[tries, f] + ffn_s[f]
    delta = search.k * (new_layer - search.layer_s[layers][:, None])
    # memory after: the groups and the projection land, nothing else moves
    after = room[:, None, :] - counts * g_mem
    after[np.arange(r_count)[:, None], np.arange(tries.shape[1]), tries] -= p_mem
    used = search.cap[None, None, :] - after
    fits = (used <= search.cap + MEMORY_SLACK_BYTES) | (used <= search.used + MEMORY_SLACK_BYTES)
    ok = fits.all(axis=2) & (counts.sum(axis=2) == g) & np.isfinite(gather)
    rows = np.empty((*tries.shape, g + 1), dtype=np.int64)
    # keep groups where they are when the spread allows, to move as few as possible
    present = search.x[gids][:, None, :]
    rows[..., :g] = np.where(ok[..., None], spread_to_groups(counts, present), present)
    rows[..., g] = tries
    if search.cur is not None:
        delta = delta + _migration_change_s(search, blocks, rows)
    return rows, np.where(ok, delta, np.inf)


def _migration_change_s(
    search: ScoredPlacement, blocks: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """Migration-delay change (s) of giving blocks[i] the devices rows[i, j]: (R, T)."""
    r_count, t_count = rows.shape[:2]
    xs = np.broadcast_to(search.x, (r_count, t_count, search.x.size)).copy()
    xs[np.arange(r_count)[:, None, None], np.arange(t_count)[:, None], blocks[:, None, :]] = rows
    w = search.view.window
    mig = cost.migration_s(
        search.table, search.view, search.cur, xs.reshape(-1, search.x.size), w.context_tokens
    )
    return np.asarray(mig).reshape(r_count, t_count) - search.mig_s


def _device_pass(search: ScoredPlacement, limit: int = 60) -> np.ndarray:
    """Move everything a device holds to another device, or exchange two devices' contents.

    Such moves shift whole shards at once, where single-layer steps would each pay a
    new hop before the last of them pays off. Scored exactly on the full objective.
    """
    changed = np.zeros(search.table.spec.layers, dtype=bool)
    held = np.unique(search.x)
    usable = np.nonzero(search.usable)[0]
    # the fastest devices first, so that a capped candidate list keeps the likeliest
    usable = usable[np.argsort(-search.view.compute_gflops[usable], kind="stable")]
    per_source = max(2, limit // max(1, held.size))
    pairs = [(a, b) for a in held for b in usable[: per_source + 1] if a != b][:limit]
    if not pairs:
        return changed
    candidates = np.empty((2 * len(pairs), search.x.size), dtype=np.int64)
    for i, (a, b) in enumerate(pairs):
        moved = search.x.copy()
        moved[search.x == a] = b
        candidates[2 * i] = moved
        moved = moved.copy()
        moved[search.x == b] = a
        candidates[2 * i + 1] = moved
    objective = np.atleast_1d(
        cost.interval_objective_s(search.table, search.view, candidates, search.cur)
    )
    i = int(np.argmin(objective))
    if objective[i] < search.objective() * (1 - 1e-9):
        diff = np.nonzero(candidates[i] != search.x)[0]
        changed[np.unique(search.block_layer[diff])] = True
        search.apply(diff, candidates[i][diff])
    return changed


def _swap_pass(search: ScoredPlacement, budget: int) -> np.ndarray:
    """Exchange two blocks between devices where memory blocks plain moves; changed layers."""
    changed = np.zeros(search.table.spec.layers, dtype=bool)
    tight = search.cap - search.used < search.block_mem.max()
    if not tight.any():
        return changed
    reps = np.array(search.classes(range(search.table.size)))
    scored = 0
    for b in reps:
        if scored >= budget:
            break
        db = search.x[b]
        partners = reps[(search.x[reps] != db) & tight[search.x[reps]]]
        if partners.size == 0:
            continue
        partners = partners[: budget - scored]
        scored += partners.size
        deltas = _swap_deltas(search, int(b), partners)
        i = int(np.argmin(deltas))
        if _is_gain(search, deltas[i]):
            p = int(partners[i])
            changed[[search.block_layer[b], search.block_layer[p]]] = True
            search.apply(np.array([b, p]), np.array([search.x[p], db]))
            tight = search.cap - search.used < search.block_mem.max()
    return changed


def _swap_deltas(search: ScoredPlacement, b: int, partners: np.ndarray) -> np.ndarray:
    """Objective change (s) of exchanging block b's device with each partner's, in one batch.

    Every swap touches other layers, so each candidate is priced on the whole objective
    (``edgepart.controller.cost``), vectorised over the partners.
    """
    xs = np.broadcast_to(search.x, (partners.size, search.x.size)).copy()
    rows = np.arange(partners.size)
    xs[rows, b] = search.x[partners]
    xs[rows, partners] = search.x[b]
    objective = cost.interval_objective_s(search.table, search.view, xs, search.cur)
    return np.atleast_1d(objective) - search.objective()


def repair_memory(
    table: BlockTable, view: ResourceView, x: np.ndarray, current: np.ndarray | None
) -> np.ndarray | None:
    """Move blocks off over-full devices, cheapest objective increase first; None if stuck."""
    search = ScoredPlacement(table, view, x.copy(), current)
    for _ in range(4 * table.size):
        over = search.overflow()
        if not (over > 0).any():
            return search.x
        d = int(np.argmax(over))
        if not _relieve(search, d):
            return None
    return None


def _relieve(search: ScoredPlacement, device: int) -> bool:
    """Move blocks off an overfull device, cheapest objective increase per byte first."""
    on = np.nonzero(search.x == device)[0]
    reps = np.array(search.classes(on), dtype=np.int64)
    deltas = search.single_moves(reps)
    best_to = deltas.argmin(axis=1)
    cost_per_byte = deltas[np.arange(reps.size), best_to] / np.maximum(search.block_mem[reps], 1.0)
    moved = False
    # one ranking frees many blocks: the ranking goes stale as blocks land, but a
    # repair only needs a good feasible start, which the local search then polishes
    for i in np.argsort(cost_per_byte):
        if not np.isfinite(cost_per_byte[i]):
            break
        for m in search.members(int(reps[i])):
            if search.used[device] <= search.cap[device] + MEMORY_SLACK_BYTES:
                return True
            d = int(best_to[i])
            if search.used[d] + search.block_mem[m] > search.cap[d] + MEMORY_SLACK_BYTES:
                delta, d = search.best_single_move(int(m))
                if not np.isfinite(delta):
                    break
            search.apply(np.array([m]), np.array([d]))
            moved = True
    if search.used[device] <= search.cap[device] + MEMORY_SLACK_BYTES:
        return True
    return moved or _relieve_loose(search, device, on)


def _relieve_loose(search: ScoredPlacement, device: int, on: np.ndarray) -> bool:
    """Last resort: move the biggest block to the device with most room."""
    room = search.cap - search.used
    room[device] = -np.inf
    room[~search.usable] = -np.inf
    b = int(on[np.argmax(search.block_mem[on])]) if on.size else -1
    if b < 0:
        return False
    d = int(np.argmax(room))
    if room[d] < search.block_mem[b]:
        return False
    search.apply(np.array([b]), np.array([d]))
    return True
