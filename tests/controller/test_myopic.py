"""The myopic planner against brute force, the layer splits and its own contracts."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

from edgepart.controller import cost
from edgepart.controller.placement import NoFeasiblePlacement, Placement
from edgepart.controller.placement.edgeshard import EdgeShardPlanner
from edgepart.controller.placement.local_search import respread_candidates
from edgepart.controller.placement.memory_proportional import MemoryProportionalPlanner
from edgepart.controller.placement.myopic import MyopicPlanner
from edgepart.controller.placement.scored_placement import ScoredPlacement
from edgepart.controller.placement.seeds import chain_optimum, group_gather_s, spread_to_groups
from edgepart.controller.placement.static_heads import StaticHeadsPlanner
from edgepart.controller.view import PlanningWindow, ResourceView
from edgepart.llm.blocks import block_table
from edgepart.llm.model import ModelSpec

TWO_LAYERS = block_table(
    ModelSpec("t2", layers=2, d_model=2048, heads=4, kv_heads=2, d_ff=8192, vocab=1000)
)


def random_view(
    rng: np.random.Generator,
    table,
    devices: int,
    tight: float | None = None,
    window: PlanningWindow = PlanningWindow(64, 8, 200),  # noqa: B008 - frozen value
    weights_from="disk",
) -> ResourceView:
    bw = rng.uniform(50, 2000, (devices, devices))
    lat = rng.uniform(0.0005, 0.003, (devices, devices))
    total = table.memory_bytes(window.final_context).sum() + table.source_weight_bytes
    if tight is None:
        mem = np.full(devices, 2.0 * total)
    else:
        mem = rng.uniform(tight, 2 * tight, devices) * total / devices * 2
        mem[0] = max(mem[0], 1.2 * table.source_weight_bytes)
    return ResourceView(
        tuple(f"d{i}" for i in range(devices)),
        rng.uniform(1, 20, devices),
        mem,
        (bw + bw.T) / 2,
        (lat + lat.T) / 2,
        0,
        window,
        weights_from=weights_from,
    )


def all_placements(table, devices: int) -> np.ndarray:
    return np.array(list(itertools.product(range(devices), repeat=table.size)))


ALL_3 = all_placements(TWO_LAYERS, 3)


@pytest.mark.parametrize("exact", [True, False], ids=["portfolio", "heuristic"])
@pytest.mark.parametrize("seed", range(16))
def test_myopic_is_near_the_brute_force_optimum(seed, exact):
    rng = np.random.default_rng(seed)
    view = random_view(
        rng,
        TWO_LAYERS,
        3,
        tight=0.5 if seed % 2 else None,
        weights_from="peer" if seed % 4 == 1 else "disk",
    )
    current = ALL_3[rng.integers(len(ALL_3))] if seed % 3 else None
    objective = cost.interval_objective_s(TWO_LAYERS, view, ALL_3, current)
    best = objective.min()
    if not np.isfinite(best):
        with pytest.raises(NoFeasiblePlacement):
            MyopicPlanner(exact=exact).place(
                view, TWO_LAYERS, None if current is None else Placement(current)
            )
        return
    planner = MyopicPlanner(exact=exact)
    placement = planner.place(view, TWO_LAYERS, None if current is None else Placement(current))
    got = cost.interval_objective_s(TWO_LAYERS, view, placement.assignment, current)
    assert got == pytest.approx(planner.last_objective_s, rel=1e-9)
    assert got <= best * 1.05


@pytest.mark.parametrize("seed", range(6))
def test_chain_optimum_is_the_exact_latency_optimum_without_memory_limits(seed):
    rng = np.random.default_rng(100 + seed)
    view = random_view(rng, TWO_LAYERS, 3)
    n = view.window.mean_context
    latency = cost.per_token_s(TWO_LAYERS, view, ALL_3, n)
    chain = chain_optimum(TWO_LAYERS, view)
    assert cost.per_token_s(TWO_LAYERS, view, chain, n) == pytest.approx(latency.min(), rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_group_gather_is_the_min_max_spread(seed):
    rng = np.random.default_rng(200 + seed)
    table = block_table(
        ModelSpec("g", layers=1, d_model=256, heads=4, kv_heads=4, d_ff=512, vocab=50)
    )
    view = random_view(rng, table, 3)
    caps = rng.integers(0, 4, 3)
    caps[0] = 4  # always room for all groups somewhere
    inputs = np.arange(3)
    _, counts = group_gather_s(table, view, 30.0, inputs, caps)
    # brute force: every assignment of the 4 groups within the caps, projection on p
    for a in inputs:
        for p in range(3):
            best = np.inf
            for groups in itertools.product(range(3), repeat=4):
                if (np.bincount(groups, minlength=3) > caps).any():
                    continue
                x = np.array([*groups, p, p])
                prev = np.array([[a]])
                t = cost.layer_delays(
                    table, view, 30.0, prev, x[None, None, :4], x[None, None, 4], x[None, None, 5]
                )[0, 0]
                best = min(best, t)
            own = cost.layer_delays(
                table,
                view,
                30.0,
                np.array([[a]]),
                np.repeat(np.arange(3), counts[a, p])[None, None, :],
                np.array([[p]]),
                np.array([[p]]),
            )[0, 0]
            assert counts[a, p].sum() == 4
            assert (counts[a, p] <= caps).all()
            assert own == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("exact", [True, False], ids=["portfolio", "heuristic"])
@pytest.mark.parametrize("seed", range(8))
def test_myopic_is_never_worse_than_a_layer_split(seed, exact):
    rng = np.random.default_rng(300 + seed)
    table = block_table(
        ModelSpec("m", layers=6, d_model=1024, heads=8, kv_heads=4, d_ff=4096, vocab=5000)
    )
    view = random_view(
        rng, table, 6, tight=0.6 if seed % 2 else None, window=PlanningWindow(128, 8, 256)
    )
    mine = cost.interval_objective_s(
        table, view, MyopicPlanner(exact=exact).place(view, table, None).assignment, None
    )
    for baseline in (EdgeShardPlanner(), MemoryProportionalPlanner()):
        try:
            theirs = baseline.place(view, table, None)
        except NoFeasiblePlacement:
            continue
        assert mine <= cost.interval_objective_s(table, view, theirs.assignment, None) + 1e-12


def test_result_fits_memory_and_avoids_dead_devices():
    rng = np.random.default_rng(7)
    table = block_table(
        ModelSpec("m", layers=4, d_model=512, heads=8, kv_heads=2, d_ff=2048, vocab=3000)
    )
    base = random_view(rng, table, 5, tight=0.7)
    alive = np.array([True, True, False, True, True])
    view = ResourceView(
        base.devices,
        base.compute_gflops,
        base.memory_bytes,
        base.bandwidth_mbit,
        base.latency_s,
        0,
        base.window,
        alive=alive,
    )
    x = MyopicPlanner().place(view, table, None).assignment
    assert not (x == 2).any()
    assert cost.fits(table, view, x, view.window.interval_end_context)


def test_no_room_anywhere_raises():
    rng = np.random.default_rng(8)
    view = random_view(rng, TWO_LAYERS, 3)
    tiny = ResourceView(
        view.devices,
        view.compute_gflops,
        np.full(3, 1e6),
        view.bandwidth_mbit,
        view.latency_s,
        0,
        view.window,
    )
    with pytest.raises(NoFeasiblePlacement):
        MyopicPlanner().place(tiny, TWO_LAYERS, None)


@pytest.mark.parametrize("exact", [True, False], ids=["portfolio", "heuristic"])
def test_deterministic(exact):
    rng = np.random.default_rng(9)
    view = random_view(rng, TWO_LAYERS, 3, tight=0.5)
    first = MyopicPlanner(exact=exact).place(view, TWO_LAYERS, None)
    assert MyopicPlanner(exact=exact).place(view, TWO_LAYERS, None) == first


def _two_device_view(slow_gflops: float, bandwidth_mbit: float, interval: int) -> ResourceView:
    return ResourceView(
        ("a", "b"),
        np.array([slow_gflops, 50.0]),
        np.full(2, 1e10),
        np.full((2, 2), bandwidth_mbit),
        np.full((2, 2), 1e-3),
        0,
        PlanningWindow(4000, interval, 4200),
        weights_from="peer",
    )


def test_migrates_only_when_the_interval_gain_beats_the_move():
    table = block_table(
        ModelSpec("s", layers=1, d_model=1024, heads=4, kv_heads=4, d_ff=4096, vocab=100)
    )
    on_source = Placement(np.zeros(table.size, dtype=np.int64))
    # the source became slow: over a long interval moving pays, over one token it does not
    # (its weights and 4000 positions of KV must cross a slow link)
    long_run = MyopicPlanner().place(_two_device_view(2.0, 1000.0, 64), table, on_source)
    one_token = MyopicPlanner().place(_two_device_view(2.0, 1000.0, 1), table, on_source)
    assert long_run.moved(on_source).any()
    assert not one_token.moved(on_source).any()


def test_scorers_agree_with_each_other():
    rng = np.random.default_rng(10)
    table = block_table(
        ModelSpec("t", layers=3, d_model=256, heads=4, kv_heads=2, d_ff=1024, vocab=100)
    )
    for trial in range(10):
        view = random_view(rng, table, 4, tight=0.8, weights_from="peer" if trial % 2 else "disk")
        per_device = rng.uniform(0.0, 0.05, 4)  # a slow device installs slowly
        view = replace(view, move_s_per_block=(0.0, 0.002, per_device)[trial % 3])
        x = rng.integers(0, 4, table.size)
        current = rng.integers(-1, 4, table.size) if trial % 3 else None
        search = ScoredPlacement(table, view, x, current)
        blocks = np.arange(table.size)
        fast = search.single_moves(blocks)
        slow = np.array([search.score(np.array([b]), np.arange(4)[:, None]) for b in blocks])
        slow[blocks, x] = np.inf
        assert (np.isfinite(fast) == np.isfinite(slow)).all()
        finite = np.isfinite(slow)
        np.testing.assert_allclose(fast[finite], slow[finite], rtol=1e-9, atol=1e-12)
        # and a move's scored change is what applying it does to the objective
        b, d = np.unravel_index(np.argmin(np.where(finite, slow, np.inf)), slow.shape)
        if np.isfinite(slow[b, d]) and np.isfinite(search.objective()):
            before = search.objective()
            search.apply(np.array([b]), np.array([d]))
            expected = cost.interval_objective_s(table, view, search.x, current)
            assert search.objective() == pytest.approx(expected, rel=1e-9)
            assert search.objective() - before == pytest.approx(slow[b, d], rel=1e-6, abs=1e-12)


def test_respread_batch_agrees_with_the_exact_score():
    rng = np.random.default_rng(12)
    table = block_table(
        ModelSpec("t", layers=3, d_model=256, heads=4, kv_heads=2, d_ff=1024, vocab=100)
    )
    priced = 0
    for trial in range(20):
        view = random_view(rng, table, 4, tight=0.8, weights_from="peer" if trial % 2 else "disk")
        view = replace(view, move_s_per_block=(0.0, 0.002, rng.uniform(0.0, 0.05, 4))[trial % 3])
        current = rng.integers(-1, 4, table.size) if trial % 3 else None
        search = ScoredPlacement(table, view, rng.integers(0, 4, table.size), current)
        layers = np.arange(table.spec.layers)
        rows, delta = respread_candidates(search, layers)
        for i, ell in enumerate(layers):
            blocks = np.r_[table.group_ids(ell), table.proj_id(ell)]
            exact = search.score(blocks, rows[i])
            offered = np.isfinite(delta[i])
            assert np.isfinite(exact[offered]).all()
            np.testing.assert_allclose(delta[i][offered], exact[offered], rtol=1e-9, atol=1e-12)
            priced += offered.sum()
    assert priced > 100


def test_spread_to_groups_keeps_groups_where_their_device_has_room():
    rng = np.random.default_rng(13)
    for _ in range(300):
        devices, groups = int(rng.integers(1, 6)), int(rng.integers(1, 8))
        counts = np.bincount(rng.integers(0, devices, groups), minlength=devices)
        present = rng.integers(-1, devices, groups)
        # the reference: groups in order stay while their device has count left
        left, want = counts.copy(), np.full(groups, -1)
        for i, d in enumerate(present):
            if d >= 0 and left[d] > 0:
                want[i], left[d] = d, left[d] - 1
        want[want < 0] = np.repeat(np.arange(devices), left)
        assert (spread_to_groups(counts, present) == want).all()
        batch = spread_to_groups(np.stack([counts, counts]), present)
        assert (batch == want).all()


def test_static_heads_fits_until_the_end_of_generation():
    rng = np.random.default_rng(11)
    table = block_table(
        ModelSpec("m", layers=4, d_model=512, heads=8, kv_heads=2, d_ff=2048, vocab=3000)
    )
    view = random_view(rng, table, 4, tight=0.7, window=PlanningWindow(64, 8, 512))
    x = StaticHeadsPlanner().place(view, table, None).assignment
    assert cost.fits(table, view, x, view.window.final_context)
