"""ControllerMetrics over real HTTP: what is fed is what a scrape reads back."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgepart.control_plane.protocol import Telemetry
from edgepart.controller.metrics import TOKEN_BUCKETS_S, ControllerMetrics, run_label

PROMTOOL = shutil.which("promtool") or shutil.which("/usr/bin/promtool")


def scrape(port: int) -> str:
    """The text a Prometheus scrape of 127.0.0.1:port gets."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode("utf-8")


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(sample name, labels) -> value, for every sample of the exposition."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict, name: str, **labels: str) -> float:
    """One sample's value (KeyError when the series is missing)."""
    return found[(name, frozenset(labels.items()))]


RUN = {"run": "lan-20260101T120000Z", "algorithm": "myopic"}


def run_value(found: dict, name: str, **labels: str) -> float:
    """One sample of the run's series (labelled with RUN)."""
    return value(found, name, **RUN, **labels)


@pytest.fixture
def metrics() -> Iterator[tuple[ControllerMetrics, int]]:
    """A ControllerMetrics served on a free port, closed after the test."""
    m = ControllerMetrics(**RUN)
    port = m.serve(0)
    yield m, port
    m.close()


def telemetry(name: str, **fields) -> Telemetry:
    """A telemetry message with defaults for what a test does not set."""
    base = dict(
        name=name,
        ts=1.0,
        cpu_used=0.25,
        available_gflops=12.5,
        memory_used_bytes=3e6,
        memory_budget_bytes=64e6,
        kv_bytes=1e5,
        blocks=("embed", "L0.g0", "head"),
    )
    base.update(fields)
    return Telemetry(**base)


def test_serve_binds_a_free_port(metrics) -> None:
    _, port = metrics
    assert port > 0
    assert "edgepart_tokens_total" in scrape(port)


def test_the_run_label_names_the_testbed_and_its_start() -> None:
    from datetime import UTC, datetime

    started = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert run_label("lan", started) == RUN["run"]


def test_token_latency_measured_and_predicted(metrics) -> None:
    m, port = metrics
    m.token(0.05, 0.04)
    m.token(0.2, 0.25)
    found = samples(scrape(port))

    def measured(name: str, **labels: str) -> float:
        return run_value(found, name, kind="measured", **labels)

    def predicted(name: str, **labels: str) -> float:
        return run_value(found, name, kind="predicted", **labels)

    assert measured("edgepart_token_latency_seconds_count") == 2
    assert measured("edgepart_token_latency_seconds_sum") == pytest.approx(0.25)
    # le is inclusive: 0.05 falls in the 0.05 bucket
    assert measured("edgepart_token_latency_seconds_bucket", le="0.05") == 1
    assert measured("edgepart_token_latency_seconds_bucket", le="0.2") == 2
    assert measured("edgepart_token_latency_seconds_bucket", le="0.005") == 0
    assert measured("edgepart_token_latency_seconds_bucket", le="+Inf") == 2
    assert predicted("edgepart_token_latency_seconds_count") == 2
    assert predicted("edgepart_token_latency_seconds_sum") == pytest.approx(0.29)
    assert predicted("edgepart_token_latency_seconds_bucket", le="0.2") == 1
    assert predicted("edgepart_token_latency_seconds_bucket", le="0.25") == 2
    assert run_value(found, "edgepart_measured_token_latency_seconds") == 0.2
    assert run_value(found, "edgepart_predicted_token_latency_seconds") == 0.25
    assert run_value(found, "edgepart_tokens_total") == 2


def test_the_latency_buckets_resolve_100_to_500_ms() -> None:
    # p50 and p95 are interpolated within a bucket: where the testbed's tokens fall, no
    # bucket is wider than 50 ms
    inside = [b for b in TOKEN_BUCKETS_S if 0.1 <= b <= 0.5]
    assert inside[0] == 0.1 and inside[-1] == 0.5
    assert max(b - a for a, b in itertools.pairwise(inside)) <= 0.05 + 1e-12


