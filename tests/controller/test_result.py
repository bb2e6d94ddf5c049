"""A live run's result survives its JSON summary (a controller in a container sends it)."""

from __future__ import annotations

import json

from controller.orchestrator import RunResult, SwitchRecord, TokenRecord


def test_a_summary_comes_back_as_the_same_result() -> None:
    result = RunResult(
        "myopic",
        output_token_ids=[5, 6, 7],
        tokens=[TokenRecord(6, 0.2, 0.25, 33, 1), TokenRecord(7, 0.3, 0.28, 34, 2)],
        migrations=12,
        migration_s=0.8,
        move_s_per_block={"a": 0.01, "b": 0.04},
        hop_overhead_s={"a": (0.001, 0.002)},
        switches=[SwitchRecord(token=2, blocks=12, predicted_s=0.6, measured_s=0.8)],
    )
    back = RunResult.from_summary(json.loads(json.dumps(result.summary())))
    assert back.summary() == result.summary()
    assert back.switches == result.switches
    assert back.per_token_s == [0.2, 0.3] and back.predicted_per_token_s == [0.25, 0.28]
