"""Emulation fidelity: live local runs against the cost model, and shaped-link goodput.

Part (a), live runs. Every scenario (default ``scenarios/demo.yaml``, ``scenarios/lan-3.yaml``,
``scenarios/wifi-4.yaml``) runs once per algorithm (myopic, edgeshard, static-heads,
memory-proportional, galaxy) on the ``local`` backend
(``edgepart.emulator.backends.local.run_local``: an embedded MQTT broker, one real agent process per
device paced to its share of this host's CPU, links shaped in the agents' senders, the scenario's
traces applied when generation reaches them). For each run it reports:

- fidelity: median and p90 over the run's tokens of |measured / predicted - 1|
  (``edgepart.emulator.report.fidelity``; the prediction is the cost model's for the same placement,
  resources and context the controller had when it ran the token). Target: median <= 20%;
- tokens/s = tokens / sum(per-token decode times) (migration stalls and the prefill left out),
  total s (decode plus migration stalls, as the simulator counts it), migrated blocks;
- peak memory per device (MiB; the tables show the maximum over devices, the JSON all);
- whether the greedy output ids equal the monolithic reference's (the whole model on one
  host, ``monolithic_reference_ids``: a partition must not change the tokens).

With ``--dilation 1.5,3`` every scenario and algorithm also runs forced to each time
dilation k (``run_local(time_dilation=k)``: every device at its share / k and speed / k,
links at rate / k and latency x k; the controller measures and predicts in scenario time,
wall / k), after its run at the least k this host needs (1 when the scenario fits, the
run the others are compared with). Per dilated run: the fidelity median in scenario time
(target <= 20%) and its tokens/s in scenario time against that first run's (target:
within 10%).

The headline table puts the measured tokens/s and peak memory per device of myopic next
to every other algorithm, per scenario. A run that raises is recorded with its error text
(type and message) and left out of the numbers; the library is not worked around.

Part (b), shaped goodput. Two ``edgepart.device_agent.dataplane.DataPlane`` instances in one asyncio
loop on loopback; the sender is shaped (``DataPlane.shape``) at 1, 10 and 100 Mbit/s, no
added latency, and sends 64 KiB ACTIVATION frames (a float32 tensor payload of 16384 values,
``encode_frame`` length including headers) one after the other, enough for ``--seconds`` of
traffic at the configured rate. The receiver stamps (perf_counter) each whole frame as its
``on_frame`` handler gets it; goodput = bytes of the frames after the first / (stamp of the
last - stamp of the first). The first frame's bytes are left out because its stamp marks
its end: the window then runs from the first byte counted to the last, exactly (the bucket's
initial burst, 5 ms of traffic, also falls outside it). Target: |goodput / configured - 1|
<= 5% at every rate.

The machine's load is not controlled (other processes may share the CPU; the 1-minute load
average is recorded); every wait is bounded.

Run: ``.venv/bin/python -m benchmarks.emulation_fidelity [--quick] [--scenarios F ...]
[--algorithms A ...] [--tokens N] [--telemetry measured|configured] [--seconds S]
[--dilation K,K,...] [--out DIR]``. ``--quick``: only lan-3 with myopic and edgeshard, 12
tokens, 1 s of traffic per rate. Writes DIR/emulation_fidelity.json; agent logs go under
DIR/local/ALGORITHM/least/ (and .../kK/ per forced dilation).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    BenchParser,
    ByMode,
    console,
    environment,
    error_text,
    line_printer,
    load1,
    load_span,
    monolithic_reference_ids,
    num,
    pct,
    print_table,
    print_targets,
    quiet_cancelled,
    repo_path,
    run_numbers,
    target,
    traceback_text,
    write_json,
)
from edgepart.emulator.scenario import MIB

NAME = "emulation_fidelity"
DEFAULTS = {
    "scenarios": ByMode(
        ["scenarios/demo.yaml", "scenarios/lan-3.yaml", "scenarios/wifi-4.yaml"],
        ["scenarios/lan-3.yaml"],
    ),
    "algorithms": ByMode(
        ["myopic", "edgeshard", "static-heads", "memory-proportional", "galaxy"],
        ["myopic", "edgeshard"],
    ),
    "tokens": ByMode(None, 12),  # full: each scenario's own generate_tokens
    "seconds": ByMode(2.5, 1.0),
}
RATES_MBIT = [1.0, 10.0, 100.0]
FRAME_VALUES = 16384  # float32 values per ACTIVATION frame: a 64 KiB payload
FIDELITY_TARGET = 0.20
GOODPUT_TARGET = 0.05
#: a dilated run's tokens/s in scenario time may differ this much (relative) from the first
DILATED_SPEED_TARGET = 0.10
FRAME_TIMEOUT_S = 30.0  # for any one frame to be sent


# ---------------------------------------------------------------- (a) live runs


def run_one(
    scenario, algorithm: str, telemetry: str, work_dir: Path, dilation: float | None = None
) -> dict[str, Any]:
    """One live run on the local backend, summarised (or its error); ``dilation`` forces
    the world's time dilation (None: the least this host needs)."""
    from edgepart.emulator.backends.local import run_local
    from edgepart.emulator.report import fidelity

    t0 = time.perf_counter()
    try:
        run = run_local(
            scenario,
            algorithm,
            telemetry=telemetry,  # type: ignore[arg-type]
            work_dir=work_dir,
            status=line_printer("    "),
            time_dilation=dilation,
        )
    except Exception as exc:  # reported, not worked around
        return {
            "algorithm": algorithm,
            "forced_dilation": dilation,
            "ok": False,
            "error": error_text(exc),
            "traceback": traceback_text(exc),
            "logs": str(work_dir),
            "wall_s": time.perf_counter() - t0,
        }
    r = run.result
    median, p90 = fidelity(run)
    peaks = {k: v / MIB for k, v in r.peak_memory_bytes.items()}
    return {
        "algorithm": algorithm,
        "forced_dilation": dilation,
        "time_dilation": r.time_dilation,
        "ok": True,
        "error": r.failure,
        "fidelity_median": median,
        "fidelity_p90": p90,
        "tokens": len(r.per_token_s),
        **run_numbers(r),
        "failed_replans": r.failed_replans,
        "recoveries": r.recoveries,
        "peak_memory_mib": peaks,
        "peak_memory_mib_max": max(peaks.values(), default=0.0),
        "isolation": run.isolation,
        "cpu_share": run.shares,
        "dropped_messages": run.dropped_messages,
        "wall_s": time.perf_counter() - t0,
        "run": run.to_json(),
    }


