"""Shared helpers of the benchmarks: arguments, defaults per mode, statistics, tables, JSON.

Every benchmark is a module of this package, run as ``python -m benchmarks.NAME``. Each
takes ``--quick`` (a small run for trying things out), ``--seeds N`` and ``--out DIR``
(default ``out``), prints rich tables, writes ``DIR/<name>.json`` and its PNG plots under
DIR. Speed and quality are measured here, never asserted in tests.

- arguments: ``ByMode`` (a default in a full and in a --quick run) and ``BenchParser``
  (the common options and the script's table of ByMode defaults, applied once by its
  ``parse``: every setting left unset gets its mode's value; ``--threads`` on request);
- the host: ``ROOT`` (the repository), ``repo_path``, ``load1``, ``load_span``,
  ``load_note`` and ``settle`` (the 1-minute load average, which no benchmark controls:
  recorded, shown, or waited on until it is low), ``environment``;
- runs: ``error_text``, ``traceback_text``, ``tokens_per_s``, ``run_numbers`` (a run
  record's speed and moves), ``line_printer`` (status callbacks), ``quiet_cancelled`` (the
  asyncio handler for two data planes in one loop);
- statistics and formatting: ``stats``, ``target``, ``timed``, ``pct``, ``num``, ``ms``,
  ``verdict``, ``print_table``, ``print_targets``;
- output: ``jsonable``, ``write_json``, ``pyplot`` and ``save_figure``.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
from rich.console import Console
from rich.table import Table

# wide enough for the tables when the output is a file or a pipe
console = Console(width=None if sys.stdout.isatty() else 160)

ROOT = Path(__file__).resolve().parent.parent  # the repository (scenarios/ is under it)

T = TypeVar("T")


# ---------------------------------------------------------------- arguments


def _shown(value: Any) -> str:
    """A default as a help text shows it: floats by %g, sequences space-separated."""
    if isinstance(value, list | tuple):
        return " ".join(_shown(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@dataclass(frozen=True)
class ByMode(Generic[T]):
    """A setting's default in a full run and in a ``--quick`` run."""

    full: T
    quick: T

    def pick(self, quick: bool) -> T:
        """The value for the mode (quick: --quick was given)."""
        return self.quick if quick else self.full

    def __str__(self) -> str:
        """For help texts, e.g. ``32; quick 12``."""
        return f"{_shown(self.full)}; quick {_shown(self.quick)}"


class BenchParser(argparse.ArgumentParser):
    """An argument parser with the common options and a table of defaults per mode.

    Options whose default depends on ``--quick`` are added with ``default=None``; ``parse``
    gives every setting of the table that is still None (or that no option sets: settings
    without an option, e.g. the cases a quick run leaves out) its mode's value, once.
    ``seeds`` is always in the table (1 in either mode unless the script says otherwise).
    """

    def __init__(self, name: str, description: str, defaults: Mapping[str, ByMode[Any]]) -> None:
        """The common options of benchmark ``name`` (its module under benchmarks/); defaults
        maps a setting (its ``args`` name) to its values."""
        super().__init__(prog=f"python -m benchmarks.{name}", description=description)
        self.mode_defaults: dict[str, ByMode[Any]] = {"seeds": ByMode(1, 1), **defaults}
        seeds = self.mode_defaults["seeds"]
        self.add_argument(
            "--quick", action="store_true", help="a small, fast run (fewer sizes and seeds)"
        )
        self.add_argument(
            "--seeds",
            type=int,
            default=None,
            help=f"seeded instances per point (default {seeds.full}; --quick: {seeds.quick})",
        )
        self.add_argument("--out", type=Path, default=Path("out"), help="output folder (out)")
        self._sets_threads = False

    def add_threads_option(self, what: str = "torch threads") -> None:
        """``--threads T``: ``parse`` sets torch's thread count to T (default: torch's own)."""
        self.add_argument(
            "--threads", type=int, default=None, help=f"{what} (default: torch.get_num_threads())"
        )
        self._sets_threads = True

    def parse(self, argv: Sequence[str] | None) -> argparse.Namespace:
        """Parse argv, apply the defaults of the mode and create the output folder."""
        args = self.parse_args(argv)
        for name, default in self.mode_defaults.items():
            if getattr(args, name, None) is None:  # a copy: the table outlives this run
                setattr(args, name, copy.copy(default.pick(args.quick)))
        if args.seeds < 1:
            self.error("--seeds must be at least 1")
        if self._sets_threads and args.threads is not None:
            import torch  # here, not at the top: importing common stays light

            torch.set_num_threads(args.threads)
        args.out.mkdir(parents=True, exist_ok=True)
        return args


