"""Render a scenario into a docker compose project: the testbed as files, nothing started.

The project holds nothing of the host it was rendered on, so the committed ``compose/``
runs on any host once the image is built (``edgepart testbed build``), offline:

- ``calibrate`` (one-shot, no network) measures this CPU's block speeds into ``./cache``
  (skipped when a profile of this CPU is there) and derives from them and the host's
  cores the time dilation k the world runs at and each device's CPU share of this host
  (``start_options``): a file per service under ``./cache/start`` that the devices'
  agents, the controller and the driver add to their command lines at start;
- ``secrets`` (one-shot, no network) makes the broker's identities, one named volume per
  role (``edgepart.emulator.testbed_secrets.write_role_secrets``);
- the ``broker`` runs Debian's mosquitto from the edgepart image (no registry), limited to
  the testbed's identities, each allowed only its part (passwords, ACL);
- one service per device (its agent: paced to its CPU share, its memory budget plus the
  agent's runtime as ``mem_limit``, ``NET_ADMIN`` to shape its own links with tc); the
  agents share one named volume of dequantised block weights (``edgepart.llm.weight_cache``);
- the ``controller``, and the ``testbed`` service, the emulator driver: it applies the
  traces and prints and saves the results, so ``docker compose up testbed`` runs the
  whole experiment, and ``--exit-code-from testbed`` ends with the driver's exit code
  (every other service is ``attach: false``: only the driver's output is shown).

The broker and the agents have healthchecks; what needs them waits until they are healthy.
Every service sits on one ``internal: true`` network: nothing leaves the testbed. Under
the profile ``observability``: Prometheus and Grafana, provisioned from ``./grafana``
(``write_project`` copies ``compose/grafana`` there); Grafana alone is also on a second
network whose port is published on the host's loopback (127.0.0.1:3000), since Docker
publishes nothing of a container that is only on internal networks.

``RenderOptions.reference_gflops`` freezes the shares into the file instead (``cpus`` and
``--cpu-share``): for a Docker Swarm stack (``--swarm``: the same file plus ``deploy``
sections, for ``docker stack deploy``; a stack has no start-up step) and for the docker
backend, which renders for this host and runs at once. With ``--tls`` the secrets are made
at render time instead (their certificates need openssl, which the image lacks), as files
under ``secrets/`` mounted as compose secrets; a stack gets the same files.

Under time dilation k (a host too small for the scenario's devices: chosen at start-up by
the calibrate service, or ``RenderOptions.time_dilation`` with the shares frozen) every
device gets its share / k and its speed / k, the driver shapes links at their rate / k and
latency x k, and the controller reports in scenario time.

``render`` is pure (scenario in, documents out); ``write_project`` puts them on disk.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from edgepart.control_plane import protocol as proto
from edgepart.emulator import testbed_secrets as sec
from edgepart.emulator.scenario import Device, GgufModel, HfModel, PresetModel, Scenario

IMAGE = "edgepart:latest"
#: an upstream broker image `--broker-image` may name instead of the edgepart image's
#: Debian mosquitto (it has no healthcheck here: what needs the broker waits for its start)
BROKER_IMAGE = "eclipse-mosquitto:2"
#: the observability images, from the user's engine (never built, never needed by the run);
#: the compose file reads them from these variables, these images by default
PROMETHEUS_IMAGE = ("PROMETHEUS_IMAGE", "prom/prometheus:v2.53.0")
GRAFANA_IMAGE = ("GRAFANA_IMAGE", "grafana/grafana:11.1.0")
GRAFANA_PORT = 3000  # published on the host's loopback only
BROKER_PORT = 1883
BROKER_TLS_PORT = 8883  # the broker's only port with --tls
DATA_PORT = 7000  # every agent's data plane, inside its own container
METRICS_PORT = 9400  # every edgepart process's /metrics, inside its own container
#: what an agent holds beside its blocks (Python, torch, the opened checkpoint), MiB;
#: measured: an idle agent of SmolLM2-135M is 450 MiB resident
AGENT_RUNTIME_MIB = 640
NETWORK = "testbed"
#: Grafana's second network: not internal, so Docker can publish its port (on loopback)
PUBLISHED_NETWORK = "published"
#: where the project directory is mounted in the edgepart containers
TESTBED_DIR = "/testbed"
CACHE_DIR = "/cache"
#: the named volume of dequantised block weights every agent reads and fills, and its mount
WEIGHTS_VOLUME = "weights"
WEIGHT_CACHE_DIR = "/weight-cache"
PROFILE = f"{CACHE_DIR}/profile.json"
#: where the calibrate service leaves each device's start-up options (under the cache)
START_DIR = "start"
#: where the secrets service mounts the roles' volumes
SECRETS_SETUP_DIR = "/secrets"
#: a share below this cannot run a token in reasonable time (and docker rounds to 0.01)
MIN_CPUS = 0.01
#: the dashboards and their provisioning: copied into every project (``write_project``)
GRAFANA_SOURCE = Path(__file__).resolve().parents[2] / "compose" / "grafana"
GRAFANA_PARTS = ("provisioning", "dashboards")


@dataclass(frozen=True)
class RenderOptions:
    """How to render: images, the algorithm, and whether the shares are frozen."""

    algorithm: str = "myopic"
    image: str = IMAGE
    broker_image: str | None = None  # None: the edgepart image (Debian's mosquitto)
    #: this CPU's speed per core (GFLOP/s, host profile): freezes each device's share into
    #: the file; None: the calibrate service derives them at start-up on the host that runs
    #: the project (a swarm stack has no start-up step: it needs the speed)
    reference_gflops: float | None = None
    swarm: bool = False
    scenario_file: str = "scenario.yaml"
    project: str | None = None  # compose project / stack name (default: from the scenario)
    tls: bool = False  # the broker speaks only TLS (its own CA, in secrets/)
    #: the world runs this many times slower than the scenario (k >= 1; with
    #: ``reference_gflops`` only: otherwise the calibrate service chooses k at start-up)
    time_dilation: float = 1.0

    @property
    def secrets_at_start(self) -> bool:
        """Whether the secrets service makes the secrets at start-up (else: files of the
        render, under secrets/)."""
        return not (self.tls or self.swarm)


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


def start_options(
    scenario: Scenario, reference_gflops: float, cores: float
) -> tuple[float, dict[str, list[str]]]:
    """What the calibrate service adds at start-up to the command lines of the devices'
    agents, the controller and the driver (``testbed``), from this host's speed per core
    (GFLOP/s) and its cores: the time dilation k the world runs at (the least that fits,
    ``host_limits.fit_scenario``) and the options. Each agent gets its CPU share of this
    host and its speed / k; every role is told k when it is not 1. Raises HostTooSmall."""
    from edgepart.emulator.host_limits import fit_scenario

    k = fit_scenario(scenario, reference_gflops, cores).time_dilation
    told = _dilation_option(k)
    shares = cpus(scenario, reference_gflops, k)
    options = {
        d.name: ["--cpu-share", _number(shares[d.name]), "--gflops", _number(d.compute_gflops / k),
                 *told]
        for d in scenario.devices
    }  # fmt: skip
    return k, {**options, "controller": told, "testbed": told}


def _dilation_option(k: float) -> list[str]:
    """The option that tells a role the world's time dilation k (none at k = 1)."""
    return ["--time-dilation", _number(k)] if k != 1.0 else []


