"""ControllerMetrics over real HTTP: what is fed is what a scrape reads back."""

from __future__ import annotations

import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from control_plane.protocol import Telemetry
from controller.metrics import ControllerMetrics

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


@pytest.fixture
def metrics() -> Iterator[tuple[ControllerMetrics, int]]:
    """A ControllerMetrics served on a free port, closed after the test."""
    m = ControllerMetrics()
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


def test_token_latency(metrics) -> None:
    m, port = metrics
    m.token(0.05, 0.04)
    m.token(0.2, 0.25)
    found = samples(scrape(port))
    assert value(found, "edgepart_token_latency_seconds_count") == 2
    assert value(found, "edgepart_token_latency_seconds_sum") == pytest.approx(0.25)
    # le is inclusive: 0.05 falls in the 0.05 bucket
    assert value(found, "edgepart_token_latency_seconds_bucket", le="0.05") == 1
    assert value(found, "edgepart_token_latency_seconds_bucket", le="0.2") == 2
    assert value(found, "edgepart_token_latency_seconds_bucket", le="0.005") == 0
    assert value(found, "edgepart_token_latency_seconds_bucket", le="+Inf") == 2
    assert value(found, "edgepart_measured_token_latency_seconds") == 0.2
    assert value(found, "edgepart_predicted_token_latency_seconds") == 0.25
    assert value(found, "edgepart_tokens_total") == 2


def test_replans_and_migrations(metrics) -> None:
    m, port = metrics
    m.replan(0.5)
    m.replan(1.5)
    m.migration(3, 1_000_000, 0.75)
    m.migration(1, 24_576.0, 0.25)
    found = samples(scrape(port))
    assert value(found, "edgepart_replan_seconds_count") == 2
    assert value(found, "edgepart_replan_seconds_sum") == 2.0
    assert value(found, "edgepart_replan_seconds_bucket", le="1.0") == 1
    assert value(found, "edgepart_replans_total") == 2
    assert value(found, "edgepart_migrations_total") == 4
    assert value(found, "edgepart_migration_bytes_total") == 1_024_576
    assert value(found, "edgepart_migration_seconds_total") == 1.0


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
    first, second = ControllerMetrics(), ControllerMetrics()
    try:
        ports = first.serve(0), second.serve(0)
        first.token(1.0, 1.0)
        assert value(samples(scrape(ports[0])), "edgepart_tokens_total") == 1
        assert value(samples(scrape(ports[1])), "edgepart_tokens_total") == 0
    finally:
        first.close()
        second.close()


def test_close_stops_serving() -> None:
    m = ControllerMetrics()
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
    m.migration(1, 100, 0.01)
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
