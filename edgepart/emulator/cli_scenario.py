"""``edgepart scenario``: write a seeded random scenario, check one and summarise it.

- ``new`` draws devices, links and traces with ``edgepart.emulator.generators.random_scenario``
  (the paper's tiers and topologies) and writes a version-1 scenario file; the same
  options and seed write the same file.
- ``check`` validates a file (exit 2 naming the file and the key, as every command does)
  and prints what it asks of a run: devices, the model's memory against theirs, links,
  traces, and the cores of this host its devices need (from the calibrated host profile;
  measured once when none is cached).

Mounted on the main app (``edgepart.controller.cli``); torch is imported only by
``check``'s host fit, and only for a model with weights.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer

from edgepart.emulator.cli_common import JsonOpt, ScenarioArg, err, fail, open_scenario, out
from edgepart.emulator.scenario import MIB, Scenario, ScenarioError

scenario_app = typer.Typer(
    no_args_is_help=True, help="Seeded random scenarios, and checking a scenario file."
)


def _range(text: str, option: str) -> tuple[float, float]:
    """LO-HI (or one value) as two positive numbers, LO <= HI (exit 2 otherwise)."""
    parts = text.split("-")
    try:
        lo, hi = (float(parts[0]), float(parts[-1])) if len(parts) <= 2 else (0.0, -1.0)
    except ValueError:
        lo, hi = 0.0, -1.0
    if not 0 < lo <= hi:
        raise fail(f"{option} {text!r}: give LO-HI (two numbers, 0 < LO <= HI) or one number", 2)
    return lo, hi


def _tiers(text: str) -> tuple[float, float]:
    """CLOUD,REGIONAL fractions of the devices (edge the rest; exit 2 otherwise)."""
    try:
        cloud, regional = (float(x) for x in text.split(","))
    except ValueError:
        raise fail(f"--tiers {text!r}: give CLOUD,REGIONAL fractions, e.g. 0.1,0.3", 2) from None
    if not (0 <= cloud <= 1 and 0 <= regional <= 1 and cloud + regional <= 1):
        raise fail(f"--tiers {text!r}: fractions in [0, 1] that sum to at most 1", 2)
    return cloud, regional


@scenario_app.command()
def new(
    out_file: Annotated[
        Path, typer.Option("--out", "-o", help="The scenario file to write (YAML).")
    ],
    devices: Annotated[
        int | None, typer.Option(min=1, help="Devices in a full mesh (or give --topology).")
    ] = None,
    topology: Annotated[
        str | None,
        typer.Option(help="edge-cluster, distributed-edge or hybrid (their own device count)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Same seed and options: the same file.")] = 0,
    model: Annotated[str, typer.Option(help="A model preset.")] = "smollm2-135m",
    tiers: Annotated[
        str, typer.Option(help="CLOUD,REGIONAL fractions of the devices; edge the rest.")
    ] = "0.1,0.3",
    bandwidth: Annotated[str, typer.Option(help="Link bandwidth range, Mbit/s: LO-HI.")] = (
        "100-1000"
    ),
    latency: Annotated[str, typer.Option(help="Link latency range, ms: LO-HI.")] = "0.2-2",
    traces: Annotated[
        int, typer.Option(min=0, help="Background-load and bandwidth-drop events.")
    ] = 0,
    prompt_tokens: Annotated[int, typer.Option(min=1)] = 32,
    generate_tokens: Annotated[int, typer.Option(min=1)] = 64,
    replan_every: Annotated[int, typer.Option(min=1, help="Tokens between re-plans.")] = 8,
    memory_scale: Annotated[
        float, typer.Option(min=0.0, help="Times every device's drawn memory (tighter < 1).")
    ] = 1.0,
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a seeded random scenario (the paper's device tiers, a full mesh or topology)."""
    from edgepart.emulator.generators import TierProfile, random_scenario

    if (devices is None) == (topology is None):
        raise fail("give --devices N (a full mesh) or --topology NAME, not both", 2)
    if out_file.exists() and not force:
        raise fail(f"--out {out_file}: the file exists (--force overwrites it)", 2)
    cloud, regional = _tiers(tiers)
    try:
        scenario = random_scenario(
            seed, devices, topology, model, prompt_tokens, generate_tokens, replan_every,
            _range(bandwidth, "--bandwidth"), _range(latency, "--latency"), memory_scale,
            "load-and-bandwidth" if traces else "none", trace_events=traces,
            profile=TierProfile(cloud_fraction=cloud, regional_fraction=regional),
        )  # fmt: skip
    except (ValueError, ScenarioError) as exc:
        raise fail(str(exc), 2) from None
    try:
        out_file.write_text(scenario.to_yaml(), encoding="utf-8")
    except OSError as exc:
        raise fail(f"--out {out_file}: {exc.strerror}", 2) from None
    err.print(f"wrote {out_file}: {len(scenario.devices)} devices, {len(scenario.traces)} traces")