def _dilated(options: RenderOptions) -> list[str]:
    """The dilation option of a render whose k is known (``RenderOptions.time_dilation``)."""
    return _dilation_option(options.time_dilation)


def mem_limit_mib(memory_mib: float) -> int:
    """A device container's memory limit (MiB): its block budget plus the agent's runtime."""
    return round(memory_mib) + AGENT_RUNTIME_MIB


def render(scenario: Scenario, options: RenderOptions) -> dict[str, Any]:
    """The compose document (a dict ready for YAML) of a scenario's testbed."""
    model = container_model_ref(scenario)
    project = options.project or project_name(scenario)
    if options.swarm and options.reference_gflops is None:
        raise ValueError("a swarm stack has no start-up step: render it with this CPU's speed")
    if options.time_dilation != 1.0 and options.reference_gflops is None:
        raise ValueError("a time dilation needs this CPU's speed: without it the calibrate "
                         "service chooses one at start-up")  # fmt: skip
    shares = (
        None
        if options.reference_gflops is None
        else cpus(scenario, options.reference_gflops, options.time_dilation)
    )
    roles = (sec.BROKER, *sec.identities(scenario.device_names))
    services: dict[str, Any] = {
        "calibrate": _calibrate(options),
        **({"secrets": _secrets_setup(options, roles)} if options.secrets_at_start else {}),
        "broker": _broker(options),
        **{
            d.name: _agent(scenario, d, options, model, None if shares is None else shares[d.name])
            for d in scenario.devices
        },
        "controller": _controller(scenario, options),
        "testbed": _driver(scenario, options, project),
        **_observability(options),
    }
    networks: dict[str, Any] = {NETWORK: {"internal": True}, PUBLISHED_NETWORK: _PUBLISHED}
    volumes: dict[str, Any] = {WEIGHTS_VOLUME: {}}
    if options.secrets_at_start:
        volumes.update({_secrets_volume(role): {} for role in roles})
    about = {"scenario": scenario.name, "algorithm": options.algorithm}
    if options.reference_gflops is not None:
        # the CPU speed the frozen shares were computed with: re-render on another machine
        about["reference_gflops"] = round(options.reference_gflops, 4)
    if options.time_dilation != 1:
        about["time_dilation"] = options.time_dilation
    document = {
        "name": project,
        "x-edgepart": about,
        "services": services,
        "networks": networks,
        "volumes": volumes,
    }
    if not options.secrets_at_start:
        # compose bind-mounts each file under /run/secrets (swarm: its own secret store)
        document["secrets"] = {
            name: {"file": f"./{sec.SECRETS_DIR}/{name}"}
            for name in sec.secret_names(scenario.device_names, options.tls)
        }
    if options.swarm:
        assert shares is not None
        _to_swarm(document, shares)
        # stack files are compose file format 3: `version` tells the CLI to read them so
        document = {"version": "3.8", **document}
    return document


