"""The resource view a planner decides on: devices, links and the planning window.

Built from telemetry by the controller (or from a scenario's state by the simulator);
planners read it and never touch the world themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from edgepart.llm.blocks import BlockKind

WeightsFrom = Literal["disk", "peer"]


@dataclass(frozen=True)
class PlanningWindow:
    """Where generation stands when a decision is taken.

    ``context_tokens`` positions are cached now; the placement serves the next
    ``interval_tokens`` tokens (until the next re-plan); generation ends at
    ``final_context`` cached positions. A switch must pay for its migrations within
    ``horizon_tokens``: the interval (the paper's myopic rule), or more tokens when
    ``payback_tokens`` says so (how long the change is expected to last, since a
    placement is kept until something changes). Decode delay is weighed and memory
    checked until the generation's end (``memory_tokens`` shortens that where nothing
    fits so long): a placement that fits only until the next re-plan would have to move
    again, at a cost the decision did not see.
    """

    context_tokens: int
    interval_tokens: int
    final_context: int
    payback_tokens: int = 0
    #: tokens over which memory must hold; None: to the generation's end (caches only
    #: grow, so a placement that fits then never has to move for memory)
    memory_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.interval_tokens < 1:
            raise ValueError("interval_tokens must be at least 1")
        if self.final_context < self.context_tokens:
            raise ValueError("final_context must not be below context_tokens")

    @property
    def mean_context(self) -> float:
        """Mean context length of the tokens in the horizon (positions)."""
        return self.context_tokens + (self.horizon_tokens + 1) / 2

    @property
    def horizon_tokens(self) -> int:
        """Tokens whose decode delay a decision weighs against its migrations: at least the
        interval (a placement is kept that long), never beyond the generation's end."""
        left = max(1, self.final_context - self.context_tokens)
        return min(left, max(self.interval_tokens, self.payback_tokens))

    @property
    def interval_end_context(self) -> int:
        """Context length (positions) until which memory must hold: the generation's end,
        or ``memory_tokens`` on where nothing fits that long."""
        if self.memory_tokens is None:
            return self.final_context
        return min(self.context_tokens + self.memory_tokens, self.final_context)

    def memory_to_horizon(self) -> PlanningWindow:
        """The same window with memory checked only over the horizon (a fallback where
        no placement holds the caches until the generation's end)."""
        return replace(self, memory_tokens=self.horizon_tokens)


@dataclass(frozen=True)
class ResourceView:
    """Available resources per device and per link, as the planner sees them.

    compute_gflops: available GFLOP/s per device (after background load);
    memory_bytes: memory available to edgepart per device (bytes);
    bandwidth_mbit, latency_s: per ordered device pair (Mbit/s, s), diagonal unused;
    move_s_per_block: install time of a migrated block on each device (s);
    install_s: (D, kinds) time (s) each device takes to build one block of each
    ``edgepart.llm.blocks.BlockKind`` from its weights, at its current load (a switch's prepare);
    control_rtt_s: one command and its reply over the broker (s), paid once per commit.
    """

    devices: tuple[str, ...]
    compute_gflops: np.ndarray
    memory_bytes: np.ndarray
    bandwidth_mbit: np.ndarray
    latency_s: np.ndarray
    source: int
    window: PlanningWindow
    weights_from: WeightsFrom = "disk"
    alive: np.ndarray = field(default=None)  # type: ignore[assignment]
    #: time (s) one migrated block costs beyond its bytes at each target device (it loads
    #: the block and acknowledges), in sequence with the other blocks on its link; a float
    #: means the same on every device; 0: bytes only
    move_s_per_block: np.ndarray | float = 0.0
    install_s: np.ndarray | float = 0.0
    control_rtt_s: float = 0.0

    def __post_init__(self) -> None:
        d = len(self.devices)
        if self.alive is None:
            object.__setattr__(self, "alive", np.ones(d, dtype=bool))
        move = np.broadcast_to(np.asarray(self.move_s_per_block, dtype=np.float64), (d,))
        object.__setattr__(self, "move_s_per_block", move)
        kinds = len(BlockKind)
        install = np.asarray(self.install_s, dtype=np.float64)
        install = np.broadcast_to(install[:, None] if install.ndim == 1 else install, (d, kinds))
        object.__setattr__(self, "install_s", install)
        for name, shape in (
            ("compute_gflops", (d,)),
            ("memory_bytes", (d,)),
            ("bandwidth_mbit", (d, d)),
            ("latency_s", (d, d)),
            ("alive", (d,)),
        ):
            if np.shape(getattr(self, name)) != shape:
                raise ValueError(f"{name} has shape {np.shape(getattr(self, name))}, want {shape}")
        if not 0 <= self.source < d:
            raise ValueError(f"source index {self.source} out of range for {d} devices")

    @property
    def size(self) -> int:
        """Number of devices."""
        return len(self.devices)

    @property
    def link_move_s(self) -> np.ndarray:
        """Install time (s) per block moved over each link (D, D): its target's."""
        return np.broadcast_to(self.move_s_per_block[None, :], (self.size, self.size))

    @property
    def usable(self) -> np.ndarray:
        """Devices a block may be placed on: alive, with compute and memory left."""
        return self.alive & (self.compute_gflops > 0) & (self.memory_bytes > 0)

    def at(self, window: PlanningWindow) -> ResourceView:
        """The same resources seen at another planning window."""
        return replace(self, window=window)


def with_hop_overheads(
    latency_s: np.ndarray, send_s: np.ndarray, receive_s: np.ndarray
) -> np.ndarray:
    """Link latencies (s) plus each sender's and receiver's software time per hop (s)."""
    total = np.asarray(latency_s, dtype=float) + np.add.outer(send_s, receive_s)
    np.fill_diagonal(total, np.diagonal(latency_s))
    return total
