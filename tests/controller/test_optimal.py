"""The exact MILP planner agrees with brute-force enumeration of the cost model."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import replace

import numpy as np
import pytest

from edgepart.controller.cost import fits, interval_objective_s
from edgepart.controller.placement.base import NoFeasiblePlacement, Placement
from edgepart.controller.placement.optimal import MilpResult, OptimalPlanner, solve
from edgepart.controller.view import PlanningWindow, ResourceView
from edgepart.llm.blocks import BlockTable, block_table
from edgepart.llm.model import ModelSpec

REL = 1e-9


def tiny_model(layers: int, groups: int, queries: int = 1) -> BlockTable:
    """A model small enough to enumerate: d_model 48, FFN 128."""
    heads = groups * queries
    spec = ModelSpec(
        "tiny", layers=layers, d_model=16 * heads, heads=heads, kv_heads=groups,
        d_ff=128, vocab=256,
    )
    return block_table(spec)


def random_view(
    rng: np.random.Generator,
    devices: int,
    model: BlockTable,
    *,
    tight_memory: bool = False,
    peer: bool = False,
    dead: int | None = None,
    broken_link: bool = False,
) -> ResourceView:
    """Devices whose compute (MFLOP/s) and links (Mbit/s, ms) make every term matter."""
    bw = rng.uniform(0.2, 20.0, (devices, devices))
    lat = rng.uniform(1e-4, 5e-3, (devices, devices))
    if broken_link:
        i, j = rng.choice(devices, 2, replace=False)
        bw[i, j] = 0.0
        bw[j, i] = np.inf
    window = PlanningWindow(
        context_tokens=int(rng.integers(0, 64)),
        interval_tokens=int(rng.integers(1, 16)),
        final_context=256,
    )
    total = float(model.memory_bytes(window.interval_end_context).sum())
    if tight_memory:
        memory = rng.uniform(0.4, 0.9, devices) * total
        memory[0] += model.source_weight_bytes
    else:
        memory = np.full(devices, 10 * total + model.source_weight_bytes)
    alive = np.ones(devices, dtype=bool)
    if dead is not None:
        alive[dead] = False
    return ResourceView(
        devices=tuple(f"d{i}" for i in range(devices)),
        compute_gflops=rng.uniform(0.002, 0.05, devices),
        memory_bytes=memory,
        bandwidth_mbit=bw,
        latency_s=lat,
        source=0,
        window=window,
        weights_from="peer" if peer else "disk",
        alive=alive,
    )


def brute_force(model: BlockTable, view: ResourceView, current: np.ndarray | None) -> float:
    """Minimum of cost.interval_objective_s over every placement (inf if none is finite)."""
    every = np.array(list(itertools.product(range(view.size), repeat=model.size)))
    with np.errstate(invalid="ignore"):
        cost = interval_objective_s(model, view, every, current)
    return float(np.nanmin(np.where(np.isnan(cost), np.inf, cost)))


def case(seed: int):
    """A seeded instance varying layers, groups, GQA, devices, memory, migration and links."""
    rng = np.random.default_rng(seed)
    layers = 1 + seed % 2
    groups = 2 + (seed // 2) % 2
    devices = 3 if layers * (groups + 2) <= 8 else 2
    if seed % 7 == 3:
        devices = 3  # 10 blocks on 3 devices: 59049 placements
    model = tiny_model(layers, groups, queries=1 + (seed % 5 == 4))
    view = random_view(
        rng,
        devices,
        model,
        tight_memory=seed % 3 == 0,
        peer=seed % 4 == 1,
        dead=(1 + seed % (devices - 1)) if seed % 6 == 5 and devices > 2 else None,
        broken_link=seed % 5 == 2,
    )
    if seed % 3 == 1:  # installing a block costs time too, more on a slow device
        move_s = 0.004 if seed % 2 else rng.uniform(0.001, 0.01, devices)
        view = replace(view, move_s_per_block=move_s)
    current = None
    if seed % 2 == 0:
        current = rng.integers(-1, devices, model.size)
    return model, view, current


@pytest.mark.parametrize("seed", range(30))
def test_matches_brute_force(seed: int) -> None:
    model, view, current = case(seed)
    best = brute_force(model, view, current)
    cur = None if current is None else Placement(current)
    if not np.isfinite(best):
        with pytest.raises(NoFeasiblePlacement):
            solve(view, model, cur)
        return
    result = solve(view, model, cur)
    assert isinstance(result, MilpResult)
    assert result.proven_optimal
    assert result.objective_s == pytest.approx(best, rel=REL)
    # The reported objective is the cost model's, and the solver's own agrees with it.
    again = interval_objective_s(model, view, result.placement.assignment, current)
    assert result.objective_s == again
    assert result.solver_objective_s == pytest.approx(best, rel=1e-6)
    assert fits(model, view, result.placement.assignment, view.window.interval_end_context)


def test_warm_start_keeps_optimum() -> None:
    model, view, current = case(4)
    best = brute_force(model, view, current)
    cur = Placement(current)
    start = Placement(np.zeros(model.size, dtype=np.int64))
    result = solve(view, model, cur, initial=start)
    assert result.objective_s == pytest.approx(best, rel=REL)


def test_planner_protocol_and_last_objective() -> None:
    model, view, _ = case(1)
    planner = OptimalPlanner(time_limit_s=30.0)
    assert planner.name == "optimal" and planner.replans
    assert planner.last_objective_s is None
    placement = planner.place(view, model, None)
    assert placement.assignment.shape == (model.size,)
    assert planner.last_objective_s == pytest.approx(brute_force(model, view, None), rel=REL)
    assert planner.last_objective_s == interval_objective_s(
        model, view, placement.assignment, None
    )


def test_infeasible_memory_raises() -> None:
    model = tiny_model(1, 2)
    view = random_view(np.random.default_rng(0), 3, model)
    small = np.full(3, model.weight_bytes.max() / 2)
    small[0] += model.source_weight_bytes
    view = ResourceView(
        devices=view.devices, compute_gflops=view.compute_gflops, memory_bytes=small,
        bandwidth_mbit=view.bandwidth_mbit, latency_s=view.latency_s, source=0,
        window=view.window,
    )
    with pytest.raises(NoFeasiblePlacement):
        OptimalPlanner().place(view, model, None)


def test_source_without_room_for_pinned_blocks_raises() -> None:
    model = tiny_model(1, 2)
    view = random_view(np.random.default_rng(1), 3, model)
    memory = view.memory_bytes.copy()
    memory[0] = model.source_weight_bytes / 2
    view = ResourceView(
        devices=view.devices, compute_gflops=view.compute_gflops, memory_bytes=memory,
        bandwidth_mbit=view.bandwidth_mbit, latency_s=view.latency_s, source=0,
        window=view.window,
    )
    with pytest.raises(NoFeasiblePlacement):
        solve(view, model, None)


def test_dead_device_never_used() -> None:
    model = tiny_model(2, 3)
    rng = np.random.default_rng(7)
    view = random_view(rng, 3, model, dead=2)
    # Make the dead device by far the most attractive, were it alive.
    speeds = view.compute_gflops.copy()
    speeds[2] = 100.0
    view = ResourceView(
        devices=view.devices, compute_gflops=speeds, memory_bytes=view.memory_bytes,
        bandwidth_mbit=np.full((3, 3), 1e6), latency_s=np.full((3, 3), 1e-6), source=0,
        window=view.window, alive=view.alive,
    )
    current = np.full(model.size, 2)  # everything was on the device that died
    placement = OptimalPlanner().place(view, model, Placement(current))
    assert not (placement.assignment == 2).any()
    assert np.isfinite(interval_objective_s(model, view, placement.assignment, current))


def test_exact_memory_boundary_is_feasible() -> None:
    model = tiny_model(1, 2)
    view = random_view(np.random.default_rng(3), 2, model)
    n = view.window.interval_end_context
    mem = model.memory_bytes(n)
    # Device 1 is much faster but holds exactly the FFN and nothing more.
    memory = np.array([mem.sum() + model.source_weight_bytes, mem[model.ffn_id(0)]])
    view = ResourceView(
        devices=view.devices, compute_gflops=np.array([0.001, 1.0]), memory_bytes=memory,
        bandwidth_mbit=np.full((2, 2), 1e4), latency_s=np.full((2, 2), 1e-6), source=0,
        window=view.window,
    )
    result = solve(view, model, None)
    assert result.objective_s == pytest.approx(brute_force(model, view, None), rel=REL)
    assert result.placement.assignment[model.ffn_id(0)] == 1


def mha8_view(seed: int = 42, devices: int = 5) -> tuple[BlockTable, ResourceView]:
    """The paper-small shapes on two layers (MHA, 8 heads) over slow devices, fast links."""
    spec = ModelSpec(
        "mha-8", layers=2, d_model=512, heads=8, kv_heads=8, d_ff=2048, vocab=32000
    )
    model = block_table(spec)
    rng = np.random.default_rng(seed)
    bw = rng.uniform(100, 1000, (devices, devices))
    # memory holds over the interval only: until 4096 positions nothing would fit
    window = PlanningWindow(
        context_tokens=512, interval_tokens=8, final_context=4096, memory_tokens=8
    )
    memory = rng.uniform(0.25, 0.5, devices) * model.memory_bytes(520).sum()
    memory[0] += model.source_weight_bytes
    view = ResourceView(
        devices=tuple(f"d{i}" for i in range(devices)),
        compute_gflops=rng.uniform(0.5, 2.0, devices),
        memory_bytes=memory,
        bandwidth_mbit=(bw + bw.T) / 2,
        latency_s=rng.uniform(1e-4, 1e-3, (devices, devices)),
        source=0,
        window=window,
    )
    return model, view


def test_solve_time_five_devices_two_layers_eight_heads() -> None:
    """Report (no assertion on time) how long the 5 x 2 x 8-head MHA instance takes."""
    model, view = mha8_view()
    result = solve(view, model, None, time_limit_s=120.0)
    current = np.random.default_rng(0).integers(0, view.size, model.size)
    moved = solve(view, model, Placement(current), time_limit_s=120.0)
    print(
        f"\n5 devices x 2 layers x 8 heads: {result.solve_s:.2f} s "
        f"(optimal={result.proven_optimal}); from a random current placement: "
        f"{moved.solve_s:.2f} s (optimal={moved.proven_optimal})"
    )
    assert len(set(result.placement.assignment.tolist())) > 1  # memory forces a split
    assert result.objective_s == pytest.approx(result.solver_objective_s, rel=1e-6)
    assert moved.objective_s == pytest.approx(moved.solver_objective_s, rel=1e-6)


def test_time_limit_and_gap_return_incumbents() -> None:
    model, view = mha8_view()
    best = solve(view, model, None).objective_s
    loose = dataclasses.replace(view, memory_bytes=np.full(view.size, 2.0**32))
    everything_on_source = Placement(np.zeros(model.size, dtype=np.int64))
    quick = solve(loose, model, None, time_limit_s=0.0, initial=everything_on_source)
    assert quick.objective_s <= interval_objective_s(
        model, loose, everything_on_source.assignment, None
    )
    with pytest.raises(NoFeasiblePlacement, match="no placement found"):
        solve(view, model, None, time_limit_s=0.0)
    rough = solve(view, model, None, mip_gap=0.5)
    assert best <= rough.objective_s <= 2 * best
