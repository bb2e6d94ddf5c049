"""How a switch between placements is carried out: the moves in waves that fit (pure).

A block moves by migration: its target loads it, then its source frees it. Between waves
no token runs, and each wave ends in an acknowledged epoch, so a wave may only move blocks
whose targets hold them on top of what they hold now; the blocks leaving a device make
room for the next wave. ``plan_moves`` orders the moves so; the controller carries the
waves out. After devices died, ``survivors_first`` is the placement to reach before the
lost blocks load again: the survivors' moves first free the room the lost blocks need.
"""

from __future__ import annotations

import numpy as np

from controller import cost
from controller.view import ResourceView
from llm.blocks import BlockTable


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
