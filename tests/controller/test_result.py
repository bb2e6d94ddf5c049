"""A live run's result survives its JSON summary (a controller in a container sends it), and
the one run record prints the keys of docs/design.md for every backend."""

from __future__ import annotations

import json

from edgepart.controller.result import RunRecord, RunResult, SwitchRecord, TokenRecord


def test_a_summary_comes_back_as_the_same_result() -> None:
    result = RunResult(
        "myopic",
        output_token_ids=[5, 6, 7],
        tokens=[TokenRecord(6, 0.2, 0.25, 33, 1), TokenRecord(7, 0.3, 0.28, 34, 2)],
        migrations=12,
        migration_s=0.8,
        stall_s=0.9,
        replan_s=[0.01, 0.02],
        install_s={"a": {"group": 0.001, "proj": 0.002, "ffn": 0.004}},
        hop_overhead_s={"a": (0.001, 0.002)},
        switches=[SwitchRecord(2, 12, False, 0.3, 0.4, 0.6, 0.8)],
    )
    back = RunResult.from_summary(json.loads(json.dumps(result.summary())))
    assert back.summary() == result.summary()
    assert back.switches == result.switches
    assert back.per_token_s == [0.2, 0.3] and back.predicted_per_token_s == [0.25, 0.28]
    assert back.total_s == 0.2 + 0.3 + 0.9


LIVE_KEYS = set(RunResult("x").summary()) | {
    "backend", "text", "telemetry", "isolation", "cpu_share",
}  # fmt: skip


def test_a_live_record_prints_the_summary_and_how_it_ran() -> None:
    result = RunResult("myopic", output_token_ids=[5, 6], tokens=[TokenRecord(6, 0.2, 0.25, 9, 0)])
    local = RunRecord(result, "local", "hi", isolation="pacing", shares={"a": 0.5})
    out = local.to_json()
    assert set(out) == LIVE_KEYS and out["backend"] == "local" and out["cpu_share"] == {"a": 0.5}
    docker = RunRecord(result, "docker", "hi", start_s=3.0).to_json()
    assert set(docker) == LIVE_KEYS | {"start_s"} and docker["start_s"] == 3.0


def test_a_sim_record_prints_exactly_the_simulate_keys() -> None:
    result = RunResult(
        "edgeshard", tokens=[TokenRecord(0, 0.1, 0.1, 0, 0)], migration_s=0.5, stall_s=0.5
    )
    out = RunRecord(result, "sim").to_json()
    assert list(out) == [
        "algorithm", "backend", "per_token_s", "total_s", "migrations", "migration_s",
        "peak_memory_bytes", "replans",
    ]  # fmt: skip
    assert out["total_s"] == 0.6 and out["backend"] == "sim"
