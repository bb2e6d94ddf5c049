"""Reports of live emulations: the comparison table and per-token latency plots, read from
the runs' records (``edgepart.controller.result.RunRecord``, whatever backend ran them)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from rich.table import Table

from edgepart.controller.result import RunRecord
from edgepart.emulator.scenario import Scenario


def fidelity(run: RunRecord) -> tuple[float, float]:
    """Median and p90 of |measured / predicted - 1| over a run's tokens (ratios)."""
    errors = sorted(
        abs(m / p - 1.0)
        for m, p in zip(run.result.per_token_s, run.result.predicted_per_token_s, strict=True)
        if p > 0
    )
    if not errors:
        return float("nan"), float("nan")
    p90 = errors[min(len(errors) - 1, round(0.9 * (len(errors) - 1)))]
    return statistics.median(errors), p90


def comparison_table(scenario: Scenario, runs: Sequence[RunRecord]) -> Table:
    """One row per algorithm: measured speed, prediction error, migrations, peak memory."""
    best = min(r.result.total_s for r in runs)
    dilation = max(r.result.time_dilation for r in runs)
    table = Table(
        title=f"{scenario.name}: {scenario.generate_tokens} tokens on {len(scenario.devices)} "
        f"devices, {runs[0].backend} backend ({runs[0].isolation}, {runs[0].telemetry} telemetry"
        + (f", time dilation {dilation:.2f}: scenario time)" if dilation > 1 else ")")
    )
    for col in (
        "algorithm",
        "total s",
        "tokens/s",
        "vs best",
        "predicted err (median)",
        "migrated blocks",
        "migration s",
        "re-plans",
        "peak MiB (max device)",
    ):
        table.add_column(col, justify="left" if col == "algorithm" else "right")
    for run in runs:
        r = run.result
        median, _ = fidelity(run)
        tokens = len(r.per_token_s)
        peak = max(r.peak_memory_bytes.values(), default=0.0) / 2**20
        table.add_row(
            r.algorithm,
            f"{r.total_s:.2f}",
            f"{tokens / r.total_s:.2f}" if r.total_s > 0 else "-",
            f"{r.total_s / best:.2f}x",
            f"{100 * median:.0f}%",
            str(r.migrations),
            f"{r.migration_s:.2f}",
            str(r.replans),
            f"{peak:.0f}",
        )
    return table


def save_plots(scenario: Scenario, runs: Sequence[RunRecord], out_dir: Path) -> list[Path]:
    """Per-token latency, measured against predicted, one PNG per run plus an overlay (a
    sim run has one line: the cost model's times are both its prediction and its result)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("plots need matplotlib: pip install 'edgepart[dev]'") from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    traces = [t.at_token for t in scenario.traces if t.at_token is not None]
    # a dilated run's times are scenario time (wall / k)
    unit = "ms, scenario time" if any(r.result.time_dilation > 1 for r in runs) else "ms"
    fig_all, ax_all = plt.subplots(figsize=(9, 4.5))
    for run in runs:
        r = run.result
        xs = list(range(2, 2 + len(r.per_token_s)))
        fig, ax = plt.subplots(figsize=(9, 4.5))
        simulated = run.backend == "sim"
        label = "cost model" if simulated else "measured"
        ax.plot(xs, [1e3 * t for t in r.per_token_s], label=label)
        if not simulated:
            ax.plot(xs, [1e3 * t for t in r.predicted_per_token_s], "--", label="predicted")
        for at in traces:
            ax.axvline(at, color="grey", alpha=0.3)
        ax.set(
            xlabel="generated token",
            ylabel=f"latency ({unit})",
            title=f"{scenario.name}: {r.algorithm}",
        )
        ax.legend()
        path = out_dir / f"latency-{r.algorithm}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
        ax_all.plot(xs, [1e3 * t for t in r.per_token_s], label=r.algorithm)
    for at in traces:
        ax_all.axvline(at, color="grey", alpha=0.3)
    ax_all.set(
        xlabel="generated token",
        ylabel=f"measured latency ({unit})",
        title=f"{scenario.name}: per-token latency (grey: traces)",
    )
    ax_all.legend()
    path = out_dir / "latency.png"
    fig_all.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig_all)
    written.append(path)
    return written


def save_json(runs: Sequence[RunRecord], path: Path) -> Path:
    """The runs' JSON objects in one file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r.to_json() for r in runs], indent=1), encoding="utf-8")
    return path
