"""Calibrated block costs: measured times in, the same times out of the cost model."""

from __future__ import annotations

import numpy as np
import pytest

from edgepart.controller import cost
from edgepart.controller.view import PlanningWindow, ResourceView
from edgepart.llm.blocks import block_table
from edgepart.llm.calibration import ComputeProfile, calibrated_table
from edgepart.llm.model import preset

TABLE = block_table(preset("smollm2-135m"))
GID = int(TABLE.group_ids(0)[0])


def one_device(gflops: float) -> ResourceView:
    return ResourceView(
        ("cpu",),
        np.array([gflops]),
        np.array([1e12]),
        np.zeros((1, 1)),
        np.zeros((1, 1)),
        0,
        PlanningWindow(32, 8, 1024),
    )


def measured(fixed_s: float, per_ctx_s: float, speeds: dict[str, float]) -> dict:
    group = {
        str(n): float(TABLE.flops(n)[GID]) / (fixed_s + per_ctx_s * n) / 1e9
        for n in (32, 128, 512, 1024)
    }
    return {"group": group, **speeds}


def test_group_time_model_is_recovered():
    profile = ComputeProfile.from_measurements(
        TABLE, measured(110e-6, 35e-9, {"proj": 8.0, "ffn": 8.0, "head": 7.5})
    )
    assert profile.group_fixed_s == pytest.approx(110e-6, rel=1e-9)
    assert profile.group_per_context_s == pytest.approx(35e-9, rel=1e-9)
    assert profile.reference_gflops == pytest.approx(8.0)


@pytest.mark.parametrize("n", [40, 300, 1000])
def test_cost_model_on_the_reference_device_predicts_the_measured_times(n):
    speeds = {"proj": 9.0, "ffn": 8.0, "head": 7.0}
    profile = ComputeProfile.from_measurements(TABLE, measured(110e-6, 35e-9, speeds))
    table = calibrated_table(TABLE, profile)
    spec = TABLE.spec
    expected = (
        spec.layers
        * (
            spec.kv_heads * (110e-6 + 35e-9 * n)
            + float(TABLE.flops_fixed[TABLE.proj_id(0)]) / 9e9
            + float(TABLE.flops_fixed[TABLE.ffn_id(0)]) / 8e9
        )
        + TABLE.source_flops / 7e9
    )
    on_one = np.zeros(TABLE.size, dtype=np.int64)
    got = cost.per_token_s(table, one_device(profile.reference_gflops), on_one, n)
    assert got == pytest.approx(expected, rel=1e-6)
    # a device twice as fast takes half the time
    faster = cost.per_token_s(table, one_device(2 * profile.reference_gflops), on_one, n)
    assert faster == pytest.approx(expected / 2, rel=1e-6)


def test_uniform_speeds_leave_the_table_as_it_was():
    g = 8.0
    # a group at a constant 8 GFLOP/s: its time is exactly its FLOPs / 8e9
    group = {str(n): g for n in (32, 128, 512, 1024)}
    profile = ComputeProfile.from_measurements(
        TABLE, {"group": group, "proj": g, "ffn": g, "head": g}
    )
    table = calibrated_table(TABLE, profile)
    np.testing.assert_allclose(table.flops(77.0), TABLE.flops(77.0), rtol=1e-9)
    assert table.source_flops == TABLE.source_flops
    # memory and bytes are untouched
    np.testing.assert_array_equal(table.weight_bytes, TABLE.weight_bytes)
    np.testing.assert_array_equal(table.output_bytes, TABLE.output_bytes)


def test_one_context_length_is_not_enough():
    with pytest.raises(ValueError, match="two context lengths"):
        ComputeProfile.from_measurements(
            TABLE, {"group": {"32": 4.0}, "proj": 8.0, "ffn": 8.0, "head": 8.0}
        )
