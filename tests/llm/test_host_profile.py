"""The host profile: measured once on the real model, then read from the cache.

One test times SmolLM2-135M for real (a quick profile, a few seconds); the others replace
the measurement by made-up speeds and the model by its block table, so they test the
cache's rules, not the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")

from edgepart.llm import host_profile as hp  # noqa: E402
from edgepart.llm.blocks import block_table  # noqa: E402
from edgepart.llm.calibration import ComputeProfile  # noqa: E402
from edgepart.llm.files import preset_file  # noqa: E402
from edgepart.llm.model import preset  # noqa: E402

MODEL = "smollm2-135m"
TABLE = block_table(preset(MODEL))
GID = int(TABLE.group_ids(0)[0])


def made_up_gflops(per_context_s: float = 100e-9) -> dict[str, Any]:
    """Speeds of a CPU whose KV group takes 110 us + per_context_s x n."""
    group = {
        str(n): float(TABLE.flops(n)[GID]) / (110e-6 + per_context_s * n) / 1e9 for n in (32, 128)
    }
    return {"group": group, "proj": 7.0, "ffn": 8.0, "head": 7.5}


FAKE_MEASURE_S = 0.02  # CPU a made-up measurement spends (s)
REAL_BUSY_SHARE = hp.BUSY_SHARE


@pytest.fixture
def any_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """What other processes on this host do must not decide a test about caching: every
    share of a core counts as idle (the busy test sets the real threshold back)."""
    monkeypatch.setattr(hp, "BUSY_SHARE", 0.0)


def _spin(seconds: float) -> None:
    """Keep this thread on the CPU for ``seconds`` of its own CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, any_load: None) -> SimpleNamespace:
    """No model opened; measurement i has KV-group slope slopes[i] (s/position, last repeats)."""
    slopes: list[float] = []
    calls: list[float] = []

    def measure(model, contexts, warmup, reps, **_kw):
        slope = slopes[min(len(calls), len(slopes) - 1)] if slopes else 100e-9
        calls.append(slope)
        _spin(FAKE_MEASURE_S)  # a measurement keeps its thread busy: the busy check sees it
        return {**made_up_gflops(slope), "blocks": {}, "block_counts": {}}

    monkeypatch.setattr(hp, "measure_gflops", measure)
    opened = SimpleNamespace(source=0, arch=0)
    monkeypatch.setattr("edgepart.llm.loader.open_model", lambda _ref: opened)
    monkeypatch.setattr("edgepart.llm.runtime.monolithic", lambda *a: SimpleNamespace(table=TABLE))
    return SimpleNamespace(slopes=slopes, calls=calls)


def test_first_call_measures_and_caches_then_the_cache_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, any_load: None
) -> None:
    try:
        preset_file(MODEL)
    except FileNotFoundError as exc:  # pragma: no cover - depends on the environment
        pytest.skip(str(exc))
    real = hp.measure_gflops
    threads_seen: list[int] = []

    def counting(*args, **kwargs):
        threads_seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(hp, "measure_gflops", counting)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    messages: list[str] = []
    try:
        profile = hp.host_profile(MODEL, threads=1, cache_dir=tmp_path, progress=messages.append)
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)
    assert threads_seen and set(threads_seen) == {1}
    assert messages[0] == "calibrating smollm2-135m on this CPU (1 thread)..."
    assert any(m.startswith("calibrated in") and "cached in" in m for m in messages), messages

    for value in (
        profile.reference_gflops,
        profile.group_fixed_s,
        profile.proj_s,
        profile.ffn_s,
        profile.head_s,
    ):
        assert value > 0
    assert profile.group_per_context_s > 0  # a KV group takes longer at a longer context
    assert profile.group_fixed_s + 128 * profile.group_per_context_s > (
        profile.group_fixed_s + 32 * profile.group_per_context_s
    )

    path = hp.cache_path(MODEL, 1, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    data = json.loads(path.read_text())
    assert data["key"]["threads"] == 1 and data["key"]["torch"] == str(torch.__version__)
    assert set(data["gflops"]["group"]) == {"32", "128"}
    rebuilt = ComputeProfile.from_measurements(TABLE, data["gflops"])
    for name, value in vars(rebuilt).items():
        assert value == pytest.approx(getattr(profile, name), rel=1e-9)

    measured = len(threads_seen)  # a busy CPU may have taken more than one measurement
    mtime = path.stat().st_mtime_ns
    messages.clear()
    again = hp.host_profile(MODEL, threads=1, cache_dir=tmp_path, progress=messages.append)
    assert again == profile
    assert len(threads_seen) == measured  # not measured again
    assert path.stat().st_mtime_ns == mtime and messages == []


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "",
        "[]",
        '{"key": {}}',
        "WRONG_TORCH",
        "NEGATIVE",
        "MISSING_GFLOPS",
    ],
)
def test_a_corrupt_or_mismatching_cache_is_measured_again(
    tmp_path: Path, fake: SimpleNamespace, content: str
) -> None:
    first = hp.host_profile(MODEL, cache_dir=tmp_path)
    path = hp.cache_path(MODEL, 1, tmp_path)
    data = json.loads(path.read_text())
    if content == "WRONG_TORCH":
        data["key"]["torch"] = "0.0.1"
        content = json.dumps(data)
    elif content == "NEGATIVE":
        data["profile"]["ffn_s"] = -1.0
        content = json.dumps(data)
    elif content == "MISSING_GFLOPS":
        del data["gflops"]
        content = json.dumps(data)
    path.write_text(content)
    messages: list[str] = []
    again = hp.host_profile(MODEL, cache_dir=tmp_path, progress=messages.append)
    assert len(fake.calls) == 2
    assert again == first
    assert messages[0].startswith(f"ignoring the cached profile {path}")
    assert json.loads(path.read_text())["profile"] == asdict(first)  # repaired


