"""Render a scenario into a docker compose project: the testbed as files, nothing started.

One service per device (the agent: its CPU share as ``cpus``, its memory budget plus the
agent's runtime as ``mem_limit``, ``NET_ADMIN`` to shape its own links with tc), an MQTT
broker, the controller, a one-shot ``calibrate`` service that measures this CPU's block
speeds once into ``./cache`` (every role reads them from there), and the ``testbed``
service, the emulator driver: it applies the traces and prints and saves the results, so
``docker compose up testbed`` runs the whole experiment. The agents share one named volume
of dequantised block weights (``llm.weight_cache``): a block built once is read by all.
Under the profile ``observability``: Prometheus and Grafana with the dashboards of
``grafana/``. Every service sits on one ``internal: true`` network: nothing leaves the
testbed. The broker admits only the testbed's identities (controller, driver, one per
agent) and lets each do only its part (``emulator.testbed_secrets``: passwords, ACL,
optional TLS, mounted as compose secrets from ``secrets/``, which ``write_project``
writes).

Under time dilation k (``RenderOptions.time_dilation``, a host too small for the scenario's
devices) every device gets its share / k as ``cpus`` and its speed / k, the driver shapes
links at their rate / k and latency x k, and the controller reports in scenario time.

``render`` is pure (scenario in, documents out); ``write_project`` puts them on disk.
``--swarm`` output is the same file plus ``deploy`` sections, for ``docker stack deploy``.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from control_plane import protocol as proto
from emulator import testbed_secrets as sec
from emulator.scenario import Device, GgufModel, HfModel, PresetModel, Scenario

IMAGE = "edgepart:latest"
BROKER_IMAGE = "eclipse-mosquitto:2"
PROMETHEUS_IMAGE = "prom/prometheus:v2.53.0"
GRAFANA_IMAGE = "grafana/grafana:11.1.0"
BROKER_PORT = 1883
BROKER_TLS_PORT = 8883  # the broker's only port with --tls
DATA_PORT = 7000  # every agent's data plane, inside its own container
METRICS_PORT = 9400  # every edgepart process's /metrics, inside its own container
#: what an agent holds beside its blocks (Python, torch, the opened checkpoint), MiB;
#: measured: an idle agent of SmolLM2-135M is 450 MiB resident
AGENT_RUNTIME_MIB = 640
NETWORK = "testbed"
#: where the project directory is mounted in the edgepart containers
TESTBED_DIR = "/testbed"
CACHE_DIR = "/cache"
#: the named volume of dequantised block weights every agent reads and fills, and its mount
WEIGHTS_VOLUME = "weights"
WEIGHT_CACHE_DIR = "/weight-cache"
PROFILE = f"{CACHE_DIR}/profile.json"
#: a share below this cannot run a token in reasonable time (and docker rounds to 0.01)
MIN_CPUS = 0.01


@dataclass(frozen=True)
class RenderOptions:
    """How to render: images, the algorithm, and this host's speed for the CPU shares."""

    algorithm: str = "myopic"
    image: str = IMAGE
    broker_image: str = BROKER_IMAGE
    reference_gflops: float = 1.0  # this CPU's speed per core (GFLOP/s, host profile)
    swarm: bool = False
    grafana_dir: str = "../grafana"  # relative to the project directory
    scenario_file: str = "scenario.yaml"
    project: str | None = None  # compose project / stack name (default: from the scenario)
    tls: bool = False  # the broker speaks only TLS (its own CA, in secrets/)
    #: the world runs this many times slower than the scenario (k >= 1): see the module
    time_dilation: float = 1.0


def project_name(scenario: Scenario) -> str:
    """The compose project (and swarm stack) name of a scenario's testbed."""
    return "edgepart-" + _slug(scenario.name)


def testbed_name(scenario: Scenario) -> str:
    """The MQTT topic namespace of a scenario's testbed."""
    return _slug(scenario.name)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-") or "testbed"


def container_model_ref(scenario: Scenario) -> str:
    """How the containers name the scenario's model (presets ship in the image)."""
    model = scenario.model
    if isinstance(model, PresetModel):
        return model.preset
    if isinstance(model, GgufModel | HfModel):
        raise ValueError(
            "model: the docker testbed runs the presets the image carries; a checkpoint "
            "file on this host is not inside the containers"
        )
    raise ValueError("model: explicit shapes have no weights to run on the docker testbed")


