"""The ``local`` backend: real agents as processes on this machine, one per device.

It starts an MQTT broker (embedded amqtt, or uses the one given), one ``device_agent``
process per scenario device, and the controller in this process; it owns the world:
device speed becomes a CPU share of this host (from the calibrated host profile),
enforced by a cgroup when running as root and by time dilation in the agent always;
links are shaped in each agent's sender; the scenario's traces are applied when
generation reaches them (CPU burners, memory budgets, link rates, ``kill -9``).
Everything started is torn down on exit, error or Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from controller.agent_link import AgentLink
from controller.config import TelemetryMode
from controller.orchestrator import Controller
from controller.result import ControllerError, RunRecord, RunResult
from emulator.job import controller_config, model_ref, prompt_ids
from emulator.live_world import World
from emulator.scenario import Scenario
from emulator.world import MIB

log = logging.getLogger("edgepart.local")

#: CPU kept free for the broker, the controller and the agents' own event loops (cores)
RESERVED_CORES = 0.25
#: memory a cgroup allows beyond the block budget: the agent's runtime (Python, torch)
RUNTIME_SLACK_BYTES = 64 * MIB
AGENT_STOP_S = 5.0
WORLD_COMMAND_TIMEOUT_S = 30.0  # for an agent to carry out a trace's command, s


class LocalBackendError(RuntimeError):
    """The scenario cannot run on this machine as given (bad input: exit 2)."""


def cpu_shares(scenario: Scenario, reference_gflops: float, cores: float) -> dict[str, float]:
    """Each device's CPU share (cores) on this host; refuses scenarios the host cannot hold."""
    shares = {d.name: d.compute_gflops / reference_gflops for d in scenario.devices}
    usable = cores - RESERVED_CORES
    total = sum(shares.values())
    if total > usable:
        detail = ", ".join(f"{n} {s:.2f}" for n, s in shares.items())
        raise LocalBackendError(
            f"devices: the scenario needs {total:.2f} cores of this host ({detail}; this CPU "
            f"runs {reference_gflops:.2f} GFLOP/s per core) but {usable:.2f} of its "
            f"{cores:.2f} are free for devices; lower compute_gflops or use the docker "
            "backend on more hosts"
        )
    return shares


@dataclass
class AgentProcess:
    """One started agent: its process, log file and (as root) cgroup."""

    name: str
    process: subprocess.Popen
    log_path: Path
    cgroup: object | None = None

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.process.poll() is None


@dataclass
class LocalRun(RunRecord):
    """The record of a local emulation, plus where its agents ran and logged."""

    backend: str = "local"
    broker: str = ""  # the broker's host:port
    dropped_messages: int = 0  # malformed MQTT messages the controller dropped
    logs: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)  # the agent processes (all reaped)


@dataclass
class LocalWorld:
    """The local backend's world around the controller (its WorldHooks): the scenario's
    traces applied from this process, and (with cgroups) each agent's memory capped at
    the setup."""

    world: World
    capped: dict[str, AgentProcess] | None = None  # the agents to cap, with cgroups
    run_topics: tuple = ()

    async def setup(self, link: AgentLink) -> None:
        """Cap each agent's memory: budget + its measured runtime + slack; then the
        world's setup (links shaped, traces due at the start applied)."""
        for name, agent in (self.capped or {}).items():
            _limit(agent, float(self.world.state.memory_bytes[self.world.state.index(name)]))
        await self.world.setup()

    async def before_token(self, link: AgentLink, token: int) -> None:
        """The traces due before generated token ``token``."""
        await self.world.before_token(token)

    def on_run_message(self, message: object) -> None:
        """No run topics are followed."""


