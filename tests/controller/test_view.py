"""The resource view's helpers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from controller.view import with_hop_overheads

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
