"""``edgepart sweep GRID.yaml --out DIR``: a grid of runs into tidy CSV, a summary, plots.

The grid and the files are ``edgepart.emulator.sweep``'s; here: checking the grid and its
scenarios before the first run (exit 2 naming the file and key), live progress on stderr,
the summary table (each algorithm's total against the best static split's, median and
spread over the repetitions) and, with matplotlib, two plots per scenario and backend:
per-token latency with the traces marked, and the relative totals as box plots.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgepart.emulator.cli_common import err, fail, out
from edgepart.emulator.scenario import ScenarioError


def sweep_command(
    grid_file: Annotated[Path, typer.Argument(metavar="GRID", help="The grid (YAML).")],
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder of runs.csv, tokens.csv and the plots.")
    ],
    workers: Annotated[
        int | None, typer.Option(min=1, help="Parallel sim runs (default: this host's cores).")
    ] = None,
) -> None:
    """Scenarios x algorithms x backends x repetitions into runs.csv and tokens.csv
    (resumable: runs already in runs.csv are skipped), a summary and plots."""
    from edgepart.controller.placement import algorithm_names
    from edgepart.emulator.sweep import GridError, Sweep, load_grid

    if out_dir.exists() and not out_dir.is_dir():
        raise fail(f"--out {out_dir}: not a folder", 2)
    try:
        grid = load_grid(grid_file, algorithm_names())
        scenarios = {s.name: s.load() for s in grid.scenarios}  # every one valid before a run
    except (GridError, ScenarioError, ValueError) as exc:
        raise fail(str(exc), 2) from None
    sweep = Sweep(grid, out_dir, workers)
    pending = sweep.pending()
    err.print(f"{len(pending)} runs to go in {out_dir}", highlight=False)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[last]}"), TimeElapsedColumn(), console=err,
    ) as bar:  # fmt: skip
        task = bar.add_task("sweep", total=len(pending), last="")

        def done(key, row) -> None:
            last = f"{key.scenario} {key.algorithm} {key.backend} #{key.repetition}"
            bar.update(task, advance=1, last=f"{last}: {float(row['total_s']):.2f} s")

        try:
            rows = sweep.run(done)
        except GridError as exc:
            raise fail(str(exc), 2) from None
    out.print(summary_table(rows))
    written = _plots(rows, sweep.tokens_csv, scenarios, out_dir)
    err.print("wrote " + ", ".join(str(p) for p in [sweep.runs_csv, sweep.tokens_csv, *written]))


def summary_table(rows: list[dict]) -> Table:
    """Per scenario and backend: each algorithm's median total and its total against the
    best static split's (median, min-max over the repetitions)."""
    from edgepart.emulator.sweep import relative_totals

    ratios = relative_totals(rows)
    totals: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for row in rows:
        totals[(row["scenario"], row["backend"], row["algorithm"])].append(float(row["total_s"]))
    table = Table(title="sweep: total time against the best static split")
    for column in ("scenario", "backend", "algorithm", "runs", "total s", "vs best static"):
        table.add_column(column, justify="left" if column in {"scenario", "algorithm"} else "right")
    for (scenario, backend, algorithm), values in sorted(totals.items()):
        ratio = ratios.get((scenario, backend), {}).get(algorithm)
        relative = "-" if ratio is None else (
            f"{statistics.median(ratio):.2f} ({min(ratio):.2f}-{max(ratio):.2f})"
        )  # fmt: skip
        table.add_row(scenario, backend, algorithm, str(len(values)),
                      f"{statistics.median(values):.3f}", relative)  # fmt: skip
    return table


def _plots(rows: list[dict], tokens_csv: Path, scenarios: dict, out_dir: Path) -> list[Path]:
    """Latency per token (repetition 0) and relative totals per scenario and backend (PNG);
    none without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        err.print("no plots: they need matplotlib (pip install 'edgepart[dev]')")
        return []
    from edgepart.emulator.sweep import read_rows, relative_totals

    series: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in read_rows(tokens_csv):
        if row["repetition"] == "0":
            series[(row["scenario"], row["backend"])][row["algorithm"]].append(
                1e3 * float(row["measured_s"])
            )
    ratios = relative_totals(rows)
    written = []
    for (scenario, backend), by_algo in sorted(series.items()):
        fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
        for algorithm, ms in by_algo.items():
            left.plot(range(1, len(ms) + 1), ms, label=algorithm)
        for trace in scenarios[scenario].traces:
            if trace.at_token is not None:
                left.axvline(trace.at_token, color="grey", alpha=0.3)
        left.set(xlabel="generated token", ylabel="latency (ms)", title=f"{scenario} ({backend})")
        left.legend()
        relative = ratios.get((scenario, backend), {})
        if relative:
            right.boxplot(list(relative.values()), tick_labels=list(relative))
            right.tick_params(axis="x", labelrotation=20)
            right.axhline(1.0, color="grey", alpha=0.5)
        right.set(ylabel="total / best static total", title="over the repetitions")
        path = out_dir / f"{scenario}-{backend}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
