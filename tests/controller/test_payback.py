"""The switch gate: gain over how long changes last against the stall, by properties."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from edgepart.controller.payback import (
    ALPHA_BOUNDS,
    ALPHA_PRIOR,
    MIN_RELATIVE_GAIN,
    ChangeHistory,
    SwitchCalibration,
    SwitchEstimate,
    worth_switching,
)

seconds = st.floats(min_value=1e-4, max_value=10.0, allow_nan=False)
stalls = st.floats(min_value=0.0, max_value=100.0, allow_nan=False)
tokens = st.integers(min_value=1, max_value=512)
alphas = st.floats(min_value=ALPHA_BOUNDS[0], max_value=ALPHA_BOUNDS[1])


@st.composite
def estimates(draw) -> SwitchEstimate:
    left = draw(tokens)
    return SwitchEstimate(
        current_token_s=draw(seconds),
        new_token_s=draw(seconds),
        prepare_s=draw(stalls),
        commit_s=draw(stalls),
        horizon_tokens=draw(st.integers(min_value=1, max_value=left)),
        tokens_left=left,
    )


@given(estimates(), alphas)
def test_never_switches_when_the_gain_is_below_alpha_times_the_cost(est, alpha):
    gain = est.horizon_tokens * (est.current_token_s - est.new_token_s)
    if gain < alpha * est.commit_s:
        assert not worth_switching(est, alpha)


@given(estimates(), alphas)
def test_a_switch_taken_pays_its_stall_and_the_way_back(est, alpha):
    if worth_switching(est, alpha):
        assert est.new_token_s < est.current_token_s * (1 - MIN_RELATIVE_GAIN) + 1e-12
        saved = (est.horizon_tokens - est.prepare_tokens) * (
            est.current_token_s - est.new_token_s
        )
        back = est.commit_s if est.horizon_tokens < est.tokens_left else 0.0
        assert saved >= alpha * (est.commit_s + back) - 1e-9


@given(estimates(), alphas, alphas)
def test_a_larger_alpha_never_switches_more(est, a, b):
    low, high = sorted((a, b))
    if worth_switching(est, high):
        assert worth_switching(est, low)


@given(estimates(), alphas)
def test_a_longer_prepare_never_makes_a_switch_pay(est, alpha):
    slower = SwitchEstimate(**{**est.__dict__, "prepare_s": est.prepare_s * 2 + 1.0})
    if worth_switching(slower, alpha):
        assert worth_switching(est, alpha)


def test_a_placement_that_cannot_run_is_always_left():
    est = SwitchEstimate(math.inf, 0.2, 5.0, 50.0, 1, 10)
    assert worth_switching(est, ALPHA_BOUNDS[1])


def test_an_unrunnable_target_is_never_taken():
    est = SwitchEstimate(0.5, math.inf, 0.0, 0.0, 10, 10)
    assert not worth_switching(est, 1.0)


def test_a_short_change_does_not_pay_for_a_long_stall():
    """A 30 % faster token for 8 tokens does not pay a 1 s commit and the way back."""
    est = SwitchEstimate(0.2, 0.14, 0.0, 1.0, horizon_tokens=8, tokens_left=64)
    assert not worth_switching(est, 1.0)
    lasting = SwitchEstimate(0.2, 0.14, 0.0, 1.0, horizon_tokens=64, tokens_left=64)
    assert worth_switching(lasting, 1.0)


def test_alpha_follows_the_measured_ratio_within_bounds():
    cal = SwitchCalibration()
    assert cal.alpha == ALPHA_PRIOR
    for _ in range(10):
        cal.record(predicted_s=0.1, measured_s=0.25)
    assert cal.alpha == 2.5
    for _ in range(10):
        cal.record(predicted_s=0.1, measured_s=0.01)
    assert cal.alpha == 1.0  # over-priced switches never make alpha < 1
    for _ in range(10):
        cal.record(predicted_s=0.1, measured_s=10.0)
    assert cal.alpha == ALPHA_BOUNDS[1]


def test_episodes_are_measured_between_changes():
    history = ChangeHistory()
    compute = np.array([3.0, 3.5])
    links = np.full((2, 2), 1000.0)
    history.observe(0, compute, links)
    assert history.expected_persistence(4, default_tokens=24) == 24
    assert history.observe(10, np.array([3.0, 0.9]), links)  # a load starts
    assert history.lengths == []  # how long the start lasted says nothing of a change
    assert not history.observe(12, np.array([3.1, 0.95]), links)  # jitter within 20 %
    assert history.observe(18, compute, links)  # it ends after 8 tokens
    assert history.lengths == [8]
    assert history.expected_persistence(18, default_tokens=24) == 8
    # a state that has lasted long is expected to last about as long again
    assert history.expected_persistence(60, default_tokens=24) == 42


def test_a_rebase_counts_no_change():
    history = ChangeHistory()
    links = np.full((2, 2), 100.0)
    history.observe(0, np.array([3.0, 3.0]), links)
    history.rebase(2, np.array([2.0, 2.0]), links)  # first measurements after start-up
    assert not history.observe(3, np.array([2.1, 1.9]), links)
    assert history.lengths == []
