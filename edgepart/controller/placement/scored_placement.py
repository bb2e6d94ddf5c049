"""A placement with the bookkeeping to score changes of a few blocks incrementally.

The local search of the myopic planner tries thousands of candidate moves per decision;
pricing each on the whole ``edgepart.controller.cost`` objective would cost a full pass over the
model. ``ScoredPlacement`` keeps per-layer delays, per-device memory and per-link
migration load, so a candidate is priced on the layers it touches (and the migration
maximum), vectorised over blocks and target devices, and ``apply`` updates the books.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from edgepart.controller import cost
from edgepart.controller.view import ResourceView
from edgepart.llm.blocks import BlockKind, BlockTable, hidden_bytes

__all__ = ["MEMORY_SLACK_BYTES", "ScoredPlacement"]

#: Bytes by which a device may seem over its memory and still count as fitting. Memory in
#: use is a running float sum (blocks added and removed move by move), so a device filled
#: exactly to capacity can round to just above it; without the slack such a placement
#: would read as infeasible, and a move that leaves a device's use unchanged as growing it.
MEMORY_SLACK_BYTES = 1e-6


class ScoredPlacement:
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
        if (self.used > self.cap + MEMORY_SLACK_BYTES).any():
            return float("inf")
        return self.k * (float(self.layer_s.sum()) + self.tail_s) + self.mig_s

    def feasible(self) -> bool:
        """Whether every block sits on a usable device within memory."""
        return bool(
            self.usable[self.x].all() and (self.used <= self.cap + MEMORY_SLACK_BYTES).all()
        )

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
        fits = (used <= self.cap + MEMORY_SLACK_BYTES) | (used <= self.used + MEMORY_SLACK_BYTES)
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

    def classes(self, blocks: Iterable[int]) -> list[int]:
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

    def _retarget_s(
        self, layers: np.ndarray, slot_mask: np.ndarray, targets: np.ndarray | None = None
    ) -> np.ndarray:
        """Per-token delay change (s) of moving the masked slots of each layer to each device.

        layers (R,), slot_mask (R, per_layer) -> (R, D), or (R, T) for given targets (R, T).
        Covers the layer itself, and where its FFN moves, the next layer's input (or the hop
        back to the LM head).
        """
        t = self.table
        if targets is None:
            targets = np.broadcast_to(np.arange(self.view.size), (layers.size, self.view.size))
        count = targets.shape[1]
        per = self.x.reshape(t.spec.layers, t.per_layer)
        cfg = np.where(slot_mask[:, None, :], targets[:, :, None], per[layers][:, None, :])
        prev = np.where(layers > 0, per[np.maximum(layers - 1, 0), t.groups + 1], self.view.source)
        prev = np.repeat(prev[:, None], count, axis=1)
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
            shape = (inner.size, count)
            new_next = cost.layer_delays(
                t,
                self.view,
                self.n,
                targets[inner][..., None],
                np.broadcast_to(nxt[:, None, None, : t.groups], (*shape, 1, t.groups)),
                np.broadcast_to(nxt[:, None, None, t.groups], (*shape, 1)),
                np.broadcast_to(nxt[:, None, None, t.groups + 1], (*shape, 1)),
                self.links,
            )[..., 0]
            delta[inner] += new_next - self.layer_s[layers[inner] + 1][:, None]
        last = np.nonzero(ffn_moves & (layers == self.last_layer))[0]
        if last.size:
            delta[last] += cost.source_overhead_s(t, self.view, targets[last]) - self.tail_s
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
        ok = self.used[None, :] + mem[:, None] <= self.cap[None, :] + MEMORY_SLACK_BYTES
        ok &= self.usable[None, :] & (targets[None, :] != here[:, None])
        layer = self.block_layer[b]
        slot_mask = np.zeros((r, t.per_layer), dtype=bool)
        slot_mask[np.arange(r), b - layer * t.per_layer] = True
        delta = self.k * self._retarget_s(layer, slot_mask)
        delta += self._single_mig_delta(b)
        return np.where(ok, delta, np.inf)

    def decode_change_s(self, blocks: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Decode-delay change (s, horizon) of moving each block alone to its target: (R,).

        Migration and memory are left out (the caller prices them).
        """
        t = self.table
        b = np.asarray(blocks, dtype=np.int64)
        layer = self.block_layer[b]
        slot_mask = np.zeros((b.size, t.per_layer), dtype=bool)
        slot_mask[np.arange(b.size), b - layer * t.per_layer] = True
        return self.k * self._retarget_s(layer, slot_mask, np.asarray(targets)[:, None])[:, 0]

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
        fits = self.used[None, :] + gain <= self.cap[None, :] + MEMORY_SLACK_BYTES
        ok = fits & self.usable[None, :]
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

    def members(self, b: int) -> np.ndarray:
        """Blocks interchangeable with b (same layer, kind, device and origin)."""
        same = (
            (self.block_layer == self.block_layer[b])
            & (self.kind == self.kind[b])
            & (self.x == self.x[b])
        )
        if self.cur is not None:
            same &= self.cur == self.cur[b]
        return np.nonzero(same)[0]
