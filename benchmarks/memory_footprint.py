"""Memory footprint: peak RSS of a process holding a quarter of SmolLM2's blocks against all.

Each case runs in a fresh Python subprocess that imports torch and llm, opens the
``smollm2-135m`` preset GGUF (``edgepart.llm.files.resolve_model`` + ``edgepart.llm.gguf_source.
open_gguf_model``: the memory-mapped tensor source and the architecture; a device holding
blocks needs no tokenizer, so none is loaded) and loads, on one ``BlockHost`` in float32:

- ``none``: nothing (the baseline: interpreter, torch, the open file);
- ``quarter``: what device d0 of a 4-device head-spread placement holds: the KV groups
  dealt round-robin over the 4 devices layer by layer (block (layer, group) goes to device
  (layer * kv_heads + group) mod 4, as in the execution tests) and layer l's projection
  and FFN on device l mod 4; about a quarter of every block type, no embedding or head;
- ``layers``: all 150 placeable blocks (every layer), no embedding or head;
- ``all``: every block, embedding and LM head too (the monolithic process).

Reported per case: the process's peak RSS (/proc/self/status VmHWM, the high-water mark
of the subprocess's own address space: the larger of the mark just after opening and the
mark at the end), the peak since the file was opened (VmHWM at the end after resetting
it through /proc/self/clear_refs once the file is open, where the kernel allows it),
getrusage's ru_maxrss only for the record (Linux carries the parent's high-water mark into
a child across fork/exec, so in a child of a big process, e.g. a test run, it is the
parent's size rather than the child's; off Linux it is the only measure), the RSS at the end
split into anonymous memory and file-backed pages (shared libraries and the GGUF map), and
the weight bytes the host holds. The headline ratio is (quarter - none) / (all - none) of
the peak RSS, with (quarter - none) / (layers - none) beside it as the like-for-like one
(neither holds the source's embedding). Other processes barely change these numbers (unlike
times); file-backed pages count once this process has touched them.

Run: ``.venv/bin/python -m benchmarks.memory_footprint [--quick] [--jobs J] [--out DIR]``
(--quick leaves out the ``layers`` case; J probe processes at a time, default 2).
Writes DIR/memory_footprint.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks.common import (
    ROOT,
    BenchParser,
    ByMode,
    console,
    environment,
    num,
    print_table,
    write_json,
)

NAME = "memory_footprint"
MODEL = "smollm2-135m"
CASES = ("none", "quarter", "layers", "all")
DEFAULTS = {"cases": ByMode(CASES, ("none", "quarter", "all"))}
DEVICES = 4
PROBE_TIMEOUT_S = 300


def quarter_blocks(spec) -> list[str]:
    """Blocks device d0 holds in the 4-device head-spread placement (see the docstring)."""
    from edgepart.llm.blocks import block_table
    from edgepart.llm.torch_blocks import parse_block_name

    out = []
    for name in block_table(spec).names:
        b = parse_block_name(name)
        index = b.layer * spec.kv_heads + b.group if b.kind == "group" else b.layer
        if index % DEVICES == 0:
            out.append(name)
    return out


def case_blocks(case: str, spec) -> list[str]:
    """Block names a case loads, embedding before head (so a tied head shares its matrix)."""
    from edgepart.llm.blocks import PINNED_BLOCKS, block_table

    if case == "none":
        return []
    if case == "quarter":
        return quarter_blocks(spec)
    names = list(block_table(spec).names)
    if case == "layers":
        return names
    if case == "all":
        return [*PINNED_BLOCKS, *names]
    raise ValueError(f"unknown case {case!r}; known: {', '.join(CASES)}")


def _status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile of this process in bytes (empty off Linux)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    s = _status()
    return bool(s) and s["VmHWM"] == s["VmRSS"]


def probe(case: str) -> dict[str, Any]:
    """In this (fresh) process: open the model, load the case's blocks, measure memory."""
    import gc
    import resource

    from edgepart.llm.blocks import block_table
    from edgepart.llm.files import resolve_model
    from edgepart.llm.gguf_source import open_gguf_model
    from edgepart.llm.runtime import BlockHost

    file = resolve_model(MODEL)
    source, arch = open_gguf_model(file.path)
    opened = _status()  # VmHWM here: the peak while importing and opening
    reset = _reset_peak()
    names = case_blocks(case, arch.spec)
    host = BlockHost("d0", source, arch)
    for name in names:
        host.load(name)
    gc.collect()
    end = _status()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    maxrss *= 1 if sys.platform == "darwin" else 1024  # KiB on Linux
    table = block_table(arch.spec)
    formula = sum(
        float(table.weight_bytes[table.index(n)]) for n in names if n not in ("embed", "head")
    )
    if "embed" in names:
        formula += table.source_weight_bytes
    return {
        "case": case,
        "blocks": len(names),
        "block_names": names,
        "weight_bytes": host.weight_bytes(),
        "weight_bytes_formula": formula,
        "loaded_elements": sum(b.loaded_elements for b in host.blocks.values()),
        "peak_rss_bytes": max(opened["VmHWM"], end["VmHWM"]) if end else maxrss,
        "ru_maxrss_bytes": maxrss,
        "opened_rss_bytes": opened.get("VmRSS"),
        "peak_since_open_bytes": end.get("VmHWM") if reset else None,
        "peak_reset": reset,
        "end_rss_bytes": end.get("VmRSS"),
        "end_anon_bytes": end.get("RssAnon"),
        "end_file_bytes": end.get("RssFile"),
        "file_bytes": file.path.stat().st_size,
    }


