"""``edgepart testbed``: the Docker testbed of a scenario (render, up, down, drive, build).

- ``render`` writes a scenario's compose project (``emulator.compose``), ``up`` renders it
  and starts it in the background (building the image first when it lacks this tree's
  code), ``down`` removes it; ``--swarm`` does both as a Docker Swarm stack.
- ``drive`` is the project's ``testbed`` service: the emulator driver (``emulator.driver``)
  that applies the traces and prints and saves the result.
- ``build`` builds the one image of every role (``emulator.images``).

The sub-app is mounted on the main app (``controller.cli``); every command imports what
it runs inside its function, so loading this module costs no backend, docker or torch.
Docker is reached through ``emulator.docker_cli``. Exit codes as the main app's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from emulator.cli_common import (
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
from emulator.scenario import Scenario

testbed_app = typer.Typer(
    no_args_is_help=True, help="The Docker testbed of a scenario: render, build, up, down."
)

TlsOpt = Annotated[
    bool, typer.Option(help="The broker speaks only TLS (port 8883, a CA of the testbed's own).")
]


def container_model_ref(sc: Scenario) -> str:
    """How the containers name the scenario's model (exit 2 for one they cannot run)."""
    from emulator import compose

    try:
        return compose.container_model_ref(sc)
    except ValueError as exc:
        raise fail(str(exc), 2) from None


def _render_options(sc: Scenario, algorithm: str, image: str, swarm: bool, **extra):
    from emulator.compose import BROKER_IMAGE, RenderOptions
    from llm.host_profile import host_profile

    algorithm = check_one_algorithm(algorithm, "edgepart testbed")
    ref = container_model_ref(sc)
    profile = host_profile(ref, threads=1, progress=lambda m: err.print(m, highlight=False))
    return ref, RenderOptions(
        algorithm=algorithm,
        image=image,
        broker_image=extra.get("broker_image") or BROKER_IMAGE,
        reference_gflops=profile.reference_gflops,
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
        str | None, typer.Option(help="MQTT broker image (default eclipse-mosquitto:2).")
    ] = None,
    swarm: Annotated[bool, typer.Option(help="Render for docker stack deploy.")] = False,
    tls: TlsOpt = False,
    rotate_secrets: Annotated[
        bool,
        typer.Option(help="New broker passwords (and TLS keys) instead of the existing ones."),
    ] = False,
) -> None:
    """Write the compose project of a scenario (compose.yaml, broker and Prometheus configs,
    the broker's passwords, ACL and each role's credentials in DIR/secrets/)."""
    from emulator.compose import write_project
    from emulator.testbed_secrets import SecretsError
    from llm.host_profile import cache_path

    sc = open_scenario(scenario)
    check_out_dir(out_dir)
    ref, options = _render_options(sc, algorithm, image, swarm, broker_image=broker_image, tls=tls)
    text = scenario.read_text(encoding="utf-8")
    try:
        path = write_project(
            sc, text, out_dir, options, cache_path(ref, threads=1), rotate_secrets=rotate_secrets
        )
    except SecretsError as exc:
        raise fail(str(exc), 1) from None
    out.print(f"wrote {path}: `cd {out_dir} && docker compose up testbed` runs the experiment")


def _project(sc: Scenario, project_dir: Path | None) -> tuple[str, Path]:
    from emulator.compose import project_name

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
    from emulator import docker_cli
    from emulator.backends.docker import UP_TIMEOUT_S
    from emulator.compose import BROKER_IMAGE, write_project
    from emulator.images import ImageBuildError, ensure_current, image_exists
    from emulator.testbed_secrets import SecretsError
    from llm.host_profile import cache_path

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
    broker = BROKER_IMAGE if image_exists(BROKER_IMAGE) else image
    ref, options = _render_options(sc, algorithm, image, swarm, broker_image=broker, tls=tls)
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
    from emulator import docker_cli
    from emulator.backends.docker import DOWN_TIMEOUT_S, down

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
    from emulator.driver import (
        DriverError,
        docker_kill,
        docker_start,
        drive,
        outcome_record,
        save_outcome,
    )
    from emulator.report import comparison_table
    from llm.loader import open_model

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
    from emulator.images import ImageBuildError, build_image, image_size

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
