"""Shared fixtures: a tiny model, resource-view factories and tiny scenario files."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import yaml

from edgepart.controller.view import PlanningWindow, ResourceView
from edgepart.device_agent.burners import Burners
from edgepart.emulator.host_limits import kernel_oom_kills
from edgepart.llm.model import ModelSpec

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = REPO / "scenarios"


_DELIBERATE: list[int] = []
#: under CI=true a skipped test fails (tests/ci_skips.py)
pytest_plugins = ("ci_skips",)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF (`make model` fetches it)."""
    from edgepart.llm.files import preset_file

    try:
        return preset_file("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def transformers_smollm2(smollm2_path: Path) -> Any:
    """transformers' float32 model of that GGUF, the reference of the engine, loader and
    CLI tests: loaded once (it dequantises for 15 s), used read-only."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def tiny_live_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama (4 layers, 4 heads in 2 KV groups, d_model 128) with a byte-level
    tokenizer, as a Hugging Face folder: for live runs whose subject is the control flow,
    not the model; it loads and computes in milliseconds where SmolLM2 takes seconds."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("tiny-live")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer, tokenizer.decoder = byte_level, decoders.ByteLevel()
    tokenizer.save(str(folder / "tokenizer.json"))
    config = transformers.LlamaConfig(
        hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
        intermediate_size=256, vocab_size=len(vocab), tie_word_embeddings=False,
        rope_theta=10000.0, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        initializer_range=0.2,  # wide weights: the greedy continuation varies
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session", autouse=True)
def own_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """The tests calibrate and cache weights in a directory of their own, never the user's
    ~/.cache/edgepart: a profile measured there under load would change every later run.
    Only the fetched checkpoints (``models/``, read-only to the tests) are shared."""
    from edgepart.llm.files import models_dir

    before = os.environ.get("EDGEPART_CACHE")
    fetched = models_dir()
    own = tmp_path_factory.mktemp("edgepart-cache")
    if fetched.is_dir():
        (own / "models").symlink_to(fetched, target_is_directory=True)
    os.environ["EDGEPART_CACHE"] = str(own)
    yield
    if before is None:
        os.environ.pop("EDGEPART_CACHE", None)
    else:
        os.environ["EDGEPART_CACHE"] = before


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


# ------------------------------------------------------- child processes and their CPU use

# Busy until its parent (pytest) goes, so a crashed run leaves no spinning process behind.
_BUSY = (
    "import os, sys\n"
    "parent = int(sys.argv[1])\n"
    "while os.getppid() == parent:\n"
    "    for _ in range(10000):\n"
    "        pass\n"
)


class Processes:
    """Checks on child processes and the CPU they use (tests of cgroups and burners)."""

    WINDOW_S = 1.0  # wall time of one CPU-rate measurement
    POLL_S = 0.05
    TOLERANCE = 0.05  # cores
    ATTEMPTS = 3  # a loaded host may starve one window; too much CPU is never excused
    TIMEOUT_S = 10.0  # bound on any wait for a process to start or die

    @classmethod
    def reap(cls, proc: subprocess.Popen[bytes]) -> None:
        """Kill proc if it still runs, and wait for it."""
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=cls.TIMEOUT_S)

    @staticmethod
    def gone_or_zombie(pid: int) -> bool:
        """Whether process pid has exited (reaped or not)."""
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return True
        return stat.rpartition(")")[2].split()[0] == "Z"

    @classmethod
    def wait_until(cls, condition: Callable[[], bool], what: str) -> None:
        """Poll condition until true; fail the test after TIMEOUT_S."""
        deadline = time.monotonic() + cls.TIMEOUT_S
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(cls.POLL_S)

    @classmethod
    def cpu_rate(cls, read_cpu_s: Callable[[], float]) -> float:
        """CPU time per wall second (cores) of read_cpu_s over one window."""
        start, used0 = time.monotonic(), read_cpu_s()
        # a deadline loop: a late wake-up lengthens the window instead of skewing the result
        while time.monotonic() - start < cls.WINDOW_S:
            time.sleep(cls.POLL_S)
        used1, end = read_cpu_s(), time.monotonic()
        return (used1 - used0) / (end - start)

    @classmethod
    def assert_cpu_rate(cls, read_cpu_s: Callable[[], float], expected: float) -> float:
        """Measure until within expected +- TOLERANCE cores; retried only when too low."""
        rates: list[float] = []
        for _ in range(cls.ATTEMPTS):
            rate = cls.cpu_rate(read_cpu_s)
            rates.append(rate)
            if abs(rate - expected) <= cls.TOLERANCE:
                return rate
            if rate > expected + cls.TOLERANCE:
                break
        pytest.fail(f"CPU rates {rates} cores, expected {expected} +- {cls.TOLERANCE}")


@pytest.fixture(scope="session")
def processes() -> type[Processes]:
    """Checks on child processes: reap, gone_or_zombie, wait_until, assert_cpu_rate."""
    return Processes


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Factory of Python children (busy by default) with our pid as their argv[1], every
    one killed and reaped at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(
        code: str = _BUSY,
        *,
        stdin: int | None = None,
        stdout: int | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(os.getpid())], stdin=stdin, stdout=stdout, cwd=cwd
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        Processes.reap(proc)


@pytest.fixture
def burners() -> Iterator[Callable[..., Burners]]:
    """Factory of Burners (cores, optional process group), every one stopped at teardown."""
    made: list[Burners] = []

    def make(cores: float, cgroup=None) -> Burners:
        made.append(Burners(cores, cgroup))
        return made[-1]

    yield make
    for b in made:
        b.stop()


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
