"""The emulator driver of a testbed: it owns the world while a separate controller decodes.

This is the ``testbed`` service of a rendered compose project (``edgepart testbed drive``).
It waits on the controller's turns (``run/world``), applies the traces due then through the
agents' commands (CPU burners, memory budgets, link rates) or by killing the device's
container, answers ``run/world_ready``, prints every token the controller announces, and
finally prints the text and saves the result (the emulate JSON of docs/design.md) where it is told.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from edgepart.control_plane import mqtt
from edgepart.control_plane import protocol as proto
from edgepart.control_plane.session import BrokerSession, SessionHooks, first_error
from edgepart.controller.result import RunRecord, RunResult
from edgepart.emulator import docker_cli
from edgepart.emulator.live_world import KillDevice, StartDevice, World
from edgepart.emulator.scenario import Scenario

log = logging.getLogger("edgepart.driver")

COMMAND_TIMEOUT_S = 30.0  # for an agent to carry out a trace's command, s
JOIN_TIMEOUT_S = 120.0  # for a started device's agent to come online, s
#: longest whole run (s) before the driver gives up on the controller
RUN_TIMEOUT_S = 6 * 3600.0
#: how a device's speed is enforced in a testbed's container (the record's isolation)
CONTAINER_ISOLATION = "container cgroup + pacing"
#: the run/* and device topics the driver reads
SUBSCRIBED: tuple[proto.TopicKind, ...] = ("world", "progress", "result", "reply", "status")


class DriverError(RuntimeError):
    """The run failed (the controller reported an error, or the driver could not act)."""


class Driver:
    """Applies a scenario's traces on the controller's turns and collects the outcome."""

    def __init__(
        self,
        scenario: Scenario,
        broker: str,
        testbed: str,
        kill: KillDevice,
        on_token: Callable[[proto.Progress], None] | None = None,
        auth: mqtt.BrokerAuth | None = None,
        start: StartDevice | None = None,
        time_dilation: float = 1.0,
    ) -> None:
        """The driver of a scenario's world; ``kill`` and ``start`` act on a device (its
        process or container) for fail and join traces; the world runs ``time_dilation``
        times slower than the scenario (its links shaped so, every command's wait so long)."""
        self.scenario = scenario
        self.testbed = testbed
        self.on_token = on_token
        self._start = start
        self.world = World(
            scenario, self._command, kill, None if start is None else self._join,
            time_dilation=time_dilation,
        )  # fmt: skip
        # a restarted broker keeps no subscriptions or messages: the session subscribes
        # again and sends the unanswered commands again (agents run each id once)
        self.session = BrokerSession(
            broker,
            f"edgepart-{testbed}-driver",
            [proto.subscription(testbed, kind) for kind in SUBSCRIBED],
            log=log,
            error=DriverError,
            auth=auth,
            hooks=SessionHooks(
                on_message=self._on_message, accepts=lambda topic: topic.testbed == testbed
            ),
        )
        self._online_at: dict[str, float] = {}  # device -> when it was last seen online
        self._ids = (f"t{i}" for i in itertools.count())
        self._turns: asyncio.Queue[int] = asyncio.Queue()
        self._outcome: asyncio.Future | None = None
        self._queued: set[int] = set()  # turns queued or being served
        self._served: dict[int, proto.WorldReady] = {}  # turns done: answered again if asked
        self._answering: set[asyncio.Task] = set()

    @property
    def broker_losses(self) -> int:
        """Times the driver lost the broker and reconnected."""
        return self.session.losses

    async def run(self, timeout_s: float = RUN_TIMEOUT_S) -> proto.RunOutcome:
        """Serve the world until the controller publishes the run's outcome."""
        self._outcome = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.TaskGroup() as tg:
                link = tg.create_task(self.session.run())
                turns = tg.create_task(self._serve_turns())
                try:
                    return await asyncio.wait_for(asyncio.shield(self._outcome), timeout_s)
                except TimeoutError:
                    raise DriverError(
                        f"no outcome from the controller in {timeout_s:.0f} s"
                    ) from None
                finally:
                    link.cancel()
                    turns.cancel()
        except BaseExceptionGroup as group:
            failed = first_error(group, DriverError)
            if failed is None:
                raise
            raise failed from None

    async def _on_message(self, topic: proto.Topic, message: BaseModel) -> None:
        if isinstance(message, proto.Status):
            if message.state == "online":
                self._online_at[message.name] = time.monotonic()
        elif isinstance(message, proto.WorldTurn):
            self._take_turn(message.token)
        elif isinstance(message, proto.Progress):
            if self.on_token is not None:
                self.on_token(message)
        elif isinstance(message, proto.RunOutcome):
            assert self._outcome is not None
            if not self._outcome.done():
                self._outcome.set_result(message)

    async def _join(self, device: str) -> None:
        """Start a device and return once its agent says it is online (it then takes the
        commands that give it the world's state)."""
        assert self._start is not None
        started = time.monotonic()
        await self._start(device)
        deadline = started + JOIN_TIMEOUT_S
        while self._online_at.get(device, -math.inf) < started:
            if time.monotonic() > deadline:
                raise DriverError(f"{device} not online {JOIN_TIMEOUT_S:.0f} s after its start")
            await asyncio.sleep(0.05)

    def _take_turn(self, token: int) -> None:
        """Queue a turn once: a turn asked again (the controller resends what a lost broker
        may have dropped) is answered again if served, else left to its first serving."""
        served = self._served.get(token)
        if served is not None:
            task = asyncio.get_running_loop().create_task(self._answer_turn(served))
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)
        elif token not in self._queued:
            self._queued.add(token)
            self._turns.put_nowait(token)

    async def _answer_turn(self, ready: proto.WorldReady) -> None:
        try:
            await self.session.publish(proto.run_topic(self.testbed, "world_ready"), ready)
        except DriverError as exc:  # the controller asks again once it is back
            log.warning("could not answer turn %d again: %s", ready.token, exc)

    async def _serve_turns(self) -> None:
        """One turn at a time, in order: a token's traces before the next token's."""
        while True:
            token = await self._turns.get()
            try:
                joined_before = len(self.world.joined)
                if token == 0:
                    await self.world.setup()
                    killed: list[str] = []
                else:
                    killed = await self.world.before_token(token)
                joined = tuple(self.world.joined[joined_before:])
                ready = proto.WorldReady(token=token, failed=tuple(killed), joined=joined)
            except (DriverError, RuntimeError, OSError) as exc:
                log.error("token %d: %s", token, exc)
                ready = proto.WorldReady(token=token, ok=False, error=str(exc))
            self._served[token] = ready
            self._queued.discard(token)
            await self.session.publish(proto.run_topic(self.testbed, "world_ready"), ready)

    async def _command(self, device: str, command) -> proto.Reply:
        topic = proto.device_topic(self.testbed, device, "cmd")
        timeout_s = COMMAND_TIMEOUT_S * self.world.time_dilation
        try:
            return await self.session.request(topic, command, timeout_s)
        except TimeoutError:
            what = f"{device} did not answer {command.op} in {timeout_s:.0f} s"
            raise DriverError(what) from None