def test_keys_get_their_own_files_and_a_full_request_skips_a_quick_file(
    tmp_path: Path, fake: SimpleNamespace
) -> None:
    hp.host_profile(MODEL, threads=1, cache_dir=tmp_path)
    hp.host_profile(MODEL, threads=2, cache_dir=tmp_path)
    assert len(fake.calls) == 2 and len(list(tmp_path.iterdir())) == 2
    hp.host_profile(MODEL, threads=1, cache_dir=tmp_path, quick=False)  # quick file: re-measure
    hp.host_profile(MODEL, threads=1, cache_dir=tmp_path, quick=False)  # now a full one
    hp.host_profile(MODEL, threads=1, cache_dir=tmp_path)  # a full file serves quick requests
    assert len(fake.calls) == 3


def test_a_busy_cpu_is_measured_again_and_a_flat_fallback_is_not_cached(
    tmp_path: Path, fake: SimpleNamespace
) -> None:
    fake.slopes[:] = [-50e-9, 80e-9]
    profile = hp.host_profile(MODEL, cache_dir=tmp_path)
    assert len(fake.calls) == 2
    assert profile.group_per_context_s == pytest.approx(80e-9, rel=1e-6)
    assert hp.cache_path(MODEL, 1, tmp_path).exists()

    fake.calls.clear()
    fake.slopes[:] = [-50e-9]
    busy = tmp_path / "busy"
    messages: list[str] = []
    flat = hp.host_profile(MODEL, cache_dir=busy, progress=messages.append)
    assert len(fake.calls) == hp.MEASURE_ATTEMPTS
    assert flat.group_per_context_s == 0.0
    # the flat time is the mean of the measured group times at n=32 and 128
    assert flat.group_fixed_s == pytest.approx(110e-6 - 50e-9 * 80, rel=1e-6)
    assert any("not cached" in m for m in messages)
    assert not busy.exists() or not any(busy.iterdir())


def test_out_gets_the_profile_file_cached_or_measured_on_a_busy_cpu(
    tmp_path: Path, fake: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a testbed's start-up on a busy host: the measurement serves this run's roles, uncached
    monkeypatch.setattr(hp, "BUSY_SHARE", 2.0)  # no measurement counts as idle
    out = tmp_path / "project" / "profile.json"
    busy = hp.host_profile(MODEL, cache_dir=tmp_path / "cache", out=out)
    assert not hp.cache_path(MODEL, 1, tmp_path / "cache").exists()
    assert ComputeProfile.load(out, TABLE) == busy
    # a cached profile is copied as it is
    monkeypatch.setattr(hp, "BUSY_SHARE", 0.0)
    hp.host_profile(MODEL, cache_dir=tmp_path / "cache", force=True)
    cached = hp.cache_path(MODEL, 1, tmp_path / "cache")
    hp.host_profile(MODEL, cache_dir=tmp_path / "cache", out=out)
    assert json.loads(out.read_text()) == json.loads(cached.read_text())


def test_an_unwritable_cache_still_returns_the_profile(
    tmp_path: Path, fake: SimpleNamespace
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    messages: list[str] = []
    profile = hp.host_profile(MODEL, cache_dir=blocker, progress=messages.append)
    assert profile.reference_gflops == pytest.approx(8.0)
    assert any("not cached" in m for m in messages)


def test_the_default_cache_dir_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: SimpleNamespace
) -> None:
    monkeypatch.delenv("EDGEPART_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hp.default_cache_dir() == tmp_path / "xdg" / "edgepart"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert hp.default_cache_dir() == Path.home() / ".cache" / "edgepart"
    monkeypatch.setenv("EDGEPART_CACHE", str(tmp_path / "mine"))
    assert hp.default_cache_dir() == tmp_path / "mine"
    hp.host_profile(MODEL)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == [hp.cache_path(MODEL, 1).name]
    assert hp.cache_path(MODEL, 1).name.startswith("host-profile-smollm2-135m-1t-")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity")
def test_a_profile_measured_while_another_process_takes_the_cpu_is_not_cached(
    tmp_path: Path, fake: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A busy loop on the same core gets about half of it: the profile is used for this
    run only, never written (it would slow every later emulation's devices)."""
    monkeypatch.setattr(sys.modules[__name__], "FAKE_MEASURE_S", 0.3)
    monkeypatch.setattr(hp, "BUSY_SHARE", REAL_BUSY_SHARE)
    cpu = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    burner = subprocess.Popen(
        [sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"]
    )
    os.sched_setaffinity(0, {cpu})
    try:
        messages: list[str] = []
        hp.host_profile(MODEL, cache_dir=tmp_path, progress=messages.append)
    finally:
        os.sched_setaffinity(0, before)
        burner.kill()
        burner.wait()
    assert any("the CPU was busy" in m and "not cached" in m for m in messages)
    assert hp.cached_profile(MODEL, 1, tmp_path) is None


def test_force_measures_again_and_show_tells_when_and_how_busy(
    tmp_path: Path, fake: SimpleNamespace
) -> None:
    hp.host_profile(MODEL, cache_dir=tmp_path)
    hp.host_profile(MODEL, cache_dir=tmp_path)
    assert len(fake.calls) == 1
    hp.host_profile(MODEL, cache_dir=tmp_path, force=True)
    assert len(fake.calls) == 2
    shown = hp.cached_profile(MODEL, 1, tmp_path)
    assert shown is not None and shown["path"] == str(hp.cache_path(MODEL, 1, tmp_path))
    assert 0 < shown["cpu_share"] <= 1.05 and "measured_at" in shown
    assert "load_average_1min" in shown
