"""The placement epochs an agent knows: who holds which block, the routes, the endpoints.

The controller publishes every placement as a numbered epoch (``proto.PlacementEpoch``).
Frames and commands name the epoch they belong to and may arrive before it does: they
wait for it here, bounded by EPOCH_WAIT_S. Only the last few epochs are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from edgepart.device_agent.program import Routes

EPOCH_WAIT_S = 10.0  # how long (s) a frame or command may wait for its placement to arrive
#: epochs this many older than the newest one arrived are forgotten
EPOCHS_KEPT_BEHIND = 2


@dataclass
class Epoch:
    """One placement: block -> device, the token routes it makes, device -> data endpoint."""

    number: int
    placement: dict[str, str]
    routes: Routes
    endpoints: dict[str, str]


class Epochs:
    """The epochs known here by number, the current (newest) one, and waits for others."""

    def __init__(self) -> None:
        self._known: dict[int, Epoch] = {}
        self._changed = asyncio.Event()  # set (and replaced) whenever an epoch arrives
        self.current = -1  # the newest epoch's number (-1 before the first)

    def __contains__(self, number: int) -> bool:
        return number in self._known

    def get(self, number: int) -> Epoch | None:
        """The epoch of that number, if known."""
        return self._known.get(number)

    def add(self, epoch: Epoch) -> bool:
        """Know a new epoch (forgetting those well before it); True if it is the current one
        now. Wakes everything waiting for an epoch."""
        self._known[epoch.number] = epoch
        for old in [e for e in self._known if e < epoch.number - EPOCHS_KEPT_BEHIND]:
            del self._known[old]
        newest = epoch.number >= self.current
        if newest:
            self.current = epoch.number
        self._changed.set()
        self._changed = asyncio.Event()
        return newest

    def endpoint(self, peer: str) -> str | None:
        """The peer's data-plane endpoint (host:port) in the current epoch, if it names it."""
        epoch = self._known.get(self.current)
        return epoch.endpoints.get(peer) if epoch is not None else None

    async def wait_for(self, number: int) -> Epoch:
        """The epoch of that number, once it arrives (TimeoutError after EPOCH_WAIT_S)."""
        await self._until(lambda: number in self._known, f"placement epoch {number} never arrived")
        return self._known[number]

    async def endpoint_known(self, peer: str) -> None:
        """Wait (bounded) for a placement that names the peer's data-plane endpoint."""
        await self._until(
            lambda: any(peer in e.endpoints for e in self._known.values()),
            f"no placement epoch names the endpoint of {peer}",
        )

    async def _until(self, ready: Callable[[], bool], timeout_message: str) -> None:
        """Wait until ready() holds, re-checked as epochs arrive (TimeoutError after
        EPOCH_WAIT_S)."""
        deadline = time.monotonic() + EPOCH_WAIT_S
        while not ready():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(timeout_message)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
