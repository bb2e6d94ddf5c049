"""A rendered project run as a user runs it: `edgepart testbed render`, then `docker compose
up --exit-code-from testbed` in its folder, nothing else. The calibrate service derives the
devices' shares on this host, the secrets service makes the broker's identities, the broker
runs from the edgepart image; the exit code is the driver's.

Needs the Docker engine and compose v2. The image is built from this tree once per module
(layers cached); ``EDGEPART_TEST_IMAGE`` names another tag to build and run than the shared
``edgepart:latest``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from live_e2e import SCENARIO, reference_ids

from edgepart.emulator.backends.docker import project_resources
from edgepart.emulator.compose import project_name
from edgepart.emulator.images import DEFAULT_TAG, build_image, docker_available
from edgepart.emulator.scenario import parse_scenario

pytestmark = pytest.mark.skipif(not docker_available(), reason="the Docker engine is not running")

IMAGE = os.environ.get("EDGEPART_TEST_IMAGE", DEFAULT_TAG)
UP_TIMEOUT_S = 1200.0  # calibration, agents loading the model, the run, on a loaded host
DOWN_TIMEOUT_S = 180.0


@pytest.fixture(scope="module")
def image() -> str:
    build_image(IMAGE)
    return IMAGE


def _render(tmp_path: Path, image: str, name: str, traces: list[dict]) -> tuple[Path, str]:
    """Render a tiny scenario with the CLI into a folder of its own; its folder, project."""
    scenario = parse_scenario({**SCENARIO, "name": name, "traces": traces}, name)
    path = tmp_path / "scenario.yaml"
    path.write_text(scenario.to_yaml(), encoding="utf-8")
    project = tmp_path / "project"
    done = subprocess.run(
        [sys.executable, "-m", "edgepart.controller.cli", "testbed", "render", str(path),
         "--out", str(project), "--image", image],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return project, project_name(scenario)


def _compose(project: Path, *args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", "compose", *args], cwd=project, capture_output=True, text=True,
        timeout=timeout_s,
    )  # fmt: skip


def _down(project: Path, name: str) -> None:
    done = _compose(project, "down", "--volumes", "--timeout", "5", timeout_s=DOWN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert project_resources(name) == {"containers": [], "networks": [], "volumes": []}


def test_compose_up_runs_the_experiment_and_exits_with_the_drivers_code(
    tmp_path: Path, image: str
) -> None:
    traces = [*SCENARIO["traces"], {"at_token": 4, "device": "c", "fail": True}]
    project, name = _render(tmp_path, image, f"compose-up-{os.getpid()}", traces)
    assert not any(
        "cpus" in s
        for s in yaml.safe_load((project / "compose.yaml").read_text())["services"].values()
    )
    try:
        up = _compose(project, "up", "--exit-code-from", "testbed", timeout_s=UP_TIMEOUT_S)
        output = up.stdout + up.stderr
        assert up.returncode == 0, output[-4000:]
        # the driver's output alone: every token, the text, the comparison table
        assert "Attaching to testbed-1" in output
        assert all(f"token {i}:" in output for i in range(1, SCENARIO["generate_tokens"] + 1))
        assert "predicted err" in output and "myopic" in output
        result = json.loads((project / "out" / "result.json").read_text())
        assert result["output_token_ids"] == reference_ids()
        assert result["text"] and result["text"] in output
        assert result["detection_s"]  # the controller saw c go: its container was killed
        # the calibrate service wrote each device's share of this host
        shares = {d: (project / "cache" / "start" / d).read_text().split() for d in "abc"}
        assert all(args[0] == "--cpu-share" and float(args[1]) > 0 for args in shares.values())
    finally:
        _down(project, name)


def test_compose_up_reports_a_failed_start(tmp_path: Path, image: str) -> None:
    project, name = _render(tmp_path, image, f"compose-fail-{os.getpid()}", [])
    (project / "scenario.yaml").write_text("version: 99\n")  # no role can read it
    try:
        up = _compose(project, "up", "--exit-code-from", "testbed", timeout_s=UP_TIMEOUT_S)
        assert up.returncode != 0
        assert "calibrate" in up.stdout + up.stderr
    finally:
        _down(project, name)
