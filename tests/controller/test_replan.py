"""When the live controller switches placements: only for a gain above the jitter."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from edgepart.controller.cost import migration_s, per_token_s
from edgepart.controller.replan import (
    LIVE_MIN_GAIN,
    ReplanPolicy,
    planning_window,
    worth_switching,
)
from edgepart.controller.switch import plan_switch
from edgepart.controller.view import PlanningWindow, ResourceView
from edgepart.llm.blocks import block_table
from edgepart.llm.model import ModelSpec

SPEC = ModelSpec(
    name="tiny", layers=2, d_model=64, heads=4, kv_heads=2, d_ff=128, vocab=100, dtype="float32"
)
TABLE = block_table(SPEC)


def _view(fast: float, slow: float, memory: float = 1e9) -> ResourceView:
    """Two devices on a link so fast that only compute tells placements apart."""
    d = 2
    return ResourceView(
        devices=("a", "b"),
        compute_gflops=np.array([fast, slow]),
        memory_bytes=np.full(d, memory),
        bandwidth_mbit=np.full((d, d), 1e9),
        latency_s=np.zeros((d, d)),
        source=0,
        window=PlanningWindow(16, 8, 64),
    )


def test_staying_put_is_never_a_switch() -> None:
    x = np.zeros(TABLE.size, dtype=np.int64)
    assert not worth_switching(TABLE, _view(2.0, 1.0), x, x)


@given(st.floats(1.5, 50.0))
def test_leaving_a_much_slower_device_is_worth_it(ratio: float) -> None:
    on_slow = np.ones(TABLE.size, dtype=np.int64)
    on_fast = np.zeros(TABLE.size, dtype=np.int64)
    assert worth_switching(TABLE, _view(ratio, 1.0), on_fast, on_slow)


def test_a_gain_within_the_jitter_is_not_worth_a_migration() -> None:
    on_b = np.ones(TABLE.size, dtype=np.int64)
    on_a = np.zeros(TABLE.size, dtype=np.int64)
    # a is faster by less than the margin: the migration plus the jitter eat the gain
    assert not worth_switching(TABLE, _view(1.0 + LIVE_MIN_GAIN / 2, 1.0), on_a, on_b)


def test_a_placement_that_does_not_fit_is_never_chosen_and_always_left() -> None:
    everything = float(TABLE.memory_bytes(64).sum())
    view = _view(1.0, 1.0, memory=0.75 * everything)  # neither device holds it all
    split = (np.arange(TABLE.size) >= TABLE.size // 2).astype(np.int64)  # a layer each
    on_a = np.zeros(TABLE.size, dtype=np.int64)
    assert worth_switching(TABLE, view, split, on_a)
    assert not worth_switching(TABLE, view, on_a, split)


@given(st.integers(0, 200), st.integers(1, 16), st.integers(0, 200))
def test_a_switch_may_pay_back_over_the_rest_of_the_generation(
    context: int, every: int, left: int
) -> None:
    window = planning_window(context, every, context + left)
    assert window.horizon_tokens == max(1, left)  # never beyond the generation's end
    assert window.interval_tokens == every


def test_a_move_too_dear_for_one_interval_pays_over_the_rest() -> None:
    on_b = np.ones(TABLE.size, dtype=np.int64)
    on_a = np.zeros(TABLE.size, dtype=np.int64)
    view = _view(1.5, 1.0)
    gain = float(per_token_s(TABLE, view, on_b, 20) - per_token_s(TABLE, view, on_a, 20))
    # every block crosses one link in turn: the move costs about 50 tokens' gain
    view = replace(view, move_s_per_block=50 * gain / TABLE.size)
    move = float(migration_s(TABLE, view, on_b, on_a, 16))
    assert 8 * gain < move < 200 * gain  # the premise
    one_interval = view.at(PlanningWindow(16, 8, 216))
    assert not worth_switching(TABLE, one_interval, on_a, on_b)
    assert worth_switching(TABLE, view.at(planning_window(16, 8, 216)), on_a, on_b)


# ----------------------------------------------------------------- the shared policy


def _policy() -> ReplanPolicy:
    return ReplanPolicy(every=8, final_context=16 + 64)


def test_nothing_changing_replans_only_on_schedule() -> None:
    policy = _policy()
    view = _view(2.0, 1.0)
    due = []
    for token in range(1, 40):
        policy.observe(token, view)
        if policy.due(token, view):
            due.append(token)
            policy.decided(view)
    assert due == [8, 16, 24, 32]


def test_first_measurements_after_start_up_start_no_replan() -> None:
    policy = _policy()
    policy.observe(0, _view(2.0, 1.0))
    measured = _view(1.4, 1.3)  # both off the configured speeds by > 20 %
    policy.observe(1, measured)
    assert not policy.due(1, measured)
    policy.observe(3, measured)
    assert not policy.due(3, measured)
    assert policy.history.lengths == []


def test_a_change_after_start_up_starts_a_replan() -> None:
    policy = _policy()
    for token in range(4):
        policy.observe(token, _view(2.0, 1.0))
    loaded = _view(2.0, 0.4)
    policy.observe(5, loaded)
    assert policy.due(5, loaded)


def test_no_unforced_switch_within_an_interval_of_the_last() -> None:
    policy = _policy()
    view = _view(2.0, 1.0)
    for token in range(8):
        policy.observe(token, view)
    policy.switched(8, forced=False)
    changed = _view(2.0, 0.2)
    for token in range(9, 16):
        policy.observe(token, changed)
        assert not policy.due(token, changed)
    policy.observe(16, changed)
    assert policy.due(16, changed)


def test_the_horizon_is_cut_to_how_long_changes_last() -> None:
    policy = _policy()
    for token in range(4):
        policy.observe(token, _view(2.0, 1.0))
    assert policy.window(4, 20).horizon_tokens == 24  # three intervals before any change
    policy.observe(10, _view(2.0, 0.3))
    policy.observe(14, _view(2.0, 1.0))  # a load of 4 tokens
    assert policy.history.lengths == [4]
    assert policy.window(14, 30).payback_tokens == 4  # the one episode seen
    assert policy.window(14, 30).horizon_tokens == 8  # a placement is kept an interval
    assert policy.window(70, 78).horizon_tokens == 2  # never beyond the tokens left


def test_a_forced_switch_is_always_accepted() -> None:
    policy = _policy()
    x = np.zeros(TABLE.size, dtype=np.int64)
    view = replace(_view(2.0, 1.0), window=policy.window(8, 24))
    estimate = policy.estimate(TABLE, view, plan_switch(x, x, view, TABLE, 24))
    assert not policy.accept(estimate, forced=False)
    assert policy.accept(estimate, forced=True)


def test_a_switch_off_a_slowed_device_is_taken_when_it_pays() -> None:
    policy = _policy()
    on_b = np.ones(TABLE.size, dtype=np.int64)
    on_a = np.zeros(TABLE.size, dtype=np.int64)
    view = replace(_view(2.0, 0.2), window=policy.window(8, 24), control_rtt_s=0.003)
    estimate = policy.estimate(TABLE, view, plan_switch(on_b, on_a, view, TABLE, 24))
    assert estimate.new_token_s < estimate.current_token_s
    assert policy.accept(estimate, forced=False)
