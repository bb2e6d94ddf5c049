"""Smoke tests of the live-runtime benchmarks: each main() runs --quick into tmp_path.

They start real agent processes on the local backend (an embedded MQTT broker, SmolLM2-135M
on each agent; tens of seconds per test) and check the JSON's shape, that the numbers are
finite and positive and that partitioning did not change the greedy tokens; never how fast
or how faithful anything is: that is measured by the benchmarks themselves.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("gguf")
pytest.importorskip("amqtt")

from edgepart.llm.files import preset_file

try:
    preset_file("smollm2-135m")
except FileNotFoundError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(str(exc), allow_module_level=True)

from benchmarks import emulation_fidelity, runtime_overhead

FIDELITY_TOKENS = emulation_fidelity.DEFAULTS["tokens"].quick
OVERHEAD_TOKENS = runtime_overhead.DEFAULTS["tokens"].quick
OVERHEAD_ROUNDS = runtime_overhead.DEFAULTS["rounds"].quick


def test_emulation_fidelity_smoke(tmp_path: Path, positive, finite, quick_json) -> None:
    emulation_fidelity.main(["--quick", "--out", str(tmp_path)])
    data = quick_json(tmp_path, "emulation_fidelity")
    assert data["setup"]["algorithms"] == ["myopic", "edgeshard"]
    assert data["setup"]["tokens_override"] == FIDELITY_TOKENS
    (scenario,) = data["scenarios"]
    assert scenario["scenario"] == "lan-3"
    assert scenario["generate_tokens"] == FIDELITY_TOKENS
    runs = scenario["runs"]
    assert [r["algorithm"] for r in runs] == ["myopic", "edgeshard"]
    for run in runs:
        assert run["ok"] is True, run.get("error")
        assert run["tokens"] == FIDELITY_TOKENS - 1  # the prefill is not timed
        for key in ("tokens_per_s", "total_s", "peak_memory_mib_max", "fidelity_p90"):
            assert positive(run[key]), key
        assert finite(run["fidelity_median"]) and run["fidelity_median"] >= 0
        assert run["fidelity_p90"] >= run["fidelity_median"]
        assert run["migrations"] >= 0
        assert set(run["peak_memory_mib"]) == set(scenario["devices"])
        assert run["ids_match_reference"] is True  # the monolithic model's ids
        ids = run["run"]["output_token_ids"]
        assert len(ids) == FIDELITY_TOKENS
        assert len(run["run"]["per_token_s"]) == len(run["run"]["predicted_per_token_s"])
    assert scenario["output_ids_identical"] is True
    goodput = data["shaped_goodput"]
    assert [g["rate_mbit"] for g in goodput] == [1.0, 10.0, 100.0]
    for g in goodput:
        assert g["frames"] >= 3
        assert positive(g["goodput_mbit"]) and positive(g["window_s"])
        assert finite(g["relative_error"])
        assert g["frame_bytes"] > 64 * 1024
    names = {t["target"] for t in data["targets"]}
    assert "fidelity median, worst run" in names
    assert "goodput error at 100 Mbit/s" in names


def test_runtime_overhead_smoke(tmp_path: Path, positive, finite, quick_json) -> None:
    runtime_overhead.main(["--quick", "--out", str(tmp_path)])
    data = quick_json(tmp_path, "runtime_overhead")
    setup = data["setup"]
    assert setup["devices"] == [1, 2] and setup["tokens"] == OVERHEAD_TOKENS
    assert positive(setup["reference_gflops"])

    hop = data["hop"]
    assert hop["rounds"] == OVERHEAD_ROUNDS and hop["shape"] == [1, 576]
    assert hop["one_way_s"]["count"] == OVERHEAD_ROUNDS
    for key in ("median", "p95", "min"):
        assert positive(hop["one_way_s"][key]) and positive(hop["round_trip_s"][key])
    assert positive(hop["one_way_p90_s"])

    control = data["control"]
    assert control["available"] is True
    assert positive(control["agent_decode_s"]["median"])
    assert finite(control["overhead_s"]["median"])
    fallback = data["control_fallback"]
    for key in ("share", "monolithic_per_token_s", "expected_per_token_s",
                "measured_per_token_s", "ratio"):
        assert positive(fallback[key]), key
    assert data["token_ids_identical"] is True

    assert [s["devices"] for s in data["scaling"]] == [1, 2]
    for s in data["scaling"]:
        for key in ("tokens_per_s", "monolithic_tokens_per_s", "efficiency", "share_total"):
            assert positive(s[key]), key
        assert len(s["peak_memory_mib"]) == s["devices"]
    for run in data["runs"]:
        assert run["tokens"] == OVERHEAD_TOKENS - 1
        assert positive(run["per_token_s"]["median"])
    assert data["targets"][0]["value"] == hop["one_way_s"]["median"]


def test_the_fidelity_benchmark_takes_a_list_of_time_dilations(tmp_path: Path) -> None:
    parser = emulation_fidelity.make_parser()
    args = parser.parse(["--quick", "--dilation", "1.5,3", "--out", str(tmp_path)])
    assert args.dilation == [1.5, 3.0]
    assert parser.parse(["--out", str(tmp_path)]).dilation == []
    with pytest.raises(SystemExit) as exited:
        parser.parse(["--dilation", "0.5", "--out", str(tmp_path)])
    assert exited.value.code == 2
