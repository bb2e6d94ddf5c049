"""What every ``edgepart`` command shares: its consoles, its options and its exits.

- ``out`` (stdout) and ``err`` (stderr, progress and problems) consoles.
- ``fail``: print ``error: <message>`` on stderr and give the ``typer.Exit`` to raise; exit
  codes: 0 done, 1 runtime failure, 2 bad input (the message names the cause).
- ``open_scenario``, ``check_algorithms``, ``check_one_algorithm``, ``check_out_dir``,
  ``load_broker_auth``: the checks of the common options, each exiting 2 with the problem.
- The options' types: ``ScenarioArg``, ``AlgorithmOpt`` (``-a/--algorithm``, a comma list),
  ``JsonOpt``, ``BrokerAuthOpt``, ``TelemetryOpt``, ``RoleDilationOpt``; ``dilation_note``:
  the line that says a run was time-dilated. Every output folder is ``--out``.

The main app (``edgepart.controller.cli``) and the testbed sub-app (``edgepart.emulator.cli``) both
use it; importing it is cheap (no backend, no torch).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console

from edgepart.controller.placement import (
    PlacementAlgorithm,
    PluginError,
    algorithm_names,
    make_algorithm,
)
from edgepart.emulator.scenario import Scenario, ScenarioError, load_scenario

# wide enough for the comparison table when piped (make demo, CI logs)
out = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True)

ScenarioArg = Annotated[Path, typer.Argument(help="Scenario file (YAML, version 1).")]
AlgorithmOpt = Annotated[
    str,
    typer.Option(
        "--algorithm",
        "-a",
        help=f"One or several, comma-separated, of: {', '.join(algorithm_names())}.",
    ),
]
Telemetry = Literal["measured", "configured"]
TelemetryOpt = Annotated[
    Telemetry,
    typer.Option(
        help="What the planner sees: the agents' measured telemetry, or the scenario's "
        "configured values (traces included)."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
BrokerAuthOpt = Annotated[
    Path | None,
    typer.Option(
        help="File with this role's broker credentials (JSON, written by `testbed render`; "
        "default: anonymous)."
    ),
]

#: the time dilation a testbed role (controller, driver) is told by the emulator
RoleDilationOpt = Annotated[
    float,
    typer.Option(
        "--time-dilation",
        min=1.0,
        metavar="K",
        help="The emulator runs the world K times slower than the scenario: timeouts are K "
        "times longer, times are reported in scenario time (wall / K).",
    ),
]


def dilation_note(time_dilation: float) -> str:
    """The line that says which time dilation a live run used, and so what its times are."""
    k = time_dilation
    if k <= 1.0:
        return "time dilation 1: this host fits the scenario's devices, times are real time"
    return (
        f"this host runs the scenario {k:.2f}x slower than real time (time dilation "
        f"{k:.2f}): every time below is scenario time"
    )


def fail(message: str, code: int) -> typer.Exit:
    """Print the problem on stderr; the exit to raise (1 runtime failure, 2 bad input)."""
    err.print("[bold red]error:[/]", end=" ")
    # soft_wrap: one line however long, for logs and for scripts that read the last line
    err.print(message, markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def open_scenario(path: Path) -> Scenario:
    """The scenario of a file (exit 2 naming the file, the key path and why)."""
    try:
        return load_scenario(path)
    except ScenarioError as exc:
        raise fail(str(exc), 2) from None


def check_algorithm(name: str) -> PlacementAlgorithm:
    """The placement algorithm of a name (exit 2 listing the known ones)."""
    try:
        return make_algorithm(name)
    except KeyError as exc:
        raise fail(str(exc.args[0]), 2) from None
    except PluginError as exc:
        raise fail(str(exc), 2) from None


def check_algorithms(text: str) -> list[str]:
    """The names of a comma-separated --algorithm (exit 2 for none or an unknown one)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        known = ", ".join(algorithm_names())
        raise fail(f"--algorithm {text!r} names no algorithm; known: {known}", 2)
    for name in names:
        check_algorithm(name)
    return names


def check_one_algorithm(text: str, command: str) -> str:
    """The one algorithm name of a command that runs one at a time (exit 2 for a list)."""
    names = check_algorithms(text)
    if len(names) > 1:
        raise fail(
            f"--algorithm {text!r}: `{command}` runs one algorithm at a time; to compare "
            "several, use `edgepart emulate -a A,B` or `edgepart compare -a A,B`",
            2,
        )
    return names[0]


def check_out_dir(path: Path, option: str = "--out") -> Path:
    """A folder to write into (exit 2 when it, or a folder above it, is a file, or when the
    nearest existing folder is not writable). Checked before any work is done."""
    for existing in (path, *path.parents):
        if not existing.exists():
            continue
        if not existing.is_dir():
            raise fail(f"{option} {path}: {existing} is a file, not a folder", 2)
        if not os.access(existing, os.W_OK | os.X_OK):
            raise fail(f"{option} {path}: {existing} is not writable", 2)
        break
    return path


def load_broker_auth(path: Path | None):
    """The credentials of a --broker-auth file (exit 2 naming the file when unusable)."""
    from edgepart.control_plane.mqtt import load_auth

    try:
        return load_auth(path)
    except ValueError as exc:
        raise fail(f"--broker-auth {exc}", 2) from None
