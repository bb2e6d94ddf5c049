"""The devices as their agents report them, and the resource view the planner decides on.

``TelemetryView`` takes every agent's telemetry and status, and answers two questions:

- who is alive (``alive``, ``is_alive``): online, reported within TELEMETRY_STALE_S (of
  scenario time: an agent of a world dilated k times runs at share / k, k times slower to
  say anything) and reachable from the source over the data plane; side-effect free, so
  it may be asked as often as a decode step likes;
- what the planner sees (``view``): the measured speeds, memory budgets, link rates,
  latencies and hop overheads, each replaced only once it moved past its deadband (the
  hysteresis that keeps jittery readings from re-planning), with each device's measured
  time to build a block of each kind (a switch's prepare), the measured control round
  trip, the budgets the agents acknowledged (telemetry lags them) and, for the next
  decision only, no room on a device that refused a prepared block.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from edgepart.control_plane import protocol as proto
from edgepart.controller.config import ControllerConfig
from edgepart.controller.cost import CONTROL_RTT_PRIOR_S, commit_block_s, install_prior_s
from edgepart.controller.view import PlanningWindow, ResourceView, with_hop_overheads
from edgepart.llm.blocks import BlockKind

#: Reply.install_s's kinds, in BlockKind order
INSTALL_KINDS = {"group": BlockKind.HEADS, "proj": BlockKind.PROJ, "ffn": BlockKind.FFN}

TELEMETRY_STALE_S = 1.5  # a device silent this long is not planned on
#: a measured speed replaces the one planned with only when it differs by this much
#: (relative): measurements jitter with the host's load, and each flip would re-plan
MEASURED_DEADBAND = 0.15
#: a measured link latency or hop overhead replaces the one planned with only when it moved
#: by this much (relative) and by HOP_DEADBAND_S: each flip would shift every head-split
#: placement
HOP_DEADBAND = 0.25
HOP_DEADBAND_S = 0.0001
#: weight of the newest measurement in a device's build time per block kind
INSTALL_SMOOTHING = 0.5
#: any window will do for asking who is alive: liveness does not depend on it
_ANY_WINDOW = PlanningWindow(1, 1, 1)

ConfiguredView = Callable[[PlanningWindow], ResourceView]


@dataclass
class DeviceReport:
    """What one device's agent said last: its telemetry (and when it came), its status."""

    telemetry: proto.Telemetry | None = None
    telemetry_at: float = 0.0  # time.monotonic() at its arrival, s
    status: proto.Status | None = None

    @property
    def online(self) -> bool:
        """Whether its last status says online."""
        return self.status is not None and self.status.state == "online"


