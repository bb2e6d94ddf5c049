"""The controller's Prometheus metrics: token latency, re-plans, migrations, device telemetry.

Everything lives in a registry of its own, not prometheus_client's global one, so several
controllers (or tests) can run in one process and the endpoint shows only edgepart series.
The device gauges mirror the last telemetry each agent published, so they show what the
planner saw, which can lag the agent's own endpoint by up to a telemetry period.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from control_plane.protocol import Telemetry
from device_agent.metrics import MetricsServer

#: per-token decode latency spans a fast LAN testbed (ms) to a starved, throttled one (s)
TOKEN_BUCKETS_S = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
#: a heuristic plans in ms, the optimal MILP can take tens of seconds on a large testbed
REPLAN_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0)


class ControllerMetrics(MetricsServer):
    """The controller's metrics in a registry of their own, served over HTTP on demand."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.token_latency = Histogram(
            "edgepart_token_latency_seconds",
            "Measured decode latency of one token, s",
            buckets=TOKEN_BUCKETS_S,
            registry=r,
        )
        self.predicted_latency = Gauge(
            "edgepart_predicted_token_latency_seconds",
            "The cost model's prediction for the last token, s",
            registry=r,
        )
        self.measured_latency = Gauge(
            "edgepart_measured_token_latency_seconds",
            "Measured decode latency of the last token, s",
            registry=r,
        )
        self.tokens = Counter("edgepart_tokens_total", "Tokens decoded after the first", registry=r)
        self.replan_time = Histogram(
            "edgepart_replan_seconds",
            "Time the placement algorithm took for one plan, s",
            buckets=REPLAN_BUCKETS_S,
            registry=r,
        )
        self.replans = Counter("edgepart_replans_total", "Placements computed", registry=r)
        self.migrations = Counter(
            "edgepart_migrations_total", "Blocks moved between devices", registry=r
        )
        self.migration_bytes = Counter(
            "edgepart_migration_bytes_total", "Block state moved between devices, bytes", registry=r
        )
        self.migration_time = Counter(
            "edgepart_migration_seconds_total",
            "Decoding stalled on migrations, s",
            registry=r,
        )

        def device_gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, ("device",), registry=r)

        self.cpu_used = device_gauge(
            "edgepart_device_cpu_used_ratio", "Fraction of the device's CPU share in use (0-1)"
        )
        self.available_gflops = device_gauge(
            "edgepart_device_available_gflops",
            "Compute left to edgepart after background load, GFLOP/s",
        )
        self.memory_used = device_gauge(
            "edgepart_device_memory_used_bytes", "Weights and KV caches held, bytes"
        )
        self.memory_budget = device_gauge(
            "edgepart_device_memory_budget_bytes", "Memory the device offers to edgepart, bytes"
        )
        self.kv_bytes = device_gauge("edgepart_device_kv_bytes", "KV caches held, bytes")
        self.blocks = device_gauge("edgepart_device_blocks", "Blocks held")
        # gauges, not counters: they copy the agent's running totals, they do not count here
        self.dropped_messages = device_gauge(
            "edgepart_device_dropped_messages",
            "Malformed MQTT payloads the agent dropped so far (as last reported)",
        )
        self.dropped_frames = device_gauge(
            "edgepart_device_dropped_frames",
            "Malformed data-plane input the agent dropped so far (as last reported)",
        )
        self.controller_dropped = Counter(
            "edgepart_controller_dropped_messages",
            "Malformed MQTT payloads the controller dropped, by topic kind",
            ("kind",),
            registry=r,
        )
        self.link_mbit = Gauge(
            "edgepart_link_measured_mbit",
            "Throughput the link last measured (src sending to dst), Mbit/s",
            ("src", "dst"),
            registry=r,
        )
        self._links: dict[str, set[str]] = {}  # src -> dsts with a measured series

    # -- HTTP --------------------------------------------------------------------------

    # -- events ------------------------------------------------------------------------
    def telemetry(self, t: Telemetry) -> None:
        """Mirror one device's telemetry (bytes, GFLOP/s, Mbit/s as published)."""
        d = t.name
        self.cpu_used.labels(d).set(t.cpu_used)
        self.available_gflops.labels(d).set(t.available_gflops)
        self.memory_used.labels(d).set(t.memory_used_bytes)
        self.memory_budget.labels(d).set(t.memory_budget_bytes)
        self.kv_bytes.labels(d).set(t.kv_bytes)
        self.blocks.labels(d).set(len(t.blocks))
        self.dropped_messages.labels(d).set(t.dropped_messages)
        self.dropped_frames.labels(d).set(t.dropped_frames)
        for dst, rate in t.peer_throughput_mbit.items():
            self.link_mbit.labels(d, dst).set(rate)
        # a measurement the agent stopped reporting has expired: keeping it would show a
        # rate the link may no longer give
        now = set(t.peer_throughput_mbit)
        for dst in self._links.get(d, set()) - now:
            self.link_mbit.remove(d, dst)
        self._links[d] = now

    def dropped_message(self, kind: str) -> None:
        """Count one malformed MQTT payload the controller dropped (by topic kind)."""
        self.controller_dropped.labels(kind).inc()

    def token(self, measured_s: float, predicted_s: float) -> None:
        """Record one decoded token's measured and predicted latency (s)."""
        self.token_latency.observe(measured_s)
        self.measured_latency.set(measured_s)
        self.predicted_latency.set(predicted_s)
        self.tokens.inc()

    def replan(self, seconds: float) -> None:
        """Record one placement computation that took ``seconds`` (s)."""
        self.replan_time.observe(seconds)
        self.replans.inc()

    def migration(self, count: int, nbytes: float, seconds: float) -> None:
        """Record one plan's moves: ``count`` blocks, ``nbytes`` bytes, ``seconds`` stall (s)."""
        self.migrations.inc(count)
        self.migration_bytes.inc(nbytes)
        self.migration_time.inc(seconds)
