"""``edgepart testbed``: the Docker testbed of a scenario (render, up, down, drive, build).

- ``render`` writes a scenario's compose project (``edgepart.emulator.compose``: nothing of this
  host in it), ``up`` renders it and starts it in the background (building the image
  first when it lacks this tree's code), ``down`` removes it; ``--swarm`` does both as a
  Docker Swarm stack (its shares frozen from this host's speed).
- ``calibrate`` and ``secrets`` are the project's one-shot start-up services: this host's
  block speeds and each device's CPU share of it; the broker's identities, per role.
- ``drive`` is the project's ``testbed`` service: the emulator driver (``edgepart.emulator.driver``)
  that applies the traces and prints and saves the result.
- ``build`` builds the one image of every role (``edgepart.emulator.images``).

The sub-app is mounted on the main app (``edgepart.controller.cli``); every command imports what
it runs inside its function, so loading this module costs no backend, docker or torch.
Docker is reached through ``edgepart.emulator.docker_cli``. Exit codes as the main app's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from edgepart.emulator.cli_common import (
    AlgorithmOpt,
    BrokerAuthOpt,
    RoleDilationOpt,
    ScenarioArg,
    check_one_algorithm,
    check_out_dir,
    dilation_note,
    err,
    fail,
    load_broker_auth,
    open_scenario,
    out,
)
from edgepart.emulator.scenario import Scenario

testbed_app = typer.Typer(
    no_args_is_help=True, help="The Docker testbed of a scenario: render, build, up, down."
)
OutDirOpt = Annotated[Path, typer.Option("--out", help="Folder to write into.")]

TlsOpt = Annotated[
    bool, typer.Option(help="The broker speaks only TLS (port 8883, a CA of the testbed's own).")
]


def container_model_ref(sc: Scenario) -> str:
    """How the containers name the scenario's model (exit 2 for one they cannot run)."""
    from edgepart.emulator import compose

    try:
        return compose.container_model_ref(sc)
    except ValueError as exc:
        raise fail(str(exc), 2) from None


def _render_options(sc: Scenario, algorithm: str, image: str, swarm: bool, **extra):
    """The render's options; only a swarm stack (shares frozen into it) needs this host's
    speed, measured here when no profile of this CPU is cached."""
    from edgepart.emulator.compose import RenderOptions
    from edgepart.llm.host_profile import host_profile

    algorithm = check_one_algorithm(algorithm, "edgepart testbed")
    ref = container_model_ref(sc)
    reference_gflops = None
    if swarm:
        say = lambda m: err.print(m, highlight=False)  # noqa: E731
        reference_gflops = host_profile(ref, threads=1, progress=say).reference_gflops
    return ref, RenderOptions(
        algorithm=algorithm,
        image=image,
        broker_image=extra.get("broker_image"),
        reference_gflops=reference_gflops,
        swarm=swarm,
        tls=extra.get("tls", False),
    )


@testbed_app.command("render")
def testbed_render(
    scenario: ScenarioArg,
    out_dir: Annotated[Path, typer.Option("--out", help="Project folder to write.")] = Path(
        "compose"
    ),
    algorithm: AlgorithmOpt = "myopic",
    image: Annotated[str, typer.Option(help="The edgepart image.")] = "edgepart:latest",
    broker_image: Annotated[
        str | None,
        typer.Option(help="MQTT broker image (default: the edgepart image's mosquitto)."),
    ] = None,
    swarm: Annotated[bool, typer.Option(help="Render for docker stack deploy.")] = False,
    tls: TlsOpt = False,
    rotate_secrets: Annotated[
        bool,
        typer.Option(
            help="New broker passwords (and TLS keys) instead of the existing ones (--tls "
            "or --swarm: other projects make theirs at start-up, `docker compose down "
            "--volumes` drops them)."
        ),
    ] = False,
) -> None:
    """Write the compose project of a scenario (compose.yaml, broker and Prometheus configs,
    Grafana's provisioning; with --tls or --swarm the broker's secrets in DIR/secrets/)."""
    from edgepart.emulator.compose import write_project
    from edgepart.emulator.testbed_secrets import SecretsError
    from edgepart.llm.host_profile import cache_path

    sc = open_scenario(scenario)
    check_out_dir(out_dir)
    ref, options = _render_options(sc, algorithm, image, swarm, broker_image=broker_image, tls=tls)
    if rotate_secrets and options.secrets_at_start:
        raise fail(
            "--rotate-secrets: this project makes its secrets at start-up, in its volumes; "
            f"`cd {out_dir} && docker compose down --volumes` drops them",
            2,
        )
    text = scenario.read_text(encoding="utf-8")
    try:
        path = write_project(
            sc, text, out_dir, options, cache_path(ref, threads=1), rotate_secrets=rotate_secrets
        )
    except SecretsError as exc:
        raise fail(str(exc), 1) from None
    out.print(f"wrote {path}: `cd {out_dir} && docker compose up testbed` runs the experiment")


