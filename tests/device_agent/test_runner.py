"""The token runner's pure parts: the measured speed and the group order of attention."""

from __future__ import annotations

import pytest
import torch

from edgepart.device_agent.program import Routes
from edgepart.device_agent.runner import SpeedMeter, in_group_order


def test_an_idle_device_reports_its_nominal_speed_at_its_last_efficiency() -> None:
    speed = SpeedMeter()
    assert speed.gflops() is None
    assert speed.available_gflops(10.0) == (10.0, False)  # not measured: the nominal
    speed.add(2e9, 0.5)
    speed.add(2e9, 0.5)  # 4 GFLOP in 1 s
    assert speed.available_gflops(10.0) == (pytest.approx(4.0), True)
    assert speed.efficiency == pytest.approx(0.4)
    speed.last -= 60.0  # idle since: the measurement is stale
    assert speed.available_gflops(20.0) == (pytest.approx(8.0), False)
    speed.reset()  # a new load: nothing measured, full efficiency
    assert speed.available_gflops(20.0) == (20.0, False)


def test_group_outputs_are_put_back_in_group_order() -> None:
    layout = {"embed": "a", "head": "a", "L0.proj": "a", "L0.ffn": "a"}
    layout |= {"L0.g0": "b", "L0.g1": "a", "L0.g2": "b"}
    routes = Routes(layout, layers=1, kv_heads=3)
    width = 2
    group = [torch.full((1, width), float(g)) for g in range(3)]
    holders = routes.group_devices(0)
    parts = [torch.cat([group[g] for g in groups], dim=-1) for groups in holders.values()]
    assert torch.equal(in_group_order(routes, 0, parts), torch.cat(group, dim=-1))
