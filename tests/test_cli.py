"""The edgepart CLI: plan, simulate and compare, their JSON and their exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgepart.controller.cli import app
from edgepart.controller.placement import ALGORITHMS
from edgepart.emulator.scenario import load_scenario
from edgepart.llm.blocks import PINNED_BLOCKS, block_table

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"
TOY = SCENARIOS / "toy-5.yaml"
PLAN_KEYS = {"algorithm", "objective_s", "feasible", "placement", "solve_s"}
SIM_KEYS = {
    "algorithm",
    "backend",
    "per_token_s",
    "total_s",
    "migrations",
    "migration_s",
    "peak_memory_bytes",
    "replans",
}

runner = CliRunner()


def squash(text: str) -> str:
    """Text without whitespace: rich wraps long error lines at the console width."""
    return "".join(text.split())


def cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def real_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgepart.controller.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# ----------------------------------------------------------------- plan


@pytest.mark.parametrize("algorithm", ["myopic", "edgeshard", "galaxy"])
def test_plan_json(algorithm):
    result = cli("plan", TOY, "--algorithm", algorithm, "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) == PLAN_KEYS
    assert out["algorithm"] == algorithm and out["feasible"] is True
    assert out["objective_s"] > 0 and out["solve_s"] >= 0
    sc = load_scenario(TOY)
    table = block_table(sc.model_spec())
    assert set(out["placement"]) == set(table.names) | set(PINNED_BLOCKS)
    assert set(out["placement"].values()) <= set(sc.device_names)
    assert out["placement"]["embed"] == out["placement"]["head"] == sc.source_name


def test_plan_as_a_real_process():
    proc = real_cli("plan", TOY, "--algorithm", "myopic", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == PLAN_KEYS and out["feasible"] is True
    assert len(out["placement"]) == 4 * (8 + 2) + 2


def test_plan_optimal_json_stdout_is_one_object():
    proc = real_cli("plan", TOY, "--algorithm", "optimal", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == PLAN_KEYS


def test_plan_prints_a_table_without_json():
    result = cli("plan", TOY)
    assert result.exit_code == 0, result.stderr
    assert "myopic" in result.stdout and "blocks per device" in result.stdout
    for device in ("d0", "d1", "d2", "d3", "d4"):
        assert device in result.stdout


# ----------------------------------------------------------------- simulate and compare


def test_simulate_json_has_the_design_keys():
    result = cli("simulate", TOY, "--algorithm", "edgeshard", "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) == SIM_KEYS
    assert out["algorithm"] == "edgeshard" and out["backend"] == "sim"
    assert len(out["per_token_s"]) == 64
    assert out["total_s"] == pytest.approx(sum(out["per_token_s"]) + out["migration_s"])
    assert set(out["peak_memory_bytes"]) == {"d0", "d1", "d2", "d3", "d4"}


def test_simulate_as_a_real_process(write_scenario, scenario_data):
    path = write_scenario(scenario_data())
    proc = real_cli("simulate", path, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == SIM_KEYS and out["algorithm"] == "myopic" and out["replans"] == 2


def test_compare_prints_every_algorithm():
    result = cli("compare", TOY)
    assert result.exit_code == 0, result.stderr
    for name in ("myopic", "static-heads", "edgeshard", "memory-proportional", "galaxy"):
        assert name in result.stdout
    assert "toy-5" in result.stdout


def test_compare_json_lists_one_result_per_algorithm(write_scenario, scenario_data):
    path = write_scenario(scenario_data())
    result = cli("compare", path, "--algorithm", "edgeshard,galaxy", "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert [r["algorithm"] for r in out] == ["edgeshard", "galaxy"]
    assert all(set(r) == SIM_KEYS | {"failure"} and r["failure"] is None for r in out)


# ----------------------------------------------------------------- bad input: exit 2


def _bad_scenarios(scenario_data) -> dict[str, tuple[dict, str, str]]:
    unknown = scenario_data(colour="blue")
    zero = scenario_data()
    zero["devices"][1]["memory_mib"] = 0
    two = scenario_data()
    two["devices"][2]["source"] = True
    return {
        "unknown-key": (unknown, "colour", "unknown key"),
        "zero-capacity": (zero, "devices[1].memory_mib", "must be > 0"),
        "two-sources": (two, "devices[2].source", "several sources"),
    }


@pytest.mark.parametrize("case", ["unknown-key", "zero-capacity", "two-sources"])
@pytest.mark.parametrize("command", ["plan", "simulate", "compare"])
def test_bad_scenario_exits_2_naming_file_key_and_reason(
    write_scenario, scenario_data, case, command
):
    data, key, reason = _bad_scenarios(scenario_data)[case]
    path = write_scenario(data, name=f"{case}.yaml")
    result = cli(command, path)
    assert result.exit_code == 2
    assert result.stdout == ""
    message = squash(result.stderr)
    assert squash(f"{path}: {key}: {reason}") in message


def test_bad_scenario_as_a_real_process(write_scenario, scenario_data):
    data, key, reason = _bad_scenarios(scenario_data)["two-sources"]
    path = write_scenario(data, name="two.yaml")
    proc = real_cli("plan", path, "--json")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert squash(f"{path}: {key}: {reason}") in squash(proc.stderr)


def test_missing_scenario_file_exits_2(tmp_path):
    path = tmp_path / "nope.yaml"
    result = cli("simulate", path)
    assert result.exit_code == 2
    assert squash(f"{path}: no such file") in squash(result.stderr)


def test_error_message_keeps_brackets_in_file_names(write_scenario, scenario_data):
    path = write_scenario(scenario_data(colour="blue"), name="sc[old].yaml")
    result = cli("plan", path)
    assert result.exit_code == 2
    assert "sc[old].yaml" in result.stderr


@pytest.mark.parametrize("command", ["plan", "simulate"])
def test_unknown_algorithm_exits_2(command):
    result = cli(command, TOY, "--algorithm", "greedy")
    assert result.exit_code == 2
    message = squash(result.stderr)
    assert squash("unknown algorithm 'greedy'") in message
    for name in ALGORITHMS:
        assert name in message


def test_unknown_algorithm_in_compare_exits_2_before_simulating():
    result = cli("compare", TOY, "-a", "myopic,greedy")
    assert result.exit_code == 2
    assert "greedy" in result.stderr and result.stdout == ""


def test_unknown_algorithm_as_a_real_process():
    proc = real_cli("simulate", TOY, "--algorithm", "greedy", "--json")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "unknown algorithm 'greedy'" in " ".join(proc.stderr.split())


# ----------------------------------------------------------------- runtime failure: exit 1


def _unplaceable(scenario_data) -> dict:
    # The FFN block (3 * 64 * 1024 + 64 floats = 0.75 MiB) fits no device (0.7 MiB each),
    # yet the devices hold the whole model together (2.1 MiB), so the file is valid.
    model = {**scenario_data()["model"], "d_ff": 1024}
    data = scenario_data(model=model)
    for device in data["devices"]:
        device["memory_mib"] = 0.7
    return data


def test_plan_exits_1_when_no_placement_fits(write_scenario, scenario_data):
    path = write_scenario(_unplaceable(scenario_data))
    load_scenario(path)  # valid input: the failure is at run time
    result = cli("plan", path, "--json")
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert set(out) == PLAN_KEYS
    assert out["feasible"] is False and out["placement"] == {} and out["objective_s"] is None
    assert "fits" in result.stderr


@pytest.mark.parametrize("algorithm", ["myopic", "edgeshard", "galaxy"])
def test_simulate_exits_1_when_no_placement_fits(write_scenario, scenario_data, algorithm):
    path = write_scenario(_unplaceable(scenario_data))
    result = cli("simulate", path, "--algorithm", algorithm, "--json")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert squash(f"{algorithm}: initial placement:") in squash(result.stderr)


def test_simulate_exits_1_as_a_real_process(write_scenario, scenario_data):
    path = write_scenario(_unplaceable(scenario_data))
    proc = real_cli("simulate", path, "--json")
    assert proc.returncode == 1 and proc.stdout == ""
    assert "error" in proc.stderr and "myopic" in proc.stderr


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_simulate_exits_1_when_the_source_dies(write_scenario, scenario_data):
    path = write_scenario(scenario_data(traces=[{"at_token": 3, "device": "s", "fail": True}]))
    result = cli("simulate", path, "--algorithm", "myopic", "--json")
    assert result.exit_code == 1
    assert "myopic:token3:" in squash(result.stderr)


def test_simulate_exits_1_when_the_source_dies_under_edgeshard(write_scenario, scenario_data):
    path = write_scenario(scenario_data(traces=[{"at_token": 3, "device": "s", "fail": True}]))
    result = cli("simulate", path, "--algorithm", "edgeshard", "--json")
    assert result.exit_code == 1 and result.stdout == ""
    assert "edgeshard:token3:" in squash(result.stderr)


def test_compare_reports_a_failing_algorithm_in_the_table(write_scenario, scenario_data):
    path = write_scenario(_unplaceable(scenario_data))
    result = cli("compare", path, "--algorithm", "edgeshard,galaxy")
    assert result.exit_code == 0
    assert "failed" in result.stdout
    assert "edgeshard" in result.stdout and "galaxy" in result.stdout


# ----------------------------------------------------------------- time dilation


def test_a_time_dilation_below_one_or_on_the_sim_is_bad_input():
    below = cli("emulate", TOY, "--backend", "local", "--time-dilation", "0.5")
    assert below.exit_code == 2
    assert "--time-dilation" in below.stderr
    sim = cli("emulate", TOY, "--backend", "sim", "--time-dilation", "2")
    assert sim.exit_code == 2
    assert "virtualclock" in squash(sim.stderr)


def test_the_dilation_note_says_times_are_scenario_time():
    from edgepart.emulator.cli_common import dilation_note

    assert dilation_note(1.0).startswith("time dilation 1: ")
    assert dilation_note(1.4) == (
        "this host runs the scenario 1.40x slower than real time (time dilation 1.40): "
        "every time below is scenario time"
    )
