"""Placement speed: how long myopic takes to decide, and the exact MILP beside it.

Myopic (--part scale): a fresh decision (current=None) and, what matters while tokens are
generated, a re-plan from that placement after a load change (the device carrying the most
FLOPs loses half its compute, 8 tokens later), against 5, 10, 25, 50 and 100 devices and
two block counts: smollm2-135m (150 blocks) and llama3-8b made MHA (kv_heads 32, float16:
1088 blocks). Views are random full meshes (devices from the paper's tiers, 100-1000 Mbit/s,
0.5-5 ms) with 3x the model's memory (at the last token) spread evenly over the devices,
the source's embedding and LM head on top. Median of --runs runs each (time.perf_counter).

MILP (--part scale): optimal.solve on 5 devices x the 2-layer, 8-head small model of
placement_quality (its instances 0..seeds-1, a third memory-tight), fresh and after the
same load change; median over the seeds.

Tight (--part tight): held-out memory-tight instances, 3-6 devices x placement_quality's
small model (20 blocks, where the exact solver is fast) and x smollm2-135m (150 blocks): a
fresh myopic decision against optimal.solve on each (wall and CPU time, the two
alternated; the MILP under --tight-milp-limit, not run again once it hits it), and
myopic's objective gap to the MILP's (proven optima only; also against its bound and its
incumbent). Devices from the paper's tiers, links per pair uniform or log-uniform in
placement_quality's regimes, memory rescaled (drawn proportions kept) so the blocks at the
horizon's last token fill U(0.6, 0.9) of what is left after the source's pinned part;
draws no placement fits are redrawn (myopic finding one shows it fits, else the MILP
decides). The decision window is the live controller's at the prompt's end
(edgepart.controller.replan.planning_window); draws use seed words no test or benchmark uses.

Run: ``.venv/bin/python -m benchmarks.placement_speed [--quick] [--seeds N] [--out DIR]
[--part all|scale|tight] [--tight-models ...]``
Writes DIR/placement_speed.json and DIR/placement_speed.png.
"""

from __future__ import annotations

import time
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
    pct,
    print_table,
    print_targets,
    pyplot,
    save_figure,
    stats,
    target,
    timed,
    verdict,
    write_json,
)
from benchmarks.placement_quality import (
    GAP_MAX_TARGET,
    GAP_MEDIAN_TARGET,
    MAX_REDRAWS,
    SMALL_GENERATE,
    SMALL_MODEL,
    SMALL_PROMPT,
    SMALL_REGIMES,
    TIGHT_FILL,
    small_instance,
)
from edgepart.controller import cost
from edgepart.controller.placement.base import NoFeasiblePlacement, Placement
from edgepart.controller.placement.myopic import MyopicPlanner
from edgepart.controller.placement.optimal import MilpResult, solve
from edgepart.controller.replan import planning_window
from edgepart.controller.view import PlanningWindow, ResourceView
from edgepart.emulator.generators import device_tiers, sample_devices
from edgepart.emulator.world import WorldState
from edgepart.llm.blocks import BlockTable, block_table
from edgepart.llm.model import ModelSpec, preset, with_kv_heads

NAME = "placement_speed"
DEFAULTS = {
    "seeds": ByMode(5, 2),
    "runs": ByMode(5, 1),
    "devices": ByMode((5, 10, 25, 50, 100), (5, 10)),
    "tight_seeds": ByMode(8, 3),
    "tight_runs": ByMode(3, 1),
    "tight_milp_limit": ByMode(10.0, 2.0),
}
PROMPT, GENERATE, REPLAN_EVERY = 128, 256, 8
BANDWIDTH_MBIT = (100.0, 1000.0)
LATENCY_MS = (0.5, 5.0)
MEMORY_FACTOR = 3.0
LOAD_CHANGE = 0.5  # fraction of compute the busiest device loses before the re-plan
# (model label, devices, re-plan limit s)
REPLAN_TARGETS = (("smollm2-135m", 50, 0.050), ("llama3-8b-kv32", 50, 0.200))
MILP_TARGET_S = 10.0
TIGHT_DEVICES = (3, 4, 5, 6)
#: label -> (model, prompt tokens, generated tokens): placement_quality's small model (20
#: blocks, where the MILP is fast) and smollm2-135m (150 blocks)
TIGHT_MODELS: dict[str, tuple[ModelSpec, int, int]] = {
    "small-2x8": (
        ModelSpec("small-2x8", **SMALL_MODEL),
        SMALL_PROMPT,
        SMALL_GENERATE,
    ),
    "smollm2-135m": (preset("smollm2-135m"), PROMPT, GENERATE),
}
#: first entropy word of the tight instances' draws: a stream no test or benchmark uses
TIGHT_SEED = 7717
#: a fresh myopic decision, median over one model's tight instances (s)
TIGHT_TIME_TARGETS_S = {"smollm2-135m": 0.050}


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