def cpus(
    scenario: Scenario, reference_gflops: float, time_dilation: float = 1.0
) -> dict[str, float]:
    """Each device's CPU share (cores) from its GFLOP/s and this CPU's speed per core, in a
    world time_dilation times slower than the scenario."""
    if reference_gflops <= 0:
        raise ValueError(f"reference speed must be positive, got {reference_gflops} GFLOP/s")
    return {
        d.name: max(MIN_CPUS, round(d.compute_gflops / reference_gflops / time_dilation, 3))
        for d in scenario.devices
    }


def _dilated(options: RenderOptions) -> list[str]:
    """The option that tells a role the world's time dilation (none at k = 1)."""
    k = options.time_dilation
    return ["--time-dilation", _number(k)] if k != 1.0 else []


def mem_limit_mib(memory_mib: float) -> int:
    """A device container's memory limit (MiB): its block budget plus the agent's runtime."""
    return round(memory_mib) + AGENT_RUNTIME_MIB


def render(scenario: Scenario, options: RenderOptions) -> dict[str, Any]:
    """The compose document (a dict ready for YAML) of a scenario's testbed."""
    model = container_model_ref(scenario)
    project = options.project or project_name(scenario)
    shares = cpus(scenario, options.reference_gflops, options.time_dilation)
    services: dict[str, Any] = {
        "calibrate": {
            **_common(options),
            "command": ["calibrate", "--model", model, "--out", PROFILE],
            "volumes": [f"./cache:{CACHE_DIR}"],
            "network_mode": "none",
        },
        "broker": _broker(options),
        **{d.name: _agent(scenario, d, options, model, shares[d.name]) for d in scenario.devices},
        "controller": _controller(scenario, options),
        "testbed": _driver(scenario, options, project),
        **_observability(options),
    }
    network: dict[str, Any] = {"internal": True}
    if options.swarm:
        network["driver"] = "overlay"
        _to_swarm(services, shares, scenario)
    document = {
        "name": project,
        "x-edgepart": {
            "scenario": scenario.name,
            "algorithm": options.algorithm,
            # the CPU speed the shares were computed with: re-render on another machine
            "reference_gflops": round(options.reference_gflops, 4),
            **({"time_dilation": options.time_dilation} if options.time_dilation != 1 else {}),
        },
        "services": services,
        "networks": {NETWORK: network},
        "volumes": {WEIGHTS_VOLUME: {}},
        # compose bind-mounts each file under /run/secrets (swarm: its own secret store)
        "secrets": {
            name: {"file": f"./{sec.SECRETS_DIR}/{name}"}
            for name in sec.secret_names(scenario.device_names, options.tls)
        },
        **({"configs": SWARM_CONFIGS} if options.swarm else {}),
    }
    if options.swarm:
        del document["name"]  # the stack's name is given to `docker stack deploy`
        # stack files are compose file format 3: `version` tells the CLI to read them so
        document = {"version": "3.8", **document}
    return document


_WEIGHTS_MOUNT = f"{WEIGHTS_VOLUME}:{WEIGHT_CACHE_DIR}"
#: an edgepart role waits for the calibration's profile
_CALIBRATED = {"calibrate": {"condition": "service_completed_successfully"}}


def _common(options: RenderOptions) -> dict[str, Any]:
    """What every edgepart service has: the image and where the profile's cache is."""
    return {"image": options.image, "environment": {"EDGEPART_CACHE": CACHE_DIR}}


def _broker_address(options: RenderOptions) -> str:
    """The broker's host:port on the testbed network."""
    return f"broker:{BROKER_TLS_PORT if options.tls else BROKER_PORT}"


def _scenario_path(options: RenderOptions) -> str:
    """Where the controller and the driver read the scenario in their container."""
    return f"{TESTBED_DIR}/{options.scenario_file}"


