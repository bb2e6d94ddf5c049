"""Testbed fidelity's command line: options, the parts in turn, the summary and the JSON.

``python -m benchmarks.testbed_fidelity --help`` lists the options; the package docstring
(``benchmarks/testbed_fidelity/__init__.py``) says what every part measures.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import benchmarks.testbed_fidelity as package
from benchmarks.common import (
    BenchParser,
    ByMode,
    console,
    environment,
    error_text,
    line_printer,
    load1,
    load_span,
    pct,
    print_table,
    print_targets,
    settle,
    target,
    traceback_text,
    write_json,
)
from benchmarks.testbed_fidelity import MODEL, capacity, compute, links, tokens
from benchmarks.testbed_fidelity.docker_calls import Scratch, image_info

NAME = "testbed_fidelity"
PARTS = ("links", "compute", "tokens", "capacity")
DEFAULTS = {
    **links.DEFAULTS,
    **compute.DEFAULTS,
    **tokens.DEFAULTS,
    **capacity.DEFAULTS,
    "settle": ByMode(90.0, 0.0),  # longest wait for a quiet host before parts 2-4 (s)
}
QUIET_LOAD = 1.5
PRINTERS = {"links": links.print_links, "compute": compute.print_compute,
            "tokens": tokens.print_tokens, "capacity": capacity.print_capacity}  # fmt: skip


def make_parser() -> BenchParser:
    """The command line: the common options and the parts' own."""
    parser = BenchParser(NAME, package.__doc__.splitlines()[0], DEFAULTS)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="parts to run (all)")  # fmt: skip
    parser.add_argument(
        "--image",
        default="edgepart:latest",
        help="the edgepart image (edgepart:latest; never pulled)",
    )
    parser.add_argument(
        "--build",
        action="store_true",
        help="build the image from this tree first (edgepart testbed build; offline)",
    )
    parser.add_argument(
        "--seconds", type=float, default=None,
        help=f"iperf3 time per rate (s; {DEFAULTS['seconds']})",
    )  # fmt: skip
    parser.add_argument(
        "--sustain", type=float, default=None,
        help=f"sustained timing per block type (s; {DEFAULTS['sustain']})",
    )  # fmt: skip
    parser.add_argument(
        "--capacity-sizes", type=int, nargs="+", default=None,
        help=f"device counts ({DEFAULTS['capacity_sizes']})",
    )  # fmt: skip
    parser.add_argument(
        "--capacity-tokens",
        type=int,
        default=capacity.CAPACITY_TOKENS,
        help=f"tokens per capacity run ({capacity.CAPACITY_TOKENS})",
    )
    parser.add_argument(
        "--settle", type=float, default=None,
        help=f"longest wait for a quiet host before parts 2-4 (s; {DEFAULTS['settle']})",
    )  # fmt: skip
    parser.add_argument(
        "--quiet-load",
        type=float,
        default=QUIET_LOAD,
        help=f"1-min load average counted as quiet ({QUIET_LOAD:g})",
    )
    return parser


def check_image(args: argparse.Namespace, prefix: str) -> tuple[dict[str, Any], str | None]:
    """The image's record (built first with --build) and, when no part can run, why."""
    from edgepart.emulator.images import docker_available

    image: dict[str, Any] = {"tag": args.image}
    if not docker_available():
        return image, "the Docker engine does not answer (compose/docker-setup.sh starts it)"
    try:
        if args.build:
            from edgepart.emulator.images import build_image

            console.rule(f"building {args.image} from this tree")
            build_image(args.image, progress=line_printer("  "))
        with Scratch(prefix + "-img") as scratch:
            image = image_info(args.image, scratch)
        if not image["code_matches_tree"]:
            # parts 3 and 4 render the containers' commands with this tree's code and
            # run them with the image's: a mismatch can fail every run (--build)
            console.print(
                f"[yellow]the image's code differs from this tree in "
                f"{len(image['differing_files'])} files: "
                f"{', '.join(image['differing_files'][:6])}; --build rebuilds it[/]"
            )
    except Exception as exc:  # BenchError, ImageBuildError
        return image, f"image {args.image}: {error_text(exc)} (build it: edgepart testbed build)"
    return image, None


def run_part(part: str, runner: Callable[[], dict[str, Any]], quiet: dict | None
             ) -> dict[str, Any]:  # fmt: skip
    """One part, its error recorded rather than raised; with its wall time and load."""
    load_before = load1()
    t0 = time.perf_counter()
    try:
        result = {"ok": True, **runner()}
    except Exception as exc:  # recorded; the next part runs
        result = {"ok": False, "error": error_text(exc), "traceback": traceback_text(exc)}
        console.print(f"  [red]part {part} failed[/]: {error_text(exc)}")
    items = result.get("runs", result.get("rows", []))
    result.update(
        failed_items=sum(1 for item in items if item.get("ok") is False),
        wall_s=time.perf_counter() - t0,
        load_average_1min=load_span(load_before),
        settle=quiet,
    )
    console.print(f"  part {part}: {result['wall_s']:.0f} s")
    return result


