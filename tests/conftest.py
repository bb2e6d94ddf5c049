"""Shared fixtures: a tiny model, resource-view factories and tiny scenario files."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import yaml

from controller.view import PlanningWindow, ResourceView
from device_agent.limits import kernel_oom_kills
from llm.model import ModelSpec

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = REPO / "scenarios"


_DELIBERATE: list[int] = []


@pytest.fixture
def deliberate_oom_kills() -> list[int]:
    """Where a test that makes the kernel OOM-kill on purpose (in its own cgroup) says so."""
    return _DELIBERATE


@pytest.fixture(scope="session", autouse=True)
def no_out_of_memory_kills():
    """No test may end in an out-of-memory kill, other than those made on purpose."""
    before = kernel_oom_kills()
    yield
    after = kernel_oom_kills()
    if before is not None and after is not None:
        assert after - before == sum(_DELIBERATE), (
            f"{after - before} out-of-memory kills during the tests, "
            f"{sum(_DELIBERATE)} of them on purpose"
        )


# 2 layers, 2 KV groups of 2 query heads (head_dim 16), SwiGLU, fp32: about 0.35 MiB in all.
TINY_SHAPES: dict[str, Any] = {
    "layers": 2,
    "d_model": 64,
    "heads": 4,
    "kv_heads": 2,
    "d_ff": 128,
    "vocab": 100,
    "dtype": "float32",
}

TINY_SCENARIO: dict[str, Any] = {
    "version": 1,
    "name": "tiny",
    "model": TINY_SHAPES,
    "prompt_tokens": 8,
    "generate_tokens": 20,
    "replan_every": 8,
    "weights_from": "disk",
    "devices": [
        {"name": "s", "compute_gflops": 20, "memory_mib": 64, "source": True},
        {"name": "a", "compute_gflops": 10, "memory_mib": 64},
        {"name": "b", "compute_gflops": 5, "memory_mib": 64},
    ],
    "links": {"default": {"bandwidth_mbit": 100, "latency_ms": 1}},
    "traces": [],
}


@pytest.fixture(scope="session")
def tiny_spec() -> ModelSpec:
    """The tiny model of TINY_SHAPES as a ModelSpec."""
    return ModelSpec("tiny", **TINY_SHAPES)


def _view(
    gflops,
    memory,
    *,
    bandwidth=100.0,
    latency=0.002,
    source: int = 0,
    alive=None,
    window: PlanningWindow | None = None,
    weights_from: str = "disk",
) -> ResourceView:
    d = len(gflops)
    return ResourceView(
        devices=tuple(f"d{i}" for i in range(d)),
        compute_gflops=np.asarray(gflops, dtype=float),
        memory_bytes=np.asarray(memory, dtype=float),
        bandwidth_mbit=np.broadcast_to(np.asarray(bandwidth, dtype=float), (d, d)).copy(),
        latency_s=np.broadcast_to(np.asarray(latency, dtype=float), (d, d)).copy(),
        source=source,
        window=window or PlanningWindow(8, 8, 64),
        weights_from=weights_from,  # type: ignore[arg-type]
        alive=None if alive is None else np.asarray(alive, dtype=bool),
    )


@pytest.fixture(scope="session")
def make_view() -> Callable[..., ResourceView]:
    """Factory: a view from per-device compute and memory, uniform (or given) links."""
    return _view


def _random_view(
    rng: np.random.Generator,
    devices: int,
    *,
    memory: float = 1e12,
    window: PlanningWindow | None = None,
    weights_from: str = "disk",
) -> ResourceView:
    """Random speeds (1-100 GFLOP/s), asymmetric bandwidths (1-1000 Mbit/s), latencies."""
    return _view(
        rng.uniform(1.0, 100.0, devices),
        np.full(devices, memory),
        bandwidth=rng.uniform(1.0, 1000.0, (devices, devices)),
        latency=rng.uniform(0.0, 0.01, (devices, devices)),
        source=int(rng.integers(devices)),
        window=window,
        weights_from=weights_from,
    )


@pytest.fixture(scope="session")
def random_view() -> Callable[..., ResourceView]:
    """Factory: random_view(rng, devices, memory=..., window=...) -> ResourceView."""
    return _random_view


@pytest.fixture(scope="session")
def scenario_data() -> Callable[..., dict[str, Any]]:
    """Factory: a deep copy of TINY_SCENARIO with top-level keys overridden."""

    def make(**overrides: Any) -> dict[str, Any]:
        data = copy.deepcopy(TINY_SCENARIO)
        data.update(copy.deepcopy(overrides))
        return data

    return make


class ReplayedMessages:
    """What an MQTT reading loop uses of a client: these (topic, payload) messages, in order;
    publishing does nothing (for feeding a loop exact bytes no broker would reorder)."""

    def __init__(self, messages: list[tuple[str, bytes]]) -> None:
        self.messages = self._iterate(messages)

    @staticmethod
    async def _iterate(messages: list[tuple[str, bytes]]):
        for topic, payload in messages:
            yield SimpleNamespace(topic=SimpleNamespace(value=topic), payload=payload)

    async def publish(self, *args: Any, **kwargs: Any) -> None:
        """Dropped: the loops under test only read."""


@pytest.fixture
def replayed() -> type[ReplayedMessages]:
    """Factory: a client-like object replaying messages to a reading loop."""
    return ReplayedMessages


@pytest.fixture
def write_scenario(tmp_path: Path) -> Callable[..., Path]:
    """Factory: write a scenario mapping as YAML into tmp_path and return the path."""

    def write(data: dict[str, Any], name: str = "scenario.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path

    return write
