"""Part 4, ``capacity``: how many device containers this machine holds.

For N in 8, 16, 24 (stop at the first failure; ``--quick``: 4) a scenario of N devices
running SmolLM2-135M: compute_gflops such that the N CPU shares add up to 1.7 cores (equal
shares; the local backend's check allows 1.75 of 2), memory_mib = 1.5 x the blocks' memory
at the last token / N on every device plus the embedding and LM head on the source, links
1 Gbit/s and 0.3 ms; each container's mem_limit is that plus
``edgepart.emulator.compose.AGENT_RUNTIME_MIB``. A short myopic generation (``--capacity-tokens``,
4) runs through ``run_docker``. Recorded: success (every token generated), start time
(``run.start_s``), wall time, tokens/s, the host's memory in use (MemTotal - MemAvailable
from /proc/meminfo, every 0.5 s: the baseline before and the peak during the run; other
users of the machine count too) and the sum of the project's containers' memory (``docker
stats --no-stream``, every few seconds) at its peak. Target: N >= 16 runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import ByMode, console, num, print_table
from benchmarks.testbed_fidelity import MODEL
from benchmarks.testbed_fidelity.runs import testbed_run
from edgepart.emulator.scenario import MIB

DEFAULTS = {"capacity_sizes": ByMode([8, 16, 24], [4])}
CAPACITY_TOKENS = 4
CAPACITY_TOTAL_SHARE = 1.7  # cores shared by the N devices
CAPACITY_MEMORY_MARGIN = 1.5  # memory_mib = margin x blocks' memory / N
CAPACITY_TARGET = 16
CAPACITY_RUN_S = 1500.0


def capacity_scenario(n: int, reference_gflops: float, tokens: int) -> dict[str, Any]:
    """N equal devices sharing CAPACITY_TOTAL_SHARE cores and 1.5x the model's memory."""
    from edgepart.llm.blocks import block_table
    from edgepart.llm.model import preset

    spec = preset(MODEL)
    prompt = 32
    table = block_table(spec)
    blocks_mib = float(table.memory_bytes(prompt + tokens).sum()) / MIB
    source_mib = table.source_weight_bytes / MIB
    per_device = math.ceil(CAPACITY_MEMORY_MARGIN * blocks_mib / n)
    gflops = round(CAPACITY_TOTAL_SHARE / n * reference_gflops, 4)
    devices = [
        {"name": f"d{i}", "compute_gflops": gflops,
         "memory_mib": per_device + (math.ceil(source_mib) if i == 0 else 0),
         **({"source": True} if i == 0 else {})}
        for i in range(n)
    ]  # fmt: skip
    return {
        "version": 1,
        "name": f"tbf-capacity-{n}",
        "model": {"preset": MODEL},
        "prompt_tokens": prompt,
        "generate_tokens": tokens,
        "replan_every": 8,
        "weights_from": "disk",
        "devices": devices,
        "links": {"default": {"bandwidth_mbit": 1000, "latency_ms": 0.3}},
    }


def part_capacity(image: str, out_dir: Path, tokens: int, sizes: Sequence[int]) -> dict[str, Any]:
    """Part 4: N device containers with a short generation, N growing until one fails."""
    from edgepart.emulator.compose import AGENT_RUNTIME_MIB, mem_limit_mib
    from edgepart.emulator.scenario import parse_scenario
    from edgepart.llm.host_profile import host_profile

    reference = host_profile(MODEL, threads=1).reference_gflops
    rows = []
    for n in sizes:
        data = capacity_scenario(n, reference, tokens)
        scenario = parse_scenario(data, f"capacity-{n}")
        text = yaml.safe_dump(data, sort_keys=False)
        console.rule(f"capacity: {n} device containers, {tokens} tokens")
        run = testbed_run(scenario, text, "myopic", image, out_dir / "docker", CAPACITY_RUN_S,
                          sample_memory=True)  # fmt: skip
        devices = data["devices"]
        run.update(
            devices=n,
            share_per_device=CAPACITY_TOTAL_SHARE / n,
            compute_gflops=devices[0]["compute_gflops"],
            memory_mib=devices[1]["memory_mib"] if n > 1 else devices[0]["memory_mib"],
            source_memory_mib=devices[0]["memory_mib"],
            mem_limit_mib=mem_limit_mib(devices[1]["memory_mib"] if n > 1 else 0),
            mem_limit_total_mib=sum(mem_limit_mib(d["memory_mib"]) for d in devices),
            agent_runtime_mib=AGENT_RUNTIME_MIB,
            generate_tokens=tokens,
        )
        run["success"] = bool(run["ok"] and run.get("complete"))
        mem = run.get("memory", {})
        if run["ok"]:
            console.print(
                f"  {run['tokens']} tokens, start {run['start_s']:.1f} s, wall "
                f"{run['wall_s']:.0f} s, host memory peak {mem.get('host_used_peak_mib', 0):.0f}"
                f" MiB (+{mem.get('host_used_increase_mib', 0):.0f}), containers "
                f"{mem.get('containers_peak_sum_mib', 0):.0f} MiB"
            )
        else:
            console.print(f"  [red]failed[/]: {run['error'][:600]}")
        rows.append(run)
        if not run["success"]:
            break
    held = [r["devices"] for r in rows if r["success"]]
    return {"sizes": list(sizes), "tokens": tokens, "total_share": CAPACITY_TOTAL_SHARE,
            "rows": rows, "max_devices": max(held, default=0)}  # fmt: skip


def print_capacity(part: dict[str, Any]) -> None:
    """Part 4's table: per N, success, start and wall time, memory on the host."""
    rows = []
    for r in part["rows"]:
        mem = r.get("memory", {})
        rows.append((
            r["devices"],
            f"{r['share_per_device']:.3f}",
            f"{r['memory_mib']} ({r['source_memory_mib']})",
            f"{r['mem_limit_total_mib'] / 1024:.1f}",
            "[green]yes[/]" if r["success"] else "[red]no[/]",
            f"{r['tokens']}/{r['generate_tokens'] - 1}" if r["ok"] else "-",
            f"{r['start_s']:.1f}" if r["ok"] else "-",
            f"{r['wall_s']:.0f}",
            num(r.get("tokens_per_s"), ".2f"),
            f"{mem.get('host_used_baseline_mib', 0) / 1024:.1f}",
            f"{mem.get('host_used_peak_mib', 0) / 1024:.1f}",
            f"{mem.get('containers_peak_sum_mib', 0) / 1024:.1f}",
            num(mem.get("agent_peak_max_mib"), ".0f"),
            f"{r['load_before']:.1f}",
        ))  # fmt: skip
    print_table(
        f"Part 4: device containers on this host (SmolLM2-135M, shares adding up to "
        f"{part['total_share']:g} cores, myopic, {part['tokens']} tokens)",
        [
            "devices",
            "cores each",
            "memory_mib (source)",
            "mem_limit sum GiB",
            "ok",
            "tokens",
            "start s",
            "wall s",
            "tokens/s",
            "host used before GiB",
            "host used peak GiB",
            "containers peak GiB",
            "agent peak MiB",
            "load",
        ],
        rows,
        caption="host used: MemTotal - MemAvailable (every other process included); "
        "containers: the project's containers in docker stats, summed, at the peak sample; "
        "agent peak: the largest device container",
    )
