"""Part 3, ``tokens``: per-token fidelity on the testbed, measured against predicted.

``edgepart.emulator.backends.docker.run_docker`` runs ``scenarios/lan-3.yaml`` and
``scenarios/demo.yaml`` with ``myopic`` and ``edgeshard`` (``--quick``: lan-3 with myopic
only and generate_tokens cut to 8 in a copy of the file). For each run: median and p90 over
the tokens of |measured / predicted - 1| (``edgepart.emulator.report.fidelity``), the median of
measured / predicted (the bias), tokens/s = tokens / sum of per-token decode times, migrated
blocks, the start time (``run.start_s``: ``docker compose up`` until every container runs)
and the wall time. Target: median <= 20 % for every run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import ByMode, console, num, pct, print_table, repo_path
from benchmarks.testbed_fidelity.runs import testbed_run

DEFAULTS = {
    "scenarios": ByMode(["scenarios/lan-3.yaml", "scenarios/demo.yaml"], ["scenarios/lan-3.yaml"]),
    "algorithms": ByMode(["myopic", "edgeshard"], ["myopic"]),
    "tokens": ByMode(None, 8),  # generate_tokens cut to this in a copy (None: the file's)
}
FIDELITY_TARGET = 0.20
RUN_BASE_S, RUN_PER_TOKEN_S = 900.0, 15.0  # a testbed run's budget: base + per token


def shorten(data: dict[str, Any], tokens: int) -> dict[str, Any]:
    """A scenario mapping cut to `tokens` tokens, its token traces moved proportionally."""
    original = int(data["generate_tokens"])
    out = {**data, "generate_tokens": tokens}
    traces = []
    for trace in data.get("traces", []):
        if "at_token" in trace:
            at = int(trace["at_token"]) * tokens // original
            trace = {**trace, "at_token": min(tokens - 1, max(1, at))}
        traces.append(trace)
    if traces:
        out["traces"] = traces
    return out


def part_tokens(image: str, out_dir: Path, scenarios: Sequence[str], algorithms: Sequence[str],
                tokens: int | None) -> dict[str, Any]:  # fmt: skip
    """Part 3: run_docker on each scenario and algorithm, measured against predicted."""
    from edgepart.emulator.scenario import parse_scenario

    runs = []
    for file in scenarios:
        path = repo_path(file)
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if tokens is not None:
            data = shorten(data, tokens)
        text = yaml.safe_dump(data, sort_keys=False)
        scenario = parse_scenario(data, str(path), base_dir=path.parent)
        budget = RUN_BASE_S + RUN_PER_TOKEN_S * scenario.generate_tokens
        for algorithm in algorithms:
            console.rule(f"{scenario.name}: {algorithm} ({scenario.generate_tokens} tokens)")
            run = testbed_run(scenario, text, algorithm, image, out_dir / "docker", budget)
            run.update(scenario=scenario.name, file=file,
                       generate_tokens=scenario.generate_tokens)  # fmt: skip
            if run["ok"]:
                console.print(
                    f"  {run['tokens']} tokens, {num(run['tokens_per_s'], '.2f')} tokens/s, "
                    f"|m/p-1| median {pct(run['fidelity_median'], 1)}, {run['migrations']} "
                    f"migrated, start {run['start_s']:.1f} s, wall {run['wall_s']:.0f} s"
                )
            else:
                console.print(f"  [red]failed[/]: {run['error'][:600]}")
            runs.append(run)
    return {"scenarios": list(scenarios), "algorithms": list(algorithms), "runs": runs}


def print_tokens(part: dict[str, Any]) -> None:
    """Part 3's table: fidelity, bias and speed per run."""
    rows = []
    for r in part["runs"]:
        if not r["ok"]:
            rows.append((r["scenario"], r["algorithm"], "error", "", "", "", "", "", "", "",
                         f"{r['wall_s']:.0f}"))  # fmt: skip
            continue
        rows.append((
            r["scenario"],
            r["algorithm"],
            f"{r['tokens']}/{r['generate_tokens'] - 1}",
            pct(r["fidelity_median"], 1),
            pct(r["fidelity_p90"], 1),
            "[green]yes[/]" if r["fidelity_median"] <= FIDELITY_TARGET else "[red]no[/]",
            num(r["ratio_median"], ".3f"),
            num(r["tokens_per_s"], ".2f"),
            r["migrations"],
            f"{r['start_s']:.1f}",
            f"{r['wall_s']:.0f}",
            f"{r['load_before']:.1f}",
        ))  # fmt: skip
    print_table(
        "Part 3: per-token time on the docker testbed, measured vs predicted",
        [
            "scenario",
            "algorithm",
            "tokens",
            "|m/p-1| median",
            "p90",
            "<= 20%",
            "m/p median",
            "tokens/s",
            "migrated",
            "start s",
            "wall s",
            "load",
        ],
        rows,
        caption="tokens/s = tokens / sum of per-token decode times; start: compose up until "
        "every container runs (run.start_s); m/p median: the bias of the prediction",
    )
