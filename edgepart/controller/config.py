"""What a live controller runs: the devices as configured, the model's block table, the job.

``ControllerConfig`` is built by a backend from its scenario (``edgepart.emulator.backends.local``)
and read by the controller (``edgepart.controller.orchestrator``) and its telemetry view
(``edgepart.controller.telemetry_view``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from edgepart.control_plane import mqtt
from edgepart.controller.clock import ScenarioClock
from edgepart.llm.blocks import BlockTable

#: plan on what the agents measure, or on the scenario's configured resources
TelemetryMode = Literal["measured", "configured"]


@dataclass(frozen=True)
class ControllerConfig:
    """What the controller runs: the devices as configured, the model's table, the job."""

    testbed: str
    broker: str  # host:port
    algorithm: str
    devices: tuple[str, ...]
    source: str
    nominal_gflops: np.ndarray  # (D,) GFLOP/s
    memory_bytes: np.ndarray  # (D,) bytes
    bandwidth_mbit: np.ndarray  # (D, D) configured links, Mbit/s
    latency_s: np.ndarray  # (D, D) s
    table: BlockTable  # block costs the planner and predictions use (calibrated)
    prompt_ids: tuple[int, ...]
    generate_tokens: int
    replan_every: int = 8
    weights_from: Literal["disk", "peer"] = "disk"
    telemetry: TelemetryMode = "measured"
    eos_token_id: int | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"  # where /metrics listens (0.0.0.0 in a container)
    #: publish each token on run/progress and the outcome on run/result (retained), for an
    #: emulator driver or anyone watching a testbed
    announce: bool = False
    broker_auth: mqtt.BrokerAuth | None = None  # None: anonymous (a broker on loopback)
    #: devices not expected at the start: they join later and are used once they are there
    late_devices: frozenset[str] = frozenset()
    #: the emulator runs the world this many times slower than the scenario says (k >= 1):
    #: measured times are divided by it, measured speeds and rates multiplied
    time_dilation: float = 1.0

    @property
    def clock(self) -> ScenarioClock:
        """Scenario time for this run (wall time / time_dilation)."""
        return ScenarioClock(self.time_dilation)

    @property
    def source_index(self) -> int:
        """The source device's index into ``devices``."""
        return self.devices.index(self.source)