def test_replans_and_migrations_by_phase(metrics) -> None:
    m, port = metrics
    before = samples(scrape(port))
    # a run without a switch shows both phases, at 0
    for phase in ("prepare", "commit"):
        assert run_value(before, "edgepart_migration_phase_seconds_total", phase=phase) == 0
    m.replan(0.5)
    m.replan(1.5)
    m.migration(3, 1_000_000, prepare_s=2.0, commit_s=0.75)
    m.migration(1, 24_576.0, prepare_s=0.5, commit_s=0.25)
    found = samples(scrape(port))
    assert run_value(found, "edgepart_replan_seconds_count") == 2
    assert run_value(found, "edgepart_replan_seconds_sum") == 2.0
    assert run_value(found, "edgepart_replan_seconds_bucket", le="1.0") == 1
    assert run_value(found, "edgepart_replans_total") == 2
    assert run_value(found, "edgepart_migrations_total") == 4
    assert run_value(found, "edgepart_migration_bytes_total") == 1_024_576
    assert run_value(found, "edgepart_migration_seconds_total") == 1.0
    assert run_value(found, "edgepart_migration_phase_seconds_total", phase="prepare") == 2.5
    assert run_value(found, "edgepart_migration_phase_seconds_total", phase="commit") == 1.0


def test_device_gauges_per_device(metrics) -> None:
    m, port = metrics
    m.telemetry(telemetry("a", peer_throughput_mbit={"b": 80.0}, dropped_messages=2))
    m.telemetry(
        telemetry(
            "b",
            cpu_used=0.5,
            available_gflops=3.0,
            memory_used_bytes=5e6,
            memory_budget_bytes=32e6,
            kv_bytes=2e5,
            blocks=("L1.ffn",),
            peer_throughput_mbit={"a": 40.0, "s": 9.5},
            dropped_frames=7,
        )
    )
    found = samples(scrape(port))
    expect = {
        "edgepart_device_cpu_used_ratio": (0.25, 0.5),
        "edgepart_device_available_gflops": (12.5, 3.0),
        "edgepart_device_memory_used_bytes": (3e6, 5e6),
        "edgepart_device_memory_budget_bytes": (64e6, 32e6),
        "edgepart_device_kv_bytes": (1e5, 2e5),
        "edgepart_device_blocks": (3, 1),
        "edgepart_device_dropped_messages": (2, 0),
        "edgepart_device_dropped_frames": (0, 7),
    }
    for name, (a, b) in expect.items():
        assert value(found, name, device="a") == a, name
        assert value(found, name, device="b") == b, name
    assert value(found, "edgepart_link_measured_mbit", src="a", dst="b") == 80.0
    assert value(found, "edgepart_link_measured_mbit", src="b", dst="a") == 40.0
    assert value(found, "edgepart_link_measured_mbit", src="b", dst="s") == 9.5


def test_telemetry_updates_and_expires_links(metrics) -> None:
    m, port = metrics
    m.telemetry(telemetry("b", peer_throughput_mbit={"a": 40.0, "s": 9.5}))
    m.telemetry(telemetry("b", memory_used_bytes=4e6, peer_throughput_mbit={"a": 45.0}))
    found = samples(scrape(port))
    assert value(found, "edgepart_device_memory_used_bytes", device="b") == 4e6
    assert value(found, "edgepart_link_measured_mbit", src="b", dst="a") == 45.0
    # the agent stopped reporting b -> s (its measurement expired): so does the endpoint
    assert ("edgepart_link_measured_mbit", frozenset({("src", "b"), ("dst", "s")})) not in found


def test_instances_are_independent() -> None:
    first, second = ControllerMetrics(**RUN), ControllerMetrics(**RUN)
    try:
        ports = first.serve(0), second.serve(0)
        first.token(1.0, 1.0)
        assert run_value(samples(scrape(ports[0])), "edgepart_tokens_total") == 1
        assert run_value(samples(scrape(ports[1])), "edgepart_tokens_total") == 0
    finally:
        first.close()
        second.close()


def test_close_stops_serving() -> None:
    m = ControllerMetrics(**RUN)
    port = m.serve(0)
    m.close()
    m.close()  # idempotent
    with pytest.raises(urllib.error.URLError):
        scrape(port)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_accepts_the_exposition(metrics) -> None:
    m, port = metrics
    m.token(0.05, 0.04)
    m.replan(0.1)
    m.migration(1, 100, 0.05, 0.01)
    m.telemetry(telemetry("a", peer_throughput_mbit={"b": 80.0}))
    assert PROMTOOL is not None
    checked = subprocess.run(
        [PROMTOOL, "check", "metrics"],
        input=scrape(port),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
