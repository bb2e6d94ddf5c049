"""The switch planner: moves in waves whose targets have room, survivors before the lost."""

from __future__ import annotations

import numpy as np
import pytest

from edgepart.controller import cost
from edgepart.controller.switch import plan_moves, survivors_first
from edgepart.llm.blocks import block_table

CONTEXT = 8


@pytest.fixture
def table(tiny_spec):
    return block_table(tiny_spec)


def _room_for(table, make_view, assignment, spare_bytes):
    """A view (3 devices) whose memory is what ``assignment`` uses plus ``spare_bytes``."""
    roomy = make_view([1.0, 1.0, 1.0], [1e12] * 3)
    used = cost.memory_use(table, roomy, np.asarray(assignment), CONTEXT)
    return make_view([1.0, 1.0, 1.0], used + np.asarray(spare_bytes, dtype=float))


def test_a_block_leaves_a_full_device_before_another_moves_in(table, make_view) -> None:
    need = table.memory_bytes(CONTEXT)
    current = np.zeros(table.size, dtype=int)
    current[1] = 1  # block 1 on device 1, which has no room for anything more
    target = current.copy()
    target[0], target[1] = 1, 2  # block 0 to device 1 once block 1 left it for device 2
    view = _room_for(table, make_view, current, [0.0, 0.0, need[1]])
    assert plan_moves(current, target, view, table, CONTEXT) == [[1], [0]]


def test_a_full_cycle_of_swaps_goes_in_one_wave(table, make_view) -> None:
    current = np.zeros(table.size, dtype=int)
    current[1] = 1
    target = current.copy()
    target[0], target[1] = 1, 0  # a swap, with no room anywhere
    view = _room_for(table, make_view, current, [0.0, 0.0, 0.0])
    assert plan_moves(current, target, view, table, CONTEXT) == [[0, 1]]


def test_what_the_agents_report_beyond_the_table_counts(table, make_view) -> None:
    need = table.memory_bytes(CONTEXT)
    current = np.zeros(table.size, dtype=int)
    target = current.copy()
    target[[0, 1]] = 1
    view = _room_for(table, make_view, current, [0.0, need[0] + need[1], 0.0])
    assert plan_moves(current, target, view, table, CONTEXT) == [[0, 1]]
    # device 1's agent holds a block's worth more than the table counts: one fits at a time
    reported = cost.memory_use(table, view, current, CONTEXT) + np.array([0.0, need[1], 0.0])
    waves = plan_moves(current, target, view, table, CONTEXT, reported)
    assert waves == [[0], [1]]


def test_nothing_to_move_is_no_wave(table, make_view) -> None:
    current = np.zeros(table.size, dtype=int)
    assert plan_moves(current, current, make_view([1.0] * 3, [1e12] * 3), table, CONTEXT) == []


def test_the_survivors_move_first_and_the_lost_blocks_stay_put() -> None:
    current = np.array([0, 1, 2, 2])
    target = np.array([1, 0, 0, 1])
    lost = current == 2  # device 2 died
    assert survivors_first(current, target, lost).tolist() == [1, 0, 2, 2]
