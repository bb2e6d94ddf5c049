"""Shared helpers of the benchmark scripts: arguments, statistics, tables, JSON and plots.

Every script takes ``--quick`` (a small run for trying things out), ``--seeds N`` and
``--out DIR`` (default ``out``), prints rich tables, writes ``DIR/<name>.json`` and its
PNG plots under DIR. Speed and quality are measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

# wide enough for the tables when the output is a file or a pipe
console = Console(width=None if sys.stdout.isatty() else 160)


def make_parser(description: str, default_seeds: int, quick_seeds: int) -> argparse.ArgumentParser:
    """An argument parser with the common options; scripts add their own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="a small, fast run (fewer sizes and seeds)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help=f"seeded instances per point (default {default_seeds}; --quick: {quick_seeds})",
    )
    parser.add_argument("--out", type=Path, default=Path("out"), help="output folder (out)")
    parser.set_defaults(default_seeds=default_seeds, quick_seeds=quick_seeds)
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse argv, resolve --seeds against --quick and create the output folder."""
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = args.quick_seeds if args.quick else args.default_seeds
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    return args


# ---------------------------------------------------------------- statistics


def stats(values: Iterable[float]) -> dict[str, float | int | None]:
    """Count, mean, median, p95 and max of the finite values (None where there are none)."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if arr.size == 0:
        return {"count": 0, "mean": None, "median": None, "p95": None, "max": None, "min": None}
    return {
        "count": int(arr.size),
        "mean": float(arr.mean()),
        "median": float(np.median(arr)),
        "p95": float(np.percentile(arr, 95)),
        "max": float(arr.max()),
        "min": float(arr.min()),
    }


def target(name: str, value: float | None, limit: float, op: str = "<=") -> dict[str, Any]:
    """A target line: the measured value, its limit and whether it is met (None: not measured)."""
    if value is None or not math.isfinite(value):
        met = None
    elif op == "<=":
        met = value <= limit
    elif op == ">=":
        met = value >= limit
    else:
        raise ValueError(f"unknown comparison {op!r}")
    return {"target": name, "value": value, "limit": limit, "op": op, "met": met}


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    """fn's result and its wall time (s, perf_counter)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


# ---------------------------------------------------------------- formatting


def pct(v: float | None, digits: int = 2) -> str:
    """A ratio-minus-one as a percentage ('-' when missing)."""
    return "-" if v is None or not math.isfinite(v) else f"{100 * v:.{digits}f}%"


def num(v: float | None, fmt: str = ".3g") -> str:
    """A number with a format ('-' when missing, 'inf' when infinite)."""
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
    return format(v, fmt)


def ms(v: float | None) -> str:
    """Seconds as milliseconds."""
    return "-" if v is None or not math.isfinite(v) else f"{1000 * v:.1f} ms"


def verdict(met: bool | None) -> str:
    """A target's outcome for a table cell."""
    return {True: "[green]met[/]", False: "[red]missed[/]", None: "[yellow]not measured[/]"}[met]


def print_table(
    title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], caption: str | None = None
) -> None:
    """Print one rich table (cells are str()-ed)."""
    table = Table(title=title, caption=caption, title_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(str(c) for c in row))
    console.print(table)


def print_targets(targets: Sequence[dict[str, Any]], fmt=pct) -> None:
    """Print target lines: name, value, limit, verdict."""
    print_table(
        "Targets",
        ["target", "value", "limit", "verdict"],
        [
            (t["target"], fmt(t["value"]), f"{t['op']} {fmt(t['limit'])}", verdict(t["met"]))
            for t in targets
        ],
    )


# ---------------------------------------------------------------- output


def jsonable(x: Any) -> Any:
    """x with numpy types made plain and non-finite floats made None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.bool_ | bool):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, float | np.floating):
        f = float(x)
        return f if math.isfinite(f) else None
    if isinstance(x, Path):
        return str(x)
    return x


def environment() -> dict[str, Any]:
    """Where the numbers were measured."""
    import os

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(out: Path, name: str, data: dict[str, Any]) -> Path:
    """Write DIR/<name>.json (strict JSON: NaN and infinities become null)."""
    path = out / f"{name}.json"
    path.write_text(json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n")
    console.print(f"wrote {path}")
    return path


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