def targets_of(parts: dict[str, Any]) -> list[dict[str, Any]]:
    """The target lines of the parts that ran."""
    out = []
    for r in parts.get("links", {}).get("rows", []):
        if r["rate_mbit"] is not None:
            out.append(target(f"goodput error at {r['rate_mbit']:g} Mbit/s ({r['tc_verb']})",
                              abs(r["error"]), links.GOODPUT_TARGET))  # fmt: skip
    for r in parts.get("compute", {}).get("rows", []):
        if r.get("ok") and r["share"] is not None:
            worst = max(abs(r["ffn_error"]), abs(r["group_error"]))
            out.append(target(f"sustained block time error at {r['label']} cores", worst,
                              compute.COMPUTE_TARGET))  # fmt: skip
    for r in parts.get("tokens", {}).get("runs", []):
        out.append(
            target(
                f"fidelity median {r['scenario']} {r['algorithm']}",
                r.get("fidelity_median") if r["ok"] else None,
                tokens.FIDELITY_TARGET,
            )
        )
    if parts.get("capacity", {}).get("ok"):
        out.append(target("device containers held", parts["capacity"]["max_devices"],
                          capacity.CAPACITY_TARGET, ">="))  # fmt: skip
    return out


def _target_value(v: float | None) -> str:
    """A target's value or limit: a ratio as a percentage, a count (>= 1) as a number."""
    if v is None:
        return "-"
    return f"{v:g}" if float(v).is_integer() and v >= 1 else pct(v, 1)


def print_summary(parts: dict[str, Any], targets: list[dict[str, Any]]) -> None:
    """The tables of the parts that ran, one line per part, and the targets."""
    for part, result in parts.items():
        if result["ok"]:
            PRINTERS[part](result)
    print_table(
        "Parts",
        ["part", "ok", "failed runs/rows", "wall s", "waited s", "load start", "load end",
         "error"],
        [
            (p, "[green]yes[/]" if r["ok"] else "[red]no[/]", r.get("failed_items", "-"),
             f"{r['wall_s']:.0f}", f"{(r.get('settle') or {}).get('waited_s', 0):.0f}",
             f"{r.get('load_average_1min', {}).get('start', 0):.1f}",
             f"{r.get('load_average_1min', {}).get('end', 0):.1f}",
             "" if r["ok"] else r["error"].splitlines()[0][:100])
            for p, r in parts.items()
        ],
        caption="ok: the part ran (a failed run or row inside it is counted, with its error "
        "in the JSON); wall s: the part itself; waited s: the wait for a quiet host before it",
    )  # fmt: skip
    if targets:
        print_targets(targets, fmt=_target_value)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what it writes to DIR/testbed_fidelity.json."""
    parser = make_parser()
    args = parser.parse(argv)
    if args.capacity_tokens < 2:
        parser.error("--capacity-tokens must be at least 2")
    prefix = f"tbf-{os.getpid()}"
    wanted = [p for p in PARTS if p in args.parts]
    started = time.perf_counter()
    load_start = load1()

    image, problem = check_image(args, prefix)
    image_ref = image.get("id", args.image)
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "links": lambda: links.part_links(
            image_ref, prefix, args.seconds, args.unshaped_reference
        ),
        "compute": lambda: compute.part_compute(
            image_ref, prefix, args.shares, args.short_period_row, args.reps, args.sustain
        ),
        "tokens": lambda: tokens.part_tokens(
            image_ref, args.out, args.scenarios, args.algorithms, args.tokens
        ),
        "capacity": lambda: capacity.part_capacity(
            image_ref, args.out, args.capacity_tokens, args.capacity_sizes
        ),
    }
    parts: dict[str, Any] = {}
    for part in wanted:
        console.rule(f"part {PARTS.index(part) + 1}: {part}")
        if problem is not None:
            parts[part] = {"ok": False, "error": problem, "wall_s": 0.0}
            console.print(f"  [red]skipped[/]: {problem}")
            continue
        quiet = settle(args.settle, args.quiet_load) if part != "links" else None
        parts[part] = run_part(part, runners[part], quiet)

    targets = targets_of(parts)
    print_summary(parts, targets)
    data = {
        "benchmark": NAME,
        "quick": args.quick,
        "environment": environment(),
        "setup": {
            "parts": wanted,
            "image": args.image,
            "model": MODEL,
            "rates_mbit": links.RATES_MBIT,
            "seconds_per_rate": args.seconds,
            "shares": args.shares,
            "sustain_s": args.sustain,
            "scenarios": args.scenarios,
            "algorithms": args.algorithms,
            "tokens_override": args.tokens,
            "capacity_sizes": args.capacity_sizes,
            "capacity_tokens": args.capacity_tokens,
            "settle_s": args.settle,
            "quiet_load": args.quiet_load,
            "goodput": "iperf3 end.sum_received (receiver), vs rate x MSS / (MTU + 14)",
            "compute": "sustained wall time per block vs host profile block time / share",
            "fidelity": "median and p90 over tokens of |measured / predicted - 1|",
        },
        "image": image,
        "load_average_1min": load_span(load_start),
        "wall_s": time.perf_counter() - started,
        "parts": parts,
        "targets": targets,
    }
    write_json(args.out, NAME, data)
    return data


if __name__ == "__main__":
    main()
