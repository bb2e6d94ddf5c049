"""The cost model against an independent plain-Python reference, and its properties."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgepart.controller import cost
from edgepart.controller.view import PlanningWindow, ResourceView
from edgepart.llm.blocks import BlockKind, BlockTable, block_table
from edgepart.llm.model import ModelSpec

# ----------------------------------------------------------------- the reference
#
# Written from the docstring of edgepart/controller/cost.py only: loops over layers and devices,
# plain floats, no numpy vectorisation.


def ref_hop(view: ResourceView, a: int, b: int, nbytes: float) -> float:
    """latency + bytes / bandwidth across devices, free within one device."""
    if a == b:
        return 0.0
    return float(view.latency_s[a][b]) + nbytes * 8.0 / (float(view.bandwidth_mbit[a][b]) * 1e6)


def ref_per_token_s(table: BlockTable, view: ResourceView, x: list[int], n: float) -> float:
    spec = table.spec
    if any(not view.alive[d] for d in x):
        return math.inf
    d_model, bpe = spec.d_model, spec.bytes_per_element
    q, hd = spec.heads // spec.kv_heads, spec.head_dim
    hidden = d_model * bpe
    group_out = q * hd * bpe
    group_flops = 2 * d_model * (q + 2) * hd + 4 * q * hd * n
    proj_flops = 2 * spec.heads * hd * d_model
    ffn_flops = (6 if spec.ffn == "swiglu" else 4) * d_model * spec.d_ff
    speed = [float(g) * 1e9 for g in view.compute_gflops]
    per_layer = spec.kv_heads + 2
    total = 0.0
    layer_input = view.source
    for ell in range(spec.layers):
        base = ell * per_layer
        groups = x[base : base + spec.kv_heads]
        proj = x[base + spec.kv_heads]
        ffn = x[base + spec.kv_heads + 1]
        # the residual: the layer input must reach the projection too
        gather = ref_hop(view, layer_input, proj, hidden)
        for d in range(view.size):
            count = groups.count(d)
            if count == 0:
                continue
            t = ref_hop(view, layer_input, d, hidden)  # input reaches the device
            t += count * group_flops / speed[d]  # its groups run in sequence
            t += ref_hop(view, d, proj, count * group_out)  # one message to the projection
            gather = max(gather, t)
        total += gather
        total += proj_flops / speed[proj]
        total += ref_hop(view, proj, ffn, hidden)
        total += ffn_flops / speed[ffn]
        layer_input = ffn
    total += ref_hop(view, layer_input, view.source, hidden)  # back to the LM head
    total += 2 * d_model * spec.vocab / speed[view.source]
    return total


def ref_migration_s(
    table: BlockTable, view: ResourceView, current: list[int], x: list[int], n: float
) -> float:
    per_link: dict[tuple[int, int], float] = {}
    count: dict[tuple[int, int], int] = {}
    spec = table.spec
    for b, (c, d) in enumerate(zip(current, x, strict=True)):
        if c < 0 or c == d:
            continue
        is_group = b % (spec.kv_heads + 2) < spec.kv_heads
        nbytes = 2 * spec.head_dim * spec.bytes_per_element * n if is_group else 0.0
        if view.weights_from == "peer":
            nbytes += float(table.weight_bytes[b])
        per_link[(c, d)] = per_link.get((c, d), 0.0) + nbytes
        count[(c, d)] = count.get((c, d), 0) + 1
    times = [
        float(view.latency_s[c][d])
        + nbytes * 8.0 / (float(view.bandwidth_mbit[c][d]) * 1e6)
        + count[(c, d)] * float(view.move_s_per_block[d])  # the target installs it
        for (c, d), nbytes in per_link.items()
    ]
    return max(times, default=0.0)


# ----------------------------------------------------------------- strategies


@st.composite
def models(draw) -> BlockTable:
    kv = draw(st.integers(1, 4))
    q = draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    spec = ModelSpec(
        "hyp",
        layers=draw(st.integers(1, 3)),
        d_model=draw(st.sampled_from([16, 32, 48])),
        heads=kv * q,
        kv_heads=kv,
        d_ff=draw(st.sampled_from([16, 64, 96])),
        vocab=draw(st.integers(10, 500)),
        head_dim=head_dim,
        dtype=draw(st.sampled_from(["float32", "float16"])),
        ffn=draw(st.sampled_from(["swiglu", "gelu"])),
    )
    return block_table(spec)


@st.composite
def views(draw, devices: int, weights_from: str = "disk") -> ResourceView:
    pos = st.floats(0.5, 200.0, allow_nan=False)
    bw = st.floats(1.0, 2000.0, allow_nan=False)
    lat = st.floats(0.0, 0.02, allow_nan=False)
    return ResourceView(
        devices=tuple(f"d{i}" for i in range(devices)),
        compute_gflops=np.array([draw(pos) for _ in range(devices)]),
        memory_bytes=np.full(devices, 1e12),
        bandwidth_mbit=np.array([[draw(bw) for _ in range(devices)] for _ in range(devices)]),
        latency_s=np.array([[draw(lat) for _ in range(devices)] for _ in range(devices)]),
        source=draw(st.integers(0, devices - 1)),
        window=PlanningWindow(8, 8, 64),
        weights_from=weights_from,  # type: ignore[arg-type]
        move_s_per_block=draw(
            st.one_of(
                st.sampled_from([0.0, 0.001, 0.03]),
                st.lists(st.floats(0.0, 0.05), min_size=devices, max_size=devices).map(np.array),
            )
        ),
    )


@st.composite
def cases(draw, weights_from: str = "disk"):
    table = draw(models())
    devices = draw(st.integers(2, 4))
    view = draw(views(devices, weights_from))
    dev = st.integers(0, devices - 1)
    x = [draw(dev) for _ in range(table.size)]
    return table, view, x


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(case=cases(), n=st.integers(1, 400))
def test_per_token_matches_the_reference(case, n):
    table, view, x = case
    got = cost.per_token_s(table, view, np.array(x), n)
    assert got == pytest.approx(ref_per_token_s(table, view, x, n), rel=1e-9, abs=1e-15)


@FAST
@given(case=cases(), n=st.integers(1, 400), data=st.data())
def test_per_token_is_inf_on_dead_devices(case, n, data):
    table, view, x = case
    dead = data.draw(st.sampled_from(sorted(set(x))))
    alive = np.ones(view.size, dtype=bool)
    alive[dead] = False
    view = replace(view, alive=alive)
    assert cost.per_token_s(table, view, np.array(x), n) == math.inf
    assert ref_per_token_s(table, view, x, n) == math.inf


@FAST
@given(case=cases(), n=st.integers(1, 400), data=st.data())
def test_batch_equals_row_by_row(case, n, data):
    table, view, x = case
    rows = [x] + [
        [data.draw(st.integers(0, view.size - 1)) for _ in range(table.size)] for _ in range(4)
    ]
    current = [data.draw(st.integers(-1, view.size - 1)) for _ in range(table.size)]
    batch = np.array(rows)
    cur = np.array(current)
    per_token = cost.per_token_s(table, view, batch, n)
    migration = cost.migration_s(table, view, cur, batch, n)
    memory = cost.memory_use(table, view, batch, n)
    fit = cost.fits(table, view, batch, n)
    for i, row in enumerate(rows):
        r = np.array(row)
        assert per_token[i] == cost.per_token_s(table, view, r, n)
        assert migration[i] == cost.migration_s(table, view, cur, r, n)
        np.testing.assert_array_equal(memory[i], cost.memory_use(table, view, r, n))
        assert fit[i] == cost.fits(table, view, r, n)
    assert per_token.shape == (5,) and migration.shape == (5,) and memory.shape == (5, view.size)


@FAST
@given(case=cases(), n=st.floats(1.0, 500.0))
def test_everything_on_the_source_is_pure_compute(case, n):
    table, view, _ = case
    x = np.full(table.size, view.source)
    flops = float(table.flops(n).sum()) + table.source_flops
    expected = flops / (view.compute_gflops[view.source] * 1e9)
    assert cost.per_token_s(table, view, x, n) == pytest.approx(expected, rel=1e-12)


@FAST
@given(case=cases(), n=st.integers(1, 400), step=st.integers(1, 50))
def test_per_token_is_non_decreasing_in_context(case, n, step):
    table, view, x = case
    a = cost.per_token_s(table, view, np.array(x), n)
    b = cost.per_token_s(table, view, np.array(x), n + step)
    assert b >= a


@FAST
@given(case=cases(), n=st.integers(1, 400), data=st.data())
def test_migration_matches_the_reference(case, n, data):
    table, view, x = case
    current = [data.draw(st.integers(-1, view.size - 1)) for _ in range(table.size)]
    got = cost.migration_s(table, view, np.array(current), np.array(x), n)
    assert got == pytest.approx(ref_migration_s(table, view, current, x, n), rel=1e-9)


@FAST
@given(case=cases(weights_from="peer"), n=st.integers(1, 400), data=st.data())
def test_migration_from_peers_matches_the_reference(case, n, data):
    table, view, x = case
    current = [data.draw(st.integers(-1, view.size - 1)) for _ in range(table.size)]
    got = cost.migration_s(table, view, np.array(current), np.array(x), n)
    assert got == pytest.approx(ref_migration_s(table, view, current, x, n), rel=1e-9)


@FAST
@given(case=cases(), n=st.floats(0.0, 500.0))
def test_memory_use_sums_to_the_blocks_plus_source_weights(case, n):
    table, view, x = case
    mem = cost.memory_use(table, view, np.array(x), n)
    expected = float(table.memory_bytes(n).sum()) + table.source_weight_bytes
    assert mem.sum() == pytest.approx(expected, rel=1e-12)
    assert mem[view.source] >= table.source_weight_bytes
    for d in range(view.size):
        own = sum(float(table.memory_bytes(n)[b]) for b in range(table.size) if x[b] == d)
        pinned = table.source_weight_bytes if d == view.source else 0
        assert mem[d] == pytest.approx(own + pinned, rel=1e-12)


# ----------------------------------------------------------------- hand-made cases

TINY = block_table(
    ModelSpec("tiny", layers=2, d_model=64, heads=4, kv_heads=2, d_ff=128, vocab=100)
)


def _two_devices(make_view, **kw) -> ResourceView:
    return make_view([10.0, 20.0], [1e9, 1e9], **kw)


def test_no_migration_when_nothing_moves_or_nothing_is_placed(make_view):
    view = _two_devices(make_view)
    x = np.zeros(TINY.size, dtype=int)
    assert cost.migration_s(TINY, view, None, x, 50) == 0.0
    assert cost.migration_s(TINY, view, x, x, 50) == 0.0
    assert cost.migration_s(TINY, view, np.full(TINY.size, -1), np.ones(TINY.size, int), 50) == 0.0
    batch = np.stack([x, 1 - x])
    np.testing.assert_array_equal(cost.migration_s(TINY, view, None, batch, 50), [0.0, 0.0])


def test_one_moved_group_costs_latency_plus_its_kv_bytes(make_view):
    bw = np.array([[0.0, 40.0], [25.0, 0.0]])
    lat = np.array([[0.0, 0.003], [0.007, 0.0]])
    view = _two_devices(make_view, bandwidth=bw, latency=lat)
    cur = np.zeros(TINY.size, dtype=int)
    x = cur.copy()
    x[1] = 1  # L0.g1 moves d0 -> d1
    kv = 2 * 16 * 4 * 50  # K and V, head_dim 16, fp32, 50 positions
    assert cost.migration_s(TINY, view, cur, x, 50) == pytest.approx(0.003 + kv * 8 / 40e6)
    # the other way round uses the d1 -> d0 link
    assert cost.migration_s(TINY, view, x, cur, 50) == pytest.approx(0.007 + kv * 8 / 25e6)
    # a projection has no state: only the latency
    y = cur.copy()
    y[TINY.proj_id(0)] = 1
    assert cost.migration_s(TINY, view, cur, y, 50) == pytest.approx(0.003)


def test_weights_from_peers_add_the_weight_bytes(make_view):
    disk = _two_devices(make_view, bandwidth=10.0, latency=0.001)
    peer = _two_devices(make_view, bandwidth=10.0, latency=0.001, weights_from="peer")
    cur = np.zeros(TINY.size, dtype=int)
    x = cur.copy()
    x[TINY.ffn_id(1)] = 1
    x[0] = 1
    kv = 2 * 16 * 4 * 30
    weights = TINY.weight_bytes[0] + TINY.weight_bytes[TINY.ffn_id(1)]
    assert cost.migration_s(TINY, disk, cur, x, 30) == pytest.approx(0.001 + kv * 8 / 10e6)
    assert cost.migration_s(TINY, peer, cur, x, 30) == pytest.approx(
        0.001 + (kv + weights) * 8 / 10e6
    )


def test_migration_sums_on_one_link_and_takes_the_max_over_links(make_view):
    view = make_view([10.0] * 3, [1e9] * 3, bandwidth=8.0, latency=0.002)
    kv = 2 * 16 * 4 * 100  # one group's cache at n = 100: 12_800 bytes
    one = kv * 8 / 8e6
    cur = np.zeros(TINY.size, dtype=int)
    same_link = cur.copy()
    same_link[[0, 1, 4]] = 1  # three groups d0 -> d1
    assert cost.migration_s(TINY, view, cur, same_link, 100) == pytest.approx(0.002 + 3 * one)
    two_links = cur.copy()
    two_links[[0, 1]] = 1
    two_links[4] = 2  # two groups on d0 -> d1, one on d0 -> d2, in parallel
    assert cost.migration_s(TINY, view, cur, two_links, 100) == pytest.approx(0.002 + 2 * one)


def test_fits_respects_capacity_exactly(make_view):
    n = 40
    x = np.zeros(TINY.size, dtype=int)
    x[TINY.ffn_id(1)] = 1
    need = cost.memory_use(TINY, make_view([1.0, 1.0], [1.0, 1.0]), x, n)
    assert need[1] == TINY.memory_bytes(n)[TINY.ffn_id(1)]
    assert cost.fits(TINY, make_view([1.0, 1.0], need), x, n)
    assert not cost.fits(TINY, make_view([1.0, 1.0], need - [0, 1]), x, n)
    assert not cost.fits(TINY, make_view([1.0, 1.0], need - [1, 0]), x, n)
    # the same memory no longer holds a longer context (KV grows on d0)
    assert not cost.fits(TINY, make_view([1.0, 1.0], need), x, n + 1)


def test_fits_rejects_dead_devices(make_view):
    x = np.zeros(TINY.size, dtype=int)
    x[3] = 1
    view = make_view([1.0, 1.0], [1e9, 1e9], alive=[True, False])
    assert not cost.fits(TINY, view, x, 10)
    assert cost.fits(TINY, view, np.zeros(TINY.size, dtype=int), 10)
    np.testing.assert_array_equal(
        cost.fits(TINY, view, np.stack([x, np.zeros_like(x)]), 10), [False, True]
    )


def test_interval_objective_is_k_tokens_at_mean_context_plus_migration(random_view):
    rng = np.random.default_rng(7)
    window = PlanningWindow(context_tokens=20, interval_tokens=6, final_context=100)
    view = random_view(rng, 3, window=window)
    cur = rng.integers(0, 3, TINY.size)
    x = rng.integers(0, 3, TINY.size)
    mean = 20 + (6 + 1) / 2
    expected = 6 * cost.per_token_s(TINY, view, x, mean) + cost.migration_s(TINY, view, cur, x, 20)
    assert cost.interval_objective_s(TINY, view, x, cur) == pytest.approx(expected, rel=1e-12)
    expected_none = 6 * cost.per_token_s(TINY, view, x, mean)
    assert cost.interval_objective_s(TINY, view, x, None) == pytest.approx(expected_none)
    batch = np.stack([x, cur])
    np.testing.assert_allclose(
        cost.interval_objective_s(TINY, view, batch, cur),
        [expected, 6 * cost.per_token_s(TINY, view, cur, mean)],
        rtol=1e-12,
    )


def test_interval_objective_is_inf_when_memory_breaks_at_the_interval_end(make_view):
    window = PlanningWindow(
        context_tokens=20, interval_tokens=6, final_context=100, memory_tokens=6
    )
    x = np.zeros(TINY.size, dtype=int)
    at_end = cost.memory_use(TINY, make_view([1.0], [1.0]), x, 26)
    at_start = cost.memory_use(TINY, make_view([1.0], [1.0]), x, 20)
    assert at_start[0] < at_end[0]
    holds = make_view([10.0], at_end, window=window)
    breaks = make_view([10.0], at_end - 1, window=window)
    assert cost.fits(TINY, breaks, x, 20)  # it fits now, only not until the interval's end
    assert math.isfinite(cost.interval_objective_s(TINY, holds, x, None))
    assert cost.interval_objective_s(TINY, breaks, x, None) == math.inf


def test_memory_holds_until_the_generations_end_unless_told_otherwise(make_view):
    window = PlanningWindow(context_tokens=20, interval_tokens=6, final_context=100)
    assert window.interval_end_context == 100
    assert window.memory_to_horizon().interval_end_context == 26
    x = np.zeros(TINY.size, dtype=int)
    at_end = cost.memory_use(TINY, make_view([1.0], [1.0]), x, 100)
    short = make_view([10.0], at_end - 1, window=window)
    assert cost.interval_objective_s(TINY, short, x, None) == math.inf


def test_interval_end_is_capped_by_the_final_context(make_view):
    window = PlanningWindow(
        context_tokens=20, interval_tokens=8, final_context=24, memory_tokens=8
    )
    assert window.interval_end_context == 24
    x = np.zeros(TINY.size, dtype=int)
    need = cost.memory_use(TINY, make_view([1.0], [1.0]), x, 24)
    assert math.isfinite(
        cost.interval_objective_s(TINY, make_view([10.0], need, window=window), x, None)
    )


def test_link_tables_have_a_zero_diagonal(make_view):
    bw = np.array([[0.0, 50.0, 10.0], [50.0, 0.0, 20.0], [10.0, 20.0, 0.0]])
    lat = np.array([[0.5, 0.001, 0.002], [0.001, 0.5, 0.003], [0.002, 0.003, 0.5]])
    view = make_view([1.0] * 3, [1.0] * 3, bandwidth=bw, latency=lat)
    links = cost.LinkTables.of(view, hidden=256.0)
    for table in (links.latency_s, links.s_per_byte, links.hidden_hop_s):
        np.testing.assert_array_equal(np.diag(table), 0.0)
    assert links.s_per_byte[0, 2] == pytest.approx(8 / 10e6)
    assert links.hidden_hop_s[1, 2] == pytest.approx(0.003 + 256 * 8 / 20e6)
    assert links.latency_s[2, 0] == 0.002


def test_transfer_is_free_within_a_device(make_view):
    view = make_view([1.0, 1.0], [1.0, 1.0], bandwidth=8.0, latency=0.01)
    np.testing.assert_allclose(
        cost.transfer_s(view, np.array([0, 0, 1]), np.array([0, 1, 1]), 1000),
        [0.0, 0.01 + 1000 * 8 / 8e6, 0.0],
    )


def test_kinds_are_the_ones_the_reference_assumes():
    # the reference identifies groups by position within a layer
    per_layer = TINY.per_layer
    for b in range(TINY.size):
        assert (TINY.kind[b] == BlockKind.HEADS) == (b % per_layer < TINY.groups)


# ----------------------------------------------------------------- a switch's two phases


def ref_prepare_s(table: BlockTable, view: ResourceView, current: list[int], x: list[int]) -> float:
    """Each target builds its incoming blocks one after another (weights first cross the
    link from their holder when they come from peers); targets work in parallel."""
    per_target: dict[int, float] = {}
    for b, (c, d) in enumerate(zip(current, x, strict=True)):
        if c == d:
            continue
        t = float(view.install_s[d][int(table.kind[b])])
        holder = c if c >= 0 else view.source
        if view.weights_from == "peer" and holder != d:
            t += ref_hop(view, holder, d, float(table.weight_bytes[b]))
        per_target[d] = per_target.get(d, 0.0) + t
    return max(per_target.values(), default=0.0)


@st.composite
def switch_cases(draw, weights_from: str = "disk"):
    table, view, x = draw(cases(weights_from))
    kinds = len(BlockKind)
    install = np.array(
        [[draw(st.floats(0.0, 0.05)) for _ in range(kinds)] for _ in range(view.size)]
    )
    view = replace(view, install_s=install, control_rtt_s=draw(st.floats(0.0, 0.01)))
    current = [draw(st.integers(-1, view.size - 1)) for _ in range(table.size)]
    return table, view, current, x


@FAST
@given(case=switch_cases(), weights=st.sampled_from(["disk", "peer"]))
def test_prepare_matches_the_reference(case, weights):
    table, view, current, x = case
    view = replace(view, weights_from=weights)
    got = cost.prepare_s(table, view, np.array(current), np.array(x))
    assert got == pytest.approx(ref_prepare_s(table, view, current, x), rel=1e-9, abs=1e-15)


@FAST
@given(case=switch_cases(), n=st.integers(1, 400))
def test_commit_is_the_moved_state_its_acks_and_one_round_trip(case, n):
    table, view, current, x = case
    links = {(c, d) for c, d in zip(current, x, strict=True) if c >= 0 and c != d}
    expected = ref_migration_s(table, view, current, x, n)
    if links:  # the acknowledgements come back over the slowest link used
        expected += max(float(view.latency_s[d, c]) for c, d in links) + view.control_rtt_s
    got = cost.commit_s(table, view, np.array(current), np.array(x), n)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_a_committed_block_costs_its_target_work_at_the_targets_speed(make_view):
    lat = np.array([[0.0, 0.003], [0.007, 0.0]])
    slow, fast = cost.commit_block_s(np.array([1.0, 4.0]))
    assert slow == pytest.approx(cost.COMMIT_BLOCK_GFLOP) and fast == pytest.approx(slow / 4)
    assert cost.commit_block_s(np.array([0.0])).tolist() == [0.0]  # no compute: no block
    view = _two_devices(make_view, latency=lat)
    view = replace(view, move_s_per_block=cost.commit_block_s(np.array([1.0, 4.0])))
    cur = np.zeros(TINY.size, dtype=int)
    x = cur.copy()
    x[TINY.proj_id(0)] = 1  # a projection carries no state: latency, adoption, ack
    assert cost.commit_s(TINY, view, cur, x, 50) == pytest.approx(0.003 + fast + 0.007)
    assert cost.commit_s(TINY, view, x, cur, 50) == pytest.approx(0.007 + slow + 0.003)


@FAST
@given(case=switch_cases(), data=st.data())
def test_prepare_and_commit_batches_equal_row_by_row(case, data):
    table, view, current, x = case
    dev = st.integers(0, view.size - 1)
    batch = np.array([x] + [[data.draw(dev) for _ in x] for _ in range(3)])
    cur = np.array(current)
    prep = cost.prepare_s(table, view, cur, batch)
    commit = cost.commit_s(table, view, cur, batch, 40)
    for row, p, c in zip(batch, prep, commit, strict=True):
        assert p == pytest.approx(cost.prepare_s(table, view, cur, row))
        assert c == pytest.approx(cost.commit_s(table, view, cur, row, 40))


def test_nothing_to_prepare_or_commit_when_nothing_moves(make_view):
    view = replace(_two_devices(make_view), install_s=0.01, control_rtt_s=0.003)
    table = block_table(ModelSpec("t", 1, 16, 2, 2, 32, 10, head_dim=8))
    x = np.zeros(table.size, dtype=np.int64)
    assert cost.prepare_s(table, view, x, x) == 0.0
    assert cost.commit_s(table, view, x, x, 50) == 0.0
    assert cost.prepare_s(table, view, None, x) == 0.0
