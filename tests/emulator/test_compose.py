"""Rendering a scenario into a docker compose project (no container is started here)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from emulator.compose import (
    AGENT_RUNTIME_MIB,
    METRICS_PORT,
    MOSQUITTO_CONF,
    RenderOptions,
    container_model_ref,
    dump,
    project_name,
    prometheus_config,
    render,
    write_project,
)
from emulator.scenario import load_scenario, parse_scenario

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "scenarios" / "demo.yaml"
COMMITTED = REPO / "compose"


def _demo(**options):
    return load_scenario(DEMO), RenderOptions(reference_gflops=7.0, **options)


def test_every_device_is_a_limited_container_on_an_internal_network() -> None:
    scenario, options = _demo()
    doc = render(scenario, options)
    services = doc["services"]
    assert doc["networks"] == {"testbed": {"internal": True}}
    for d in scenario.devices:
        service = services[d.name]
        assert service["cpus"] == pytest.approx(d.compute_gflops / 7.0, abs=0.001)
        assert service["mem_limit"] == f"{round(d.memory_mib) + AGENT_RUNTIME_MIB}m"
        assert service["cap_add"] == ["NET_ADMIN"]
        assert service["networks"] == ["testbed"]
        assert "--shaping" in service["command"]
    # the driver runs last: every role it needs is up first
    assert set(services["testbed"]["depends_on"]) == {
        "broker", "controller", *scenario.device_names
    }  # fmt: skip
    # nothing but the testbed network: no published port, no default network
    for name, service in services.items():
        assert "ports" not in service, name
        assert service.get("networks", ["testbed"]) == ["testbed"] or name == "calibrate"
    assert services["calibrate"]["network_mode"] == "none"
    assert services["prometheus"]["profiles"] == ["observability"]
    assert services["grafana"]["profiles"] == ["observability"]


def test_the_committed_testbed_is_the_render_of_the_demo_scenario() -> None:
    committed = yaml.safe_load((COMMITTED / "compose.yaml").read_text(encoding="utf-8"))
    scenario = load_scenario(DEMO)
    # shares depend on the CPU the file was rendered on: re-render with that CPU's speed
    options = RenderOptions(reference_gflops=committed["x-edgepart"]["reference_gflops"])
    assert committed == yaml.safe_load(dump(render(scenario, options), scenario)), (
        "compose/compose.yaml is stale: edgepart testbed render scenarios/demo.yaml --out compose"
    )
    assert (COMMITTED / "scenario.yaml").read_text() == DEMO.read_text()
    assert (COMMITTED / "prometheus.yml").read_text() == prometheus_config(scenario)
    # the broker answers at once: without TCP_NODELAY each message waits for a delayed ACK
    assert (COMMITTED / "mosquitto.conf").read_text() == MOSQUITTO_CONF
    assert "\nset_tcp_nodelay true\n" in MOSQUITTO_CONF


def test_prometheus_scrapes_the_controller_and_every_agent() -> None:
    scenario, _ = _demo()
    config = yaml.safe_load(prometheus_config(scenario))
    targets = {
        job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]
    }
    assert targets["edgepart-controller"] == [f"controller:{METRICS_PORT}"]
    assert targets["edgepart-agents"] == [f"{d}:{METRICS_PORT}" for d in scenario.device_names]


def test_swarm_moves_the_limits_under_deploy() -> None:
    scenario, options = _demo(swarm=True)
    doc = render(scenario, options)
    assert doc["networks"]["testbed"] == {"internal": True, "driver": "overlay"}
    for d in scenario.devices:
        service = doc["services"][d.name]
        assert "cpus" not in service and "mem_limit" not in service
        limits = service["deploy"]["resources"]["limits"]
        assert float(limits["cpus"]) == pytest.approx(d.compute_gflops / 7.0, abs=0.001)
        assert limits["memory"] == f"{round(d.memory_mib) + AGENT_RUNTIME_MIB}M"
        assert "depends_on" not in service


def test_a_model_without_weights_in_the_image_is_refused_with_the_reason() -> None:
    data = yaml.safe_load(DEMO.read_text())
    data["model"] = {"layers": 2, "d_model": 64, "heads": 4, "kv_heads": 4, "d_ff": 128,
                     "vocab": 100, "dtype": "float32"}  # fmt: skip
    with pytest.raises(ValueError, match="no weights"):
        container_model_ref(parse_scenario(data, "shapes"))


def test_project_names_are_compose_safe() -> None:
    data = yaml.safe_load(DEMO.read_text())
    data["name"] = "My Lab: 3 Pis!"
    assert project_name(parse_scenario(data, "x")) == "edgepart-my-lab-3-pis"


@pytest.mark.skipif(shutil.which("docker") is None, reason="the docker CLI is not installed")
def test_docker_compose_accepts_the_rendered_project(tmp_path: Path) -> None:
    scenario, options = _demo()
    path = write_project(scenario, DEMO.read_text(), tmp_path, options)
    done = subprocess.run(
        ["docker", "compose", "-f", str(path), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "is not a docker command" in done.stderr:
        pytest.skip("docker compose v2 is not installed")
    assert done.returncode == 0, done.stderr
