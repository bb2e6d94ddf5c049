"""The Python API (``edgepart.api``, re-exported by the package): the command line's
results as records, and as a DataFrame where pandas is installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import edgepart
from edgepart.controller.cli import app
from edgepart.controller.result import RunRecord
from edgepart.llm.blocks import PINNED_BLOCKS, block_table

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"
LAN3 = SCENARIOS / "lan-3.yaml"


def test_the_package_exports_the_api_lazily() -> None:
    assert set(edgepart.__all__) >= {"load_scenario", "plan", "simulate", "emulate", "sweep"}
    with pytest.raises(AttributeError):
        _ = edgepart.nosuch


def test_plan_places_every_block_as_the_cli_does() -> None:
    sc = edgepart.load_scenario(LAN3)
    decision = edgepart.plan(sc, "edgeshard")
    table = block_table(sc.model_spec())
    assert set(decision.placement) == set(table.names) | set(PINNED_BLOCKS)
    assert set(decision.placement.values()) <= set(sc.device_names)
    cli = json.loads(
        CliRunner().invoke(app, ["plan", str(LAN3), "-a", "edgeshard", "--json"]).output
    )
    assert cli["placement"] == decision.placement
    assert cli["objective_s"] == pytest.approx(decision.objective_s)


def test_simulate_returns_the_record_the_cli_prints() -> None:
    run = edgepart.simulate(str(LAN3), "myopic")
    assert isinstance(run, RunRecord) and run.backend == "sim"
    printed = CliRunner().invoke(app, ["simulate", str(LAN3), "--json"]).output
    assert json.loads(printed) == json.loads(json.dumps(run.to_json()))
    assert edgepart.emulate(LAN3, "myopic", backend="sim").to_json() == run.to_json()
    row = edgepart.run_row(run)
    assert row["total_s"] == pytest.approx(run.result.total_s) and row["backend"] == "sim"


def test_emulate_runs_real_agents(tmp_path: Path, tiny_live_model: Path) -> None:
    from edgepart.emulator.job import reference_ids
    from edgepart.emulator.scenario import parse_scenario

    data = yaml.safe_load(LAN3.read_text())
    sc = parse_scenario(
        {**data, "model": {"hf": str(tiny_live_model)}, "traces": [], "generate_tokens": 6},
        "tiny",
    )
    run = edgepart.emulate(sc, "edgeshard", backend="local", work_dir=tmp_path)
    assert run.backend == "local"
    assert run.result.output_token_ids == reference_ids(sc)


def test_sweep_and_dataframes(tmp_path: Path) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(json.dumps({"scenarios": [str(LAN3)], "algorithms": ["myopic", "edgeshard"]}))
    rows = edgepart.sweep(grid, tmp_path / "out")
    assert [r["algorithm"] for r in rows] == ["myopic", "edgeshard"]
    runs = [edgepart.simulate(LAN3, a) for a in ("myopic", "edgeshard")]
    if importlib.util.find_spec("pandas") is None:
        with pytest.raises(ImportError, match="pip install pandas"):
            edgepart.to_dataframe(runs)
        return
    frame = edgepart.to_dataframe(runs)
    assert list(frame["algorithm"]) == ["myopic", "edgeshard"]
    assert len(edgepart.to_dataframe(rows)) == 2
