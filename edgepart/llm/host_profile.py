"""This host's compute profile, measured on first use and cached per (model, threads, CPU, torch).

The emulator's ``local`` backend runs every emulated device as a process on one torch
thread, so it needs this CPU's block speeds at that thread count, and on a fresh machine
nothing has been measured yet. ``host_profile`` times the model once with
``edgepart.llm.calibration.measure_gflops`` (a few seconds in quick mode) and keeps the result in a
JSON file under the cache directory (``$EDGEPART_CACHE``, else
``$XDG_CACHE_HOME/edgepart``, else ``~/.cache/edgepart``); later calls read it. A cache
file that cannot be read, belongs to another key or holds implausible numbers is measured
again, never an error: it is only a cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgepart.llm.calibration import ComputeProfile, gflops_only, measure_gflops

# Bump when the file's content or the measurement changes meaning: old files are then stale.
CACHE_FORMAT = 1
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Settings:
    """How much to measure: KV-group context lengths, untimed and timed passes per point."""

    contexts: Sequence[int]
    warmup: int
    reps: int


# Quick: load + measure ~6 s on a 2-core EPYC at one thread, most of it loading the model;
# 15 reps keep the median stable enough to see the ~10% group-time rise from n=32 to 128.
QUICK = Settings(contexts=(32, 128), warmup=2, reps=15)
FULL = Settings(contexts=(32, 128, 512, 1024), warmup=3, reps=30)
# Measurements per call before giving up on a KV-group time that grows with context.
MEASURE_ATTEMPTS = 3
#: the share of the measurement's wall time the measuring thread must have run on a CPU
#: for the profile to be kept: less means another process took the CPU meanwhile, and a
#: slow profile kept would make every later emulation's devices too slow
BUSY_SHARE = 0.85


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_cache_dir() -> Path:
    """$EDGEPART_CACHE if set, else $XDG_CACHE_HOME/edgepart, else ~/.cache/edgepart."""
    explicit = os.environ.get("EDGEPART_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # the XDG spec says a relative XDG_CACHE_HOME is invalid and must be ignored
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "edgepart"


def cache_key(model_ref: str, threads: int) -> dict[str, Any]:
    """What a cached profile must match to be reused on this host."""
    return {
        "format": CACHE_FORMAT,
        "model": str(model_ref),
        "threads": int(threads),
        "cpu": cpu_name(),
        "torch": str(torch.__version__),
        "dtype": "float32",
    }


def cache_path(model_ref: str, threads: int, cache_dir: Path | None = None) -> Path:
    """The cache file of (model, threads, this CPU, this torch) under cache_dir."""
    key = cache_key(model_ref, threads)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    # model_ref may be a path: keep a readable tail of it, the digest tells keys apart
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(model_ref)).strip("._")[-40:] or "model"
    directory = cache_dir if cache_dir is not None else default_cache_dir()
    return Path(directory) / f"host-profile-{slug}-{threads}t-{digest}.json"


def _read_cache(path: Path, key: dict[str, Any], quick: bool) -> ComputeProfile | str:
    """The cached profile, or why the file cannot serve (a string)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "none yet"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"unreadable ({exc.__class__.__name__})"
    if not isinstance(data, dict) or data.get("key") != key:
        return "made for another model, thread count, CPU or torch"
    if not quick and data.get("settings", {}).get("quick", True):
        return "a quick measurement, a full one was asked for"
    try:
        stored = data["profile"]
        profile = ComputeProfile(**{f.name: float(stored[f.name]) for f in fields(ComputeProfile)})
        gflops = data["gflops"]
        speeds = [float(v) for v in gflops["group"].values()]
        speeds += [float(gflops[k]) for k in ("proj", "ffn", "head")]
        enough_contexts = len(gflops["group"]) >= 2
    except (KeyError, TypeError, ValueError, AttributeError):
        return "incomplete"
    times = list(asdict(profile).values())
    if not (enough_contexts and all(math.isfinite(v) and v > 0 for v in (*speeds, *times))):
        return "implausible numbers"
    return profile


