"""The ``edgepart`` command line: plan, simulate and compare placements of a scenario.

Exit codes: 0 done, 1 runtime failure, 2 bad input (the message names the cause).
"""

from __future__ import annotations

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
    if backend == "docker":
        raise _fail("the docker backend is not available yet; use --backend local or sim", 2)
    if backend != "local":
        raise _fail(f"--backend {backend!r}: use sim, local or docker", 2)
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


def _emulate_local(sc: Scenario, name: str, broker, telemetry, metrics_port, quiet: bool):
    from controller.orchestrator import ControllerError
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
        except (ControllerError, RuntimeError, OSError) as exc:
            raise _fail(f"{name}: {exc}", 1) from None
        bar.update(task, info=f"done in {time.monotonic() - started:.0f} s")
    return run


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
    algorithm: AlgorithmOpt = "myopic",
    testbed: Annotated[str, typer.Option(help="Topic namespace the agents use.")] = "default",
    telemetry: TelemetryOpt = "measured",
    calibrate: Annotated[
        bool, typer.Option(help="Plan with this host's measured block speeds.")
    ] = True,
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus /metrics.")] = None,
    json_: JsonOpt = False,
) -> None:
    """The controller of a running testbed: plans, migrates and decodes over MQTT."""
    import asyncio

    from controller.orchestrator import Controller, ControllerError
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
    try:
        ref = model_ref(sc)
    except LocalBackendError as exc:
        raise _fail(str(exc), 2) from None
    opened = open_model(ref)
    table = block_table(opened.arch.spec)
    if calibrate:
        table = calibrated_table(table, host_profile(ref, threads=1))
    config = controller_config(
        sc, table, prompt_ids(sc, opened.tokenizer), broker, testbed, algorithm, telemetry,
        metrics_port,
    )  # fmt: skip
    static = WorldState.from_scenario(sc)
    ctl = Controller(config, configured_view=lambda window: static.view(sc, window))
    try:
        result = asyncio.run(ctl.run())
    except ControllerError as exc:
        raise _fail(str(exc), 1) from None
    text = opened.tokenizer.decode(result.output_token_ids, skip_special_tokens=True)
    if json_:
        print(
            json.dumps(
                {
                    "algorithm": algorithm,
                    "per_token_s": result.per_token_s,
                    "predicted_per_token_s": result.predicted_per_token_s,
                    "output_token_ids": result.output_token_ids,
                    "text": text,
                    "migrations": result.migrations,
                    "migration_s": result.migration_s,
                    "replans": result.replans,
                    "peak_memory_bytes": result.peak_memory_bytes,
                    "total_s": result.total_s,
                }
            )
        )
    else:
        out.print(text, markup=False, highlight=False)


def main() -> None:  # pragma: no cover - console entry
    """Console entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
