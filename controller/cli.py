"""The ``edgepart`` command line: plan, simulate and compare placements of a scenario.

Exit codes: 0 done, 1 runtime failure, 2 bad input (the message names the cause).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from controller.placement import ALGORITHMS, NoFeasiblePlacement, make_algorithm
from emulator.backends.sim import SimResult, first_decision, place_model, simulate
from emulator.scenario import Scenario, ScenarioError, load_scenario

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Head-level partitioning of decoder LLMs across edge devices.",
)
# wide enough for the comparison table when piped (make demo, CI logs)
out = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True)

ScenarioArg = Annotated[Path, typer.Argument(help="Scenario file (YAML, version 1).")]
AlgorithmOpt = Annotated[
    str, typer.Option("--algorithm", "-a", help=f"One of: {', '.join(ALGORITHMS)}.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def _fail(message: str, code: int) -> typer.Exit:
    err.print("[bold red]error:[/]", end=" ")
    err.print(message, markup=False, highlight=False)
    return typer.Exit(code)


def _scenario(path: Path) -> Scenario:
    try:
        return load_scenario(path)
    except ScenarioError as exc:
        raise _fail(str(exc), 2) from None


def _algorithm(name: str):
    try:
        return make_algorithm(name)
    except KeyError as exc:
        raise _fail(str(exc.args[0]), 2) from None


@app.command()
def plan(scenario: ScenarioArg, algorithm: AlgorithmOpt = "myopic", json_: JsonOpt = False) -> None:
    """One placement decision from the scenario's initial state."""
    sc = _scenario(scenario)
    algo = _algorithm(algorithm)
    started = time.perf_counter()
    try:
        decision, failure = first_decision(sc, algo), None
    except NoFeasiblePlacement as exc:
        decision, failure = None, str(exc)
    solve_s = time.perf_counter() - started
    if json_:
        print(
            json.dumps(
                {
                    "algorithm": algorithm,
                    "objective_s": decision.objective_s if decision else None,
                    "feasible": decision is not None,
                    "placement": decision.mapping if decision else {},
                    "solve_s": solve_s,
                }
            )
        )
    if failure is not None:
        raise _fail(failure, 1)
    if json_:
        return
    out.print(
        f"[bold]{algorithm}[/] on {sc.name}: interval objective "
        f"{decision.objective_s * 1e3:.2f} ms over {sc.replan_every} tokens, "
        f"solved in {solve_s * 1e3:.0f} ms"
    )
    names = sc.device_names
    grid = Table("layer", *names, title="blocks per device (g = KV group, p = proj, f = FFN)")
    spec = sc.model_spec()
    for layer in range(spec.layers):
        cells = dict.fromkeys(names, "")
        for g in range(spec.kv_heads):
            cells[decision.mapping[f"L{layer}.g{g}"]] += "g"
        cells[decision.mapping[f"L{layer}.proj"]] += "p"
        cells[decision.mapping[f"L{layer}.ffn"]] += "f"
        grid.add_row(str(layer), *(cells[n] for n in names))
    out.print(grid)


