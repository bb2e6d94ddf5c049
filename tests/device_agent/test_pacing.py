"""Pacing: the pacer's arithmetic, its background share and the debt it carries."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgepart.device_agent.pacing import PACE_MIN_SLEEP_S, Pacer

_shares = st.floats(min_value=1e-3, max_value=64.0)
_times = st.floats(min_value=0.0, max_value=1e4)


@given(share=_shares, cpu_s=_times, elapsed_s=_times)
def test_pace_is_never_negative_and_tops_up_to_cpu_over_share(
    share: float, cpu_s: float, elapsed_s: float
) -> None:
    pace = Pacer(share).pace_s(cpu_s, elapsed_s)
    target = cpu_s / share
    assert pace >= 0.0
    if target > elapsed_s:
        assert pace == target - elapsed_s
        assert math.isclose(elapsed_s + pace, target, rel_tol=1e-12, abs_tol=1e-12)
    else:
        assert pace == 0.0


@given(share=_shares, new_share=_shares, cpu_s=_times)
def test_set_share_paces_later_work(share: float, new_share: float, cpu_s: float) -> None:
    pacer = Pacer(share)
    pacer.set_share(new_share)
    assert pacer.share == new_share
    assert pacer.pace_s(cpu_s, 0.0) == cpu_s / new_share


def test_pace_examples() -> None:
    pacer = Pacer(0.25)
    assert pacer.pace_s(0.1, 0.1) == pytest.approx(0.3)  # 0.1 s of CPU lasts 0.4 s
    assert pacer.pace_s(0.1, 0.5) == 0.0  # already slower than the device
    assert Pacer(2.0).pace_s(1.0, 0.0) == 0.5  # a device faster than this host


def test_an_unpaced_device_runs_at_host_speed() -> None:
    pacer = Pacer(None)
    pacer.set_background(0.5)
    assert pacer.share is None and pacer.effective_share is None
    assert pacer.pace_s(1.0, 0.0) == 0.0
    assert pacer.owe(1.0, 0.0) == 0.0 and pacer.debt_s == 0.0


@pytest.mark.parametrize("share", [0.0, -1.0, math.inf, math.nan])
def test_pacer_refuses_bad_shares(share: float) -> None:
    with pytest.raises(ValueError, match="share"):
        Pacer(share)
    with pytest.raises(ValueError, match="share"):
        Pacer(1.0).set_share(share)


def test_pace_refuses_negative_times() -> None:
    with pytest.raises(ValueError, match="cpu time"):
        Pacer(1.0).pace_s(-1.0, 0.0)
    with pytest.raises(ValueError, match="elapsed"):
        Pacer(1.0).pace_s(1.0, -1.0)


@given(cores=_shares, fraction=st.floats(min_value=0.0, max_value=1.0))
def test_effective_share_is_what_the_background_leaves(cores: float, fraction: float) -> None:
    pacer = Pacer(cores)
    pacer.set_background(fraction)
    share = pacer.effective_share
    assert share == cores * (1.0 - fraction)
    assert share is not None and 0.0 <= share <= cores


def test_background_load_slows_later_work() -> None:
    pacer = Pacer(1.0)
    pacer.set_background(0.75)  # a quarter of a core left
    assert pacer.background == 0.75
    assert pacer.pace_s(0.1, 0.1) == pytest.approx(0.3)


def test_bad_background_fractions_are_refused() -> None:
    with pytest.raises(ValueError, match="fraction"):
        Pacer(1.0).set_background(1.5)
    with pytest.raises(ValueError, match="fraction"):
        Pacer(1.0).set_background(-0.1)


def test_short_waits_are_owed_until_worth_a_sleep_and_overshoot_is_credited() -> None:
    pacer = Pacer(0.5)
    small = PACE_MIN_SLEEP_S / 4  # each call owes half its CPU time again as wait
    assert pacer.owe(small, 0.0) == 0.0  # owed, not slept
    assert pacer.debt_s == pytest.approx(2 * small)
    due = pacer.owe(small, 0.0)
    assert due == pytest.approx(4 * small) == pytest.approx(PACE_MIN_SLEEP_S)
    pacer.paid(due + 0.001)  # the sleep overshot by 1 ms
    assert pacer.debt_s == pytest.approx(-0.001)
    # the overshoot is credited: the next 1 ms of waiting is already paid
    assert pacer.owe(0.0005, 0.0) == 0.0
    assert pacer.debt_s == pytest.approx(0.0)


def test_pace_sleeps_what_is_due() -> None:
    pacer = Pacer(0.5)
    pacer.pace(0.002, 0.0)  # 2 ms of CPU lasts 4 ms: a 2 ms sleep, overshoot credited
    assert pacer.debt_s <= 0.0
