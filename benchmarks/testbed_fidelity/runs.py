"""One testbed run for parts 3 and 4: ``run_docker`` bounded by a watchdog, memory sampled.

- ``testbed_run``: one ``edgepart.emulator.backends.docker.run_docker``, summarised (or its error);
- ``Watchdog``: kills the run's ``testbed`` container when its budget is spent or the
  controller died and the driver waits on;
- ``MemorySampler``: the host's memory in use and the project's containers' memory while
  the run lasts.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    console,
    error_text,
    line_printer,
    load1,
    run_numbers,
    traceback_text,
)
from benchmarks.testbed_fidelity.docker_calls import (
    DOCKER_TIMEOUT_S,
    BenchError,
    call,
    compose_containers,
    memory_usage,
)
from edgepart.emulator.scenario import MIB

CONTROLLER_POLL_S, CONTROLLER_GRACE_S = 5.0, 30.0
MEMORY_SAMPLE_S, DOCKER_STATS_S = 0.5, 3.0


def project_of(scenario) -> str:
    """The compose project run_docker makes for the scenario in this process."""
    from edgepart.emulator.compose import project_name

    return f"{project_name(scenario)}-{os.getpid()}"  # as run_docker names it


class Watchdog:
    """Stops a compose project's run that cannot finish: kills its ``testbed`` container.

    It fires when the budget is spent, or when the controller's container has exited with
    a non-zero code and the driver is still waiting CONTROLLER_GRACE_S later (a controller
    that dies before publishing an outcome leaves the driver waiting for hours); the kill
    is retried every 10 s until the with block ends.
    """

    def __init__(self, project: str, budget_s: float) -> None:
        """Arm for project."""
        self.project, self.budget_s = project, budget_s
        self.fired: str | None = None  # why it fired
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=DOCKER_TIMEOUT_S + 5)

    def _controller_failed(self) -> int | None:
        """The controller container's exit code when it exited with one != 0, else None."""
        with contextlib.suppress(BenchError, ValueError):
            states = compose_containers(
                self.project, "controller", "--format", "{{.State}}|{{.Status}}"
            ).splitlines()
            for line in states:
                state, _, status = line.partition("|")
                m = re.match(r"Exited \((\d+)\)", status)
                if state == "exited" and m and int(m.group(1)) != 0:
                    return int(m.group(1))
        return None

    def _run(self) -> None:
        start, failed_at = time.monotonic(), None
        while not self._stop.wait(CONTROLLER_POLL_S):
            if time.monotonic() - start > self.budget_s:
                self.fired = f"over its budget of {self.budget_s:.0f} s"
                break
            code = self._controller_failed()
            if code is not None:
                failed_at = failed_at or time.monotonic()
                if time.monotonic() - failed_at > CONTROLLER_GRACE_S:
                    self.fired = f"the controller exited with code {code}, the driver waited on"
                    break
        if self.fired is None:
            return
        console.print(f"  [red]{self.project}: {self.fired}; stopping it[/]")
        while not self._stop.is_set():
            with contextlib.suppress(BenchError):
                ids = compose_containers(self.project, "testbed", "-q").split()
                if ids:
                    call(["docker", "kill", *ids], check=False)
            self._stop.wait(10)


_UNITS = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 1e3, "mb": 1e6, "gb": 1e9}


def _bytes(text: str) -> float:
    """A size as docker stats words it (``12.5MiB``) in bytes (NaN when it cannot tell)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]+)\s*", text)
    if not m:
        return float("nan")
    return float(m.group(1)) * _UNITS.get(m.group(2).lower(), float("nan"))


def host_used_mib() -> float:
    """MemTotal - MemAvailable (MiB)."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            info[key] = float(rest.split()[0]) * 1024
    return (info["MemTotal"] - info["MemAvailable"]) / MIB