async def _kill_agent(agent: AgentProcess, controller: Controller | None) -> None:
    """kill -9 a device's agent and its burners, then wait until the controller notices."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(agent.process.pid, signal.SIGKILL)
    agent.process.wait(timeout=AGENT_STOP_S)
    assert controller is not None
    await controller.link.until_gone(agent.name)


def spawn_agent(
    scenario: Scenario,
    device: str,
    broker: str,
    testbed: str,
    share: float,
    profile_path: Path | None,
    log_dir: Path,
    metrics_port: int | None = None,
    dataplane_key: Path | None = None,
    weight_cache: Path | None = None,
) -> AgentProcess:
    """Start one device's agent process (own session, logs to log_dir/<device>.log);
    ``weight_cache``: the directory of dequantised block weights the agents share (None:
    the agent's default)."""
    dev = scenario.device(device)
    log_path = log_dir / f"{device}.log"
    args = [
        sys.executable, "-m", "device_agent",
        "--name", device,
        "--broker", broker,
        "--listen", "127.0.0.1:0",
        "--testbed", testbed,
        "--model", model_ref(scenario),
        "--memory-mib", str(dev.memory_mib),
        "--cpu-share", f"{share:.6f}",
        "--gflops", str(dev.compute_gflops),
        "--exit-with-parent",
    ]  # fmt: skip
    if profile_path is not None and profile_path.is_file():
        args += ["--profile", str(profile_path)]
    if metrics_port is not None:
        args += ["--metrics-port", str(metrics_port)]
    if dataplane_key is not None:
        args += ["--dataplane-key", str(dataplane_key)]
    if weight_cache is not None:
        args += ["--weight-cache", str(weight_cache)]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            args,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return AgentProcess(device, process, log_path)


def write_secret(path: Path) -> Path:
    """A fresh random secret (64 hex characters) in a file only its owner may read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(secrets.token_hex(32))
    return path


def stop_agents(agents: dict[str, AgentProcess]) -> None:
    """Terminate every agent (SIGTERM, then SIGKILL after a grace period) and reap it."""
    for agent in agents.values():
        if agent.alive():
            with contextlib.suppress(ProcessLookupError):
                agent.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + AGENT_STOP_S
    for agent in agents.values():
        try:
            agent.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent.process.pid, signal.SIGKILL)
            agent.process.wait(timeout=AGENT_STOP_S)
        # burners are the agent's children in its session: none may outlive it
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(agent.process.pid, signal.SIGKILL)


@contextlib.contextmanager
def _broker(endpoint: str | None) -> Iterator[str]:
    if endpoint is not None:
        yield endpoint
        return
    from emulator.broker import EmbeddedBroker

    broker = EmbeddedBroker()
    broker.start()
    try:
        yield broker.endpoint
    finally:
        broker.stop()


def run_local(
    scenario: Scenario,
    algorithm: str,
    *,
    broker: str | None = None,
    telemetry: TelemetryMode = "measured",
    work_dir: Path = Path("out/local"),
    progress: Callable[[int, RunResult], None] | None = None,
    status: Callable[[str], None] | None = None,
    metrics_port: int | None = None,
    cgroups: bool | None = None,
    agent_metrics_ports: Mapping[str, int] | None = None,
    on_finished: Callable[[RunResult], None] | None = None,
) -> LocalRun:
    """Emulate the scenario with real agents on this machine; returns what was measured.

    ``metrics_port`` serves the controller's /metrics, ``agent_metrics_ports`` (device ->
    port) each agent's, on 127.0.0.1. ``on_finished`` is called with the result once
    generation is done and before anything is stopped, so every endpoint still serves
    (e.g. for a Prometheus to scrape them).
    """
    from emulator.host_limits import CgroupLimits, host_cores
    from llm.blocks import block_table
    from llm.calibration import calibrated_table
    from llm.host_profile import cache_path, default_cache_dir, host_profile
    from llm.loader import open_model

    say = status or (lambda _msg: None)
    ref = model_ref(scenario)
    opened = open_model(ref)
    profile = host_profile(ref, threads=1, progress=say)
    shares = cpu_shares(scenario, profile.reference_gflops, host_cores())
    table = calibrated_table(block_table(opened.arch.spec), profile)
    ids = prompt_ids(scenario, opened.tokenizer)
    testbed = f"{scenario.name}-{os.getpid()}"
    log_dir = work_dir / testbed
    log_dir.mkdir(parents=True, exist_ok=True)
    key = write_secret(log_dir / "dataplane.key")
    if cgroups is None:
        cgroups = CgroupLimits.detect() is not None
    agents: dict[str, AgentProcess] = {}
    controller: Controller | None = None
    with _broker(broker) as endpoint:
        try:
            late = scenario.offline_at_start
            say(f"starting {len(scenario.devices) - len(late)} agents (broker {endpoint})")

            def launch(name: str) -> AgentProcess:
                agent = spawn_agent(
                    scenario, name, endpoint, testbed, shares[name],
                    cache_path(ref, threads=1), log_dir,
                    (agent_metrics_ports or {}).get(name), key,
                    # one cache for every agent: a block dequantised once is read by all
                    default_cache_dir(),
                )  # fmt: skip
                previous = agents.get(name)
                if previous is not None:  # a device back after a fail: its old group
                    agent.cgroup = previous.cgroup
                elif cgroups:
                    # joined once online: start-up (imports, opening the model) is not
                    # what a device's speed emulates, and at a 0.1-core share it takes a
                    # minute
                    agent.cgroup = CgroupLimits.create(
                        f"{testbed}-{name}", cpu_share=shares[name], memory_bytes=None
                    )
                agents[name] = agent
                return agent

            async def join(name: str) -> None:
                agent = launch(name)
                assert controller is not None
                await controller.link.until_online(name)
                if agent.cgroup is not None:
                    _limit(agent, float(world.state.memory_bytes[world.state.index(name)]))

            for d in scenario.devices:
                if d.name not in late:
                    launch(d.name)
            world = World(
                scenario,
                lambda device, cmd: controller.link.command(device, cmd, WORLD_COMMAND_TIMEOUT_S),
                lambda device: _kill_agent(agents[device], controller),
                join,
                lambda device: controller.link.until_online(device),
            )
            config = controller_config(
                scenario, table, ids, endpoint, testbed, algorithm, telemetry, metrics_port
            )
            controller = Controller(
                config,
                world=LocalWorld(world, agents if cgroups else None),
                configured_view=world.view,
                progress=progress,
            )
            try:
                result = asyncio.run(_run(controller, agents))
            except ControllerError as exc:
                if exc.partial is not None:  # the text generated until the run stopped
                    exc.partial_text = opened.tokenizer.decode(
                        exc.partial.output_token_ids, skip_special_tokens=True
                    )
                raise
            if on_finished is not None:
                on_finished(result)
        finally:
            stop_agents(agents)
            if controller is not None and controller.metrics is not None:
                controller.metrics.close()  # the port is free for the next run
            for agent in agents.values():
                if agent.cgroup is not None:
                    agent.cgroup.remove()
    text = opened.tokenizer.decode(result.output_token_ids, skip_special_tokens=True)
    return LocalRun(
        result=result,
        text=text,
        shares=shares,
        isolation="cgroup + time dilation" if cgroups else "time dilation",
        telemetry=telemetry,
        broker=endpoint,
        dropped_messages=controller.link.session.dropped.total,
        logs={n: str(a.log_path) for n, a in agents.items()},
        pids={n: a.process.pid for n, a in agents.items()},
    )


def _limit(agent: AgentProcess, budget_bytes: float) -> None:
    """Put a started agent into its cgroup, memory capped at its budget plus its measured
    runtime plus slack (bytes)."""
    assert agent.cgroup is not None
    agent.cgroup.add(agent.process.pid)
    runtime = _rss_bytes(agent.process.pid)
    agent.cgroup.set_memory_limit(int(budget_bytes + runtime + RUNTIME_SLACK_BYTES))


def _rss_bytes(pid: int) -> int:
    """Resident memory of a process (bytes), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


async def _run(controller: Controller, agents: dict[str, AgentProcess]) -> RunResult:
    """Run the controller, failing fast if an agent process dies before it joins."""
    run = asyncio.create_task(controller.run())
    while not run.done():
        dead = [a for a in agents.values() if not a.alive() and not controller.link.joined.is_set()]
        if dead:
            run.cancel()
            tail = dead[0].log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(
                f"agent {dead[0].name} exited with {dead[0].process.returncode}:\n{tail}"
            )
        await asyncio.wait({run}, timeout=0.5)
    return run.result()
