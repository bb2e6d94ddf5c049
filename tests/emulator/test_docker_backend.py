"""The docker backend end to end: device containers limited by cgroups, links shaped with
tc inside them, the broker, controller and emulator driver as compose services.

Needs the Docker engine and compose v2 (``.ci/run`` installs and starts them); the image is
built from this tree once per session (layers cached), so the containers run this code.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from live_e2e import SCENARIO, reference_ids

from edgepart.emulator import docker_cli
from edgepart.emulator.backends.docker import project_resources, run_docker
from edgepart.emulator.compose import project_name
from edgepart.emulator.images import DEFAULT_TAG, build_image, docker_available
from edgepart.emulator.scenario import parse_scenario

pytestmark = pytest.mark.skipif(not docker_available(), reason="the Docker engine is not running")


@pytest.fixture(scope="module")
def image() -> str:
    build_image(DEFAULT_TAG)
    return DEFAULT_TAG


def _run(scenario, algorithm: str, tmp_path: Path, image: str):
    run = run_docker(scenario, scenario.to_yaml(), algorithm, work_dir=tmp_path, image=image)
    left = project_resources(run.project)
    assert left == {"containers": [], "networks": [], "volumes": []}, left
    return run


def test_containers_generate_the_monolithic_ids_and_migrate(tmp_path: Path, image: str) -> None:
    traces = [
        *SCENARIO["traces"],  # burners in b's container, a slower a-c link (tc)
        {"at_token": 3, "device": "b", "memory_mib": 40},  # b must give up its blocks
    ]
    scenario = parse_scenario({**SCENARIO, "traces": traces}, "e2e")
    run = _run(scenario, "myopic", tmp_path, image)
    assert run.result.output_token_ids == reference_ids()
    assert run.result.migrations >= 1
    assert run.result.migration_bytes > 0
    assert len(run.result.per_token_s) == SCENARIO["generate_tokens"] - 1
    assert run.text
    assert set(run.shares) == set(scenario.device_names)


def test_a_killed_container_is_recovered(tmp_path: Path, image: str) -> None:
    scenario = parse_scenario(
        {
            **SCENARIO,
            "devices": [
                {"name": "a", "compute_gflops": 1.0, "memory_mib": 300, "source": True},
                {"name": "b", "compute_gflops": 1.0, "memory_mib": 360},
                {"name": "c", "compute_gflops": 4.0, "memory_mib": 200},
            ],
            "traces": [{"at_token": 3, "device": "c", "fail": True}],
        },
        "e2e-fail",
    )
    run = _run(scenario, "myopic", tmp_path, image)
    assert run.result.recoveries == 1  # docker kill of c's container
    assert run.result.output_token_ids == reference_ids()


def test_a_restarted_broker_container_loses_and_repeats_nothing(tmp_path: Path, image: str) -> None:
    # agents, controller and driver in their containers reconnect; the world's turn after
    # the restart (token 4) still reaches the driver, once
    scenario = parse_scenario(
        {**SCENARIO, "traces": [{"at_token": 4, "link": ["a", "b"], "bandwidth_mbit": 50}]},
        "e2e-broker",
    )
    project = f"{project_name(scenario)}-{os.getpid()}"
    restarted: list[str] = []

    def on_line(line: str) -> None:
        if line.startswith("token 2") and not restarted:
            with docker_cli.client() as sdk:
                (broker,) = docker_cli.project_containers(sdk, project, "broker")
                broker.restart(timeout=0)
                restarted.append(broker.name)

    run = run_docker(
        scenario, scenario.to_yaml(), "myopic", work_dir=tmp_path, image=image, on_line=on_line
    )
    assert restarted
    assert run.result.broker_losses == 1
    assert run.result.output_token_ids == reference_ids()  # nothing lost, nothing twice
    assert run.result.recoveries == 0
    assert project_resources(run.project) == {"containers": [], "networks": [], "volumes": []}


def test_devices_join_in_containers(tmp_path: Path, image: str) -> None:
    # d's agent waits in its container until its join; c's container is killed, then
    # started again (a fresh agent, holding nothing)
    scenario = parse_scenario(
        {
            **SCENARIO,
            "devices": [
                {"name": "a", "compute_gflops": 1.0, "memory_mib": 300, "source": True},
                {"name": "b", "compute_gflops": 1.0, "memory_mib": 360},
                {"name": "c", "compute_gflops": 4.0, "memory_mib": 200},
                {"name": "d", "compute_gflops": 4.0, "memory_mib": 200},
            ],
            "traces": [
                {"at_token": 2, "device": "d", "join": True},
                {"at_token": 3, "device": "c", "fail": True},
                {"at_token": 4, "device": "c", "join": True},
            ],
        },
        "e2e-join",
    )
    run = _run(scenario, "myopic", tmp_path, image)
    assert run.result.output_token_ids == reference_ids()
    assert run.result.recoveries <= 1  # c's loss, if it held blocks then
    assert run.result.detection_s  # the controller saw c go
    assert "d" in run.result.peak_memory_bytes  # d reported once it joined


def test_a_container_cut_off_the_source_is_recovered(tmp_path: Path, image: str) -> None:
    # the driver cuts the a-c link (frames held in the agents); the controller learns of
    # it only from a's probes, takes c for lost, and uses it again once the link is back
    scenario = parse_scenario(
        {
            **SCENARIO,
            "generate_tokens": 12,
            "devices": [
                {"name": "a", "compute_gflops": 1.0, "memory_mib": 300, "source": True},
                {"name": "b", "compute_gflops": 1.0, "memory_mib": 360},
                {"name": "c", "compute_gflops": 4.0, "memory_mib": 200},
            ],
            "traces": [
                {"at_token": 2, "link": ["a", "c"], "bandwidth_mbit": 0},
                {"at_token": 4, "link": ["a", "c"], "bandwidth_mbit": 1000},
            ],
        },
        "e2e-cut",
    )
    run = _run(scenario, "myopic", tmp_path, image)
    assert run.result.output_token_ids == reference_ids(12)
    assert run.result.recoveries == 1