@testbed_app.command("calibrate")
def testbed_calibrate(scenario: ScenarioArg, out_dir: OutDirOpt = Path("cache")) -> None:
    """This host's block speeds (DIR/profile.json), the time dilation the world runs at
    and each role's start-up options (DIR/start/<service>: a device's CPU share of this
    host and speed): what a project's calibrate service runs at start-up."""
    from edgepart.emulator.compose import START_DIR, cpus, start_options
    from edgepart.emulator.host_limits import HostTooSmall, host_cores
    from edgepart.llm.host_profile import host_profile

    sc = open_scenario(scenario)
    check_out_dir(out_dir)
    ref = container_model_ref(sc)
    (out_dir / START_DIR).mkdir(parents=True, exist_ok=True)
    say = lambda m: err.print(m, highlight=False)  # noqa: E731
    profile = host_profile(ref, threads=1, progress=say, out=out_dir / "profile.json")
    cores = host_cores()
    try:
        k, options = start_options(sc, profile.reference_gflops, cores)
    except HostTooSmall as exc:
        raise fail(f"{scenario}: {exc}", 1) from None
    for name, args in options.items():
        (out_dir / START_DIR / name).write_text(" ".join(args) + "\n", encoding="ascii")
    shares = cpus(sc, profile.reference_gflops, k)
    out.print(
        f"{profile.reference_gflops:.2f} GFLOP/s per core; time dilation {k:g}; CPU shares "
        f"(of {cores:.2f} cores): " + ", ".join(f"{n} {v:g}" for n, v in shares.items())
    )


@testbed_app.command("secrets")
def testbed_make_secrets(scenario: ScenarioArg, out_dir: OutDirOpt = Path("secrets")) -> None:
    """The broker's identities, one folder per role (DIR/broker, DIR/controller,
    DIR/driver, DIR/agent-<device>), kept when all are there: what a project's secrets
    service runs at start-up."""
    from edgepart.emulator.compose import testbed_name
    from edgepart.emulator.testbed_secrets import write_role_secrets

    sc = open_scenario(scenario)
    check_out_dir(out_dir)
    made = write_role_secrets(out_dir, testbed_name(sc), sc.device_names)
    out.print(f"{'made' if made else 'kept'} the secrets of testbed {testbed_name(sc)!r}")


def _project(sc: Scenario, project_dir: Path | None) -> tuple[str, Path]:
    from edgepart.emulator.compose import project_name

    return project_name(sc), project_dir or Path("out/testbed") / project_name(sc)


@testbed_app.command("up")
def testbed_up(
    scenario: ScenarioArg,
    algorithm: AlgorithmOpt = "myopic",
    project_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Project folder to write (default: out/testbed/<name>)."),
    ] = None,
    image: Annotated[str, typer.Option(help="The edgepart image.")] = "edgepart:latest",
    swarm: Annotated[
        bool, typer.Option(help="Deploy as a Docker Swarm stack (docker stack deploy).")
    ] = False,
    tls: TlsOpt = False,
) -> None:
    """Render and start the testbed in the background (`testbed down` removes it)."""
    from edgepart.emulator import docker_cli
    from edgepart.emulator.backends.docker import UP_TIMEOUT_S
    from edgepart.emulator.compose import write_project
    from edgepart.emulator.images import ImageBuildError, ensure_current
    from edgepart.emulator.testbed_secrets import SecretsError
    from edgepart.llm.host_profile import cache_path

    sc = open_scenario(scenario)
    if project_dir is not None:
        check_out_dir(project_dir)
    check_one_algorithm(algorithm, "edgepart testbed")
    try:
        ensure_current(
            image, say=err.print, progress=lambda line: err.print(f"  {line}", highlight=False)
        )
    except ImageBuildError as exc:
        raise fail(str(exc), 1) from None
    ref, options = _render_options(sc, algorithm, image, swarm, tls=tls)
    name, directory = _project(sc, project_dir)
    try:
        path = write_project(
            sc, scenario.read_text(encoding="utf-8"), directory, options, cache_path(ref, 1)
        )
    except SecretsError as exc:
        raise fail(str(exc), 1) from None
    if swarm:
        cmd, what = docker_cli.stack_deploy_command(path, name), "docker stack deploy"
    else:
        cmd = docker_cli.compose_command(name, path, "up", "--detach")
        what = "docker compose up"
    try:
        docker_cli.run_attached(cmd, timeout_s=UP_TIMEOUT_S, what=what)
    except docker_cli.DockerError as exc:
        raise fail(str(exc), 1) from None
    out.print(f"testbed {name} is up; follow it: docker compose -p {name} logs -f testbed")


