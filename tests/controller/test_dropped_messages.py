"""The controller's reading loop fed malformed MQTT payloads: each is dropped, counted by topic
kind (the run's total and ``edgepart_controller_dropped_messages_total{kind}``), the first of
each kind is logged, and the loop goes on to the valid messages after them."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edgepart.control_plane import protocol as proto
from edgepart.controller.config import ControllerConfig
from edgepart.controller.metrics import ControllerMetrics
from edgepart.controller.orchestrator import Controller, NoWorld
from edgepart.llm.blocks import block_table
from edgepart.llm.model import ModelSpec

TESTBED = "tb"
DEVICES = ("d0", "d1")


class _Following(NoWorld):
    """A world that follows world_ready and keeps what arrives on it."""

    run_topics = ("world_ready",)

    def __init__(self) -> None:
        self.seen: list[object] = []

    def on_run_message(self, message) -> None:
        self.seen.append(message)


def _controller(world: NoWorld) -> Controller:
    d = len(DEVICES)
    config = ControllerConfig(
        testbed=TESTBED,
        broker="127.0.0.1:1883",
        algorithm="myopic",
        devices=DEVICES,
        source="d0",
        nominal_gflops=np.ones(d),
        memory_bytes=np.full(d, 2.0**30),
        bandwidth_mbit=np.full((d, d), 100.0),
        latency_s=np.full((d, d), 0.001),
        table=block_table(ModelSpec("t", 1, 16, 2, 2, 32, 10, head_dim=8)),
        prompt_ids=(1,),
        generate_tokens=1,
        metrics_port=0,  # metrics kept (served only by a run)
    )
    return Controller(config, world)


def _telemetry(name: str) -> bytes:
    return proto.encode(
        proto.Telemetry(
            name=name,
            ts=1.0,
            cpu_used=0.5,
            available_gflops=1.0,
            memory_used_bytes=3e6,
            memory_budget_bytes=1e9,
            kv_bytes=0.0,
        )
    )


def test_malformed_messages_are_counted_per_kind_and_logged_once(
    caplog: pytest.LogCaptureFixture, replayed
) -> None:
    topic = proto.device_topic
    bad = [
        (topic(TESTBED, "d0", "telemetry"), b"\xff not json"),
        (topic(TESTBED, "d1", "telemetry"), b'{"v": 2, "name": "d1"}'),
        (topic(TESTBED, "d0", "telemetry"), b"[" * 100_000),  # once raised RecursionError
        (topic(TESTBED, "d0", "status"), b'{"v": 1, "name": "d0", "state": "asleep"}'),
        (topic(TESTBED, "d1", "reply"), b'{"v": 1, "id": "c1", "ok": "maybe"}'),
        (topic(TESTBED, "d1", "reply"), b"x" * (proto.MAX_PAYLOAD_BYTES + 1)),
        (proto.run_topic(TESTBED, "world_ready"), b'{"v": 1, "token": ' + b"9" * 5000 + b"}"),
    ]
    good = [(topic(TESTBED, name, "telemetry"), _telemetry(name)) for name in DEVICES]
    world = _Following()
    controller = _controller(world)
    with caplog.at_level(logging.WARNING, logger="edgepart.controller"):
        asyncio.run(controller.link.session.read(replayed(bad + good)))

    want = {"telemetry": 3, "status": 1, "reply": 2, "world_ready": 1}
    assert dict(controller.link.session.dropped.by_kind) == want
    assert controller.link.session.dropped.total == sum(want.values())
    assert world.seen == []
    # the loop went on: the valid telemetry after the bad input was taken
    assert all(controller.telemetry.devices[name].telemetry is not None for name in DEVICES)
    logged = Counter(r.args[0] for r in caplog.records if "once per kind" in r.getMessage())
    assert logged == {kind: 1 for kind in want}

    text = generate_latest(controller.metrics.registry).decode("utf-8")
    exported = {
        s.labels["kind"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "edgepart_controller_dropped_messages_total"
    }
    assert exported == {kind: float(n) for kind, n in want.items()}


def test_no_series_before_anything_is_dropped() -> None:
    text = generate_latest(ControllerMetrics("r", "myopic").registry).decode("utf-8")
    assert "# TYPE edgepart_controller_dropped_messages_total counter" in text
    assert "edgepart_controller_dropped_messages_total{" not in text
