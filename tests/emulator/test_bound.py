"""The zero-lag floor (edgepart.emulator.bound) on the committed demo scenarios."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgepart.controller.placement import make_algorithm
from edgepart.emulator.backends.sim import simulate
from edgepart.emulator.bound import zero_lag_per_token_s
from edgepart.emulator.scenario import load_scenario

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
MYOPIC = make_algorithm("myopic")


def _runs(scenario, names=("myopic", "static-heads")):
    return {name: simulate(scenario, make_algorithm(name)).per_token_s for name in names}


@pytest.mark.parametrize("name", ["demo.yaml", "adaptation/demo-load-24.yaml"])
def test_the_floor_is_never_above_a_run_it_was_given(name: str) -> None:
    scenario = load_scenario(SCENARIOS / name)
    runs = _runs(scenario)
    floor = zero_lag_per_token_s(scenario, MYOPIC, list(runs.values()))
    assert len(floor) == scenario.generate_tokens
    assert np.isfinite(floor).all()  # the demo's crashed pi4 is left out from its token on
    for per_token in runs.values():
        assert (np.array(floor) <= np.array(per_token) + 1e-12).all()


def test_the_floor_meets_a_change_at_the_token_it_happens() -> None:
    scenario = load_scenario(SCENARIOS / "adaptation" / "demo-load-24.yaml")  # tokens 24-47
    static = _runs(scenario, ("static-heads",))["static-heads"]
    floor = zero_lag_per_token_s(scenario, MYOPIC)
    # the mini-PC is loaded from token 24: the static split slows at once, the floor's
    # fresh placement leaves the loaded device from that very token, without lag
    assert static[24] > 1.3 * static[23]
    assert floor[24] < 0.8 * static[24]
    assert floor[47] < 0.8 * static[47]


def test_where_nothing_changes_the_floor_is_one_placement() -> None:
    scenario = load_scenario(SCENARIOS / "adaptation" / "demo-steady.yaml")
    floor = np.array(zero_lag_per_token_s(scenario, MYOPIC))
    # one placement for the whole run: the delay only grows with the cache, token by token
    assert (np.diff(floor) >= -1e-12).all()
