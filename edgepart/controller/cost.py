"""The cost model: per-token delay, migration delay and memory of placements.

Pure numpy, vectorised over a batch of placements (``assignment`` of shape
(placements, blocks), or (blocks,) for one). Units: seconds, bytes, GFLOP/s, Mbit/s.

Per layer the critical path is: the layer input leaves the previous FFN's device
(the source for layer 0) and reaches every device holding one of the layer's KV
groups; each device runs its groups in sequence and sends their outputs to the
projection's device in one message; head groups on different devices run in
parallel; the projection also needs the residual (the layer input). The
projection then runs, hands its output to the FFN, and the FFN's output feeds
the next layer (or, after the last layer, the LM head on the source). Every
cross-device hop costs latency + bytes / bandwidth; a hop within a device is free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgepart.controller.view import ResourceView
from edgepart.llm.blocks import BlockKind, BlockTable, hidden_bytes

BITS_PER_BYTE = 8.0
MBIT = 1e6
GFLOP = 1e9
#: the work of building one block from its cached weights, in GFLOP of the device's decode
#: speed: a fixed part per block (opening the cache entry, wrapping its tensors) and a
#: part per weight byte (touching its pages), measured with llm.weight_cache on SmolLM2's
#: blocks; the live controller replaces it by each device's measured times
INSTALL_FIXED_GFLOP = 0.002
INSTALL_GFLOP_PER_BYTE = 3e-10
#: one command and its reply over the broker (s), until the live controller measured it
CONTROL_RTT_PRIOR_S = 0.003
#: the work a device spends per block a commit hands it, in GFLOP of its decode speed:
#: parsing the block's state and adopting it in its compute thread. Fitted on the live
#: commits of benchmarks/adaptation (demo and its variants, SmolLM2): a commit's measured
#: time beyond its bytes, latency and control round trip came to 0.5-0.7 MFLOP per block
#: at the receiving device's available speed
COMMIT_BLOCK_GFLOP = 6e-4


def commit_block_s(available_gflops: np.ndarray) -> np.ndarray:
    """Seconds each device takes per block a commit hands it (``COMMIT_BLOCK_GFLOP`` at its
    available speed); 0 on a device with no compute, where no block is placed."""
    gflops = np.asarray(available_gflops, dtype=float)
    with np.errstate(divide="ignore"):
        return np.where(gflops > 0, COMMIT_BLOCK_GFLOP / gflops, 0.0)


def transfer_s(view: ResourceView, src: np.ndarray, dst: np.ndarray, nbytes) -> np.ndarray:
    """Time (s) to send nbytes from device src to device dst; 0 where src == dst."""
    src, dst = np.broadcast_arrays(np.asarray(src), np.asarray(dst))
    with np.errstate(divide="ignore", invalid="ignore"):
        t = view.latency_s[src, dst] + np.asarray(nbytes) * (
            BITS_PER_BYTE / (view.bandwidth_mbit[src, dst] * MBIT)
        )
    return np.where(src == dst, 0.0, t)


@dataclass(frozen=True)
class LinkTables:
    """Per-pair transfer terms of a view, precomputed: 0 on the diagonal (same device)."""

    latency_s: np.ndarray  # (D, D) s
    s_per_byte: np.ndarray  # (D, D) s/byte (inf where a link has no bandwidth)
    hidden_hop_s: np.ndarray  # (D, D) s to send one hidden state

    @classmethod
    def of(cls, view: ResourceView, hidden: float) -> LinkTables:
        """Tables for a view and the model's hidden-state size (bytes)."""
        same = np.eye(view.size, dtype=bool)
        with np.errstate(divide="ignore"):
            rate = BITS_PER_BYTE / (view.bandwidth_mbit * MBIT)
        rate = np.where(same, 0.0, rate)
        latency = np.where(same, 0.0, view.latency_s)
        return cls(latency, rate, latency + hidden * rate)


def _as_batch(assignment: np.ndarray) -> np.ndarray:
    x = np.asarray(assignment, dtype=np.int64)
    return x[None, :] if x.ndim == 1 else x


def _squeeze(result: np.ndarray, assignment: np.ndarray) -> np.ndarray | float:
    return float(result[0]) if np.asarray(assignment).ndim == 1 else result


