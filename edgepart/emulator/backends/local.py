"""The ``local`` backend: real agents as processes on this machine, one per device.

It starts an MQTT broker (embedded amqtt, or uses the one given), one ``device_agent``
process per scenario device, and the controller in this process; it owns the world:
device speed becomes a CPU share of this host (from the calibrated host profile),
enforced by a cgroup when running as root and by pacing in the agent always;
links are shaped in each agent's sender; the scenario's traces are applied when
generation reaches them (CPU burners, memory budgets, link rates, ``kill -9``).
When the devices need more of this host's CPU than it has free, the whole world runs k
times slower (time dilation, ``edgepart.emulator.host_limits.fit_scenario``): each device at its
share / k and its speed / k, links at their rate / k and latency x k, every timeout x k;
the controller reports in scenario time (wall / k). Everything started is torn down on
exit, error or Ctrl-C.

- ``run_local``: one run: ``LocalJob.prepare`` (model, host profile, CPU shares and time
  dilation), the broker, the agents, the controller, and the ``LocalRun`` record;
- ``LocalAgents``: the agent processes' lifecycle (``spawn_agent``, cgroups, ``kill -9``,
  ``stop_agents``);
- ``LocalWorld``: the controller's ``WorldHooks``: the traces applied by
  ``edgepart.emulator.live_world.World`` over the controller's line to the agents.
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
from typing import TYPE_CHECKING

from edgepart.control_plane import protocol as proto
from edgepart.controller.agent_link import AgentLink
from edgepart.controller.config import TelemetryMode
from edgepart.controller.orchestrator import Controller
from edgepart.controller.result import ControllerError, RunRecord, RunResult
from edgepart.emulator.job import controller_config, model_ref, prompt_ids
from edgepart.emulator.live_world import World
from edgepart.emulator.scenario import MIB, Scenario

if TYPE_CHECKING:  # torch comes with the model: opened only when a run starts
    from edgepart.emulator.host_limits import HostFit
    from edgepart.llm.blocks import BlockTable
    from edgepart.llm.loader import OpenModel

log = logging.getLogger("edgepart.local")

#: memory a cgroup allows beyond the block budget: the agent's runtime (Python, torch)
RUNTIME_SLACK_BYTES = 64 * MIB
AGENT_STOP_S = 5.0
WORLD_COMMAND_TIMEOUT_S = 30.0  # for an agent to carry out a trace's command, s


class LocalBackendError(RuntimeError):
    """The scenario cannot run on this machine as given (bad input: exit 2)."""


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


class LocalAgents:
    """The agent processes of a run, one per online device: started (again after a fail,
    in the device's old cgroup), capped, killed and stopped.

    ``spawn`` starts one device's agent process; with ``cgroups`` each device gets a cgroup
    holding its CPU share (``testbed`` names them).
    """

    def __init__(
        self,
        spawn: Callable[[str], AgentProcess],
        shares: Mapping[str, float],
        testbed: str,
        cgroups: bool,
    ) -> None:
        """No agent started yet."""
        self._spawn = spawn
        self._shares = shares
        self._testbed = testbed
        self._cgroups = cgroups
        self.processes: dict[str, AgentProcess] = {}  # device -> its latest agent

    def launch(self, device: str) -> AgentProcess:
        """Start a device's agent; its cgroup holds the CPU share, no memory cap yet."""
        from edgepart.emulator.host_limits import CgroupLimits

        agent = self._spawn(device)
        previous = self.processes.get(device)
        if previous is not None:  # a device back after a fail: its old group
            agent.cgroup = previous.cgroup
        elif self._cgroups:
            # joined once online: start-up (imports, opening the model) is not what a
            # device's speed emulates, and at a 0.1-core share it takes a minute
            agent.cgroup = CgroupLimits.create(
                f"{self._testbed}-{device}", cpu_share=self._shares[device], memory_bytes=None
            )
        self.processes[device] = agent
        return agent

    def cap(self, device: str, budget_bytes: float) -> None:
        """Put an online agent into its cgroup (when it has one), memory capped at its
        budget plus its measured runtime plus slack (bytes)."""
        agent = self.processes[device]
        if agent.cgroup is not None:
            _limit(agent, budget_bytes)

    def kill(self, device: str) -> None:
        """kill -9 a device's agent and its burners (its whole session)."""
        agent = self.processes[device]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(agent.process.pid, signal.SIGKILL)
        agent.process.wait(timeout=AGENT_STOP_S)

    def dead(self) -> list[AgentProcess]:
        """The agents whose process has exited."""
        return [a for a in self.processes.values() if not a.alive()]

    def stop(self) -> None:
        """Stop every agent (reaped, burners included), then remove the cgroups."""
        stop_agents(self.processes)
        for agent in self.processes.values():
            if agent.cgroup is not None:
                agent.cgroup.remove()


class LocalWorld:
    """The local backend's world around the controller (its WorldHooks): the scenario's
    traces applied from this process to the agent processes, each agent's memory capped
    (with cgroups) once it is online.

    The world acts over the controller's line to the agents, which the controller hands
    over at ``setup``, before the first trace is due.
    """

    run_topics: tuple = ()  # no run topics are followed

    def __init__(self, scenario: Scenario, agents: LocalAgents, time_dilation: float = 1.0):
        """The world of a scenario acting on ``agents``, ``time_dilation`` times slower than
        the scenario says."""
        self.agents = agents
        self.link: AgentLink | None = None
        self.world = World(
            scenario, self._command, self._kill, self._join, self._reconnected, time_dilation
        )

    async def setup(self, link: AgentLink) -> None:
        """Cap each started agent's memory; then the world's setup (links shaped, traces
        due at the start applied)."""
        self.link = link
        for device in self.agents.processes:
            self.agents.cap(device, self._budget_bytes(device))
        await self.world.setup()

    async def before_token(self, link: AgentLink, token: int) -> None:
        """The traces due before generated token ``token``."""
        self.link = link
        await self.world.before_token(token)

    def on_run_message(self, message: object) -> None:
        """No run topics are followed."""

    def _budget_bytes(self, device: str) -> float:
        """A device's memory budget now (bytes)."""
        state = self.world.state
        return float(state.memory_bytes[state.index(device)])

    def _line(self) -> AgentLink:
        assert self.link is not None, "the world acts only from the controller's turns"
        return self.link

    async def _command(self, device: str, command: object) -> proto.Reply:
        timeout_s = WORLD_COMMAND_TIMEOUT_S * self.world.time_dilation
        return await self._line().command(device, command, timeout_s)

    async def _kill(self, device: str) -> None:
        """kill -9 the device's agent, then wait until the controller notices."""
        self.agents.kill(device)
        await self._line().until_gone(device)

    async def _join(self, device: str) -> None:
        """Start the device's agent, wait until it is online, then cap its memory."""
        self.agents.launch(device)
        await self._line().until_online(device)
        self.agents.cap(device, self._budget_bytes(device))

    async def _reconnected(self, device: str) -> None:
        await self._line().until_online(device)


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
    time_dilation: float = 1.0,
) -> AgentProcess:
    """Start one device's agent process (own session, logs to log_dir/<device>.log);
    ``share`` is its CPU share of this host (cores, already dilated); ``weight_cache``: the
    directory of dequantised block weights the agents share (None: the agent's default);
    ``time_dilation`` k: the agent runs at the device's speed / k, its waits k times longer."""
    dev = scenario.device(device)
    log_path = log_dir / f"{device}.log"
    args = [
        sys.executable, "-m", "edgepart.device_agent",
        "--name", device,
        "--broker", broker,
        "--listen", "127.0.0.1:0",
        "--testbed", testbed,
        "--model", model_ref(scenario),
        "--memory-mib", str(dev.memory_mib),
        "--cpu-share", f"{share:.6f}",
        "--gflops", f"{dev.compute_gflops / time_dilation:.6g}",
        "--time-dilation", f"{time_dilation:.6g}",
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
    from edgepart.emulator.broker import EmbeddedBroker

    broker = EmbeddedBroker()
    broker.start()
    try:
        yield broker.endpoint
    finally:
        broker.stop()


@dataclass(frozen=True)
class LocalJob:
    """What a local run needs before any process starts: the opened model, how the devices
    fit this host (CPU shares, time dilation), the calibrated block table and the prompt's
    ids."""

    ref: str  # what llm.loader.open_model opened
    opened: OpenModel  # its tokenizer decodes the output
    fit: HostFit
    table: BlockTable  # its times from this host's profile
    ids: list[int]

    @property
    def shares(self) -> dict[str, float]:
        """Each device's CPU share of this host as it runs (cores, dilated)."""
        return self.fit.dilated_shares

    @property
    def time_dilation(self) -> float:
        """How many times slower than its scenario the world runs (k >= 1)."""
        return self.fit.time_dilation

    @classmethod
    def prepare(
        cls, scenario: Scenario, say: Callable[[str], None], time_dilation: float | None = None
    ) -> LocalJob:
        """Open the model, profile this host (cached) and split its cores among the devices,
        dilating time when they need more than it has (``time_dilation``: this k instead of
        the least that fits). LocalBackendError when the agents cannot fit its memory or k
        is too small."""
        from edgepart.emulator.host_limits import (
            HostTooSmall,
            check_memory,
            fit_scenario,
            free_memory_bytes,
            host_cores,
        )
        from edgepart.llm.blocks import block_table
        from edgepart.llm.calibration import calibrated_table
        from edgepart.llm.host_profile import host_profile
        from edgepart.llm.loader import open_model

        ref = model_ref(scenario)
        try:
            check_memory(scenario, free_memory_bytes())
            opened = open_model(ref)
            profile = host_profile(ref, threads=1, progress=say)
            fit = fit_scenario(scenario, profile.reference_gflops, host_cores(), time_dilation)
        except HostTooSmall as exc:
            raise LocalBackendError(str(exc)) from None
        table = calibrated_table(block_table(opened.arch.spec), profile)
        return cls(ref, opened, fit, table, prompt_ids(scenario, opened.tokenizer))

    def decode(self, token_ids: list[int]) -> str:
        """Generated token ids as text."""
        return self.opened.tokenizer.decode(token_ids, skip_special_tokens=True)


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
    time_dilation: float | None = None,
) -> LocalRun:
    """Emulate the scenario with real agents on this machine; returns what was measured.

    ``time_dilation`` forces the world's k (at least the least that fits this host; None:
    that least, 1 when the scenario fits). ``metrics_port`` serves the controller's
    /metrics, ``agent_metrics_ports`` (device -> port) each agent's, on 127.0.0.1.
    ``on_finished`` is called with the result once generation is done and before anything
    is stopped, so every endpoint still serves (e.g. for a Prometheus to scrape them).
    """
    from edgepart.emulator.host_limits import CgroupLimits
    from edgepart.llm.host_profile import cache_path, default_cache_dir

    say = status or (lambda _msg: None)
    job = LocalJob.prepare(scenario, say, time_dilation)
    if job.time_dilation > 1.0:
        say(f"time dilation {job.time_dilation:.2f}: the world runs that many times slower")
    testbed = f"{scenario.name}-{os.getpid()}"
    log_dir = work_dir / testbed
    log_dir.mkdir(parents=True, exist_ok=True)
    key = write_secret(log_dir / "dataplane.key")
    if cgroups is None:
        cgroups = CgroupLimits.detect() is not None
    ports = agent_metrics_ports or {}
    controller: Controller | None = None
    with _broker(broker) as endpoint:

        def spawn(name: str) -> AgentProcess:
            return spawn_agent(
                scenario, name, endpoint, testbed, job.shares[name],
                cache_path(job.ref, threads=1), log_dir, ports.get(name), key,
                # one cache for every agent: a block dequantised once is read by all
                default_cache_dir(), job.time_dilation,
            )  # fmt: skip

        agents = LocalAgents(spawn, job.shares, testbed, cgroups)
        try:
            late = scenario.offline_at_start
            say(f"starting {len(scenario.devices) - len(late)} agents (broker {endpoint})")
            for d in scenario.devices:
                if d.name not in late:
                    agents.launch(d.name)
            hooks = LocalWorld(scenario, agents, job.time_dilation)
            config = controller_config(
                scenario, job.table, job.ids, endpoint, testbed, algorithm, telemetry,
                metrics_port, job.time_dilation,
            )  # fmt: skip
            controller = Controller(
                config, world=hooks, configured_view=hooks.world.view, progress=progress
            )
            result = _generate(controller, agents, job)
            if on_finished is not None:
                on_finished(result)
        finally:
            agents.stop()
            if controller is not None and controller.metrics is not None:
                controller.metrics.close()  # the port is free for the next run
    assert controller is not None  # generation ran: it was made
    return _record(job, result, agents, cgroups, telemetry, endpoint, controller)


