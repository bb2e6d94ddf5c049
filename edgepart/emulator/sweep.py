"""Experiments as a grid: scenarios x algorithms x backends x repetitions, into tidy CSV.

A grid file (YAML)::

    scenarios:                      # files (relative to the grid file) or generator specs
      - scenarios/demo.yaml
      - generate: {devices: 5, traces: 3, generate_tokens: 32}   # one scenario per seed
    algorithms: [myopic, edgeshard, static-heads]
    backends: [sim, local]          # default [sim]
    repetitions: 3                  # default 1
    seeds: [1, 2]                   # the generator specs' seeds; default [0]

``run_plan`` orders the runs: repetition by repetition, each scenario's algorithms in the
grid's order on even repetitions and reversed on odd ones (so no algorithm always runs
first on a warm or cold host). ``Sweep`` runs what ``runs.csv`` in its folder does not hold
yet (an interrupted sweep resumes where it stopped; each run is written once): sim runs
in parallel processes, live ones one at a time. Each finished run appends its tokens to
``tokens.csv`` and then its row to ``runs.csv`` (``RUN_COLUMNS``, ``TOKEN_COLUMNS``;
``wall_s`` is the whole run's wall time, a live run's start-up and teardown included).
``relative_totals`` is the summary: each algorithm's total against the best static split's.
"""

from __future__ import annotations

import csv
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from edgepart.controller.result import RunRecord
from edgepart.emulator.scenario import Scenario, load_scenario

RUN_COLUMNS = (
    "scenario", "algorithm", "backend", "repetition", "seed", "host", "time_dilation",
    "total_s", "decode_s", "stall_s", "tokens_per_s", "migrations", "moved_bytes",
    "peak_memory_bytes", "median_prediction_error", "ids_match_reference", "wall_s",
)  # fmt: skip
TOKEN_COLUMNS = (
    "scenario", "algorithm", "backend", "repetition", "seed",
    "token", "measured_s", "predicted_s", "epoch", "stall_s",
)  # fmt: skip
KEY_COLUMNS = RUN_COLUMNS[:5]
BACKENDS = ("sim", "local", "docker")
#: what the summary compares every algorithm against: the best of these (static splits)
STATIC = ("static-heads", "edgeshard", "memory-proportional")

__all__ = ["RUN_COLUMNS", "TOKEN_COLUMNS", "Grid", "GridError", "RunKey", "Sweep",
           "load_grid", "relative_totals", "run_plan"]  # fmt: skip


class GridError(ValueError):
    """A grid file that cannot be run; the message names the file and the key."""


@dataclass(frozen=True)
class GridScenario:
    """One scenario of a grid: a file, or generator options with the seed drawn."""

    name: str
    path: Path | None = None
    generate: tuple[tuple[str, Any], ...] = ()
    seed: int | None = None

    def load(self) -> Scenario:
        """The scenario (read from its file, or generated from its seed)."""
        if self.path is not None:
            return load_scenario(self.path)
        from edgepart.emulator.generators import random_scenario

        options = dict(self.generate)
        if "traces" in options:  # a count of events, as `edgepart scenario new --traces`
            count = int(options.pop("traces"))
            options.update(traces="load-and-bandwidth" if count else "none", trace_events=count)
        return random_scenario(self.seed or 0, name=self.name, **options)


@dataclass(frozen=True)
class Grid:
    """What a sweep runs (see the module's docstring)."""

    scenarios: tuple[GridScenario, ...]
    algorithms: tuple[str, ...]
    backends: tuple[str, ...] = ("sim",)
    repetitions: int = 1


@dataclass(frozen=True)
class RunKey:
    """One run of a sweep: what identifies its rows in the CSV files."""

    scenario: str
    algorithm: str
    backend: str
    repetition: int
    seed: str  # the generator's seed, "" for a scenario file

    def row(self) -> dict[str, Any]:
        """The key's columns (KEY_COLUMNS)."""
        return dict(zip(KEY_COLUMNS, (self.scenario, self.algorithm, self.backend,
                                      self.repetition, self.seed), strict=True))  # fmt: skip


