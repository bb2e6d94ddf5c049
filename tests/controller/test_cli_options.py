"""The main CLI's option handling: every bad value exits 2 with one line and no traceback;
-a/--algorithm is a comma list everywhere; --backend and --telemetry list their choices;
`edgepart agent` reads and shows its options like every other command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgepart.controller.cli import app

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
TOY = SCENARIOS / "toy-5.yaml"
PLAN_KEYS = {"algorithm", "objective_s", "feasible", "placement", "solve_s"}


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_bad_input(result, *words: str) -> None:
    """Exit 2, no traceback, the problem on stderr naming every word. Our own checks say it
    in one line; click's usage errors in its own box (also without a traceback)."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert result.stdout == ""
    if result.stderr.startswith("error:"):
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    flat = " ".join(result.stderr.replace("│", " ").split())
    for word in words:
        assert word in flat, result.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["plan", TOY, "-a", ""], ["names no algorithm", "myopic"]),
        (["plan", TOY, "-a", " , "], ["names no algorithm"]),
        (["plan", TOY, "-a", "myopic,bogus"], ["unknown algorithm 'bogus'"]),
        (["simulate", TOY, "--algorithm", ""], ["names no algorithm"]),
        (["compare", TOY, "--algorithm", ""], ["names no algorithm"]),
        (["compare", TOY, "-a", "galaxy,nope"], ["unknown algorithm 'nope'"]),
        (["emulate", TOY, "-a", ","], ["names no algorithm"]),
        (["emulate", TOY, "--backend", "bogus"], ["--backend", "sim", "local", "docker"]),
        (["emulate", TOY, "--telemetry", "bogus"], ["--telemetry", "measured", "configured"]),
        (["emulate", TOY, "--backend", "sim", "--broker", "h:1"], ["--broker", "sim backend"]),
        (["emulate", TOY, "--backend", "sim", "--metrics-port", "9"], ["--metrics-port"]),
        (
            ["emulate", TOY, "--backend", "docker", "--telemetry", "configured"],
            ["--telemetry configured", "docker backend"],
        ),
        (["generate", "--model", "smollm2-135m", "--prompt", "x", "-a", "bogus"], ["bogus"]),
        (["generate", "--model", "/no/such/model", "--prompt", "x"], ["/no/such/model"]),
        (
            ["controller", "--scenario", TOY, "--broker", "h:1", "-a", "myopic,galaxy"],
            ["runs one algorithm at a time"],
        ),
        (["controller", "--scenario", TOY, "--broker", "h:1", "--telemetry", "x"], ["--telemetry"]),
        (["fetch-model", "--model", "paper-small"], ["paper-small"]),
        (["plan", TOY, "--no-such-option"], ["--no-such-option"]),
    ],
)
def test_a_bad_value_exits_2_without_a_traceback(args, words):
    assert_bad_input(cli(*args), *words)


def test_emulate_out_naming_a_file_exits_2_before_running(tmp_path):
    (tmp_path / "taken").write_text("")
    for out in (tmp_path / "taken", tmp_path / "taken" / "plots"):
        result = cli("emulate", TOY, "--backend", "sim", "--out", out)
        assert_bad_input(result, "--out", "is a file, not a folder")


def test_emulate_out_without_matplotlib_exits_2(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name)
    )
    result = cli("emulate", TOY, "--backend", "sim", "--out", tmp_path / "plots")
    assert_bad_input(result, "matplotlib")
    assert not (tmp_path / "plots").exists()


def test_calibrate_out_naming_a_folder_exits_2(tmp_path):
    assert_bad_input(cli("calibrate", "--out", tmp_path), "is a folder")


def test_emulate_on_the_sim_writes_its_plots_and_json(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plots"
    result = cli("emulate", TOY, "--backend", "sim", "-a", "myopic,edgeshard", "--out", out)
    assert result.exit_code == 0, result.stderr
    names = {p.name for p in out.iterdir()}
    assert names == {"latency.png", "latency-myopic.png", "latency-edgeshard.png", "runs.json"}
    runs = json.loads((out / "runs.json").read_text())
    assert [r["algorithm"] for r in runs] == ["myopic", "edgeshard"]


@pytest.mark.parametrize("command", ["plan", "simulate"])
def test_a_comma_list_runs_every_algorithm(command):
    result = cli(command, TOY, "-a", "myopic, edgeshard", "--json")
    assert result.exit_code == 0, result.stderr
    objects = json.loads(result.stdout)
    assert [o["algorithm"] for o in objects] == ["myopic", "edgeshard"]
    if command == "plan":
        assert all(set(o) == PLAN_KEYS for o in objects)


def test_one_algorithm_still_prints_one_object():
    result = cli("plan", TOY, "--algorithm", "edgeshard", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["algorithm"] == "edgeshard"


def test_compare_takes_the_same_option_as_every_command():
    result = cli("compare", TOY, "-a", "edgeshard,galaxy", "--json")
    assert result.exit_code == 0, result.stderr
    assert [r["algorithm"] for r in json.loads(result.stdout)] == ["edgeshard", "galaxy"]


def wide_help(*command: str) -> str:
    """A command's --help drawn wide enough that no choice list wraps."""
    return CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"}).stdout


def test_version_comes_from_the_installed_metadata():
    from importlib import metadata

    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"edgepart {metadata.version('edgepart')}"


def test_help_lists_the_choices_of_backend_and_telemetry():
    shown = wide_help("emulate")
    assert "sim|local|docker" in shown and "measured|configured" in shown
    assert "--out" in shown and "--plots" not in shown
    assert "measured|configured" in wide_help("controller")


# ---------------------------------------------------------------- edgepart agent


def test_agent_help_is_drawn_like_the_other_commands():
    shown = wide_help("agent")
    assert "Usage: edgepart agent [OPTIONS]" in shown
    for option in ("--name", "--broker", "--weight-cache", "--no-weight-cache", "--shaping"):
        assert option in shown
    assert "software|tc" in shown and "─ Options ─" in shown


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--name", "d"], ["Missing option", "--broker"]),
        (["--name", "d", "--broker", "h:1", "--shaping", "x"], ["--shaping", "software", "tc"]),
        (["--name", "d", "--broker", "h:1", "--memory-mib", "lots"], ["--memory-mib"]),
    ],
)
def test_agent_bad_values_exit_2(args, words):
    assert_bad_input(cli("agent", *args), *words)


def test_agent_options_reach_the_agent_as_given(tmp_path, monkeypatch):
    """The typer command hands the agent's own parser the same configuration."""
    import edgepart.device_agent.__main__ as agent_main

    key = tmp_path / "key"
    key.write_bytes(b"k" * 32)
    given = [
        "--name", "d1", "--broker", "broker:1883", "--listen", "0.0.0.0:7000",
        "--memory-mib", "512", "--cpu-share", "0.5", "--gflops", "3.5",
        "--shaping", "tc", "--exit-with-parent", "--no-weight-cache",
        "--dataplane-key", str(key), "--join-file", "/tmp/join",
    ]  # fmt: skip
    seen: list[list[str]] = []
    monkeypatch.setattr(agent_main, "main", lambda argv: seen.append(argv) or 0)
    result = cli("agent", *given)
    assert result.exit_code == 0, result.output
    [argv] = seen
    assert agent_main.config_from_args(argv) == agent_main.config_from_args(given)


def test_the_agents_exit_code_is_the_commands(monkeypatch):
    import edgepart.device_agent.__main__ as agent_main

    monkeypatch.setattr(agent_main, "main", lambda argv: 3)
    assert cli("agent", "--name", "d", "--broker", "h:1").exit_code == 3