_WEIGHTS_MOUNT = f"{WEIGHTS_VOLUME}:{WEIGHT_CACHE_DIR}"
#: Docker publishes this network's ports on the host's loopback unless told otherwise
_PUBLISHED = {"driver_opts": {"com.docker.network.bridge.host_binding_ipv4": "127.0.0.1"}}
#: how compose learns that a role serves: a TCP connect to its port from inside the
#: container (bash, no client tool needed). The first success within start_period (torch
#: and the model load slowly on a small host) makes it healthy; later checks cost ~1 ms.
_HEALTH_TIMING = {"interval": "2s", "timeout": "5s", "retries": 3, "start_period": "10m"}


def _healthcheck(port: int) -> dict[str, Any]:
    return {"test": ["CMD", "bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"], **_HEALTH_TIMING}


def _common(options: RenderOptions) -> dict[str, Any]:
    """What every edgepart service has: the image, where the profile's cache is, and no
    output of its own on `docker compose up` (the driver's is the experiment's)."""
    return {"image": options.image, "environment": {"EDGEPART_CACHE": CACHE_DIR}, "attach": False}


def _broker_image(options: RenderOptions) -> str:
    return options.broker_image or options.image


def _ready(options: RenderOptions) -> dict[str, Any]:
    """What an edgepart role waits for: the profile, its secrets, a broker that answers."""
    broker = "service_healthy" if _broker_image(options) == options.image else "service_started"
    done = {"condition": "service_completed_successfully"}
    return {
        "calibrate": done,
        **({"secrets": done} if options.secrets_at_start else {}),
        "broker": {"condition": broker},
    }


def _broker_address(options: RenderOptions) -> str:
    """The broker's host:port on the testbed network."""
    return f"broker:{_broker_port(options)}"


def _broker_port(options: RenderOptions) -> int:
    return BROKER_TLS_PORT if options.tls else BROKER_PORT


def _scenario_path(options: RenderOptions) -> str:
    """Where the calibrate service, the controller and the driver read the scenario."""
    return f"{TESTBED_DIR}/{options.scenario_file}"


def _scenario_mount(options: RenderOptions) -> str:
    return f"./{options.scenario_file}:{_scenario_path(options)}:ro"


def _calibrate(options: RenderOptions) -> dict[str, Any]:
    """The one-shot service that measures this host and writes each device's share."""
    return {
        **_common(options),
        "command": ["testbed", "calibrate", _scenario_path(options), "--out", CACHE_DIR],
        "volumes": [_scenario_mount(options), f"./cache:{CACHE_DIR}"],
        "network_mode": "none",
    }


