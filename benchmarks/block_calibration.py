"""Block calibration: effective GFLOP/s of each block type on this CPU, in decode mode.

SmolLM2-135M (the ``smollm2-135m`` preset GGUF, float32) is loaded whole on one host
(``edgepart.llm.runtime.monolithic``) and timed by ``edgepart.llm.calibration.measure_gflops``, the
measurement ``edgepart.llm.host_profile`` caches. For each block type one token (T=1) is run
through the blocks the way a decode step runs them, and the block's FLOPs (the edgepart.llm.blocks
formulas, checked against the blocks' own ``flops`` counters) are divided by its time:

- KV group at context n (32, 128, 512, 1024; --quick: 32, 128): every group's cache is
  filled with n-1 random positions, the token attends over n; the cache is rolled back
  after each call so every repetition sees the same n;
- output projection, FFN and LM head (no context dependence).

One timed pass runs every block of the type in model order (all 90 KV groups, all 30
projections, ...), so weights stream from memory as in a real decode step rather than
sitting in cache as they would if one block were repeated; a block's time is the pass time
divided by the blocks in it. Passes are repeated --reps times after --warmup passes and
the median is kept (time.perf_counter; the machine load is not controlled, other
processes may share the CPU; the 1-minute load average is recorded). Threads: torch's
default unless --threads is given.

The cost model's prediction for a whole token at context n is then the sum over blocks
of FLOPs / (type's GFLOP/s); it is compared with the measured time of a monolithic
decode step at the same n (median over --reps steps, caches rolled back after each).
The embedding lookup and the orchestration between blocks carry no FLOPs, so they are
what the prediction leaves out.

Run: ``.venv/bin/python -m benchmarks.block_calibration [--quick] [--reps R] [--warmup W]
[--contexts N ...] [--threads T] [--out DIR]``.
Writes DIR/block_calibration.json; its top-level ``cpu``, ``threads`` and ``gflops``
({"group": {"<n>": x, ...}, "proj": x, "ffn": x, "head": x}) are what a cost model loads.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    BenchParser,
    ByMode,
    console,
    environment,
    line_printer,
    load1,
    load_note,
    load_span,
    num,
    print_table,
    stats,
    write_json,
)
from edgepart.llm.blocks import ffn_flops, group_flops, lm_head_flops, proj_flops
from edgepart.llm.calibration import gflops_only, measure_gflops
from edgepart.llm.host_profile import cpu_name
from edgepart.llm.loader import open_model
from edgepart.llm.runtime import monolithic

NAME = "block_calibration"
MODEL = "smollm2-135m"
DEFAULTS = {
    "contexts": ByMode((32, 128, 512, 1024), (32, 128)),
    "reps": ByMode(30, 5),
    "warmup": ByMode(3, 1),
}
FOCUS_CONTEXT = 128


def summarised(entry: dict[str, Any]) -> dict[str, Any]:
    """A block entry of measure_gflops with its pass times (s) replaced by their stats."""
    return {**entry, "pass_s": stats(entry["pass_s"])} if "pass_s" in entry else entry


def predict_token_s(spec, counts: dict[str, int], gflops: dict[str, Any], n: int) -> float:
    """The cost model's time for one token at context n: sum of FLOPs / GFLOP/s per block."""
    return (
        counts["group"] * group_flops(spec, n) / (gflops["group"][str(n)] * 1e9)
        + counts["proj"] * proj_flops(spec) / (gflops["proj"] * 1e9)
        + counts["ffn"] * ffn_flops(spec) / (gflops["ffn"] * 1e9)
        + lm_head_flops(spec) / (gflops["head"] * 1e9)
    )


def make_parser() -> BenchParser:
    """The command line: the common options, passes, contexts and threads."""
    parser = BenchParser(NAME, __doc__.splitlines()[0], DEFAULTS)
    parser.add_argument(
        "--reps", type=int, default=None, help=f"timed passes per point ({DEFAULTS['reps']})"
    )
    parser.add_argument(
        "--warmup", type=int, default=None,
        help=f"untimed passes before each point ({DEFAULTS['warmup']})",
    )
    parser.add_argument(
        "--contexts", type=int, nargs="+", default=None,
        help=f"KV-group context lengths ({DEFAULTS['contexts']})",
    )
    parser.add_threads_option()
    return parser


def summarise(measured: dict[str, Any], contexts: tuple[int, ...]) -> dict[str, Any]:
    """measure_gflops' result for the JSON: blocks and whole-token steps with their times as
    statistics, the KV group's time fitted against n, whether the FLOP counters agree."""
    raw = measured["blocks"]
    blocks = {
        "group": {n: summarised(e) for n, e in raw["group"].items()},
        **{kind: summarised(e) for kind, e in raw.items() if kind != "group"},
    }
    whole_token = {
        n: {"step_s": stats(e["step_s"]), "median_s": e["median_s"]}
        for n, e in measured["whole_token"].items()
    }
    # Per-call time of a KV group against n: mostly fixed, a cost model can interpolate with it.
    ns = np.array(contexts, dtype=float)
    ts = np.array([blocks["group"][str(n)]["block_s"] for n in contexts])
    per_context, fixed = np.polyfit(ns, ts, 1) if len(ns) > 1 else (0.0, float(ts[0]))
    counters_agree = all(
        e["flops"] == e["flops_counter"]
        for e in (*blocks["group"].values(), blocks["proj"], blocks["ffn"], blocks["head"])
    )
    return {
        "blocks": blocks,
        "group_time_fit": {"fixed_s": float(fixed), "per_context_s": float(per_context)},
        "flops_counters_agree": counters_agree,
        "whole_token": whole_token,
    }


