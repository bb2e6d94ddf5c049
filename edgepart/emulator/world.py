"""The emulated world's resource state: devices, links, and the traces that change them."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from edgepart.controller.cost import CONTROL_RTT_PRIOR_S, commit_block_s, install_prior_s
from edgepart.controller.view import PlanningWindow, ResourceView
from edgepart.emulator.scenario import (
    MIB,
    FailTrace,
    JoinTrace,
    LinkTrace,
    LoadTrace,
    MemoryTrace,
    Scenario,
    Trace,
)
from edgepart.llm.blocks import block_table

_table = functools.cache(block_table)  # a scenario's table, built once per model


@dataclass
class WorldState:
    """Mutable resource state of a scenario's devices and links at one instant."""

    names: tuple[str, ...]
    nominal_gflops: np.ndarray  # GFLOP/s without background load
    background_load: np.ndarray  # fraction of compute taken by others
    memory_bytes: np.ndarray  # memory available to edgepart
    bandwidth_mbit: np.ndarray  # (D, D) Mbit/s
    latency_s: np.ndarray  # (D, D) s
    alive: np.ndarray  # the device runs (not failed, or joined)
    cut: np.ndarray  # (D, D) the link is cut: nothing gets through (bandwidth keeps its rate)
    source: int  # index of the source device

    @classmethod
    def from_scenario(cls, scenario: Scenario) -> WorldState:
        """The state a scenario starts in."""
        names = scenario.device_names
        count = len(names)
        bandwidth = np.zeros((count, count))
        latency = np.zeros((count, count))
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                if i != j:
                    bw, lat_ms = scenario.link(a, b)
                    bandwidth[i, j] = bw
                    latency[i, j] = lat_ms / 1000.0
        return cls(
            names=names,
            nominal_gflops=np.array([d.compute_gflops for d in scenario.devices], dtype=float),
            background_load=np.zeros(count),
            memory_bytes=np.array([d.memory_mib * MIB for d in scenario.devices], dtype=float),
            bandwidth_mbit=bandwidth,
            latency_s=latency,
            alive=np.array([n not in scenario.offline_at_start for n in names], dtype=bool),
            cut=np.zeros((count, count), dtype=bool),
            source=scenario.source_index,
        )

    def index(self, name: str) -> int:
        """Index of a device name."""
        return self.names.index(name)

    def apply(self, trace: Trace) -> None:
        """Change the state as a trace says."""
        if isinstance(trace, LoadTrace):
            self.background_load[self.index(trace.device)] = trace.background_load
        elif isinstance(trace, MemoryTrace):
            self.memory_bytes[self.index(trace.device)] = trace.memory_mib * MIB
        elif isinstance(trace, LinkTrace):
            i, j = (self.index(n) for n in trace.link)
            self.cut[i, j] = self.cut[j, i] = trace.bandwidth_mbit == 0
            if trace.bandwidth_mbit > 0:
                self.bandwidth_mbit[i, j] = self.bandwidth_mbit[j, i] = trace.bandwidth_mbit
            if trace.latency_ms is not None:
                self.latency_s[i, j] = self.latency_s[j, i] = trace.latency_ms / 1000.0
        elif isinstance(trace, FailTrace):
            self.alive[self.index(trace.device)] = False
        elif isinstance(trace, JoinTrace):
            self.alive[self.index(trace.device)] = True
        else:  # pragma: no cover - the scenario schema admits no other kind
            raise TypeError(f"unknown trace {trace!r}")

    @property
    def reachable(self) -> np.ndarray:
        """Per device, whether it runs and its link to the source is not cut: a device cut
        off counts as lost until the link is restored."""
        return self.alive & ~self.cut[self.source]

    @property
    def available_gflops(self) -> np.ndarray:
        """GFLOP/s left to edgepart after background load (0 on lost devices)."""
        return np.where(self.reachable, self.nominal_gflops * (1.0 - self.background_load), 0.0)

    def view(self, scenario: Scenario, window: PlanningWindow) -> ResourceView:
        """What a planner sees of this state (a snapshot: later changes do not leak into it),
        with the prior times to build a block of each kind and to adopt a committed block
        at each device's speed."""
        return ResourceView(
            devices=self.names,
            compute_gflops=self.available_gflops.copy(),
            memory_bytes=np.where(self.reachable, self.memory_bytes, 0.0),
            bandwidth_mbit=self.bandwidth_mbit.copy(),
            latency_s=self.latency_s.copy(),
            source=scenario.source_index,
            window=window,
            weights_from=scenario.weights_from,
            alive=self.reachable.copy(),
            install_s=install_prior_s(_table(scenario.model_spec()), self.available_gflops),
            move_s_per_block=commit_block_s(self.available_gflops),
            control_rtt_s=CONTROL_RTT_PRIOR_S,
        )


def apply_due_traces(state: WorldState, pending: list[Trace], token: int, clock_s: float) -> None:
    """Apply (and drop from ``pending``) the traces due before generated token ``token``."""
    due = [
        t
        for t in pending
        if (t.at_token is not None and t.at_token <= token)
        or (t.at_s is not None and t.at_s <= clock_s)
    ]
    for trace in due:
        state.apply(trace)
        pending.remove(trace)


def initial_state(scenario: Scenario) -> tuple[WorldState, list[Trace]]:
    """The world when generation starts (traces at token 0 applied) and the traces still due."""
    state = WorldState.from_scenario(scenario)
    pending = list(scenario.traces)
    apply_due_traces(state, pending, 0, 0.0)
    return state, pending
