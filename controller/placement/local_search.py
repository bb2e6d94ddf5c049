"""Local search of the myopic planner on the exact objective of ``controller.cost``.

``improve`` descends from a seed with single-block moves, moves of a layer's
projection+FFN pair and of whole layers, an exact re-spread of a layer's KV groups,
moving or exchanging everything two devices hold, and swaps when memory is tight; each
kind of move only where the cheaper ones are stuck. ``repair_memory`` turns a
memory-blind seed into a feasible start. Candidates are priced by ``ScoredPlacement``.
"""

from __future__ import annotations

import numpy as np

from controller import cost
from controller.placement.scored_placement import MEMORY_SLACK_BYTES, ScoredPlacement
from controller.placement.seeds import group_gather_s, groups_from_counts
from controller.view import ResourceView
from llm.blocks import BlockTable

__all__ = ["MIN_GAIN", "improve", "repair_memory"]

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
    exact (``group_gather_s``); trying it for each projection device moves a
    layer's heads as a whole, which single moves cannot (each alone adds a hop).
    """
    t = search.table
    changed = np.zeros(t.spec.layers, dtype=bool)
    for ell in layers:
        gids = t.group_ids(int(ell))
        pid = t.proj_id(int(ell))
        blocks = np.r_[gids, pid]
        prev = search.x[t.ffn_id(int(ell) - 1)] if ell > 0 else search.view.source
        # memory as if this layer's groups and projection were lifted off their devices
        room = search.cap - search.used
        room += np.bincount(
            search.x[blocks], weights=search.block_mem[blocks], minlength=search.view.size
        )
        g_mem = search.block_mem[gids[0]]
        caps = np.floor(np.maximum(room, 0.0) / g_mem).astype(np.int64)
        # projection devices worth trying: where it is, the layer input and the
        # fastest devices with room for it
        speed = search.view.compute_gflops * search.usable * (room >= search.block_mem[pid])
        tries = np.unique(np.r_[search.x[pid], prev, np.argsort(-speed)[:4]])
        _, counts = group_gather_s(
            t, search.view, search.n, np.array([prev]), caps, tries, search.links
        )
        keep = counts[0].sum(axis=1) == gids.size
        tries, counts = tries[keep], counts[0, keep]
        if tries.size == 0:
            continue
        rows = np.empty((tries.size, blocks.size), dtype=np.int64)
        for i, p in enumerate(tries):
            # keep groups where they are when the spread allows, to move as few as possible
            rows[i, :-1] = groups_from_counts(counts[i], gids, search.x)
            rows[i, -1] = p
        delta = search.score(blocks, rows)
        i = int(np.argmin(delta))
        if _is_gain(search, delta[i]):
            search.apply(blocks, rows[i])
            changed[ell] = True
    return changed


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
        deltas = np.array(
            [search.score(np.array([b, p]), np.array([[search.x[p], db]]))[0] for p in partners]
        )
        i = int(np.argmin(deltas))
        if _is_gain(search, deltas[i]):
            p = int(partners[i])
            changed[[search.block_layer[b], search.block_layer[p]]] = True
            search.apply(np.array([b, p]), np.array([search.x[p], db]))
            tight = search.cap - search.used < search.block_mem.max()
    return changed


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
