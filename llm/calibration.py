"""Measured block speeds turned into the FLOPs the cost model charges.

A KV-group block of a small model spends most of its decode step in per-call
overhead, not arithmetic (on this repository's CI CPU ~110 us + 35 ns per cached
position for SmolLM2, against ~8 GFLOP/s on the large matmuls), so FLOPs / device
speed underestimates it several times. ``block_calibration.py`` measures each block
type on a reference CPU; ``calibrated_table`` replaces every block's FLOPs by its
reference-equivalent FLOPs (measured time x the reference's speed on the FFN), so the
planners and the cost model, unchanged, predict measured times on a device of
``compute_gflops`` = that reference speed, and proportionally on others.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from llm.blocks import BlockKind, BlockTable


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
