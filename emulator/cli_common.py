"""What every ``edgepart`` command shares: its consoles, its options and its exits.

- ``out`` (stdout) and ``err`` (stderr, progress and problems) consoles.
- ``fail``: print ``error: <message>`` on stderr and give the ``typer.Exit`` to raise; exit
  codes: 0 done, 1 runtime failure, 2 bad input (the message names the cause).
- ``open_scenario``, ``check_algorithm``, ``load_broker_auth``: the checks of the common options,
  each exiting 2 with the problem.
- The options' types: ``ScenarioArg``, ``AlgorithmOpt``, ``JsonOpt``, ``BrokerAuthOpt``,
  ``RoleDilationOpt``; ``dilation_note``: the line that says a run was time-dilated.

The main app (``controller.cli``) and the testbed sub-app (``emulator.cli``) both use it;
importing it is cheap (no backend, no torch).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from controller.placement import ALGORITHMS, PlacementAlgorithm, make_algorithm
from emulator.scenario import Scenario, ScenarioError, load_scenario

# wide enough for the comparison table when piped (make demo, CI logs)
out = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True)

ScenarioArg = Annotated[Path, typer.Argument(help="Scenario file (YAML, version 1).")]
AlgorithmOpt = Annotated[
    str, typer.Option("--algorithm", "-a", help=f"One of: {', '.join(ALGORITHMS)}.")
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
    """The line that says every time shown is scenario time (empty at k = 1)."""
    k = time_dilation
    if k <= 1.0:
        return ""
    return (
        f"this host runs the scenario {k:.2f}x slower than real time (time dilation "
        f"{k:.2f}): every time below is scenario time"
    )


def fail(message: str, code: int) -> typer.Exit:
    """Print the problem on stderr; the exit to raise (1 runtime failure, 2 bad input)."""
    err.print("[bold red]error:[/]", end=" ")
    err.print(message, markup=False, highlight=False)
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


def load_broker_auth(path: Path | None):
    """The credentials of a --broker-auth file (exit 2 naming the file when unusable)."""
    from control_plane.mqtt import load_auth

    try:
        return load_auth(path)
    except ValueError as exc:
        raise fail(f"--broker-auth {exc}", 2) from None