def _write_atomically(path: Path, data: dict[str, Any]) -> None:
    """Write JSON so that a concurrent reader sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def cached_profile(model_ref: str = DEFAULT_MODEL, threads: int = 1,
                   cache_dir: Path | None = None) -> dict[str, Any] | None:
    """The cache file's content for (model, threads, this CPU), None if there is none usable:
    what ``edgepart calibrate --show`` prints (measured_at, load, cpu_share, speeds)."""
    key = cache_key(model_ref, threads)
    path = cache_path(model_ref, threads, cache_dir)
    if not isinstance(_read_cache(path, key, quick=True), ComputeProfile):
        return None
    return {"path": str(path), **json.loads(path.read_text(encoding="utf-8"))}


def _measure(
    model_ref: str, threads: int, settings: Settings, say: Callable[[str], None]
) -> tuple[ComputeProfile, dict[str, Any]]:
    """Open the model (float32, every block on one host) and measure it at ``threads``
    torch threads (restored afterwards): the profile and the cache file's content (its key
    aside), with the load and the measuring thread's share of a core."""
    from edgepart.llm.loader import (
        open_model,  # opening a model pulls in the GGUF reader: only on a miss
    )
    from edgepart.llm.runtime import monolithic

    t0 = time.perf_counter()
    om = open_model(model_ref)
    model = monolithic(om.source, om.arch, torch.float32)
    loaded_s = time.perf_counter() - t0
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    try:
        for attempt in range(1, MEASURE_ATTEMPTS + 1):
            measured = measure_gflops(model, settings.contexts, settings.warmup, settings.reps)
            gflops = gflops_only(measured)
            profile = ComputeProfile.from_measurements(model.table, gflops)
            if profile.group_per_context_s > 0:
                break
            # attention over more positions cannot be cheaper: another process took the CPU
            say(
                f"the KV-group time fell with context (attempt {attempt} of "
                f"{MEASURE_ATTEMPTS}); is the CPU busy?"
            )
    finally:
        torch.set_num_threads(previous)
    # with one thread the measuring thread is all the work: its CPU time over the wall time
    # is the share of a core it got; more threads share their work, so only one is judged
    cpu_share = (time.thread_time() - cpu0) / max(1e-9, time.perf_counter() - wall0)
    data = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {
            "quick": settings is QUICK,
            "contexts": list(settings.contexts),
            "warmup": settings.warmup,
            "reps": settings.reps,
        },
        "duration_s": {"load": loaded_s, "total": time.perf_counter() - t0},
        "load_average_1min": load_average,
        "cpu_share": cpu_share,
        "gflops": gflops,
        "profile": asdict(profile),
    }
    return profile, data


def _kept(
    profile: ComputeProfile, data: dict[str, Any], path: Path, threads: int
) -> tuple[ComputeProfile, str]:
    """The profile to use and where it went: cached, unless the CPU was busy while it was
    measured or its KV-group time fell with context (then flat, for this run only)."""
    cpu_share = data["cpu_share"]
    if threads == 1 and cpu_share < BUSY_SHARE:
        return profile, (
            f"the CPU was busy (this measurement ran {100 * cpu_share:.0f} % of the time); "
            "not cached, the next call measures again"
        )
    if profile.group_per_context_s <= 0:
        # A falling line would turn negative at long contexts: keep its mean, flat, for this
        # run only (a least-squares line passes through the mean of the points).
        mean_n = float(np.mean([int(n) for n in data["gflops"]["group"]]))
        flat = replace(
            profile,
            group_fixed_s=profile.group_fixed_s + profile.group_per_context_s * mean_n,
            group_per_context_s=0.0,
        )
        return flat, "KV-group time taken as flat; not cached, the next call measures again"
    try:
        _write_atomically(path, data)
        return profile, f"cached in {path}"
    except OSError as exc:
        # an unwritable cache costs a re-measurement next time, not this run
        return profile, f"not cached ({exc})"


def host_profile(
    model_ref: str = DEFAULT_MODEL,
    threads: int = 1,
    cache_dir: Path | None = None,
    quick: bool = True,
    progress: Callable[[str], None] | None = None,
    force: bool = False,
    out: Path | None = None,
) -> ComputeProfile:
    """This CPU's block times (s) for model_ref at `threads` torch threads; cached, else measured.

    A miss opens the model (float32, every block on one host), measures it with the torch
    thread count set to ``threads`` (restored afterwards) and writes the cache file,
    holding the profile and the raw GFLOP/s ``ComputeProfile.from_measurements`` reads.
    A quick request accepts a full measurement from the cache; a full one re-measures a
    quick file. If the KV-group time never grows with context (a busy CPU), the profile
    returned has a flat group time and is not cached; nor is one measured while another
    process took the CPU (the measuring thread ran less than BUSY_SHARE of the time).
    ``force`` measures even when a profile is cached. ``progress`` receives status lines.
    ``out``: also write the profile's file there (what ``--profile`` reads), cached or not:
    a measurement on a busy CPU serves this run's roles without being kept for later ones.
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    say = progress or (lambda _msg: None)
    key = cache_key(model_ref, threads)
    path = cache_path(model_ref, threads, cache_dir)
    cached = "asked to measure again" if force else _read_cache(path, key, quick)
    if isinstance(cached, ComputeProfile):
        if out is not None:
            _write_atomically(out, json.loads(path.read_text(encoding="utf-8")))
        return cached
    if cached != "none yet":
        say(f"ignoring the cached profile {path}: {cached}")

    settings = QUICK if quick else FULL
    say(f"calibrating {model_ref} on this CPU ({threads} thread{'' if threads == 1 else 's'})...")
    profile, data = _measure(model_ref, threads, settings, say)
    data = {"key": key, **data}
    if out is not None:
        _write_atomically(out, data)
    profile, where = _kept(profile, data, path, threads)
    total_s = data["duration_s"]["total"]
    say(
        f"calibrated in {total_s:.1f} s: {profile.reference_gflops:.2f} GFLOP/s on the FFN, "
        f"KV group {1e6 * profile.group_fixed_s:.0f} us + "
        f"{1e9 * profile.group_per_context_s:.0f} ns x context; {where}"
    )
    return profile
