"""How a switch between placements is carried out: its moves in waves, priced (pure).

A switch has two phases (docs/design.md: migration). Prepare: each target builds the
blocks it receives, beside those it holds, while tokens go on; commit, at a token
boundary: each source sends the moved KV caches and an epoch names the new holders. A
target must hold its incoming blocks on top of what it holds until the commit frees their
sources, so a wave may only move blocks whose targets have room for them then; the blocks
leaving a device make room for the next wave. ``plan_switch`` orders the moves so and
prices every wave (prepare in the background, commit as the stall); the simulator and the
live controller carry the same plan out. After devices died, ``survivors_first`` is the
placement to reach before the lost blocks load again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgepart.controller import cost
from edgepart.controller.view import ResourceView
from edgepart.llm.blocks import BlockTable


def plan_moves(
    current: np.ndarray,
    target: np.ndarray,
    view: ResourceView,
    table: BlockTable,
    context: int,
    reported_bytes: np.ndarray | None = None,
) -> list[list[int]]:
    """The blocks that change device (indices into ``table``), in waves, each carried out
    after the one before it was acknowledged.

    A wave takes, in block order, the moves whose targets hold them on top of what they
    hold then (the table's count at ``context`` cached positions, or what the agents
    report, ``reported_bytes`` per device, when more: a cache may have grown beyond the
    table's count); a block is counted on its source until its wave is done. When no move
    fits (a full cycle of swaps) the wave takes every move left and lets the agents judge.
    """
    current = np.asarray(current).copy()
    target = np.asarray(target)
    need = table.memory_bytes(context)
    # what the agents hold beyond the table's count, assumed to stay while blocks move
    extra = np.zeros(view.size)
    if reported_bytes is not None:
        extra = np.maximum(0.0, reported_bytes - cost.memory_use(table, view, current, context))
    remaining = np.flatnonzero(target != current).tolist()
    waves: list[list[int]] = []
    while remaining:
        used = cost.memory_use(table, view, current, context).astype(float) + extra
        wave = []
        for b in remaining:
            t = target[b]
            if used[t] + need[b] <= view.memory_bytes[t]:
                used[t] += need[b]
                wave.append(b)
        wave = wave or remaining  # a full cycle of swaps: let the agents judge
        waves.append(wave)
        current[wave] = target[wave]
        remaining = [b for b in remaining if b not in set(wave)]
    return waves


def survivors_first(current: np.ndarray, target: np.ndarray, lost: np.ndarray) -> np.ndarray:
    """The placement between ``current`` and ``target`` after devices died: the surviving
    blocks at their targets, the ``lost`` ones (a mask) still where they were."""
    interim = np.asarray(target).copy()
    interim[lost] = np.asarray(current)[lost]
    return interim


@dataclass(frozen=True)
class Wave:
    """Moves prepared together and committed together: block indices, their predicted
    prepare time (s, in the background) and commit stall (s)."""

    blocks: tuple[int, ...]
    prepare_s: float
    commit_s: float


@dataclass(frozen=True)
class SwitchPlan:
    """A switch from ``current`` to ``target`` in waves, carried out one after another."""

    current: np.ndarray
    target: np.ndarray
    waves: tuple[Wave, ...]

    @property
    def blocks(self) -> int:
        """Blocks the switch moves."""
        return sum(len(w.blocks) for w in self.waves)

    @property
    def prepare_s(self) -> float:
        """Predicted time (s) the targets build blocks, over all waves."""
        return sum(w.prepare_s for w in self.waves)

    @property
    def commit_s(self) -> float:
        """Predicted stall (s) of all the switch's commits."""
        return sum(w.commit_s for w in self.waves)


def plan_switch(
    current: np.ndarray,
    target: np.ndarray,
    view: ResourceView,
    table: BlockTable,
    context: int,
    reported_bytes: np.ndarray | None = None,
) -> SwitchPlan:
    """The switch's waves (``plan_moves``), each priced: its prepare (``cost.prepare_s``) and
    its commit at ``context`` cached positions (``cost.commit_s``)."""
    start = np.asarray(current).copy()
    current = start.copy()
    target = np.asarray(target)
    waves = []
    for blocks in plan_moves(current, target, view, table, context, reported_bytes):
        after = current.copy()
        after[blocks] = target[blocks]
        waves.append(
            Wave(
                blocks=tuple(int(b) for b in blocks),
                prepare_s=float(cost.prepare_s(table, view, current, after)),
                commit_s=float(cost.commit_s(table, view, current, after, context)),
            )
        )
        current = after
    return SwitchPlan(start, target.copy(), tuple(waves))
