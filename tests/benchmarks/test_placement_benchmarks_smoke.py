"""Smoke tests of the benchmark scripts: each main() runs in its tiny mode and writes JSON.

They check the shape of the output and that the headline numbers are finite, never how
fast or how good anything is: that is measured by the benchmarks themselves.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from benchmarks import placement_quality, placement_speed


def test_placement_quality_smoke(tmp_path: Path, finite, quick_json) -> None:
    placement_quality.main(["--quick", "--seeds", "1", "--out", str(tmp_path)])
    data = quick_json(tmp_path, "placement_quality")
    assert (tmp_path / "gap_distribution.png").stat().st_size > 0
    assert (tmp_path / "latency_trace.png").stat().st_size > 0

    small = data["small"]
    assert set(small["by_devices"]) == {"3", "4", "5"}
    assert len(small["instances"]) == 3
    overall = small["overall"]
    for key in ("decision_gap", "first_decision_gap", "whole_gap"):
        for stat in ("median", "p95", "max"):
            assert finite(overall[key][stat]), (key, stat)
    assert overall["replay_mismatches"] == 0
    for inst in small["instances"]:
        assert inst["decisions"][0]["initial"]
        assert all(finite(d["myopic_s"]) and finite(d["optimal_s"]) for d in inst["decisions"])
    assert {t["target"] for t in small["targets"]} >= {
        "per-decision gap median",
        "per-decision gap max",
    }

    large = data["large"]
    algos = set(large["setup"]["algorithms"])
    assert "optimal" not in algos
    assert {"myopic", "edgeshard", "memory-proportional"} <= algos
    assert {(r["devices"], r["regime"]) for r in large["summary"]} == {(10, "lan"), (10, "wan")}
    for inst in large["instances"]:
        for run in inst["algorithms"].values():
            assert finite(run["total_s"]) and finite(run["peak_memory_max_bytes"])
            assert run["failed_decisions"] >= 0 and run["infeasible_tokens"] >= 0
    assert finite(large["speedup_vs_best_layer"]["lan"]["median"])
    assert set(large["latency_trace"]["per_token_s"]) == algos


def test_placement_speed_smoke(tmp_path: Path, finite, quick_json) -> None:
    placement_speed.main(
        ["--quick", "--seeds", "1", "--devices", "5", "--out", str(tmp_path)]
    )
    data = quick_json(tmp_path, "placement_speed")
    assert (tmp_path / "placement_speed.png").stat().st_size > 0
    assert {r["blocks"] for r in data["myopic"]} == {150, 1088}
    for r in data["myopic"]:
        assert r["devices"] == 5
        assert finite(r["fresh_s"]["median"]) and finite(r["replan_s"]["median"])
        assert finite(r["replan_objective_s"])
    milp = data["milp"]
    assert milp["devices"] == 5 and milp["seeds"] == 1
    assert finite(milp["fresh_wall_s"]["median"]) and finite(milp["replan_wall_s"]["median"])
    assert len(data["targets"]) == 4
