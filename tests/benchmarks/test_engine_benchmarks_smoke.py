"""Smoke tests of the engine benchmarks on SmolLM2-135M: each main() runs --quick into tmp_path.

They check the JSON's shape, that the numbers are finite and positive and, for
engine_overhead, that both engines chose the same greedy tokens; never how fast anything
is. Timings run on one torch thread here (the option the scripts offer) so that the tests
stay short on a busy machine; the thread count is restored afterwards.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("gguf")

from edgepart.llm.files import preset_file

try:
    preset_file("smollm2-135m")
except FileNotFoundError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(str(exc), allow_module_level=True)

from benchmarks import block_calibration, engine_overhead, memory_footprint


def test_engine_overhead_smoke(tmp_path: Path, positive, quick_json) -> None:
    pytest.importorskip("transformers")
    engine_overhead.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    data = quick_json(tmp_path, "engine_overhead")
    assert data["setup"]["threads"] == 1
    assert data["setup"]["prompt_tokens"] == 32 and data["setup"]["new_tokens"] == 8
    for engine in ("edgepart", "transformers"):
        s = data["per_token_s"][engine]
        assert s["count"] == 7  # 8 new tokens, the first interval (prefill) left out
        assert positive(s["median"]) and positive(s["p95"])
        assert positive(data["tokens_per_s"][engine])
        assert positive(data["load_s"][engine])
    assert positive(data["ratio"])
    assert data["token_ids_identical"] is True
    ids = data["token_ids"]
    assert ids["edgepart"] == ids["transformers"] and len(ids["edgepart"]) >= 1
    assert data["targets"][0]["value"] == data["ratio"]


def test_block_calibration_smoke(tmp_path: Path, positive, quick_json) -> None:
    block_calibration.main(
        ["--quick", "--threads", "1", "--reps", "2", "--out", str(tmp_path)]
    )
    data = quick_json(tmp_path, "block_calibration")
    assert isinstance(data["cpu"], str) and data["cpu"]
    assert data["threads"] == 1
    gflops = data["gflops"]
    assert set(gflops) == {"group", "proj", "ffn", "head"}
    assert set(gflops["group"]) == {"32", "128"}
    assert all(positive(v) for v in gflops["group"].values())
    assert all(positive(gflops[k]) for k in ("proj", "ffn", "head"))
    assert data["flops_counters_agree"] is True
    for n in ("32", "128"):
        p = data["prediction"][n]
        assert positive(p["predicted_s"]) and positive(p["measured_s"])
        assert positive(p["predicted_over_measured"])
    assert data["setup"]["block_counts"] == {"group": 90, "proj": 30, "ffn": 30, "head": 1}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_memory_footprint_smoke(tmp_path: Path, positive, quick_json) -> None:
    memory_footprint.main(["--quick", "--out", str(tmp_path)])
    data = quick_json(tmp_path, "memory_footprint")
    cases = data["cases"]
    assert set(cases) == {"none", "quarter", "all"}
    for case in cases.values():
        assert positive(case["peak_rss_bytes"]) and positive(case["peak_rss_mib"])
    assert cases["none"]["weight_bytes"] == 0 and cases["none"]["blocks"] == 0
    assert cases["all"]["blocks"] == 152
    for case in ("quarter", "all"):
        assert positive(cases[case]["weight_bytes"])
        assert cases[case]["weight_bytes"] == cases[case]["weight_bytes_formula"]
    assert positive(data["ratio"]) and data["ratio"] < 1
    assert positive(data["ratios"]["weights"]["quarter_vs_all"])
    assert len(data["quarter_blocks"]) == cases["quarter"]["blocks"]