def run_probe(case: str) -> dict[str, Any]:
    """Run probe(case) in a fresh interpreter (this module, from the repository); its JSON."""
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{NAME}", "--probe", case],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT_S,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {case!r} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratio(results: dict[str, dict[str, Any]], key: str, part: str, whole: str) -> float | None:
    """(part - none) / (whole - none) of one measure (None where it is missing)."""
    if part not in results or whole not in results:
        return None
    base = results["none"].get(key)
    a, b = results[part].get(key), results[whole].get(key)
    if base is None or a is None or b is None or b == base:
        return None
    return (a - base) / (b - base)


def to_mib(v: float | None) -> float | None:
    """Bytes as MiB (None stays None).

    MIB is imported here rather than at the top: the probe processes import this module,
    and edgepart.emulator.scenario would add pydantic to the memory they measure.
    """
    from edgepart.emulator.scenario import MIB

    return None if v is None else v / MIB


def mib(v: float | None) -> str:
    """Bytes as MiB ('-' when missing)."""
    return "-" if v is None else f"{to_mib(v):.1f}"


def run_cases(cases: tuple[str, ...], jobs: int) -> dict[str, dict[str, Any]]:
    """Every case's probe, jobs at a time, in the order of cases; each said on the console."""
    console.rule(f"{MODEL}: one fresh process per case")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        done = dict(zip(cases, pool.map(run_probe, cases), strict=True))
    results: dict[str, dict[str, Any]] = {}
    for case in cases:
        r = results[case] = done[case]
        console.print(
            f"  {case}: {r['blocks']} blocks, {mib(r['weight_bytes'])} MiB of weights, "
            f"peak RSS {mib(r['peak_rss_bytes'])} MiB"
        )
    return results


def print_memory(results: dict[str, dict[str, Any]], ratios: dict[str, Any]) -> None:
    """The memory of each case, then the quarter's share of each measure."""
    print_table(
        f"{MODEL} memory per process (MiB; float32 blocks)",
        ["case", "blocks", "weights", "peak RSS", "peak since open", "RSS at end",
         "anonymous", "file-backed"],
        [
            (c, r["blocks"], mib(r["weight_bytes"]), mib(r["peak_rss_bytes"]),
             mib(r["peak_since_open_bytes"]), mib(r["end_rss_bytes"]), mib(r["end_anon_bytes"]),
             mib(r["end_file_bytes"]))
            for c, r in results.items()
        ],
        caption="peak RSS = VmHWM of the fresh process; file-backed = touched pages of "
        "shared libraries and of the memory-mapped GGUF",
    )  # fmt: skip
    print_table(
        "quarter (device d0 of 4, head-spread) against all blocks, baseline 'none' subtracted",
        ["measure", "(quarter-none)/(all-none)", "(quarter-none)/(layers-none)"],
        [
            (name, num(r["quarter_vs_all"], ".3f"), num(r["quarter_vs_layers"], ".3f"))
            for name, r in ratios.items()
        ],
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what it writes to DIR/memory_footprint.json."""
    if argv is None:
        argv = sys.argv[1:]
    if len(argv) == 2 and argv[0] == "--probe":
        result = probe(argv[1])
        print(json.dumps(result))
        return result
    parser = BenchParser(NAME, __doc__.splitlines()[0], DEFAULTS)
    parser.add_argument(
        "--jobs", type=int, default=2, help="probe processes run at the same time (2)"
    )
    args = parser.parse(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    cases = args.cases
    results = run_cases(cases, args.jobs)

    measures = {
        "peak_rss": "peak_rss_bytes",
        "peak_since_open": "peak_since_open_bytes",
        "end_rss": "end_rss_bytes",
        "end_anon": "end_anon_bytes",
        "weights": "weight_bytes",
    }
    ratios = {
        name: {
            "quarter_vs_all": ratio(results, key, "quarter", "all"),
            "quarter_vs_layers": ratio(results, key, "quarter", "layers"),
        }
        for name, key in measures.items()
    }
    # Weight bytes have no baseline to subtract: it holds none.
    print_memory(results, ratios)
    headline = ratios["peak_rss"]["quarter_vs_all"]
    console.print(
        f"peak RSS ratio (quarter - none) / (all - none): [bold]{num(headline, '.3f')}[/]"
    )

    data = {
        "benchmark": NAME,
        "quick": args.quick,
        "environment": environment(),
        "setup": {
            "model": MODEL,
            "dtype": "float32",
            "cases": list(cases),
            "quarter": "device d0 of 4: KV group (l, g) where (l*kv_heads+g) % 4 == 0, "
            "projection and FFN of layers l % 4 == 0",
            "opened_with": "resolve_model + open_gguf_model (memory-mapped), no tokenizer",
            "peak_rss": "/proc/self/status VmHWM of a fresh subprocess (max of the mark after "
            "opening and at the end); ru_maxrss recorded but inherits the parent's mark",
        },
        "cases": {
            c: {
                **{k: v for k, v in r.items() if k != "block_names"},
                **{f"{k.removesuffix('_bytes')}_mib": to_mib(v)
                   for k, v in r.items() if k.endswith("_bytes")},
            }
            for c, r in results.items()
        },
        "quarter_blocks": results["quarter"]["block_names"],
        "ratios": ratios,
        "ratio": headline,
    }
    write_json(args.out, NAME, data)
    return data


if __name__ == "__main__":
    main()