def _dilated_label(dilation: float | None) -> str:
    return "" if dilation is None else f", time dilation {dilation:g}"


def run_scenario(path: Path, algorithms: list[str], tokens: int | None, telemetry: str,
                 work_dir: Path, dilations: list[float]) -> dict[str, Any]:
    """Every algorithm on one scenario, at the least time dilation this host needs and at
    every one of ``dilations``, plus whether their greedy ids agree."""
    from edgepart.emulator.scenario import load_scenario

    scenario = load_scenario(path)
    if tokens is not None:
        scenario = scenario.model_copy(update={"generate_tokens": tokens})
    runs: list[dict[str, Any]] = []
    for algorithm in algorithms:
        for dilation in [None, *dilations]:
            console.rule(
                f"{scenario.name}: {algorithm} ({scenario.generate_tokens} tokens"
                f"{_dilated_label(dilation)})"
            )
            where = work_dir / algorithm / ("least" if dilation is None else f"k{dilation:g}")
            run = run_one(scenario, algorithm, telemetry, where, dilation)
            if run["ok"]:
                console.print(
                    f"  {run['tokens']} tokens, {num(run['tokens_per_s'], '.2f')} tokens/s, "
                    f"fidelity median {pct(run['fidelity_median'], 1)}, "
                    f"{run['migrations']} migrated blocks, k {run['time_dilation']:.2f}, "
                    f"wall {run['wall_s']:.0f} s"
                )
            else:
                console.print(f"  [red]failed[/]: {run['error']}")
            runs.append(run)
    _compare_dilated(runs)
    ok = [r for r in runs if r["ok"]]
    reference = monolithic_reference_ids(scenario)
    for r in ok:
        r["ids_match_reference"] = r["run"]["output_token_ids"] == reference
    return {
        "scenario": scenario.name,
        "file": str(path),
        "devices": list(scenario.device_names),
        "generate_tokens": scenario.generate_tokens,
        "traces": len(scenario.traces),
        "output_ids_identical": all(r["ids_match_reference"] for r in ok) if ok else None,
        "runs": runs,
    }