@testbed_app.command("down")
def testbed_down(
    scenario: ScenarioArg,
    project_dir: Annotated[
        Path | None,
        typer.Option("--out", help="The project folder `up` wrote (default: out/testbed/<name>)."),
    ] = None,
    swarm: Annotated[bool, typer.Option(help="Remove the Docker Swarm stack.")] = False,
) -> None:
    """Stop the testbed and remove its containers, networks and volumes."""
    from edgepart.emulator import docker_cli
    from edgepart.emulator.backends.docker import DOWN_TIMEOUT_S, down

    sc = open_scenario(scenario)
    name, directory = _project(sc, project_dir)
    try:
        if swarm:
            cmd = docker_cli.stack_rm_command(name)
            docker_cli.run_attached(cmd, timeout_s=DOWN_TIMEOUT_S, what="docker stack rm")
            return
        down(directory, name)
    except docker_cli.DockerError as exc:
        raise fail(str(exc), 1) from None
    out.print(f"testbed {name} removed")


@testbed_app.command("drive")
def testbed_drive(
    scenario: ScenarioArg,
    broker: Annotated[str, typer.Option(help="MQTT broker host:port.")],
    broker_auth: BrokerAuthOpt = None,
    testbed: Annotated[str, typer.Option(help="Topic namespace of the testbed.")] = "default",
    project: Annotated[
        str, typer.Option(help="Compose project (or stack) whose containers `fail` kills.")
    ] = "",
    out_dir: Annotated[Path, typer.Option("--out", help="Where result.json goes.")] = Path("out"),
    time_dilation: RoleDilationOpt = 1.0,
) -> None:
    """The emulator driver (the testbed service): applies traces, prints and saves results."""
    from edgepart.emulator.driver import (
        DriverError,
        docker_kill,
        docker_start,
        drive,
        outcome_record,
        save_outcome,
    )
    from edgepart.emulator.report import comparison_table
    from edgepart.llm.loader import open_model

    sc = open_scenario(scenario)
    check_out_dir(out_dir)
    auth = load_broker_auth(broker_auth)
    if time_dilation > 1.0:
        err.print(dilation_note(time_dilation), highlight=False)

    def on_token(p) -> None:
        if p.token == 1:
            err.print("token 1: the prompt's prefill", highlight=False)
            return
        err.print(
            f"token {p.token}: {p.measured_s * 1000:.0f} ms (predicted "
            f"{p.predicted_s * 1000:.0f} ms), {p.migrations} blocks migrated",
            highlight=False,
        )

    try:
        outcome = drive(
            sc,
            broker,
            testbed,
            docker_kill(project or testbed),
            on_token,
            auth,
            docker_start(project or testbed),
            time_dilation,
        )
    except DriverError as exc:
        raise fail(str(exc), 1) from None
    if not outcome.ok:
        save_outcome(outcome, "", out_dir)
        raise fail(f"the controller failed: {outcome.error}", 1)
    tokenizer = open_model(container_model_ref(sc)).tokenizer
    text = tokenizer.decode(outcome.result["output_token_ids"], skip_special_tokens=True)
    path = save_outcome(outcome, text, out_dir)
    out.print(text, markup=False, highlight=False)
    out.print(comparison_table(sc, [outcome_record(outcome, text)]))
    err.print(f"wrote {path}")


@testbed_app.command("build")
def testbed_build(
    base_image: Annotated[
        str | None,
        typer.Option(
            help="Base image (default: python:3.11-slim when present locally, else the "
            "debootstrap base edgepart/base:bookworm, built when missing)."
        ),
    ] = None,
    tag: Annotated[str, typer.Option(help="Tag of the image to build.")] = "edgepart:latest",
) -> None:
    """Build the one image of every testbed role, offline, from a cached wheelhouse."""
    from edgepart.emulator.images import ImageBuildError, build_image, image_size

    started = time.monotonic()
    try:
        image_id = build_image(
            tag=tag,
            base_image=base_image,
            progress=lambda m: err.print(m, markup=False, highlight=False, soft_wrap=True),
        )
        size_mb = image_size(tag) / 1e6
    except ImageBuildError as exc:
        raise fail(str(exc), 1) from None
    out.print(
        f"built {tag} ({image_id[7:19]}, {size_mb:.0f} MB) in {time.monotonic() - started:.0f} s"
    )