def load_grid(path: Path, known_algorithms: Iterable[str]) -> Grid:
    """The grid of a YAML file; GridError naming the file and the key of what is wrong."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise GridError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise GridError(f"{path}: a grid is a mapping with scenarios and algorithms")
    unknown = set(data) - {"scenarios", "algorithms", "backends", "repetitions", "seeds"}
    if unknown:
        raise GridError(f"{path}: {', '.join(sorted(unknown))}: unknown key")
    algorithms = _names(path, data, "algorithms", set(known_algorithms))
    backends = _names(path, data, "backends", set(BACKENDS), default=["sim"])
    repetitions = data.get("repetitions", 1)
    if not isinstance(repetitions, int) or repetitions < 1:
        raise GridError(f"{path}: repetitions: a whole number >= 1, got {repetitions!r}")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds) or not seeds:
        raise GridError(f"{path}: seeds: a list of whole numbers, got {seeds!r}")
    entries = data.get("scenarios")
    if not isinstance(entries, list) or not entries:
        raise GridError(f"{path}: scenarios: a list of scenario files or generator specs")
    scenarios = [s for i, e in enumerate(entries) for s in _scenarios(path, i, e, seeds)]
    names = [s.name for s in scenarios]
    if len(set(names)) != len(names):
        raise GridError(f"{path}: scenarios: two scenarios are named alike: {names}")
    return Grid(tuple(scenarios), tuple(algorithms), tuple(backends), repetitions)


def _names(path: Path, data: dict, key: str, known: set[str], default=None) -> list[str]:
    names = data.get(key, default)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise GridError(f"{path}: {key}: a list of names, got {names!r}")
    bad = [n for n in names if n not in known]
    if bad:
        raise GridError(
            f"{path}: {key}: unknown {', '.join(bad)}; known: {', '.join(sorted(known))}"
        )
    return names


def _scenarios(path: Path, i: int, entry: Any, seeds: list[int]) -> list[GridScenario]:
    if isinstance(entry, str):
        file = (path.parent / entry).resolve()
        if not file.is_file():
            raise GridError(f"{path}: scenarios[{i}]: no such file {file}")
        return [GridScenario(file.stem, path=file)]
    if (
        isinstance(entry, dict)
        and set(entry) == {"generate"}
        and isinstance(entry["generate"], dict)
    ):
        options = entry["generate"]
        spec = "-".join(f"{k}{v}" for k, v in sorted(options.items()))
        stem = "gen-" + re.sub(r"[^A-Za-z0-9._-]+", "_", spec)  # a file name: plots use it
        options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
        return [GridScenario(f"{stem}-s{seed}", generate=tuple(sorted(options.items())),
                             seed=seed) for seed in seeds]  # fmt: skip
    raise GridError(f"{path}: scenarios[{i}]: a file name or {{generate: {{options}}}}")


def run_plan(grid: Grid) -> list[tuple[GridScenario, RunKey]]:
    """Every run of the grid in the order it runs: repetition by repetition, algorithm
    order alternated between repetitions."""
    plan = []
    for repetition in range(grid.repetitions):
        algorithms = grid.algorithms if repetition % 2 == 0 else grid.algorithms[::-1]
        for scenario in grid.scenarios:
            seed = "" if scenario.seed is None else str(scenario.seed)
            for backend in grid.backends:
                for algorithm in algorithms:
                    key = RunKey(scenario.name, algorithm, backend, repetition, seed)
                    plan.append((scenario, key))
    return plan


def run_rows(
    key: RunKey, record: RunRecord, reference_ids: list[int] | None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A run's row of runs.csv and its rows of tokens.csv."""
    r = record.result
    decode_s = float(sum(r.per_token_s))
    errors = [abs(t.measured_s / t.predicted_s - 1) for t in r.tokens if t.predicted_s > 0]
    stall_at: dict[int, float] = {}
    for switch in r.switches:
        stall_at[switch.token] = stall_at.get(switch.token, 0.0) + switch.commit_s
    run = {
        **key.row(),
        "host": platform.node(),
        "time_dilation": r.time_dilation,
        "total_s": r.total_s,
        "decode_s": decode_s,
        "stall_s": r.stall_s,
        "tokens_per_s": len(r.per_token_s) / r.total_s if r.total_s > 0 else 0.0,
        "migrations": r.migrations,
        "moved_bytes": r.migration_bytes,
        "peak_memory_bytes": max(r.peak_memory_bytes.values(), default=0.0),
        "median_prediction_error": statistics.median(errors) if errors else "",
        "ids_match_reference": "" if reference_ids is None else r.output_token_ids == reference_ids,
    }
    tokens = [
        {**key.row(), "token": i, "measured_s": t.measured_s, "predicted_s": t.predicted_s,
         "epoch": t.epoch, "stall_s": stall_at.get(i, 0.0)}
        for i, t in enumerate(r.tokens)
    ]  # fmt: skip
    return run, tokens


def _simulate(scenario: GridScenario, key: RunKey) -> tuple[dict, list[dict]]:
    """One sim run (in a worker process): its rows."""
    from edgepart.controller.placement import make_algorithm
    from edgepart.emulator.backends.sim import simulate

    started = time.monotonic()
    record = simulate(scenario.load(), make_algorithm(key.algorithm)).record()
    run, tokens = run_rows(key, record, None)
    return {**run, "wall_s": time.monotonic() - started}, tokens