def _secrets_volume(role: str) -> str:
    return f"secrets-{role}"


def _secrets_setup(options: RenderOptions, roles: tuple[str, ...]) -> dict[str, Any]:
    """The one-shot service that makes the secrets, each role's in its own volume."""
    path = _scenario_path(options)
    return {
        **_common(options),
        "command": ["testbed", "secrets", path, "--out", SECRETS_SETUP_DIR],
        "volumes": [
            _scenario_mount(options),
            *(f"{_secrets_volume(role)}:{SECRETS_SETUP_DIR}/{role}" for role in roles),
        ],
        "network_mode": "none",
    }


def _role_secrets(role: str, options: RenderOptions) -> tuple[list[str], dict[str, Any]]:
    """How a role gets its secrets: its own volume (a mount), or the render's files."""
    if options.secrets_at_start:
        return [f"{_secrets_volume(role)}:{sec.MOUNT_DIR}:ro"], {}
    return [], {"secrets": list(sec.role_secrets(role, options.tls))}


def _with_start_options(name: str) -> list[str]:
    """The entrypoint that runs `edgepart` with the options the calibrate service wrote for
    this service at start-up appended (option names and numbers: word splitting is safe).
    ``$$`` is compose's escape of the shell's ``$``."""
    script = 'options=$$(cat "$$0") && exec edgepart "$$@" $$options'
    return ["sh", "-c", script, f"{CACHE_DIR}/{START_DIR}/{name}"]


def _agent(
    scenario: Scenario, device: Device, options: RenderOptions, model: str, share: float | None
) -> dict[str, Any]:
    """A device's service: its agent at its CPU share (cores; None: the one the calibrate
    service derived on this host) and its memory limit."""
    name = device.name
    identity = sec.agent_user(name)
    command = [
        "agent", "--name", name, "--broker", _broker_address(options),
        *_broker_auth(identity),
        "--dataplane-key", f"{sec.MOUNT_DIR}/{sec.DATAPLANE_KEY}",
        *(["--join-file", proto.JOIN_FILE] if name in scenario.offline_at_start else []),
        "--listen", f"0.0.0.0:{DATA_PORT}", "--advertise", f"{name}:{DATA_PORT}",
        "--testbed", testbed_name(scenario), "--model", model,
        "--memory-mib", _number(device.memory_mib),
        *(_share_and_speed(device, share, options) if share is not None else []),
        "--profile", PROFILE, "--metrics-port", str(METRICS_PORT), "--shaping", "tc",
        "--weight-cache", WEIGHT_CACHE_DIR,
    ]  # fmt: skip
    secret_mounts, secret_files = _role_secrets(identity, options)
    service: dict[str, Any] = {**_common(options), "hostname": name}
    if share is None:
        service["entrypoint"] = _with_start_options(name)
    service["command"] = command
    if share is not None:
        service["cpus"] = share
    return {
        **service,
        "mem_limit": f"{mem_limit_mib(device.memory_mib)}m",
        "cap_add": ["NET_ADMIN"],
        "volumes": [f"./cache:{CACHE_DIR}:ro", _WEIGHTS_MOUNT, *secret_mounts],
        "networks": [NETWORK],
        # the metrics port opens once tc and the data plane are set up (a device that
        # joins later opens it too, then waits for its join)
        "healthcheck": _healthcheck(METRICS_PORT),
        "depends_on": _ready(options),
        **secret_files,
    }


def _share_and_speed(device: Device, share: float, options: RenderOptions) -> list[str]:
    """A device agent's CPU share (cores), speed (GFLOP/s) and the world's dilation, when
    they are known at render time (the calibrate service writes them otherwise)."""
    speed = _number(device.compute_gflops / options.time_dilation)
    return ["--cpu-share", _number(share), "--gflops", speed, *_dilated(options)]


def _told_at_start(name: str, command: list[str], options: RenderOptions) -> dict[str, Any]:
    """A role's command with the world's dilation: on it when known at render time, else
    read at start-up from what the calibrate service wrote for ``name``."""
    if options.reference_gflops is not None:
        return {"command": [*command, *_dilated(options)]}
    return {"entrypoint": _with_start_options(name), "command": command}


