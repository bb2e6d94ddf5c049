"""edgepart from Python: the command line's work as functions returning typed records.

    import edgepart

    sc = edgepart.load_scenario("scenarios/lan-3.yaml")
    decision = edgepart.plan(sc, "myopic")            # PlanRecord: block -> device
    run = edgepart.simulate(sc, "myopic")             # RunRecord (the cost model's run)
    live = edgepart.emulate(sc, "myopic", backend="local")   # RunRecord (real agents)
    rows = edgepart.sweep("grid.yaml", "out/sweep")   # runs.csv's rows
    frame = edgepart.to_dataframe([run, live])        # one row per run (pandas)

Every function takes a ``Scenario`` or a path; names of algorithms are those of
``--algorithm`` (plugins included). Records are ``edgepart.controller.result.RunRecord``
(``.result`` holds the per-token ``tokens``, ``switches`` and totals; ``.to_json()`` is
``emulate --json``'s object). Errors: ``ScenarioError`` for a bad scenario file (the file
and key in its message), ``KeyError`` for an unknown algorithm, ``NoFeasiblePlacement`` when
nothing fits the devices' memory. Nothing here prints.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edgepart.controller.result import RunRecord
from edgepart.emulator.scenario import Scenario, load_scenario

__all__ = [
    "PlanRecord", "emulate", "load_scenario", "plan", "run_row", "simulate", "sweep",
    "to_dataframe",
]  # fmt: skip


@dataclass(frozen=True)
class PlanRecord:
    """One placement decision from a scenario's initial state."""

    algorithm: str
    placement: dict[str, str]  # block name -> device name, pinned source blocks included
    objective_s: float  # the decision's objective: decode delay until the next re-plan (s)
    solve_s: float  # how long the planner took (s, wall)


def _scenario(scenario: Scenario | str | Path) -> Scenario:
    return scenario if isinstance(scenario, Scenario) else load_scenario(scenario)


def plan(scenario: Scenario | str | Path, algorithm: str = "myopic") -> PlanRecord:
    """The algorithm's placement from the scenario's initial state."""
    from edgepart.controller.placement import make_algorithm
    from edgepart.emulator.backends.sim import first_decision

    sc = _scenario(scenario)
    started = time.perf_counter()
    decision = first_decision(sc, make_algorithm(algorithm))
    took = time.perf_counter() - started
    return PlanRecord(algorithm, decision.mapping, decision.objective_s, took)


def simulate(scenario: Scenario | str | Path, algorithm: str = "myopic") -> RunRecord:
    """The whole generation on the sim backend (cost model, virtual clock, traces)."""
    from edgepart.controller.placement import make_algorithm
    from edgepart.emulator.backends.sim import simulate as run_sim

    return run_sim(_scenario(scenario), make_algorithm(algorithm)).record()


def emulate(
    scenario: Scenario | str | Path,
    algorithm: str = "myopic",
    backend: Literal["sim", "local", "docker"] = "local",
    work_dir: str | Path = "out/api",
    time_dilation: float | None = None,
) -> RunRecord:
    """The generation with real agents (``local``: processes here; ``docker``: containers;
    ``sim``: as ``simulate``). ``time_dilation``: the world k times slower (default: the
    least this host needs, 1 when the devices fit its free cores)."""
    if backend == "sim":
        return simulate(scenario, algorithm)
    if backend == "local":
        from edgepart.emulator.backends.local import run_local

        sc = _scenario(scenario)
        return run_local(sc, algorithm, work_dir=Path(work_dir), time_dilation=time_dilation)
    if backend == "docker":
        from edgepart.emulator.backends.docker import run_docker

        if isinstance(scenario, Scenario):
            raise ValueError("the docker backend runs a scenario file: give its path")
        text = Path(scenario).read_text(encoding="utf-8")
        return run_docker(load_scenario(scenario), text, algorithm, work_dir=Path(work_dir),
                          time_dilation=time_dilation)  # fmt: skip
    raise ValueError(f"backend must be sim, local or docker, got {backend!r}")


def sweep(grid: str | Path, out_dir: str | Path, workers: int | None = None) -> list[dict]:
    """Run a grid file's runs not yet in ``out_dir``/runs.csv (see ``edgepart sweep``);
    every row of runs.csv."""
    from edgepart.controller.placement import algorithm_names
    from edgepart.emulator.sweep import Sweep, load_grid

    return Sweep(load_grid(Path(grid), algorithm_names()), Path(out_dir), workers).run()


def run_row(record: RunRecord) -> dict[str, Any]:
    """A run's numbers as one flat row (runs.csv's columns without the sweep's key)."""
    from edgepart.emulator.sweep import RunKey, run_rows

    key = RunKey("", record.result.algorithm, record.backend, 0, "")
    row, _ = run_rows(key, record, None)
    for column in ("scenario", "repetition", "seed", "host", "ids_match_reference"):
        del row[column]
    return row


def to_dataframe(records: RunRecord | Iterable[RunRecord | dict]) -> Any:
    """One pandas DataFrame row per run (a RunRecord, or a row of ``sweep``); ImportError
    saying what to install when pandas is missing."""
    try:
        import pandas
    except ImportError:
        raise ImportError("to_dataframe needs pandas: pip install pandas") from None
    items = [records] if isinstance(records, RunRecord) else list(records)
    return pandas.DataFrame([r if isinstance(r, dict) else run_row(r) for r in items])
