"""The myopic planner: resource-aware head-level placement with migration on re-plans.

The policy of arXiv 2505.02533 — at every re-plan, choose the placement that
minimises migration delay now plus predicted decode delay until the next re-plan,
under the devices' memory until then — made stronger:

1. Seeds. The per-token latency of a placement without memory limits decomposes
   along the layer chain (a layer only sees the device its input comes from), so
   a dynamic programme over layers with the FFN device as state gives the
   unconstrained latency optimum; for fixed input and projection devices the
   best spread of a layer's KV groups is a min-max allocation solved exactly by
   taking the G smallest per-device finish times. That optimum, repaired for
   memory, is one seed; a resource-aware greedy that walks the layers with the
   memory left on each device is another (the paper's greedy, made exact per
   layer); the current placement (no migration) and the layer splits
   (EdgeShard, memory-proportional) are the rest, so the result is never worse
   than any of them.
2. Local search on the exact objective of ``controller.cost``: single-block
   moves, moves of a layer's projection+FFN pair and of whole layers, moving or
   exchanging everything two devices hold, and swaps when memory is tight.
   Candidates are scored incrementally (only the layers they touch) and
   vectorised over blocks and target devices. Small instances add random kicks
   (iterated local search) with a fixed seed, so decisions are deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from controller import cost
from controller.placement.base import NoFeasiblePlacement, Placement
from controller.placement.layers import layer_split_candidates
from controller.view import ResourceView
from llm.blocks import BlockKind, BlockTable, hidden_bytes

_EPS = 1e-12


@dataclass
class MyopicPlanner:
    """Greedy/DP seeded local search minimising migration + interval decode delay."""

    name: str = "myopic"
    replans: bool = True
    max_rounds: int = 12
    layer_seeds: bool = True
    swaps: bool = True
    #: blocks x devices up to which an instance counts as small: every seed is searched
    small_size: int = 4000
    #: blocks x devices up to which the planner also spends on a quadratic greedy
    #: construction, random kicks and many swaps (tiny instances, where they pay off)
    tiny_size: int = 400
    max_kicks: int = 40
    #: on large instances, repair the memory-blind optimum only if at most this fraction
    #: of the model's bytes overflows (a bigger repair costs more than it tends to gain)
    repair_limit: float = 0.25
    seed: int = 0
    last_objective_s: float = field(default=float("nan"), init=False)

    def place(self, view: ResourceView, model: BlockTable, current: Placement | None) -> Placement:
        """Best placement found for the view's planning window (raises NoFeasiblePlacement)."""
        if not view.usable[view.source]:
            raise NoFeasiblePlacement(
                f"source device {view.devices[view.source]} is down or has no resources left: "
                "embedding, LM head and sampling cannot run"
            )
        cur = None if current is None else _alive_current(view, current.assignment)
        starts = [_Search(model, view, seed, cur) for seed in self._seeds(view, model, cur)]
        starts = sorted((s for s in starts if s.feasible()), key=_Search.objective)
        small = model.size * view.size <= self.small_size
        best: _Search | None = None
        for search in starts:
            # on large instances a seed that starts behind the best result so far is skipped:
            # the search time goes to the seeds most likely to win
            if best is not None and not small and search.objective() >= best.objective():
                continue
            search.improve(self.max_rounds, self._swap_budget(model, view))
            if best is None or search.objective() < best.objective() - _EPS:
                best = search
        if best is not None:
            best = self._kick(best, model, view, cur)
        if best is None:
            raise NoFeasiblePlacement(
                f"no placement of {model.spec.name} fits the devices' memory up to context "
                f"{view.window.interval_end_context}"
            )
        self.last_objective_s = best.objective()
        return Placement(best.x.copy())

    def _swap_budget(self, model: BlockTable, view: ResourceView) -> int:
        """How many swaps one local search may score: generous on small instances only."""
        if not self.swaps:
            return 0
        size = model.size * view.size
        return max(50, 200 * self.tiny_size // size) if size <= self.tiny_size else 16

    def _kick(
        self, best: _Search, model: BlockTable, view: ResourceView, cur: np.ndarray | None
    ) -> _Search:
        """Iterated local search on tiny instances, keeping what improves.

        First kicks (a few random moves and swaps of the best placement so far), then
        half as many restarts (the greedy construction from a random tentative
        placement), each followed by the local search; the random streams are seeded,
        so a decision is reproducible.
        """
        size = model.size * view.size
        kicks = min(self.max_kicks, 10 * self.tiny_size // size) if size <= self.tiny_size else 0
        rng = np.random.default_rng(self.seed)
        restarts = np.random.default_rng(self.seed + 1)
        usable = np.nonzero(view.usable)[0]
        for turn in range(kicks + kicks // 2):
            if turn >= kicks:
                start = sequential_fix(model, view, restarts.choice(usable, model.size), cur)
                if start is None:
                    continue
                trial = _Search(model, view, start, cur)
            else:
                trial = _Search(model, view, best.x, cur)
                for _ in range(int(rng.integers(2, 5))):
                    b = int(rng.integers(model.size))
                    if rng.random() < 0.5:
                        targets = np.array([int(rng.choice(usable))])
                        blocks = np.array([b])
                    else:
                        other = int(rng.integers(model.size))
                        blocks = np.array([b, other])
                        targets = trial.x[[other, b]]
                    if np.isfinite(trial.score(blocks, targets[None, :])[0]):
                        trial.apply(blocks, targets)
            if not trial.feasible():
                continue
            trial.improve(self.max_rounds, self._swap_budget(model, view))
            if trial.objective() < best.objective() - _EPS:
                best = trial
        return best

    def _seeds(
        self, view: ResourceView, model: BlockTable, cur: np.ndarray | None
    ) -> Iterable[np.ndarray]:
        small = model.size * view.size <= self.small_size
        if cur is not None and (cur >= 0).all():
            yield cur.copy()
        free = group_gather_s(
            model,
            view,
            view.window.mean_context,
            np.arange(view.size),
            np.full(view.size, model.groups),
        )
        chain = chain_optimum(model, view, cur, free)
        greedy = greedy_chain(model, view, cur, free[0].min(axis=1))
        if greedy is not None:
            yield greedy
        if small or _overflow_fraction(model, view, chain) <= self.repair_limit:
            repaired = repair_memory(model, view, chain, cur)
            if repaired is not None:
                yield repaired
        if cur is not None and not (cur >= 0).all():
            patched = np.where(cur >= 0, cur, chain)
            repaired = repair_memory(model, view, patched, cur)
            if repaired is not None:
                yield repaired
        if model.size * view.size <= self.tiny_size:
            fixed = sequential_fix(model, view, chain, cur)
            if fixed is not None:
                yield fixed
        if self.layer_seeds:
            for placement in layer_split_candidates(view, model):
                yield placement.assignment.copy()


def _overflow_fraction(table: BlockTable, view: ResourceView, x: np.ndarray) -> float:
    """Bytes over the devices' memory as a fraction of all block bytes."""
    n = view.window.interval_end_context
    over = cost.memory_use(table, view, x, n) - view.memory_bytes
    return float(np.clip(over, 0, None).sum() / table.memory_bytes(n).sum())


def _alive_current(view: ResourceView, current: np.ndarray) -> np.ndarray:
    """The current assignment with blocks on dead devices marked -1 (their state is lost)."""
    cur = np.asarray(current, dtype=np.int64).copy()
    cur[(cur >= 0) & ~view.alive[np.clip(cur, 0, None)]] = -1
    return cur


# ---------------------------------------------------------------------------
# Seed: the latency optimum without memory limits, exactly, by DP over layers.


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
    d_count = view.size
    g = table.groups
    speed = view.compute_gflops * cost.GFLOP
    gid = table.group_ids(0)[0]
    if links is None:
        links = cost.LinkTables.of(view, hidden_bytes(table.spec))
    if projections is None:
        projections = np.arange(d_count)
    with np.errstate(divide="ignore", invalid="ignore"):
        g_s = table.flops(n)[gid] / speed  # (D,)
        k = np.arange(1, g + 1)
        # finish[i, j, d, k-1]: when device d is done if it runs k groups
        to_proj = links.latency_s.T[projections]  # (P, d)
        fixed = links.hidden_hop_s[inputs][:, None, :] + to_proj[None, :, :]
        slope = g_s[None, :] + table.output_bytes[gid] * links.s_per_byte.T[projections]
        finish = fixed[..., None] + slope[None, :, :, None] * k
    allowed = (k[None, :] <= caps[:, None]) & view.usable[:, None]  # (d, k)
    finish = np.where(allowed[None, None], np.nan_to_num(finish, nan=np.inf), np.inf)
    flat = finish.reshape(len(inputs), len(projections), d_count * g)
    kth = np.partition(flat, g - 1, axis=-1)[..., g - 1]  # the G-th smallest finish
    counts = (finish <= kth[..., None, None]).sum(axis=-1)
    # ties can count more than G groups; dropping any of them keeps the maximum at kth
    excess = counts.sum(axis=-1) - g
    for i, p in zip(*np.nonzero(excess > 0), strict=True):
        for d in np.argsort(-counts[i, p]):
            take = min(counts[i, p, d], excess[i, p])
            counts[i, p, d] -= take
            excess[i, p] -= take
            if excess[i, p] == 0:
                break
    gather = np.maximum(kth, links.hidden_hop_s[np.ix_(inputs, projections)])
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
        x[gids] = _groups_from_counts(counts[p], gids, current)
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
        x[gids] = _groups_from_counts(counts[a, p], gids, current)
        a = f
    return x


def _groups_from_counts(
    counts: np.ndarray, gids: np.ndarray, current: np.ndarray | None
) -> np.ndarray:
    """Give each group a device so devices get ``counts`` groups, keeping groups where they are."""
    left = counts.copy()
    out = np.full(len(gids), -1, dtype=np.int64)
    if current is not None:
        for i, b in enumerate(gids):
            d = current[b]
            if d >= 0 and left[d] > 0:
                out[i] = d
                left[d] -= 1
    rest = np.repeat(np.arange(len(counts)), left)
    out[out < 0] = rest
    return out


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


def repair_memory(
    table: BlockTable, view: ResourceView, x: np.ndarray, current: np.ndarray | None
) -> np.ndarray | None:
    """Move blocks off over-full devices, cheapest objective increase first; None if stuck."""
    search = _Search(table, view, x.copy(), current)
    for _ in range(4 * table.size):
        over = search.overflow()
        if not (over > 0).any():
            return search.x
        d = int(np.argmax(over))
        if not search.relieve(d):
            return None
    return None


# ---------------------------------------------------------------------------
# Local search on the exact objective, scored incrementally.


class _Search:
    """A placement with the bookkeeping to score changes of a few blocks incrementally."""

    def __init__(
        self, table: BlockTable, view: ResourceView, x: np.ndarray, current: np.ndarray | None
    ) -> None:
        self.table = table
        self.view = view
        self.x = np.asarray(x, dtype=np.int64).copy()
        self.cur = current
        w = view.window
        self.k = w.horizon_tokens
        self.n = w.mean_context
        self.block_mem = table.memory_bytes(w.interval_end_context)
        self.cap = view.memory_bytes.astype(np.float64).copy()
        self.cap[view.source] -= table.source_weight_bytes
        self.cap[~view.usable] = 0.0
        self.usable = view.usable
        self.links = cost.LinkTables.of(view, hidden_bytes(table.spec))
        d = view.size
        self.used = np.bincount(self.x, weights=self.block_mem, minlength=d)
        self.layer_s = self._layers(np.arange(table.spec.layers), self.x[None, :])[0]
        self.tail_s = float(
            cost.source_overhead_s(table, view, self.x[table.ffn_id(table.spec.layers - 1)])
        )
        self.mig_bytes = cost.migration_bytes(table, view, w.context_tokens)
        self.link_move = view.link_move_s  # (D, D) install time per block on each link, s
        self.link_bytes = np.zeros((d, d))
        self.link_count = np.zeros((d, d), dtype=np.int64)
        if current is not None:
            moved = (self.x != current) & (current >= 0)
            np.add.at(self.link_bytes, (current[moved], self.x[moved]), self.mig_bytes[moved])
            np.add.at(self.link_count, (current[moved], self.x[moved]), 1)
        with np.errstate(divide="ignore"):
            self.link_rate = cost.BITS_PER_BYTE / (view.bandwidth_mbit * cost.MBIT)  # s/byte
        self.mig_s = self._mig_max(self.link_bytes, self.link_count)
        layer = table.layer
        self.block_layer = layer
        self.kind = table.kind
        self.last_layer = table.spec.layers - 1

    # -- scoring -------------------------------------------------------------

    def objective(self) -> float:
        """Migration + interval decode delay (s); inf if memory overflows."""
        if (self.used > self.cap + 1e-6).any():
            return float("inf")
        return self.k * (float(self.layer_s.sum()) + self.tail_s) + self.mig_s

    def feasible(self) -> bool:
        """Whether every block sits on a usable device within memory."""
        return bool(self.usable[self.x].all() and (self.used <= self.cap + 1e-6).all())

    def overflow(self) -> np.ndarray:
        """Bytes over capacity per device (negative: room left)."""
        return self.used - self.cap

    def _layers(self, layers: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Delays (C, len(layers)) of some layers under candidate assignments xs (C, B)."""
        t = self.table
        per = xs.reshape(xs.shape[0], t.spec.layers, t.per_layer)[:, layers]
        prev = np.where(
            layers > 0,
            xs[:, [t.ffn_id(max(ell - 1, 0)) for ell in layers]],
            self.view.source,
        )
        return cost.layer_delays(
            t,
            self.view,
            self.n,
            prev,
            per[:, :, : t.groups],
            per[:, :, t.groups],
            per[:, :, t.groups + 1],
            self.links,
        )

    def _mig_max(self, link_bytes: np.ndarray, link_count: np.ndarray) -> float:
        if self.cur is None or not link_count.any():
            return 0.0
        with np.errstate(invalid="ignore"):
            t = self.view.latency_s + link_bytes * self.link_rate + link_count * self.link_move
        return float(np.where(link_count > 0, t, 0.0).max())

    def score(self, blocks: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Objective change (s) of moving blocks to targets (C, S); inf where memory breaks."""
        blocks = np.asarray(blocks)
        c = targets.shape[0]
        # memory
        used = np.broadcast_to(self.used, (c, self.view.size)).copy()
        used -= np.bincount(
            self.x[blocks], weights=self.block_mem[blocks], minlength=self.view.size
        )
        rows = np.arange(c)[:, None] * self.view.size
        used += np.bincount(
            (rows + targets).ravel(),
            weights=np.broadcast_to(self.block_mem[blocks], targets.shape).ravel(),
            minlength=c * self.view.size,
        ).reshape(c, self.view.size)
        # a device may stay over capacity (while memory is being repaired) but not grow
        fits = (used <= self.cap + 1e-6) | (used <= self.used + 1e-6)
        ok = fits.all(axis=1) & self.usable[targets].all(axis=1)
        # latency of the layers touched
        layers = set(self.block_layer[blocks].tolist())
        touches_tail = False
        for b in blocks:
            if self.kind[b] == BlockKind.FFN:
                ell = int(self.block_layer[b])
                if ell < self.last_layer:
                    layers.add(ell + 1)
                else:
                    touches_tail = True
        layer_ids = np.array(sorted(layers))
        xs = np.broadcast_to(self.x, (c, self.x.size)).copy()
        xs[:, blocks] = targets
        new_layers = self._layers(layer_ids, xs).sum(axis=1)
        delta = self.k * (new_layers - self.layer_s[layer_ids].sum())
        if touches_tail:
            new_tail = cost.source_overhead_s(
                self.table, self.view, xs[:, self.table.ffn_id(self.last_layer)]
            )
            delta = delta + self.k * (new_tail - self.tail_s)
        delta = delta + self._mig_delta(blocks, targets)
        return np.where(ok, delta, np.inf)

    def _mig_delta(self, blocks: np.ndarray, targets: np.ndarray) -> np.ndarray:
        if self.cur is None:
            return np.zeros(targets.shape[0])
        cur = self.cur[blocks]
        lb = self.link_bytes.copy()
        lc = self.link_count.copy()
        was = (self.x[blocks] != cur) & (cur >= 0)
        np.subtract.at(lb, (cur[was], self.x[blocks][was]), self.mig_bytes[blocks][was])
        np.subtract.at(lc, (cur[was], self.x[blocks][was]), 1)
        base = self._mig_max(lb, lc)
        # additions only raise the links they touch, so the new maximum is the larger of
        # the untouched maximum and the touched links' new times
        moving = (targets != cur) & (cur >= 0)  # (C, S)
        if not moving.any():
            return np.full(targets.shape[0], base - self.mig_s)
        d = self.view.size
        link = np.where(cur >= 0, cur, 0) * d + targets  # (C, S)
        same = (link[:, :, None] == link[:, None, :]) & moving[:, None, :]
        added = (same * self.mig_bytes[blocks][None, None, :]).sum(axis=2)  # (C, S)
        added_count = same.sum(axis=2)  # (C, S)
        with np.errstate(invalid="ignore"):
            t = (
                self.view.latency_s.ravel()[link]
                + (lb.ravel()[link] + added) * (self.link_rate.ravel()[link])
                + (lc.ravel()[link] + added_count) * self.link_move.ravel()[link]
            )
        t = np.where(moving, t, 0.0)
        return np.maximum(base, t.max(axis=1)) - self.mig_s

    # -- changes -------------------------------------------------------------

    def apply(self, blocks: np.ndarray, targets: np.ndarray) -> None:
        """Move blocks to targets (one row) and update the bookkeeping."""
        blocks = np.asarray(blocks)
        targets = np.asarray(targets)
        old = self.x[blocks].copy()
        np.subtract.at(self.used, old, self.block_mem[blocks])
        np.add.at(self.used, targets, self.block_mem[blocks])
        if self.cur is not None:
            cur = self.cur[blocks]
            was = (old != cur) & (cur >= 0)
            np.subtract.at(self.link_bytes, (cur[was], old[was]), self.mig_bytes[blocks][was])
            np.subtract.at(self.link_count, (cur[was], old[was]), 1)
            now = (targets != cur) & (cur >= 0)
            np.add.at(self.link_bytes, (cur[now], targets[now]), self.mig_bytes[blocks][now])
            np.add.at(self.link_count, (cur[now], targets[now]), 1)
            self.mig_s = self._mig_max(self.link_bytes, self.link_count)
        self.x[blocks] = targets
        layers = np.unique(
            np.concatenate(
                [
                    self.block_layer[blocks],
                    np.minimum(self.block_layer[blocks] + 1, self.last_layer),
                ]
            )
        )
        self.layer_s[layers] = self._layers(layers, self.x[None, :])[0]
        self.tail_s = float(
            cost.source_overhead_s(
                self.table, self.view, self.x[self.table.ffn_id(self.last_layer)]
            )
        )

    def _classes(self, blocks: Iterable[int]) -> list[int]:
        """One representative per set of interchangeable blocks (layer, kind, device, origin)."""
        seen: set[tuple[int, int, int, int]] = set()
        reps = []
        for b in blocks:
            origin = -2 if self.cur is None else int(self.cur[b])
            key = (int(self.block_layer[b]), int(self.kind[b]), int(self.x[b]), origin)
            if key not in seen:
                seen.add(key)
                reps.append(int(b))
        return reps

    def _retarget_s(self, layers: np.ndarray, slot_mask: np.ndarray) -> np.ndarray:
        """Per-token delay change (s) of moving the masked slots of each layer to each device.

        layers (R,), slot_mask (R, per_layer) -> (R, D). Covers the layer itself, and where
        its FFN moves, the next layer's input (or the hop back to the LM head).
        """
        t = self.table
        d_count = self.view.size
        targets = np.arange(d_count)
        per = self.x.reshape(t.spec.layers, t.per_layer)
        cfg = np.where(slot_mask[:, None, :], targets[None, :, None], per[layers][:, None, :])
        prev = np.where(layers > 0, per[np.maximum(layers - 1, 0), t.groups + 1], self.view.source)
        prev = np.repeat(prev[:, None], d_count, axis=1)
        new = cost.layer_delays(
            t,
            self.view,
            self.n,
            prev[..., None],
            cfg[:, :, None, : t.groups],
            cfg[:, :, None, t.groups],
            cfg[:, :, None, t.groups + 1],
            self.links,
        )[..., 0]
        delta = new - self.layer_s[layers][:, None]
        ffn_moves = slot_mask[:, t.groups + 1]
        inner = np.nonzero(ffn_moves & (layers < self.last_layer))[0]
        if inner.size:
            nxt = per[layers[inner] + 1]
            shape = (inner.size, d_count)
            new_next = cost.layer_delays(
                t,
                self.view,
                self.n,
                np.broadcast_to(targets, shape)[..., None],
                np.broadcast_to(nxt[:, None, None, : t.groups], (*shape, 1, t.groups)),
                np.broadcast_to(nxt[:, None, None, t.groups], (*shape, 1)),
                np.broadcast_to(nxt[:, None, None, t.groups + 1], (*shape, 1)),
                self.links,
            )[..., 0]
            delta[inner] += new_next - self.layer_s[layers[inner] + 1][:, None]
        last = np.nonzero(ffn_moves & (layers == self.last_layer))[0]
        if last.size:
            delta[last] += (cost.source_overhead_s(t, self.view, targets) - self.tail_s)[None, :]
        return delta

    def single_moves(self, blocks: np.ndarray) -> np.ndarray:
        """Objective change (s) of moving each block alone to each device: (len(blocks), D).

        Exact for each move taken on its own against the current state (inf where memory
        or a dead device forbids it, and for staying put), all scored in one vectorised pass.
        """
        t = self.table
        d_count = self.view.size
        b = np.asarray(blocks, dtype=np.int64)
        r = b.size
        targets = np.arange(d_count)
        here = self.x[b]
        mem = self.block_mem[b]
        ok = self.used[None, :] + mem[:, None] <= self.cap[None, :] + 1e-6
        ok &= self.usable[None, :] & (targets[None, :] != here[:, None])
        layer = self.block_layer[b]
        slot_mask = np.zeros((r, t.per_layer), dtype=bool)
        slot_mask[np.arange(r), b - layer * t.per_layer] = True
        delta = self.k * self._retarget_s(layer, slot_mask)
        delta += self._single_mig_delta(b)
        return np.where(ok, delta, np.inf)

    def layer_moves_latency(self, layers: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Decode-delay change (s, interval) of moving the given slots of each layer to each device.

        (len(layers), D); inf where memory or a dead device forbids it. Migration is left
        out: this screens candidates, which ``score`` then prices exactly.
        """
        t = self.table
        d_count = self.view.size
        slot_mask = np.zeros((layers.size, t.per_layer), dtype=bool)
        slot_mask[:, slots] = True
        delta = self._retarget_s(layers, slot_mask)
        blocks = layers[:, None] * t.per_layer + slots[None, :]  # (R, S)
        moving_mem = self.block_mem[blocks]
        # bytes each target would gain: the moved blocks not already on it
        gain = moving_mem.sum(axis=1)[:, None] - np.stack(
            [
                np.bincount(self.x[row], weights=moving_mem[i], minlength=d_count)
                for i, row in enumerate(blocks)
            ]
        )
        ok = (self.used[None, :] + gain <= self.cap[None, :] + 1e-6) & self.usable[None, :]
        return np.where(ok, self.k * delta, np.inf)

    def _single_mig_delta(self, b: np.ndarray) -> np.ndarray:
        """Migration-delay change (s) of moving each block alone to each device: (R, D)."""
        d_count = self.view.size
        if self.cur is None:
            return np.zeros((b.size, d_count))
        cur = self.cur[b]
        here = self.x[b]
        with np.errstate(invalid="ignore"):
            link_s = (
                self.view.latency_s
                + self.link_bytes * self.link_rate
                + self.link_count * self.link_move
            )
        link_s = np.where(self.link_count > 0, link_s, 0.0).ravel()
        order = np.argsort(link_s)[-2:] if link_s.size > 1 else np.array([0, 0])
        top1, top2 = link_s[order[-1]], link_s[order[0]]
        # the maximum without the block's current transfer (only its own link changes)
        moved_now = (here != cur) & (cur >= 0)
        own = np.where(moved_now, cur * d_count + here, -1)
        own_left = np.zeros(b.size)
        rest = np.nonzero(moved_now)[0]
        if rest.size:
            e = own[rest]
            count_left = self.link_count.ravel()[e] - 1
            bytes_left = self.link_bytes.ravel()[e] - self.mig_bytes[b[rest]]
            with np.errstate(invalid="ignore"):
                own_left[rest] = np.where(
                    count_left > 0,
                    self.view.latency_s.ravel()[e]
                    + bytes_left * self.link_rate.ravel()[e]
                    + count_left * self.link_move.ravel()[e],
                    0.0,
                )
        others = np.where(own == order[-1], top2, top1)
        base = np.where(moved_now, np.maximum(others, own_left), top1)
        # the transfer each target would add on link cur -> target
        targets = np.arange(d_count)
        link = np.clip(cur, 0, None)[:, None] * d_count + targets[None, :]
        with np.errstate(invalid="ignore"):
            added = (
                self.view.latency_s.ravel()[link]
                + (self.link_bytes.ravel()[link] + self.mig_bytes[b][:, None])
                * self.link_rate.ravel()[link]
                + (self.link_count.ravel()[link] + 1) * self.link_move.ravel()[link]
            )
        adds = (cur[:, None] >= 0) & (targets[None, :] != cur[:, None])
        new = np.maximum(base[:, None], np.where(adds, added, 0.0))
        return new - self.mig_s

    def best_single_move(self, b: int) -> tuple[float, int]:
        """Best (objective change, device) for moving block b alone."""
        delta = self.single_moves(np.array([b]))[0]
        d = int(np.argmin(delta))
        return float(delta[d]), d

    def relieve(self, device: int) -> bool:
        """Move blocks off an overfull device, cheapest objective increase per byte first."""
        on = np.nonzero(self.x == device)[0]
        reps = np.array(self._classes(on), dtype=np.int64)
        deltas = self.single_moves(reps)
        best_to = deltas.argmin(axis=1)
        cost_per_byte = deltas[np.arange(reps.size), best_to] / np.maximum(
            self.block_mem[reps], 1.0
        )
        moved = False
        # one ranking frees many blocks: the ranking goes stale as blocks land, but a
        # repair only needs a good feasible start, which the local search then polishes
        for i in np.argsort(cost_per_byte):
            if not np.isfinite(cost_per_byte[i]):
                break
            for m in self._members(int(reps[i])):
                if self.used[device] <= self.cap[device] + 1e-6:
                    return True
                d = int(best_to[i])
                if self.used[d] + self.block_mem[m] > self.cap[d] + 1e-6:
                    delta, d = self.best_single_move(int(m))
                    if not np.isfinite(delta):
                        break
                self.apply(np.array([m]), np.array([d]))
                moved = True
        if self.used[device] <= self.cap[device] + 1e-6:
            return True
        return moved or self._relieve_loose(device, on)

    def _members(self, b: int) -> np.ndarray:
        """Blocks interchangeable with b (same layer, kind, device and origin)."""
        same = (
            (self.block_layer == self.block_layer[b])
            & (self.kind == self.kind[b])
            & (self.x == self.x[b])
        )
        if self.cur is not None:
            same &= self.cur == self.cur[b]
        return np.nonzero(same)[0]

    def _relieve_loose(self, device: int, on: np.ndarray) -> bool:
        """Last resort: move the biggest block to the device with most room."""
        room = self.cap - self.used
        room[device] = -np.inf
        room[~self.usable] = -np.inf
        b = int(on[np.argmax(self.block_mem[on])]) if on.size else -1
        if b < 0:
            return False
        d = int(np.argmax(room))
        if room[d] < self.block_mem[b]:
            return False
        self.apply(np.array([b]), np.array([d]))
        return True

    def improve(self, max_rounds: int, swap_budget: int = 0) -> None:
        """Descend with moves (and up to swap_budget scored swaps) until nothing improves.

        Only layers changed in the previous round (and their neighbours) are searched
        again: a move elsewhere cannot have changed what a block there would gain,
        except through the shared migration maximum, which the final full round checks.
        """
        t = self.table
        layer_count = t.spec.layers
        all_targets = np.arange(self.view.size)[:, None]
        dirty = np.ones(layer_count, dtype=bool)
        full_check_done = False
        for _ in range(max_rounds):
            changed = np.zeros(layer_count, dtype=bool)
            layers = np.nonzero(dirty)[0]
            blocks = [
                b for ell in layers for b in range(ell * t.per_layer, (ell + 1) * t.per_layer)
            ]
            reps = np.array(self._classes(blocks), dtype=np.int64)
            deltas = self.single_moves(reps)
            best_to = deltas.argmin(axis=1)
            gains = deltas[np.arange(reps.size), best_to]
            mig_at_scoring = self.mig_s
            # most promising first; a move whose layers (or the migration maximum) another
            # move changed meanwhile is scored again against the state it meets
            for i in np.argsort(gains):
                if not gains[i] < -_EPS * max(1.0, self.objective()):
                    break
                b = int(reps[i])
                ell = int(self.block_layer[b])
                near = changed[max(ell - 1, 0) : ell + 2].any()
                d = int(best_to[i])
                fresh = (
                    not near
                    and self.mig_s == mig_at_scoring
                    and self.used[d] + self.block_mem[b] <= self.cap[d] + 1e-6
                )
                if not fresh:
                    delta, d = self.best_single_move(b)
                    if not delta < -_EPS * max(1.0, self.objective()):
                        continue
                self.apply(np.array([b]), np.array([d]))
                changed[ell] = True
            if not changed.any():
                # compound moves only where single moves are stuck; screened for all layers
                # at once on latency and memory, then scored exactly one by one
                for slots in (np.array([t.groups, t.groups + 1]), np.arange(t.per_layer)):
                    screen = self.layer_moves_latency(layers, slots)
                    for i in np.argsort(screen.min(axis=1)):
                        if not screen[i].min() < -_EPS * max(1.0, self.objective()):
                            break
                        ell = int(layers[i])
                        group = ell * t.per_layer + slots
                        delta = self.score(group, np.repeat(all_targets, len(group), axis=1))
                        d = int(np.argmin(delta))
                        if delta[d] < -_EPS * max(1.0, self.objective()):
                            self.apply(group, np.full(len(group), d))
                            changed[ell] = True
            if not changed.any():
                changed |= self._rebalance_pass(layers)
            if not changed.any():
                changed |= self._device_pass()
            if not changed.any() and swap_budget > 0:
                changed |= self._swap_pass(swap_budget)
            if not changed.any():
                if full_check_done or dirty.all():
                    return
                dirty[:] = True  # one last full round before declaring a local optimum
                full_check_done = True
                continue
            full_check_done = False
            dirty = changed | np.roll(changed, 1) | np.roll(changed, -1)

    def _rebalance_pass(self, layers: np.ndarray) -> np.ndarray:
        """Re-spread each layer's KV groups exactly (min-max in memory) per projection device.

        For a fixed layer input and projection device the best spread of the groups is
        exact (``group_gather_s``); trying it for each projection device moves a
        layer's heads as a whole, which single moves cannot (each alone adds a hop).
        """
        t = self.table
        changed = np.zeros(t.spec.layers, dtype=bool)
        for ell in layers:
            gids = t.group_ids(int(ell))
            pid = t.proj_id(int(ell))
            blocks = np.r_[gids, pid]
            prev = self.x[t.ffn_id(int(ell) - 1)] if ell > 0 else self.view.source
            # memory as if this layer's groups and projection were lifted off their devices
            room = self.cap - self.used
            room += np.bincount(
                self.x[blocks], weights=self.block_mem[blocks], minlength=self.view.size
            )
            g_mem = self.block_mem[gids[0]]
            caps = np.floor(np.maximum(room, 0.0) / g_mem).astype(np.int64)
            # projection devices worth trying: where it is, the layer input and the
            # fastest devices with room for it
            speed = self.view.compute_gflops * self.usable * (room >= self.block_mem[pid])
            tries = np.unique(np.r_[self.x[pid], prev, np.argsort(-speed)[:4]])
            _, counts = group_gather_s(
                t, self.view, self.n, np.array([prev]), caps, tries, self.links
            )
            keep = counts[0].sum(axis=1) == gids.size
            tries, counts = tries[keep], counts[0, keep]
            if tries.size == 0:
                continue
            rows = np.empty((tries.size, blocks.size), dtype=np.int64)
            for i, p in enumerate(tries):
                # keep groups where they are when the spread allows, to move as few as possible
                rows[i, :-1] = _groups_from_counts(counts[i], gids, self.x)
                rows[i, -1] = p
            delta = self.score(blocks, rows)
            i = int(np.argmin(delta))
            if delta[i] < -_EPS * max(1.0, self.objective()):
                self.apply(blocks, rows[i])
                changed[ell] = True
        return changed

    def _device_pass(self, limit: int = 60) -> np.ndarray:
        """Move everything a device holds to another device, or exchange two devices' contents.

        Such moves shift whole shards at once, where single-layer steps would each pay a
        new hop before the last of them pays off. Scored exactly on the full objective.
        """
        changed = np.zeros(self.table.spec.layers, dtype=bool)
        held = np.unique(self.x)
        usable = np.nonzero(self.usable)[0]
        # the fastest devices first, so that a capped candidate list keeps the likeliest
        usable = usable[np.argsort(-self.view.compute_gflops[usable], kind="stable")]
        per_source = max(2, limit // max(1, held.size))
        pairs = [(a, b) for a in held for b in usable[: per_source + 1] if a != b][:limit]
        if not pairs:
            return changed
        candidates = np.empty((2 * len(pairs), self.x.size), dtype=np.int64)
        for i, (a, b) in enumerate(pairs):
            moved = self.x.copy()
            moved[self.x == a] = b
            candidates[2 * i] = moved
            moved = moved.copy()
            moved[self.x == b] = a
            candidates[2 * i + 1] = moved
        objective = np.atleast_1d(
            cost.interval_objective_s(self.table, self.view, candidates, self.cur)
        )
        i = int(np.argmin(objective))
        if objective[i] < self.objective() * (1 - 1e-9):
            diff = np.nonzero(candidates[i] != self.x)[0]
            changed[np.unique(self.block_layer[diff])] = True
            self.apply(diff, candidates[i][diff])
        return changed

    def _swap_pass(self, budget: int) -> np.ndarray:
        """Exchange two blocks between devices where memory blocks plain moves; changed layers."""
        changed = np.zeros(self.table.spec.layers, dtype=bool)
        tight = self.cap - self.used < self.block_mem.max()
        if not tight.any():
            return changed
        reps = np.array(self._classes(range(self.table.size)))
        scored = 0
        for b in reps:
            if scored >= budget:
                break
            db = self.x[b]
            partners = reps[(self.x[reps] != db) & tight[self.x[reps]]]
            if partners.size == 0:
                continue
            partners = partners[: budget - scored]
            scored += partners.size
            deltas = np.array(
                [self.score(np.array([b, p]), np.array([[self.x[p], db]]))[0] for p in partners]
            )
            i = int(np.argmin(deltas))
            if deltas[i] < -_EPS * max(1.0, self.objective()):
                p = int(partners[i])
                changed[[self.block_layer[b], self.block_layer[p]]] = True
                self.apply(np.array([b, p]), np.array([self.x[p], db]))
                tight = self.cap - self.used < self.block_mem.max()
        return changed