def _compare_dilated(runs: list[dict[str, Any]]) -> None:
    """Each forced-dilation run's tokens/s (scenario time) over its algorithm's first run's
    (``speed_vs_least``), None where either failed."""
    first = {
        r["algorithm"]: r for r in runs if r["ok"] and r["forced_dilation"] is None
    }
    for r in runs:
        if r["forced_dilation"] is None:
            continue
        base = first.get(r["algorithm"])
        ok = r["ok"] and base is not None and r["tokens_per_s"] and base["tokens_per_s"]
        r["speed_vs_least"] = r["tokens_per_s"] / base["tokens_per_s"] if ok else None


def print_dilation(results: list[dict[str, Any]]) -> None:
    """The runs per time dilation: fidelity and tokens/s in scenario time."""
    rows = []
    for sc in results:
        for r in sc["runs"]:
            forced = "least" if r["forced_dilation"] is None else f"{r['forced_dilation']:g}"
            if not r["ok"]:
                rows.append((sc["scenario"], r["algorithm"], forced, "error", "", "", "", ""))
                continue
            ratio = r.get("speed_vs_least")
            rows.append(
                (
                    sc["scenario"],
                    r["algorithm"],
                    forced,
                    f"{r['time_dilation']:.2f}",
                    pct(r["fidelity_median"], 1),
                    num(r["tokens_per_s"], ".2f"),
                    "-" if ratio is None else f"{ratio:.3f}",
                    f"{r['wall_s']:.0f}",
                )
            )
    print_table(
        "Time dilation: measured vs predicted and tokens/s, in scenario time",
        ["scenario", "algorithm", "forced k", "k", "|m/p-1| median", "tokens/s",
         "vs least k", "wall s"],
        rows,
        caption="least: the run at the least k this host needs (1 when the scenario fits); "
        "vs least k: tokens/s over that run's; every time is scenario time (wall / k)",
    )