def _controller(scenario: Scenario, options: RenderOptions) -> dict[str, Any]:
    """The controller's service: it plans and runs the job, the world left to the driver."""
    command = [
        "controller", "--scenario", _scenario_path(options), "--broker", _broker_address(options),
        *_broker_auth(sec.CONTROLLER),
        "--algorithm", options.algorithm, "--testbed", testbed_name(scenario),
        "--profile", PROFILE, "--metrics-port", str(METRICS_PORT), "--metrics-host", "0.0.0.0",
        "--world-driver", "--json",
    ]  # fmt: skip
    secret_mounts, secret_files = _role_secrets(sec.CONTROLLER, options)
    return {
        **_common(options),
        **_told_at_start("controller", command, options),
        "volumes": [_scenario_mount(options), f"./cache:{CACHE_DIR}:ro", *secret_mounts],
        "networks": [NETWORK],
        "depends_on": _ready(options),
        **secret_files,
    }


def _driver(scenario: Scenario, options: RenderOptions, project: str) -> dict[str, Any]:
    """The ``testbed`` service, the emulator driver: it applies the traces (``fail`` kills
    a device's container) and saves the result under ./out. The one service attached: its
    output is the experiment's."""
    command = [
        "testbed", "drive", _scenario_path(options), "--broker", _broker_address(options),
        *_broker_auth(sec.DRIVER),
        "--testbed", testbed_name(scenario),
        "--project", project, "--out", f"{TESTBED_DIR}/out",
    ]  # fmt: skip
    secret_mounts, secret_files = _role_secrets(sec.DRIVER, options)
    healthy = {"condition": "service_healthy"}
    return {
        **_common(options),
        "attach": True,
        **_told_at_start("testbed", command, options),
        "volumes": [
            _scenario_mount(options),
            f"./cache:{CACHE_DIR}:ro",
            f"./out:{TESTBED_DIR}/out",
            # the `fail` trace is `docker kill` of the device's container
            "/var/run/docker.sock:/var/run/docker.sock",
            *secret_mounts,
        ],
        "networks": [NETWORK],
        "depends_on": {
            **_ready(options),
            "controller": {"condition": "service_started"},
            **{d.name: healthy for d in scenario.devices},
        },
        **secret_files,
    }


def _broker(options: RenderOptions) -> dict[str, Any]:
    conf = "/mosquitto/config/mosquitto.conf"
    image = _broker_image(options)
    secret_mounts, secret_files = _role_secrets(sec.BROKER, options)
    service: dict[str, Any] = {
        "image": image,
        "attach": False,
        "volumes": [f"./mosquitto.conf:{conf}:ro", *secret_mounts],
        "networks": [NETWORK],
        **({"depends_on": {"secrets": {"condition": "service_completed_successfully"}}}
           if options.secrets_at_start else {}),
        **secret_files,
    }  # fmt: skip
    if image == options.image:
        # no registry: the edgepart image carries Debian's mosquitto, and bash to check it
        service["entrypoint"] = ["mosquitto", "-c", conf]
        service["command"] = []
        service["healthcheck"] = _healthcheck(_broker_port(options))
    else:
        service["command"] = ["mosquitto", "-c", conf]
    return service


def _broker_auth(identity: str) -> list[str]:
    """The option naming a role's credentials file (its path, never the password)."""
    return ["--broker-auth", f"{sec.MOUNT_DIR}/{sec.credentials_secret(identity)}"]


def _image(variable: tuple[str, str]) -> str:
    """An image the user may name by an environment variable (compose interpolation)."""
    name, default = variable
    return f"${{{name}:-{default}}}"


