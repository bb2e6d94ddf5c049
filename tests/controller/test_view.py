"""The resource view's helpers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edgepart.controller.view import PlanningWindow, ResourceView, with_hop_overheads

seconds = st.floats(0.0, 0.01)


@given(
    st.integers(1, 6).flatmap(
        lambda d: st.tuples(
            arrays(float, (d, d), elements=seconds),
            arrays(float, (d,), elements=seconds),
            arrays(float, (d,), elements=seconds),
        )
    )
)
def test_a_hop_pays_its_senders_and_its_receivers_software_time(case) -> None:
    latency, send, receive = case
    total = with_hop_overheads(latency, send, receive)
    d = len(send)
    for i in range(d):
        for j in range(d):
            want = latency[i, j] if i == j else latency[i, j] + send[i] + receive[j]
            assert total[i, j] == pytest.approx(want, abs=1e-15)
    assert latency.shape == total.shape and not np.shares_memory(latency, total)


def _view(move_s) -> ResourceView:
    d = 3
    return ResourceView(
        devices=("a", "b", "c"),
        compute_gflops=np.ones(d),
        memory_bytes=np.ones(d),
        bandwidth_mbit=np.ones((d, d)),
        latency_s=np.zeros((d, d)),
        source=0,
        window=PlanningWindow(1, 1, 2),
        move_s_per_block=move_s,
    )


def test_a_moved_block_costs_its_targets_install_time() -> None:
    view = _view(np.array([0.01, 0.02, 0.04]))
    assert view.link_move_s[2, 1] == 0.02 and view.link_move_s[1, 2] == 0.04
    assert (_view(0.5).move_s_per_block == 0.5).all()  # one time for every device
    with pytest.raises(ValueError):
        _view(np.array([0.01, 0.02]))
