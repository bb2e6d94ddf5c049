"""An agent's Prometheus metrics: step timings pushed by the compute thread, state read live.

Step timings are recorded as they happen (prometheus_client metrics take their own locks,
so the compute thread records while the HTTP thread scrapes). Memory, blocks and data-plane
counts are read from the agent at scrape time by a collector instead of being copied on
every change, so they cannot go stale and cost nothing between scrapes.
Every series carries ``device`` = the agent's name, so one Prometheus can scrape them all.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol, TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgepart.device_agent.program import Step

log = logging.getLogger(__name__)

#: one step is a few blocks of one layer: under 0.1 ms on a fast core, seconds when throttled
STEP_BUCKETS_S = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 2.0)
#: reads of the agent's block dict race the compute thread's loads; retries before giving up
READ_ATTEMPTS = 3

T = TypeVar("T")


class _Host(Protocol):
    @property
    def blocks(self) -> Mapping[str, object]: ...

    def cache_bytes(self) -> int: ...


class _Plane(Protocol):
    @property
    def bytes_sent(self) -> Mapping[str, int]: ...

    @property
    def bytes_received(self) -> int: ...

    @property
    def frames_received(self) -> int: ...

    @property
    def bad_frames(self) -> Mapping[str, int]: ...


class _Blocks(Protocol):
    @property
    def budget(self) -> int: ...

    @property
    def host(self) -> _Host: ...

    def used_bytes(self) -> int: ...


class AgentState(Protocol):
    """What the collector reads of an agent (edgepart.device_agent.agent.Agent, or a stand-in)."""

    @property
    def name(self) -> str: ...

    @property
    def blocks(self) -> _Blocks: ...

    @property
    def plane(self) -> _Plane: ...

    @property
    def dropped_messages(self) -> Mapping[str, int]: ...


def _layer_label(step: Step) -> str:
    # embed and head both have layer -1: named apart, their times do not merge
    return step.kind if step.kind in ("embed", "head") else str(step.layer)


def _read(what: str, read: Callable[[], T]) -> T | None:
    """``read()``, retried when a dict it iterates changed size under it (None if it kept on)."""
    error: RuntimeError | None = None
    for _ in range(READ_ATTEMPTS):
        try:
            return read()
        except RuntimeError as exc:  # "dictionary changed size during iteration"
            error = exc
    log.warning("metrics: could not read %s (%s); left out of this scrape", what, error)
    return None


class AgentCollector(Collector):
    """Reads the live agent at scrape time (memory, blocks, data-plane and drop counts)."""

    def __init__(self, agent: AgentState) -> None:
        self.agent = agent

    def describe(self) -> Iterable[Metric]:
        """The families collect() yields, without samples (for the registry's name checks)."""
        return self._families()

    def _families(self) -> list[Metric]:
        dev = ["device"]
        return [
            GaugeMetricFamily(
                "edgepart_agent_memory_used_bytes", "Weights and KV caches held, bytes", labels=dev
            ),
            GaugeMetricFamily(
                "edgepart_agent_memory_budget_bytes",
                "Memory the device offers to edgepart, bytes",
                labels=dev,
            ),
            GaugeMetricFamily("edgepart_agent_kv_bytes", "KV caches held, bytes", labels=dev),
            GaugeMetricFamily("edgepart_agent_blocks", "Blocks held", labels=dev),
            CounterMetricFamily(
                "edgepart_link_sent_bytes",
                "Data-plane frames sent to a peer, bytes",
                labels=["device", "dst"],
            ),
            CounterMetricFamily(
                "edgepart_agent_received_bytes",
                "Data-plane payload received from all peers, bytes",
                labels=dev,
            ),
            CounterMetricFamily(
                "edgepart_agent_received_frames",
                "Data-plane frames received from all peers",
                labels=dev,
            ),
            CounterMetricFamily(
                "edgepart_agent_dropped_messages",
                "Malformed MQTT payloads dropped, by topic kind",
                labels=["device", "kind"],
            ),
            CounterMetricFamily(
                "edgepart_agent_dropped_frames",
                "Malformed data-plane input dropped, by reason",
                labels=["device", "kind"],
            ),
        ]

    def collect(self) -> Iterable[Metric]:
        """The agent's state now, one family per metric."""
        a = self.agent
        d = a.name
        (used, budget, kv, blocks, sent, received, frames, messages, bad) = self._families()
        value = _read("used_bytes", a.blocks.used_bytes)
        if value is not None:
            used.add_metric([d], value)
        budget.add_metric([d], a.blocks.budget)
        value = _read("kv_bytes", a.blocks.host.cache_bytes)
        if value is not None:
            kv.add_metric([d], value)
        blocks.add_metric([d], len(a.blocks.host.blocks))
        # dict() copies in one step under the GIL; iterating the live Counter could meet
        # the event loop adding a key mid-way
        for peer, n in sorted(dict(a.plane.bytes_sent).items()):
            sent.add_metric([d, peer], n)
        received.add_metric([d], a.plane.bytes_received)
        frames.add_metric([d], a.plane.frames_received)
        for kind, n in sorted(dict(a.dropped_messages).items()):
            messages.add_metric([d, kind], n)
        for kind, n in sorted(dict(a.plane.bad_frames).items()):
            bad.add_metric([d, kind], n)
        return [used, budget, kv, blocks, sent, received, frames, messages, bad]


class MetricsServer:
    """Serves one registry's /metrics over HTTP (the controller's and each agent's)."""

    registry: CollectorRegistry
    _server: WSGIServer | None = None
    _thread: threading.Thread | None = None

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve /metrics on addr:port (port 0 = any free one); returns the bound port."""
        if self._server is not None:
            raise RuntimeError("metrics are already served")
        self._server, self._thread = start_http_server(port, addr, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        """Stop serving (waits up to 5 s for the server thread); a no-op when not serving."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(5.0)


class AgentMetrics(MetricsServer):
    """One agent's metrics in a registry of their own, served over HTTP on demand."""

    def __init__(self, agent: AgentState) -> None:
        self.agent = agent
        self.device = agent.name
        self.registry = CollectorRegistry()
        self.step_time = Histogram(
            "edgepart_agent_step_seconds",
            "Compute time of one step (pacing included), s",
            ("device", "kind"),
            buckets=STEP_BUCKETS_S,
            registry=self.registry,
        )
        self.layer_time = Counter(
            "edgepart_agent_layer_seconds_total",
            "Compute time spent per layer (embed and head by name), s",
            ("device", "layer"),
            registry=self.registry,
        )
        self.collector = AgentCollector(agent)
        self.registry.register(self.collector)


    def step(self, step: Step, seconds: float) -> None:
        """Record one executed step that took ``seconds`` (s); safe from any thread."""
        self.step_time.labels(self.device, step.kind).observe(seconds)
        self.layer_time.labels(self.device, _layer_label(step)).inc(seconds)