# ---------------------------------------------------------------- the host


def repo_path(path: str) -> Path:
    """A path as given when it is absolute or exists from here, else under the repository."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else ROOT / p


def load1() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def load_span(start: float) -> dict[str, float]:
    """The 1-minute load average at the start (given) and now, for the JSON."""
    return {"start": start, "end": load1()}


def load_note(start: float) -> str:
    """A table caption's words on the load: not controlled, at the start and now."""
    return (
        f"machine load not controlled (1-min load average {start:.2f} at the start, "
        f"{load1():.2f} now)"
    )


def settle(max_wait_s: float, quiet_load: float) -> dict[str, Any]:
    """Wait up to max_wait_s for the 1-min load average to fall to quiet_load; what happened."""
    start, before = time.monotonic(), load1()
    while max_wait_s > 0 and load1() > quiet_load and time.monotonic() - start < max_wait_s:
        time.sleep(5)
    waited = time.monotonic() - start
    after = load1()
    if waited > 1:
        console.print(
            f"  waited {waited:.0f} s for a quieter host: load {before:.2f} -> {after:.2f}"
        )
    return {"waited_s": waited, "load_before": before, "load_after": after,
            "quiet": after <= quiet_load}  # fmt: skip


def environment() -> dict[str, Any]:
    """Where the numbers were measured."""
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ---------------------------------------------------------------- runs


def error_text(exc: BaseException) -> str:
    """Type and message of an error; an exception group's leaves, each on its own line."""
    if isinstance(exc, BaseExceptionGroup):
        return "\n".join(error_text(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


def traceback_text(exc: BaseException) -> str:
    """The error's traceback as Python prints it."""
    return "".join(traceback.format_exception(exc))


def tokens_per_s(per_token_s: Sequence[float]) -> float | None:
    """Tokens / the sum of their decode times (s); None when there is no time."""
    decode_s = sum(per_token_s)
    return len(per_token_s) / decode_s if decode_s > 0 else None


def monolithic_reference_ids(scenario: Any) -> list[int]:
    """The greedy ids of the whole model on one host for the scenario's prompt and length:
    what every partitioned run must reproduce (a partition must not change the tokens)."""
    from edgepart.emulator.job import reference_ids

    return reference_ids(scenario)


def run_numbers(result: Any) -> dict[str, Any]:
    """A run's speed and moves from its record: tokens/s, total and prefill time (s), migrated
    blocks, migration time (s) and re-plans."""
    return {
        "tokens_per_s": tokens_per_s(result.per_token_s),
        "total_s": result.total_s,
        "prefill_s": result.prefill_s,
        "migrations": result.migrations,
        "migration_s": result.migration_s,
        "replans": result.replans,
    }


def line_printer(indent: str) -> Callable[[str], None]:
    """A status or progress callback that prints each message indented."""
    return lambda message: console.print(f"{indent}{message}")


def quiet_cancelled(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Loop exception handler: drop the CancelledError asyncio's stream callback logs.

    ``DataPlane.close`` cancels its connection readers; on Python 3.11 asyncio's
    StreamReaderProtocol then calls ``exception()`` on the cancelled task in a callback and
    logs the resulting CancelledError with a traceback. Anything else goes to the default.
    """
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


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


def save_figure(fig, path: Path) -> None:
    """Lay the figure out, write it as a PNG (120 dpi), close it and say so."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    console.print(f"wrote {path}")
