"""Chaos: rounds of device kills, broker restarts and bandwidth collapses during generation.

Every round runs one generation of SmolLM2-135M on the ``local`` backend
(``edgepart.emulator.backends.local.run_local``) over a real mosquitto
(``edgepart.emulator.broker.Mosquitto``, no persistence), four devices of which any three hold the
model, and three faults drawn from the round's seed (``numpy.random.default_rng(seed)``):

- a device other than the source is killed (``kill -9`` of its agent and burners, the
  scenario's ``fail`` trace) before a drawn token;
- the broker is restarted (stopped, then started on the same port: no retained message,
  session or subscription survives) when a drawn token has been generated;
- a drawn link collapses to a drawn rate of 1 to 5 Mbit/s (a ``link`` trace).

Per round it reports: survived (the run finished), ids identical (the output ids equal the
monolithic reference's: nothing lost, nothing repeated), broker losses the controller saw,
recoveries, detection time (kill to the controller seeing the device gone, s), recovery
time (re-plan, loads, cache resets and re-prefill, s) and, of it, the re-prefill (s).
Targets: every round survived with identical ids; recovery time minus re-prefill <= 5 s.

Run: ``.venv/bin/python -m benchmarks.chaos [--quick] [--seeds N] [--tokens N] [--out DIR]``.
``--seeds`` is the number of rounds (default 5; ``--quick``: 2 rounds of 12 tokens).
Writes DIR/chaos.json; agent logs go under DIR/chaos/ROUND/.
"""

from __future__ import annotations

import time
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    BenchParser,
    ByMode,
    console,
    environment,
    monolithic_reference_ids,
    num,
    print_table,
    print_targets,
    stats,
    target,
    traceback_text,
    write_json,
)
from edgepart.emulator.host_limits import kernel_oom_kills

NAME = "chaos"
DEFAULTS = {"seeds": ByMode(5, 2), "tokens": ByMode(32, 12)}  # seeds: rounds
DEVICES = ("hub", "d1", "d2", "d3")
SCENARIO: dict[str, Any] = {
    "version": 1,
    "name": "chaos",
    "model": {"preset": "smollm2-135m"},
    "prompt_tokens": 16,
    "replan_every": 4,
    # the model takes about 520 MiB with the source's pinned blocks: the hub and any two
    # others hold it (a kill is survivable), the hub and one do not (the others hold blocks)
    "devices": [
        {"name": "hub", "compute_gflops": 2.0, "memory_mib": 300, "source": True},
        {"name": "d1", "compute_gflops": 1.5, "memory_mib": 160},
        {"name": "d2", "compute_gflops": 1.5, "memory_mib": 160},
        {"name": "d3", "compute_gflops": 1.0, "memory_mib": 160},
    ],
    "links": {"default": {"bandwidth_mbit": 300, "latency_ms": 0.5}},
}


def round_plan(seed: int, tokens: int) -> dict[str, Any]:
    """The faults of one round, drawn from its seed: which, and before or at which token."""
    rng = np.random.default_rng(seed)
    a, b = rng.choice(len(DEVICES), size=2, replace=False)
    return {
        "kill": {"device": str(rng.choice(DEVICES[1:])), "at_token": int(rng.integers(2, tokens))},
        "broker_restart_at": int(rng.integers(1, tokens - 1)),
        "collapse": {
            "link": [DEVICES[a], DEVICES[b]],
            "at_token": int(rng.integers(1, tokens)),
            "bandwidth_mbit": float(rng.integers(1, 6)),
        },
    }


@cache
def reference_ids(tokens: int) -> tuple[int, ...]:
    """The monolithic model's greedy ids for the scenario's prompt."""
    from edgepart.emulator.scenario import parse_scenario

    scenario = parse_scenario({**SCENARIO, "generate_tokens": tokens}, "chaos")
    return tuple(monolithic_reference_ids(scenario))


def run_round(seed: int, tokens: int, work_dir: Path) -> dict[str, Any]:
    """One round: the generation under its faults, summarised (or its error)."""
    from edgepart.emulator.backends.local import run_local
    from edgepart.emulator.broker import Mosquitto
    from edgepart.emulator.scenario import parse_scenario

    plan = round_plan(seed, tokens)
    traces = [
        {"at_token": plan["kill"]["at_token"], "device": plan["kill"]["device"], "fail": True},
        plan["collapse"],
    ]
    scenario = parse_scenario({**SCENARIO, "generate_tokens": tokens, "traces": traces}, "chaos")
    restarts: list[float] = []
    t0 = time.perf_counter()
    with Mosquitto() as broker:

        def restart(done: int, _result) -> None:
            if done == plan["broker_restart_at"] and not restarts:
                start = time.perf_counter()
                broker.stop()
                broker.start()
                restarts.append(time.perf_counter() - start)

        try:
            run = run_local(
                scenario, "myopic", broker=broker.endpoint, work_dir=work_dir, progress=restart
            )
        except Exception as exc:  # reported, not worked around
            return {
                "seed": seed,
                "plan": plan,
                "survived": False,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback_text(exc),
                "wall_s": time.perf_counter() - t0,
            }
    r = run.result
    return {
        "seed": seed,
        "plan": plan,
        "survived": True,
        "ids_identical": tuple(r.output_token_ids) == reference_ids(tokens),
        "tokens": len(r.output_token_ids),
        "broker_restarts": len(restarts),
        "broker_losses": r.broker_losses,
        "recoveries": r.recoveries,
        "detection_s": r.detection_s,
        "recovery_s": r.recovery_s,
        "reprefill_s": r.reprefill_s,
        "recovery_without_reprefill_s": r.recovery_s - r.reprefill_s,
        "migrations": r.migrations,
        "wall_s": time.perf_counter() - t0,
    }