def _observability(options: RenderOptions) -> dict[str, Any]:
    quiet = {"attach": False, "profiles": ["observability"]}
    return {
        "prometheus": {
            "image": _image(PROMETHEUS_IMAGE),
            **quiet,
            "command": ["--config.file=/etc/prometheus/prometheus.yml"],
            "volumes": ["./prometheus.yml:/etc/prometheus/prometheus.yml:ro"],
            "networks": [NETWORK],
        },
        "grafana": {
            "image": _image(GRAFANA_IMAGE),
            **quiet,
            "environment": {
                "GF_AUTH_ANONYMOUS_ENABLED": "true",
                # its network leads out: it asks nobody for updates or news
                "GF_ANALYTICS_REPORTING_ENABLED": "false",
                "GF_ANALYTICS_CHECK_FOR_UPDATES": "false",
                "GF_ANALYTICS_CHECK_FOR_PLUGIN_UPDATES": "false",
                "GF_NEWS_NEWS_FEED_ENABLED": "false",
            },
            "volumes": [
                "./grafana/provisioning:/etc/grafana/provisioning:ro",
                "./grafana/dashboards:/var/lib/grafana/dashboards:ro",
            ],
            "networks": [NETWORK, PUBLISHED_NETWORK],
            "ports": [f"127.0.0.1:{GRAFANA_PORT}:{GRAFANA_PORT}"],
            "depends_on": ["prometheus"],
        },
    }


def _to_swarm(document: dict[str, Any], shares: dict[str, float]) -> None:
    """What ``docker stack deploy`` needs instead: limits under ``deploy``, files as configs
    (every node gets them, bind mounts exist on one), no ordering (the profile ships with
    the stack, so no ``calibrate``), one run (no restarts), the driver on a manager (its
    Docker socket kills containers), an overlay network and nothing published."""
    del document["name"]  # the stack's name is given to `docker stack deploy`
    document["networks"] = {NETWORK: {"internal": True, "driver": "overlay"}}
    document["configs"] = SWARM_CONFIGS
    services = document["services"]
    for name in ("calibrate", "prometheus", "grafana"):
        services.pop(name)
    # DNS round robin, not a virtual IP: a VIP needs the kernel's IPVS, and one replica per
    # service gains nothing from it
    once = {"restart_policy": {"condition": "none"}, "endpoint_mode": "dnsrr"}
    for name, service in services.items():
        service.pop("depends_on", None)
        service.pop("volumes", None)
        service.pop("attach", None)  # a compose option; stack files do not know it
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
        "# With Prometheus and Grafana (http://127.0.0.1:3000):\n"
        "#   docker compose --profile observability up\n"
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
    ``calibrate`` service finds them and skips measuring (the file holds nothing of them).
    Grafana's provisioning is copied into ``grafana/``. A TLS or swarm project's broker
    secrets go into ``secrets/``: kept from an earlier render unless ``rotate_secrets``
    (``edgepart.emulator.testbed_secrets``; SecretsError when TLS files cannot be made); any other
    project makes them at start-up.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for folder in ("cache", "out"):
        # made here, by this user, before docker would make them (as root) for its mounts
        (directory / folder).mkdir(exist_ok=True)
        (directory / folder / ".gitignore").write_text(_STARTUP_IGNORE, encoding="ascii")
    (directory / options.scenario_file).write_text(scenario_text, encoding="utf-8")
    (directory / "mosquitto.conf").write_text(mosquitto_conf(tls=options.tls), encoding="utf-8")
    if not options.secrets_at_start:
        sec.write_secrets(
            directory / sec.SECRETS_DIR,
            testbed_name(scenario),
            scenario.device_names,
            tls=options.tls,
            rotate=rotate_secrets,
        )
    (directory / "prometheus.yml").write_text(prometheus_config(scenario), encoding="utf-8")
    copy_grafana(directory / "grafana")
    if profile is not None and profile.is_file():
        # under its cache name the `calibrate` service finds it; the roles read profile.json
        # (a swarm stack's config). Replaced, not written into: a start-up may have left
        # root's files there
        for name in (profile.name, "profile.json"):
            tmp = directory / "cache" / f".{name}.tmp"
            shutil.copyfile(profile, tmp)
            tmp.replace(directory / "cache" / name)
    path = directory / "compose.yaml"
    path.write_text(dump(render(scenario, options), scenario), encoding="utf-8")
    return path


_STARTUP_IGNORE = "# written at start-up, on the host that runs the project\n*\n!.gitignore\n"


def copy_grafana(target: Path, source: Path = GRAFANA_SOURCE) -> None:
    """Put the dashboards and their provisioning into a project's ``grafana/`` (nothing to
    do when it is the source itself, as for ``compose/``), so its mounts resolve wherever
    the project is."""
    if target.resolve() == source.resolve():
        return
    for part in GRAFANA_PARTS:
        shutil.copytree(source / part, target / part, dirs_exist_ok=True)


def _number(x: float) -> str:
    return f"{x:g}"
