"""Rendering a scenario into a docker compose project (no container is started here)."""

from __future__ import annotations

import json
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
    mosquitto_conf,
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


def _option(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


def test_a_dilated_testbed_runs_every_device_and_link_k_times_slower() -> None:
    scenario, options = _demo(time_dilation=2.0)
    doc = render(scenario, options)
    services = doc["services"]
    for d in scenario.devices:
        command = services[d.name]["command"]
        assert services[d.name]["cpus"] == pytest.approx(d.compute_gflops / 7.0 / 2, abs=0.001)
        assert float(_option(command, "--cpu-share")) == services[d.name]["cpus"]
        assert float(_option(command, "--gflops")) == pytest.approx(d.compute_gflops / 2)
        assert _option(command, "--time-dilation") == "2"
    # the controller reports in scenario time, the driver shapes the links / k
    assert _option(services["controller"]["command"], "--time-dilation") == "2"
    assert _option(services["testbed"]["command"], "--time-dilation") == "2"
    assert doc["x-edgepart"]["time_dilation"] == 2.0
    # without dilation no role is told one
    plain = render(*_demo())
    assert "time_dilation" not in plain["x-edgepart"]
    for name in ("controller", "testbed", *scenario.device_names):
        assert "--time-dilation" not in plain["services"][name]["command"]


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
    # nobody anonymous; the passwords are generated at render time, never committed
    assert "\nallow_anonymous false\n" in MOSQUITTO_CONF


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


def _auth_path(command: list[str]) -> str:
    return command[command.index("--broker-auth") + 1]


@pytest.mark.parametrize("tls", [False, True])
def test_every_role_logs_in_with_its_own_mounted_credentials(tls: bool) -> None:
    scenario, options = _demo(tls=tls)
    doc = render(scenario, options)
    services = doc["services"]
    port = 8883 if tls else 1883
    roles = {"controller": "controller", "testbed": "driver"}
    roles.update({d: f"agent-{d}" for d in scenario.device_names})
    for service, identity in roles.items():
        command = services[service]["command"]
        assert command[command.index("--broker") + 1] == f"broker:{port}"
        assert _auth_path(command) == f"/run/secrets/mqtt-{identity}"
        # its own credentials and nobody else's (agents: and the testbed's data-plane key)
        key = ["dataplane-key"] if identity.startswith("agent-") else []
        assert services[service]["secrets"] == [
            f"mqtt-{identity}",
            *(["broker-ca"] if tls else []),
            *key,
        ]
        if key:
            assert command[command.index("--dataplane-key") + 1] == "/run/secrets/dataplane-key"
    tls_files = ["broker-cert", "broker-key"] if tls else []
    assert services["broker"]["secrets"] == ["broker-passwd", "broker-acl", *tls_files]
    used = {s for service in services.values() for s in service.get("secrets", [])}
    assert used == set(doc["secrets"])
    assert all(v == {"file": f"./secrets/{k}"} for k, v in doc["secrets"].items())
    conf = mosquitto_conf(tls=tls).splitlines()
    assert "allow_anonymous false" in conf and f"listener {port}" in conf


def test_swarm_gets_the_same_secrets() -> None:
    scenario, options = _demo(swarm=True)
    doc = render(scenario, options)
    assert set(doc["secrets"]) >= {"broker-passwd", "broker-acl", "mqtt-controller"}
    assert doc["services"]["broker"]["secrets"] == ["broker-passwd", "broker-acl"]
    for d in scenario.device_names:
        assert doc["services"][d]["secrets"] == [f"mqtt-agent-{d}", "dataplane-key"]


def test_the_project_holds_the_secrets_but_no_password_is_in_its_files(tmp_path: Path) -> None:
    scenario, options = _demo()
    write_project(scenario, DEMO.read_text(), tmp_path, options)
    secrets_dir = tmp_path / "secrets"
    doc = yaml.safe_load((tmp_path / "compose.yaml").read_text())
    assert all((secrets_dir / name).is_file() for name in doc["secrets"])
    passwords = {
        name: json.loads((secrets_dir / name).read_text())["password"]
        for name in doc["secrets"]
        if name.startswith("mqtt-")
    }
    # compose.yaml, mosquitto.conf, prometheus.yml, scenario.yaml
    public = "".join(p.read_text() for p in tmp_path.iterdir() if p.is_file())
    assert not [name for name, pw in passwords.items() if pw in public]
    assert (tmp_path / "mosquitto.conf").read_text() == MOSQUITTO_CONF
    # a second render (e.g. `testbed up` again) keeps the running testbed's passwords
    write_project(scenario, DEMO.read_text(), tmp_path, options)
    again = {n: json.loads((secrets_dir / n).read_text())["password"] for n in passwords}
    assert again == passwords
    write_project(scenario, DEMO.read_text(), tmp_path, options, rotate_secrets=True)
    rotated = {n: json.loads((secrets_dir / n).read_text())["password"] for n in passwords}
    assert all(rotated[n] != passwords[n] for n in passwords)


def test_a_device_that_joins_later_waits_for_its_join_file() -> None:
    scenario, options = _demo()
    late = parse_scenario(
        {
            **yaml.safe_load(scenario.to_yaml()),
            "traces": [{"at_token": 5, "device": "pi4", "join": True}],
        },
        "late",
    )
    services = render(late, options)["services"]
    command = services["pi4"]["command"]
    assert command[command.index("--join-file") + 1] == "/tmp/edgepart-join"
    assert all("--join-file" not in services[d]["command"] for d in ("laptop", "minipc"))