def layer_delays(
    table: BlockTable,
    view: ResourceView,
    n: float,
    layer_input: np.ndarray,
    groups: np.ndarray,
    proj: np.ndarray,
    ffn: np.ndarray,
    links: LinkTables | None = None,
) -> np.ndarray:
    """Delay (s) of layers for batches of their configurations.

    layer_input, proj, ffn: (..., L') device of the previous FFN (or source), projection
    and FFN; groups: (..., L', G) device of each KV group. Returns (..., L') seconds.
    """
    if links is None:
        links = LinkTables.of(view, hidden_bytes(table.spec))
    d_count = view.size
    speed = view.compute_gflops * GFLOP
    g_flops = float(table.flops(n)[table.group_ids(0)][0])
    g_out = float(table.output_bytes[table.group_ids(0)][0])
    lead = groups.shape[:-1]
    flat = groups.reshape(-1, groups.shape[-1])
    rows = np.arange(flat.shape[0])[:, None] * d_count
    counts = np.bincount((rows + flat).ravel(), minlength=flat.shape[0] * d_count)
    counts = counts.reshape(*lead, d_count)
    used = counts > 0
    devices = np.arange(d_count)
    with np.errstate(divide="ignore", invalid="ignore"):
        compute = counts * (g_flops / speed)
        hop_in = links.hidden_hop_s[layer_input[..., None], devices]
        to_proj = (devices, proj[..., None])
        hop_out = links.latency_s[to_proj] + counts * g_out * links.s_per_byte[to_proj]
        device_time = np.where(used, hop_in + compute + hop_out, 0.0)
        residual = links.hidden_hop_s[layer_input, proj]
        gather = np.maximum(device_time.max(axis=-1), residual)
        proj_s = table.flops_fixed[table.proj_id(0)] / speed[proj]
        ffn_s = table.flops_fixed[table.ffn_id(0)] / speed[ffn]
        return gather + proj_s + links.hidden_hop_s[proj, ffn] + ffn_s


def split_layers(table: BlockTable, x: np.ndarray, source: int):
    """Split a batch of assignments (P, B) into per-layer (input, groups, proj, ffn) arrays."""
    per = x.reshape(x.shape[0], table.spec.layers, table.per_layer)
    groups = per[:, :, : table.groups]
    proj = per[:, :, table.groups]
    ffn = per[:, :, table.groups + 1]
    layer_input = np.concatenate([np.full((x.shape[0], 1), source), ffn[:, :-1]], axis=1)
    return layer_input, groups, proj, ffn


def per_token_s(
    table: BlockTable, view: ResourceView, assignment: np.ndarray, n: float
) -> np.ndarray | float:
    """Decode delay (s) of one token at context n for each placement (inf if a device is dead)."""
    x = _as_batch(assignment)
    layer_input, groups, proj, ffn = split_layers(table, x, view.source)
    layers = layer_delays(table, view, n, layer_input, groups, proj, ffn).sum(axis=-1)
    total = layers + source_overhead_s(table, view, ffn[:, -1])
    total = np.where(view.alive[x].all(axis=1), total, np.inf)
    return _squeeze(total, assignment)


def source_overhead_s(table: BlockTable, view: ResourceView, last_ffn: np.ndarray) -> np.ndarray:
    """Delay (s) around the layers: last hidden state back to the source, then the LM head."""
    with np.errstate(divide="ignore"):
        head_s = table.source_flops / (view.compute_gflops[view.source] * GFLOP)
    return transfer_s(view, last_ffn, view.source, hidden_bytes(table.spec)) + head_s


def migration_bytes(table: BlockTable, view: ResourceView, n: float) -> np.ndarray:
    """Bytes (per block) that moving it at context n sends: KV, plus weights from peers."""
    moved = table.kv_bytes(n)
    return moved + table.weight_bytes if view.weights_from == "peer" else moved


def migration_s(
    table: BlockTable,
    view: ResourceView,
    current: np.ndarray | None,
    assignment: np.ndarray,
    n: float,
) -> np.ndarray | float:
    """Delay (s) of moving blocks from ``current`` to ``assignment`` at context n.

    Transfers on different links run in parallel, on one link in sequence, each block
    also costing its target's ``view.move_s_per_block`` to install. Blocks
    whose current device is unknown or dead (-1) cost nothing here: they have no
    state left to move.
    """
    x = _as_batch(assignment)
    if current is None:
        return _squeeze(np.zeros(x.shape[0]), assignment)
    cur = np.asarray(current, dtype=np.int64)
    d = view.size
    moved = (x != cur) & (cur >= 0)
    link = np.where(moved, cur * d + x, 0)
    rows = np.arange(x.shape[0])[:, None] * (d * d)
    nbytes = np.broadcast_to(migration_bytes(table, view, n), x.shape)
    link_bytes = np.bincount(
        (rows + link).ravel(), weights=(nbytes * moved).ravel(), minlength=x.shape[0] * d * d
    ).reshape(x.shape[0], d * d)
    link_count = np.bincount(
        (rows + link).ravel(), weights=moved.ravel().astype(float), minlength=x.shape[0] * d * d
    ).reshape(x.shape[0], d * d)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = view.latency_s.ravel() + link_bytes * (
            BITS_PER_BYTE / (view.bandwidth_mbit.ravel() * MBIT)
        )
    t = t + link_count * view.link_move_s.ravel()
    t = np.where(link_count > 0, t, 0.0)
    return _squeeze(t.max(axis=1), assignment)


