"""The controller's re-plans and switches, token boundary by token boundary.

``Switching`` follows ``edgepart.controller.replan.ReplanPolicy`` (the simulator's policy too): when
a re-plan is due it plans in the background, on a thread, while the next token runs; at
the following boundary it weighs the plan against staying (``ReplanPolicy.accept``) and,
if it pays, starts the switch's first wave: the targets prepare in the background while
tokens go on, and the wave commits at the first boundary after every target answered,
then the next wave prepares. A switch forced by memory (the placement no longer fits)
is planned and carried out at once, both phases inside the boundary. A refused block
makes its target look full to the next decision; a wave whose targets died or whose
placement stopped fitting is abandoned and its prepared copies discarded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from edgepart.controller import cost
from edgepart.controller.config import ControllerConfig
from edgepart.controller.deployment import Deployment, PreparedWave, WaveDone
from edgepart.controller.placement import NoFeasiblePlacement, Placement, PlacementAlgorithm
from edgepart.controller.replan import ReplanPolicy, place
from edgepart.controller.result import RunResult, SwitchRecord
from edgepart.controller.switch import SwitchPlan, plan_switch
from edgepart.controller.telemetry_view import TelemetryView
from edgepart.controller.view import PlanningWindow, ResourceView

log = logging.getLogger("edgepart.controller")

#: how often (s) a switch carried out at once looks whether its targets are still there
ANSWER_CHECK_S = 0.1


@dataclass
class ActiveSwitch:
    """A switch under way: its plan, the wave being prepared, and what it did so far."""

    plan: SwitchPlan
    forced: bool
    wave: int = 0  # index of the wave in ``prepared``
    prepared: PreparedWave | None = None
    moved: int = 0
    moved_bytes: float = 0.0
    prepare_s: float = 0.0  # measured, over the waves done
    commit_s: float = 0.0
    refusals: list[str] = field(default_factory=list)


class Switching:
    """Re-plans in the background and switches in two phases (see the module)."""

    def __init__(
        self,
        config: ControllerConfig,
        algorithm: PlacementAlgorithm,
        deployment: Deployment,
        telemetry: TelemetryView,
        result: RunResult,
        metrics=None,
        connected: Callable[[], bool] = lambda: True,
    ) -> None:
        """``connected()``: whether the controller's broker session is up (the agents'
        liveness is known only then)."""
        self.config = config
        self.clock = config.clock
        self.algorithm = algorithm
        self.deployment = deployment
        self.telemetry = telemetry
        self.result = result
        self.metrics = metrics
        self.connected = connected
        # positions cached when the last token decodes: the prefill's token is the first and
        # the last token is never fed back, so the final context - context before generated
        # token i is the tokens still to decode (generate - i)
        final = len(config.prompt_ids) + config.generate_tokens - 1
        self.policy = ReplanPolicy(config.replan_every, final, replans=algorithm.replans)
        self.planning: asyncio.Task | None = None  # a background plan: Placement | None
        self.active: ActiveSwitch | None = None

    def window(self, token: int, context: int) -> PlanningWindow:
        """The window of a decision before ``token`` (the policy's horizon)."""
        return self.policy.window(token, context)

    @property
    def placement(self) -> Placement:
        """The placement the agents run now."""
        assert self.deployment.placement is not None
        return self.deployment.placement

    # -- at every token boundary ---------------------------------------------------------
    async def at_boundary(self, token: int, view: ResourceView, context: int) -> None:
        """Before generated ``token``, on ``view`` (every device of the placement alive):
        commit a prepared wave, take a finished plan, start a due one; at once when the
        placement no longer fits."""
        self.policy.observe(token, view)
        table = self.config.table
        fits_now = bool(cost.fits(table, view, self.placement.assignment, context + 1))
        if self.active is not None and self.active.prepared is not None:
            if not fits_now or not view.alive[self.active.plan.target].all():
                await self._abandon(token)
            elif self.active.prepared.ready:
                await self._commit(token, view, context)
        if not fits_now:
            await self.cancel_planning()
            await self.forced(token, view, context)
            return
        if self.planning is not None and self.planning.done():
            new, self.planning = self.planning.result(), None
            if new is not None and self.active is None:
                self._begin(token, view, context, new)
        if self.planning is None and self.active is None and self.policy.due(token, view):
            self.policy.decided(view)
            self.planning = asyncio.create_task(self._plan_or_none(view, self.placement))

    async def forced(self, token: int, view: ResourceView, context: int) -> None:
        """Plan now and switch at once: the placement no longer fits (a static algorithm
        plans afresh, as at the start)."""
        self.policy.decided(view)
        new = await self._plan_or_none(view, self.placement if self.algorithm.replans else None)
        if new is None or new == self.placement:
            return
        await self.switch_now(new, view, context, token)

    async def switch_now(
        self, new: Placement, view: ResourceView, context: int, token: int
    ) -> None:
        """Carry a switch out inside this boundary, every wave prepared and committed;
        abandoned once a target still preparing is seen gone."""
        plan = self._plan_switch(new, view, context)
        if not plan.waves:
            return
        self.active = ActiveSwitch(plan, forced=True)
        self.active.prepared = self.deployment.prepare(plan, plan.waves[0], context)
        while self.active is not None and self.active.prepared is not None:
            if not await self._answered(self.active.prepared):
                await self._abandon(token)  # the device's loss is for recovery to handle
                return
            await self._commit(token, view, context)

    async def _answered(self, prepared: PreparedWave) -> bool:
        """Wait until every target of a wave answered its prepare; False as soon as one
        still building is seen gone (its answer would never come: the command would wait
        for its whole timeout). Who is gone is only known while the broker is there."""
        pending = set(prepared.replies.values())
        while pending:
            _, pending = await asyncio.wait(pending, timeout=ANSWER_CHECK_S)
            if pending and self.connected():
                waiting = [d for d, task in prepared.replies.items() if not task.done()]
                if not all(self.telemetry.is_alive(d) for d in waiting):
                    return False
        return True

    async def cancel_planning(self) -> None:
        """Drop a background plan (a failure or a forced switch decides instead)."""
        if self.planning is not None:
            self.planning.cancel()
            await asyncio.gather(self.planning, return_exceptions=True)
            self.planning = None

    async def abandon(self, token: int) -> None:
        """Drop the switch under way (devices died: recovery decides anew)."""
        await self.cancel_planning()
        if self.active is not None:
            await self._abandon(token)

    # -- planning ------------------------------------------------------------------------
    async def plan(self, view: ResourceView, current: Placement | None) -> Placement:
        """The algorithm's placement on ``view`` (on a thread; timed as a re-plan)."""
        self.telemetry.refused.clear()  # the refusals were for this decision
        start = self.clock.now()
        table = self.config.table
        placement = await asyncio.to_thread(place, self.algorithm, view, table, current)
        took = self.clock.now() - start
        self.result.replans += 1
        self.result.replan_s.append(took)
        if self.metrics is not None:
            self.metrics.replan(took)
        return placement

    async def _plan_or_none(self, view: ResourceView, current: Placement | None):
        try:
            return await self.plan(view, current)
        except NoFeasiblePlacement as exc:
            self.result.failed_replans += 1
            log.warning("no feasible placement (%s); keeping the current", exc)
            return None

    def _plan_switch(self, new: Placement, view: ResourceView, context: int) -> SwitchPlan:
        reported = self.telemetry.reported_memory_bytes()
        return plan_switch(
            self.placement.assignment, new.assignment, view, self.config.table, context, reported
        )

    def _begin(self, token: int, view: ResourceView, context: int, new: Placement) -> None:
        """Weigh a finished plan against staying; if it pays, start its first wave."""
        reported = self.telemetry.reported_memory_bytes()
        x = self.placement.assignment
        plan = self.policy.weigh(self.config.table, view, x, new.assignment, context, reported)
        if plan is None:
            return
        self.active = ActiveSwitch(plan, forced=False)
        self.active.prepared = self.deployment.prepare(plan, plan.waves[0], context)

    # -- carrying a switch out -----------------------------------------------------------
    async def _commit(self, token: int, view: ResourceView, context: int) -> None:
        """Commit the prepared wave; prepare the next, or close the switch."""
        active = self.active
        assert active is not None and active.prepared is not None
        done: WaveDone = await self.deployment.commit(active.prepared)
        active.moved += len(done.moved)
        active.moved_bytes += done.moved_bytes
        active.prepare_s += done.prepare_s
        active.commit_s += done.commit_s
        active.refusals.extend(done.refusals)
        self.telemetry.refused.update(done.refused_devices)
        active.wave += 1
        if done.refusals or active.wave >= len(active.plan.waves):
            self._close(token)
            return
        wave = active.plan.waves[active.wave]
        active.prepared = self.deployment.prepare(active.plan, wave, context)

    async def _abandon(self, token: int) -> None:
        active = self.active
        assert active is not None
        if active.prepared is not None:
            await self.deployment.abandon(active.prepared)
        active.refusals.append("abandoned: a target is gone or the placement stopped fitting")
        self._close(token)

    def _close(self, token: int) -> None:
        """Account for the switch under way and end it."""
        active = self.active
        assert active is not None
        self.active = None
        r = self.result
        unmoved = int((self.placement.assignment != active.plan.target).sum())
        if unmoved:
            r.failed_replans += 1
            reason = active.refusals[0] if active.refusals else "no move fits"
            log.warning("switch stopped with %d blocks unmoved: %s", unmoved, reason)
        if not active.moved:
            return
        done = active.plan.waves[: active.wave]
        predicted_commit = sum(w.commit_s for w in done)
        r.switches.append(
            SwitchRecord(
                token=token,
                blocks=active.moved,
                forced=active.forced,
                predicted_prepare_s=sum(w.prepare_s for w in done),
                prepare_s=active.prepare_s,
                predicted_commit_s=predicted_commit,
                commit_s=active.commit_s,
            )
        )
        self.policy.switched(token, active.forced)
        self.policy.measured(predicted_commit, active.commit_s)
        r.migrations += active.moved
        r.migration_s += active.commit_s
        r.migration_bytes += active.moved_bytes
        if self.metrics is not None:
            self.metrics.migration(
                active.moved, active.moved_bytes, active.prepare_s, active.commit_s
            )