def run_rounds(count: int, tokens: int, out: Path) -> list[dict[str, Any]]:
    """Rounds 0..count-1, each announced and summed up on the console as it ends."""
    rounds = []
    for seed in range(count):
        plan = round_plan(seed, tokens)
        console.rule(
            f"round {seed}: kill {plan['kill']['device']} at {plan['kill']['at_token']}, "
            f"broker restart after {plan['broker_restart_at']}, "
            f"{'-'.join(plan['collapse']['link'])} to {plan['collapse']['bandwidth_mbit']:.0f} "
            f"Mbit/s at {plan['collapse']['at_token']}"
        )
        result = run_round(seed, tokens, out / NAME / str(seed))
        if result["survived"]:
            console.print(
                f"  ids identical: {result['ids_identical']}, recovery "
                f"{result['recovery_s']:.2f} s (re-prefill {result['reprefill_s']:.2f} s), "
                f"broker losses {result['broker_losses']}, wall {result['wall_s']:.0f} s"
            )
        else:
            console.print(f"  [red]failed[/]: {result['error']}")
        rounds.append(result)
    return rounds


def print_rounds(rounds: list[dict[str, Any]]) -> None:
    """One line per round: survived, ids, broker losses, recoveries and their times."""
    print_table(
        "chaos rounds",
        [
            "round",
            "survived",
            "ids identical",
            "broker losses",
            "recoveries",
            "detect s",
            "recovery s",
            "re-prefill s",
        ],
        [
            [
                str(r["seed"]),
                str(r["survived"]),
                str(r.get("ids_identical", "-")),
                str(r.get("broker_losses", "-")),
                str(r.get("recoveries", "-")),
                num(max(r["detection_s"]) if r.get("detection_s") else None, ".2f"),
                num(r.get("recovery_s"), ".2f"),
                num(r.get("reprefill_s"), ".2f"),
            ]
            for r in rounds
        ],
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the rounds; returns what it writes to DIR/chaos.json."""
    parser = BenchParser(NAME, __doc__.splitlines()[0], DEFAULTS)
    parser.add_argument(
        "--tokens", type=int, default=None, help=f"tokens per round ({DEFAULTS['tokens']})"
    )
    args = parser.parse(argv)
    tokens = args.tokens
    if tokens < 4:
        parser.error("--tokens must be at least 4 (room for three faults)")
    oom_before = kernel_oom_kills()
    rounds = run_rounds(args.seeds, tokens, args.out)
    print_rounds(rounds)

    survived = [r for r in rounds if r["survived"]]
    without = stats(r["recovery_without_reprefill_s"] for r in survived if r["recoveries"])
    detection = stats(d for r in survived for d in r["detection_s"])
    all_ok = len(survived) == len(rounds) and all(r["ids_identical"] for r in survived)
    oom_after = kernel_oom_kills()
    oom = None if None in (oom_before, oom_after) else float(oom_after - oom_before)
    targets = [
        target("rounds survived with identical ids (1 = all)", float(all_ok), 1.0, ">="),
        target("max recovery minus re-prefill (s)", without["max"], 5.0),
        target("max detection (s)", detection["max"], 2.0),
        target("out-of-memory kills (kernel)", oom, 0.0),
    ]
    print_targets(targets, fmt=lambda v: num(v, ".2f"))
    data = {
        "benchmark": NAME,
        "quick": args.quick,
        "environment": environment(),
        "setup": {
            "tokens": tokens,
            "rounds": args.seeds,
            "scenario": SCENARIO,
            "algorithm": "myopic",
            "broker": "mosquitto (no persistence)",
        },
        "rounds": rounds,
        "recovery_without_reprefill_s": without,
        "recovery_s": stats(r["recovery_s"] for r in survived if r["recoveries"]),
        "detection_s": detection,
        "targets": targets,
    }
    write_json(args.out, NAME, data)
    return data


if __name__ == "__main__":
    main()
