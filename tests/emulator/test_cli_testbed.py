"""`edgepart testbed ...`: every bad value exits 2 with one line and no traceback, before
any calibration, image build or docker call."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgepart.controller.cli import app

DEMO = Path(__file__).resolve().parents[2] / "scenarios" / "demo.yaml"


def cli(*args):
    return CliRunner().invoke(app, ["testbed", *(str(a) for a in args)])


def assert_one_line_exit_2(result, *words: str) -> None:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for word in words:
        assert word in lines[0]


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "taken"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize("below", [False, True])
def test_render_out_naming_a_file_exits_2(a_file, below):
    out = a_file / "project" if below else a_file
    assert_one_line_exit_2(cli("render", DEMO, "--out", out), "--out", "is a file, not a folder")
    assert a_file.read_text() == "not a folder"


def test_up_out_naming_a_file_exits_2(a_file):
    assert_one_line_exit_2(cli("up", DEMO, "--out", a_file), "is a file, not a folder")


def test_drive_out_naming_a_file_exits_2(a_file):
    result = cli("drive", DEMO, "--broker", "127.0.0.1:1", "--out", a_file)
    assert_one_line_exit_2(result, "is a file, not a folder")


@pytest.mark.parametrize("command", ["render", "up"])
@pytest.mark.parametrize(
    ("algorithm", "words"),
    [("", "names no algorithm"), ("bogus", "unknown algorithm"), ("myopic,galaxy", "one algo")],
)
def test_render_and_up_take_one_known_algorithm(tmp_path, command, algorithm, words):
    result = cli(command, DEMO, "-a", algorithm, "--out", tmp_path / "project")
    assert_one_line_exit_2(result, words)
    assert not (tmp_path / "project").exists()


def test_rotating_secrets_made_at_start_up_exits_2(tmp_path):
    # a project without --tls or --swarm makes its secrets at start-up, in its volumes
    result = cli("render", DEMO, "--out", tmp_path / "p", "--rotate-secrets")
    assert_one_line_exit_2(result, "--rotate-secrets", "down --volumes")


def test_the_start_up_services_write_shares_and_secrets(tmp_path, monkeypatch):
    from types import SimpleNamespace

    def profile(model, threads, progress, out):  # this host: 5 GFLOP/s per core
        out.write_text("{}")
        return SimpleNamespace(reference_gflops=5.0)

    monkeypatch.setattr("edgepart.llm.host_profile.host_profile", profile)
    start = tmp_path / "cache" / "start"
    monkeypatch.setattr("edgepart.emulator.host_limits.host_cores", lambda: 8.0)
    calibrated = cli("calibrate", DEMO, "--out", tmp_path / "cache")
    assert calibrated.exit_code == 0, calibrated.output
    assert "time dilation 1;" in calibrated.stdout
    assert (start / "laptop").read_text() == "--cpu-share 0.6 --gflops 3\n"  # 3 GFLOP/s of 5
    assert (start / "pi4").read_text() == "--cpu-share 0.16 --gflops 0.8\n"
    assert (start / "controller").read_text() == "\n"  # k = 1: nothing to tell
    # two cores: 2.0 of the devices' cores on 1.75 free, the world runs 1.14x slower
    monkeypatch.setattr("edgepart.emulator.host_limits.host_cores", lambda: 2.0)
    calibrated = cli("calibrate", DEMO, "--out", tmp_path / "cache")
    assert calibrated.exit_code == 0, calibrated.output
    told = (start / "controller").read_text().split()
    assert told[0] == "--time-dilation" and float(told[1]) > 1.0
    assert (start / "pi4").read_text().split()[-2:] == told
    assert (tmp_path / "cache" / "profile.json").is_file()
    made = cli("secrets", DEMO, "--out", tmp_path / "secrets")
    assert made.exit_code == 0 and "made" in made.stdout
    assert (tmp_path / "secrets" / "agent-pi4" / "mqtt-agent-pi4").is_file()
    assert "kept" in cli("secrets", DEMO, "--out", tmp_path / "secrets").stdout
