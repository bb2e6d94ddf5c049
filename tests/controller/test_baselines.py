"""The static baselines: EdgeShard, memory-proportional (exo) and Galaxy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from edgepart.controller import cost
from edgepart.controller.placement.base import NoFeasiblePlacement, Placement
from edgepart.controller.placement.edgeshard import EdgeShardPlanner, edgeshard_split
from edgepart.controller.placement.galaxy import GalaxyPlanner
from edgepart.controller.placement.layers import (
    largest_remainder,
    layer_memory_bytes,
    layer_split_candidates,
    placement_shards,
    shards_to_placement,
    split_fits,
)
from edgepart.controller.placement.memory_proportional import MemoryProportionalPlanner
from edgepart.controller.view import PlanningWindow, ResourceView
from edgepart.llm.blocks import BlockKind, BlockTable, block_table
from edgepart.llm.model import ModelSpec

TINY = block_table(
    ModelSpec("tiny", layers=4, d_model=64, heads=4, kv_heads=2, d_ff=128, vocab=100)
)
WINDOW = PlanningWindow(context_tokens=8, interval_tokens=8, final_context=1000)
LAYER_END = float(layer_memory_bytes(TINY, WINDOW.final_context)[0])  # one layer at the end
LAYER_START = float(layer_memory_bytes(TINY, WINDOW.context_tokens)[0])
PINNED = TINY.source_weight_bytes
BIG = 1e9


def make_view(
    gflops,
    memory,
    *,
    bw=100.0,
    latency=0.002,
    source: int = 0,
    alive=None,
    window: PlanningWindow = WINDOW,
) -> ResourceView:
    d = len(gflops)
    bandwidth = np.broadcast_to(np.asarray(bw, dtype=float), (d, d)).copy()
    lat = np.broadcast_to(np.asarray(latency, dtype=float), (d, d)).copy()
    return ResourceView(
        devices=tuple(f"d{i}" for i in range(d)),
        compute_gflops=np.asarray(gflops, dtype=float),
        memory_bytes=np.asarray(memory, dtype=float),
        bandwidth_mbit=bandwidth,
        latency_s=lat,
        source=source,
        window=window,
        alive=None if alive is None else np.asarray(alive, dtype=bool),
    )


def random_view(rng: np.random.Generator, devices: int) -> ResourceView:
    """Heterogeneous devices and links; memory between 1 and 3 layers at the end."""
    bw = rng.uniform(0.5, 200.0, (devices, devices))
    return make_view(
        rng.uniform(0.05, 5.0, devices),
        rng.uniform(1.0, 3.2, devices) * LAYER_END + np.r_[PINNED, np.zeros(devices - 1)],
        bw=bw,
        latency=rng.uniform(0.0, 0.005, (devices, devices)),
        source=int(rng.integers(devices)),
    )


def assert_valid(view: ResourceView, model: BlockTable, p: Placement) -> None:
    """Covers every block, only usable devices, memory holds at the END of generation."""
    assert p.assignment.shape == (model.size,)
    assert view.usable[p.assignment].all()
    assert cost.fits(model, view, p.assignment, view.window.final_context)


def brute_force_split(view: ResourceView, model: BlockTable) -> float:
    """Best per-token delay over every contiguous split on distinct usable devices."""
    layers = model.spec.layers
    usable = np.flatnonzero(view.usable).tolist()
    best = np.inf
    for parts in range(1, min(layers, len(usable)) + 1):
        for cuts in itertools.combinations(range(1, layers), parts - 1):
            counts = np.diff([0, *cuts, layers]).tolist()
            for devices in itertools.permutations(usable, parts):
                shards = list(zip(devices, counts, strict=True))
                if not split_fits(view, model, shards, view.window.final_context):
                    continue
                x = shards_to_placement(model, shards).assignment
                best = min(best, cost.per_token_s(model, view, x, view.window.mean_context))
    return best


# ---------------------------------------------------------------- layers.py helpers


def test_shards_to_placement_puts_every_block_of_a_layer_on_its_device():
    p = shards_to_placement(TINY, [(2, 1), (0, 3)])
    per_layer = p.assignment.reshape(4, TINY.per_layer)
    assert per_layer[0].tolist() == [2] * TINY.per_layer
    assert (per_layer[1:] == 0).all()
    assert placement_shards(TINY, p) == [(2, 1), (0, 3)]
    with pytest.raises(ValueError):
        shards_to_placement(TINY, [(0, 3)])
    with pytest.raises(ValueError):
        shards_to_placement(TINY, [(0, 4), (1, 0)])


def test_layer_memory_is_sum_of_block_memory_and_grows_with_context():
    mem = layer_memory_bytes(TINY, 100)
    ids = [*TINY.group_ids(1), TINY.proj_id(1), TINY.ffn_id(1)]
    assert mem[1] == pytest.approx(TINY.memory_bytes(100)[ids].sum())
    assert mem.sum() == pytest.approx(TINY.memory_bytes(100).sum())
    growth = layer_memory_bytes(TINY, 101) - mem
    assert growth == pytest.approx(np.full(4, TINY.groups * TINY.kv_bytes_per_token[0]))


def test_largest_remainder():
    assert largest_remainder(4, np.array([1.0, 1.0, 1.0])).tolist() == [2, 1, 1]
    assert largest_remainder(10, np.array([5.0, 3.0, 2.0])).tolist() == [5, 3, 2]
    assert largest_remainder(2, np.array([10.0, 1.0, 1.0])).tolist() == [2, 0, 0]
    counts = largest_remainder(7, np.array([0.3, 2.9, 1.1, 0.0]))
    assert counts.sum() == 7 and counts[3] == 0


# ---------------------------------------------------------------- EdgeShard


def test_edgeshard_puts_everything_on_the_fastest_device_when_it_fits():
    view = make_view([1.0, 50.0, 2.0], [PINNED + 10, BIG, BIG], bw=1000.0, latency=0.0001)
    p = EdgeShardPlanner().place(view, TINY, None)
    assert placement_shards(TINY, p) == [(1, 4)]
    assert_valid(view, TINY, p)


@pytest.mark.parametrize("seed", range(40))
def test_edgeshard_dp_matches_brute_force_and_the_cost_model(seed):
    rng = np.random.default_rng(seed)
    view = random_view(rng, int(rng.integers(2, 4)))
    brute = brute_force_split(view, TINY)
    if not np.isfinite(brute):
        with pytest.raises(NoFeasiblePlacement):
            EdgeShardPlanner().place(view, TINY, None)
        return
    split = edgeshard_split(view, TINY)
    assert split.exact
    p = EdgeShardPlanner().place(view, TINY, None)
    assert_valid(view, TINY, p)
    shards = placement_shards(TINY, p)
    assert len({d for d, _ in shards}) == len(shards)  # one shard per device
    actual = cost.per_token_s(TINY, view, p.assignment, view.window.mean_context)
    assert split.per_token_s == pytest.approx(actual, rel=1e-9)  # DP value = cost model
    assert split.per_token_s == pytest.approx(brute, rel=1e-9)  # and optimal


@pytest.mark.parametrize("seed", range(20))
def test_edgeshard_heuristic_dp_is_valid_and_never_beats_the_optimum(seed):
    rng = np.random.default_rng(100 + seed)
    view = random_view(rng, 3)
    brute = brute_force_split(view, TINY)
    try:
        split = edgeshard_split(view, TINY, exact_max_devices=0)
    except NoFeasiblePlacement:
        return
    assert not split.exact
    p = shards_to_placement(TINY, list(split.shards))
    assert_valid(view, TINY, p)
    assert len({d for d, _ in split.shards}) == len(split.shards)
    actual = cost.per_token_s(TINY, view, p.assignment, view.window.mean_context)
    assert split.per_token_s == pytest.approx(actual, rel=1e-9)
    assert split.per_token_s >= brute * (1 - 1e-9)


def test_edgeshard_holds_memory_until_the_end_of_generation():
    # The fast device holds all 4 layers at the decision's context but only 2 at the end.
    fast_mem = 2.5 * LAYER_END
    assert fast_mem > 4 * LAYER_START
    view = make_view([1.0, 50.0, 1.0], [PINNED + 3 * LAYER_END, fast_mem, 3 * LAYER_END])
    p = EdgeShardPlanner().place(view, TINY, None)
    assert_valid(view, TINY, p)
    shards = placement_shards(TINY, p)
    assert (1, 2) in shards and len(shards) == 2
    assert not cost.fits(TINY, view, shards_to_placement(TINY, [(1, 4)]).assignment, 1000)


def test_edgeshard_source_pays_for_its_pinned_blocks():
    # Without the embedding/LM head the fast source would hold all 4 layers; with them, 3.
    view = make_view([50.0, 1.0], [4 * LAYER_END + PINNED / 2, 2 * LAYER_END])
    shards = placement_shards(TINY, EdgeShardPlanner().place(view, TINY, None))
    assert sorted(shards) == [(0, 3), (1, 1)]


def test_edgeshard_never_uses_dead_or_exhausted_devices():
    # d1 dead, d2 without compute, d3 without memory: only the slow source is usable.
    view = make_view(
        [1.0, 100.0, 0.0, 2.0], [PINNED + BIG, BIG, BIG, 0.0], alive=[True, False, True, True]
    )
    p = EdgeShardPlanner().place(view, TINY, None)
    assert set(p.assignment.tolist()) <= {0}
    assert_valid(view, TINY, p)


def test_edgeshard_raises_when_nothing_fits():
    view = make_view([1.0, 1.0], [PINNED + 1.5 * LAYER_END, 1.5 * LAYER_END])
    with pytest.raises(NoFeasiblePlacement, match="edgeshard"):
        EdgeShardPlanner().place(view, TINY, None)
    # The pinned embedding/LM head alone do not fit the source.
    view = make_view([1.0, 1.0], [PINNED - 1, BIG])
    with pytest.raises(NoFeasiblePlacement, match="embedding"):
        EdgeShardPlanner().place(view, TINY, None)


def test_edgeshard_exact_dp_scales_to_twelve_devices():
    rng = np.random.default_rng(7)
    model = block_table(
        ModelSpec("deep", layers=30, d_model=64, heads=4, kv_heads=2, d_ff=128, vocab=100)
    )
    layer = float(layer_memory_bytes(model, WINDOW.final_context)[0])
    view = make_view(
        rng.uniform(0.5, 5.0, 12),
        rng.uniform(1.0, 6.0, 12) * layer + np.r_[model.source_weight_bytes, np.zeros(11)],
        bw=rng.uniform(1.0, 100.0, (12, 12)),
    )
    split = edgeshard_split(view, model)
    p = shards_to_placement(model, list(split.shards))
    assert_valid(view, model, p)
    assert split.per_token_s == pytest.approx(
        cost.per_token_s(model, view, p.assignment, WINDOW.mean_context), rel=1e-9
    )


# ---------------------------------------------------------------- memory-proportional


def test_memory_proportional_counts_follow_memory_in_descending_order():
    # Memory 1:2:1 -> 1, 2, 1 layers; exo's order: largest memory first.
    view = make_view([1.0, 1.0, 1.0], [PINNED + 10 * LAYER_END, 20 * LAYER_END, 10 * LAYER_END])
    p = MemoryProportionalPlanner().place(view, TINY, None)
    assert placement_shards(TINY, p) == [(1, 2), (0, 1), (2, 1)]
    assert_valid(view, TINY, p)


def test_memory_proportional_skips_devices_with_no_share():
    view = make_view([1.0, 1.0, 1.0], [BIG, BIG / 1000, BIG])
    shards = placement_shards(TINY, MemoryProportionalPlanner().place(view, TINY, None))
    assert shards == [(0, 2), (2, 2)]


def test_memory_proportional_shifts_overflow_to_next_device_with_room():
    # A big vocabulary: the source's pinned embedding/LM head count in its memory share
    # (as in exo) but leave it room for one layer at the END of generation (KV growth);
    # at the decision's context it would hold its share of two.
    model = block_table(
        ModelSpec("big-vocab", layers=4, d_model=64, heads=4, kv_heads=2, d_ff=128, vocab=2000)
    )
    layer_end = float(layer_memory_bytes(model, WINDOW.final_context)[0])
    layer_start = float(layer_memory_bytes(model, WINDOW.context_tokens)[0])
    pinned = model.source_weight_bytes
    memory = [pinned + 1.5 * layer_end, 2.2 * layer_end, 1.1 * layer_end]
    assert largest_remainder(4, np.array(memory)).tolist() == [2, 1, 1]
    naive = shards_to_placement(model, [(0, 2), (1, 1), (2, 1)])
    view = make_view([1.0, 1.0, 1.0], memory)
    assert cost.fits(model, view, naive.assignment, WINDOW.context_tokens)
    assert memory[0] > pinned + 2 * layer_start
    assert not cost.fits(model, view, naive.assignment, WINDOW.final_context)
    p = MemoryProportionalPlanner().place(view, model, None)
    assert placement_shards(model, p) == [(0, 1), (1, 2), (2, 1)]
    assert_valid(view, model, p)


def test_memory_proportional_takes_leftover_back_from_the_end():
    # Order d0, d1; shares 2, 2; d1 has room for one layer at the end: the layer it
    # cannot hold has no later device, so d0 (room for 3) takes it back.
    view = make_view([1.0, 1.0], [PINNED + 3.0 * LAYER_END, 1.9 * LAYER_END])
    p = MemoryProportionalPlanner().place(view, TINY, None)
    assert placement_shards(TINY, p) == [(0, 3), (1, 1)]
    assert_valid(view, TINY, p)


def test_memory_proportional_dead_devices_and_infeasible():
    view = make_view([1.0, 1.0, 1.0], [BIG, BIG, BIG], alive=[True, False, True])
    p = MemoryProportionalPlanner().place(view, TINY, None)
    assert 1 not in p.assignment
    assert_valid(view, TINY, p)
    view = make_view([1.0, 1.0], [PINNED + 1.9 * LAYER_END, 1.9 * LAYER_END])
    with pytest.raises(NoFeasiblePlacement, match="memory-proportional"):
        MemoryProportionalPlanner().place(view, TINY, None)


# ---------------------------------------------------------------- Galaxy


def _group_counts(view: ResourceView, p: Placement, layer: int) -> np.ndarray:
    return np.bincount(p.assignment[TINY.group_ids(layer)], minlength=view.size)


def test_galaxy_splits_groups_by_speed_and_sends_proj_ffn_to_the_fastest():
    view = make_view([10.0, 30.0, 10.0], [BIG, BIG, BIG])
    p = GalaxyPlanner().place(view, TINY, None)
    assert_valid(view, TINY, p)
    for layer in range(4):
        # 2 groups, speeds 1:3:1 -> quotas 0.4, 1.2, 0.4 -> 0, 1 + 1 (tie: d0 first), 0.
        assert _group_counts(view, p, layer).tolist() == [1, 1, 0]
        assert p.assignment[TINY.proj_id(layer)] == 1
        assert p.assignment[TINY.ffn_id(layer)] == 1


def test_galaxy_speed_proportional_on_more_groups():
    model = block_table(
        ModelSpec("mha", layers=4, d_model=64, heads=8, kv_heads=8, d_ff=128, vocab=100)
    )
    view = make_view([5.0, 20.0, 10.0, 1.0], [BIG, BIG, BIG, BIG])
    p = GalaxyPlanner().place(view, model, None)
    assert_valid(view, model, p)
    for layer in range(4):
        counts = np.bincount(p.assignment[model.group_ids(layer)], minlength=4)
        # quotas 8 * (5, 20, 10, 1) / 36 = 1.11, 4.44, 2.22, 0.22: the slowest gets none.
        assert counts.tolist() == [1, 5, 2, 0]


def test_galaxy_moves_groups_off_overflowing_devices_at_the_end():
    # d1 is fastest and takes every proj/FFN; its groups' KV outgrows it by the end.
    proj_ffn = sum(
        TINY.memory_bytes(WINDOW.final_context)[[TINY.proj_id(ell), TINY.ffn_id(ell)]].sum()
        for ell in range(4)
    )
    group_end = float(TINY.memory_bytes(WINDOW.final_context)[0])
    group_start = float(TINY.memory_bytes(WINDOW.context_tokens)[0])
    mem1 = proj_ffn + 2.5 * group_end
    assert mem1 > proj_ffn + 4 * group_start  # its share would fit at the start
    view = make_view([10.0, 30.0, 10.0], [PINNED + BIG, mem1, BIG])
    p = GalaxyPlanner().place(view, TINY, None)
    assert_valid(view, TINY, p)
    kinds = TINY.kind
    on_fast = p.assignment == 1
    assert on_fast[kinds != BlockKind.HEADS].all()
    assert (on_fast & (kinds == BlockKind.HEADS)).sum() == 2
    # Layers 0-1 keep the speed split; the groups of layers 2-3 moved to the next slower
    # device (d0: as fast as d2, lower index).
    for layer, counts in enumerate([[1, 1, 0], [1, 1, 0], [2, 0, 0], [2, 0, 0]]):
        assert _group_counts(view, p, layer).tolist() == counts


def test_galaxy_dead_devices_and_infeasible():
    view = make_view([10.0, 30.0, 10.0], [BIG, BIG, BIG], alive=[True, False, True])
    p = GalaxyPlanner().place(view, TINY, None)
    assert 1 not in p.assignment
    assert_valid(view, TINY, p)
    view = make_view([10.0, 30.0], [PINNED + LAYER_END, 2 * LAYER_END])
    with pytest.raises(NoFeasiblePlacement, match="galaxy"):
        GalaxyPlanner().place(view, TINY, None)


# ---------------------------------------------------------------- shared


def test_static_planners_declare_themselves():
    for planner, name in (
        (EdgeShardPlanner(), "edgeshard"),
        (MemoryProportionalPlanner(), "memory-proportional"),
        (GalaxyPlanner(), "galaxy"),
    ):
        assert planner.name == name
        assert planner.replans is False


def test_layer_split_candidates_are_feasible_layer_splits():
    view = make_view([1.0, 50.0, 2.0], [PINNED + 2 * LAYER_END, 2.5 * LAYER_END, BIG])
    candidates = layer_split_candidates(view, TINY)
    assert 1 <= len(candidates) <= 2
    assert candidates[0] == EdgeShardPlanner().place(view, TINY, None)
    for p in candidates:
        assert_valid(view, TINY, p)
        placement_shards(TINY, p)  # raises unless every layer sits on one device
    assert len(set(candidates)) == len(candidates)
    nothing = make_view([1.0, 1.0], [PINNED + 1.5 * LAYER_END, 1.5 * LAYER_END])
    assert layer_split_candidates(nothing, TINY) == []