def _agent(
    scenario: Scenario, device: Device, options: RenderOptions, model: str, share: float
) -> dict[str, Any]:
    """A device's service: its agent at its CPU share (cores) and memory limit."""
    name = device.name
    command = [
        "agent", "--name", name, "--broker", _broker_address(options),
        *_broker_auth(sec.agent_user(name)),
        "--dataplane-key", f"{sec.MOUNT_DIR}/{sec.DATAPLANE_KEY}",
        *(["--join-file", proto.JOIN_FILE] if name in scenario.offline_at_start else []),
        "--listen", f"0.0.0.0:{DATA_PORT}", "--advertise", f"{name}:{DATA_PORT}",
        "--testbed", testbed_name(scenario), "--model", model,
        "--memory-mib", _number(device.memory_mib), "--cpu-share", _number(share),
        "--gflops", _number(device.compute_gflops / options.time_dilation),
        "--profile", PROFILE, "--metrics-port", str(METRICS_PORT), "--shaping", "tc",
        "--weight-cache", WEIGHT_CACHE_DIR, *_dilated(options),
    ]  # fmt: skip
    return {
        **_common(options),
        "hostname": name,
        "command": command,
        "cpus": share,
        "mem_limit": f"{mem_limit_mib(device.memory_mib)}m",
        "cap_add": ["NET_ADMIN"],
        "volumes": [f"./cache:{CACHE_DIR}:ro", _WEIGHTS_MOUNT],
        "networks": [NETWORK],
        "depends_on": {"broker": {"condition": "service_started"}, **_CALIBRATED},
        "secrets": [*_client_secrets(sec.agent_user(name), options.tls), sec.DATAPLANE_KEY],
    }


def _controller(scenario: Scenario, options: RenderOptions) -> dict[str, Any]:
    """The controller's service: it plans and runs the job, the world left to the driver."""
    scenario_path = _scenario_path(options)
    command = [
        "controller", "--scenario", scenario_path, "--broker", _broker_address(options),
        *_broker_auth(sec.CONTROLLER),
        "--algorithm", options.algorithm, "--testbed", testbed_name(scenario),
        "--profile", PROFILE, "--metrics-port", str(METRICS_PORT), "--metrics-host", "0.0.0.0",
        "--world-driver", "--json", *_dilated(options),
    ]  # fmt: skip
    return {
        **_common(options),
        "command": command,
        "volumes": [f"./{options.scenario_file}:{scenario_path}:ro", f"./cache:{CACHE_DIR}:ro"],
        "networks": [NETWORK],
        "depends_on": {"broker": {"condition": "service_started"}, **_CALIBRATED},
        "secrets": _client_secrets(sec.CONTROLLER, options.tls),
    }


def _driver(scenario: Scenario, options: RenderOptions, project: str) -> dict[str, Any]:
    """The ``testbed`` service, the emulator driver: it applies the traces (``fail`` kills
    a device's container) and saves the result under ./out."""
    scenario_path = _scenario_path(options)
    command = [
        "testbed", "drive", scenario_path, "--broker", _broker_address(options),
        *_broker_auth(sec.DRIVER),
        "--testbed", testbed_name(scenario),
        "--project", project, "--out", f"{TESTBED_DIR}/out", *_dilated(options),
    ]  # fmt: skip
    return {
        **_common(options),
        "command": command,
        "volumes": [
            f"./{options.scenario_file}:{scenario_path}:ro",
            f"./out:{TESTBED_DIR}/out",
            # the `fail` trace is `docker kill` of the device's container
            "/var/run/docker.sock:/var/run/docker.sock",
        ],
        "networks": [NETWORK],
        "depends_on": {
            "broker": {"condition": "service_started"},
            "controller": {"condition": "service_started"},
            **{d.name: {"condition": "service_started"} for d in scenario.devices},
        },
        "secrets": _client_secrets(sec.DRIVER, options.tls),
    }


def _broker(options: RenderOptions) -> dict[str, Any]:
    conf = "/mosquitto/config/mosquitto.conf"
    service: dict[str, Any] = {
        "image": options.broker_image,
        "volumes": [f"./mosquitto.conf:{conf}:ro"],
        "networks": [NETWORK],
        "secrets": [sec.PASSWD, sec.ACL]
        + ([sec.SERVER_CERT, sec.SERVER_KEY] if options.tls else []),
    }
    if options.broker_image == BROKER_IMAGE:
        service["command"] = ["mosquitto", "-c", conf]
    else:
        # no registry: the edgepart image carries Debian's mosquitto
        service["entrypoint"] = ["mosquitto", "-c", conf]
        service["command"] = []
    return service


