"""The controller's side of an emulator driver that runs in another process or container.

In the docker testbed the driver (``edgepart testbed drive``) owns the world: it applies
the scenario's traces (CPU burners, memory budgets, link rates, ``docker kill``). Traces
are due before given tokens, so before such a token the controller hands the driver the
turn (``run/world``) and waits until the driver says the world is in place
(``run/world_ready``); a device the driver killed is then waited on until the
controller's own failure detection sees it gone, exactly as in the local backend.
``RemoteWorld`` is the controller's ``WorldHooks`` for it.
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

from edgepart.control_plane import protocol as proto
from edgepart.controller.agent_link import AgentLink
from edgepart.controller.result import ControllerError

#: longest wait (s) for the driver to apply a token's traces (shaping every link included)
WORLD_TURN_TIMEOUT_S = 120.0
#: how often an unanswered turn is sent again (s): a driver that subscribed after the first
#: send (it may start after the controller) gets it then; it serves a turn once and
#: answers a repeated one again
WORLD_TURN_RESEND_S = 2.0


class RemoteWorld:
    """Hands the emulator driver its turns before the tokens that have traces."""

    run_topics: tuple[proto.RunKind, ...] = ("world_ready",)

    def __init__(
        self,
        tokens: frozenset[int],
        every_token: bool = False,
        timeout_s: float = WORLD_TURN_TIMEOUT_S,
    ) -> None:
        """``tokens``: generated tokens with traces due; ``every_token``: time-based traces."""
        self.tokens = tokens
        self.every_token = every_token
        self.timeout_s = timeout_s
        self._waiting: dict[int, asyncio.Future] = {}

    async def setup(self, link: AgentLink) -> None:
        """Turn 0, once every agent is online: the driver shapes the links and applies the
        traces due at the start."""
        await self._turn(link, 0)

    async def before_token(self, link: AgentLink, token: int) -> None:
        """Let the driver apply what is due before generated token ``token``."""
        if self.every_token or token in self.tokens:
            await self._turn(link, token)

    def on_run_message(self, message: BaseModel) -> None:
        """The driver's world_ready ends the wait on its turn."""
        if isinstance(message, proto.WorldReady):
            fut = self._waiting.get(message.token)
            if fut is not None and not fut.done():
                fut.set_result(message)

    async def _turn(self, link: AgentLink, token: int) -> None:
        fut = self._waiting[token] = asyncio.get_running_loop().create_future()
        topic = proto.run_topic(link.config.testbed, "world")
        turn = proto.encode(proto.WorldTurn(token=token))
        try:
            # sent again after a broker loss, like an unanswered command: the driver serves
            # a turn once and answers a repeated one again
            with link.session.resent(f"world-turn-{token}", topic, turn):
                ready = await self._send_until_answered(link, topic, turn, fut)
        except TimeoutError:
            raise ControllerError(
                f"the emulator driver did not apply the traces of token {token} within "
                f"{self.timeout_s:.0f} s (is the testbed service running?)"
            ) from None
        finally:
            self._waiting.pop(token, None)
        if not ready.ok:
            raise ControllerError(f"the emulator driver failed at token {token}: {ready.error}")
        for device in ready.failed:
            await link.until_gone(device)
        for device in ready.joined:
            await link.until_online(device)

    async def _send_until_answered(
        self, link: AgentLink, topic: str, turn: bytes, answer: asyncio.Future
    ) -> proto.WorldReady:
        """Publish the turn every WORLD_TURN_RESEND_S until the driver answers it
        (TimeoutError after the timeout)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while True:
            await link.publish(topic, turn)
            wait_s = min(WORLD_TURN_RESEND_S, deadline - loop.time())
            try:
                return await asyncio.wait_for(asyncio.shield(answer), max(0.0, wait_s))
            except TimeoutError:
                if loop.time() >= deadline:
                    raise
