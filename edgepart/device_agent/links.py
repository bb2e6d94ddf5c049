"""This device's links shaped on the controller's command (``proto.Shape``), per peer.

Software mode: the data plane paces each peer's bytes and adds the latency
(``edgepart.device_agent.shaping``). tc mode (the Docker testbed): the kernel paces the bytes with
an htb class per peer address on this device's interface (``edgepart.device_agent.tc``); the data
plane adds only the latency and holds the frames of a cut link. Shape commands may precede the
first placement (which carries the peers' endpoints): a peer's rate is kept and put into the
kernel once an epoch names its host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import Counter
from collections.abc import Callable

from edgepart.control_plane import protocol as proto
from edgepart.device_agent.dataplane import DataPlane
from edgepart.device_agent.tc import TcShaper, TcUnavailable, interface_for

log = logging.getLogger("edgepart.agent")


class LinkShaping:
    """Applies shape commands to the data plane, and in tc mode to the kernel."""

    def __init__(
        self,
        name: str,
        plane: DataPlane,
        endpoint_of: Callable[[str], str | None],
        errors: Counter[str],
    ) -> None:
        self.name = name  # the device's, for the log
        self.plane = plane
        self.endpoint_of = endpoint_of  # peer -> its data endpoint now (host:port), if known
        self.errors = errors  # the agent's failure counts by kind
        self.tc: TcShaper | None = None  # kernel shaping of this device's interface (tc mode)
        self.rates: dict[str, float] = {}  # peer -> Mbit/s the last shape command set
        self.applied: dict[str, tuple[str, float]] = {}  # peer -> (endpoint, Mbit/s) set
        self._lock = asyncio.Lock()  # one kernel update at a time, the latest rate last

    @property
    def in_kernel(self) -> bool:
        """Whether the kernel paces the bytes (tc mode)."""
        return self.tc is not None

    async def start_kernel(self, host: str) -> None:
        """Shape in the kernel from now on: htb on the interface of this host's address
        (raises TcUnavailable without the capability)."""
        self.tc = await asyncio.to_thread(self._setup, host)

    def _setup(self, host: str) -> TcShaper:
        shaper = TcShaper(interface_for(host))
        shaper.setup()
        log.info("%s: kernel link shaping on %s", self.name, shaper.ifname)
        return shaper

    async def shape(self, cmd: proto.Shape) -> None:
        """Give the link to cmd.peer its bandwidth (Mbit/s, 0 = cut) and latency."""
        if self.tc is None:
            self.plane.shape(cmd.peer, cmd.bandwidth_mbit, cmd.latency_ms / 1000.0)
            return
        # tc mode: the kernel paces the bytes, the data plane adds only the latency (and
        # holds the frames of a cut link)
        self.plane.shape(cmd.peer, 0.0 if cmd.bandwidth_mbit == 0 else None, cmd.latency_ms / 1e3)
        if cmd.bandwidth_mbit == 0:
            return
        self.rates[cmd.peer] = cmd.bandwidth_mbit
        await self._apply(cmd.peer)

    async def _apply(self, peer: str) -> None:
        """Put a peer's last commanded rate (Mbit/s) into the kernel, once its endpoint is known."""
        assert self.tc is not None
        async with self._lock:
            endpoint = self.endpoint_of(peer)
            rate = self.rates[peer]
            if endpoint is None or self.applied.get(peer) == (endpoint, rate):
                return
            host = endpoint.rpartition(":")[0]
            try:
                ip = await asyncio.to_thread(socket.gethostbyname, host)
            except OSError as exc:
                raise TcUnavailable(f"cannot resolve {peer}'s host {host!r}: {exc}") from exc
            await asyncio.to_thread(self.tc.shape, ip, rate)
            self.applied[peer] = (endpoint, rate)

    async def retune(self) -> None:
        """Apply the kernel rates of peers whose endpoints a new placement may have named."""
        for peer in list(self.rates):
            try:
                await self._apply(peer)
            except TcUnavailable as exc:
                self.errors["tc"] += 1
                log.warning("%s: kernel shaping towards %s failed: %s", self.name, peer, exc)

    async def clear(self) -> None:
        """Remove the kernel shaping (the agent stops); nothing to do in software mode."""
        if self.tc is not None:
            with contextlib.suppress(TcUnavailable):
                await asyncio.to_thread(self.tc.clear)
