"""``edgepart sweep``: the grid's runs once each into CSV files of a stable schema, resumed
after an interruption, algorithm order alternated, bad grids refused naming the key."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgepart.controller.cli import app
from edgepart.controller.placement import algorithm_names
from edgepart.emulator.sweep import (
    RUN_COLUMNS,
    TOKEN_COLUMNS,
    Sweep,
    load_grid,
    relative_totals,
    run_plan,
)

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
ALGORITHMS = ["myopic", "edgeshard", "static-heads"]
runner = CliRunner()


def write_grid(tmp_path: Path, **changes) -> Path:
    grid = {
        "scenarios": [str(SCENARIOS / "lan-3.yaml"), {"generate": {"devices": 4, "traces": 2,
                                                                  "generate_tokens": 12}}],
        "algorithms": ALGORITHMS,
        "repetitions": 2,
        "seeds": [3, 4],
        **changes,
    }  # fmt: skip
    path = tmp_path / "grid.yaml"
    path.write_text(json.dumps(grid))
    return path


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_a_sim_sweep_writes_each_run_once_with_stable_columns(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["sweep", str(write_grid(tmp_path)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    runs = rows(out / "runs.csv")
    assert list(runs[0]) == list(RUN_COLUMNS)
    assert len(runs) == 3 * 3 * 2  # (lan-3 + two seeds) x algorithms x repetitions
    assert (
        Counter((r["scenario"], r["algorithm"], r["repetition"]) for r in runs).most_common(1)[0][1]
        == 1
    )
    for r in runs:
        assert float(r["total_s"]) >= float(r["decode_s"]) > 0
        assert float(r["tokens_per_s"]) > 0 and int(r["migrations"]) >= 0
        assert float(r["time_dilation"]) == 1.0 and r["ids_match_reference"] == ""
    tokens = rows(out / "tokens.csv")
    assert list(tokens[0]) == list(TOKEN_COLUMNS)
    per_run = Counter((t["scenario"], t["algorithm"], t["repetition"]) for t in tokens)
    assert set(per_run) == {(r["scenario"], r["algorithm"], r["repetition"]) for r in runs}
    assert "vs best static" in result.output and "lan-3" in result.output


def test_an_interrupted_sweep_resumes_and_writes_each_run_exactly_once(tmp_path: Path) -> None:
    grid = load_grid(write_grid(tmp_path), algorithm_names())
    out = tmp_path / "out"
    seen = []

    def stop_after_five(key, row) -> None:
        seen.append(key)
        if len(seen) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Sweep(grid, out, workers=2).run(stop_after_five)
    assert len(rows(out / "runs.csv")) == 5
    sweep = Sweep(grid, out, workers=2)
    assert len(sweep.pending()) == len(run_plan(grid)) - 5
    final = sweep.run()
    keys = [(r["scenario"], r["algorithm"], r["repetition"]) for r in final]
    assert len(keys) == len(set(keys)) == len(run_plan(grid))
    tokens = Counter((t["scenario"], t["algorithm"], t["repetition"], t["token"])
                     for t in rows(out / "tokens.csv"))  # fmt: skip
    assert max(tokens.values()) == 1
    assert Sweep(grid, out).pending() == []


def test_algorithm_order_alternates_between_repetitions(tmp_path: Path) -> None:
    grid = load_grid(write_grid(tmp_path, repetitions=3), algorithm_names())
    first = [k.algorithm for _, k in run_plan(grid) if k.scenario == "lan-3"]
    assert first == ALGORITHMS + ALGORITHMS[::-1] + ALGORITHMS


def test_ratios_are_against_the_best_static_split() -> None:
    made = [{"scenario": "s", "backend": "sim", "algorithm": a, "repetition": r, "total_s": t}
            for a, r, t in [("myopic", 0, 8.0), ("myopic", 1, 9.0), ("edgeshard", 0, 10.0),
                            ("edgeshard", 1, 10.0), ("static-heads", 0, 12.0)]]  # fmt: skip
    assert relative_totals(made)[("s", "sim")]["myopic"] == [0.8, 0.9]


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"algorithms": ["myopic", "nosuch"]}, "algorithms: unknown nosuch"),
        ({"backends": ["cloud"]}, "backends: unknown cloud"),
        ({"repetitions": 0}, "repetitions"),
        ({"scenarios": ["missing.yaml"]}, "scenarios[0]: no such file"),
        ({"colour": "blue"}, "colour: unknown key"),
    ],
)
def test_a_bad_grid_exits_2_naming_the_key(tmp_path: Path, changes: dict, says: str) -> None:
    path = write_grid(tmp_path, **changes)
    result = runner.invoke(app, ["sweep", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "grid.yaml" in text and says in text


def test_a_local_sweep_checks_the_ids(tmp_path: Path, tiny_live_model: Path) -> None:
    from live_e2e import SCENARIO

    scenario = tmp_path / "tiny.yaml"
    scenario.write_text(json.dumps({**SCENARIO, "model": {"hf": str(tiny_live_model)}}))
    grid = write_grid(tmp_path, scenarios=[str(scenario)], algorithms=["myopic", "edgeshard"],
                      backends=["local"], repetitions=1)  # fmt: skip
    result = runner.invoke(app, ["sweep", str(grid), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    runs = rows(tmp_path / "out" / "runs.csv")
    assert [r["ids_match_reference"] for r in runs] == ["True", "True"]
    assert all(r["median_prediction_error"] != "" for r in runs)