def _mib(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def print_fidelity(results: list[dict[str, Any]]) -> None:
    rows = []
    for sc in results:
        for r in sc["runs"]:
            if not r["ok"]:
                rows.append(
                    (sc["scenario"], r["algorithm"], "", "error", "", "", "", "", "", "", "")
                )
                continue
            rows.append(
                (
                    sc["scenario"],
                    r["algorithm"],
                    f"{r['time_dilation']:.2f}",
                    pct(r["fidelity_median"], 1),
                    pct(r["fidelity_p90"], 1),
                    "[green]yes[/]" if r["fidelity_median"] <= FIDELITY_TARGET else "[red]no[/]",
                    num(r["tokens_per_s"], ".2f"),
                    f"{r['total_s']:.2f}",
                    r["migrations"],
                    _mib(r["peak_memory_mib_max"]),
                    "yes" if r["ids_match_reference"] else "[red]NO[/]",
                )
            )
    print_table(
        "Live runs on the local backend: measured vs predicted per-token time",
        ["scenario", "algorithm", "k", "|m/p-1| median", "p90", "<= 20%", "tokens/s",
         "total s", "migrated", "peak MiB (max dev)", "ids = ref"],
        rows,
        caption="k: the run's time dilation (times in scenario time, wall / k); ids = ref: "
        "greedy output ids equal the whole model's on one host (monolithic); "
        "tokens/s = tokens / sum of per-token decode times",
    )
    for sc in results:
        for r in sc["runs"]:
            if not r["ok"]:
                console.print(f"[red]{sc['scenario']} {r['algorithm']}[/]: {r['error']}")


def print_headline(results: list[dict[str, Any]]) -> None:
    rows = []
    for sc in results:
        least = [r for r in sc["runs"] if r["forced_dilation"] is None]
        by = {r["algorithm"]: r for r in least if r["ok"]}
        mine = by.get("myopic")
        for r in least:
            if not r["ok"]:
                rows.append((sc["scenario"], r["algorithm"], "error", "", "", ""))
                continue
            ratio = (
                r["tokens_per_s"] / mine["tokens_per_s"]
                if mine is not None and r["tokens_per_s"] and mine["tokens_per_s"]
                else None
            )
            per_device = " ".join(f"{d} {v:.0f}" for d, v in r["peak_memory_mib"].items())
            rows.append(
                (
                    sc["scenario"],
                    r["algorithm"],
                    num(r["tokens_per_s"], ".2f"),
                    "-" if ratio is None else f"{ratio:.2f}x",
                    _mib(r["peak_memory_mib_max"]),
                    per_device,
                )
            )
    print_table(
        "Headline: measured tokens/s and peak memory per device, myopic vs the others",
        ["scenario", "algorithm", "tokens/s", "vs myopic", "peak MiB (max)", "peak MiB per device"],
        rows,
    )


# ---------------------------------------------------------------- (b) shaped goodput


async def _goodput(rate_mbit: float, seconds: float) -> dict[str, Any]:
    """Send shaped 64 KiB frames over loopback; the goodput the receiver saw."""
    from edgepart.device_agent.dataplane import DataPlane
    from edgepart.device_agent.wire import Frame, Kind, encode_frame, tensor_to_payload

    payload = tensor_to_payload(torch.zeros(FRAME_VALUES, dtype=torch.float32))
    frame_bytes = len(encode_frame(Frame(Kind.ACTIVATION, 1, 0, "bench.out", payload)))
    per_frame_s = frame_bytes * 8 / (rate_mbit * 1e6)
    frames = 1 + max(2, math.ceil(seconds / per_frame_s))
    stamps: list[tuple[float, int]] = []
    done = asyncio.Event()

    async def on_frame(frame: Frame) -> None:
        stamps.append((time.perf_counter(), len(encode_frame(frame))))
        if len(stamps) >= frames:
            done.set()

    async def ignore(_frame: Frame) -> None:
        return None

    asyncio.get_running_loop().set_exception_handler(quiet_cancelled)
    rx = DataPlane("rx", on_frame)
    tx = DataPlane("tx", ignore)
    try:
        host, port = await rx.start("127.0.0.1", 0)
        await tx.start("127.0.0.1", 0)
        tx.set_endpoints({"rx": f"{host}:{port}"})
        tx.shape("rx", rate_mbit, 0.0)
        started = time.perf_counter()
        for i in range(frames):
            await tx.send("rx", Frame(Kind.ACTIVATION, 1, i, "bench.out", payload), FRAME_TIMEOUT_S)
        await asyncio.wait_for(done.wait(), timeout=FRAME_TIMEOUT_S)
        send_s = time.perf_counter() - started
    finally:
        await tx.close()
        await rx.close()
    window = stamps[-1][0] - stamps[0][0]
    counted = sum(n for _, n in stamps[1:])
    goodput = counted * 8 / window / 1e6
    return {
        "rate_mbit": rate_mbit,
        "frame_bytes": frame_bytes,
        "frames": frames,
        "window_s": window,
        "bytes_counted": counted,
        "sender_s": send_s,
        "goodput_mbit": goodput,
        "relative_error": goodput / rate_mbit - 1.0,
    }


def shaped_goodput(rates: list[float], seconds: float) -> list[dict[str, Any]]:
    """Goodput at each configured rate, each pair of data planes in a fresh loop."""
    out = []
    for rate in rates:
        console.print(f"  shaping at {rate:g} Mbit/s for about {seconds:g} s")
        out.append(asyncio.run(_goodput(rate, seconds)))
    return out


# ---------------------------------------------------------------- main


def make_parser() -> BenchParser:
    """The command line: the common options, what runs and the goodput's traffic."""
    parser = BenchParser(NAME, __doc__.splitlines()[0], DEFAULTS)
    parser.add_argument(
        "--scenarios", nargs="+", default=None,
        help=f"scenario files ({DEFAULTS['scenarios']})",
    )
    parser.add_argument(
        "--algorithms", nargs="+", default=None, help=f"algorithms ({DEFAULTS['algorithms']})"
    )
    parser.add_argument(
        "--tokens", type=int, default=None,
        help="override generate_tokens (default: the scenario's; quick "
        f"{DEFAULTS['tokens'].quick})",
    )
    parser.add_argument(
        "--telemetry", choices=["measured", "configured"], default="measured",
        help="what the controller plans on (measured)",
    )
    parser.add_argument(
        "--seconds", type=float, default=None,
        help=f"traffic per shaped rate (s; {DEFAULTS['seconds']})",
    )
    parser.add_argument(
        "--dilation", type=_dilations, default=[], metavar="K,K,...",
        help="also run every scenario and algorithm at these time dilations (each >= 1 and "
        "at least what this host needs; default: none)",
    )
    return parser


def _dilations(text: str) -> list[float]:
    """A comma-separated list of time dilations (each >= 1)."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        what = f"not a comma-separated list of numbers: {text!r}"
        raise argparse.ArgumentTypeError(what) from None
    if not values or any(not (v >= 1.0 and math.isfinite(v)) for v in values):
        raise argparse.ArgumentTypeError(f"time dilations must be numbers >= 1: {text!r}")
    return values


def dilation_targets(results: list[dict[str, Any]], dilations: list[float]) -> list[dict]:
    """Per forced dilation: the worst fidelity median and the worst tokens/s ratio to the
    least-k run (|ratio - 1|), over the runs that finished."""
    targets = []
    for k in dilations:
        runs = [r for sc in results for r in sc["runs"] if r["forced_dilation"] == k and r["ok"]]
        medians = [r["fidelity_median"] for r in runs]
        speeds = [abs(r["speed_vs_least"] - 1) for r in runs if r["speed_vs_least"] is not None]
        targets += [
            target(f"fidelity median at k = {k:g}, worst run", max(medians, default=None),
                   FIDELITY_TARGET),
            target(f"tokens/s at k = {k:g} vs least k, worst |ratio - 1|",
                   max(speeds, default=None), DILATED_SPEED_TARGET),
        ]  # fmt: skip
    return targets


def targets_of(results: list[dict[str, Any]], goodput: list[dict[str, Any]]) -> list[dict]:
    """The fidelity targets over the runs that finished, and the goodput's per rate."""
    medians = [r["fidelity_median"] for sc in results for r in sc["runs"] if r["ok"]]
    return [
        target(
            "fidelity median, worst run",
            max(medians) if medians else None,
            FIDELITY_TARGET,
        ),
        target(
            "fidelity median, median over runs",
            statistics.median(medians) if medians else None,
            FIDELITY_TARGET,
        ),
    ] + [
        target(f"goodput error at {g['rate_mbit']:g} Mbit/s", abs(g["relative_error"]),
               GOODPUT_TARGET)
        for g in goodput
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what it writes to DIR/emulation_fidelity.json."""
    parser = make_parser()
    args = parser.parse(argv)
    scenarios, algorithms = args.scenarios, args.algorithms
    tokens, seconds = args.tokens, args.seconds
    if tokens is not None and tokens < 2:
        parser.error("--tokens must be at least 2 (one decode step after the prefill)")
    load_start = load1()
    work_dir = args.out / "local"

    results = [
        run_scenario(repo_path(s), algorithms, tokens, args.telemetry, work_dir, args.dilation)
        for s in scenarios
    ]
    console.rule("shaped goodput on loopback")
    goodput = shaped_goodput(RATES_MBIT, seconds)
    targets = targets_of(results, goodput) + dilation_targets(results, args.dilation)

    print_fidelity(results)
    print_headline(results)
    if args.dilation:
        print_dilation(results)
    print_table(
        "Output ids against the monolithic reference",
        ["scenario", "every run equals it"],
        [
            (sc["scenario"],
             {True: "yes", False: "[red]NO[/]", None: "-"}[sc["output_ids_identical"]])
            for sc in results
        ],
    )
    print_table(
        "Shaped goodput: DataPlane pair on loopback, 64 KiB ACTIVATION frames",
        ["configured", "frames", "window", "goodput", "error"],
        [
            (f"{g['rate_mbit']:g} Mbit/s", g["frames"], f"{g['window_s']:.2f} s",
             f"{g['goodput_mbit']:.3f} Mbit/s", pct(g["relative_error"]))
            for g in goodput
        ],
        caption="goodput = bytes of the frames after the first (headers included) / time "
        "from the first frame's arrival to the last's",
    )
    print_targets(targets)

    data = {
        "benchmark": NAME,
        "quick": args.quick,
        "environment": environment(),
        "setup": {
            "scenarios": [str(s) for s in scenarios],
            "algorithms": algorithms,
            "tokens_override": tokens,
            "telemetry": args.telemetry,
            "dilations": args.dilation,
            "backend": "local",
            "rates_mbit": RATES_MBIT,
            "seconds_per_rate": seconds,
            "frame_payload_values": FRAME_VALUES,
            "fidelity": "median and p90 over tokens of |measured / predicted - 1|",
            "tokens_per_s": "tokens / sum(per_token_s)",
        },
        "load_average_1min": load_span(load_start),
        "scenarios": results,
        "shaped_goodput": goodput,
        "targets": targets,
    }
    write_json(args.out, NAME, data)
    return data


if __name__ == "__main__":
    main()