@scenario_app.command()
def check(
    scenario: ScenarioArg,
    host: Annotated[
        bool, typer.Option(help="Also fit the devices to this host's cores (calibrates once).")
    ] = True,
    json_: JsonOpt = False,
) -> None:
    """Validate a scenario file and summarise it (exit 2 naming the file and key)."""
    sc = open_scenario(scenario)
    summary = scenario_summary(sc)
    if host:
        summary["host"] = _host_fit(sc)
    if json_:
        out.print_json(json.dumps(summary))
        return
    for key, line in _summary_lines(summary):
        out.print(f"{key:<10} {line}", markup=False, highlight=False)


def scenario_summary(sc: Scenario) -> dict[str, Any]:
    """What a scenario asks of a run (plain values: MiB, GFLOP/s, Mbit/s, ms)."""
    from edgepart.llm.blocks import block_table

    spec = sc.model_spec()
    table = block_table(spec)
    need = float(table.memory_bytes(sc.final_context).sum()) + table.source_weight_bytes
    names = sc.device_names
    pairs = [sc.link(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    return {
        "name": sc.name,
        "model": {"name": spec.name, "layers": spec.layers, "heads": spec.heads,
                  "kv_heads": spec.kv_heads, "d_model": spec.d_model},
        "tokens": {"prompt": sc.prompt_tokens, "generate": sc.generate_tokens,
                   "replan_every": sc.replan_every},
        "devices": len(names),
        "source": sc.source_name,
        "compute_gflops": sum(d.compute_gflops for d in sc.devices),
        "memory_mib": sum(d.memory_mib for d in sc.devices),
        "model_needs_mib": need / MIB,
        "source_pinned_mib": table.source_weight_bytes / MIB,
        "bandwidth_mbit": [min(p[0] for p in pairs), max(p[0] for p in pairs)] if pairs else [],
        "latency_ms": [min(p[1] for p in pairs), max(p[1] for p in pairs)] if pairs else [],
        "traces": dict(Counter(type(t).__name__.removesuffix("Trace").lower()
                               for t in sc.traces)),
    }  # fmt: skip


def _host_fit(sc: Scenario) -> dict[str, Any]:
    """The cores of this host the devices need and the time dilation they would run at."""
    from edgepart.emulator.host_limits import HostTooSmall, fit_scenario, host_cores
    from edgepart.emulator.job import JobError, model_ref

    try:
        ref = model_ref(sc)
    except JobError:
        return {"runs_live": False, "why": "the model is given by shapes: no weights to run"}
    from edgepart.llm.host_profile import host_profile

    profile = host_profile(ref, threads=1, progress=lambda msg: err.print(msg))
    cores = host_cores()
    try:
        fit = fit_scenario(sc, profile.reference_gflops, cores)
    except HostTooSmall as exc:
        return {"runs_live": False, "why": str(exc)}
    return {
        "runs_live": True,
        "cores": cores,
        "free_for_devices": fit.usable_cores,
        "needs_cores": sum(fit.shares.values()),
        "time_dilation": fit.time_dilation,
    }


def _summary_lines(s: dict[str, Any]) -> list[tuple[str, str]]:
    m, t = s["model"], s["tokens"]
    lines = [
        ("scenario", f"{s['name']}: valid"),
        ("model", f"{m['name']}: {m['layers']} layers, {m['heads']} heads in "
                  f"{m['kv_heads']} KV groups, d_model {m['d_model']}"),
        ("tokens", f"prompt {t['prompt']}, generate {t['generate']}, "
                   f"re-plan every {t['replan_every']}"),
        ("devices", f"{s['devices']} (source {s['source']}): {s['compute_gflops']:.1f} "
                    f"GFLOP/s and {s['memory_mib']:.0f} MiB in all"),
        ("memory", f"the model needs {s['model_needs_mib']:.1f} MiB at its last token "
                   f"({100 * s['model_needs_mib'] / s['memory_mib']:.0f} % of the devices'), "
                   f"{s['source_pinned_mib']:.1f} MiB of it on the source"),
    ]  # fmt: skip
    if s["bandwidth_mbit"]:
        (blo, bhi), (llo, lhi) = s["bandwidth_mbit"], s["latency_ms"]
        lines.append(("links", f"{blo:g}-{bhi:g} Mbit/s, {llo:g}-{lhi:g} ms"))
    traces = ", ".join(f"{n} {kind}" for kind, n in sorted(s["traces"].items())) or "none"
    lines.append(("traces", traces))
    h = s.get("host")
    if h is not None and h["runs_live"]:
        k = h["time_dilation"]
        lines.append(("this host", f"the devices need {h['needs_cores']:.2f} cores; "
                                   f"{h['free_for_devices']:.2f} of its {h['cores']:g} are free "
                                   f"for them: time dilation {k:.2f}"))  # fmt: skip
    elif h is not None:
        lines.append(("this host", f"cannot run it live: {h['why']}"))
    return lines