def _broker_auth(identity: str) -> list[str]:
    """The option naming a role's credentials file (its path, never the password)."""
    return ["--broker-auth", f"{sec.MOUNT_DIR}/{sec.credentials_secret(identity)}"]


def _client_secrets(identity: str, tls: bool) -> list[str]:
    return [sec.credentials_secret(identity), *([sec.CA_CERT] if tls else [])]


def _observability(options: RenderOptions) -> dict[str, Any]:
    grafana = options.grafana_dir
    return {
        "prometheus": {
            "image": PROMETHEUS_IMAGE,
            "profiles": ["observability"],
            "command": ["--config.file=/etc/prometheus/prometheus.yml"],
            "volumes": ["./prometheus.yml:/etc/prometheus/prometheus.yml:ro"],
            "networks": [NETWORK],
        },
        "grafana": {
            "image": GRAFANA_IMAGE,
            "profiles": ["observability"],
            "environment": {"GF_AUTH_ANONYMOUS_ENABLED": "true"},
            "volumes": [
                f"{grafana}/provisioning:/etc/grafana/provisioning:ro",
                f"{grafana}/dashboards:/var/lib/grafana/dashboards:ro",
            ],
            "networks": [NETWORK],
            "depends_on": ["prometheus"],
        },
    }


def _to_swarm(services: dict[str, Any], shares: dict[str, float], scenario: Scenario) -> None:
    """What ``docker stack deploy`` needs instead: limits under ``deploy``, files as configs
    (every node gets them, bind mounts exist on one), no ordering (the profile ships with
    the stack, so no ``calibrate``), one run (no restarts), the driver on a manager (its
    Docker socket kills containers)."""
    for name in ("calibrate", "prometheus", "grafana"):
        services.pop(name)
    # DNS round robin, not a virtual IP: a VIP needs the kernel's IPVS, and one replica per
    # service gains nothing from it
    once = {"restart_policy": {"condition": "none"}, "endpoint_mode": "dnsrr"}
    for name, service in services.items():
        service.pop("depends_on", None)
        service.pop("volumes", None)
        service["deploy"] = dict(once)
        if name in shares:
            limits = {"cpus": str(shares[name]), "memory": service.pop("mem_limit").upper()}
            service["deploy"]["resources"] = {"limits": limits}
            service.pop("cpus")
            service["configs"] = [{"source": "profile", "target": PROFILE}]
            service["volumes"] = [_WEIGHTS_MOUNT]  # a node's agents share it
    services["broker"]["configs"] = [
        {"source": "mosquitto", "target": "/mosquitto/config/mosquitto.conf"}
    ]
    scenario_file = {"source": "scenario", "target": f"{TESTBED_DIR}/scenario.yaml"}
    services["controller"]["configs"] = [scenario_file, {"source": "profile", "target": PROFILE}]
    driver = services["testbed"]
    driver["configs"] = [scenario_file]
    driver["volumes"] = ["/var/run/docker.sock:/var/run/docker.sock"]
    driver["command"] = [*driver["command"][:-1], "/tmp/out"]  # the result is in its log
    driver["deploy"]["placement"] = {"constraints": ["node.role == manager"]}


SWARM_CONFIGS = {
    "scenario": {"file": "./scenario.yaml"},
    "profile": {"file": "./cache/profile.json"},
    "mosquitto": {"file": "./mosquitto.conf"},
}


def prometheus_config(scenario: Scenario) -> str:
    """Prometheus scrape config of the testbed: the controller and every agent."""
    config = {
        "global": {
            "scrape_interval": "1s",
            "scrape_timeout": "1s",
            "evaluation_interval": "5s",
            "external_labels": {"testbed": testbed_name(scenario)},
        },
        "scrape_configs": [
            {
                "job_name": "edgepart-controller",
                "static_configs": [{"targets": [f"controller:{METRICS_PORT}"]}],
            },
            {
                "job_name": "edgepart-agents",
                "static_configs": [
                    {"targets": [f"{d.name}:{METRICS_PORT}" for d in scenario.devices]}
                ],
            },
            {"job_name": "prometheus", "static_configs": [{"targets": ["localhost:9090"]}]},
        ],
    }
    header = (
        "# Prometheus for the docker testbed (rendered by `edgepart testbed render`): the\n"
        "# controller and every device agent serve /metrics on port "
        f"{METRICS_PORT} of their container.\n"
    )
    return header + yaml.dump(config, Dumper=_Dumper, sort_keys=False, width=100)


