"""Measured block speeds turned into the FLOPs the cost model charges.

A KV-group block of a small model spends most of its decode step in per-call
overhead, not arithmetic (on this repository's CI CPU ~110 us + 35 ns per cached
position for SmolLM2, against ~8 GFLOP/s on the large matmuls), so FLOPs / device
speed underestimates it several times. ``measure_gflops`` times each block type on
this CPU (``benchmarks/block_calibration.py`` and ``edgepart.llm.host_profile`` run it);
``calibrated_table`` replaces every block's FLOPs by its reference-equivalent FLOPs
(measured time x the reference's speed on the FFN), so the planners and the cost model,
unchanged, predict measured times on a device of ``compute_gflops`` = that reference
speed, and proportionally on others.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgepart.llm.blocks import (
    BlockKind,
    BlockTable,
    ffn_flops,
    group_flops,
    lm_head_flops,
    proj_flops,
)
from edgepart.llm.runtime import PartitionedModel
from edgepart.llm.torch_blocks import EmbedBlock, FFNBlock, HeadBlock, KVGroupBlock, ProjBlock

# The block types a profile needs, as keys of measure_gflops' result.
BLOCK_TYPES = ("group", "proj", "ffn", "head")
# LM-head calls per timed pass: one call is a few ms, several keep the timer's share small.
HEAD_CALLS_PER_PASS = 4


@dataclass(frozen=True)
class ComputeProfile:
    """Decode-step time of each block type on a reference CPU (s), linear in context n."""

    reference_gflops: float  # the CPU's speed on the FFN, GFLOP/s
    group_fixed_s: float
    group_per_context_s: float
    proj_s: float
    ffn_s: float
    head_s: float

    @classmethod
    def from_measurements(cls, table: BlockTable, gflops: dict[str, object]) -> ComputeProfile:
        """From per-type GFLOP/s as block_calibration.py writes them (group: {n: GFLOP/s})."""
        group = {int(n): float(v) for n, v in dict(gflops["group"]).items()}  # type: ignore[arg-type]
        if len(group) < 2:
            raise ValueError("the group speed needs at least two context lengths")
        gid = int(table.group_ids(0)[0])
        ns = np.array(sorted(group), dtype=float)
        times = np.array([float(table.flops(n)[gid]) / (group[int(n)] * 1e9) for n in ns])
        per_context, fixed = np.polyfit(ns, times, 1)
        flops = {
            "proj": float(table.flops_fixed[table.proj_id(0)]),
            "ffn": float(table.flops_fixed[table.ffn_id(0)]),
            "head": float(table.source_flops),
        }
        speed = {k: float(gflops[k]) * 1e9 for k in flops}  # type: ignore[arg-type]
        return cls(
            reference_gflops=speed["ffn"] / 1e9,
            group_fixed_s=float(fixed),
            group_per_context_s=float(per_context),
            proj_s=flops["proj"] / speed["proj"],
            ffn_s=flops["ffn"] / speed["ffn"],
            head_s=flops["head"] / speed["head"],
        )

    @classmethod
    def load(cls, path: str | Path, table: BlockTable) -> ComputeProfile:
        """From a block_calibration.json file measured for this table's model."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls.from_measurements(table, data["gflops"])


def calibrated_table(table: BlockTable, profile: ComputeProfile) -> BlockTable:
    """The table with each block's FLOPs replaced by reference-equivalent FLOPs."""
    ref = profile.reference_gflops * 1e9
    kind = table.kind
    fixed = np.select(
        [kind == BlockKind.HEADS, kind == BlockKind.PROJ, kind == BlockKind.FFN],
        [profile.group_fixed_s * ref, profile.proj_s * ref, profile.ffn_s * ref],
    )
    per_context = np.where(kind == BlockKind.HEADS, profile.group_per_context_s * ref, 0.0)
    return replace(
        table,
        flops_fixed=fixed.astype(np.float64),
        flops_per_context=per_context.astype(np.float64),
        source_flops=round(profile.head_s * ref),
    )


def gflops_only(measured: dict[str, Any]) -> dict[str, Any]:
    """The per-type GFLOP/s of a measure_gflops result, without its details."""
    return {k: measured[k] for k in BLOCK_TYPES}


def _time_passes(run_pass: Callable[[], None], warmup: int, reps: int) -> list[float]:
    """Wall times (s) of reps calls of run_pass after warmup untimed ones."""
    for _ in range(warmup):
        run_pass()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run_pass()
        out.append(time.perf_counter() - t0)
    return out


def _fill_caches(
    model: PartitionedModel, groups: Sequence[KVGroupBlock], n: int, seed: int
) -> None:
    """Every group holds n-1 random cached positions; the next token is position n-1."""
    g = torch.Generator().manual_seed(seed)
    h = groups[0].head_dim
    for block in groups:
        block.set_cache(
            torch.randn(n - 1, h, generator=g, dtype=block.dtype),
            torch.randn(n - 1, h, generator=g, dtype=block.dtype),
        )
    model.length = n - 1


def _counted(block: Any, call: Callable[[], Any]) -> int:
    """FLOPs a block's own counter adds during one call."""
    before = block.flops
    call()
    return block.flops - before


def _pass_entry(
    items: Sequence[Any], call: Callable[[Any], Any], flops: int, warmup: int, reps: int
) -> dict[str, Any]:
    """Timed passes of ``call`` over every block of ``items`` (model order, so weights stream
    from memory as in a decode step): pass times and per-block median time (s), formula and
    counter FLOPs."""

    def run_pass() -> None:
        for b in items:
            call(b)

    passes = _time_passes(run_pass, warmup, reps)
    return {
        "blocks_per_pass": len(items),
        "pass_s": passes,
        "block_s": float(np.median(passes)) / len(items),
        "flops": flops,
        "flops_counter": _counted(items[0], lambda: call(items[0])),
    }


