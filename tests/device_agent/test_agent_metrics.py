"""AgentMetrics over real HTTP: step timings as fed, agent state as it is at scrape time."""

from __future__ import annotations

import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgepart.device_agent.metrics import AgentMetrics
from edgepart.device_agent.program import Step, StepKind

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


# -- a stand-in agent: the plain state the collector reads, no model loaded ----------------


@dataclass
class Host:
    blocks: dict[str, object] = field(default_factory=dict)
    kv: int = 0

    def cache_bytes(self) -> int:
        return self.kv


@dataclass
class Plane:
    bytes_sent: Counter[str] = field(default_factory=Counter)
    bytes_received: int = 0
    frames_received: int = 0
    bad_frames: Counter[str] = field(default_factory=Counter)


@dataclass
class Blocks:
    budget: int = 64_000_000
    used: int = 0
    host: Host = field(default_factory=Host)

    def used_bytes(self) -> int:
        return self.used


@dataclass
class StandIn:
    name: str = "dev-a"
    blocks: Blocks = field(default_factory=Blocks)
    plane: Plane = field(default_factory=Plane)
    dropped_messages: Counter[str] = field(default_factory=Counter)


def step(kind: StepKind, layer: int) -> Step:
    """A step of that kind and layer (routing fields do not matter to the metrics)."""
    return Step(kind, layer, (), (), "", (), False)


@pytest.fixture
def agent() -> StandIn:
    """A stand-in agent holding two blocks, having sent and dropped a little."""
    return StandIn(
        blocks=Blocks(
            used=3_500_000,
            host=Host(blocks={"embed": object(), "L0.g0": object()}, kv=120_000),
        ),
        plane=Plane(
            bytes_sent=Counter({"dev-b": 4096, "dev-c": 100}),
            bytes_received=2048,
            frames_received=5,
            bad_frames=Counter({"bad magic": 2}),
        ),
        dropped_messages=Counter({"cmd": 1, "placement": 3}),
    )


@pytest.fixture
def served(agent: StandIn) -> Iterator[tuple[AgentMetrics, int]]:
    """AgentMetrics of the stand-in served on a free port, closed after the test."""
    m = AgentMetrics(agent)
    port = m.serve(0)
    yield m, port
    m.close()


def test_step_timings(served) -> None:
    m, port = served
    m.step(step("embed", -1), 0.001)
    m.step(step("groups", 0), 0.002)
    m.step(step("groups", 0), 0.004)
    m.step(step("proj", 0), 0.003)
    m.step(step("ffn", 1), 0.25)
    m.step(step("head", -1), 0.5)
    found = samples(scrape(port))
    hist = "edgepart_agent_step_seconds"
    counts = {"embed": 1, "groups": 2, "proj": 1, "ffn": 1, "head": 1}
    sums = {"embed": 0.001, "groups": 0.006, "proj": 0.003, "ffn": 0.25, "head": 0.5}
    for kind, count in counts.items():
        assert value(found, f"{hist}_count", device="dev-a", kind=kind) == count
        assert value(found, f"{hist}_sum", device="dev-a", kind=kind) == pytest.approx(sums[kind])
    # le is inclusive: of 0.002 and 0.004, only the first is at most 0.002
    assert value(found, f"{hist}_bucket", device="dev-a", kind="groups", le="0.002") == 1
    per_layer = {"embed": 0.001, "0": 0.009, "1": 0.25, "head": 0.5}
    for layer, seconds in per_layer.items():
        total = value(found, "edgepart_agent_layer_seconds_total", device="dev-a", layer=layer)
        assert total == pytest.approx(seconds)
    layers = {dict(ls).get("layer") for n, ls in found if n.startswith("edgepart_agent_layer")}
    assert layers == set(per_layer)  # embed and head are not merged under layer "-1"


def test_steps_from_many_threads_all_count(served) -> None:
    m, port = served
    per_thread, threads = 500, 4

    def run() -> None:
        for _ in range(per_thread):
            m.step(step("ffn", 3), 0.001)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(10)
    found = samples(scrape(port))
    total = per_thread * threads
    assert value(found, "edgepart_agent_step_seconds_count", device="dev-a", kind="ffn") == total
    assert value(
        found, "edgepart_agent_layer_seconds_total", device="dev-a", layer="3"
    ) == pytest.approx(total * 0.001)


