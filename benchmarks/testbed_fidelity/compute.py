"""Part 2, ``compute``: a container's CPU share against the host profile.

For each share s (0.25, 0.5, 1.0 cores) a container runs with ``--cpus s`` (docker's CFS
quota: s x 100 ms per 100 ms period), plus 0.25 with a 10 ms period (``--cpu-period 10000
--cpu-quota 2500``) and one without a limit (the host's state right now). Inside it one
Python process (``programs/compute.py``), one torch thread, no agent and so none of the
agent's pacing, opens SmolLM2-135M (float32, every block in one process) and times
its blocks in two ways:

- per pass: ``edgepart.llm.calibration.measure_gflops`` (contexts 32 and 128), the host profile's
  own method: the median of short timed passes (all 30 FFN blocks: about 20 ms at full
  speed; all 90 KV-group blocks: about 12 ms);
- sustained: passes run back to back for ``--sustain`` seconds (many CFS periods), time =
  wall time / blocks run, FFN blocks and KV-group blocks at context 128; the container's
  cgroup ``cpu.stat`` (periods, throttled periods, throttled time) before and after.

Both are compared with what the testbed assumes: the host profile's block time
(``edgepart.llm.host_profile.host_profile(model, threads=1)``, the file the compose project's
``calibrate`` service copies) divided by s. Target: |sustained / expected - 1| <= 15 %
for the FFN and the KV group at every share. A short pass can run entirely inside one
period's quota, so the per-pass medians of a throttled container may show the host's full
speed: that is the CFS period effect the table shows next to the sustained numbers.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.common import ByMode, console, line_printer, load1, pct, print_table
from benchmarks.testbed_fidelity import MODEL
from benchmarks.testbed_fidelity.docker_calls import BenchError, Scratch, call, program_source

DEFAULTS = {
    "shares": ByMode([0.25, 0.5, 1.0], [0.5]),  # cores
    "short_period_row": ByMode(True, False),  # the first share again with a 10 ms period
    "sustain": ByMode(4.0, 1.5),  # s of passes back to back per block type
    "reps": ByMode(15, 8),  # measure_gflops' timed passes
}
SHORT_PERIOD_US = 10_000  # the extra row's CFS period (docker's default: 100 ms)
CONTEXTS = (32, 128)
SUSTAIN_CONTEXT = 128
COMPUTE_TARGET = 0.15
COMPUTE_MEMORY = "1g"
COMPUTE_TIMEOUT_S = 900.0


def _compute_configs(shares: Sequence[float], short_period_row: bool) -> list[dict[str, Any]]:
    configs: list[dict[str, Any]] = [
        {"label": f"{s:g}", "share": s, "period_us": 100_000, "args": ["--cpus", f"{s:g}"]}
        for s in shares
    ]
    if short_period_row:
        s = shares[0]
        configs.append({
            "label": f"{s:g} (10 ms period)", "share": s, "period_us": SHORT_PERIOD_US,
            "args": ["--cpu-period", str(SHORT_PERIOD_US),
                     "--cpu-quota", str(round(s * SHORT_PERIOD_US))],
        })  # fmt: skip
    configs.append({"label": "no limit", "share": None, "period_us": None, "args": []})
    return configs


def run_compute(image: str, scratch: Scratch, config: dict[str, Any], settings: dict) -> dict:
    """One container at one CPU limit running programs/compute.py; its RESULT."""
    name = scratch.name("cpu-" + re.sub(r"[^a-z0-9]+", "-", config["label"]).strip("-"))
    scratch.containers.append(name)
    cmd = [
        "docker", "run", "--rm", "--name", name, "--network", "none", "--memory", COMPUTE_MEMORY,
        *config["args"], "--entrypoint", "python", image,
        "-c", program_source("compute"), json.dumps(settings),
    ]  # fmt: skip
    out = call(cmd, timeout_s=COMPUTE_TIMEOUT_S)
    for line in reversed(out.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise BenchError(f"the compute script printed no result: {out.strip()[-800:]}")


def _row(config: dict[str, Any], timing: dict[str, float], res: dict[str, Any],
         host_ffn_s: float, host_group_s: dict[int, float]) -> dict[str, Any]:  # fmt: skip
    """One container's block times against host profile / share (errors as ratios - 1).

    timing: the container's wall time and the load average before and after it.
    """
    share = config["share"] if config["share"] is not None else 1.0
    expected_ffn = host_ffn_s / share
    expected_group = host_group_s[SUSTAIN_CONTEXT] / share
    sus = res["sustained"]
    ffn_pass = res["per_pass"]["ffn_block_s"]
    group_pass = res["per_pass"]["group_block_s"][str(SUSTAIN_CONTEXT)]
    stat = sus["ffn"]["cpu_stat_delta"]
    return {
        **{k: v for k, v in config.items() if k != "args"},
        "docker_args": config["args"],
        "ok": True,
        **timing,
        "expected_ffn_block_s": expected_ffn,
        "expected_group_block_s": expected_group,
        "ffn_sustained_block_s": sus["ffn"]["block_s"],
        "group_sustained_block_s": sus["group"]["block_s"],
        "ffn_error": sus["ffn"]["block_s"] / expected_ffn - 1.0,
        "group_error": sus["group"]["block_s"] / expected_group - 1.0,
        "ffn_per_pass_block_s": ffn_pass,
        "group_per_pass_block_s": group_pass,
        "ffn_per_pass_error": ffn_pass / expected_ffn - 1.0,
        "group_per_pass_error": group_pass / expected_group - 1.0,
        "ffn_throttled_periods": stat.get("nr_throttled"),
        "ffn_periods": stat.get("nr_periods"),
        "ffn_cpu_fraction": sus["ffn"]["cpu_s"] / sus["ffn"]["wall_s"],
        "group_cpu_fraction": sus["group"]["cpu_s"] / sus["group"]["wall_s"],
        # CPU time per block: the speed per CPU second, whatever share was obtained
        "ffn_cpu_block_s": sus["ffn"]["cpu_s"] / sus["ffn"]["blocks"],
        "ffn_cpu_error": sus["ffn"]["cpu_s"] / sus["ffn"]["blocks"] / host_ffn_s - 1.0,
        "container": res,
    }


def part_compute(image: str, prefix: str, shares: Sequence[float], short_period_row: bool,
                 reps: int, sustain_s: float) -> dict[str, Any]:  # fmt: skip
    """Part 2: block times inside CPU-limited containers against host profile / share."""
    from edgepart.llm.host_profile import cache_path, host_profile

    profile = host_profile(MODEL, threads=1, progress=line_printer("  "))
    settings = {
        "model": MODEL,
        "contexts": list(CONTEXTS),
        "warmup": 2,
        "reps": reps,
        "seconds": sustain_s,
        "sustain_context": SUSTAIN_CONTEXT,
    }
    host_ffn_s = profile.ffn_s
    host_group_s = {n: profile.group_fixed_s + profile.group_per_context_s * n for n in CONTEXTS}
    rows = []
    with Scratch(prefix + "-cpu") as scratch:
        for config in _compute_configs(shares, short_period_row):
            console.print(f"  share {config['label']}: timing blocks in a container")
            load_before = load1()
            t0 = time.perf_counter()
            try:
                res = run_compute(image, scratch, config, settings)
            except BenchError as exc:
                rows.append({**config, "ok": False, "error": str(exc)})
                console.print(f"    [red]failed[/]: {exc}")
                continue
            timing = {"wall_s": time.perf_counter() - t0, "load_before": load_before,
                      "load_after": load1()}  # fmt: skip
            row = _row(config, timing, res, host_ffn_s, host_group_s)
            console.print(
                f"    FFN {1e6 * row['ffn_sustained_block_s']:.0f} us/block sustained "
                f"(expected {1e6 * row['expected_ffn_block_s']:.0f}, "
                f"{pct(row['ffn_error'], 1)}), KV group {pct(row['group_error'], 1)}; "
                f"per-pass median FFN {pct(row['ffn_per_pass_error'], 1)}"
            )
            rows.append(row)
    if scratch.cleanup_errors:
        raise BenchError("cleanup: " + "; ".join(scratch.cleanup_errors))
    return {
        "settings": settings,
        "host_profile": {
            "file": str(cache_path(MODEL, threads=1)),
            "reference_gflops": profile.reference_gflops,
            "ffn_block_s": host_ffn_s,
            "group_block_s": host_group_s,
        },
        "rows": rows,
    }


def print_compute(part: dict[str, Any]) -> None:
    """Part 2's table: sustained and per-pass block times against the expected, per limit."""
    rows = []
    for r in part["rows"]:
        if not r["ok"]:
            rows.append((r["label"], "error", *[""] * 12))
            continue
        met = abs(r["ffn_error"]) <= COMPUTE_TARGET and abs(r["group_error"]) <= COMPUTE_TARGET
        throttled = (
            f"{r['ffn_throttled_periods']}/{r['ffn_periods']}"
            if r["ffn_periods"] is not None
            else "-"
        )
        rows.append((
            r["label"],
            f"{1e6 * r['expected_ffn_block_s']:.0f}",
            f"{1e6 * r['ffn_sustained_block_s']:.0f}",
            pct(r["ffn_error"], 1),
            f"{1e6 * r['expected_group_block_s']:.0f}",
            f"{1e6 * r['group_sustained_block_s']:.0f}",
            pct(r["group_error"], 1),
            "[green]yes[/]" if met else "[red]no[/]",
            pct(r["ffn_per_pass_error"], 1),
            pct(r["group_per_pass_error"], 1),
            throttled,
            f"{r['ffn_cpu_fraction']:.2f}",
            pct(r["ffn_cpu_error"], 1),
            f"{r['load_before']:.1f}",
        ))  # fmt: skip
    hp = part["host_profile"]
    print_table(
        f"Part 2: block times in a CPU-limited container (1 torch thread, no pacing) "
        f"vs host profile / share; KV group at context {SUSTAIN_CONTEXT}",
        [
            "cpu limit",
            "FFN exp us",
            "FFN us",
            "FFN err",
            "group exp us",
            "group us",
            "group err",
            "<= 15%",
            "FFN per-pass err",
            "group per-pass err",
            "throttled",
            "cores got",
            "FFN CPU-s err",
            "load",
        ],
        rows,
        caption=f"host profile: FFN {1e6 * hp['ffn_block_s']:.0f} us, KV group "
        f"{1e6 * hp['group_block_s'][SUSTAIN_CONTEXT]:.0f} us per block at 1 core; sustained: "
        f"passes back to back for {part['settings']['seconds']:g} s; per-pass: "
        "measure_gflops' median pass; throttled: CFS periods throttled / periods during "
        "the sustained FFN run; cores got: CPU time / wall time of that run; FFN CPU-s err: "
        "CPU time per FFN block vs the profile's block time (speed per CPU second); "
        "no limit: compared with the profile at 1 core",
    )