def _group_entry(
    spec: Any, groups: Sequence[KVGroupBlock], x: torch.Tensor, n: int, warmup: int, reps: int
) -> dict[str, Any]:
    """The KV groups' pass at context n (caches filled to n-1 positions beforehand); each
    call is rolled back, so every repetition sees the same n."""

    def call(b: KVGroupBlock) -> None:
        b(x)
        b.length -= 1

    return _pass_entry(groups, call, int(group_flops(spec, n)), warmup, reps)


def _whole_token_entry(
    model: PartitionedModel, groups: Sequence[KVGroupBlock], warmup: int, reps: int
) -> dict[str, Any]:
    """Decode step times (s) of the whole model at its current context, rolled back."""

    def token_step() -> None:
        model.decode(1)
        for b in groups:
            b.length -= 1
        model.length -= 1

    steps = _time_passes(token_step, warmup, reps)
    return {"step_s": steps, "median_s": float(np.median(steps))}


def _check_measure_args(contexts: Sequence[int], warmup: int, reps: int) -> list[int]:
    """The sorted distinct contexts (ValueError on a bad argument)."""
    ns = sorted({int(n) for n in contexts})
    if not ns or ns[0] < 1:
        raise ValueError(f"contexts must be non-empty and at least 1, got {list(contexts)}")
    if reps < 1 or warmup < 0:
        raise ValueError(f"need reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    return ns


def measure_gflops(
    model: PartitionedModel,
    contexts: Sequence[int],
    warmup: int,
    reps: int,
    *,
    whole_token: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Effective GFLOP/s of each block type of a monolithic model on this CPU, decode mode (T=1).

    Returns {"group": {"<n>": GFLOP/s}, "proj", "ffn", "head": GFLOP/s} (what
    ``ComputeProfile.from_measurements`` reads) plus "blocks" (per type: pass times in s,
    per-block median time in s, formula and counter FLOPs; "embed" too), "block_counts" and,
    with ``whole_token``, "whole_token" ({"<n>": decode step times in s and their median}).
    One timed pass runs every block of the type in model order, so weights stream from
    memory as in a real decode step; a block's time is the median pass / blocks per pass.
    KV caches hold n-1 random positions and are rolled back after each call, so every
    repetition sees context n; the model is reset afterwards. Threads: torch's current.
    """
    if len(model.hosts) != 1:
        raise ValueError("measure_gflops needs a monolithic model (every block on one host)")
    ns = _check_measure_args(contexts, warmup, reps)
    say = progress or (lambda _msg: None)
    spec = model.arch.spec
    blocks = list(next(iter(model.hosts.values())).blocks.values())
    groups = [b for b in blocks if isinstance(b, KVGroupBlock)]
    projs = [b for b in blocks if isinstance(b, ProjBlock)]
    ffns = [b for b in blocks if isinstance(b, FFNBlock)]
    head = next(b for b in blocks if isinstance(b, HeadBlock))
    embed = next(b for b in blocks if isinstance(b, EmbedBlock))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, spec.d_model, generator=gen, dtype=model.dtype)
    heads_in = torch.randn(1, spec.heads * spec.head_dim, generator=gen, dtype=model.dtype)
    token = torch.tensor([1], dtype=torch.long)

    detail: dict[str, Any] = {"group": {}}
    steps_by_n: dict[str, Any] = {}
    try:
        with torch.no_grad():
            for n in ns:
                _fill_caches(model, groups, n, seed=n)
                entry = detail["group"][str(n)] = _group_entry(spec, groups, x, n, warmup, reps)
                line = f"n={n}: KV group {1e6 * entry['block_s']:.1f} us/block"
                if whole_token:
                    steps_by_n[str(n)] = _whole_token_entry(model, groups, warmup, reps)
                    line += f", whole token {1000 * steps_by_n[str(n)]['median_s']:.1f} ms"
                say(line)
            detail["proj"] = _pass_entry(
                projs, lambda b: b(heads_in, x), proj_flops(spec), warmup, reps
            )
            detail["ffn"] = _pass_entry(ffns, lambda b: b(x), ffn_flops(spec), warmup, reps)
            detail["head"] = _pass_entry(
                [head] * HEAD_CALLS_PER_PASS, lambda b: b(x), lm_head_flops(spec), warmup, reps
            )
            detail["head"]["blocks_per_pass"] = 1
            detail["head"]["note"] = f"one LM head, called {HEAD_CALLS_PER_PASS} times per pass"
            for kind in ("proj", "ffn", "head"):
                say(f"{kind}: {1e6 * detail[kind]['block_s']:.1f} us/block")
            passes = _time_passes(lambda: embed(token, 0), warmup, reps)
            detail["embed"] = {"block_s": float(np.median(passes)), "flops": 0}
    finally:
        model.reset()

    def speed(entry: dict[str, Any]) -> float:
        return entry["flops"] / entry["block_s"] / 1e9

    out: dict[str, Any] = {
        "group": {n: speed(e) for n, e in detail["group"].items()},
        "proj": speed(detail["proj"]),
        "ffn": speed(detail["ffn"]),
        "head": speed(detail["head"]),
        "blocks": detail,
        "block_counts": {"group": len(groups), "proj": len(projs), "ffn": len(ffns), "head": 1},
    }
    if whole_token:
        out["whole_token"] = steps_by_n
    return out
