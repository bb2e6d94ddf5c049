"""Shared pieces of the live end-to-end tests (real agents, a broker, the real model).

``SCENARIO`` is the base scenario (smollm2-135m, 10 prompt tokens, 6 generated, three
devices, two traces); ``make_scenario`` overrides its keys, ``make_tiny_scenario`` also
puts it on the tiny live model; ``reference_ids`` are the
monolithic model's greedy ids after its prompt (every scenario made from it has that
prompt); ``agent_pid`` finds an agent this process started and ``assert_no_orphans``
checks that nothing a run started outlives it.

Imported by the test modules of this folder (pytest puts it on the path).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from edgepart.emulator.job import prompt_ids
from edgepart.emulator.scenario import Scenario, parse_scenario
from edgepart.llm.loader import open_model
from edgepart.llm.runtime import monolithic

SCENARIO = {
    "version": 1,
    "name": "e2e",
    "model": {"preset": "smollm2-135m"},
    "prompt_tokens": 10,
    "generate_tokens": 6,
    "replan_every": 2,
    "devices": [
        {"name": "a", "compute_gflops": 2.0, "memory_mib": 400, "source": True},
        {"name": "b", "compute_gflops": 2.0, "memory_mib": 300},
        {"name": "c", "compute_gflops": 1.5, "memory_mib": 300},
    ],
    "links": {"default": {"bandwidth_mbit": 1000, "latency_ms": 0.2}},
    "traces": [
        {"at_token": 2, "device": "b", "background_load": 0.9},
        {"at_token": 3, "link": ["a", "c"], "bandwidth_mbit": 20},
    ],
}


def make_scenario(**changes) -> Scenario:
    """The base scenario with top-level keys replaced."""
    return parse_scenario({**SCENARIO, **changes}, "e2e")


def make_tiny_scenario(model: Path, **changes) -> Scenario:
    """The base scenario on the tiny live model (the ``tiny_live_model`` fixture's folder),
    1.5 MiB per device so that no device holds the model alone: for runs whose subject is
    the control flow, not the model."""
    devices = [{**d, "memory_mib": 1.5} for d in SCENARIO["devices"]]
    return make_scenario(model={"hf": str(model)}, devices=devices, **changes)


@cache
def reference_ids(
    tokens: int = SCENARIO["generate_tokens"], model: str = "smollm2-135m"
) -> list[int]:
    """The monolithic ``model``'s first ``tokens`` greedy ids after the base scenario's
    prompt."""
    opened = open_model(model)
    ids = prompt_ids(make_scenario(), opened.tokenizer)
    model = monolithic(opened.source, opened.arch)
    return model.greedy(ids, tokens)


def _session(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[3])


def assert_no_orphans(pids: dict[str, int]) -> None:
    """No agent, and no process of an agent's session (its CPU burners), is left."""
    agents = set(pids.values())
    left = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            pid = int(entry)
            if pid in agents or _session(pid) in agents:
                left.append(pid)
    assert not left, f"processes left behind: {left}"


def agent_pid(name: str) -> int:
    """The pid of this process's agent child for device ``name`` (from /proc)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if (
            parent == os.getpid()
            and b"--name" in argv
            and argv[argv.index(b"--name") + 1] == name.encode()
        ):
            return int(entry)
    raise AssertionError(f"no agent process for {name}")
