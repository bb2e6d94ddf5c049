"""``edgepart scenario new|check``: seeded files that validate, summaries, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgepart.controller.cli import app
from edgepart.emulator.scenario import load_scenario

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, list(args))


def test_a_seed_writes_the_same_scenario_and_it_checks(tmp_path: Path) -> None:
    args = ["--devices", "6", "--traces", "4", "--seed", "11", "--bandwidth", "50-500"]
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert cli("scenario", "new", *args, "-o", str(first)).exit_code == 0
    assert cli("scenario", "new", *args, "--out", str(second)).exit_code == 0
    assert first.read_bytes() == second.read_bytes()
    sc = load_scenario(first)
    assert len(sc.devices) == 6 and len(sc.traces) == 4
    assert all(50 <= sc.link(a.name, b.name)[0] <= 500 for a in sc.devices for b in sc.devices
               if a.name != b.name)  # fmt: skip
    checked = cli("scenario", "check", str(first), "--no-host", "--json")
    assert checked.exit_code == 0, checked.output
    summary = json.loads(checked.output)
    assert summary["devices"] == 6 and sum(summary["traces"].values()) == 4
    assert summary["model_needs_mib"] <= summary["memory_mib"]
    other = tmp_path / "c.yaml"
    assert cli("scenario", "new", *args[:-4], "--seed", "12", "-o", str(other)).exit_code == 0
    assert other.read_bytes() != first.read_bytes()


def test_tiers_and_topologies_shape_the_devices(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    assert (
        cli("scenario", "new", "--devices", "10", "--tiers", "0.5,0.5", "-o", str(path)).exit_code
        == 0
    )
    speeds = sorted(d.compute_gflops for d in load_scenario(path).devices)
    assert speeds[0] >= 2.0  # no edge device: every draw from the cloud or regional tier
    hybrid = tmp_path / "h.yaml"
    result = cli("scenario", "new", "--topology", "hybrid", "-o", str(hybrid))
    assert result.exit_code == 0, result.output
    assert load_scenario(hybrid).devices


def test_check_prints_the_summary_and_this_hosts_fit() -> None:
    result = cli("scenario", "check", str(SCENARIOS / "demo.yaml"))
    assert result.exit_code == 0, result.output
    for key in ("scenario", "model", "devices", "memory", "links", "traces", "this host"):
        assert any(line.startswith(key) for line in result.output.splitlines()), key
    assert "time dilation" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "1"], "--devices N"),
        (["--devices", "3", "--topology", "hybrid"], "not both"),
        (["--devices", "3", "--bandwidth", "500-50"], "--bandwidth"),
        (["--devices", "3", "--latency", "fast"], "--latency"),
        (["--devices", "3", "--tiers", "0.8,0.5"], "--tiers"),
        (["--topology", "ring"], "unknown topology"),
    ],
)
def test_bad_options_exit_2_naming_them(tmp_path: Path, args: list[str], message: str) -> None:
    result = cli("scenario", "new", *args, "-o", str(tmp_path / "x.yaml"))
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "x.yaml").exists()


def test_an_existing_file_is_kept_unless_forced(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("keep", encoding="utf-8")
    assert cli("scenario", "new", "--devices", "3", "-o", str(path)).exit_code == 2
    assert path.read_text(encoding="utf-8") == "keep"
    assert cli("scenario", "new", "--devices", "3", "-o", str(path), "--force").exit_code == 0
    assert load_scenario(path).devices


def test_check_names_the_file_and_key_of_a_bad_scenario(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (SCENARIOS / "demo.yaml").read_text().replace("replan_every: 8", "replan_every: -1")
    )
    result = cli("scenario", "check", str(bad), "--no-host")
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "bad.yaml" in text and "replan_every" in text