def print_blocks(title: str, blocks: dict[str, Any], gflops: dict[str, Any], caption: str) -> None:
    """One line per block type (a KV group per context): FLOPs, time per block, GFLOP/s."""
    rows = [
        (f"KV group, n={n}", e["flops"], f"{1e6 * e['block_s']:.1f} us",
         num(gflops["group"][str(n)], ".2f"))
        for n, e in blocks["group"].items()
    ]  # fmt: skip
    for kind, label in (("proj", "projection"), ("ffn", "FFN"), ("head", "LM head")):
        e = blocks[kind]
        rows.append((label, e["flops"], f"{1e6 * e['block_s']:.1f} us", num(gflops[kind], ".2f")))
    rows.append(("embedding (no FLOPs)", 0, f"{1e6 * blocks['embed']['block_s']:.1f} us", "-"))
    print_table(title, ["block", "FLOPs", "time / block", "GFLOP/s"], rows, caption=caption)


def predict(spec, counts: dict[str, int], gflops: dict[str, Any],
            whole_token: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Per context: the cost model's token time against the measured decode step (s)."""
    prediction = {}
    for n, step in whole_token.items():
        predicted = predict_token_s(spec, counts, gflops, int(n))
        prediction[n] = {
            "predicted_s": predicted,
            "measured_s": step["median_s"],
            "predicted_over_measured": predicted / step["median_s"],
        }
    return prediction


def print_prediction(prediction: dict[str, Any]) -> None:
    """The cost model against the measured step per context, FOCUS_CONTEXT's in a line too."""
    print_table(
        "cost model vs measured monolithic decode step",
        ["context n", "predicted", "measured", "predicted / measured"],
        [
            (f"{n}{' *' if int(n) == FOCUS_CONTEXT else ''}",
             f"{1000 * p['predicted_s']:.2f} ms", f"{1000 * p['measured_s']:.2f} ms",
             num(p["predicted_over_measured"], ".3f"))
            for n, p in prediction.items()
        ],
        caption="predicted = sum over blocks of FLOPs / GFLOP/s of the block's type; the "
        "embedding and hand-offs are not in it",
    )  # fmt: skip
    if str(FOCUS_CONTEXT) in prediction:
        p = prediction[str(FOCUS_CONTEXT)]
        console.print(
            f"n={FOCUS_CONTEXT}: cost model {1000 * p['predicted_s']:.2f} ms vs measured "
            f"{1000 * p['measured_s']:.2f} ms per token ({p['predicted_over_measured']:.3f}x)"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what it writes to DIR/block_calibration.json."""
    parser = make_parser()
    args = parser.parse(argv)
    reps, warmup = args.reps, args.warmup
    contexts = tuple(sorted(set(args.contexts)))
    if min(contexts) < 1:
        parser.error("--contexts must be at least 1")
    threads = torch.get_num_threads()
    cpu = cpu_name()
    load_start = load1()

    console.rule(f"loading {MODEL}")
    om = open_model(MODEL)
    model = monolithic(om.source, om.arch)
    console.print(f"  {om.file.path.name} on {cpu}, {threads} torch threads")
    console.rule(f"decode-mode block times: {warmup} warm-up + {reps} timed passes each")
    measured = measure_gflops(
        model, contexts, warmup, reps, whole_token=True, progress=line_printer("  ")
    )
    gflops = gflops_only(measured)
    counts = measured["block_counts"]
    # The JSON keeps summaries of the raw pass and step times, not the times themselves.
    summary = summarise(measured, contexts)
    print_blocks(
        f"{MODEL} decode-mode blocks on {cpu}, {threads} threads (median of {reps})",
        summary["blocks"],
        gflops,
        caption="block FLOPs from edgepart.llm.blocks; counters "
        + ("agree" if summary["flops_counters_agree"] else "DISAGREE")
        + f"; {load_note(load_start)}",
    )
    fit = summary["group_time_fit"]
    console.print(
        f"KV group time ~ {1e6 * fit['fixed_s']:.1f} us + {1e9 * fit['per_context_s']:.1f} ns "
        "x n (least squares over the contexts)"
    )
    prediction = predict(om.arch.spec, counts, gflops, summary["whole_token"])
    print_prediction(prediction)

    data = {
        "benchmark": NAME,
        "quick": args.quick,
        "cpu": cpu,
        "threads": threads,
        "gflops": gflops,
        "model": MODEL,
        "dtype": "float32",
        "environment": environment(),
        "load_average_1min": load_span(load_start),
        "setup": {
            "contexts": list(contexts),
            "reps": reps,
            "warmup": warmup,
            "block_counts": counts,
            "timing": (
                "perf_counter around a pass over every block of the type (T=1), per-block time "
                "= median pass / blocks per pass; KV caches rolled back after each call; "
                "machine load not controlled"
            ),
        },
        **summary,
        "prediction": prediction,
    }
    write_json(args.out, NAME, data)
    return data


if __name__ == "__main__":
    main()
