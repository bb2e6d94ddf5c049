"""The ``docker`` backend: every device a resource-limited container, links shaped in the kernel.

``run_docker`` renders the scenario into a compose project (``edgepart.emulator.compose``) in a work
directory, starts it with ``docker compose up`` (the ``calibrate`` service first, then the
broker, one agent container per device, the controller and the ``testbed`` driver), follows
the driver's output until it exits, reads the result it saved, and removes every container,
network and volume of the project, also on error or Ctrl-C. The JSON has the local
backend's keys (the emulate keys of docs/design.md). Every docker call goes through
``edgepart.emulator.docker_cli``. A scenario whose devices need more of this host's CPU than it has
free runs time-dilated, as on the local backend (``edgepart.emulator.host_limits.fit_scenario``,
``RenderOptions.time_dilation``); one whose containers cannot fit its memory is refused
(``HostTooSmall``).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgepart.controller.result import RunRecord, RunResult
from edgepart.emulator import docker_cli
from edgepart.emulator.compose import (
    BROKER_IMAGE,
    IMAGE,
    NETWORK,
    RenderOptions,
    container_model_ref,
    project_name,
    write_project,
)
from edgepart.emulator.driver import CONTAINER_ISOLATION
from edgepart.emulator.scenario import Scenario

#: longest `docker compose up -d` (containers created, calibrate finished), s
UP_TIMEOUT_S = 900.0
DOWN_TIMEOUT_S = 180.0
#: longest whole experiment once started, s
RUN_TIMEOUT_S = 3 * 3600.0
CONTROLLER_POLL_S = 2.0  # how often the controller's container is checked during a run, s


class DockerBackendError(docker_cli.DockerError):
    """The docker testbed could not run (exit 1), with what docker said."""


@dataclass
class DockerRun(RunRecord):
    """The record of a docker-backend run, plus where its project lives."""

    backend: str = "docker"
    isolation: str = CONTAINER_ISOLATION
    project: str = ""  # the compose project's name
    directory: Path = Path()  # the rendered project
    logs: str = ""  # the driver's output


def compose(directory: Path, project: str, *args: str, timeout_s: float = 120.0) -> str:
    """Run ``docker compose`` on a project directory; its stdout (DockerBackendError)."""
    cmd = docker_cli.compose_command(project, directory / "compose.yaml", *args)
    what = f"docker compose {' '.join(args)}"
    return docker_cli.run(cmd, timeout_s=timeout_s, what=what, error=DockerBackendError).stdout


def project_resources(project: str) -> dict[str, list[str]]:
    """Containers, networks and volumes docker still has of a compose project (names)."""
    label = docker_cli.sdk_filters([docker_cli.project_label(project)])
    with docker_cli.client() as sdk:
        containers = docker_cli.project_containers(sdk, project, stopped=True)
        return {
            "containers": [c.name for c in containers],
            "networks": [n.name for n in sdk.networks.list(filters=label)],
            "volumes": [v.name for v in sdk.volumes.list(filters=label)],
        }


def service_addresses(project: str) -> dict[str, str]:
    """Each running service's IP address on the project's testbed network."""
    found = {}
    with docker_cli.client() as sdk:
        for container in docker_cli.project_containers(sdk, project):
            service = container.labels.get(docker_cli.SERVICE_LABEL, container.name)
            networks = container.attrs["NetworkSettings"]["Networks"]
            for name, settings in networks.items():
                if name.endswith(f"_{NETWORK}") and settings.get("IPAddress"):
                    found[service] = settings["IPAddress"]
    return found


def down(directory: Path, project: str) -> None:
    """Remove every container, network and volume of the project."""
    compose(
        directory, project, "down", "--volumes", "--remove-orphans", "--timeout", "5",
        timeout_s=DOWN_TIMEOUT_S,
    )  # fmt: skip


def run_docker(
    scenario: Scenario,
    scenario_text: str,
    algorithm: str,
    *,
    work_dir: Path = Path("out/docker"),
    image: str = IMAGE,
    status: Callable[[str], None] | None = None,
    on_line: Callable[[str], None] | None = None,
    on_started: Callable[[dict[str, str]], None] | None = None,
    on_finished: Callable[[], None] | None = None,
    keep: bool = False,
    time_dilation: float | None = None,
) -> DockerRun:
    """Emulate the scenario in containers (the image must exist: ``edgepart testbed build``).

    ``time_dilation`` forces the world's k (at least the least this host needs; None: that
    least, 1 when the devices fit). HostTooSmall when that k is too small or the containers
    cannot fit this host's memory.

    ``on_started`` gets every running service's address on the testbed network once the
    project is up (e.g. for a Prometheus on this host to scrape them); ``on_finished`` is
    called when the driver is done, before anything is removed.
    """
    from edgepart.emulator.compose import AGENT_RUNTIME_MIB
    from edgepart.emulator.host_limits import (
        check_memory,
        fit_scenario,
        free_memory_bytes,
        host_cores,
    )
    from edgepart.emulator.images import ImageBuildError, ensure_current, image_exists
    from edgepart.emulator.scenario import MIB
    from edgepart.llm.host_profile import cache_path, host_profile

    say = status or (lambda _msg: None)
    check_memory(scenario, free_memory_bytes(), AGENT_RUNTIME_MIB * MIB)
    try:
        ensure_current(image, say=say)
    except ImageBuildError as exc:
        raise DockerBackendError(f"the image {image} could not be built: {exc}") from None
    ref = container_model_ref(scenario)
    profile = host_profile(ref, threads=1, progress=say)
    fit = fit_scenario(scenario, profile.reference_gflops, host_cores(), time_dilation)
    if fit.time_dilation > 1.0:
        say(f"time dilation {fit.time_dilation:.2f}: the world runs that many times slower")
    project = f"{project_name(scenario)}-{os.getpid()}"
    broker_image = BROKER_IMAGE if image_exists(BROKER_IMAGE) else image
    options = RenderOptions(
        algorithm=algorithm, image=image, broker_image=broker_image, project=project,
        reference_gflops=profile.reference_gflops, time_dilation=fit.time_dilation,
    )  # fmt: skip
    directory = work_dir / project
    write_project(scenario, scenario_text, directory, options, cache_path(ref, threads=1))
    # the same scenario run again in this process reuses the directory: a result left by
    # an earlier run must not pass for this one's
    (directory / "out" / "result.json").unlink(missing_ok=True)
    try:
        started = time.monotonic()
        say(f"starting {len(scenario.devices)} device containers ({project})")
        compose(directory, project, "up", "--detach", "--quiet-pull", timeout_s=UP_TIMEOUT_S)
        start_s = time.monotonic() - started
        if on_started is not None:
            on_started(service_addresses(project))
        logs = _follow(directory, project, "testbed", on_line)
        if on_finished is not None:
            on_finished()
        saved = _saved_result(directory, project, logs)
    finally:
        if not keep:
            down(directory, project)
    return DockerRun(
        RunResult.from_summary(saved),
        text=saved.get("text", ""),
        shares=fit.dilated_shares,
        start_s=start_s,
        project=project,
        directory=directory,
        logs=logs,
    )


def _saved_result(directory: Path, project: str, logs: str) -> dict:
    """The summary the driver saved once it exited (DockerBackendError when it failed, with
    its output and the controller's last lines)."""
    code = _exit_code(project, "testbed")
    path = directory / "out" / "result.json"
    if code != 0 or not path.is_file():
        controller = compose(directory, project, "logs", "--no-color", "controller")
        tail = docker_cli.tail(controller, 20)
        raise DockerBackendError(
            f"the testbed driver exited with {code}:\n{logs[-2000:]}\ncontroller:\n{tail}"
        )
    saved = json.loads(path.read_text(encoding="utf-8"))
    if "error" in saved:
        raise DockerBackendError(f"the run failed: {saved['error']}")
    return saved


def _follow(
    directory: Path, project: str, service: str, on_line: Callable[[str], None] | None
) -> str:
    """Stream a service's output until its container exits; the whole output."""
    cmd = docker_cli.compose_command(
        project, directory / "compose.yaml",
        "logs", "--follow", "--no-color", "--no-log-prefix", service,
    )  # fmt: skip
    # a silent driver sends no line to check on: the controller is watched on the side
    stop = threading.Event()
    failed: list[int] = []
    watchdog = threading.Thread(target=_watch_controller, args=(project, stop, failed), daemon=True)
    watchdog.start()
    try:
        logs = docker_cli.stream(
            cmd, "the run", timeout_s=RUN_TIMEOUT_S, on_line=on_line,
            error=DockerBackendError, check=False, stop=stop, keep_lines=None,
        )  # fmt: skip
    finally:
        stop.set()
    if failed:
        raise DockerBackendError(
            f"the controller exited with {failed[0]} before the run ended:\n"
            + compose(directory, project, "logs", "--no-color", "--tail", "20", "controller")
        )
    return logs


def _watch_controller(project: str, stop: threading.Event, failed: list[int]) -> None:
    """End the wait on the driver (set stop) when the controller fails: the driver would
    wait for an outcome that never comes."""
    while not stop.wait(CONTROLLER_POLL_S):
        with contextlib.suppress(OSError, docker_cli.DockerError):  # retried at the next poll
            code = _exit_code(project, "controller")
            if code not in (None, 0):
                failed.append(code)
                stop.set()
                return


def _exit_code(project: str, service: str) -> int | None:
    """The exit code of a compose service's container; None while it runs or if it is gone."""
    with docker_cli.client() as sdk:
        found = docker_cli.project_containers(sdk, project, service, stopped=True)
        if not found:
            return None
        state = found[0].attrs["State"]
        return None if state.get("Running") else int(state.get("ExitCode", -1))
