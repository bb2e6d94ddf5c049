"""The controller's Prometheus metrics: token latency, re-plans, migrations, device telemetry.

Everything lives in a registry of its own, not prometheus_client's global one, so several
controllers (or tests) can run in one process and the endpoint shows only edgepart series.
Every series of the run (tokens, latencies, re-plans, migrations) carries the labels
``run`` (``run_label``: the testbed and when the run started) and ``algorithm``, so one
Prometheus and one dashboard tell runs and algorithms apart; a token's latency is recorded
twice in one histogram, ``kind="measured"`` and ``kind="predicted"`` (the cost model's), so
their quantiles compare. The device gauges mirror the last telemetry each agent published,
so they show what the planner saw, which can lag the agent's own endpoint by up to a
telemetry period.
"""

from __future__ import annotations

from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edgepart.control_plane.protocol import Telemetry
from edgepart.device_agent.metrics import MetricsServer

#: per-token decode latency spans a fast LAN testbed (ms) to a starved, throttled one (s);
#: 25 to 50 ms apart from 100 to 500 ms, where the testbed's tokens mostly fall, so that
#: p50 and p95 (interpolated within a bucket) resolve there
TOKEN_BUCKETS_S = (
    0.005, 0.01, 0.02, 0.035, 0.05, 0.075,
    0.1, 0.125, 0.15, 0.175, 0.2, 0.225, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5,
    0.6, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0,
)  # fmt: skip
#: a heuristic plans in ms, the optimal MILP can take tens of seconds on a large testbed
REPLAN_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0)


#: the labels of every series of the run
RUN_LABELS = ("run", "algorithm")
#: a switch's two phases: prepare (the new copies are built while decoding goes on), then
#: commit (decoding stalls while the placement changes over)
PHASES = ("prepare", "commit")


def run_label(testbed: str, started: datetime) -> str:
    """The ``run`` label of a run: its testbed and its start (UTC, to the second)."""
    return f"{testbed}-{started:%Y%m%dT%H%M%SZ}"


class ControllerMetrics(MetricsServer):
    """The controller's metrics in a registry of their own, served over HTTP on demand."""

    def __init__(self, run: str, algorithm: str) -> None:
        """The metrics of one run (its ``run_label``) of one placement algorithm."""
        self.registry = CollectorRegistry()
        self._run_series(run, algorithm)
        self._device_series()

    def _run_series(self, run: str, algorithm: str) -> None:
        """The series of the run: tokens, latencies, re-plans, migrations."""
        r = self.registry
        ours = (run, algorithm)

        def run_counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, RUN_LABELS, registry=r).labels(*ours)

        def run_gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, RUN_LABELS, registry=r).labels(*ours)

        latency = Histogram(
            "edgepart_token_latency_seconds",
            "Decode latency of one token, s: measured, or predicted by the cost model",
            (*RUN_LABELS, "kind"),
            buckets=TOKEN_BUCKETS_S,
            registry=r,
        )
        self.token_latency = latency.labels(*ours, "measured")
        self.token_latency_predicted = latency.labels(*ours, "predicted")
        self.predicted_latency = run_gauge(
            "edgepart_predicted_token_latency_seconds",
            "The cost model's prediction for the last token, s",
        )
        self.measured_latency = run_gauge(
            "edgepart_measured_token_latency_seconds",
            "Measured decode latency of the last token, s",
        )
        self.tokens = run_counter("edgepart_tokens_total", "Tokens decoded after the first")
        self.replan_time = Histogram(
            "edgepart_replan_seconds",
            "Time the placement algorithm took for one plan, s",
            RUN_LABELS,
            buckets=REPLAN_BUCKETS_S,
            registry=r,
        ).labels(*ours)
        self.replans = run_counter("edgepart_replans_total", "Placements computed")
        self.migrations = run_counter("edgepart_migrations_total", "Blocks moved between devices")
        self.migration_bytes = run_counter(
            "edgepart_migration_bytes_total", "Block state moved between devices, bytes"
        )
        self.migration_time = run_counter(
            "edgepart_migration_seconds_total", "Decoding stalled on migrations, s"
        )
        phase = Counter(
            "edgepart_migration_phase_seconds_total",
            "Time switches spent in each phase, s: prepare (copies built while decoding "
            "goes on), commit (decoding stalled)",
            (*RUN_LABELS, "phase"),
            registry=r,
        )
        # both phases exist from the start, at 0: a run without a switch still shows them
        self.migration_phase = {name: phase.labels(*ours, name) for name in PHASES}

    def _device_series(self) -> None:
        """The devices' gauges (as last reported), links and the controller's drops."""
        r = self.registry

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
        self.token_latency_predicted.observe(predicted_s)
        self.measured_latency.set(measured_s)
        self.predicted_latency.set(predicted_s)
        self.tokens.inc()

    def replan(self, seconds: float) -> None:
        """Record one placement computation that took ``seconds`` (s)."""
        self.replan_time.observe(seconds)
        self.replans.inc()

    def migration(self, count: int, nbytes: float, prepare_s: float, commit_s: float) -> None:
        """Record one switch's moves: ``count`` blocks, ``nbytes`` bytes, its phases' times
        (s; the commit is the stall)."""
        self.migrations.inc(count)
        self.migration_bytes.inc(nbytes)
        self.migration_time.inc(commit_s)
        self.migration_phase["prepare"].inc(prepare_s)
        self.migration_phase["commit"].inc(commit_s)
