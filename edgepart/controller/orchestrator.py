"""The live controller: plans from telemetry, moves blocks between agents, drives decoding.

It never carries activations: it publishes placement epochs (who holds what, where each
agent listens), tells agents to load, migrate and drop blocks, and asks the source agent
to run each token. A new epoch is published only after every move of the plan has been
acknowledged by its target, so no token runs on a half-moved placement.

The pieces: ``edgepart.controller.agent_link`` keeps the broker session with the controller's
callbacks (re-publish the epoch after a reconnect, wait for the agents to rejoin before
commands go out again); ``edgepart.controller.telemetry_view`` keeps what the agents report and the
resource view planned with; ``edgepart.controller.switch`` orders a switch's moves and
``edgepart.controller.deployment`` carries placements out on the agents;
``edgepart.controller.result`` is the record of the run. The world around the run (an emulator's, in
this process or behind a driver) comes in as ``WorldHooks``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

import numpy as np
from pydantic import BaseModel

from edgepart.control_plane import protocol as proto
from edgepart.controller import cost, switch
from edgepart.controller.agent_link import AgentLink
from edgepart.controller.config import ControllerConfig
from edgepart.controller.deployment import Deployment
from edgepart.controller.placement import (
    NoFeasiblePlacement,
    Placement,
    PluginError,
    make_algorithm,
)
from edgepart.controller.result import ControllerError, RunResult, TokenRecord
from edgepart.controller.switching import Switching
from edgepart.controller.telemetry_view import ConfiguredView, TelemetryView
from edgepart.controller.view import PlanningWindow, ResourceView

log = logging.getLogger("edgepart.controller")
# aiomqtt warns whenever more than a few publishes wait, which a wave of migrations does
logging.getLogger("mqtt").setLevel(logging.ERROR)

STEP_TIMEOUT_S = 120.0  # for one token, s
LINKS_MEASURED_WAIT_S = 5  # longest wait (s) for the agents' first latency probes
CONTROL_WINDOW = 8  # tokens whose control round trip the next prediction adds (median)
DEATH_CHECK_S = 0.1  # how often (s) a decode step looks whether its devices are still there


class DevicesLost(Exception):
    """A device of the placement died while a token was being decoded."""


class WorldHooks(Protocol):
    """The world around a run (an emulator's, in this process or behind a driver): what it
    does at the controller's turns, over the controller's line to the agents. Given to the
    controller once, at its construction."""

    #: run/* topics the controller follows for the world (e.g. a driver's world_ready)
    run_topics: tuple[proto.RunKind, ...]

    async def setup(self, link: AgentLink) -> None:
        """Once every agent is online, before the first plan (e.g. shape the links)."""

    async def before_token(self, link: AgentLink, token: int) -> None:
        """Before generated token ``token`` (e.g. apply the traces due then)."""

    def on_run_message(self, message: BaseModel) -> None:
        """A message on one of ``run_topics``."""


class NoWorld:
    """A run with no world around it: nothing happens between tokens."""

    run_topics: tuple[proto.RunKind, ...] = ()

    async def setup(self, link: AgentLink) -> None:
        """Nothing to set up."""

    async def before_token(self, link: AgentLink, token: int) -> None:
        """Nothing is due."""

    def on_run_message(self, message: BaseModel) -> None:
        """No run topics are followed."""


Progress = Callable[[int, RunResult], None]


class Controller:
    """Plans, migrates and decodes one generation over live agents."""

    def __init__(
        self,
        config: ControllerConfig,
        world: WorldHooks | None = None,
        configured_view: ConfiguredView | None = None,
        progress: Progress | None = None,
    ) -> None:
        """``world``: what happens around the run's tokens; ``configured_view``: the world's
        configured resources (for ``telemetry: configured``); ``progress(tokens, result)``
        after every token."""
        self.config = config
        self.clock = config.clock
        self.world: WorldHooks = world or NoWorld()
        self.progress = progress
        self.algorithm = make_algorithm(config.algorithm)
        self.telemetry = TelemetryView(config, configured_view)
        self.result = RunResult(config.algorithm, time_dilation=config.time_dilation)
        self.ids = (f"c{i}" for i in itertools.count())
        self.metrics = None
        if config.metrics_port is not None:
            from edgepart.controller.metrics import ControllerMetrics, run_label

            run = run_label(config.testbed, datetime.now(UTC))
            self.metrics = ControllerMetrics(run, config.algorithm)
        self.link = AgentLink(
            config,
            self.telemetry,
            self.result,
            lambda: self.deployment.epoch_message,
            self.world.run_topics,
            self.world.on_run_message,
            self.metrics,
        )
        self.deployment = Deployment(
            config, self.telemetry, self.link.command, self.link.publish, self.next_id
        )
        self.switching = Switching(
            config,
            self.algorithm,
            self.deployment,
            self.telemetry,
            self.result,
            self.metrics,
            connected=lambda: self.link.session.is_ready,
        )
        self.control_s: list[float] = []  # per decode step, its control round trip (s)

    # -- the run -------------------------------------------------------------------------
    async def run(self) -> RunResult:
        """Connect, wait for the agents, then generate; returns the measurements."""
        if self.metrics is not None:
            self.metrics.serve(self.config.metrics_port, self.config.metrics_host)
        start = time.monotonic()
        link = asyncio.create_task(self.link.session.run())
        generation = asyncio.create_task(self._generation(start))
        try:
            done, _ = await asyncio.wait({link, generation}, return_when=FIRST_COMPLETED)
            if generation not in done:
                link.result()  # the broker was lost for good: raises ControllerError
            return generation.result()
        finally:
            for task in (generation, link):
                task.cancel()
            await asyncio.gather(generation, link, return_exceptions=True)

    async def _generation(self, start: float) -> RunResult:
        await self.link.session.connected()
        try:
            try:
                await self._generate()
            except PluginError as exc:  # a plugin planner's fault, named: the run fails
                raise ControllerError(str(exc)) from exc
        except (ControllerError, NoFeasiblePlacement) as exc:
            self._finish(start)
            if self.config.announce:
                outcome = proto.RunOutcome(ok=False, error=str(exc), result=self.result.summary())
                await self._announce(outcome)
            if isinstance(exc, ControllerError):
                exc.partial = self.result  # the tokens generated until then are kept
            raise
        self._finish(start)
        if self.config.announce:
            await self._announce(proto.RunOutcome(ok=True, result=self.result.summary()))
        return self.result

    def _finish(self, start: float) -> None:
        r = self.result
        r.wall_s = time.monotonic() - start
        r.hop_overhead_s = self.telemetry.planned_hop_overheads()
        r.latency_s = self.telemetry.planned_latencies()
        r.control_overhead_s = float(np.median(self.control_s)) if self.control_s else 0.0
        r.install_s = self.telemetry.planned_install_s()

    async def _announce(self, outcome: proto.RunOutcome) -> None:
        topic = proto.run_topic(self.config.testbed, "result")
        await self.link.publish(topic, outcome, retain=True)

    def next_id(self) -> str:
        """A fresh command id."""
        return next(self.ids)

    def view(self, window: PlanningWindow) -> ResourceView:
        """The resources as the controller plans with them now (see TelemetryView.view)."""
        return self.telemetry.view(window)

    # -- generation --------------------------------------------------------------------
    async def _generate(self) -> None:
        """The prompt's prefill, then every token: re-planned, recovered or decoded."""
        cfg = self.config
        await self.link.until_joined()
        await self.world.setup(self.link)
        await self._links_measured()
        prompt = list(cfg.prompt_ids)
        context = len(prompt)
        view = self.view(self.switching.window(0, context))
        await self.deployment.start(await self.switching.plan(view, None))
        start = self.clock.now()
        first = await self._decode(0, prompt)
        self.result.prefill_s = self.clock.now() - start
        out = self.result.output_token_ids
        out.append(first)
        await self._token_done()
        for i in range(1, cfg.generate_tokens):
            if out[-1] == cfg.eos_token_id:
                break
            await self.world.before_token(self.link, i)
            # who is alive is only known with the broker there and the agents back on it
            await self.link.session.connected()
            token = await self._next_token(i, prompt + out, context)
            context += 1
            out.append(token)
            await self._token_done()
        await self.switching.abandon(len(out))

    async def _next_token(self, i: int, history: list[int], context: int) -> int:
        """Token ``i``: recovered when a device of the placement is gone, else switched or
        re-planned as due and decoded (recovered when a device dies meanwhile). What the
        boundary takes besides decoding is the run's stall."""
        cfg = self.config
        boundary = self.clock.now()
        view = self.view(self.switching.window(i, context))
        self._require_source(view, i)
        if not view.alive[self.deployment.placement.assignment].all():  # type: ignore[union-attr]
            return await self._recovered(view, history, context, boundary)
        await self.switching.at_boundary(i, view, context)
        # the cost model's delay of the placement, plus the control round trip measured on
        # the tokens before (never on this one)
        x = self.deployment.placement.assignment  # type: ignore[union-attr]
        model_s = float(cost.per_token_s(cfg.table, view, x, context + 1))
        predicted = self.control_overhead_s + model_s
        start = self.clock.now()
        self.result.stall_s += start - boundary
        try:
            token = await self._decode_watched(context, [history[-1]])
        except DevicesLost:  # one died during the token: run it again after recovery
            view = self.view(self.switching.window(i, context))
            self._require_source(view, i)
            return await self._recovered(view, history, context, start)
        measured = self.clock.now() - start
        record = TokenRecord(token, measured, predicted, context + 1, self.deployment.epoch)
        self.result.tokens.append(record)
        self.telemetry.control_rtt_s = self.control_overhead_s
        if self.metrics is not None:
            self.metrics.token(measured, predicted)
        return token

    def _require_source(self, view: ResourceView, i: int) -> None:
        if not view.alive[view.source]:
            raise ControllerError(f"token {i}: the source device {self.config.source} is gone")

    async def _links_measured(self) -> None:
        """Before the first plan: wait (bounded) until every device reports a measured
        latency to every other, so the plan does not start from the configured ones."""
        if self.config.telemetry != "measured" or len(self.config.devices) < 2:
            return
        deadline = time.monotonic() + LINKS_MEASURED_WAIT_S
        while time.monotonic() < deadline:
            if self.telemetry.links_measured():
                return
            await asyncio.sleep(0.1)
        log.warning(
            "planning without every link's measured latency (not all came within %ds)",
            LINKS_MEASURED_WAIT_S,
        )

    async def _token_done(self) -> None:
        """Report the newest token: to ``progress``, and on run/progress when announcing."""
        r = self.result
        if self.progress is not None:
            self.progress(len(r.output_token_ids), r)
        if not self.config.announce:
            return
        last = r.tokens[-1] if r.tokens else None
        message = proto.Progress(
            token=len(r.output_token_ids),
            token_id=r.output_token_ids[-1],
            measured_s=last.measured_s if last else 0.0,
            predicted_s=last.predicted_s if last else 0.0,
            migrations=r.migrations,
        )
        await self.link.publish(proto.run_topic(self.config.testbed, "progress"), message)

    # -- recovery ------------------------------------------------------------------------
    async def _recovered(
        self, view: ResourceView, history: list[int], context: int, since: float
    ) -> int:
        """Recover from the devices of the placement the view sees gone (counted and timed,
        a stall from ``since``, monotonic s); the next token."""
        start = self.clock.now()
        token = await self._recover(view, history, context)
        self.result.recoveries += 1
        self.result.recovery_s += self.clock.now() - start
        self.result.stall_s += self.clock.now() - since
        return token

    async def _recover(self, view: ResourceView, history: list[int], context: int) -> int:
        """Re-place after devices died, then rebuild every cache by re-running the history.

        A switch under way is dropped. The lost blocks load on their new devices (from
        disk, or from the source's when weights come from peers); surviving blocks move
        first, in both phases at once, so the devices they leave have room for the lost
        blocks; all caches are reset and the prompt plus the tokens generated so far run
        again as one prefill, which yields the next token.
        """
        cfg = self.config
        token = len(self.result.output_token_ids)
        await self.switching.abandon(token)
        placement = self.deployment.placement
        assert placement is not None
        lost = ~view.alive[placement.assignment]
        dead = sorted({cfg.devices[d] for d in placement.assignment[lost]})
        log.warning("devices lost: %s; re-placing their blocks", ", ".join(dead))
        try:
            new = await self.switching.plan(view, placement)
        except NoFeasiblePlacement as exc:
            raise ControllerError(f"the surviving devices cannot hold the model: {exc}") from None
        # every device still there (not only those this loss spared: earlier losses too)
        survivors = [n for i, n in enumerate(cfg.devices) if view.alive[i] and n not in dead]
        # the token the loss cut short still runs on the survivors (waiting for outputs that
        # never come) and a device commits only between tokens: stop it and empty the caches
        # first; the caches that move below are then empty and the lost blocks load empty
        await self.deployment.reset(survivors)
        interim = switch.survivors_first(placement.assignment, new.assignment, lost)
        if not np.array_equal(interim, placement.assignment):
            await self.switching.switch_now(Placement(interim), view, context, token)
            if not np.array_equal(self.deployment.placement.assignment, interim):  # type: ignore[union-attr]
                raise ControllerError("the survivors refused the blocks moved to recover")
        await self.deployment.name_members()
        await self.deployment.reload(lost, new)
        start = self.clock.now()
        token = await self._decode(0, history)
        self.result.reprefill_s += self.clock.now() - start
        return token

    # -- decoding ------------------------------------------------------------------------
    async def _decode_watched(self, position: int, tokens: list[int]) -> int:
        """A decode step that gives up (DevicesLost) once a device of the placement is seen
        gone: its outputs would never come, and the step waits for them."""
        step = asyncio.create_task(self._decode(position, tokens))
        try:
            while True:
                done, _ = await asyncio.wait({step}, timeout=DEATH_CHECK_S)
                if done:
                    return step.result()
                # who is alive is only known while the broker is there
                placement = self.deployment.placement
                if (
                    self.link.session.is_ready
                    and placement is not None
                    and not self.telemetry.alive()[placement.assignment].all()
                ):
                    raise DevicesLost
        finally:
            if not step.done():
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)

    async def _decode(self, position: int, tokens: list[int]) -> int:
        cmd = proto.Decode(
            id=self.next_id(),
            op="decode",
            epoch=self.deployment.epoch,
            position=position,
            tokens=tuple(tokens),
        )
        start = self.clock.now()
        timeout_s = self.clock.wall_s(STEP_TIMEOUT_S)
        reply = await self.link.command(self.config.source, cmd, timeout_s)
        if not reply.ok or reply.token_id is None:
            raise ControllerError(f"decode at position {position} failed: {reply.error}")
        if len(tokens) == 1:  # one decode step: its way over the broker and back
            program_s = self.clock.scenario_s(reply.seconds)
            self.control_s.append(max(0.0, self.clock.now() - start - program_s))
        return reply.token_id

    @property
    def control_overhead_s(self) -> float:
        """Median time (s) of the recent tokens' command and reply over the broker, beyond
        the source's own program time: every token pays it, whatever the placement."""
        recent = self.control_s[-CONTROL_WINDOW:]
        return float(np.median(recent)) if recent else 0.0