def docker_kill(project: str) -> KillDevice:
    """Kill a device by killing its container (compose project label, or a swarm stack's)."""

    async def kill(device: str) -> None:
        def run() -> None:
            with docker_cli.client() as sdk:
                found = docker_cli.project_containers(sdk, project, device)
                if not found:  # a swarm stack's task
                    stack = [docker_cli.stack_service_label(project, device)]
                    found = sdk.containers.list(filters=docker_cli.sdk_filters(stack))
                if not found:
                    raise DriverError(f"no running container of device {device} in {project}")
                for container in found:
                    container.kill()

        await asyncio.to_thread(run)

    return kill


def docker_start(project: str) -> StartDevice:
    """Start a device's container (stopped by a kill) and let its agent join: a device that
    joins later waits for proto.JOIN_FILE (``edgepart agent --join-file``), made here. Compose
    projects only: a swarm restarts a killed task by itself."""

    async def start(device: str) -> None:
        def run() -> None:
            with docker_cli.client() as sdk:
                found = docker_cli.project_containers(sdk, project, device, stopped=True)
                if not found:
                    raise DriverError(f"no container of device {device} in {project}")
                for container in found:
                    if container.status != "running":
                        container.start()
                    result = container.exec_run(["touch", proto.JOIN_FILE])
                    if result.exit_code != 0:
                        raise DriverError(
                            f"{device}: cannot make {proto.JOIN_FILE}: {result.output!r}"
                        )

        await asyncio.to_thread(run)

    return start


def save_outcome(outcome: proto.RunOutcome, text: str, out_dir: Path) -> Path:
    """Write the run's JSON (the emulate keys of docs/design.md plus the text) to
    out_dir/result.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "result.json"
    data = {**outcome.result, "backend": "docker", "text": text}
    if not outcome.ok:
        data = {"error": outcome.error}
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path


def outcome_record(outcome: proto.RunOutcome, text: str) -> RunRecord:
    """The run a controller announced, as every backend records it."""
    result = RunResult.from_summary(outcome.result)
    return RunRecord(result, "docker", text, isolation=CONTAINER_ISOLATION)


def drive(
    scenario: Scenario,
    broker: str,
    testbed: str,
    kill: KillDevice,
    on_token: Callable[[proto.Progress], None] | None = None,
    auth: mqtt.BrokerAuth | None = None,
    start: StartDevice | None = None,
    time_dilation: float = 1.0,
) -> proto.RunOutcome:
    """Run the driver to the end of the controller's generation (blocking)."""
    driver = Driver(scenario, broker, testbed, kill, on_token, auth, start, time_dilation)
    return asyncio.run(driver.run())
