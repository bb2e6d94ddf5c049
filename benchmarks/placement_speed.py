"""Placement speed: how long myopic takes to decide, and the MILP on the small model.

Myopic: a fresh decision (current=None) and, what matters while tokens are generated, a
re-plan from that placement after a load change (the device carrying the most FLOPs loses
half its compute, 8 tokens later), against 5, 10, 25, 50 and 100 devices and two block
counts: smollm2-135m (150 blocks) and llama3-8b made MHA (kv_heads 32, float16: 1088
blocks). Views are random full meshes (devices from the paper's tiers, 100-1000 Mbit/s,
0.5-5 ms) with 3x the model's memory (at the last token) spread evenly over the devices,
the source's embedding and LM head on top. Median of --runs runs each (time.perf_counter).

MILP: optimal.solve on 5 devices x the 2-layer, 8-head small model of placement_quality
(its instances 0..seeds-1, a third memory-tight), fresh and after the same load change;
median over the seeds.

Run: ``.venv/bin/python -m benchmarks.placement_speed [--quick] [--seeds N] [--out DIR]``
Writes DIR/placement_speed.json and DIR/placement_speed.png.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    BenchParser,
    ByMode,
    console,
    environment,
    ms,
    num,
    print_table,
    print_targets,
    pyplot,
    save_figure,
    stats,
    target,
    timed,
    write_json,
)
from benchmarks.placement_quality import small_instance
from controller import cost
from controller.placement.base import Placement
from controller.placement.myopic import MyopicPlanner
from controller.placement.optimal import solve
from controller.view import PlanningWindow, ResourceView
from emulator.generators import device_tiers, sample_devices
from emulator.world import WorldState
from llm.blocks import BlockTable, block_table
from llm.model import ModelSpec, preset, with_kv_heads

NAME = "placement_speed"
DEFAULTS = {
    "seeds": ByMode(5, 2),
    "runs": ByMode(5, 1),
    "devices": ByMode((5, 10, 25, 50, 100), (5, 10)),
}
PROMPT, GENERATE, REPLAN_EVERY = 128, 256, 8
BANDWIDTH_MBIT = (100.0, 1000.0)
LATENCY_MS = (0.5, 5.0)
MEMORY_FACTOR = 3.0
LOAD_CHANGE = 0.5  # fraction of compute the busiest device loses before the re-plan
# (model label, devices, re-plan limit s)
REPLAN_TARGETS = (("smollm2-135m", 50, 0.050), ("llama3-8b-kv32", 50, 0.200))
MILP_TARGET_S = 10.0


def models() -> dict[str, ModelSpec]:
    """The two block counts: 150 (smollm2-135m) and 1088 (llama3-8b, MHA, float16)."""
    return {
        "smollm2-135m": preset("smollm2-135m"),
        "llama3-8b-kv32": with_kv_heads(preset("llama3-8b", "float16"), 32),
    }


def random_view(seed: int, n: int, table: BlockTable) -> ResourceView:
    """A full-mesh view of n tiered devices with generous memory, at the prompt's end."""
    g = np.random.default_rng([seed, n, table.size])
    draws = sample_devices(g, device_tiers(n))
    final = PROMPT + GENERATE
    memory = np.full(n, MEMORY_FACTOR * float(table.memory_bytes(final).sum()) / n)
    memory[0] += table.source_weight_bytes
    upper = np.triu(g.uniform(*BANDWIDTH_MBIT, (n, n)), 1)
    bandwidth = upper + upper.T
    upper = np.triu(g.uniform(*LATENCY_MS, (n, n)), 1) / 1000.0
    latency = upper + upper.T
    return ResourceView(
        devices=tuple(d.name for d in draws),
        compute_gflops=np.array([d.compute_gflops for d in draws]),
        memory_bytes=memory,
        bandwidth_mbit=bandwidth,
        latency_s=latency,
        source=0,
        window=PlanningWindow(PROMPT, REPLAN_EVERY, final),
    )


def after_load_change(view: ResourceView, table: BlockTable, placement: Placement) -> ResourceView:
    """The view REPLAN_EVERY tokens later, the device with the most FLOPs of the placement
    losing LOAD_CHANGE of its compute."""
    w = view.window
    flops = np.bincount(
        placement.assignment, weights=table.flops(w.mean_context), minlength=view.size
    )
    busiest = int(np.argmax(flops))
    compute = view.compute_gflops.copy()
    compute[busiest] *= 1.0 - LOAD_CHANGE
    window = PlanningWindow(w.context_tokens + w.interval_tokens, w.interval_tokens,
                            w.final_context)
    return replace(view, compute_gflops=compute, window=window)