def _symmetric(g: np.random.Generator, n: int, low: float, high: float, log: bool) -> np.ndarray:
    """A symmetric (n, n) draw per device pair, uniform or log-uniform in [low, high]."""
    if log:
        draw = np.exp(g.uniform(np.log(low), np.log(high), (n, n)))
    else:
        draw = g.uniform(low, high, (n, n))
    upper = np.triu(draw, 1)
    return upper + upper.T


def _feasible(view: ResourceView, table: BlockTable, time_limit_s: float) -> bool:
    """Whether some placement fits: myopic finding one shows it, else the MILP decides."""
    try:
        MyopicPlanner().place(view, table, None)
        return True
    except NoFeasiblePlacement:
        pass
    try:
        solve(view, table, None, time_limit_s)
    except NoFeasiblePlacement:
        return False
    return True


def tight_view(
    label: str, n: int, k: int, time_limit_s: float
) -> tuple[ResourceView, dict[str, Any]]:
    """Held-out tight instance k of n devices x a TIGHT_MODELS model, and its facts.

    The fresh decision at the prompt's end; regime k mod 3 of placement_quality's; memory so
    tight that the blocks at the horizon's last token fill U(0.6, 0.9) of the non-pinned
    memory; redrawn until some placement fits.
    """
    spec, prompt, generate = TIGHT_MODELS[label]
    table = block_table(spec)
    window = planning_window(prompt, REPLAN_EVERY, prompt + generate)
    need = float(table.memory_bytes(window.interval_end_context).sum())
    regime, low, high, log = SMALL_REGIMES[k % len(SMALL_REGIMES)]
    for attempt in range(MAX_REDRAWS):
        g = np.random.default_rng([TIGHT_SEED, table.size, n, k, attempt])
        draws = sample_devices(g, device_tiers(n))
        fill = float(g.uniform(*TIGHT_FILL))
        drawn = np.array([d.memory_mib for d in draws], dtype=float)
        memory = drawn / drawn.sum() * need / fill
        memory[0] += table.source_weight_bytes
        view = ResourceView(
            devices=tuple(d.name for d in draws),
            compute_gflops=np.array([d.compute_gflops for d in draws]),
            memory_bytes=memory,
            bandwidth_mbit=_symmetric(g, n, low, high, log),
            latency_s=_symmetric(g, n, *LATENCY_MS, False) / 1000.0,
            source=0,
            window=window,
        )
        if _feasible(view, table, time_limit_s):
            facts = {"model": label, "devices": n, "index": k, "regime": regime,
                     "fill": fill, "redraws": attempt}
            return view, facts
    raise RuntimeError(f"no feasible tight draw of {label} on {n} devices, k={k}")


def _clocked(fn, *args) -> tuple[Any, float, float]:
    """fn's result, its wall time and the process's CPU time during it (s)."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - wall0, time.process_time() - cpu0


def _timed_milp(
    view: ResourceView, table: BlockTable, time_limit_s: float
) -> tuple[MilpResult | None, float, float]:
    """optimal.solve's result (None: no placement found within the limit), wall and CPU s."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        result = solve(replace(view), table, None, time_limit_s)
    except NoFeasiblePlacement:
        result = None
    return result, time.perf_counter() - wall0, time.process_time() - cpu0


