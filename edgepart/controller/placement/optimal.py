"""The exact planner: a mixed-integer program on HiGHS for the re-plan decision.

It minimises exactly what ``edgepart.controller.cost.interval_objective_s`` defines:
horizon_tokens x per-token delay at the window's mean context, plus the
migration delay at the current context, subject to memory at the interval's end.

Formulation (time in units of ``tau`` seconds, a reference delay, so that the
solver's absolute tolerances mean the same at every scale):

- x[b, d] binary for projections and FFNs: block b on usable device d.
- KV groups of a layer that sit on the same current device (all of them when there
  is no current placement) are interchangeable in the cost model: delays depend on
  how many groups each device holds, memory and migration bytes are equal per group.
  So they are placed by integer counts k[l, c, d] (class c, device d) instead of
  per-group binaries: exact, and free of the symmetry that makes B&B explode.
  cnt[l, d] = sum_c k[l, c, d]; u[l, d] binary = device d hosts a group of layer l.
- Products of two one-hot rows (previous FFN x projection for the residual,
  projection x FFN) use the tight transport ("RLT") form: y[i, j] >= 0,
  sum_j y[i, j] = x_a[i], sum_i y[i, j] = x_b[j]; at 0/1 x it is the outer product.
- The layer input hop into d is z[l, a, d] = x[F(l-1), a] * u[l, d] (sum_a z = u,
  z <= x); d's outputs reach the projection on p in one message: one latency
  (wl[d, p] = u[d] * x[P, p]) plus cnt[d] group outputs (vb[d, p] = cnt[d] * x[P, p],
  sum_p vb = cnt, sum_d vb = G x[P, p], wl <= vb <= cap * wl).
- gather_l >= every device's time (hop in + its groups' compute + hop out) and
  >= the residual hop; the layer then adds projection, the hop to the FFN and FFN.
- Migration: per ordered link (i, j), Mig >= latency * m[i, j] + bytes moved / bw
  with m[i, j] binary >= what moves over it (transfers on different links overlap).
- Memory at the interval's end per device, pinned source blocks included.
A link with zero bandwidth or infinite latency cannot be used: every variable that
would use it is fixed to 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import highspy
import numpy as np

from edgepart.controller.cost import (
    BITS_PER_BYTE,
    GFLOP,
    MBIT,
    interval_objective_s,
    migration_bytes,
)
from edgepart.controller.placement.base import NoFeasiblePlacement, Placement
from edgepart.controller.placement.forced import FORCED_SLACK, alive_current, is_forced
from edgepart.controller.view import ResourceView
from edgepart.llm.blocks import BlockTable, hidden_bytes

INF = highspy.kHighsInf


def _quiet_highs():
    """A HiGHS instance that prints nothing on stdout.

    highspy's public ``Highs`` logs its banner while it is constructed, before any
    option can be set (HiGHS issues #1702, #1932), which breaks ``--json`` output; the
    core class it wraps does not.
    """
    try:
        from highspy._core import _Highs
    except ImportError:  # a highspy without the private core: accept the banner
        h = highspy.Highs()
    else:
        h = _Highs()
    h.setOptionValue("output_flag", False)
    return h


@dataclass(frozen=True)
class MilpResult:
    """Outcome of one exact solve: the placement, its cost-model objective and solver facts."""

    placement: Placement
    objective_s: float  # controller.cost.interval_objective_s of ``placement``
    proven_optimal: bool
    solve_s: float  # HiGHS run time (s)
    solver_objective_s: float = float("nan")  # HiGHS's own objective, for diagnostics
    #: HiGHS's lower bound on the objective (s): no placement is better, proven or not
    bound_s: float = float("nan")
    nodes: int = 0  # branch-and-bound nodes HiGHS explored


@dataclass
class _Model:
    """A sparse MILP under construction: columns, then rows in coordinate form."""

    lower: list[np.ndarray] = field(default_factory=list)
    upper: list[np.ndarray] = field(default_factory=list)
    cost: list[np.ndarray] = field(default_factory=list)
    integer: list[np.ndarray] = field(default_factory=list)
    n_cols: int = 0
    row_lower: list[np.ndarray] = field(default_factory=list)
    row_upper: list[np.ndarray] = field(default_factory=list)
    coo_row: list[np.ndarray] = field(default_factory=list)
    coo_col: list[np.ndarray] = field(default_factory=list)
    coo_val: list[np.ndarray] = field(default_factory=list)
    n_rows: int = 0
    zero_cols: list[np.ndarray] = field(default_factory=list)
    extra_cost: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    offset: float = 0.0

    def add_vars(self, shape, ub=1.0, cost=0.0, integer: bool = False) -> np.ndarray:
        """New columns (lower bound 0) shaped like ``shape``; returns their indices."""
        n = int(np.prod(shape))
        idx = np.arange(self.n_cols, self.n_cols + n).reshape(shape)
        self.lower.append(np.zeros(n))
        self.upper.append(np.broadcast_to(np.asarray(ub, dtype=float), shape).ravel().copy())
        self.cost.append(np.broadcast_to(np.asarray(cost, dtype=float), shape).ravel().copy())
        self.integer.append(np.full(n, 1 if integer else 0, dtype=np.uint8))
        self.n_cols += n
        return idx

    def forbid(self, cols: np.ndarray) -> None:
        """Fix these columns to 0 (their upper bound becomes 0)."""
        self.zero_cols.append(np.asarray(cols, dtype=np.int64).ravel())

    def add_cost(self, cols: np.ndarray, values: np.ndarray) -> None:
        """Add objective coefficients to existing columns."""
        self.extra_cost.append(
            (np.asarray(cols, dtype=np.int64).ravel(), np.asarray(values, dtype=float).ravel())
        )

    def add_rows(self, cols: np.ndarray, vals, lower, upper) -> None:
        """Rows lower <= sum_k vals[r, k] x[cols[r, k]] <= upper; cols, vals shaped (R, K)."""
        cols = np.atleast_2d(np.asarray(cols, dtype=np.int64))
        vals = np.broadcast_to(np.asarray(vals, dtype=float), cols.shape)
        r = cols.shape[0]
        rows = np.broadcast_to(np.arange(self.n_rows, self.n_rows + r)[:, None], cols.shape)
        keep = vals != 0.0  # zero coefficients would only be dropped by HiGHS with a warning
        self.coo_row.append(rows[keep])
        self.coo_col.append(cols[keep])
        self.coo_val.append(vals[keep])
        self.row_lower.append(np.broadcast_to(np.asarray(lower, dtype=float), (r,)).copy())
        self.row_upper.append(np.broadcast_to(np.asarray(upper, dtype=float), (r,)).copy())
        self.n_rows += r

    def cost_vector(self) -> np.ndarray:
        """The objective's coefficient of every column."""
        cost = np.concatenate(self.cost)
        for cols, values in self.extra_cost:
            np.add.at(cost, cols, values)
        return cost

    def set_objective(self, cost: np.ndarray, offset: float) -> None:
        """Replace the objective: these coefficients per column, plus offset."""
        self.cost = [np.asarray(cost, dtype=float)]
        self.extra_cost = []
        self.offset = float(offset)

    def build(self, h: highspy.Highs) -> None:
        """Pass the model to HiGHS in bulk (columns, then rows as CSR)."""
        upper = np.concatenate(self.upper)
        if self.zero_cols:
            upper[np.concatenate(self.zero_cols)] = 0.0
        cost = self.cost_vector()
        empty_i = np.zeros(0, dtype=np.int32)
        h.addCols(
            self.n_cols, cost, np.concatenate(self.lower), upper, 0,
            empty_i, empty_i, np.zeros(0),
        )
        integer = np.concatenate(self.integer)
        int_cols = np.flatnonzero(integer).astype(np.int32)
        h.changeColsIntegrality(len(int_cols), int_cols, integer[int_cols])
        rows = np.concatenate(self.coo_row)
        order = np.argsort(rows, kind="stable")
        starts = np.searchsorted(rows[order], np.arange(self.n_rows)).astype(np.int32)
        h.addRows(
            self.n_rows,
            np.concatenate(self.row_lower),
            np.concatenate(self.row_upper),
            len(order),
            starts,
            np.concatenate(self.coo_col)[order].astype(np.int32),
            np.concatenate(self.coo_val)[order],
        )
        h.changeObjectiveOffset(self.offset)


def _hop_matrix(view: ResourceView, nbytes: float) -> np.ndarray:
    """(D, D) seconds to send nbytes over each ordered link; 0 on the diagonal, inf if unusable."""
    bw = view.bandwidth_mbit
    lat = view.latency_s
    with np.errstate(divide="ignore", invalid="ignore"):
        t = lat + nbytes * (BITS_PER_BYTE / (bw * MBIT))
    t = np.where((bw > 0) & np.isfinite(lat) & ~np.isnan(t), t, np.inf)
    np.fill_diagonal(t, 0.0)
    return t


def _link_ok(view: ResourceView) -> np.ndarray:
    """(D, D) whether a link can carry anything (positive bandwidth, finite latency)."""
    ok = (view.bandwidth_mbit > 0) & np.isfinite(view.latency_s)
    np.fill_diagonal(ok, True)
    return ok


def _finite(a: np.ndarray) -> np.ndarray:
    """Coefficients with inf replaced by 0 (the matching columns are fixed to 0)."""
    return np.where(np.isfinite(a), a, 0.0)


def _group_classes(
    model: BlockTable, current: np.ndarray | None, layer: int
) -> list[tuple[int, np.ndarray]]:
    """Interchangeable groups of a layer: (current device or -1, group ids) per class."""
    gids = model.group_ids(layer)
    key = np.full(len(gids), -1) if current is None else np.maximum(current[gids], -1)
    return [(int(k), gids[key == k]) for k in np.unique(key)]


def _reference_s(view: ResourceView, model: BlockTable, usable: np.ndarray) -> float:
    """A delay scale (s): all blocks computed on the fastest usable device, plus the LM head."""
    n = view.window.mean_context
    fastest = view.compute_gflops[usable].max() * GFLOP
    t = float(model.flops(n).sum()) / fastest
    return t + model.source_flops / (view.compute_gflops[view.source] * GFLOP)


@dataclass(frozen=True, eq=False)
class _Instance:
    """One decision in the MILP's terms: device slots (the usable devices), time in tau units."""

    view: ResourceView
    model: BlockTable
    cur: np.ndarray | None  # current assignment (device per block, -1: lost), None if fresh
    dev: np.ndarray  # (n,) MILP device slot -> view device index
    tau: float  # reference delay (s), the objective's time unit
    per_tok: float  # objective weight of one per-token second
    head_s: float  # the LM head on the source (s)
    hop_h: np.ndarray  # (D, D) s to send a hidden state over each ordered link, inf if unusable
    hop_u: np.ndarray  # (n, n) the same between slots
    link_ok: np.ndarray  # (D, D) whether a link can carry anything
    link_u: np.ndarray  # (n, n) the same between slots
    per_byte: np.ndarray  # (D, D) s per byte over each ordered link
    group_s: np.ndarray  # (n,) s to compute one KV group at the window's mean context
    proj_s: np.ndarray  # (n,) s to compute a projection
    ffn_s: np.ndarray  # (n,) s to compute an FFN
    out_lat_c: np.ndarray  # (n, n) latency of a device's output message, tau units
    out_byte_c: np.ndarray  # (n, n) one group's output bytes on the wire, tau units
    mem: np.ndarray  # (B,) bytes of each block at the interval's end
    room: np.ndarray  # (n,) bytes each slot has for blocks (pinned source blocks taken off)
    cap: np.ndarray  # (n,) most groups of one layer a slot can hold

    @property
    def n(self) -> int:
        """Number of device slots."""
        return len(self.dev)


def _instance(view: ResourceView, model: BlockTable, current: Placement | None) -> _Instance:
    """The decision's data per device slot; raises NoFeasiblePlacement when nothing can fit."""
    src = view.source
    usable_mask = np.asarray(view.usable, dtype=bool)
    dev = np.flatnonzero(usable_mask)
    n = len(dev)
    w = view.window
    # Memory of devices that cannot host blocks must still hold what is pinned there.
    pinned = np.zeros(view.size)
    pinned[src] = model.source_weight_bytes
    if n == 0 or (~usable_mask & (pinned > view.memory_bytes)).any():
        raise NoFeasiblePlacement("no usable device, or the source cannot hold its pinned blocks")
    if not view.compute_gflops[src] > 0:
        raise NoFeasiblePlacement("the source device has no compute for the LM head")
    tau = _reference_s(view, model, usable_mask)
    speed = view.compute_gflops[dev] * GFLOP
    gid0 = model.group_ids(0)
    with np.errstate(divide="ignore"):
        per_byte = BITS_PER_BYTE / (view.bandwidth_mbit * MBIT)  # (D, D) s per byte
    hop_h = _hop_matrix(view, hidden_bytes(model.spec))
    link_ok = _link_ok(view)
    link_u = link_ok[np.ix_(dev, dev)]
    off_diag = ~np.eye(n, dtype=bool) & link_u
    g_out = float(model.output_bytes[gid0[0]])
    mem = model.memory_bytes(w.interval_end_context)
    room = view.memory_bytes[dev] - pinned[dev]
    return _Instance(
        view=view,
        model=model,
        cur=None if current is None else np.asarray(current.assignment, dtype=np.int64),
        dev=dev,
        tau=tau,
        per_tok=w.horizon_tokens / tau,
        head_s=model.source_flops / (view.compute_gflops[src] * GFLOP),
        hop_h=hop_h,
        hop_u=hop_h[np.ix_(dev, dev)],
        link_ok=link_ok,
        link_u=link_u,
        per_byte=per_byte,
        group_s=float(model.flops(w.mean_context)[gid0[0]]) / speed,
        proj_s=float(model.flops_fixed[model.proj_id(0)]) / speed,
        ffn_s=float(model.flops_fixed[model.ffn_id(0)]) / speed,
        out_lat_c=np.where(off_diag, view.latency_s[np.ix_(dev, dev)], 0.0) / tau,
        out_byte_c=np.where(off_diag, per_byte[np.ix_(dev, dev)] * g_out, 0.0) / tau,
        mem=mem,
        room=room,
        # A valid bound on a slot's groups per layer; it tightens the relaxation.
        cap=np.clip(np.floor(room / mem[gid0[0]] + 1e-9), 0, model.groups),
    )


@dataclass(frozen=True, eq=False)
class _LayerColumns:
    """Column indices of one layer's variables."""

    gather: int  # the layer's gather time, tau units
    classes: list[tuple[int, np.ndarray, np.ndarray]]  # (current device or -1, groups, k cols)
    cnt: np.ndarray  # (n,) groups on each slot
    u: np.ndarray  # (n,) binary: the slot hosts a group
    z: np.ndarray | None  # (n, n) x[prev FFN, a] * u[d]; None on layer 0 (input from source)
    wl: np.ndarray  # (n, n) u[d] * x[P, p]: one output message d -> p
    vb: np.ndarray  # (n, n) cnt[d] * x[P, p]: group outputs d -> p
    residual: np.ndarray | None  # (n, n) x[prev FFN, a] * x[P, p]; None on layer 0
    proj_to_ffn: np.ndarray  # (n, n) x[P, p] * x[F, f]


@dataclass(frozen=True, eq=False)
class _Columns:
    """Column indices of every variable of the MILP."""

    x: np.ndarray  # (B, n) binaries of projections and FFNs; rows of groups are -1
    layers: list[_LayerColumns]
    # What may travel over each link (i, slot j): (column, bytes per unit, units at most).
    moved: dict[tuple[int, int], list[tuple[int, float, int]]]
    mig: int | None  # the migration delay, tau units; None when nothing can move
    mig_links: dict[tuple[int, int], int]  # binary: link (i, slot j) carries something


# The MILP is built in four steps (variables, constraints, objective; then the solution
# read back). HiGHS's branch and bound depends on the order of columns and rows, so each
# step emits them in one fixed order: results are reproducible from run to run.


def _add_variables(m: _Model, p: _Instance) -> _Columns:
    """Every column with its bounds; columns that would use an unusable link fixed to 0."""
    model = p.model
    x = np.full((model.size, p.n), -1, dtype=np.int64)
    for layer in range(model.spec.layers):
        for b in (model.proj_id(layer), model.ffn_id(layer)):
            x[b] = m.add_vars((p.n,), integer=True)
    layers = [_add_layer_variables(m, p, x, layer) for layer in range(model.spec.layers)]
    back = p.hop_h[p.dev, p.view.source]
    x_last = x[model.ffn_id(model.spec.layers - 1)]
    m.forbid(x_last[~np.isfinite(back)])
    moved = _possible_moves(m, p, x, layers)
    mig = None
    mig_links: dict[tuple[int, int], int] = {}
    if moved:
        mig = int(m.add_vars((1,), ub=INF)[0])
        for key in moved:
            mig_links[key] = int(m.add_vars((1,), integer=True)[0])
    return _Columns(x, layers, moved, mig, mig_links)


def _add_layer_variables(m: _Model, p: _Instance, x: np.ndarray, layer: int) -> _LayerColumns:
    """One layer's columns (x of its projection and FFN excluded)."""
    n, src = p.n, p.view.source
    gather = int(m.add_vars((1,), ub=INF)[0])
    # Groups of a class are interchangeable: only how many go where matters.
    classes = []
    for key, gids in _group_classes(p.model, p.cur, layer):
        k = m.add_vars((n,), ub=np.minimum(len(gids), p.cap), integer=True)
        classes.append((key, gids, k))
    cnt = m.add_vars((n,), ub=p.cap)
    u = m.add_vars((n,), integer=True)
    z = None
    if layer == 0:
        m.forbid(u[~np.isfinite(p.hop_h[src, p.dev])])
    else:
        z = m.add_vars((n, n))
        m.forbid(z[~np.isfinite(p.hop_u)])
    wl = m.add_vars((n, n))
    vb = m.add_vars((n, n), ub=np.repeat(p.cap[:, None], n, axis=1))
    m.forbid(wl[~p.link_u])
    m.forbid(vb[~p.link_u])
    residual = None
    if layer == 0:
        m.forbid(x[p.model.proj_id(layer)][~np.isfinite(p.hop_h[src, p.dev])])
    else:
        residual = _product_variables(m, p.hop_u)
    proj_to_ffn = _product_variables(m, p.hop_u)
    return _LayerColumns(gather, classes, cnt, u, z, wl, vb, residual, proj_to_ffn)


def _product_variables(m: _Model, cost_s: np.ndarray) -> np.ndarray:
    """Columns y[i, j] for the product of two one-hot rows; fixed to 0 where cost_s is inf."""
    y = m.add_vars(cost_s.shape)
    m.forbid(y[~np.isfinite(cost_s)])
    return y


def _possible_moves(
    m: _Model, p: _Instance, x: np.ndarray, layers: list[_LayerColumns]
) -> dict[tuple[int, int], list[tuple[int, float, int]]]:
    """What may travel over each link (i, slot j); a move over an unusable link is fixed to 0."""
    moved: dict[tuple[int, int], list[tuple[int, float, int]]] = {}
    if p.cur is None:
        return moved
    model, cur = p.model, p.cur
    nbytes = migration_bytes(model, p.view, p.view.window.context_tokens)
    movers: list[tuple[int, np.ndarray, float, int]] = [
        (int(cur[b]), x[b], float(nbytes[b]), 1)
        for layer in range(model.spec.layers)
        for b in (model.proj_id(layer), model.ffn_id(layer))
        if cur[b] >= 0
    ]
    movers += [
        (key, k, float(nbytes[gids[0]]), len(gids))
        for columns in layers
        for key, gids, k in columns.classes
        if key >= 0
    ]
    for i, cols, size, units in movers:
        for j in range(p.n):
            if p.dev[j] == i:
                continue
            if p.link_ok[i, p.dev[j]]:
                moved.setdefault((i, j), []).append((int(cols[j]), size, units))
            else:
                m.forbid(cols[j])
    return moved


def _add_constraints(m: _Model, p: _Instance, c: _Columns) -> None:
    """Every row: one device per block, each layer's timing, migration, memory."""
    for layer in range(p.model.spec.layers):
        for b in (p.model.proj_id(layer), p.model.ffn_id(layer)):
            m.add_rows(c.x[b][None], 1.0, 1.0, 1.0)
    for layer, columns in enumerate(c.layers):
        _add_group_rows(m, p, columns)
        _add_gather_rows(m, p, c.x, layer, columns)
    _add_migration_rows(m, p, c)
    _add_memory_rows(m, p, c)


def _add_group_rows(m: _Model, p: _Instance, c: _LayerColumns) -> None:
    """A layer's groups all placed; cnt counts them per slot; u marks the slots hosting any."""
    n = p.n
    for _, gids, k in c.classes:
        m.add_rows(k[None], 1.0, len(gids), len(gids))
    ks = np.stack([k for _, _, k in c.classes], axis=1)  # (n, classes)
    m.add_rows(np.column_stack([c.cnt, ks]), np.r_[1.0, -np.ones(ks.shape[1])], 0.0, 0.0)
    m.add_rows(np.column_stack([c.cnt, c.u]), np.column_stack([np.ones(n), -p.cap]), -INF, 0.0)
    m.add_rows(np.column_stack([c.u, c.cnt]), [1.0, -1.0], -INF, 0.0)


def _add_gather_rows(m: _Model, p: _Instance, x: np.ndarray, layer: int, c: _LayerColumns) -> None:
    """The layer's gather time: every device's hop in + compute + hop out, and the residual."""
    n, tau, hop_u = p.n, p.tau, p.hop_u
    xp = x[p.model.proj_id(layer)]
    xprev = x[p.model.ffn_id(layer - 1)] if layer > 0 else None
    # Layer input into each group-hosting device.
    if c.z is None:
        in_cols = c.u[:, None]
        in_vals = _finite(p.hop_h[p.view.source, p.dev])[:, None] / tau
    else:
        m.add_rows(np.column_stack([c.z.T, c.u]), np.r_[np.ones(n), -1.0], 0.0, 0.0)
        m.add_rows(np.column_stack([c.z.ravel(), np.repeat(xprev, n)]), [1.0, -1.0], -INF, 0.0)
        in_cols = c.z.T  # row d: z[:, d]
        in_vals = _finite(hop_u).T / tau
    _add_output_rows(m, p, xp, c)
    m.add_rows(
        np.column_stack([np.full(n, c.gather), in_cols, c.cnt, c.wl, c.vb]),
        np.column_stack([np.ones(n), -in_vals, -p.group_s / tau, -p.out_lat_c, -p.out_byte_c]),
        0.0,
        INF,
    )
    # Gather >= residual hop (layer input -> projection).
    if c.residual is None:
        res = p.hop_h[p.view.source, p.dev]
        m.add_rows(np.r_[c.gather, xp][None], np.r_[1.0, -_finite(res) / tau][None], 0.0, INF)
    else:
        _add_product_rows(m, c.residual, xprev, xp)
        m.add_rows(
            np.r_[c.gather, c.residual.ravel()][None],
            np.r_[1.0, -_finite(hop_u).ravel() / tau][None],
            0.0,
            INF,
        )
    _add_product_rows(m, c.proj_to_ffn, xp, x[p.model.ffn_id(layer)])


def _add_output_rows(m: _Model, p: _Instance, xp: np.ndarray, c: _LayerColumns) -> None:
    """Each device's outputs reach the projection in one message.

    One latency (wl[d, p] = u[d] * x[P, p]) plus its groups' bytes (vb[d, p] = cnt[d] * x[P, p]).
    """
    n, wl, vb = p.n, c.wl, c.vb
    m.add_rows(np.column_stack([wl, c.u]), np.r_[np.ones(n), -1.0], 0.0, 0.0)
    m.add_rows(np.column_stack([wl.ravel(), np.tile(xp, n)]), [1.0, -1.0], -INF, 0.0)
    m.add_rows(np.column_stack([vb, c.cnt]), np.r_[np.ones(n), -1.0], 0.0, 0.0)
    m.add_rows(np.column_stack([vb.T, xp]), np.r_[np.ones(n), -float(p.model.groups)], 0.0, 0.0)
    m.add_rows(np.column_stack([vb.ravel(), wl.ravel()]), [1.0, -1.0], 0.0, INF)
    m.add_rows(
        np.column_stack([vb.ravel(), wl.ravel()]),
        np.column_stack([np.ones(n * n), -np.repeat(p.cap, n)]),
        -INF,
        0.0,
    )


def _add_product_rows(m: _Model, y: np.ndarray, a_cols: np.ndarray, b_cols: np.ndarray) -> None:
    """y[i, j] = a[i] * b[j] for two one-hot rows, in the tight transport (RLT) form."""
    n = len(a_cols)
    m.add_rows(np.column_stack([y, a_cols]), np.r_[np.ones(n), -1.0], 0.0, 0.0)
    m.add_rows(np.column_stack([y.T, b_cols]), np.r_[np.ones(n), -1.0], 0.0, 0.0)


def _add_migration_rows(m: _Model, p: _Instance, c: _Columns) -> None:
    """Links in parallel, transfers on one link in sequence: mig >= every used link's time."""
    for (i, j), items in c.moved.items():
        link = c.mig_links[(i, j)]
        cols = np.array([col for col, _, _ in items])
        units = np.array([s for _, _, s in items], dtype=float)
        sizes = np.array([b for _, b, _ in items])
        m.add_rows(
            np.column_stack([cols, np.full(len(cols), link)]),
            np.column_stack([np.ones(len(cols)), -units]),
            -INF,
            0.0,
        )
        d = p.dev[j]
        lat = p.view.latency_s[i, d] / p.tau
        per_unit = (sizes * p.per_byte[i, d] + p.view.move_s_per_block[d]) / p.tau
        m.add_rows(
            np.r_[c.mig, link, cols][None],
            np.r_[1.0, -lat, -per_unit][None],
            0.0,
            INF,
        )


def _fixed_blocks(model: BlockTable) -> np.ndarray:
    """Projections of every layer, then FFNs: the blocks placed by binaries x."""
    layers = range(model.spec.layers)
    return np.r_[
        [model.proj_id(layer) for layer in layers], [model.ffn_id(layer) for layer in layers]
    ]


def _add_memory_rows(m: _Model, p: _Instance, c: _Columns) -> None:
    """Memory at the interval's end per slot, pinned source blocks included (in room)."""
    model, n = p.model, p.n
    others = _fixed_blocks(model)
    counts = [columns.cnt for columns in c.layers]
    m.add_rows(
        np.column_stack([c.x[others].T, *counts]),
        np.column_stack(
            [
                np.broadcast_to(p.mem[others], (n, len(others))),
                np.full((n, model.spec.layers), p.mem[model.group_ids(0)[0]]),
            ]
        ),
        -INF,
        p.room,
    )


def _add_objective(m: _Model, p: _Instance, c: _Columns) -> None:
    """horizon_tokens x per-token delay, plus the migration delay, in tau units."""
    model, per_tok = p.model, p.per_tok
    for layer, columns in enumerate(c.layers):
        xp = c.x[model.proj_id(layer)]
        xf = c.x[model.ffn_id(layer)]
        m.add_cost(np.array([columns.gather]), p.view.window.horizon_tokens)
        m.add_cost(xp, p.proj_s * per_tok)
        m.add_cost(columns.proj_to_ffn, _finite(p.hop_u) * per_tok)
        m.add_cost(xf, p.ffn_s * per_tok)
    # Last hidden state back to the source, then the LM head there.
    back = p.hop_h[p.dev, p.view.source]
    m.add_cost(c.x[model.ffn_id(model.spec.layers - 1)], _finite(back) * per_tok)
    m.offset = p.head_s * per_tok
    if c.mig is not None:
        m.add_cost(np.array([c.mig]), 1.0)


def _highs(time_limit_s: float, mip_gap: float):
    """A quiet HiGHS set up for an exact solve within time_limit_s."""
    h = _quiet_highs()
    h.setOptionValue("time_limit", float(time_limit_s))
    h.setOptionValue("mip_rel_gap", float(mip_gap))
    # Exactness: objective in tau units is O(horizon_tokens); keep absolute slack negligible.
    h.setOptionValue("mip_abs_gap", 1e-9 if mip_gap == 0 else 1e-6)
    h.setOptionValue("mip_feasibility_tolerance", 1e-9)
    h.setOptionValue("primal_feasibility_tolerance", 1e-9)
    return h


def _milp(
    view: ResourceView, model: BlockTable, current: Placement | None
) -> tuple[_Instance, _Model, _Columns]:
    """The decision's MILP, objective included, ready to build."""
    p = _instance(view, model, current)
    m = _Model()
    columns = _add_variables(m, p)
    _add_constraints(m, p, columns)
    _add_objective(m, p, columns)
    return p, m, columns


def _run(
    problem: tuple[_Instance, _Model, _Columns],
    time_limit_s: float,
    mip_gap: float,
    initial: Placement | None,
    max_nodes: int | None,
) -> MilpResult:
    """Solve a built MILP on HiGHS (from initial, when it is a valid start) and read it back."""
    p, m, columns = problem
    h = _highs(time_limit_s, mip_gap)
    if max_nodes is not None:
        h.setOptionValue("mip_max_nodes", int(max_nodes))
    m.build(h)
    if initial is not None:
        start = _start_values(p, columns, initial)
        if start is not None:
            h.setSolution(len(start[0]), start[0], start[1])
    h.run()
    return _read_solution(h, p, columns, time_limit_s)


def solve(
    view: ResourceView,
    model: BlockTable,
    current: Placement | None,
    time_limit_s: float = 60.0,
    mip_gap: float = 0.0,
    initial: Placement | None = None,
    max_nodes: int | None = None,
) -> MilpResult:
    """Exact placement minimising cost.interval_objective_s; raises NoFeasiblePlacement.

    max_nodes caps HiGHS's branch and bound (a budget that, unlike the time limit, does
    not depend on the machine's load): past it the result is the best found, not proven.
    """
    return _run(_milp(view, model, current), time_limit_s, mip_gap, initial, max_nodes)


#: weight of the decision's objective next to the relocated bytes when least_moves breaks
#: ties: all of the budget counts for this fraction of the smallest block's bytes
_TIE_WEIGHT = 1e-4


def solve_least_moves(
    view: ResourceView,
    model: BlockTable,
    current: Placement,
    budget_s: float,
    time_limit_s: float = 60.0,
    initial: Placement | None = None,
    max_nodes: int | None = None,
) -> MilpResult:
    """The placement relocating the fewest bytes among those whose objective is <= budget_s.

    Relocated bytes: ``forced.relocated_bytes`` (weights and KV of every block that leaves
    its current device); among placements that relocate as much, the lower objective
    wins. ``proven_optimal``, ``solver_objective_s`` and ``bound_s`` refer to the bytes
    (the latter two in units of the largest block's, times tau: diagnostics only).
    Raises NoFeasiblePlacement when no placement meets the budget.
    """
    p, m, columns = _milp(view, model, current)
    objective = m.cost_vector()
    used = np.flatnonzero(objective)
    # the decision's objective (tau units) within the budget, as a row
    m.add_rows(used[None], objective[used][None], -INF, budget_s / p.tau - m.offset)
    relocation, constant, unit = _relocation_cost(p, columns, m.n_cols)
    tie = _TIE_WEIGHT * unit / max(budget_s / p.tau, 1e-12)
    m.set_objective(relocation + tie * objective, constant + tie * m.offset)
    return _run((p, m, columns), time_limit_s, 0.0, initial, max_nodes)


def _relocation_cost(p: _Instance, c: _Columns, n_cols: int) -> tuple[np.ndarray, float, float]:
    """Relocated bytes as a linear objective, in units of the model's largest block.

    Returns (coefficients per column, constant, the smallest block in those units): a
    block relocates its bytes unless its column for its current device is 1.
    """
    model, cur = p.model, p.cur
    assert cur is not None
    nbytes = model.memory_bytes(p.view.window.context_tokens)
    scale = float(nbytes.max())
    slot_of = np.full(p.view.size, -1)
    slot_of[p.dev] = np.arange(p.n)
    cost = np.zeros(n_cols)
    constant = 0.0
    stays: list[tuple[int, float, int]] = [  # (column of staying, bytes per unit, units)
        (int(c.x[b][slot_of[cur[b]]]) if slot_of[cur[b]] >= 0 else -1, nbytes[b] / scale, 1)
        for layer in range(model.spec.layers)
        for b in (model.proj_id(layer), model.ffn_id(layer))
        if cur[b] >= 0
    ]
    stays += [
        (int(k[slot_of[key]]) if slot_of[key] >= 0 else -1, nbytes[gids[0]] / scale, len(gids))
        for columns in c.layers
        for key, gids, k in columns.classes
        if key >= 0
    ]
    for col, size, units in stays:
        constant += size * units
        if col >= 0:
            cost[col] -= size
    return cost, constant, float(nbytes[nbytes > 0].min() / scale)


def _read_solution(h, p: _Instance, c: _Columns, time_limit_s: float) -> MilpResult:
    """The placement HiGHS found, priced by the cost model; raises NoFeasiblePlacement."""
    status = h.getModelStatus()
    info = h.getInfo()
    if info.primal_solution_status != 2:  # no feasible solution (kSolutionStatusFeasible)
        if status == highspy.HighsModelStatus.kInfeasible:
            raise NoFeasiblePlacement("no placement fits the devices' memory and links")
        raise NoFeasiblePlacement(
            f"no placement found ({h.modelStatusToString(status)} "
            f"after {h.getRunTime():.2f} s of a {time_limit_s:g} s limit)"
        )
    values = np.asarray(h.getSolution().col_value)
    assignment = np.full(p.model.size, -1, dtype=np.int64)
    for b in _fixed_blocks(p.model):
        assignment[b] = p.dev[values[c.x[b]].argmax()]
    for columns in c.layers:
        for _, gids, k in columns.classes:
            per_slot = np.rint(values[k]).astype(np.int64)
            assignment[gids] = np.repeat(p.dev, per_slot)
    return MilpResult(
        placement=Placement(assignment),
        objective_s=float(interval_objective_s(p.model, p.view, assignment, p.cur)),
        proven_optimal=status == highspy.HighsModelStatus.kOptimal,
        solve_s=float(h.getRunTime()),
        solver_objective_s=float(info.objective_function_value) * p.tau,
        bound_s=float(info.mip_dual_bound) * p.tau,
        nodes=int(info.mip_node_count),
    )


def _start_values(
    p: _Instance, c: _Columns, initial: Placement
) -> tuple[np.ndarray, np.ndarray] | None:
    """Integer column values (indices, values) of a starting placement, or None if unusable."""
    model, n = p.model, p.n
    slot_of = np.full(p.view.size, -1)
    slot_of[p.dev] = np.arange(n)
    init = np.asarray(initial.assignment, dtype=np.int64)
    if init.shape != (model.size,) or (init < 0).any() or (init >= len(slot_of)).any():
        return None
    slots = slot_of[init]
    if (slots < 0).any():
        return None
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    for b in np.flatnonzero(c.x[:, 0] >= 0):
        cols.append(c.x[b])
        vals.append((np.arange(n) == slots[b]).astype(float))
    for layer, columns in enumerate(c.layers):
        for _, gids, k in columns.classes:
            cols.append(k)
            vals.append(np.bincount(slots[gids], minlength=n).astype(float))
        cols.append(columns.u)
        vals.append((np.bincount(slots[model.group_ids(layer)], minlength=n) > 0).astype(float))
    if c.mig_links and p.cur is not None:
        used = {(int(i), int(slot_of[j])) for i, j in zip(p.cur, init, strict=True) if 0 <= i != j}
        links = np.array(list(c.mig_links.values()))
        cols.append(links)
        vals.append(np.array([float(key in used) for key in c.mig_links]))
    return np.concatenate(cols).astype(np.int32), np.concatenate(vals)


class OptimalPlanner:
    """Exact MILP placement on HiGHS for the same decision the myopic planner takes."""

    name = "optimal"
    replans = True

    def __init__(
        self, time_limit_s: float = 60.0, mip_gap: float = 0.0, forced_least_moves: bool = True
    ) -> None:
        self.time_limit_s = time_limit_s
        self.mip_gap = mip_gap
        self.forced_least_moves = forced_least_moves
        self.last_result: MilpResult | None = None

    @property
    def last_objective_s(self) -> float | None:
        """Objective (s) of the last placement returned, or None before the first."""
        return None if self.last_result is None else self.last_result.objective_s

    def place(
        self, view: ResourceView, model: BlockTable, current: Placement | None
    ) -> Placement:
        """The placement minimising cost.interval_objective_s; raises NoFeasiblePlacement.

        A forced re-plan (the current placement lost blocks or no longer fits) is solved
        twice, as the myopic planner decides it: the optimum, then the placement relocating
        the fewest bytes within FORCED_SLACK of it (a second MILP of the same size, cheap
        where the first was). Blocks on dead devices count as lost, not moved.
        """
        cur = None if current is None else Placement(alive_current(view, current.assignment))
        # The current placement, when complete and usable, is a free incumbent.
        result = solve(view, model, cur, self.time_limit_s, self.mip_gap, initial=cur)
        if cur is not None and self.forced_least_moves and is_forced(model, view, cur.assignment):
            budget_s = (1 + FORCED_SLACK) * result.objective_s
            try:
                least = solve_least_moves(
                    view, model, cur, budget_s, self.time_limit_s, initial=result.placement
                )
            except NoFeasiblePlacement:
                least = None
            if least is not None and least.objective_s <= budget_s * (1 + 1e-9):
                result = least
        self.last_result = result
        return result.placement