def unmeasured_priors(
    compute_gflops: np.ndarray,
    overheads_s: np.ndarray,
    nominal_gflops: np.ndarray,
    measured: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """What to plan with for devices that have run nothing yet: their speed (GFLOP/s) at the
    median efficiency (measured / nominal) of the devices that have, never above what they
    report, and, where they report no hop overhead (no activation went through them), the
    median (send, receive) overhead (s) of those that do.

    An idle device reports its nominal speed and no hop overhead, so it looks faster and
    cheaper to reach than any device that has run blocks: the planner moves heads onto it
    and learns only afterwards, from the slower tokens, what it costs.
    """
    compute = np.asarray(compute_gflops, dtype=float).copy()
    overheads = np.asarray(overheads_s, dtype=float).copy()
    nominal = np.asarray(nominal_gflops, dtype=float)
    if measured.any() and (~measured).any():
        with np.errstate(divide="ignore", invalid="ignore"):
            efficiency = np.median(compute[measured] / nominal[measured])
        if np.isfinite(efficiency):
            compute[~measured] *= min(1.0, float(efficiency))
    seen = (overheads > 0).any(axis=1)
    if seen.any():
        overheads[~seen] = np.median(overheads[seen], axis=0)
    return compute, overheads


class TelemetryView:
    """The devices' reports and the resources planned with (see the module)."""

    def __init__(self, config: ControllerConfig, configured: ConfiguredView | None = None):
        """``configured``: the world's configured resources, for ``telemetry: configured``."""
        if config.telemetry == "configured" and configured is None:
            raise ValueError("configured telemetry needs the world's view (configured_view)")
        self.config = config
        self.configured = configured
        #: a device silent this long (wall s) is not planned on
        self.stale_s = config.clock.wall_s(TELEMETRY_STALE_S)
        self.devices = {name: DeviceReport() for name in config.devices}
        self.index = {name: i for i, name in enumerate(config.devices)}
        self.measured_gflops: dict[str, float] = {}  # device -> speed planned with, GFLOP/s
        #: devices that have measured their speed on blocks they ran (the others report
        #: their nominal speed, which no device reaches: see ``unmeasured_priors``)
        self.ever_measured: set[str] = set()
        #: measured latencies and hop overheads as planned with (s), by (device, peer) or
        #: (device, "send" | "receive")
        self.held_s: dict[tuple[str, str], float] = {}
        #: (D, kinds) time (s) to build one block of each kind at the device's nominal
        #: speed: the prior, then what its loads and prepares measured
        self.install_nominal_s = install_prior_s(config.table, config.nominal_gflops)
        self.control_rtt_s = CONTROL_RTT_PRIOR_S  # one command and its reply (s), measured
        self.acked_budget: dict[str, float] = {}  # device -> budget acknowledged, bytes
        #: devices that refused a prepared block: no room there for the next decision
        self.refused: set[str] = set()

    # -- reports -------------------------------------------------------------------------
    def take(self, device: str, message: proto.Telemetry | proto.Status) -> None:
        """Record a device's telemetry (with its arrival time) or status."""
        report = self.devices[device]
        if isinstance(message, proto.Telemetry):
            report.telemetry, report.telemetry_at = message, time.monotonic()
        else:
            report.status = message

    def all_joined(self) -> bool:
        """Whether every device expected at the start is online and has reported."""
        return all(
            d.online and d.telemetry is not None
            for n, d in self.devices.items()
            if n not in self.config.late_devices
        )

    def missing(self) -> list[str]:
        """The devices that have not reported yet."""
        return [n for n, d in self.devices.items() if d.telemetry is None]

    def links_measured(self) -> bool:
        """Whether every device expected at the start reports a measured latency to every
        other such device."""
        names = set(self.config.devices) - self.config.late_devices
        return all(
            d.telemetry is not None and set(d.telemetry.peer_latency_s) >= names - {n}
            for n, d in self.devices.items()
            if n in names
        )

    def endpoints(self) -> dict[str, str]:
        """Where each online device's data plane listens: the members of a new epoch."""
        return {
            n: d.status.listen
            for n, d in self.devices.items()
            if d.online and d.status is not None and d.status.listen is not None
        }

    def reporting_lately(self) -> set[str]:
        """The devices that reported within TELEMETRY_STALE_S (scenario time)."""
        now = time.monotonic()
        return {
            name
            for name, d in self.devices.items()
            if d.telemetry is not None and now - d.telemetry_at <= self.stale_s
        }

    def silence_counts_from_now(self, but: set[str]) -> None:
        """After a broker loss none could report: their silence counts from now, except for
        the devices ``but`` (they stay as silent as they are)."""
        now = time.monotonic()
        for name, report in self.devices.items():
            if name not in but:
                report.telemetry_at = max(report.telemetry_at, now)

    def reported_memory_bytes(self) -> np.ndarray:
        """Per device, the memory its agent reports in use (bytes; 0 before any report)."""
        return np.array(
            [
                0.0 if d.telemetry is None else float(d.telemetry.memory_used_bytes)
                for d in self.devices.values()
            ]
        )

    # -- who is alive (no side effect) ---------------------------------------------------
    def alive(self) -> np.ndarray:
        """Per device, whether it is online, reported within TELEMETRY_STALE_S (scenario time)
        and the source reaches it over the data plane (a cut link counts as the device's
        loss); with configured telemetry also whether the world has it running."""
        now = time.monotonic()
        source = self.devices[self.config.source].telemetry
        cut_off = set(source.unreachable_peers) if source is not None else set()
        alive = np.array(
            [
                d.telemetry is not None
                and d.online
                and now - d.telemetry_at <= self.stale_s
                and name not in cut_off
                for name, d in self.devices.items()
            ]
        )
        if self.config.telemetry == "configured":
            assert self.configured is not None
            alive &= self.configured(_ANY_WINDOW).alive
        return alive

    def is_alive(self, device: str) -> bool:
        """Whether one device counts as alive now (see ``alive``)."""
        return bool(self.alive()[self.index[device]])

    # -- what the planner sees (updates the hysteresis) ----------------------------------
    def view(self, window: PlanningWindow) -> ResourceView:
        """The resources as the controller knows them now, with the measured build time of
        each block kind at each device's current speed and the measured control round trip."""
        view = self._resources(window)
        memory = view.memory_bytes
        if self.refused:
            reported = self.reported_memory_bytes()
            full = np.array([n in self.refused for n in self.config.devices])
            memory = np.where(full, np.minimum(memory, reported), memory)
        return replace(
            view,
            memory_bytes=memory,
            install_s=self.install_s(view.compute_gflops),
            move_s_per_block=commit_block_s(view.compute_gflops),
            control_rtt_s=self.control_rtt_s,
        )

    def install_s(self, available_gflops: np.ndarray) -> np.ndarray:
        """(D, kinds) time (s) to build one block of each kind: slower as a device's available
        speed is below nominal."""
        nominal = self.config.nominal_gflops.astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            slowdown = np.where(available_gflops > 0, nominal / available_gflops, np.inf)
        return self.install_nominal_s * slowdown[:, None]

    def _resources(self, window: PlanningWindow) -> ResourceView:
        alive = self.alive()
        if self.config.telemetry == "configured":
            # configured resources, but a device that died is dead (e.g. killed by hand)
            assert self.configured is not None
            view = self.configured(window)
            return replace(
                view,
                alive=alive,
                compute_gflops=np.where(alive, view.compute_gflops, 0.0),
                memory_bytes=np.where(alive, view.memory_bytes, 0.0),
            )
        cfg = self.config
        compute = cfg.nominal_gflops.astype(float).copy()
        memory = cfg.memory_bytes.astype(float).copy()
        bandwidth = cfg.bandwidth_mbit.astype(float).copy()
        overheads = np.zeros((len(cfg.devices), 2))  # (send, receive) software time per hop, s
        latency = cfg.latency_s.astype(float).copy()
        for i, name in enumerate(cfg.devices):
            t = self.devices[name].telemetry
            if not alive[i] or t is None:
                continue
            # the agents measure in wall time: k times slower than the scenario's world
            k = cfg.time_dilation
            if t.compute_measured:
                self.ever_measured.add(name)
            if t.available_gflops > 0:
                compute[i] = self._measured_gflops(name, t.available_gflops * k)
            memory[i] = self._budget(name, t.memory_budget_bytes)
            overheads[i] = (
                self._held((name, "send"), t.send_overhead_s / k),
                self._held((name, "receive"), t.receive_overhead_s / k),
            )
            for peer, seconds in t.peer_latency_s.items():
                if peer in self.index and peer != name:
                    latency[i, self.index[peer]] = self._held((name, peer), seconds / k)
            for peer, rate in t.peer_throughput_mbit.items():
                if peer in self.index and rate > 0:
                    bandwidth[i, self.index[peer]] = rate * k
        measured = np.array([n in self.ever_measured for n in cfg.devices]) & alive
        compute, overheads = unmeasured_priors(compute, overheads, cfg.nominal_gflops, measured)
        return ResourceView(
            devices=cfg.devices,
            compute_gflops=np.where(alive, compute, 0.0),
            memory_bytes=np.where(alive, memory, 0.0),
            bandwidth_mbit=bandwidth,
            latency_s=with_hop_overheads(latency, overheads[:, 0], overheads[:, 1]),
            source=self.index[cfg.source],
            window=window,
            weights_from=cfg.weights_from,
            alive=alive,
        )

    def _measured_gflops(self, device: str, reported: float) -> float:
        """A measured speed (GFLOP/s) as planned with: replaced only once it moved enough."""
        seen = self.measured_gflops.get(device)
        if seen is None or abs(reported / seen - 1.0) >= MEASURED_DEADBAND:
            self.measured_gflops[device] = seen = reported
        return seen

    def _budget(self, device: str, reported: float) -> float:
        """A device's budget (bytes): the one it acknowledged until its telemetry says so too."""
        acked = self.acked_budget.get(device)
        if acked is None:
            return reported
        if reported == acked:
            del self.acked_budget[device]
        return acked

    def _held(self, key: tuple[str, str], seconds: float) -> float:
        """A measured time (s) as planned with: replaced only once it moved enough."""
        seen = self.held_s.get(key)
        if seen is None or abs(seconds - seen) >= max(HOP_DEADBAND * seen, HOP_DEADBAND_S):
            self.held_s[key] = seen = seconds
        return seen

    # -- what switches measured ------------------------------------------------------------
    def installed(self, device: str, install_s: dict[str, float], available_gflops: float) -> None:
        """A load's or prepare's measured build time per block of each kind (wall s) on a
        device that reported ``available_gflops`` (wall) then: kept as the scenario time at
        its nominal speed."""
        k = self.config.time_dilation
        install_s = {kind: seconds / k for kind, seconds in install_s.items()}
        available_gflops *= k
        i = self.index[device]
        nominal = float(self.config.nominal_gflops[i])
        at_nominal = available_gflops / nominal if nominal > 0 and available_gflops > 0 else 1.0
        for kind, seconds in install_s.items():
            column = INSTALL_KINDS[kind]
            old = self.install_nominal_s[i, column]
            new = seconds * min(at_nominal, 1.0)
            self.install_nominal_s[i, column] = new if not np.isfinite(old) else (
                (1 - INSTALL_SMOOTHING) * old + INSTALL_SMOOTHING * new
            )  # fmt: skip

    def budget_acked(self, device: str, budget_bytes: float) -> None:
        """An agent acknowledged a new budget (bytes): planned with at once."""
        self.acked_budget[device] = float(budget_bytes)

    # -- what the run planned with last (its result) ---------------------------------------
    def planned_hop_overheads(self) -> dict[str, tuple[float, float]]:
        """Per device, the (send, receive) software time per hop planned with last (s)."""
        return {
            d: (self.held_s.get((d, "send"), 0.0), self.held_s.get((d, "receive"), 0.0))
            for d in self.config.devices
        }

    def planned_latencies(self) -> dict[str, float]:
        """Per link "a->b", the measured one-way latency planned with last (s)."""
        return {f"{a}->{b}": s for (a, b), s in self.held_s.items() if b in self.index}

    def planned_install_s(self) -> dict[str, dict[str, float]]:
        """Per device, the time to build one block of each kind at its nominal speed (s)."""
        return {
            d: {kind: float(self.install_nominal_s[i, k]) for kind, k in INSTALL_KINDS.items()}
            for i, d in enumerate(self.config.devices)
        }