@app.command()
def generate(
    model: Annotated[str, typer.Option(help="Preset (smollm2-135m), .gguf file or HF directory.")],
    prompt: Annotated[str, typer.Option(help="The prompt text.")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate at most.")] = 32,
    scenario: Annotated[
        Path | None,
        typer.Option(help="Place the blocks on this scenario's devices (in-process execution)."),
    ] = None,
    algorithm: AlgorithmOpt = "myopic",
    chat: Annotated[bool, typer.Option(help="Apply the model's chat template.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Greedy text generation, whole or partitioned over a scenario's devices."""
    from llm.loader import open_model  # torch is imported only for this command
    from llm.runtime import PartitionedModel, monolithic

    sc = _scenario(scenario) if scenario is not None else None
    algo = _algorithm(algorithm) if sc is not None else None
    try:
        opened = open_model(model)
    except (FileNotFoundError, ValueError, KeyError, ImportError) as exc:
        raise _fail(str(exc.args[0]) if exc.args else str(exc), 2) from None
    tok = opened.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": prompt}]) if chat else tok.encode(prompt)
    if sc is None:
        runner = monolithic(opened.source, opened.arch)
    else:
        try:
            mapping = place_model(sc, algo, opened.arch.spec, len(ids), max_new_tokens)
        except NoFeasiblePlacement as exc:
            raise _fail(str(exc), 1) from None
        runner = PartitionedModel(opened.source, opened.arch, mapping, source_device=sc.source_name)
    with Progress(
        TextColumn("generating"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=json_ or not err.is_terminal,
    ) as bar:
        task = bar.add_task("", total=max_new_tokens)
        tokens = runner.greedy(
            ids,
            max_new_tokens,
            eos_token_id=tok.eos_id,
            on_token=lambda done, _model: bar.update(task, completed=done),
        )
    text = tok.decode(tokens, skip_special_tokens=True)
    if json_:
        print(json.dumps({"output_token_ids": tokens, "text": text}))
    else:
        out.print(text, markup=False, highlight=False)


def _run(sc: Scenario, name: str, show_progress: bool) -> SimResult:
    algo = _algorithm(name)
    if not show_progress:
        return simulate(sc, algo)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(f"{name:>20}", total=sc.generate_tokens)
        return simulate(sc, algo, progress=lambda done, _total: bar.update(task, completed=done))


@app.command("simulate")
def simulate_command(
    scenario: ScenarioArg, algorithm: AlgorithmOpt = "myopic", json_: JsonOpt = False
) -> None:
    """The whole generation on the sim backend (cost model, virtual clock, traces)."""
    sc = _scenario(scenario)
    result = _run(sc, algorithm, show_progress=err.is_terminal)
    if result.failure:
        raise _fail(f"{algorithm}: {result.failure}", 1)
    if json_:
        print(json.dumps(result.to_json()))
        return
    out.print(_table(sc, [result]))


def _table(sc: Scenario, results: list[SimResult]) -> Table:
    best = min((r.total_s for r in results if not r.failure), default=float("nan"))
    table = Table(
        title=f"{sc.name}: {sc.generate_tokens} tokens, {len(sc.devices)} devices, "
        f"{sc.model_spec().name}, sim backend"
    )
    for col in (
        "algorithm",
        "total s",
        "ms/token",
        "vs best",
        "migrated blocks",
        "migration s",
        "re-plans",
        "over memory",
    ):
        table.add_column(col, justify="left" if col == "algorithm" else "right")
    for r in results:
        if r.failure:
            table.add_row(r.algorithm, "failed", r.failure, *[""] * 5)
            continue
        tokens = max(1, len(r.per_token_s))
        table.add_row(
            r.algorithm,
            f"{r.total_s:.3f}",
            f"{1e3 * sum(r.per_token_s) / tokens:.2f}",
            f"{r.total_s / best:.2f}x",
            str(r.migrations),
            f"{r.migration_s:.3f}",
            str(r.replans),
            str(r.infeasible_tokens),
        )
    return table


@app.command()
def compare(
    scenario: ScenarioArg,
    algorithms: Annotated[
        str, typer.Option(help="Comma-separated algorithms to compare.")
    ] = "myopic,static-heads,edgeshard,memory-proportional,galaxy",
    json_: JsonOpt = False,
) -> None:
    """Simulate several algorithms on one scenario and print one table."""
    sc = _scenario(scenario)
    names = [a.strip() for a in algorithms.split(",") if a.strip()]
    for name in names:
        _algorithm(name)
    results = [_run(sc, name, show_progress=err.is_terminal) for name in names]
    if json_:
        print(json.dumps([r.to_json() | {"failure": r.failure} for r in results]))
        return
    out.print(_table(sc, results))


Backend = Annotated[str, typer.Option(help="sim (cost model) or local (agent processes).")]
TelemetryOpt = Annotated[
    str,
    typer.Option(
        help="measured (the agents' telemetry) or configured (the scenario's values, traces "
        "included)."
    ),
]


def _algorithms(text: str) -> list[str]:
    names = [a.strip() for a in text.split(",") if a.strip()]
    if not names:
        raise _fail("--algorithm names no algorithm", 2)
    for name in names:
        _algorithm(name)
    return names


@app.command()
def emulate(
    scenario: ScenarioArg,
    backend: Backend = "local",
    algorithm: Annotated[
        str, typer.Option("--algorithm", "-a", help="One algorithm, or several comma-separated.")
    ] = "myopic",
    broker: Annotated[
        str | None, typer.Option(help="MQTT broker host:port (default: an embedded one).")
    ] = None,
    telemetry: TelemetryOpt = "measured",
    plots: Annotated[
        Path | None, typer.Option(help="Write per-token latency PNGs and JSON to this folder.")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve the controller's Prometheus /metrics here.")
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """The generation with real agents, real compute and shaped links (or on the sim)."""
    sc = _scenario(scenario)
    names = _algorithms(algorithm)
    if telemetry not in ("measured", "configured"):
        raise _fail(f"--telemetry {telemetry!r}: use measured or configured", 2)
    if backend == "sim":
        results = [_run(sc, n, show_progress=err.is_terminal and not json_) for n in names]
        if json_:
            objs = [r.to_json() for r in results]
            print(json.dumps(objs[0] if len(objs) == 1 else objs))
        else:
            out.print(_table(sc, results))
        return
    if backend not in ("local", "docker"):
        raise _fail(f"--backend {backend!r}: use sim, local or docker", 2)
    if backend == "docker":
        runs = [_emulate_docker(sc, scenario, n, json_) for n in names]
    else:
        runs = [_emulate_local(sc, n, broker, telemetry, metrics_port, json_) for n in names]
    if json_:
        objs = [r.to_json() for r in runs]
        print(json.dumps(objs[0] if len(objs) == 1 else objs))
    else:
        from emulator.report import comparison_table

        for run in runs:
            out.print(f"[bold]{run.result.algorithm}[/]: ", end="")
            out.print(run.text, markup=False, highlight=False)
        out.print(comparison_table(sc, runs))
    if plots is not None:
        from emulator.report import save_json, save_plots

        written = [*save_plots(sc, runs, plots), save_json(runs, plots / "runs.json")]
        err.print("wrote " + ", ".join(str(p) for p in written))


def _emulate_docker(sc: Scenario, path: Path, name: str, quiet: bool):
    from emulator.backends.docker import DockerBackendError, run_docker
    from emulator.backends.local import LocalBackendError

    _model_ref(sc)  # exit 2 now for a model the image cannot run
    say = (lambda _m: None) if quiet else (lambda m: err.print(f"    {m}", highlight=False))
    if not quiet:
        err.rule(f"{sc.name}: {name} on docker ({sc.generate_tokens} tokens)")
    try:
        # the driver prints its tokens, then the text and table this command prints too
        tokens = None if quiet else (lambda line: say(line) if line.startswith("token ") else None)
        return run_docker(sc, path.read_text(encoding="utf-8"), name, status=say, on_line=tokens)
    except LocalBackendError as exc:
        raise _fail(str(exc), 2) from None
    except DockerBackendError as exc:
        raise _fail(str(exc), 1) from None


def _keep_partial(exc, json_out: bool) -> None:
    """Show what a stopped run generated (stderr; with --json also its JSON, plus "error")."""
    partial = exc.partial
    if partial is None or not partial.output_token_ids:
        return
    err.print(
        f"partial output ({len(partial.output_token_ids)} tokens): {exc.partial_text}",
        highlight=False,
    )
    if json_out:
        print(json.dumps({**partial.summary(), "text": exc.partial_text, "error": str(exc)}))


def _emulate_local(sc: Scenario, name: str, broker, telemetry, metrics_port, quiet: bool):
    from controller.result import ControllerError
    from emulator.backends.local import LocalBackendError, run_local

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
        disable=quiet,
    ) as bar:
        task = bar.add_task(f"{name:>20}", total=sc.generate_tokens, info="starting")
        started = time.monotonic()

        def progress(done: int, result) -> None:
            took = sum(result.per_token_s)
            rate = len(result.per_token_s) / took if took > 0 else 0.0
            info = f"{rate:5.1f} tok/s, {result.migrations} migrated, {result.replans} re-plans"
            bar.update(task, completed=done, info=info)

        def status(message: str) -> None:
            bar.update(task, info=message)

        try:
            run = run_local(
                sc,
                name,
                broker=broker,
                telemetry=telemetry,
                progress=progress,
                status=status,
                metrics_port=metrics_port,
            )
        except LocalBackendError as exc:
            raise _fail(str(exc), 2) from None
        except ControllerError as exc:
            _keep_partial(exc, json_out=quiet)
            raise _fail(f"{name}: {exc}", 1) from None
        except (RuntimeError, OSError) as exc:
            raise _fail(f"{name}: {exc}", 1) from None
        bar.update(task, info=f"done in {time.monotonic() - started:.0f} s")
    return run


BrokerAuthOpt = Annotated[
    Path | None,
    typer.Option(
        help="File with this role's broker credentials (JSON, written by `testbed render`; "
        "default: anonymous)."
    ),
]


def _broker_auth(path: Path | None):
    """The credentials of a --broker-auth file (exit 2 naming the file when unusable)."""
    from control_plane.mqtt import load_auth

    try:
        return load_auth(path)
    except ValueError as exc:
        raise _fail(f"--broker-auth {exc}", 2) from None


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def agent(ctx: typer.Context) -> None:
    """One device agent (options: edgepart agent --help)."""
    from device_agent.__main__ import main as agent_main

    raise typer.Exit(agent_main(list(ctx.args)))


@app.command("controller")
def controller_command(
    scenario: Annotated[Path, typer.Option(help="Scenario: devices, links, model and job.")],
    broker: Annotated[str, typer.Option(help="MQTT broker host:port.")],
    broker_auth: BrokerAuthOpt = None,
    algorithm: AlgorithmOpt = "myopic",
    testbed: Annotated[str, typer.Option(help="Topic namespace the agents use.")] = "default",
    telemetry: TelemetryOpt = "measured",
    calibrate: Annotated[
        bool, typer.Option(help="Plan with this host's measured block speeds.")
    ] = True,
    profile: Annotated[
        Path | None, typer.Option(help="Block speeds from this profile JSON (`calibrate --out`).")
    ] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus /metrics.")] = None,
    metrics_host: Annotated[
        str, typer.Option(help="Address /metrics listens on (0.0.0.0 in a container).")
    ] = "127.0.0.1",
    world_driver: Annotated[
        bool,
        typer.Option(help="An emulator driver applies the scenario's traces: wait for it."),
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """The controller of a running testbed: plans, migrates and decodes over MQTT."""
    import asyncio

    from controller.orchestrator import Controller
    from controller.result import ControllerError
    from controller.world_link import RemoteWorld
    from emulator.backends.local import (
        LocalBackendError,
        controller_config,
        model_ref,
        prompt_ids,
    )
    from emulator.world import WorldState
    from llm.blocks import block_table
    from llm.calibration import calibrated_table
    from llm.host_profile import host_profile
    from llm.loader import open_model

    sc = _scenario(scenario)
    _algorithm(algorithm)
    auth = _broker_auth(broker_auth)
    try:
        ref = model_ref(sc)
    except LocalBackendError as exc:
        raise _fail(str(exc), 2) from None
    opened = open_model(ref)
    table = block_table(opened.arch.spec)
    if profile is not None:
        from llm.calibration import ComputeProfile

        try:
            table = calibrated_table(table, ComputeProfile.load(profile, table))
        except (OSError, ValueError, KeyError) as exc:
            raise _fail(f"--profile {profile}: {exc}", 2) from None
    elif calibrate:
        table = calibrated_table(table, host_profile(ref, threads=1))
    config = controller_config(
        sc, table, prompt_ids(sc, opened.tokenizer), broker, testbed, algorithm, telemetry,
        metrics_port,
    )  # fmt: skip
    config = dataclasses.replace(config, announce=True, metrics_host=metrics_host, broker_auth=auth)
    static = WorldState.from_scenario(sc)
    tokens = frozenset(t.at_token for t in sc.traces if t.at_token is not None)
    every_token = any(t.at_s is not None for t in sc.traces)
    world = RemoteWorld(tokens, every_token) if world_driver else None
    ctl = Controller(config, world, configured_view=lambda window: static.view(sc, window))
    try:
        result = asyncio.run(ctl.run())
    except ControllerError as exc:
        raise _fail(str(exc), 1) from None
    text = opened.tokenizer.decode(result.output_token_ids, skip_special_tokens=True)
    if json_:
        print(
            json.dumps({**result.summary(), "text": text})
        )
    else:
        out.print(text, markup=False, highlight=False)


@app.command()
def calibrate(
    model: Annotated[str, typer.Option(help="Preset, .gguf file or HF directory.")] = (
        "smollm2-135m"
    ),
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Also write the profile JSON to this file.")
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Measure this CPU's block speeds at one thread (cached; the testbed's first service)."""
    import shutil

    from llm.host_profile import cache_path, host_profile

    profile = host_profile(model, threads=1, progress=lambda m: err.print(m, highlight=False))
    cached = cache_path(model, threads=1)
    if out_file is not None:
        if not cached.is_file():
            raise _fail(f"the CPU was too busy to keep a profile in {cached}; run it again", 1)
        out_file.parent.mkdir(parents=True, exist_ok=True)
        if out_file.resolve() != cached.resolve():
            shutil.copyfile(cached, out_file)
    if json_:
        print(json.dumps({"reference_gflops": profile.reference_gflops, "cache": str(cached)}))
    else:
        out.print(f"{profile.reference_gflops:.2f} GFLOP/s per core; profile in {cached}")


testbed_app = typer.Typer(
    no_args_is_help=True, help="The Docker testbed of a scenario: render, build, up, down."
)
app.add_typer(testbed_app, name="testbed")


def _render_options(sc: Scenario, algorithm: str, image: str, swarm: bool, **extra):
    from emulator.compose import BROKER_IMAGE, RenderOptions
    from llm.host_profile import host_profile

    ref = _model_ref(sc)
    _algorithm(algorithm)
    profile = host_profile(ref, threads=1, progress=lambda m: err.print(m, highlight=False))
    return ref, RenderOptions(
        algorithm=algorithm,
        image=image,
        broker_image=extra.get("broker_image") or BROKER_IMAGE,
        reference_gflops=profile.reference_gflops,
        swarm=swarm,
        tls=extra.get("tls", False),
    )


TlsOpt = Annotated[
    bool, typer.Option(help="The broker speaks only TLS (port 8883, a CA of the testbed's own).")
]


@testbed_app.command("render")
def testbed_render(
    scenario: ScenarioArg,
    out_dir: Annotated[Path, typer.Option("--out", help="Project directory to write.")] = Path(
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

    sc = _scenario(scenario)
    ref, options = _render_options(sc, algorithm, image, swarm, broker_image=broker_image, tls=tls)
    text = scenario.read_text(encoding="utf-8")
    try:
        path = write_project(
            sc, text, out_dir, options, cache_path(ref, threads=1), rotate_secrets=rotate_secrets
        )
    except SecretsError as exc:
        raise _fail(str(exc), 1) from None
    out.print(f"wrote {path}: `cd {out_dir} && docker compose up testbed` runs the experiment")


def _project(sc: Scenario, project_dir: Path | None) -> tuple[str, Path]:
    from emulator.compose import project_name

    return project_name(sc), project_dir or Path("out/testbed") / project_name(sc)


@testbed_app.command("up")
def testbed_up(
    scenario: ScenarioArg,
    algorithm: AlgorithmOpt = "myopic",
    project_dir: Annotated[
        Path | None, typer.Option("--dir", help="Where to render the project.")
    ] = None,
    image: Annotated[str, typer.Option(help="The edgepart image.")] = "edgepart:latest",
    swarm: Annotated[
        bool, typer.Option(help="Deploy as a Docker Swarm stack (docker stack deploy).")
    ] = False,
    tls: TlsOpt = False,
) -> None:
    """Render and start the testbed in the background (`testbed down` removes it)."""
    import subprocess

    from emulator.compose import BROKER_IMAGE, write_project
    from emulator.images import ImageBuildError, build_image, image_exists, image_is_current
    from emulator.testbed_secrets import SecretsError
    from llm.host_profile import cache_path

    sc = _scenario(scenario)
    if not image_is_current(image):
        err.print(f"building {image} from this tree (edgepart testbed build)")
        try:
            build_image(image, progress=lambda line: err.print(f"  {line}", highlight=False))
        except ImageBuildError as exc:
            raise _fail(str(exc), 1) from None
    broker = BROKER_IMAGE if image_exists(BROKER_IMAGE) else image
    ref, options = _render_options(sc, algorithm, image, swarm, broker_image=broker, tls=tls)
    name, directory = _project(sc, project_dir)
    try:
        path = write_project(
            sc, scenario.read_text(encoding="utf-8"), directory, options, cache_path(ref, 1)
        )
    except SecretsError as exc:
        raise _fail(str(exc), 1) from None
    if swarm:
        cmd = ["docker", "stack", "deploy", "--compose-file", str(path), name]
    else:
        cmd = ["docker", "compose", "-p", name, "-f", str(path), "up", "--detach"]
    if subprocess.run(cmd, stdin=subprocess.DEVNULL).returncode != 0:
        raise _fail(f"{' '.join(cmd[:3])} failed (output above)", 1)
    out.print(f"testbed {name} is up; follow it: docker compose -p {name} logs -f testbed")


@testbed_app.command("down")
def testbed_down(
    scenario: ScenarioArg,
    project_dir: Annotated[
        Path | None, typer.Option("--dir", help="Where the project was rendered.")
    ] = None,
    swarm: Annotated[bool, typer.Option(help="Remove the Docker Swarm stack.")] = False,
) -> None:
    """Stop the testbed and remove its containers, networks and volumes."""
    import subprocess

    from emulator.backends.docker import DockerBackendError, down

    sc = _scenario(scenario)
    name, directory = _project(sc, project_dir)
    if swarm:
        cmd = ["docker", "stack", "rm", name]
        if subprocess.run(cmd, stdin=subprocess.DEVNULL).returncode != 0:
            raise _fail("docker stack rm failed (output above)", 1)
        return
    try:
        down(directory, name)
    except DockerBackendError as exc:
        raise _fail(str(exc), 1) from None
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
    out_dir: Annotated[Path, typer.Option("--out", help="Where result.json goes.")] = Path(
        "out"
    ),
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

    sc = _scenario(scenario)
    auth = _broker_auth(broker_auth)

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
        )
    except DriverError as exc:
        raise _fail(str(exc), 1) from None
    if not outcome.ok:
        save_outcome(outcome, "", out_dir)
        raise _fail(f"the controller failed: {outcome.error}", 1)
    tokenizer = open_model(_model_ref(sc)).tokenizer
    text = tokenizer.decode(outcome.result["output_token_ids"], skip_special_tokens=True)
    path = save_outcome(outcome, text, out_dir)
    out.print(text, markup=False, highlight=False)
    out.print(comparison_table(sc, [outcome_record(outcome, text)]))
    err.print(f"wrote {path}")


def _model_ref(sc: Scenario) -> str:
    from emulator.compose import container_model_ref

    try:
        return container_model_ref(sc)
    except ValueError as exc:
        raise _fail(str(exc), 2) from None


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
        raise _fail(str(exc), 1) from None
    out.print(
        f"built {tag} ({image_id[7:19]}, {size_mb:.0f} MB) in {time.monotonic() - started:.0f} s"
    )


def main() -> None:  # pragma: no cover - console entry
    """Console entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