def install_prior_s(table: BlockTable, gflops: np.ndarray) -> np.ndarray:
    """Seconds to build one block of each kind (edgepart.llm.blocks.BlockKind) on devices of these
    speeds (GFLOP/s), (D, K); inf on a device with no compute."""
    kinds = len(BlockKind)
    weight = np.array([table.weight_bytes[table.kind == k].mean() for k in range(kinds)])
    work = INSTALL_FIXED_GFLOP + INSTALL_GFLOP_PER_BYTE * weight
    speed = np.asarray(gflops, dtype=float)[:, None]
    with np.errstate(divide="ignore"):
        return np.where(speed > 0, work[None, :] / speed, np.inf)


def prepare_s(
    table: BlockTable,
    view: ResourceView,
    current: np.ndarray | None,
    assignment: np.ndarray,
) -> np.ndarray | float:
    """Time (s) until every target has built the blocks it receives (a switch's prepare).

    It runs in the background while tokens go on with the current placement: each target
    builds its incoming blocks one after another (``view.install_s`` by kind), targets in
    parallel; with weights from peers each block's weights first cross the link from its
    current holder. Blocks whose holder is lost (-1) are built too (they load afresh).
    """
    x = _as_batch(assignment)
    if current is None:
        return _squeeze(np.zeros(x.shape[0]), assignment)
    cur = np.broadcast_to(np.asarray(current, dtype=np.int64), x.shape)
    incoming = x != cur
    per_block = view.install_s[x, table.kind[None, :]]
    if view.weights_from == "peer":
        holder = np.where(cur >= 0, cur, view.source)
        with np.errstate(divide="ignore", invalid="ignore"):
            wire = view.latency_s[holder, x] + table.weight_bytes * (
                BITS_PER_BYTE / (view.bandwidth_mbit[holder, x] * MBIT)
            )
        per_block = per_block + np.where(holder == x, 0.0, wire)
    d = view.size
    rows = np.arange(x.shape[0])[:, None] * d
    per_target = np.bincount(
        (rows + x).ravel(), weights=np.where(incoming, per_block, 0.0).ravel(),
        minlength=x.shape[0] * d,
    ).reshape(x.shape[0], d)  # fmt: skip
    return _squeeze(per_target.max(axis=1), assignment)


def commit_s(
    table: BlockTable,
    view: ResourceView,
    current: np.ndarray | None,
    assignment: np.ndarray,
    n: float,
) -> np.ndarray | float:
    """The stall (s) of committing a prepared switch at context n: the moved KV caches over
    their links, each block adopted by its target (``migration_s``), the targets'
    acknowledgements back over the slowest link used, and one control round trip; 0 when
    nothing moves."""
    x = _as_batch(assignment)
    moving = _as_array(migration_s(table, view, current, x, n))
    if current is not None:
        cur = np.asarray(current)
        moved = (x != cur) & (cur >= 0)
        src = np.broadcast_to(np.where(cur >= 0, cur, 0), x.shape)
        acks = np.where(moved, view.latency_s[x, src], 0.0).max(axis=1)
        moving = moving + np.where(moved.any(axis=1), acks + view.control_rtt_s, 0.0)
    return _squeeze(moving, assignment)


def memory_use(
    table: BlockTable, view: ResourceView, assignment: np.ndarray, n: float
) -> np.ndarray:
    """Resident bytes per device at context n, pinned source blocks included: (P, D) or (D,)."""
    x = _as_batch(assignment)
    d = view.size
    rows = np.arange(x.shape[0])[:, None] * d
    mem = np.bincount(
        (rows + x).ravel(),
        weights=np.broadcast_to(table.memory_bytes(n), x.shape).ravel(),
        minlength=x.shape[0] * d,
    ).reshape(x.shape[0], d)
    mem[:, view.source] += table.source_weight_bytes
    return mem[0] if np.asarray(assignment).ndim == 1 else mem


def fits(
    table: BlockTable, view: ResourceView, assignment: np.ndarray, n: float
) -> np.ndarray | bool:
    """Whether every device's memory holds its blocks at context n and all are alive."""
    x = _as_batch(assignment)
    ok = (memory_use(table, view, x, n) <= view.memory_bytes).all(axis=1)
    ok &= view.alive[x].all(axis=1)
    return bool(ok[0]) if np.asarray(assignment).ndim == 1 else ok


def interval_objective_s(
    table: BlockTable,
    view: ResourceView,
    assignment: np.ndarray,
    current: np.ndarray | None,
) -> np.ndarray | float:
    """What a re-plan minimises (s): migration delay now + decode delay over the horizon.

    The decode delay is horizon_tokens x the per-token delay at the interval's mean
    context; infinite where memory does not hold until the interval's end.
    """
    w = view.window
    x = _as_batch(assignment)
    total = w.horizon_tokens * _as_array(per_token_s(table, view, x, w.mean_context))
    total = total + _as_array(migration_s(table, view, current, x, w.context_tokens))
    total = np.where(fits(table, view, x, w.interval_end_context), total, np.inf)
    return _squeeze(total, assignment)


def _as_array(v) -> np.ndarray:
    return np.atleast_1d(np.asarray(v, dtype=np.float64))