def time_tight_instance(
    view: ResourceView, table: BlockTable, runs: int, time_limit_s: float
) -> dict[str, Any]:
    """Fresh myopic decisions and MILP solves on one view, alternated; medians and the gap.

    Every run sees a fresh copy of the view (nothing a planner might keep per view
    carries over). A MILP stopped by its time limit is not run again: its time is the limit.
    """
    times: dict[str, list[float]] = {"myopic_wall_s": [], "myopic_cpu_s": [],
                                     "milp_wall_s": [], "milp_cpu_s": []}
    exact, finished = None, True
    for _ in range(runs):
        mine, wall, cpu = _clocked(MyopicPlanner().place, replace(view), table, None)
        times["myopic_wall_s"].append(wall)
        times["myopic_cpu_s"].append(cpu)
        if not finished:
            continue
        exact, wall, cpu = _timed_milp(view, table, time_limit_s)
        times["milp_wall_s"].append(wall)
        times["milp_cpu_s"].append(cpu)
        finished = exact is not None and exact.proven_optimal
    myopic_s = float(cost.interval_objective_s(table, view, mine.assignment, None))
    row: dict[str, Any] = {
        **{key: float(np.median(values)) for key, values in times.items()},
        "myopic_objective_s": myopic_s,
        "milp_found": exact is not None,
        "milp_proven_optimal": finished,
    }
    if exact is None:
        return {**row, "milp_objective_s": None, "milp_bound_s": None, "gap": None,
                "gap_to_bound": None, "gap_to_incumbent": None, "same_placement": False}
    return {
        **row,
        "milp_objective_s": exact.objective_s,
        "milp_bound_s": exact.bound_s,
        "gap": myopic_s / exact.objective_s - 1 if finished else None,
        # myopic against the solver's lower bound: an upper bound of the gap where the
        # MILP did not finish
        "gap_to_bound": myopic_s / exact.bound_s - 1 if exact.bound_s > 0 else None,
        # against the best the MILP found in its time (negative: myopic found better)
        "gap_to_incumbent": myopic_s / exact.objective_s - 1,
        "same_placement": mine == exact.placement,
    }


TIGHT_KEYS = ("myopic_wall_s", "myopic_cpu_s", "milp_wall_s", "milp_cpu_s", "gap",
              "gap_to_bound", "gap_to_incumbent")


def time_tight(label: str, seeds: int, runs: int, time_limit_s: float) -> dict[str, Any]:
    """Every held-out tight instance of one model: myopic against the MILP, summarised."""
    table = block_table(TIGHT_MODELS[label][0])
    rows = []
    for n in TIGHT_DEVICES:
        for k in range(seeds):
            view, facts = tight_view(label, n, k, time_limit_s)
            row = {**facts, **time_tight_instance(view, table, runs, time_limit_s)}
            rows.append(row)
            console.print(
                f"  {label} n={n} k={k} {facts['regime']:>12}: myopic {ms(row['myopic_wall_s'])}"
                f" (cpu {ms(row['myopic_cpu_s'])}), MILP {ms(row['milp_wall_s'])}"
                f" (cpu {ms(row['milp_cpu_s'])}{'' if row['milp_proven_optimal'] else ', limit'})"
                f", gap {pct(row['gap'])} (to bound {pct(row['gap_to_bound'])}, to incumbent"
                f" {pct(row['gap_to_incumbent'])})"
            )
    return {
        "model": label,
        "blocks": table.size,
        "devices": list(TIGHT_DEVICES),
        "seeds": seeds,
        "runs": runs,
        "milp_time_limit_s": time_limit_s,
        "fill": list(TIGHT_FILL),
        **{key: stats(r[key] for r in rows) for key in TIGHT_KEYS},
        "by_devices": {
            str(n): {key: stats(r[key] for r in rows if r["devices"] == n) for key in TIGHT_KEYS}
            for n in TIGHT_DEVICES
        },
        "not_proven_optimal": sum(1 for r in rows if not r["milp_proven_optimal"]),
        "milp_found_nothing": sum(1 for r in rows if not r["milp_found"]),
        "same_placement": sum(1 for r in rows if r["same_placement"]),
        "instances": rows,
    }


def tight_targets(tight: dict[str, Any]) -> list[dict[str, Any]]:
    """Myopic within its time target (if the model has one), no slower than the MILP
    (medians), and its gap; each line says its unit (s, ratio or gap)."""
    mine, exact = tight["myopic_wall_s"]["median"], tight["milp_wall_s"]["median"]
    label = f"3-6 devices x {tight['model']} ({tight['blocks']} blocks), tight"
    lines = []
    if tight["model"] in TIGHT_TIME_TARGETS_S:
        lines.append({**target(f"myopic fresh, {label} (median)", mine,
                               TIGHT_TIME_TARGETS_S[tight["model"]]), "unit": "s"})
    ratio = None if mine is None or not exact else mine / exact
    lines.append({**target(f"myopic / MILP fresh time, {label} (medians)", ratio, 1.0),
                  "unit": "ratio"})
    for kind in ("median", "max"):
        limit = GAP_MEDIAN_TARGET if kind == "median" else GAP_MAX_TARGET
        lines.append({**target(f"myopic gap to the MILP, {label} ({kind})",
                               tight["gap"][kind], limit), "unit": "gap"})
    return lines


