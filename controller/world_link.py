"""The controller's side of an emulator driver that runs in another process or container.

In the docker testbed the driver (``edgepart testbed drive``) owns the world: it applies
the scenario's traces (CPU burners, memory budgets, link rates, ``docker kill``). Traces
are due before given tokens, so before such a token the controller hands the driver the
turn (``run/world``) and waits until the driver says the world is in place
(``run/world_ready``); a device the driver killed is then waited on until the
controller's own failure detection sees it gone, exactly as in the local backend.
"""

from __future__ import annotations

import asyncio

from control_plane import protocol as proto
from controller.orchestrator import Controller, ControllerError

#: longest wait (s) for the driver to apply a token's traces (shaping every link included)
WORLD_TURN_TIMEOUT_S = 120.0


class RemoteWorld:
    """Hands the emulator driver its turns before the tokens that have traces."""

    def __init__(
        self,
        controller: Controller,
        tokens: frozenset[int],
        every_token: bool = False,
        timeout_s: float = WORLD_TURN_TIMEOUT_S,
    ) -> None:
        """``tokens``: generated tokens with traces due; ``every_token``: time-based traces."""
        self.controller = controller
        self.tokens = tokens
        self.every_token = every_token
        self.timeout_s = timeout_s
        self._waiting: dict[int, asyncio.Future] = {}
        controller.run_topics = (*controller.run_topics, "world_ready")
        controller.on_run_message = self._on_message
        controller.on_joined = self.setup
        controller.before_token = self.before_token

    async def setup(self) -> None:
        """Turn 0, once every agent is online: the driver shapes the links and applies the
        traces due at the start."""
        await self._turn(0)

    async def before_token(self, token: int) -> None:
        """Let the driver apply what is due before generated token ``token``."""
        if self.every_token or token in self.tokens:
            await self._turn(token)

    def _on_message(self, message: object) -> None:
        if isinstance(message, proto.WorldReady):
            fut = self._waiting.get(message.token)
            if fut is not None and not fut.done():
                fut.set_result(message)

    async def _turn(self, token: int) -> None:
        ctl = self.controller
        fut = self._waiting[token] = asyncio.get_running_loop().create_future()
        key = f"world-turn-{token}"
        try:
            topic = proto.run_topic(ctl.config.testbed, "world")
            # sent again after a broker loss, like an unanswered command: the driver serves
            # a turn once and answers a repeated one again
            ctl.unanswered[key] = (topic, proto.encode(proto.WorldTurn(token=token)))
            await ctl.publish(topic, proto.WorldTurn(token=token))
            ready = await asyncio.wait_for(fut, self.timeout_s)
        except TimeoutError:
            raise ControllerError(
                f"the emulator driver did not apply the traces of token {token} within "
                f"{self.timeout_s:.0f} s (is the testbed service running?)"
            ) from None
        finally:
            self._waiting.pop(token, None)
            ctl.unanswered.pop(key, None)
        if not ready.ok:
            raise ControllerError(f"the emulator driver failed at token {token}: {ready.error}")
        for device in ready.failed:
            await ctl.until_gone(device)
        for device in ready.joined:
            await ctl.until_online(device)
