"""Rendering a scenario into a docker compose project (no container is started here;
tests/emulator/test_compose_up.py runs one)."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from edgepart.emulator.compose import (
    AGENT_RUNTIME_MIB,
    GRAFANA_PARTS,
    GRAFANA_PORT,
    METRICS_PORT,
    MOSQUITTO_CONF,
    RenderOptions,
    container_model_ref,
    cpus,
    mosquitto_conf,
    project_name,
    prometheus_config,
    render,
    start_options,
    write_project,
)
from edgepart.emulator.host_limits import RESERVED_CORES
from edgepart.emulator.scenario import load_scenario, parse_scenario
from edgepart.emulator.testbed_secrets import BROKER, identities, role_secrets

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "scenarios" / "demo.yaml"
COMMITTED = REPO / "compose"


def _demo(**options):
    """The demo with its shares frozen from a CPU of 7 GFLOP/s per core (as the docker
    backend renders it)."""
    return load_scenario(DEMO), RenderOptions(reference_gflops=7.0, **options)


def _portable(**options):
    """The demo as `testbed render` writes it: nothing of the host in it."""
    return load_scenario(DEMO), RenderOptions(**options)


def _fake_profile(directory: Path, reference_gflops: float) -> Path:
    """A cached host profile of some CPU (only copied by a render, never read by it)."""
    path = directory / "host-profile-smollm2-135m-1t-0123456789ab.json"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"profile": {"reference_gflops": reference_gflops}}))
    return path


def test_every_device_is_a_limited_container_on_an_internal_network() -> None:
    scenario, options = _demo()
    doc = render(scenario, options)
    services = doc["services"]
    assert doc["networks"]["testbed"] == {"internal": True}
    for d in scenario.devices:
        service = services[d.name]
        assert service["cpus"] == pytest.approx(d.compute_gflops / 7.0, abs=0.001)
        assert service["mem_limit"] == f"{round(d.memory_mib) + AGENT_RUNTIME_MIB}m"
        assert service["cap_add"] == ["NET_ADMIN"]
        assert service["networks"] == ["testbed"]
        assert "--shaping" in service["command"]
    # the driver runs last: every role it needs is up first, the agents healthy
    assert set(services["testbed"]["depends_on"]) == {
        "calibrate", "secrets", "broker", "controller", *scenario.device_names
    }  # fmt: skip
    # nothing but the testbed network and no published port, Grafana aside (its own test)
    for name, service in services.items():
        if name == "grafana":
            continue
        assert "ports" not in service, name
        if name in ("calibrate", "secrets"):
            assert service["network_mode"] == "none"
        else:
            assert service["networks"] == ["testbed"], name
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


def test_a_portable_project_takes_each_share_from_the_host_at_start_up() -> None:
    scenario, options = _portable()
    doc = render(scenario, options)
    services = doc["services"]
    assert "reference_gflops" not in doc["x-edgepart"]
    # the calibrate service measures the host that runs the project and writes the shares
    assert services["calibrate"]["command"][:2] == ["testbed", "calibrate"]
    assert "./cache:/cache" in services["calibrate"]["volumes"]
    for name in (*scenario.device_names, "controller", "testbed"):
        service = services[name]
        assert "cpus" not in service
        for option in ("--cpu-share", "--gflops", "--time-dilation"):
            assert _option(service["command"], option) is None  # known at start-up only
        entrypoint = service["entrypoint"]
        assert entrypoint[:2] == ["sh", "-c"] and entrypoint[-1] == f"/cache/start/{name}"
        # compose would read a single $ as one of its variables
        assert "$$(cat" in entrypoint[2] and 'exec edgepart "$$@"' in entrypoint[2]
        assert any(v.startswith("./cache:/cache") for v in service["volumes"])
    # what the calibrate service writes, on hosts of two speeds with room for the devices
    k, fast = start_options(scenario, 8.0, cores=8.0)
    assert k == 1.0 and fast["laptop"] == ["--cpu-share", "0.375", "--gflops", "3"]
    assert fast["controller"] == [] and fast["testbed"] == []
    _, slow = start_options(scenario, 4.0, cores=8.0)
    assert slow["pi4"][:2] == ["--cpu-share", f"{cpus(scenario, 4.0)['pi4']:g}"]


def test_on_a_host_too_small_the_calibrate_service_dilates_time() -> None:
    scenario, _ = _portable()
    needed = sum(d.compute_gflops for d in scenario.devices) / 4.0  # cores at 4 GFLOP/s each
    cores = RESERVED_CORES + needed / 2  # room for half of it: the world runs 2x slower
    k, options = start_options(scenario, 4.0, cores)
    assert k == pytest.approx(2.0, rel=0.01)
    for d in scenario.devices:
        assert _option(options[d.name], "--gflops") == f"{d.compute_gflops / k:g}"
        assert float(_option(options[d.name], "--cpu-share")) == pytest.approx(
            d.compute_gflops / 4.0 / k, abs=0.001
        )
    for role in (*scenario.device_names, "controller", "testbed"):
        assert float(_option(options[role], "--time-dilation")) == pytest.approx(k)


def test_dilation_without_the_host_speed_is_refused() -> None:
    scenario, options = _portable()
    with pytest.raises(ValueError, match="calibrate service chooses"):
        render(scenario, replace(options, time_dilation=2.0))


def test_the_broker_and_the_agents_are_waited_on_until_healthy() -> None:
    scenario, options = _portable()
    services = render(scenario, options)["services"]
    broker = services["broker"]
    # the edgepart image's own mosquitto: no registry
    assert broker["image"] == "edgepart:latest"
    assert broker["entrypoint"] == ["mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]
    assert broker["healthcheck"]["test"][-1].endswith("/dev/tcp/127.0.0.1/1883")
    for d in scenario.device_names:
        assert services[d]["healthcheck"]["test"][-1].endswith(f"/127.0.0.1/{METRICS_PORT}")
        assert services[d]["depends_on"]["broker"] == {"condition": "service_healthy"}
        assert services["testbed"]["depends_on"][d] == {"condition": "service_healthy"}
    assert services["controller"]["depends_on"]["broker"] == {"condition": "service_healthy"}
    # only the driver's output is shown: `up --exit-code-from testbed` ends with it alone
    assert [n for n, s in services.items() if s.get("attach", True)] == ["testbed"]
    # a broker image of the user's own has no check we know of: its start is waited on
    other = render(scenario, RenderOptions(broker_image="eclipse-mosquitto:2"))["services"]
    assert "healthcheck" not in other["broker"]
    assert other["laptop"]["depends_on"]["broker"] == {"condition": "service_started"}


def test_the_committed_testbed_is_the_render_of_the_demo_scenario(tmp_path: Path) -> None:
    scenario, options = _portable()
    rendered = tmp_path / "compose"
    write_project(scenario, DEMO.read_text(), rendered, options, _fake_profile(tmp_path, 3.0))
    for name in ("compose.yaml", "scenario.yaml", "prometheus.yml", "mosquitto.conf"):
        assert (COMMITTED / name).read_text() == (rendered / name).read_text(), (
            f"compose/{name} is stale: edgepart testbed render scenarios/demo.yaml --out compose"
        )
    for part in GRAFANA_PARTS:
        for path in (COMMITTED / "grafana" / part).rglob("*"):
            if path.is_file():
                copy = rendered / "grafana" / path.relative_to(COMMITTED / "grafana")
                assert copy.read_bytes() == path.read_bytes(), path
    assert (COMMITTED / "scenario.yaml").read_text() == DEMO.read_text()
    # the broker answers at once: without TCP_NODELAY each message waits for a delayed ACK
    assert "\nset_tcp_nodelay true\n" in MOSQUITTO_CONF
    # nobody anonymous; the passwords are made at start-up, never committed
    assert "\nallow_anonymous false\n" in MOSQUITTO_CONF
    # the folders docker bind-mounts exist in a fresh clone, so docker does not make them
    for folder in ("cache", "out"):
        assert (COMMITTED / folder / ".gitignore").read_text() == (
            rendered / folder / ".gitignore"
        ).read_text()


def test_the_render_holds_nothing_of_the_host(tmp_path: Path) -> None:
    # two hosts of different speeds render the same project; only their caches differ
    scenario, options = _portable()
    slow, fast = tmp_path / "slow", tmp_path / "fast"
    write_project(scenario, DEMO.read_text(), slow, options, _fake_profile(tmp_path / "s", 2.5))
    write_project(scenario, DEMO.read_text(), fast, options, _fake_profile(tmp_path / "f", 9.0))
    for name in ("compose.yaml", "scenario.yaml", "prometheus.yml", "mosquitto.conf"):
        assert (slow / name).read_bytes() == (fast / name).read_bytes(), name
    doc = yaml.safe_load((slow / "compose.yaml").read_text())
    assert "reference_gflops" not in doc["x-edgepart"]
    assert not any("cpus" in s for s in doc["services"].values())
    assert "secrets" not in doc  # no file of the render: the secrets service makes them
    assert not (slow / "secrets").exists()
    cached = [next((d / "cache").glob("host-profile-*")).read_text() for d in (slow, fast)]
    assert cached[0] != cached[1]


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
    assert doc["networks"] == {"testbed": {"internal": True, "driver": "overlay"}}
    assert not any("attach" in s for s in doc["services"].values())  # compose only
    # a stack has no start-up step: its shares come with it
    with pytest.raises(ValueError, match="swarm"):
        render(*_portable(swarm=True))
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


def test_grafana_opens_on_loopback_with_its_dashboards_from_any_folder(tmp_path: Path) -> None:
    # a project rendered outside the repository: every Grafana mount resolves inside it
    scenario, options = _portable()
    project = tmp_path / "elsewhere"
    write_project(scenario, DEMO.read_text(), project, options)
    assert REPO not in project.resolve().parents
    doc = yaml.safe_load((project / "compose.yaml").read_text())
    grafana = doc["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":") for v in grafana["volumes"])
    for source in mounts:
        resolved = (project / source).resolve()
        assert resolved.is_dir() and project.resolve() in resolved.parents, source
    provisioning = project / "grafana" / "provisioning"
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "edgepart.yaml").read_text())[
        "providers"
    ]
    # the provider reads the folder the dashboards are mounted at, and they are there
    path = provider["options"]["path"]
    dashboards = [source for source, target in mounts.items() if target == path]
    assert dashboards and list((project / dashboards[0]).glob("*.json"))
    # the datasource is the project's Prometheus, on a network Grafana shares
    assert datasource["url"] == "http://prometheus:9090"
    assert set(doc["services"]["prometheus"]["networks"]) & set(grafana["networks"])
    # published on the host's loopback only, from a network that is not internal (Docker
    # publishes nothing of a container that is only on internal networks)
    assert grafana["ports"] == [f"127.0.0.1:{GRAFANA_PORT}:{GRAFANA_PORT}"]
    published = [n for n in grafana["networks"] if not doc["networks"][n].get("internal")]
    assert published == ["published"]
    options_of = doc["networks"]["published"]["driver_opts"]
    assert options_of["com.docker.network.bridge.host_binding_ipv4"] == "127.0.0.1"
    # the image is the user's (never built, never needed by a run), named by a variable
    assert grafana["image"] == "${GRAFANA_IMAGE:-grafana/grafana:11.1.0}"
    assert doc["services"]["prometheus"]["image"].startswith("${PROMETHEUS_IMAGE:-")


@pytest.mark.skipif(shutil.which("docker") is None, reason="the docker CLI is not installed")
@pytest.mark.parametrize("frozen", [False, True])
def test_docker_compose_accepts_the_rendered_project(tmp_path: Path, frozen: bool) -> None:
    scenario, options = _demo() if frozen else _portable()
    path = write_project(scenario, DEMO.read_text(), tmp_path, options)
    done = subprocess.run(
        ["docker", "compose", "-f", str(path), "--profile", "observability", "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "is not a docker command" in done.stderr:
        pytest.skip("docker compose v2 is not installed")
    assert done.returncode == 0, done.stderr
    assert "warn" not in done.stderr.lower(), done.stderr  # e.g. a $ compose took for a variable


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
        assert list(role_secrets(identity, tls)) == [
            f"mqtt-{identity}",
            *(["broker-ca"] if tls else []),
            *key,
        ]
        if key:
            assert command[command.index("--dataplane-key") + 1] == "/run/secrets/dataplane-key"
        _assert_mounts_only_its_own(doc, service, identity, tls)
    tls_files = ["broker-cert", "broker-key"] if tls else []
    assert list(role_secrets(BROKER, tls)) == ["broker-passwd", "broker-acl", *tls_files]
    _assert_mounts_only_its_own(doc, "broker", BROKER, tls)
    conf = mosquitto_conf(tls=tls).splitlines()
    assert "allow_anonymous false" in conf and f"listener {port}" in conf


def _assert_mounts_only_its_own(doc: dict, service: str, role: str, tls: bool) -> None:
    """Without TLS a role mounts its own volume of secrets (made at start-up) at
    /run/secrets; with TLS the render's files of its role_secrets, as compose secrets."""
    mounts = [v for v in doc["services"][service]["volumes"] if ":/run/secrets" in v]
    if not tls:
        assert mounts == [f"secrets-{role}:/run/secrets:ro"], service
        assert "secrets" not in doc["services"][service] and "secrets" not in doc
        setup = doc["services"]["secrets"]["volumes"]
        assert f"secrets-{role}:/secrets/{role}" in setup
        return
    assert not mounts, service
    assert doc["services"][service]["secrets"] == list(role_secrets(role, tls))
    used = {s for svc in doc["services"].values() for s in svc.get("secrets", [])}
    assert used == set(doc["secrets"])
    assert all(v == {"file": f"./secrets/{k}"} for k, v in doc["secrets"].items())


