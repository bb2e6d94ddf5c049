"""The split roles of the docker testbed, as processes on this machine: a controller
(``edgepart controller --world-driver``) and an emulator driver (``edgepart.emulator.driver``) that
applies the traces on the controller's turns, over a real mosquitto.

The docker backend runs exactly these roles in containers; here they run without Docker,
so the protocol between them (run/world, run/world_ready, run/progress, run/result) is
checked on every machine.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from live_e2e import SCENARIO, reference_ids

from edgepart.control_plane import protocol as proto
from edgepart.emulator.backends.local import AgentProcess, spawn_agent, stop_agents
from edgepart.emulator.broker import Mosquitto, mosquitto_available
from edgepart.emulator.driver import Driver
from edgepart.emulator.scenario import parse_scenario
from edgepart.llm.host_profile import cache_path

pytestmark = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")

RUN_TIMEOUT_S = 600.0


def _kill(agents: dict[str, AgentProcess]):
    async def kill(device: str) -> None:
        agent = agents[device]
        os.killpg(agent.process.pid, signal.SIGKILL)
        await asyncio.to_thread(agent.process.wait, 10)

    return kill


def _run_split(tmp_path: Path, scenario, broker: Mosquitto, on_token):
    """Agents, a controller process and a driver of a scenario over the broker; (outcome,
    driver, controller process, its stderr)."""
    path = tmp_path / "scenario.yaml"
    path.write_text(scenario.to_yaml(), encoding="utf-8")
    testbed = f"split{os.getpid()}"
    agents: dict[str, AgentProcess] = {}
    controller = None
    try:
        for d in scenario.devices:
            agents[d.name] = spawn_agent(
                scenario, d.name, broker.endpoint, testbed, 0.5,
                cache_path("smollm2-135m", threads=1), tmp_path,
            )  # fmt: skip
        cmd = [
            sys.executable, "-m", "edgepart.controller.cli", "controller",
            "--scenario", str(path), "--broker", broker.endpoint,
            "--testbed", testbed, "--algorithm", "myopic", "--world-driver", "--json",
        ]  # fmt: skip
        controller = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        driver = Driver(scenario, broker.endpoint, testbed, _kill(agents), on_token)
        outcome = asyncio.run(driver.run(timeout_s=RUN_TIMEOUT_S))
        _, stderr = controller.communicate(timeout=60)
    finally:
        if controller is not None and controller.poll() is None:
            controller.kill()
        stop_agents(agents)
    return outcome, driver, controller, stderr


def test_controller_and_driver_run_the_traces_over_mqtt(tmp_path: Path) -> None:
    scenario = parse_scenario(
        {
            **SCENARIO,
            "devices": [
                {"name": "a", "compute_gflops": 1.0, "memory_mib": 300, "source": True},
                {"name": "b", "compute_gflops": 1.0, "memory_mib": 360},
                {"name": "c", "compute_gflops": 3.0, "memory_mib": 200},
            ],
            "traces": [
                {"at_token": 2, "link": ["a", "b"], "bandwidth_mbit": 50},
                {"at_token": 3, "device": "c", "fail": True},
            ],
        },
        "split",
    )
    tokens: list[proto.Progress] = []
    with Mosquitto() as broker:
        outcome, driver, controller, stderr = _run_split(tmp_path, scenario, broker, tokens.append)
    assert outcome.ok, outcome.error
    result = outcome.result
    assert result["output_token_ids"] == reference_ids(), stderr
    assert result["recoveries"] == 1  # c was killed by the driver and its blocks re-placed
    assert driver.world.failed == ["c"]
    assert [p.token for p in tokens] == list(range(1, SCENARIO["generate_tokens"] + 1))
    assert [p.token_id for p in tokens] == result["output_token_ids"]
    assert controller.returncode == 0


def test_controller_driver_and_agents_get_over_a_restarted_broker(tmp_path: Path) -> None:
    # the world's turns after the restart (token 4) must still reach the driver, once
    scenario = parse_scenario(
        {**SCENARIO, "traces": [{"at_token": 4, "link": ["a", "b"], "bandwidth_mbit": 50}]},
        "split",
    )
    with Mosquitto() as broker:

        def restart_once(progress: proto.Progress) -> None:
            # on the driver's loop, mid-generation: every role loses the broker, and the
            # new one has no retained placement, status or session of the old one
            if progress.token == 2:
                broker.stop()
                broker.start()

        outcome, driver, controller, stderr = _run_split(tmp_path, scenario, broker, restart_once)
    assert outcome.ok, outcome.error
    result = outcome.result
    assert result["output_token_ids"] == reference_ids(), stderr  # nothing lost, nothing twice
    assert result["broker_losses"] == 1 and driver.broker_losses == 1
    assert result["recoveries"] == 0
    assert controller.returncode == 0
