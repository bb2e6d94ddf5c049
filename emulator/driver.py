"""The emulator driver of a testbed: it owns the world while a separate controller decodes.

This is the ``testbed`` service of a rendered compose project (``edgepart testbed drive``).
It waits on the controller's turns (``run/world``), applies the traces due then through the
agents' commands (CPU burners, memory budgets, link rates) or by killing the device's
container, answers ``run/world_ready``, prints every token the controller announces, and
finally prints the text and saves the result (DESIGN's emulate JSON) where it is told.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import aiomqtt

from device_agent import protocol as proto
from emulator.live_world import KillDevice, World
from emulator.scenario import Scenario

log = logging.getLogger("edgepart.driver")

COMMAND_TIMEOUT_S = 30.0  # for an agent to carry out a trace's command, s
MQTT_TIMEOUT_S = 30  # per MQTT operation, s
CONNECT_WINDOW_S = 90.0  # how long the driver retries the broker while the testbed starts, s
#: longest whole run (s) before the driver gives up on the controller
RUN_TIMEOUT_S = 6 * 3600.0


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
    ) -> None:
        self.scenario = scenario
        self.broker = broker
        self.testbed = testbed
        self.on_token = on_token
        self.world = World(scenario, self._command, kill)
        self.client: aiomqtt.Client | None = None
        self._replies: dict[str, asyncio.Future] = {}
        self._ids = (f"t{i}" for i in itertools.count())
        self._turns: asyncio.Queue[int] = asyncio.Queue()
        self._outcome: asyncio.Future | None = None

    async def run(self, timeout_s: float = RUN_TIMEOUT_S) -> proto.RunOutcome:
        """Serve the world until the controller publishes the run's outcome."""
        self._outcome = asyncio.get_running_loop().create_future()
        host, _, port = self.broker.rpartition(":")
        deadline = time.monotonic() + CONNECT_WINDOW_S
        delay = 0.2
        while True:
            client = aiomqtt.Client(
                host,
                int(port),
                identifier=f"edgepart-{self.testbed}-driver",
                timeout=MQTT_TIMEOUT_S,
                socket_options=proto.SOCKET_OPTIONS,
            )
            try:
                async with client:
                    self.client = client
                    return await self._session(client, timeout_s)
            except aiomqtt.MqttError as exc:
                # the testbed may still be starting: retry the broker, but only until joined
                if self.client is not None or time.monotonic() + delay > deadline:
                    raise DriverError(f"broker {self.broker}: {exc}") from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _session(self, client: aiomqtt.Client, timeout_s: float) -> proto.RunOutcome:
        assert self._outcome is not None
        for kind in ("world", "progress", "result", "reply"):
            await client.subscribe(proto.subscription(self.testbed, kind), qos=1)
        async with asyncio.TaskGroup() as tg:
            reader = tg.create_task(self._read(client))
            turns = tg.create_task(self._serve_turns())
            try:
                return await asyncio.wait_for(asyncio.shield(self._outcome), timeout_s)
            except TimeoutError:
                raise DriverError(f"no outcome from the controller in {timeout_s:.0f} s") from None
            finally:
                reader.cancel()
                turns.cancel()

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = proto.parse_topic(message.topic.value)
            if topic is None or topic.testbed != self.testbed:
                continue
            payload = message.payload if isinstance(message.payload, bytes) else b""
            decoded = proto.decode(topic.kind, payload)
            if isinstance(decoded, proto.Malformed):
                log.warning("ignored a malformed %s message: %s", topic.kind, decoded.reason)
            elif isinstance(decoded, proto.Reply):
                fut = self._replies.get(decoded.id)
                if fut is not None and not fut.done():
                    fut.set_result(decoded)
            elif isinstance(decoded, proto.WorldTurn):
                self._turns.put_nowait(decoded.token)
            elif isinstance(decoded, proto.Progress):
                if self.on_token is not None:
                    self.on_token(decoded)
            elif isinstance(decoded, proto.RunOutcome):
                assert self._outcome is not None
                if not self._outcome.done():
                    self._outcome.set_result(decoded)

    async def _serve_turns(self) -> None:
        """One turn at a time, in order: a token's traces before the next token's."""
        while True:
            token = await self._turns.get()
            try:
                if token == 0:
                    await self.world.setup()
                    killed: list[str] = []
                else:
                    killed = await self.world.before_token(token)
                ready = proto.WorldReady(token=token, failed=tuple(killed))
            except (DriverError, RuntimeError, OSError) as exc:
                log.error("token %d: %s", token, exc)
                ready = proto.WorldReady(token=token, ok=False, error=str(exc))
            await self._publish(proto.run_topic(self.testbed, "world_ready"), ready)

    async def _publish(self, topic: str, message) -> None:
        assert self.client is not None
        await self.client.publish(topic, proto.encode(message), qos=1)

    async def _command(self, device: str, command) -> proto.Reply:
        fut = asyncio.get_running_loop().create_future()
        self._replies[command.id] = fut
        try:
            await self._publish(proto.device_topic(self.testbed, device, "cmd"), command)
            return await asyncio.wait_for(fut, COMMAND_TIMEOUT_S)
        except TimeoutError:
            raise DriverError(
                f"{device} did not answer {command.op} in {COMMAND_TIMEOUT_S:.0f} s"
            ) from None
        finally:
            self._replies.pop(command.id, None)


def docker_kill(project: str) -> KillDevice:
    """Kill a device by killing its container (compose project label, or a swarm stack's)."""

    async def kill(device: str) -> None:
        import docker

        def run() -> None:
            client = docker.from_env()
            try:
                found = client.containers.list(
                    filters={
                        "label": [
                            f"com.docker.compose.project={project}",
                            f"com.docker.compose.service={device}",
                        ]
                    }
                ) or client.containers.list(
                    filters={"label": [f"com.docker.swarm.service.name={project}_{device}"]}
                )
                if not found:
                    raise DriverError(f"no running container of device {device} in {project}")
                for container in found:
                    container.kill()
            finally:
                client.close()

        await asyncio.to_thread(run)

    return kill


def save_outcome(outcome: proto.RunOutcome, text: str, out_dir: Path) -> Path:
    """Write the run's JSON (DESIGN's emulate keys plus the text) to out_dir/result.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "result.json"
    data = {**outcome.result, "backend": "docker", "text": text}
    if not outcome.ok:
        data = {"error": outcome.error}
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path


def drive(
    scenario: Scenario,
    broker: str,
    testbed: str,
    kill: KillDevice,
    on_token: Callable[[proto.Progress], None] | None = None,
) -> proto.RunOutcome:
    """Run the driver to the end of the controller's generation (blocking)."""
    return asyncio.run(Driver(scenario, broker, testbed, kill, on_token).run())