def mosquitto_conf(
    *,
    tls: bool = False,
    port: int | None = None,
    host: str | None = None,
    secrets_dir: str = sec.MOUNT_DIR,
) -> str:
    """The broker's mosquitto.conf: only the testbed's identities, each limited by the ACL;
    with ``tls`` only TLS. ``port``, ``host`` and ``secrets_dir`` place it elsewhere (tests
    run the same file on this host's loopback)."""
    port = port if port is not None else BROKER_TLS_PORT if tls else BROKER_PORT
    listener = f"listener {port}" + (f" {host}" if host else "")
    tls_lines = ""
    if tls:
        tls_lines = (
            f"certfile {secrets_dir}/{sec.SERVER_CERT}\nkeyfile {secrets_dir}/{sec.SERVER_KEY}\n"
        )
    return f"""\
# The testbed's broker: reachable only on the testbed's internal network, and only by the
# identities `edgepart testbed render` wrote into secrets/ (mounted under /run/secrets).
{listener}
{tls_lines}allow_anonymous false
password_file {secrets_dir}/{sec.PASSWD}
acl_file {secrets_dir}/{sec.ACL}
# the client id is the identity: none can take over another's session by naming its id
use_username_as_clientid true
# the secrets are bind mounts only their owner may read: the broker stays root in its
# container to read them (mosquitto drops to the user mosquitto before reading otherwise)
user root
persistence false
# without it every message to a client waits ~40 ms for the client's delayed ACK: a token's
# command and reply paid 41 ms over this broker before
set_tcp_nodelay true
log_type error
log_type warning
"""


MOSQUITTO_CONF = mosquitto_conf()


def dump(document: dict[str, Any], scenario: Scenario) -> str:
    """The compose file's text, with a header saying where it came from."""
    header = (
        f"# The docker testbed of scenario {scenario.name!r}, rendered by\n"
        "# `edgepart testbed render`: edit the scenario and render again, not this file.\n"
        "# Run the whole experiment: docker compose up testbed\n"
    )
    return header + yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=100)


class _Dumper(yaml.SafeDumper):
    """Plain YAML for people: no anchors, short lists of scalars on one line."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flat = len(data) <= 6 and all(isinstance(x, str | int | float) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


_Dumper.add_representer(list, _represent_list)


def write_project(
    scenario: Scenario,
    scenario_text: str,
    directory: Path,
    options: RenderOptions,
    profile: Path | None = None,
    rotate_secrets: bool = False,
) -> Path:
    """Write the compose project into directory; returns the compose file's path.

    ``profile``: this host's calibrated block speeds, copied into ``cache/`` so that the
    ``calibrate`` service finds them and skips measuring. The broker's secrets go into
    ``secrets/``: kept from an earlier render unless ``rotate_secrets``
    (``emulator.testbed_secrets``; SecretsError when TLS files cannot be made).
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cache").mkdir(exist_ok=True)
    (directory / "out").mkdir(exist_ok=True)
    (directory / options.scenario_file).write_text(scenario_text, encoding="utf-8")
    (directory / "mosquitto.conf").write_text(mosquitto_conf(tls=options.tls), encoding="utf-8")
    sec.write_secrets(
        directory / sec.SECRETS_DIR,
        testbed_name(scenario),
        scenario.device_names,
        tls=options.tls,
        rotate=rotate_secrets,
    )
    (directory / "prometheus.yml").write_text(prometheus_config(scenario), encoding="utf-8")
    if profile is not None and profile.is_file():
        # under its cache name the `calibrate` service finds it; the roles read profile.json
        shutil.copyfile(profile, directory / "cache" / profile.name)
        shutil.copyfile(profile, directory / "cache" / "profile.json")
    path = directory / "compose.yaml"
    path.write_text(dump(render(scenario, options), scenario), encoding="utf-8")
    return path


def _number(x: float) -> str:
    return f"{x:g}"
