"""Smoke test of the chaos benchmark: one quick round on the local backend over mosquitto.

It checks the JSON's shape and that the round survived its faults with the reference ids
(correctness); how fast recovery is, is measured by the benchmark itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import chaos
from edgepart.emulator.broker import mosquitto_available


@pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")
def test_chaos_smoke(tmp_path: Path, quick_json) -> None:
    chaos.main(["--quick", "--seeds", "1", "--out", str(tmp_path)])
    data = quick_json(tmp_path, "chaos")
    (round_,) = data["rounds"]
    assert round_["survived"] is True, round_.get("traceback")
    assert round_["ids_identical"] is True
    assert round_["tokens"] == chaos.DEFAULTS["tokens"].quick
    assert round_["broker_restarts"] == 1 and round_["broker_losses"] == 1
    assert len(round_["detection_s"]) == 1  # the kill was seen
    # a recovery re-prefills, unless the killed device held no block at the time
    assert round_["recoveries"] in (0, 1)
    assert round_["reprefill_s"] <= round_["recovery_s"]
    assert (round_["reprefill_s"] > 0) == (round_["recoveries"] == 1)
    assert {t["target"] for t in data["targets"]} >= {"max detection (s)"}