class MemorySampler:
    """Host memory every MEMORY_SAMPLE_S and a project's containers' memory (docker stats)."""

    def __init__(self, project: str) -> None:
        """Sample while in the with block."""
        self.project = project
        self.baseline_mib = host_used_mib()
        self.host_peak_mib = self.baseline_mib
        self.containers_peak_mib = 0.0
        self.container_max_mib: dict[str, float] = {}
        self.stats_samples = 0
        self.stats_errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._host, daemon=True),
            threading.Thread(target=self._containers, daemon=True),
        ]

    def __enter__(self) -> MemorySampler:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=DOCKER_TIMEOUT_S + 5)

    def _host(self) -> None:
        while not self._stop.wait(MEMORY_SAMPLE_S):
            self.host_peak_mib = max(self.host_peak_mib, host_used_mib())

    def _containers(self) -> None:
        while not self._stop.is_set():
            try:
                usage_rows = memory_usage()
            except BenchError as exc:
                if len(self.stats_errors) < 5:
                    self.stats_errors.append(str(exc))
                self._stop.wait(DOCKER_STATS_S)
                continue
            total, seen = 0.0, 0
            for name, usage in usage_rows:
                if not name.startswith(self.project + "-"):
                    continue
                mib = _bytes(usage.split("/")[0]) / MIB
                if math.isfinite(mib):
                    total += mib
                    seen += 1
                    self.container_max_mib[name] = max(self.container_max_mib.get(name, 0), mib)
            if seen:
                self.stats_samples += 1
                self.containers_peak_mib = max(self.containers_peak_mib, total)
            self._stop.wait(DOCKER_STATS_S)

    def summary(self) -> dict[str, Any]:
        """Baseline and peak of the host, the containers' peak sum and each one's peak (MiB)."""
        per = self.container_max_mib
        agents = {
            k: v
            for k, v in per.items()
            if not re.search(r"-(broker|controller|testbed|calibrate)-\d+$", k)
        }
        return {
            "host_used_baseline_mib": self.baseline_mib,
            "host_used_peak_mib": self.host_peak_mib,
            "host_used_increase_mib": self.host_peak_mib - self.baseline_mib,
            "containers_peak_sum_mib": self.containers_peak_mib,
            "container_peak_mib": per,
            "agent_peak_max_mib": max(agents.values(), default=None),
            "agent_peak_median_mib": statistics.median(agents.values()) if agents else None,
            "docker_stats_samples": self.stats_samples,
            "docker_stats_errors": self.stats_errors,
        }


def _summary(scenario, run) -> dict[str, Any]:
    """A finished run's numbers: tokens, fidelity, speed, moves and times."""
    from edgepart.emulator.report import fidelity

    r = run.result
    median, p90 = fidelity(run)
    ratios = [m / p for m, p in zip(r.per_token_s, r.predicted_per_token_s, strict=True) if p > 0]
    return {
        "tokens": len(r.per_token_s),
        "complete": len(r.per_token_s) == scenario.generate_tokens - 1,
        "fidelity_median": median,
        "fidelity_p90": p90,
        "ratio_median": statistics.median(ratios) if ratios else None,
        **run_numbers(r),
        "recoveries": r.recoveries,
        "start_s": run.start_s,
    }


def testbed_run(
    scenario,
    text: str,
    algorithm: str,
    image: str,
    work_dir: Path,
    budget_s: float,
    sample_memory: bool = False,
) -> dict[str, Any]:
    """One run_docker, summarised (or its error); bounded by a watchdog."""
    from edgepart.emulator.backends.docker import run_docker

    project = project_of(scenario)
    t0 = time.perf_counter()
    load_before = load1()
    sampler = MemorySampler(project) if sample_memory else contextlib.nullcontext()
    watchdog = Watchdog(project, budget_s)
    try:
        with watchdog, sampler:
            run = run_docker(
                scenario, text, algorithm, work_dir=work_dir, image=image,
                status=line_printer("    "),
            )  # fmt: skip
    except Exception as exc:  # recorded, not worked around
        out = {
            "algorithm": algorithm,
            "ok": False,
            "error": error_text(exc),
            "stopped_by_watchdog": watchdog.fired,
            "budget_s": budget_s,
            "traceback": traceback_text(exc),
            "wall_s": time.perf_counter() - t0,
            "load_before": load_before,
            "load_after": load1(),
            "project": project,
        }
    else:
        out = {
            "algorithm": algorithm,
            "ok": True,
            **_summary(scenario, run),
            "wall_s": time.perf_counter() - t0,
            "load_before": load_before,
            "load_after": load1(),
            "cpu_share": run.shares,
            "project": run.project,
            "run": run.to_json(),
            "driver_log_tail": run.logs[-3000:],
        }
    if sample_memory:
        out["memory"] = sampler.summary()  # type: ignore[union-attr]
    return out
