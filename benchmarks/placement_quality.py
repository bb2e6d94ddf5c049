"""Placement quality: myopic against the exact MILP (small) and against the baselines (large).

(a) small: 3, 4 and 5 devices, a 2-layer MHA model (d_model 2048, 8 heads, fp32); seeded
    instances spread evenly over three bandwidth regimes, a third of them memory-tight.
    Gap of myopic to optimal per decision (each myopic decision along its simulated run,
    re-solved exactly from the same view and current placement) and over the whole
    generation (total_s of both algorithms simulated).
(b) large: 10, 25 and 50 devices, llama3-8b in float16, 'lan' and 'wan' bandwidth; every
    algorithm but optimal simulated: per-token latency and total time relative to myopic,
    peak memory, infeasibility.

Run: ``.venv/bin/python -m benchmarks.placement_quality [--quick] [--seeds N] [--out DIR]``
Writes DIR/placement_quality.json, DIR/gap_distribution.png and DIR/latency_trace.png.

Memory-tight instances: every device's memory is rescaled (keeping the drawn proportions)
so that the placeable blocks at the last token fill a fraction U(0.6, 0.9) of the memory
left after the source's pinned embedding and LM head; the source gets that pinned part on
top. Draws for which no placement fits at the last token (the MILP proves it) are redrawn
and counted (``redraws``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    BenchParser,
    ByMode,
    console,
    environment,
    num,
    pct,
    print_table,
    print_targets,
    pyplot,
    save_figure,
    stats,
    target,
    timed,
    write_json,
)
from edgepart.controller import cost
from edgepart.controller.placement import (
    ALGORITHMS,
    LAYER_METHODS,
    NoFeasiblePlacement,
    make_algorithm,
)
from edgepart.controller.placement.base import Placement
from edgepart.controller.placement.myopic import MyopicPlanner
from edgepart.controller.placement.optimal import OptimalPlanner, solve
from edgepart.controller.replan import ReplanPolicy
from edgepart.controller.view import PlanningWindow
from edgepart.emulator.backends.sim import SimResult, simulate
from edgepart.emulator.generators import Link, Topology, random_scenario
from edgepart.emulator.scenario import MIB, Scenario, parse_scenario
from edgepart.emulator.world import WorldState, apply_due_traces, initial_state
from edgepart.llm.blocks import block_table

NAME = "placement_quality"

# 2 layers x 8 heads as the MILP target size, but with paper-large's width (d 2048) so
# that compute is comparable to a hop and spreading blocks can pay; with d 512 the
# optimum nearly always keeps everything on the source and the gap is trivially 0
SMALL_MODEL = {
    "layers": 2,
    "d_model": 2048,
    "heads": 8,
    "kv_heads": 8,
    "d_ff": 8192,
    "vocab": 32000,
    "dtype": "float32",
}
SMALL_DEVICES = (3, 4, 5)
# (name, low Mbit/s, high Mbit/s, log-uniform)
SMALL_REGIMES = (
    ("10-100", 10.0, 100.0, False),
    ("500-2000", 500.0, 2000.0, False),
    ("10-10000 log", 10.0, 10000.0, True),
)
SMALL_PROMPT, SMALL_GENERATE = 64, 32
LATENCY_MS = (0.5, 5.0)
REPLAN_EVERY = 8
TIGHT_FILL = (0.6, 0.9)
MAX_REDRAWS = 30
GAP_MEDIAN_TARGET = 0.05
GAP_MAX_TARGET = 0.10

LARGE_DEVICES = (10, 25, 50)
LARGE_MODEL = {"preset": "llama3-8b", "dtype": "float16"}
LARGE_REGIMES = {"lan": (1000.0, 10000.0), "wan": (50.0, 500.0)}
LARGE_PROMPT = 128
LAN_SPEEDUP_TARGET = 2.0
TRACE_PLOT_DEVICES = 25
LARGE_ALGORITHMS = tuple(a for a in ALGORITHMS if a != "optimal")
REL_TOL = 1e-9
DEFAULTS = {
    "seeds": ByMode(30, 3),
    "large_seeds": ByMode(3, 1),
    "large_devices": ByMode(LARGE_DEVICES, LARGE_DEVICES[:1]),
    "large_generate": ByMode(256, 32),
}


# ---------------------------------------------------------------- instances


def mesh(
    g: np.random.Generator, n: int, low: float, high: float, log: bool
) -> Topology:
    """A full mesh with per-pair bandwidth uniform (or log-uniform) in [low, high] Mbit/s."""
    links = []
    for a in range(n):
        for b in range(a + 1, n):
            if log:
                bw = float(np.exp(g.uniform(np.log(low), np.log(high))))
            else:
                bw = float(g.uniform(low, high))
            lat = float(g.uniform(*LATENCY_MS))
            links.append(Link(a, b, round(bw, 1), round(lat, 3)))
    return Topology("full-mesh", n, tuple(links))


def block_fill(scenario: Scenario) -> float:
    """Placeable blocks at the last token over the memory left after the pinned source part."""
    table = block_table(scenario.model_spec())
    need = float(table.memory_bytes(scenario.final_context).sum())
    total = sum(d.memory_mib for d in scenario.devices) * MIB
    return need / (total - table.source_weight_bytes)


def tighten(scenario: Scenario, fill: float) -> Scenario:
    """The scenario with memory rescaled so the blocks fill ``fill`` of the non-pinned memory."""
    table = block_table(scenario.model_spec())
    need = float(table.memory_bytes(scenario.final_context).sum())
    drawn = np.array([d.memory_mib for d in scenario.devices], dtype=float)
    new = drawn / drawn.sum() * (need / fill)
    new[scenario.source_index] += table.source_weight_bytes
    data = scenario.model_dump(mode="json", exclude_none=True)
    for device, mem in zip(data["devices"], new, strict=True):
        device["memory_mib"] = math.ceil(mem / MIB * 1000) / 1000
    data["name"] = f"{scenario.name}-tight{fill:.2f}"
    return parse_scenario(data, f"<{data['name']}>")


def fits_to_the_end(scenario: Scenario, time_limit_s: float) -> bool:
    """Whether some placement holds the model until the last token (the MILP decides)."""
    table = block_table(scenario.model_spec())
    state = WorldState.from_scenario(scenario)
    window = PlanningWindow(
        scenario.prompt_tokens, scenario.generate_tokens, scenario.final_context
    )
    try:
        solve(state.view(scenario, window), table, None, time_limit_s)
    except NoFeasiblePlacement:
        return False
    return True


def small_instance(n: int, i: int, time_limit_s: float) -> tuple[Scenario, dict[str, Any]]:
    """Instance i of n devices: regime i mod 3; memory-tight when i mod 9 is 0, 4 or 8."""
    name, low, high, log = SMALL_REGIMES[i % 3]
    tight = i % 9 in (0, 4, 8)
    seed = 1000 * n + i
    for attempt in range(MAX_REDRAWS):
        g = np.random.default_rng([seed, attempt])
        scenario = random_scenario(
            seed + 100_000 * attempt,
            topology=mesh(g, n, low, high, log),
            model=SMALL_MODEL,
            prompt_tokens=SMALL_PROMPT,
            generate_tokens=SMALL_GENERATE,
            replan_every=REPLAN_EVERY,
            traces="load-and-bandwidth",
            name=f"small-n{n}-i{i}",
        )
        if tight:
            scenario = tighten(scenario, float(g.uniform(*TIGHT_FILL)))
            if not fits_to_the_end(scenario, time_limit_s):
                continue
        meta = {
            "devices": n,
            "index": i,
            "seed": seed,
            "regime": name,
            "tight": tight,
            "redraws": attempt,
            "scenario": scenario.name,
            "block_fill": block_fill(scenario),
        }
        return scenario, meta
    raise RuntimeError(f"no feasible memory-tight draw for n={n}, i={i} in {MAX_REDRAWS} tries")


def large_instance(n: int, regime: str, k: int, generate: int) -> Scenario:
    """Seed k of n devices; the same seed gives the same devices and traces in both regimes."""
    return random_scenario(
        1000 * n + k,
        devices=n,
        model=LARGE_MODEL,
        prompt_tokens=LARGE_PROMPT,
        generate_tokens=generate,
        replan_every=REPLAN_EVERY,
        bandwidth_mbit=LARGE_REGIMES[regime],
        latency_ms=LATENCY_MS,
        traces="load-and-bandwidth",
        fit="scale",
        name=f"large-{regime}-n{n}-s{k}",
    )


# ---------------------------------------------------------------- (a) small: gaps


class RecordingOptimal(OptimalPlanner):
    """OptimalPlanner that remembers, per decision, whether HiGHS proved optimality."""

    def __init__(self, time_limit_s: float) -> None:
        super().__init__(time_limit_s=time_limit_s)
        self.proven: list[bool] = []
        self.solve_s: list[float] = []

    def place(self, view, model, current):
        placement = super().place(view, model, current)
        assert self.last_result is not None
        self.proven.append(self.last_result.proven_optimal)
        self.solve_s.append(self.last_result.solve_s)
        return placement


def view_at(scenario: Scenario, token: int, window: PlanningWindow, initial: bool):
    """The view the sim backend showed the planner at a decision (its trace rule replayed,
    in the planning ``window`` the decision recorded).

    The initial placement sees the traces at token 0; the decision before generated token
    ``token`` sees every trace with at_token <= token (the generated scenarios have no
    time-triggered traces, so the virtual clock does not matter here).
    """
    if any(t.at_s is not None for t in scenario.traces):
        raise ValueError("time-triggered traces (at_s) are not replayed here")
    state, pending = initial_state(scenario)
    if not initial:
        apply_due_traces(state, pending, token, 0.0)
    return state.view(scenario, window)


def clean(result: SimResult) -> bool:
    """A run that finished, never failed a decision and never ran over memory."""
    return result.failure is None and result.failed_decisions == 0 and result.infeasible_tokens == 0


def decision_gaps(
    scenario: Scenario, run: SimResult, time_limit_s: float
) -> list[dict[str, Any]]:
    """Myopic's interval objective at each of its decisions against the MILP's at the same one."""
    if not run.placements:  # the initial decision failed: nothing to compare
        return []
    table = block_table(scenario.model_spec())
    first = ReplanPolicy(scenario.replan_every, scenario.final_context).window(
        0, scenario.prompt_tokens
    )
    steps = [(0, first, None, run.placements[0], True, False)]
    # every decision against the placement it started from (a declined one included: the
    # planner's choice is what is compared, not whether the gate let it through)
    steps += [(d.token, d.window, d.current, d.chosen, False, d.forced) for d in run.decisions]
    recorded = [None, *(d.objective_s for d in run.decisions)]
    out = []
    for (token, window, cur, new, initial, forced), sim_obj in zip(steps, recorded, strict=True):
        view = view_at(scenario, token, window, initial)
        context = window.context_tokens
        current = None if cur is None else np.where(view.alive[cur], cur, -1)
        myopic = float(cost.interval_objective_s(table, view, new, current))
        row: dict[str, Any] = {
            "token": token,
            "context": context,
            "initial": initial,
            "forced": forced,
            "myopic_s": myopic,
            "myopic_devices_used": int(np.unique(new).size),
            "replay_matches_sim": sim_obj is None or math.isclose(myopic, sim_obj, rel_tol=1e-9),
        }
        start = None if current is None else Placement(current)
        try:
            milp, wall = timed(solve, view, table, start, time_limit_s, 0.0, start)
        except NoFeasiblePlacement as exc:
            row.update(optimal_s=None, proven_optimal=False, gap=None, milp_error=str(exc))
            out.append(row)
            continue
        gap = myopic / milp.objective_s - 1 if milp.objective_s > 0 else None
        row.update(
            optimal_s=milp.objective_s,
            optimal_devices_used=int(np.unique(milp.placement.assignment).size),
            proven_optimal=milp.proven_optimal,
            milp_solve_s=milp.solve_s,
            milp_wall_s=wall,
            gap=gap,
        )
        out.append(row)
    return out


def run_small(args) -> dict[str, Any]:
    """Part (a): every small instance, its per-decision gaps and its whole-generation gap."""
    instances = []
    for n in SMALL_DEVICES:
        for i in range(args.seeds):
            scenario, meta = small_instance(n, i, args.milp_time_limit)
            myopic, myopic_wall = timed(simulate, scenario, MyopicPlanner())
            opt_planner = RecordingOptimal(args.milp_time_limit)
            optimal, optimal_wall = timed(simulate, scenario, opt_planner)
            decisions = decision_gaps(scenario, myopic, args.milp_time_limit)
            both_clean = clean(myopic) and clean(optimal)
            whole_proven = bool(opt_planner.proven) and all(opt_planner.proven)
            gap_total = myopic.total_s / optimal.total_s - 1 if both_clean else None
            instances.append(
                {
                    **meta,
                    "myopic_total_s": myopic.total_s,
                    "optimal_total_s": optimal.total_s,
                    "myopic_clean": clean(myopic),
                    "optimal_clean": clean(optimal),
                    "myopic_failure": myopic.failure,
                    "optimal_failure": optimal.failure,
                    "optimal_all_proven": whole_proven,
                    "optimal_solve_s": opt_planner.solve_s,
                    "whole_gap": gap_total,
                    "myopic_sim_wall_s": myopic_wall,
                    "optimal_sim_wall_s": optimal_wall,
                    "decisions": decisions,
                }
            )
            worst = max((d["gap"] for d in decisions if d["gap"] is not None), default=None)
            console.print(
                f"  small n={n} i={i} {meta['regime']:>12}{' tight' if meta['tight'] else ''}:"
                f" whole gap {pct(gap_total)}, worst decision gap {pct(worst)}"
                f" ({len(decisions)} decisions)"
            )
    return summarise_small(instances)


def _decision_ok(d: dict[str, Any]) -> bool:
    return bool(d["proven_optimal"]) and d["gap"] is not None


def _group_summary(instances: list[dict[str, Any]]) -> dict[str, Any]:
    decisions = [d for inst in instances for d in inst["decisions"]]
    ok = [d for d in decisions if _decision_ok(d)]
    whole_ok = [i for i in instances if i["whole_gap"] is not None and i["optimal_all_proven"]]
    return {
        "instances": len(instances),
        "decisions": len(decisions),
        "decisions_not_proven_optimal": sum(1 for d in decisions if not d["proven_optimal"]),
        "instances_not_proven_optimal": sum(
            1
            for i in instances
            if not i["optimal_all_proven"] or not all(d["proven_optimal"] for d in i["decisions"])
        ),
        "myopic_better_than_milp": sum(1 for d in ok if d["gap"] < -1e-6),
        "replay_mismatches": sum(1 for d in decisions if not d["replay_matches_sim"]),
        # decisions whose optimum puts every block on one device (the source, in practice):
        # there the planners only have to see that splitting does not pay
        "single_device_optimum": sum(1 for d in ok if d.get("optimal_devices_used") == 1),
        "myopic_unclean_runs": sum(1 for i in instances if not i["myopic_clean"]),
        "optimal_unclean_runs": sum(1 for i in instances if not i["optimal_clean"]),
        "decision_gap": stats(d["gap"] for d in ok),
        "first_decision_gap": stats(d["gap"] for d in ok if d["initial"]),
        "whole_gap": stats(i["whole_gap"] for i in whole_ok),
        "milp_solve_s": stats(d.get("milp_solve_s") for d in decisions),
    }


def summarise_small(instances: list[dict[str, Any]]) -> dict[str, Any]:
    """Gap statistics per device count and overall, with the target lines."""
    groups = {str(n): _group_summary([i for i in instances if i["devices"] == n])
              for n in SMALL_DEVICES}
    overall = _group_summary(instances)
    by_regime = {
        name: _group_summary([i for i in instances if i["regime"] == name])
        for name, *_ in SMALL_REGIMES
    }
    by_tightness = {
        label: _group_summary([i for i in instances if i["tight"] == flag])
        for label, flag in (("tight", True), ("roomy", False))
    }
    targets = [
        target("per-decision gap median", overall["decision_gap"]["median"], GAP_MEDIAN_TARGET),
        target("per-decision gap max", overall["decision_gap"]["max"], GAP_MAX_TARGET),
        target("whole-generation gap median", overall["whole_gap"]["median"], GAP_MEDIAN_TARGET),
        target("whole-generation gap max", overall["whole_gap"]["max"], GAP_MAX_TARGET),
    ]
    return {
        "setup": {
            "model": SMALL_MODEL,
            "devices": list(SMALL_DEVICES),
            "regimes_mbit": [
                {"name": n, "low": lo, "high": hi, "log_uniform": log}
                for n, lo, hi, log in SMALL_REGIMES
            ],
            "latency_ms": list(LATENCY_MS),
            "prompt_tokens": SMALL_PROMPT,
            "generate_tokens": SMALL_GENERATE,
            "replan_every": REPLAN_EVERY,
            "traces": "load-and-bandwidth",
            "tight_block_fill": list(TIGHT_FILL),
            "gap": "myopic / optimal - 1; decisions not proven optimal are excluded",
        },
        "by_devices": groups,
        "overall": overall,
        "by_regime": by_regime,
        "by_tightness": by_tightness,
        "targets": targets,
        "instances": instances,
    }


def print_small(small: dict[str, Any]) -> None:
    """Tables of part (a)."""
    rows = []
    for label, g in [*small["by_devices"].items(), ("all", small["overall"])]:
        dg, fg, wg = g["decision_gap"], g["first_decision_gap"], g["whole_gap"]
        rows.append(
            (
                label,
                g["instances"],
                g["decisions"],
                pct(dg["median"]),
                pct(dg["p95"]),
                pct(dg["max"]),
                pct(fg["median"]),
                pct(fg["max"]),
                pct(wg["median"]),
                pct(wg["p95"]),
                pct(wg["max"]),
                f"{g['single_device_optimum']}/{g['decision_gap']['count']}",
                g["instances_not_proven_optimal"],
                g["myopic_unclean_runs"],
                num(g["milp_solve_s"]["median"], ".3f"),
            )
        )
    print_table(
        "(a) myopic vs optimal (MILP), gap = myopic/optimal - 1",
        [
            "devices",
            "inst",
            "decisions",
            "dec med",
            "dec p95",
            "dec max",
            "first med",
            "first max",
            "whole med",
            "whole p95",
            "whole max",
            "1-device opt",
            "not proven",
            "myopic unclean",
            "MILP s (med)",
        ],
        rows,
        caption=(
            "decisions/instances whose MILP was not proven optimal are excluded from gaps; "
            "1-device opt: decisions whose optimum keeps every block on one device"
        ),
    )
    rows = []
    for label, g in [*small["by_regime"].items(), *small["by_tightness"].items()]:
        rows.append(
            (
                label,
                g["instances"],
                pct(g["decision_gap"]["median"]),
                pct(g["decision_gap"]["max"]),
                pct(g["whole_gap"]["median"]),
                pct(g["whole_gap"]["max"]),
                f"{g['single_device_optimum']}/{g['decision_gap']['count']}",
            )
        )
    print_table(
        "(a) by bandwidth regime (Mbit/s) and memory",
        ["group", "inst", "dec med", "dec max", "whole med", "whole max", "1-device opt"],
        rows,
    )
    print_targets(small["targets"])


def plot_gaps(small: dict[str, Any], path: Path) -> None:
    """Histogram and CDF of the per-decision gaps (and the whole-generation gaps)."""
    plt = pyplot()
    decisions = [
        d for inst in small["instances"] for d in inst["decisions"] if _decision_ok(d)
    ]
    gaps = np.array([100 * d["gap"] for d in decisions])
    whole = np.array(
        [100 * i["whole_gap"] for i in small["instances"]
         if i["whole_gap"] is not None and i["optimal_all_proven"]]
    )
    fig, (ax_h, ax_c) = plt.subplots(1, 2, figsize=(11, 4))
    if gaps.size:
        ax_h.hist(gaps, bins=min(40, max(5, gaps.size // 3)), color="tab:blue")
    ax_h.set_xlabel("per-decision gap, myopic / optimal - 1 (%)")
    ax_h.set_ylabel("decisions")
    ax_h.set_title(f"per-decision gaps ({gaps.size} decisions)")
    for series, label in ((gaps, "per decision"), (whole, "whole generation")):
        if series.size:
            xs = np.sort(series)
            ax_c.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post", label=label)
    for ax in (ax_h, ax_c):
        ax.axvline(100 * GAP_MEDIAN_TARGET, color="tab:orange", ls="--", lw=1, label="5% target")
        ax.axvline(100 * GAP_MAX_TARGET, color="tab:red", ls="--", lw=1, label="10% target")
    ax_c.set_xlabel("gap (%)")
    ax_c.set_ylabel("fraction ≤ gap")
    ax_c.set_title("CDF")
    ax_c.legend(loc="lower right")
    save_figure(fig, path)


# ---------------------------------------------------------------- (b) large: baselines


def run_large(args) -> dict[str, Any]:
    """Part (b): every algorithm but optimal on the large instances."""
    sizes, generate = args.large_devices, args.large_generate
    instances = []
    traces: dict[str, Any] = {}
    plotted = (TRACE_PLOT_DEVICES if TRACE_PLOT_DEVICES in sizes else sizes[0], "lan", 0)
    for n in sizes:
        for regime in LARGE_REGIMES:
            for k in range(args.large_seeds):
                scenario = large_instance(n, regime, k, generate)
                memory = {d.name: d.memory_mib * MIB for d in scenario.devices}
                algos: dict[str, Any] = {}
                for name in LARGE_ALGORITHMS:
                    result, wall = timed(simulate, scenario, make_algorithm(name))
                    peaks = np.array(list(result.peak_memory_bytes.values()))
                    util = np.array(
                        [result.peak_memory_bytes[d] / memory[d] for d in memory]
                    )
                    algos[name] = {
                        "mean_per_token_s": (
                            float(np.mean(result.per_token_s)) if result.per_token_s else None
                        ),
                        "total_s": result.total_s,
                        "migration_s": result.migration_s,
                        "migrations": result.migrations,
                        "replans": result.replans,
                        "tokens": len(result.per_token_s),
                        "peak_memory_max_bytes": float(peaks.max()),
                        "peak_memory_mean_bytes": float(peaks.mean()),
                        "peak_memory_util_max": float(util.max()),
                        "failed": result.failure is not None,
                        "failure": result.failure,
                        "failed_decisions": result.failed_decisions,
                        "infeasible_tokens": result.infeasible_tokens,
                        "clean": clean(result),
                        "sim_wall_s": wall,
                    }
                    if (n, regime, k) == plotted:
                        traces.setdefault("per_token_s", {})[name] = list(result.per_token_s)
                        traces["scenario"] = scenario.name
                inst = {
                    "devices": n,
                    "regime": regime,
                    "seed": k,
                    "scenario": scenario.name,
                    "generate_tokens": generate,
                    "algorithms": algos,
                }
                inst.update(compare_to_myopic(algos))
                instances.append(inst)
                console.print(
                    f"  large n={n} {regime} s={k}: myopic {num(algos['myopic']['total_s'])} s;"
                    f" best layer method / myopic = {num(inst['speedup_vs_best_layer'], '.2f')}x"
                )
    return summarise_large(instances, traces, sizes, generate)


def compare_to_myopic(algos: dict[str, Any]) -> dict[str, Any]:
    """Ratios to myopic and the per-instance target checks."""
    base = algos["myopic"]
    for a in algos.values():
        ok = a["clean"] and base["clean"]
        a["per_token_ratio"] = (
            a["mean_per_token_s"] / base["mean_per_token_s"]
            if ok and base["mean_per_token_s"]
            else None
        )
        a["total_ratio"] = a["total_s"] / base["total_s"] if ok and base["total_s"] else None
    layer_totals = [algos[m]["total_s"] for m in LAYER_METHODS if algos[m]["clean"]]
    slower_than = [
        m
        for m in LAYER_METHODS
        if algos[m]["clean"]
        and base["clean"]
        and base["total_s"] > algos[m]["total_s"] * (1 + REL_TOL)
    ]
    others_clean = [a for a, v in algos.items() if a != "myopic" and v["clean"]]
    return {
        "myopic_slower_than": slower_than,
        "speedup_vs_best_layer": (
            min(layer_totals) / base["total_s"] if layer_totals and base["clean"] else None
        ),
        "myopic_clean": base["clean"],
        "myopic_infeasible_while_other_feasible": (not base["clean"]) and bool(others_clean),
    }


def summarise_large(
    instances: list[dict[str, Any]], traces: dict[str, Any], sizes, generate: int
) -> dict[str, Any]:
    """Means over seeds per (size, regime, algorithm) and the target checks."""
    table: list[dict[str, Any]] = []
    for n in sizes:
        for regime in LARGE_REGIMES:
            group = [i for i in instances if i["devices"] == n and i["regime"] == regime]
            for name in LARGE_ALGORITHMS:
                runs = [i["algorithms"][name] for i in group]
                table.append(
                    {
                        "devices": n,
                        "regime": regime,
                        "algorithm": name,
                        "instances": len(runs),
                        "per_token_ratio": stats(r["per_token_ratio"] for r in runs),
                        "total_ratio": stats(r["total_ratio"] for r in runs),
                        "mean_per_token_s": stats(r["mean_per_token_s"] for r in runs),
                        "peak_memory_max_bytes": max(r["peak_memory_max_bytes"] for r in runs),
                        "peak_memory_mean_bytes": float(
                            np.mean([r["peak_memory_mean_bytes"] for r in runs])
                        ),
                        "failed_runs": sum(r["failed"] for r in runs),
                        "failed_decisions": sum(r["failed_decisions"] for r in runs),
                        "infeasible_tokens": sum(r["infeasible_tokens"] for r in runs),
                        "sim_wall_s": stats(r["sim_wall_s"] for r in runs),
                    }
                )
    lan = [i["speedup_vs_best_layer"] for i in instances if i["regime"] == "lan"]
    wan = [i["speedup_vs_best_layer"] for i in instances if i["regime"] == "wan"]
    violations = [
        {"scenario": i["scenario"], "slower_than": i["myopic_slower_than"]}
        for i in instances
        if i["myopic_slower_than"]
    ]
    flagged = [i["scenario"] for i in instances if i["myopic_infeasible_while_other_feasible"]]
    myopic_unclean = [i["scenario"] for i in instances if not i["myopic_clean"]]
    lan_stats = stats(lan)
    targets = [
        target("instances where myopic is slower than a layer method", len(violations), 0),
        target("median lan speed-up of myopic over the best layer method",
               lan_stats["median"], LAN_SPEEDUP_TARGET, ">="),
        target("instances where myopic failed but another algorithm ran clean",
               len(flagged), 0),
    ]
    return {
        "setup": {
            "model": LARGE_MODEL,
            "devices": list(sizes),
            "regimes_mbit": LARGE_REGIMES,
            "latency_ms": list(LATENCY_MS),
            "prompt_tokens": LARGE_PROMPT,
            "generate_tokens": generate,
            "replan_every": REPLAN_EVERY,
            "traces": "load-and-bandwidth",
            "algorithms": list(LARGE_ALGORITHMS),
            "ratios": "algorithm / myopic (per-token: mean decode delay; total: total_s)",
        },
        "summary": table,
        "speedup_vs_best_layer": {"lan": lan_stats, "wan": stats(wan)},
        "myopic_slower_than_layer_method": violations,
        "myopic_infeasible_while_other_feasible": flagged,
        "myopic_unclean": myopic_unclean,
        "targets": targets,
        "latency_trace": traces,
        "instances": instances,
    }


def print_large(large: dict[str, Any]) -> None:
    """Tables of part (b)."""
    gib = 2**30
    rows = [
        (
            f"{r['devices']} {r['regime']}",
            r["algorithm"],
            num(r["per_token_ratio"]["mean"], ".3f"),
            num(r["total_ratio"]["mean"], ".3f"),
            num(r["total_ratio"]["max"], ".3f"),
            num(r["mean_per_token_s"]["mean"], ".3f"),
            num(r["peak_memory_max_bytes"] / gib, ".2f"),
            num(r["peak_memory_mean_bytes"] / gib, ".2f"),
            f"{r['failed_runs']}/{r['failed_decisions']}/{r['infeasible_tokens']}",
            num(r["sim_wall_s"]["mean"], ".1f"),
        )
        for r in large["summary"]
    ]
    print_table(
        "(b) large: ratios to myopic (mean over seeds; >1 means slower than myopic)",
        [
            "devices regime",
            "algorithm",
            "per-token",
            "total",
            "total max",
            "per-token s",
            "peak max GiB",
            "peak mean GiB",
            "fail runs/dec/tok",
            "sim s",
        ],
        rows,
    )
    sp = large["speedup_vs_best_layer"]
    print_table(
        "(b) speed-up of myopic over the best layer method (total_s ratio)",
        ["regime", "instances", "min", "median", "max"],
        [
            (k, v["count"], num(v["min"], ".2f"), num(v["median"], ".2f"), num(v["max"], ".2f"))
            for k, v in sp.items()
        ],
    )
    print_targets(large["targets"], fmt=lambda v: num(v, ".3g"))
    for v in large["myopic_slower_than_layer_method"]:
        console.print(f"[red]myopic slower than {v['slower_than']} on {v['scenario']}[/]")
    for s in large["myopic_infeasible_while_other_feasible"]:
        console.print(f"[red]myopic infeasible while another algorithm ran clean: {s}[/]")


def plot_latency_trace(large: dict[str, Any], path: Path) -> None:
    """Per-token latency over the traced run for each algorithm on one instance."""
    trace = large["latency_trace"]
    if not trace:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name, series in trace["per_token_s"].items():
        ax.plot(np.arange(1, len(series) + 1), series, label=name, lw=1.4)
    values = np.concatenate([np.asarray(v, dtype=float) for v in trace["per_token_s"].values()])
    if values.size and values.min() > 0 and values.max() / values.min() > 20:
        ax.set_yscale("log")
    ax.set_xlabel("generated token")
    ax.set_ylabel("per-token latency (s)")
    ax.set_title(f"per-token latency, {trace['scenario']} (load and bandwidth traces)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    save_figure(fig, path)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what it writes to DIR/placement_quality.json."""
    parser = BenchParser(NAME, __doc__.splitlines()[0], DEFAULTS)
    parser.add_argument(
        "--large-seeds", type=int, default=None,
        help=f"seeds per (size, regime) in (b) ({DEFAULTS['large_seeds']})",
    )
    parser.add_argument(
        "--milp-time-limit", type=float, default=60.0, help="HiGHS time limit per solve (s)"
    )
    parser.add_argument("--part", choices=("small", "large", "all"), default="all")
    args = parser.parse(argv)
    data: dict[str, Any] = {
        "benchmark": NAME,
        "quick": args.quick,
        "seeds": args.seeds,
        "large_seeds": args.large_seeds,
        "environment": environment(),
    }
    parts = {  # part: its rule, run, tables, plot and the plot's file
        "small": ("(a) small: myopic vs optimal", run_small, print_small, plot_gaps,
                  "gap_distribution.png"),
        "large": ("(b) large: myopic vs baselines", run_large, print_large, plot_latency_trace,
                  "latency_trace.png"),
    }  # fmt: skip
    for part, (title, run, show, plot, png) in parts.items():
        if args.part in (part, "all"):
            console.rule(title)
            result, wall = timed(run, args)
            result["wall_s"] = wall
            data[part] = result
            show(result)
            plot(result, args.out / png)
    write_json(args.out, NAME, data)
    return data


if __name__ == "__main__":
    main()