def _record(
    job: LocalJob,
    result: RunResult,
    agents: LocalAgents,
    cgroups: bool,
    telemetry: TelemetryMode,
    endpoint: str,
    controller: Controller,
) -> LocalRun:
    """The run's record: the result with the agents' shares, logs and pids."""
    return LocalRun(
        result=result,
        text=job.decode(result.output_token_ids),
        shares=job.shares,
        isolation="cgroup + pacing" if cgroups else "pacing",
        telemetry=telemetry,
        broker=endpoint,
        dropped_messages=controller.link.session.dropped.total,
        logs={n: str(a.log_path) for n, a in agents.processes.items()},
        pids={n: a.process.pid for n, a in agents.processes.items()},
    )


def _generate(controller: Controller, agents: LocalAgents, job: LocalJob) -> RunResult:
    """The controller's run; a ControllerError carries the text generated until it stopped."""
    try:
        return asyncio.run(_run(controller, agents))
    except ControllerError as exc:
        if exc.partial is not None:
            exc.partial_text = job.decode(exc.partial.output_token_ids)
        raise


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


async def _run(controller: Controller, agents: LocalAgents) -> RunResult:
    """Run the controller, failing fast if an agent process dies before it joins."""
    run = asyncio.create_task(controller.run())
    while not run.done():
        dead = [] if controller.link.joined.is_set() else agents.dead()
        if dead:
            run.cancel()
            tail = dead[0].log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(
                f"agent {dead[0].name} exited with {dead[0].process.returncode}:\n{tail}"
            )
        await asyncio.wait({run}, timeout=0.5)
    return run.result()