#: how a target line's value reads, by its unit
TIGHT_FORMATS = {"s": ms, "ratio": num, "gap": pct}


def print_tight_targets(targets: list[dict[str, Any]]) -> None:
    """The tight instances' target lines, each value in its own unit."""
    rows = []
    for t in targets:
        fmt = TIGHT_FORMATS[t["unit"]]
        rows.append((t["target"], fmt(t["value"]), f"{t['op']} {fmt(t['limit'])}",
                     verdict(t["met"])))
    print_table("Targets (tight instances)", ["target", "value", "limit", "verdict"], rows)


def print_tight(tight: dict[str, Any]) -> None:
    """Myopic against the MILP on one model's tight instances, per device count and overall."""
    groups = [*tight["by_devices"].items(), ("all", tight)]
    print_table(
        f"fresh decision on tight instances, {tight['model']} ({tight['blocks']} blocks), "
        f"{tight['seeds']} per device count, MILP limit {tight['milp_time_limit_s']:g} s "
        f"({tight['not_proven_optimal']} not proven)",
        ["devices", "myopic med", "myopic max", "myopic cpu med", "MILP med", "MILP max",
         "MILP cpu med", "gap med", "gap max", "to bound max", "to incumbent max"],
        [
            (
                label,
                ms(g["myopic_wall_s"]["median"]),
                ms(g["myopic_wall_s"]["max"]),
                ms(g["myopic_cpu_s"]["median"]),
                ms(g["milp_wall_s"]["median"]),
                ms(g["milp_wall_s"]["max"]),
                ms(g["milp_cpu_s"]["median"]),
                pct(g["gap"]["median"]),
                pct(g["gap"]["max"]),
                pct(g["gap_to_bound"]["max"]),
                pct(g["gap_to_incumbent"]["max"]),
            )
            for label, g in groups
        ],
    )


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
    parser.add_argument(
        "--tight-seeds", type=int, default=None,
        help=f"tight instances per device count ({DEFAULTS['tight_seeds']})",
    )
    parser.add_argument(
        "--tight-runs", type=int, default=None,
        help=f"timed runs per tight instance ({DEFAULTS['tight_runs']})",
    )
    parser.add_argument(
        "--tight-milp-limit", type=float, default=None,
        help=f"HiGHS limit per tight-instance solve, s ({DEFAULTS['tight_milp_limit']})",
    )
    parser.add_argument(
        "--tight-models", nargs="+", choices=tuple(TIGHT_MODELS), default=tuple(TIGHT_MODELS),
        help="models of the tight instances (all)",
    )
    parser.add_argument(
        "--part", choices=("scale", "tight", "all"), default="all",
        help="the at-scale myopic and small MILP timings, the tight instances, or both",
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
    data: dict[str, Any] = {
        "benchmark": NAME,
        "quick": args.quick,
        "part": args.part,
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
            "timing": "time.perf_counter around MyopicPlanner().place / optimal.solve; "
            "tight: also time.process_time (CPU)",
        },
        "targets": [],
    }
    if args.part in ("scale", "all"):
        console.rule("myopic decision time")
        results = time_myopic_all(devices, runs)
        console.rule("MILP (HiGHS) time")
        milp = time_milp(args.seeds, args.milp_time_limit)
        print_times(results, milp, runs)
        plot(results, args.out / "placement_speed.png")
        data.update(myopic=results, milp=milp)
        data["targets"] += targets_of(results, milp)
    if args.part in ("tight", "all"):
        console.rule("tight instances: myopic against the MILP")
        data["tight"] = []
        for label in args.tight_models:
            tight = time_tight(label, args.tight_seeds, args.tight_runs, args.tight_milp_limit)
            print_tight(tight)
            data["tight"].append(tight)
        tight_lines = [line for tight in data["tight"] for line in tight_targets(tight)]
        print_tight_targets(tight_lines)
        data["targets"] += tight_lines
    if args.part in ("scale", "all"):
        print_targets(data["targets"][: len(REPLAN_TARGETS) + 2], fmt=ms)
    write_json(args.out, NAME, data)
    return data


if __name__ == "__main__":
    main()
