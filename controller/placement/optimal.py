"""The exact planner: a mixed-integer program on HiGHS for the re-plan decision.

It minimises exactly what ``controller.cost.interval_objective_s`` defines:
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

from controller.cost import (
    BITS_PER_BYTE,
    GFLOP,
    MBIT,
    interval_objective_s,
    migration_bytes,
)
from controller.placement.base import NoFeasiblePlacement, Placement
from controller.view import ResourceView
from llm.blocks import BlockTable, hidden_bytes

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

    def build(self, h: highspy.Highs) -> None:
        """Pass the model to HiGHS in bulk (columns, then rows as CSR)."""
        upper = np.concatenate(self.upper)
        if self.zero_cols:
            upper[np.concatenate(self.zero_cols)] = 0.0
        cost = np.concatenate(self.cost)
        for cols, values in self.extra_cost:
            np.add.at(cost, cols, values)
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


def solve(
    view: ResourceView,
    model: BlockTable,
    current: Placement | None,
    time_limit_s: float = 60.0,
    mip_gap: float = 0.0,
    initial: Placement | None = None,
) -> MilpResult:
    """Exact placement minimising cost.interval_objective_s; raises NoFeasiblePlacement."""
    d_all = view.size
    src = view.source
    usable_mask = np.asarray(view.usable, dtype=bool)
    dev = np.flatnonzero(usable_mask)  # MILP device slot -> view device index
    n = len(dev)
    layers = model.spec.layers
    n_groups = model.groups
    w = view.window
    cur = None if current is None else np.asarray(current.assignment, dtype=np.int64)

    # Memory of devices that cannot host blocks must still hold what is pinned there.
    pinned = np.zeros(d_all)
    pinned[src] = model.source_weight_bytes
    if n == 0 or (~usable_mask & (pinned > view.memory_bytes)).any():
        raise NoFeasiblePlacement("no usable device, or the source cannot hold its pinned blocks")
    if not view.compute_gflops[src] > 0:
        raise NoFeasiblePlacement("the source device has no compute for the LM head")
    head_s = model.source_flops / (view.compute_gflops[src] * GFLOP)

    tau = _reference_s(view, model, usable_mask)
    per_tok = w.horizon_tokens / tau  # objective weight of one per-token second
    hop_h = _hop_matrix(view, hidden_bytes(model.spec))  # (D, D) s for a hidden state
    hop_u = hop_h[np.ix_(dev, dev)]
    link_ok = _link_ok(view)
    link_u = link_ok[np.ix_(dev, dev)]
    speed = view.compute_gflops[dev] * GFLOP
    gid0 = model.group_ids(0)
    group_s = float(model.flops(w.mean_context)[gid0[0]]) / speed  # (n,)
    proj_s = float(model.flops_fixed[model.proj_id(0)]) / speed
    ffn_s = float(model.flops_fixed[model.ffn_id(0)]) / speed
    with np.errstate(divide="ignore"):
        per_byte = BITS_PER_BYTE / (view.bandwidth_mbit * MBIT)  # (D, D) s per byte
    off_diag = ~np.eye(n, dtype=bool) & link_u
    out_lat_c = np.where(off_diag, view.latency_s[np.ix_(dev, dev)], 0.0) / tau
    g_out = float(model.output_bytes[gid0[0]])
    out_byte_c = np.where(off_diag, per_byte[np.ix_(dev, dev)] * g_out, 0.0) / tau
    mem = model.memory_bytes(w.interval_end_context)
    room = view.memory_bytes[dev] - pinned[dev]
    # Most groups of one layer a device can hold (valid bound; tightens the relaxation).
    cap = np.clip(np.floor(room / mem[gid0[0]] + 1e-9), 0, n_groups)

    m = _Model()
    x = np.full((model.size, n), -1, dtype=np.int64)  # binaries of projections and FFNs
    for layer in range(layers):
        for b in (model.proj_id(layer), model.ffn_id(layer)):
            x[b] = m.add_vars((n,), integer=True)
            m.add_rows(x[b][None], 1.0, 1.0, 1.0)

    def rlt(a_cols: np.ndarray, b_cols: np.ndarray, cost_s: np.ndarray) -> np.ndarray:
        """y[i, j] = a[i] * b[j] for two one-hot rows; forbidden where cost_s is inf."""
        y = m.add_vars((n, n))
        m.forbid(y[~np.isfinite(cost_s)])
        m.add_rows(np.column_stack([y, a_cols]), np.r_[np.ones(n), -1.0], 0.0, 0.0)
        m.add_rows(np.column_stack([y.T, b_cols]), np.r_[np.ones(n), -1.0], 0.0, 0.0)
        return y

    classes: list[list[tuple[int, np.ndarray, np.ndarray]]] = []  # (cur, groups, k cols)
    counts: list[np.ndarray] = []  # per layer: groups on each device
    hosts: list[np.ndarray] = []  # per layer: u[d], device hosts a group
    for layer in range(layers):
        xp = x[model.proj_id(layer)]
        xf = x[model.ffn_id(layer)]
        xprev = x[model.ffn_id(layer - 1)] if layer > 0 else None
        big_m = m.add_vars((1,), ub=INF, cost=w.horizon_tokens)[0]  # layer gather, tau units

        # Groups of a class are interchangeable: only how many go where matters.
        layer_classes = []
        for key, gids in _group_classes(model, cur, layer):
            k = m.add_vars((n,), ub=np.minimum(len(gids), cap), integer=True)
            m.add_rows(k[None], 1.0, len(gids), len(gids))
            layer_classes.append((key, gids, k))
        classes.append(layer_classes)
        cnt = m.add_vars((n,), ub=cap)
        ks = np.stack([k for _, _, k in layer_classes], axis=1)  # (n, classes)
        m.add_rows(np.column_stack([cnt, ks]), np.r_[1.0, -np.ones(ks.shape[1])], 0.0, 0.0)
        u = m.add_vars((n,), integer=True)
        m.add_rows(np.column_stack([cnt, u]), np.column_stack([np.ones(n), -cap]), -INF, 0.0)
        m.add_rows(np.column_stack([u, cnt]), [1.0, -1.0], -INF, 0.0)
        counts.append(cnt)
        hosts.append(u)

        # Layer input into each group-hosting device.
        if xprev is None:
            hop_in = hop_h[src, dev]
            m.forbid(u[~np.isfinite(hop_in)])
            in_cols = u[:, None]
            in_vals = _finite(hop_in)[:, None] / tau
        else:
            z = m.add_vars((n, n))  # z[a, d] = x[prev FFN, a] * u[d]
            m.forbid(z[~np.isfinite(hop_u)])
            m.add_rows(np.column_stack([z.T, u]), np.r_[np.ones(n), -1.0], 0.0, 0.0)
            m.add_rows(
                np.column_stack([z.ravel(), np.repeat(xprev, n)]), [1.0, -1.0], -INF, 0.0
            )
            in_cols = z.T  # row d: z[:, d]
            in_vals = _finite(hop_u).T / tau

        # Each device's outputs reach the projection in one message: one latency
        # (wl[d, p] = u[d] * x[P, p]) plus its groups' bytes (vb[d, p] = cnt[d] * x[P, p]).
        wl = m.add_vars((n, n))
        vb = m.add_vars((n, n), ub=np.repeat(cap[:, None], n, axis=1))
        m.forbid(wl[~link_u])
        m.forbid(vb[~link_u])
        m.add_rows(np.column_stack([wl, u]), np.r_[np.ones(n), -1.0], 0.0, 0.0)
        m.add_rows(np.column_stack([wl.ravel(), np.tile(xp, n)]), [1.0, -1.0], -INF, 0.0)
        m.add_rows(np.column_stack([vb, cnt]), np.r_[np.ones(n), -1.0], 0.0, 0.0)
        m.add_rows(np.column_stack([vb.T, xp]), np.r_[np.ones(n), -float(n_groups)], 0.0, 0.0)
        m.add_rows(np.column_stack([vb.ravel(), wl.ravel()]), [1.0, -1.0], 0.0, INF)
        m.add_rows(
            np.column_stack([vb.ravel(), wl.ravel()]),
            np.column_stack([np.ones(n * n), -np.repeat(cap, n)]),
            -INF,
            0.0,
        )

        # Gather >= hop in + compute + hop out, for every device.
        m.add_rows(
            np.column_stack([np.full(n, big_m), in_cols, cnt, wl, vb]),
            np.column_stack([np.ones(n), -in_vals, -group_s / tau, -out_lat_c, -out_byte_c]),
            0.0,
            INF,
        )

        # Gather >= residual hop (layer input -> projection).
        if xprev is None:
            res = hop_h[src, dev]
            m.forbid(xp[~np.isfinite(res)])
            m.add_rows(np.r_[big_m, xp][None], np.r_[1.0, -_finite(res) / tau][None], 0.0, INF)
        else:
            r = rlt(xprev, xp, hop_u)
            m.add_rows(
                np.r_[big_m, r.ravel()][None],
                np.r_[1.0, -_finite(hop_u).ravel() / tau][None],
                0.0,
                INF,
            )

        # Projection, its hop to the FFN, the FFN.
        m.add_cost(xp, proj_s * per_tok)
        q = rlt(xp, xf, hop_u)
        m.add_cost(q, _finite(hop_u) * per_tok)
        m.add_cost(xf, ffn_s * per_tok)

    # Last hidden state back to the source, then the LM head there.
    back = hop_h[dev, src]
    x_last = x[model.ffn_id(layers - 1)]
    m.forbid(x_last[~np.isfinite(back)])
    m.add_cost(x_last, _finite(back) * per_tok)
    m.offset = head_s * per_tok

    # Migration: links in parallel, transfers on one link in sequence. moved[(i, j)]
    # lists (column, bytes per unit, units at most) of what may travel from i to slot j.
    moved: dict[tuple[int, int], list[tuple[int, float, int]]] = {}
    if cur is not None:
        nbytes = migration_bytes(model, view, w.context_tokens)
        movers: list[tuple[int, np.ndarray, float, int]] = [
            (int(cur[b]), x[b], float(nbytes[b]), 1)
            for layer in range(layers)
            for b in (model.proj_id(layer), model.ffn_id(layer))
            if cur[b] >= 0
        ]
        movers += [
            (key, k, float(nbytes[gids[0]]), len(gids))
            for layer_classes in classes
            for key, gids, k in layer_classes
            if key >= 0
        ]
        for i, cols, size, units in movers:
            for j in range(n):
                if dev[j] == i:
                    continue
                if link_ok[i, dev[j]]:
                    moved.setdefault((i, j), []).append((int(cols[j]), size, units))
                else:
                    m.forbid(cols[j])
    mig_links: dict[tuple[int, int], int] = {}
    if moved:
        mig = m.add_vars((1,), ub=INF, cost=1.0)[0]  # tau units, like the gathers
        for (i, j), items in moved.items():
            link = int(m.add_vars((1,), integer=True)[0])  # the link carries something
            mig_links[(i, j)] = link
            cols = np.array([c for c, _, _ in items])
            units = np.array([s for _, _, s in items], dtype=float)
            sizes = np.array([b for _, b, _ in items])
            m.add_rows(
                np.column_stack([cols, np.full(len(cols), link)]),
                np.column_stack([np.ones(len(cols)), -units]),
                -INF,
                0.0,
            )
            lat = view.latency_s[i, dev[j]] / tau
            m.add_rows(
                np.r_[mig, link, cols][None],
                np.r_[
                    1.0, -lat, -(sizes * per_byte[i, dev[j]] + view.move_s_per_block[dev[j]]) / tau
                ][None],
                0.0,
                INF,
            )

    # Memory at the interval's end, pinned source blocks included.
    others = np.r_[[model.proj_id(layer) for layer in range(layers)],
                   [model.ffn_id(layer) for layer in range(layers)]]
    m.add_rows(
        np.column_stack([x[others].T, *counts]),
        np.column_stack(
            [np.broadcast_to(mem[others], (n, len(others))), np.full((n, layers), mem[gid0[0]])]
        ),
        -INF,
        room,
    )

    h = _quiet_highs()
    h.setOptionValue("time_limit", float(time_limit_s))
    h.setOptionValue("mip_rel_gap", float(mip_gap))
    # Exactness: objective in tau units is O(horizon_tokens); keep absolute slack negligible.
    h.setOptionValue("mip_abs_gap", 1e-9 if mip_gap == 0 else 1e-6)
    h.setOptionValue("mip_feasibility_tolerance", 1e-9)
    h.setOptionValue("primal_feasibility_tolerance", 1e-9)
    m.build(h)

    slot_of = np.full(d_all, -1)
    slot_of[dev] = np.arange(n)
    if initial is not None:
        start = _start_values(model, initial, slot_of, x, classes, hosts, mig_links, cur, dev)
        if start is not None:
            h.setSolution(len(start[0]), start[0], start[1])

    h.run()
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
    assignment = np.full(model.size, -1, dtype=np.int64)
    for b in others:
        assignment[b] = dev[values[x[b]].argmax()]
    for layer_classes in classes:
        for _, gids, k in layer_classes:
            per_slot = np.rint(values[k]).astype(np.int64)
            assignment[gids] = np.repeat(dev, per_slot)
    placement = Placement(assignment)
    return MilpResult(
        placement=placement,
        objective_s=float(interval_objective_s(model, view, assignment, cur)),
        proven_optimal=status == highspy.HighsModelStatus.kOptimal,
        solve_s=float(h.getRunTime()),
        solver_objective_s=float(info.objective_function_value) * tau,
    )


def _start_values(
    model: BlockTable,
    initial: Placement,
    slot_of: np.ndarray,
    x: np.ndarray,
    classes: list[list[tuple[int, np.ndarray, np.ndarray]]],
    hosts: list[np.ndarray],
    mig_links: dict[tuple[int, int], int],
    cur: np.ndarray | None,
    dev: np.ndarray,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Integer column values (indices, values) of a starting placement, or None if unusable."""
    init = np.asarray(initial.assignment, dtype=np.int64)
    if init.shape != (model.size,) or (init < 0).any() or (init >= len(slot_of)).any():
        return None
    slots = slot_of[init]
    if (slots < 0).any():
        return None
    n = len(dev)
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    for b in np.flatnonzero(x[:, 0] >= 0):
        cols.append(x[b])
        vals.append((np.arange(n) == slots[b]).astype(float))
    for layer, layer_classes in enumerate(classes):
        for _, gids, k in layer_classes:
            cols.append(k)
            vals.append(np.bincount(slots[gids], minlength=n).astype(float))
        cols.append(hosts[layer])
        vals.append((np.bincount(slots[model.group_ids(layer)], minlength=n) > 0).astype(float))
    if mig_links and cur is not None:
        used = {(int(i), int(slot_of[j])) for i, j in zip(cur, init, strict=True) if 0 <= i != j}
        links = np.array(list(mig_links.values()))
        cols.append(links)
        vals.append(np.array([float(key in used) for key in mig_links]))
    return np.concatenate(cols).astype(np.int32), np.concatenate(vals)


class OptimalPlanner:
    """Exact MILP placement on HiGHS for the same decision the myopic planner takes."""

    name = "optimal"
    replans = True

    def __init__(self, time_limit_s: float = 60.0, mip_gap: float = 0.0) -> None:
        self.time_limit_s = time_limit_s
        self.mip_gap = mip_gap
        self.last_result: MilpResult | None = None

    @property
    def last_objective_s(self) -> float | None:
        """Objective (s) of the last placement returned, or None before the first."""
        return None if self.last_result is None else self.last_result.objective_s

    def place(
        self, view: ResourceView, model: BlockTable, current: Placement | None
    ) -> Placement:
        """The placement minimising cost.interval_objective_s; raises NoFeasiblePlacement."""
        # The current placement, when complete and usable, is a free incumbent.
        result = solve(
            view, model, current, self.time_limit_s, self.mip_gap, initial=current
        )
        self.last_result = result
        return result.placement