def test_collector_reads_the_agent(served) -> None:
    _, port = served
    found = samples(scrape(port))
    d = "dev-a"
    assert value(found, "edgepart_agent_memory_used_bytes", device=d) == 3_500_000
    assert value(found, "edgepart_agent_memory_budget_bytes", device=d) == 64_000_000
    assert value(found, "edgepart_agent_kv_bytes", device=d) == 120_000
    assert value(found, "edgepart_agent_blocks", device=d) == 2
    assert value(found, "edgepart_link_sent_bytes_total", device=d, dst="dev-b") == 4096
    assert value(found, "edgepart_link_sent_bytes_total", device=d, dst="dev-c") == 100
    assert value(found, "edgepart_agent_received_bytes_total", device=d) == 2048
    assert value(found, "edgepart_agent_received_frames_total", device=d) == 5
    assert value(found, "edgepart_agent_dropped_messages_total", device=d, kind="cmd") == 1
    assert value(found, "edgepart_agent_dropped_messages_total", device=d, kind="placement") == 3
    assert value(found, "edgepart_agent_dropped_frames_total", device=d, kind="bad magic") == 2


def test_collector_reads_live_state(served, agent: StandIn) -> None:
    _, port = served
    agent.blocks.used = 7_000_000
    agent.blocks.budget = 48_000_000
    agent.blocks.host.kv = 0
    agent.blocks.host.blocks["L0.proj"] = object()
    agent.plane.bytes_sent["dev-d"] += 10
    agent.plane.bytes_received += 1
    agent.dropped_messages["cmd"] += 1
    found = samples(scrape(port))
    d = "dev-a"
    assert value(found, "edgepart_agent_memory_used_bytes", device=d) == 7_000_000
    assert value(found, "edgepart_agent_memory_budget_bytes", device=d) == 48_000_000
    assert value(found, "edgepart_agent_kv_bytes", device=d) == 0
    assert value(found, "edgepart_agent_blocks", device=d) == 3
    assert value(found, "edgepart_link_sent_bytes_total", device=d, dst="dev-d") == 10
    assert value(found, "edgepart_agent_received_bytes_total", device=d) == 2049
    assert value(found, "edgepart_agent_dropped_messages_total", device=d, kind="cmd") == 2


def test_scrapes_survive_concurrent_mutation(served, agent: StandIn) -> None:
    _, port = served
    stop = threading.Event()

    def mutate() -> None:
        i = 0
        while not stop.is_set():
            agent.plane.bytes_sent[f"peer-{i % 500}"] += 1
            agent.plane.bad_frames[f"reason-{i % 50}"] += 1
            agent.dropped_messages[f"kind-{i % 50}"] += 1
            if i % 1000 == 999:
                agent.plane.bytes_sent.clear()
            i += 1

    writer = threading.Thread(target=mutate)
    writer.start()
    try:
        for _ in range(10):
            # an HTTP 500 or a malformed exposition raises; the live series are all there
            names = {name for name, _labels in samples(scrape(port))}
            assert {"edgepart_agent_blocks", "edgepart_agent_memory_used_bytes"} <= names
    finally:
        stop.set()
        writer.join(10)


def test_a_read_racing_a_block_load_is_retried(served, agent: StandIn) -> None:
    _, port = served
    calls = []

    def racing() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("dictionary changed size during iteration")
        return 1234

    agent.blocks.used_bytes = racing  # type: ignore[method-assign]
    found = samples(scrape(port))
    assert value(found, "edgepart_agent_memory_used_bytes", device="dev-a") == 1234


def test_close_stops_serving(agent: StandIn) -> None:
    m = AgentMetrics(agent)
    port = m.serve(0)
    m.close()
    m.close()  # idempotent
    with pytest.raises(urllib.error.URLError):
        scrape(port)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_accepts_the_exposition(served) -> None:
    m, port = served
    m.step(step("embed", -1), 0.001)
    m.step(step("groups", 0), 0.002)
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