def time_myopic(table: BlockTable, n: int, runs: int) -> dict[str, Any]:
    """Median wall time of a fresh decision and of a re-plan after a load change."""
    view = random_view(0, n, table)
    fresh_s = []
    for _ in range(runs):
        placement, wall = timed(MyopicPlanner().place, view, table, None)
        fresh_s.append(wall)
    replan_view = after_load_change(view, table, placement)
    replan_s = []
    for _ in range(runs):
        new, wall = timed(MyopicPlanner().place, replan_view, table, placement)
        replan_s.append(wall)
    return {
        "devices": n,
        "blocks": table.size,
        "runs": runs,
        "fresh_s": stats(fresh_s),
        "replan_s": stats(replan_s),
        "fresh_objective_s": float(cost.interval_objective_s(table, view, placement.assignment,
                                                             None)),
        "replan_objective_s": float(
            cost.interval_objective_s(table, replan_view, new.assignment, placement.assignment)
        ),
        "replan_moved_blocks": int((new.assignment != placement.assignment).sum()),
    }


def time_milp(seeds: int, time_limit_s: float) -> dict[str, Any]:
    """HiGHS on 5 devices x the small model: fresh and after a load change, per seed."""
    rows = []
    for i in range(seeds):
        scenario, meta = small_instance(5, i, time_limit_s)
        table = block_table(scenario.model_spec())
        window = PlanningWindow(scenario.prompt_tokens, scenario.replan_every,
                                scenario.final_context)
        view = WorldState.from_scenario(scenario).view(scenario, window)
        fresh, fresh_wall = timed(solve, view, table, None, time_limit_s)
        replan_view = after_load_change(view, table, fresh.placement)
        start = fresh.placement
        replan, replan_wall = timed(solve, replan_view, table, start, time_limit_s, 0.0, start)
        rows.append(
            {
                **meta,
                "fresh_solve_s": fresh.solve_s,
                "fresh_wall_s": fresh_wall,
                "fresh_proven_optimal": fresh.proven_optimal,
                "replan_solve_s": replan.solve_s,
                "replan_wall_s": replan_wall,
                "replan_proven_optimal": replan.proven_optimal,
            }
        )
        console.print(
            f"  MILP seed {i}{' tight' if meta['tight'] else ''}: fresh {fresh_wall:.3f} s,"
            f" re-plan {replan_wall:.3f} s"
        )
    return {
        "devices": 5,
        "model": "2 layers, d_model 512, 8 heads (MHA), d_ff 2048, float32",
        "blocks": 20,
        "seeds": seeds,
        "fresh_wall_s": stats(r["fresh_wall_s"] for r in rows),
        "replan_wall_s": stats(r["replan_wall_s"] for r in rows),
        "not_proven_optimal": sum(
            1 for r in rows if not (r["fresh_proven_optimal"] and r["replan_proven_optimal"])
        ),
        "instances": rows,
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Myopic decision time against devices, one line per model and kind of decision."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label in dict.fromkeys(r["model"] for r in results):
        rs = [r for r in results if r["model"] == label]
        xs = [r["devices"] for r in rs]
        blocks = rs[0]["blocks"]
        ax.plot(xs, [1000 * r["replan_s"]["median"] for r in rs], "o-",
                label=f"{label} ({blocks} blocks), re-plan")
        ax.plot(xs, [1000 * r["fresh_s"]["median"] for r in rs], "s--", alpha=0.6,
                label=f"{label} ({blocks} blocks), fresh")
    for label, n, limit in REPLAN_TARGETS:
        ax.plot([n], [1000 * limit], "r_", ms=18, mew=2)
        ax.annotate(f"target {label}", (n, 1000 * limit), textcoords="offset points",
                    xytext=(8, -3), fontsize=7, color="red")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("devices")
    ax.set_ylabel("myopic decision time (ms, median)")
    ax.set_title("myopic placement time")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def make_parser() -> BenchParser:
    """The command line: the common options, runs, device counts and the MILP's limit."""
    parser = BenchParser(NAME, __doc__.splitlines()[0], DEFAULTS)
    parser.add_argument(
        "--runs", type=int, default=None, help=f"timed runs per point ({DEFAULTS['runs']})"
    )
    parser.add_argument(
        "--devices", type=int, nargs="+", default=None,
        help=f"device counts ({DEFAULTS['devices']})",
    )
    parser.add_argument(
        "--milp-time-limit", type=float, default=60.0, help="HiGHS time limit per solve (s)"
    )
    return parser


def time_myopic_all(devices: tuple[int, ...], runs: int) -> list[dict[str, Any]]:
    """time_myopic for both models at every device count, each point said on the console."""
    results = []
    for label, spec in models().items():
        table = block_table(spec)
        for n in devices:
            r = time_myopic(table, n, runs)
            r["model"] = label
            results.append(r)
            console.print(
                f"  {label} ({table.size} blocks) x {n} devices: fresh "
                f"{ms(r['fresh_s']['median'])}, re-plan {ms(r['replan_s']['median'])}"
            )
    return results


def targets_of(results: list[dict[str, Any]], milp: dict[str, Any]) -> list[dict[str, Any]]:
    """The re-plan targets of myopic (None where its point was not run) and the MILP's."""
    targets = []
    for label, n, limit in REPLAN_TARGETS:
        hit = next((r for r in results if r["model"] == label and r["devices"] == n), None)
        value = None if hit is None else hit["replan_s"]["median"]
        blocks = block_table(models()[label]).size
        targets.append(target(f"myopic re-plan, {n} devices x {blocks} blocks", value, limit))
    targets.append(target("MILP, 5 devices x 2 layers x 8 heads (median, fresh)",
                          milp["fresh_wall_s"]["median"], MILP_TARGET_S))
    targets.append(target("MILP, 5 devices x 2 layers x 8 heads (median, re-plan)",
                          milp["replan_wall_s"]["median"], MILP_TARGET_S))  # fmt: skip
    return targets


def print_times(results: list[dict[str, Any]], milp: dict[str, Any], runs: int) -> None:
    """Myopic's decision times per model and device count, then the MILP's."""
    limits = {(label, n): limit for label, n, limit in REPLAN_TARGETS}
    print_table(
        f"myopic decision time (median of {runs} run{'s' if runs > 1 else ''})",
        ["model", "blocks", "devices", "fresh", "re-plan", "re-plan max", "moved", "target"],
        [
            (
                r["model"],
                r["blocks"],
                r["devices"],
                ms(r["fresh_s"]["median"]),
                ms(r["replan_s"]["median"]),
                ms(r["replan_s"]["max"]),
                r["replan_moved_blocks"],
                f"<= {ms(limits[(r['model'], r['devices'])])}"
                if (r["model"], r["devices"]) in limits
                else "",
            )
            for r in results
        ],
    )
    print_table(
        f"MILP on HiGHS, 5 devices x 2 layers x 8 heads ({milp['seeds']} seeds)",
        ["decision", "median", "p95", "max", "not proven optimal"],
        [
            (
                kind,
                num(milp[key]["median"], ".3f") + " s",
                num(milp[key]["p95"], ".3f") + " s",
                num(milp[key]["max"], ".3f") + " s",
                milp["not_proven_optimal"],
            )
            for kind, key in (("fresh", "fresh_wall_s"), ("re-plan", "replan_wall_s"))
        ],
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what it writes to DIR/placement_speed.json."""
    args = make_parser().parse(argv)
    runs, devices = args.runs, tuple(args.devices)
    console.rule("myopic decision time")
    results = time_myopic_all(devices, runs)
    console.rule("MILP (HiGHS) time")
    milp = time_milp(args.seeds, args.milp_time_limit)
    targets = targets_of(results, milp)
    print_times(results, milp, runs)
    print_targets(targets, fmt=ms)
    plot(results, args.out / "placement_speed.png")
    data = {
        "benchmark": NAME,
        "quick": args.quick,
        "runs": runs,
        "seeds": args.seeds,
        "environment": environment(),
        "setup": {
            "prompt_tokens": PROMPT,
            "generate_tokens": GENERATE,
            "replan_every": REPLAN_EVERY,
            "bandwidth_mbit": list(BANDWIDTH_MBIT),
            "latency_ms": list(LATENCY_MS),
            "memory_factor": MEMORY_FACTOR,
            "load_change": LOAD_CHANGE,
            "timing": "time.perf_counter around MyopicPlanner().place / optimal.solve",
        },
        "myopic": results,
        "milp": milp,
        "targets": targets,
    }
    write_json(args.out, NAME, data)
    return data


if __name__ == "__main__":
    main()