class Sweep:
    """A grid's runs into ``out_dir``: runs.csv and tokens.csv, resumed where they stop."""

    def __init__(self, grid: Grid, out_dir: Path, workers: int | None = None) -> None:
        self.grid = grid
        self.out_dir = out_dir
        self.workers = workers or len(os.sched_getaffinity(0))
        self.runs_csv = out_dir / "runs.csv"
        self.tokens_csv = out_dir / "tokens.csv"
        self._references: dict[str, list[int]] = {}

    def pending(self) -> list[tuple[GridScenario, RunKey]]:
        """The runs of the plan that runs.csv does not hold yet, in order."""
        done = {_key_of(row) for row in read_rows(self.runs_csv)}
        return [(s, k) for s, k in run_plan(self.grid) if k not in done]

    def run(self, on_done: Callable[[RunKey, dict], None] = lambda k, r: None) -> list[dict]:
        """Run what is pending; every row of runs.csv (earlier ones included)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._drop_unfinished_tokens()
        pending = self.pending()
        sims = [(s, k) for s, k in pending if k.backend == "sim"]
        if sims:
            with ProcessPoolExecutor(max_workers=min(self.workers, len(sims))) as pool:
                futures = [(k, pool.submit(_simulate, s, k)) for s, k in sims]
                for key, future in futures:
                    self._write(key, *future.result(), on_done)
        for scenario, key in pending:
            if key.backend != "sim":
                self._write(key, *self._live(scenario, key), on_done)
        return read_rows(self.runs_csv)

    def _live(self, scenario: GridScenario, key: RunKey) -> tuple[dict, list[dict]]:
        from edgepart.emulator.job import reference_ids

        sc = scenario.load()
        if scenario.name not in self._references:
            self._references[scenario.name] = reference_ids(sc)
        started = time.monotonic()  # start-up and teardown included
        work_dir = self.out_dir / "work" / f"{key.scenario}-{key.algorithm}-{key.repetition}"
        if key.backend == "local":
            from edgepart.emulator.backends.local import run_local

            record: RunRecord = run_local(sc, key.algorithm, work_dir=work_dir)
        else:
            from edgepart.emulator.backends.docker import run_docker

            if scenario.path is None:
                raise GridError(f"{key.scenario}: the docker backend runs scenario files only")
            text = scenario.path.read_text(encoding="utf-8")
            record = run_docker(sc, text, key.algorithm, work_dir=work_dir)
        run, tokens = run_rows(key, record, self._references[scenario.name])
        return {**run, "wall_s": time.monotonic() - started}, tokens

    def _write(self, key: RunKey, run: dict, tokens: list[dict], on_done) -> None:
        # tokens first: a run in runs.csv always has its tokens (a resume drops the tokens
        # of a run that stopped between the two)
        _append(self.tokens_csv, TOKEN_COLUMNS, tokens)
        _append(self.runs_csv, RUN_COLUMNS, [run])
        on_done(key, run)

    def _drop_unfinished_tokens(self) -> None:
        done = {_key_of(row) for row in read_rows(self.runs_csv)}
        rows = read_rows(self.tokens_csv)
        kept = [row for row in rows if _key_of(row) in done]
        if len(kept) != len(rows):
            self.tokens_csv.unlink()
            _append(self.tokens_csv, TOKEN_COLUMNS, kept)


def _key_of(row: Mapping[str, Any]) -> RunKey:
    return RunKey(row["scenario"], row["algorithm"], row["backend"], int(row["repetition"]),
                  str(row["seed"]))  # fmt: skip


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file written by a sweep (none when it does not exist)."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _append(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    new = not path.is_file()
    with path.open("a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())


def relative_totals(
    rows: Iterable[Mapping[str, Any]],
) -> dict[tuple[str, str], dict[str, list[float]]]:
    """Per (scenario, backend), each algorithm's total_s over the best static split's
    (the lowest median total of STATIC algorithms in the grid), one ratio per repetition;
    empty where the grid has no static split."""
    totals: dict[tuple[str, str], dict[str, dict[int, float]]] = {}
    for row in rows:
        by_algo = totals.setdefault((row["scenario"], row["backend"]), {})
        by_algo.setdefault(row["algorithm"], {})[int(row["repetition"])] = float(row["total_s"])
    out: dict[tuple[str, str], dict[str, list[float]]] = {}
    for cell, by_algo in totals.items():
        static = [statistics.median(v.values()) for a, v in by_algo.items() if a in STATIC]
        if not static:
            continue
        best = min(static)
        out[cell] = {a: [t / best for _, t in sorted(v.items())] for a, v in by_algo.items()}
    return out
