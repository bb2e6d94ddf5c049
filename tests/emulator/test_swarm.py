"""The docker testbed as a Docker Swarm stack (`edgepart testbed up|down --swarm`) on a
one-node swarm: limits under deploy, files as swarm configs, an overlay network that is
internal. The stack runs the whole experiment; the driver's log carries the result.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from live_e2e import SCENARIO, reference_ids

from edgepart.emulator.compose import project_name
from edgepart.emulator.images import DEFAULT_TAG, build_image, docker_available
from edgepart.emulator.scenario import parse_scenario

pytestmark = pytest.mark.skipif(not docker_available(), reason="the Docker engine is not running")

RUN_TIMEOUT_S = 600.0
REMOVE_TIMEOUT_S = 120.0


def _docker(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout_s)


def _until(check, timeout_s: float, what: str, poll_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(poll_s)


@pytest.fixture
def swarm():
    state = _docker("info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip()
    joined_here = state != "active"
    if joined_here:
        done = _docker("swarm", "init", "--advertise-addr", "127.0.0.1")
        assert done.returncode == 0, done.stderr
    try:
        yield
    finally:
        if joined_here:
            _docker("swarm", "leave", "--force")


def _edgepart(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgepart.controller.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_stack_runs_the_experiment_and_leaves_nothing(swarm, tmp_path: Path) -> None:
    build_image(DEFAULT_TAG)
    scenario = parse_scenario({**SCENARIO, "name": "swarm-e2e"}, "swarm")
    path = tmp_path / "scenario.yaml"
    path.write_text(scenario.to_yaml(), encoding="utf-8")
    stack = project_name(scenario)
    project = tmp_path / "project"
    up = _edgepart("testbed", "up", str(path), "--swarm", "--out", str(project))
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        network = _docker("network", "inspect", f"{stack}_testbed").stdout
        assert json.loads(network)[0]["Internal"] is True

        def finished() -> str | None:
            states = _docker(
                "service", "ps", f"{stack}_testbed", "--format", "{{.CurrentState}}"
            ).stdout
            return states if states.startswith(("Complete", "Failed", "Rejected")) else None

        state = _until(finished, RUN_TIMEOUT_S, "the testbed service finishing")
        logs = _docker("service", "logs", "--raw", f"{stack}_testbed")
        log = logs.stdout + logs.stderr  # the driver's progress and notes go to stderr
        assert state.startswith("Complete"), log[-3000:]
        assert "wrote /tmp/out/result.json" in log
        # the controller (--json) prints the run's result as its last line
        printed = _docker("service", "logs", "--raw", f"{stack}_controller").stdout
        result = json.loads(printed.strip().splitlines()[-1])
        assert result["output_token_ids"] == reference_ids()
        limits = json.loads(_docker("service", "inspect", f"{stack}_a").stdout)[0]
        resources = limits["Spec"]["TaskTemplate"]["Resources"]["Limits"]
        assert resources["NanoCPUs"] > 0 and resources["MemoryBytes"] > 0
    finally:
        down = _edgepart("testbed", "down", str(path), "--swarm")
    assert down.returncode == 0, down.stderr
    _until(
        lambda: _docker("network", "inspect", f"{stack}_testbed").returncode != 0,
        REMOVE_TIMEOUT_S,
        "the stack's network going away",
    )
    assert _docker("service", "ls", "--filter", f"name={stack}_", "-q").stdout.strip() == ""
    assert _docker("config", "ls", "--filter", f"name={stack}_", "-q").stdout.strip() == ""