def test_the_secrets_service_fills_one_volume_per_role() -> None:
    scenario, options = _portable()
    doc = render(scenario, options)
    setup = doc["services"]["secrets"]
    assert setup["command"][:2] == ["testbed", "secrets"]
    assert setup["network_mode"] == "none"
    roles = (BROKER, *identities(scenario.device_names))
    assert {f"secrets-{r}" for r in roles} <= set(doc["volumes"])
    for service in ("broker", "controller", "testbed", *scenario.device_names):
        assert doc["services"][service]["depends_on"]["secrets"] == {
            "condition": "service_completed_successfully"
        }


def test_swarm_gets_the_same_secrets() -> None:
    scenario, options = _demo(swarm=True)
    doc = render(scenario, options)
    assert set(doc["secrets"]) >= {"broker-passwd", "broker-acl", "mqtt-controller"}
    assert doc["services"]["broker"]["secrets"] == ["broker-passwd", "broker-acl"]
    for d in scenario.device_names:
        assert doc["services"][d]["secrets"] == [f"mqtt-agent-{d}", "dataplane-key"]


def test_the_project_holds_the_secrets_but_no_password_is_in_its_files(tmp_path: Path) -> None:
    scenario, options = _demo(swarm=True)  # a stack's secrets are files of the render
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
