"""Scenario schema v1: loading, derived views, round trips and one test per kind of error."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from edgepart.emulator.scenario import (
    GGUF_MISSING,
    MIB,
    HfModel,
    LinkTrace,
    LoadTrace,
    Scenario,
    ScenarioError,
    estimate_prompt_tokens,
    load_scenario,
    parse_scenario,
)
from edgepart.llm.blocks import block_table
from edgepart.llm.model import preset

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"

BASE = {
    "version": 1,
    "name": "toy",
    "model": {"preset": "smollm2-135m"},
    "prompt_tokens": 32,
    "generate_tokens": 64,
    "replan_every": 8,
    "weights_from": "disk",
    "devices": [
        {"name": "d0", "compute_gflops": 40, "memory_mib": 2048, "source": True},
        {"name": "d1", "compute_gflops": 10, "memory_mib": 512},
        {"name": "d2", "compute_gflops": 20, "memory_mib": 256},
    ],
    "links": {
        "default": {"bandwidth_mbit": 100, "latency_ms": 2},
        "pairs": [{"a": "d0", "b": "d1", "bandwidth_mbit": 20, "latency_ms": 5}],
    },
    "traces": [
        {"at_token": 24, "device": "d1", "background_load": 0.6},
        {"at_token": 40, "device": "d1", "memory_mib": 256},
        {"at_token": 48, "link": ["d0", "d1"], "bandwidth_mbit": 5},
        {"at_token": 56, "device": "d1", "fail": True},
    ],
}


def base() -> dict:
    return copy.deepcopy(BASE)


def error_of(data: dict, origin: str = "demo.yaml") -> str:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data, origin)
    return str(info.value)


# ---------------------------------------------------------------- good input


def test_base_parses_with_its_derived_views():
    s = parse_scenario(base(), "toy.yaml")
    assert s.source_name == "d0"
    assert s.source_index == 0
    assert s.final_context == 96
    assert s.device_names == ("d0", "d1", "d2")
    assert s.model_spec() == preset("smollm2-135m")
    assert [type(t) for t in s.traces][:1] == [LoadTrace]
    assert isinstance(s.traces[2], LinkTrace) and s.traces[2].kind == "link"


def test_link_resolves_pairs_either_way_then_default():
    s = parse_scenario(base(), "toy.yaml")
    assert s.link("d0", "d1") == (20.0, 5.0)
    assert s.link("d1", "d0") == (20.0, 5.0)
    assert s.link("d1", "d2") == (100.0, 2.0)
    with pytest.raises(KeyError):
        s.link("d0", "nope")
    with pytest.raises(KeyError):
        s.link("d0", "d0")


def test_pair_without_latency_takes_the_default_latency():
    d = base()
    del d["links"]["pairs"][0]["latency_ms"]
    assert parse_scenario(d, "x").link("d0", "d1") == (20.0, 2.0)


def test_defaults_when_keys_are_left_out():
    d = base()
    for key in ("replan_every", "weights_from", "links", "traces"):
        del d[key]
    s = parse_scenario(d, "x")
    assert s.replan_every == 8
    assert s.weights_from == "disk"
    assert s.link("d0", "d2") == (1000.0, 1.0)
    assert s.traces == ()


def test_prompt_text_estimates_prompt_tokens():
    d = base()
    del d["prompt_tokens"]
    d["prompt"] = "one two three four five six"
    s = parse_scenario(d, "x")
    assert s.prompt_tokens == estimate_prompt_tokens(d["prompt"]) == 6 * 4 // 3 + 1
    d["prompt_tokens"] = 17  # an explicit count wins
    assert parse_scenario(d, "x").prompt_tokens == 17


def test_scenario_is_immutable():
    s = parse_scenario(base(), "x")
    with pytest.raises(ValidationError):
        s.generate_tokens = 3  # type: ignore[misc]
    with pytest.raises(ValidationError):
        s.devices[0].memory_mib = 1  # type: ignore[misc]
    assert isinstance(s.devices, tuple)


@pytest.mark.parametrize("name", ["demo.yaml", "toy-5.yaml"])
def test_shipped_scenarios_load_and_round_trip(name, tmp_path):
    s = load_scenario(SCENARIOS / name)
    assert s.source_name == s.devices[0].name
    out = tmp_path / name
    out.write_text(s.to_yaml())
    again = load_scenario(out)
    assert again == s
    assert again.to_yaml() == s.to_yaml()


def test_demo_needs_more_than_the_source():
    s = load_scenario(SCENARIOS / "demo.yaml")
    table = block_table(s.model_spec())
    need = table.memory_bytes(s.final_context).sum() + table.source_weight_bytes
    assert need > s.device(s.source_name).memory_mib * MIB
    assert s.final_context == 128 and s.replan_every == 8
    kinds = sorted({t.kind for t in s.traces})
    assert kinds == ["fail", "link", "load", "memory"]


def test_to_yaml_writes_integers_and_flow_lines():
    text = parse_scenario(base(), "x").to_yaml()
    assert "- {name: d0, compute_gflops: 40, memory_mib: 2048, source: true}" in text
    assert "- {name: d1, compute_gflops: 10, memory_mib: 512}" in text
    assert "link: [d0, d1]" in text


def test_explicit_shapes(tmp_path):
    d = base()
    d["model"] = {"layers": 2, "d_model": 512, "heads": 8, "kv_heads": 2, "d_ff": 2048,
                  "vocab": 32000, "dtype": "fp16", "ffn": "gelu", "tied_embeddings": True}
    spec = parse_scenario(d, "x").model_spec()
    assert (spec.layers, spec.kv_heads, spec.dtype, spec.ffn) == (2, 2, "float16", "gelu")
    assert spec.tied_embeddings and spec.head_dim == 64


def test_hf_model_path_is_relative_to_the_scenario_file(tmp_path):
    folder = tmp_path / "models" / "smol"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
        "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
        "vocab_size": 49152, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    }))
    d = base()
    d["model"] = {"hf": "models/smol", "dtype": "float32"}
    f = tmp_path / "s.yaml"
    f.write_text(json.dumps(d))  # JSON is YAML
    s = load_scenario(f)
    assert isinstance(s.model, HfModel)
    assert Path(s.model.hf) == folder
    assert s.model_spec().dtype == "float32"
    assert s.model_spec().kv_heads == 3
    again = tmp_path / "again.yaml"
    again.write_text(s.to_yaml())
    assert load_scenario(again) == s


def test_gguf_without_the_package_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` fail
    d = base()
    d["model"] = {"gguf": "/nonexistent/model.gguf"}
    assert error_of(d) == f"demo.yaml: model.gguf: {GGUF_MISSING}"


def test_gguf_metadata_is_read(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_feed_forward_length(128)
    w.add_file_type(1)
    w.add_token_list([f"t{i}" for i in range(100)])
    w.add_tensor("token_embd.weight", np.zeros((100, 64), dtype=np.float16))
    w.add_tensor("blk.0.ffn_gate.weight", np.zeros((128, 64), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    d = base()
    d["model"] = {"gguf": str(path)}
    spec = parse_scenario(d, "x").model_spec()
    assert (spec.layers, spec.d_model, spec.heads, spec.kv_heads, spec.d_ff, spec.vocab) == (
        2, 64, 4, 2, 128, 100)
    assert spec.dtype == "float16" and spec.tied_embeddings and spec.ffn == "swiglu"


# ---------------------------------------------------------------- errors, one by one


def test_error_format_is_file_key_path_reason():
    d = base()
    d["devices"][1]["compute_gflops"] = 0
    assert error_of(d) == "demo.yaml: devices[1].compute_gflops: must be > 0"


def test_scenario_error_is_a_value_error_with_problems():
    d = base()
    d["devices"][1]["compute_gflops"] = -3
    d["devices"][2]["memory_mib"] = 0
    with pytest.raises(ValueError) as info:
        parse_scenario(d, "demo.yaml")
    err = info.value
    assert isinstance(err, ScenarioError)
    assert err.problems == [("devices[1].compute_gflops", "must be > 0"),
                            ("devices[2].memory_mib", "must be > 0")]
    assert str(err).splitlines() == ["demo.yaml: devices[1].compute_gflops: must be > 0",
                                     "demo.yaml: devices[2].memory_mib: must be > 0"]


def test_unknown_key_top_level():
    d = base()
    d["replan_evry"] = 4
    assert error_of(d) == "demo.yaml: replan_evry: unknown key"


@pytest.mark.parametrize(
    ("where", "path"),
    [
        (lambda d: d["devices"][2], "devices[2].cpu"),
        (lambda d: d["model"], "model.cpu"),
        (lambda d: d["links"]["default"], "links.default.cpu"),
        (lambda d: d["links"]["pairs"][0], "links.pairs[0].cpu"),
        (lambda d: d["traces"][1], "traces[1].cpu"),
        (lambda d: d["links"], "links.cpu"),
    ],
)
def test_unknown_key_nested(where, path):
    d = base()
    where(d)["cpu"] = 1
    assert error_of(d) == f"demo.yaml: {path}: unknown key"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["devices"][0].update(memory_mib=-1), "devices[0].memory_mib: must be > 0"),
        (lambda d: d["devices"][2].update(compute_gflops=-5),
         "devices[2].compute_gflops: must be > 0"),
        (lambda d: d["links"]["default"].update(bandwidth_mbit=0),
         "links.default.bandwidth_mbit: must be > 0"),
        (lambda d: d["links"]["default"].update(latency_ms=-1),
         "links.default.latency_ms: must be >= 0"),
        (lambda d: d["links"]["pairs"][0].update(bandwidth_mbit=0),
         "links.pairs[0].bandwidth_mbit: must be > 0"),
        (lambda d: d["traces"][1].update(memory_mib=0), "traces[1].memory_mib: must be > 0"),
        (lambda d: d["traces"][2].update(bandwidth_mbit=-2),
         "traces[2].bandwidth_mbit: must be >= 0"),  # 0 cuts the link
        (lambda d: d["traces"][0].update(background_load=1.0),
         "traces[0].background_load: must be < 1"),
        (lambda d: d["traces"][0].update(background_load=-0.1),
         "traces[0].background_load: must be >= 0"),
        (lambda d: d.update(generate_tokens=0), "generate_tokens: must be >= 1"),
        (lambda d: d.update(prompt_tokens=0), "prompt_tokens: must be >= 1"),
        (lambda d: d.update(replan_every=0), "replan_every: must be >= 1"),
    ],
)
def test_zero_or_negative_capacities(mutate, message):
    d = base()
    mutate(d)
    assert error_of(d) == f"demo.yaml: {message}"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["devices"][1].update(compute_gflops=True),
         "devices[1].compute_gflops: must be a number"),
        (lambda d: d["devices"][1].update(memory_mib="512"),
         "devices[1].memory_mib: must be a number"),
        (lambda d: d.update(generate_tokens=6.5), "generate_tokens: must be an integer"),
        (lambda d: d["devices"][1].update(source="yes"),
         "devices[1].source: must be true or false"),
        (lambda d: d.update(weights_from="cloud"), "weights_from: must be 'disk' or 'peer'"),
        (lambda d: d["devices"][1].update(name="d 1"),
         "devices[1].name: must match [A-Za-z0-9_-]+ (letters, digits, '_' and '-')"),
        (lambda d: d.update(devices=[]), "devices: must have at least 1 item(s)"),
        (lambda d: d["traces"][3].update(fail=False), "traces[3].fail: must be true"),
        (lambda d: d.pop("generate_tokens"), "generate_tokens: required"),
        (lambda d: d.pop("prompt_tokens"),
         "prompt_tokens: required (or give prompt: TEXT to estimate it)"),
    ],
)
def test_bad_types_and_missing_keys(mutate, message):
    d = base()
    mutate(d)
    assert error_of(d) == f"demo.yaml: {message}"


def test_unknown_device_in_a_link_pair():
    d = base()
    d["links"]["pairs"][0]["b"] = "d9"
    assert error_of(d) == "demo.yaml: links.pairs[0].b: unknown device 'd9'; devices are d0, d1, d2"


def test_link_pair_to_itself_and_duplicate_pair():
    d = base()
    d["links"]["pairs"].append({"a": "d2", "b": "d2", "bandwidth_mbit": 5})
    assert "links.pairs[1].b: a link joins two different devices" in error_of(d)
    d = base()
    d["links"]["pairs"].append({"a": "d1", "b": "d0", "bandwidth_mbit": 5})
    assert error_of(d) == "demo.yaml: links.pairs[1]: duplicate link d1-d0 (also links.pairs[0])"


def test_unknown_device_in_a_trace():
    d = base()
    d["traces"][0]["device"] = "phone"
    assert error_of(d) == (
        "demo.yaml: traces[0].device: unknown device 'phone'; devices are d0, d1, d2")
    d = base()
    d["traces"][2]["link"] = ["d0", "phone"]
    assert error_of(d) == (
        "demo.yaml: traces[2].link[1]: unknown device 'phone'; devices are d0, d1, d2")


def test_no_source():
    d = base()
    d["devices"][0]["source"] = False
    assert error_of(d) == "demo.yaml: devices: no device has source: true; exactly one must"


def test_several_sources():
    d = base()
    d["devices"][2]["source"] = True
    assert error_of(d) == (
        "demo.yaml: devices[2].source: several sources (d0, d2); exactly one device may be")


def test_duplicate_device_names():
    d = base()
    d["devices"][2]["name"] = "d1"
    assert error_of(d) == "demo.yaml: devices[2].name: duplicate device name 'd1' (also devices[1])"


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_wrong_version(version):
    d = base()
    d["version"] = version
    assert error_of(d) == (
        "demo.yaml: version: must be 1 (this edgepart reads scenario version 1)")


def test_missing_version():
    d = base()
    del d["version"]
    assert error_of(d) == "demo.yaml: version: required"


def test_bad_dtype():
    d = base()
    d["model"]["dtype"] = "int4"
    assert error_of(d).startswith("demo.yaml: model.dtype: unknown dtype 'int4'")
    d = base()
    d["model"] = {"layers": 2, "d_model": 64, "heads": 4, "kv_heads": 4, "d_ff": 128,
                  "vocab": 100, "dtype": "fp8"}
    assert error_of(d).startswith("demo.yaml: model.dtype: unknown dtype 'fp8'")


def test_bad_model_sources():
    d = base()
    d["model"] = {"preset": "gpt-5"}
    assert error_of(d).startswith("demo.yaml: model.preset: unknown preset 'gpt-5'; known: ")
    d["model"] = {"preset": "smollm2-135m", "layers": 3}
    assert error_of(d).startswith("demo.yaml: model: must be a mapping with exactly one of")
    d["model"] = "smollm2-135m"
    assert error_of(d).startswith("demo.yaml: model: must be a mapping with exactly one of")
    d["model"] = {"layers": 2, "d_model": 64, "heads": 4, "kv_heads": 3, "d_ff": 128, "vocab": 9}
    assert error_of(d) == "demo.yaml: model: heads (4) must be a multiple of kv_heads (3)"
    d["model"] = {"layers": 2, "d_model": 64, "heads": 4, "kv_heads": 4, "vocab": 9}
    assert error_of(d) == "demo.yaml: model.d_ff: required"
    d["model"] = {"hf": "/nonexistent/folder"}
    assert error_of(d) == "demo.yaml: model.hf: no config.json at /nonexistent/folder"


def test_model_that_cannot_fit_names_needed_and_available_mib():
    d = base()
    for dev in d["devices"]:
        dev["memory_mib"] = 128
    table = block_table(preset("smollm2-135m"))
    need = (table.memory_bytes(96).sum() + table.source_weight_bytes) / MIB
    assert error_of(d) == (
        f"demo.yaml: model: smollm2-135m needs {need:.1f} MiB at the last token (context 96: "
        "weights, KV cache, embedding and LM head) but the devices have 384.0 MiB together")


def test_source_must_hold_embedding_and_lm_head():
    d = base()
    d["devices"][0]["memory_mib"] = 64
    assert error_of(d) == (
        "demo.yaml: devices[0].memory_mib: the source holds the embedding and LM head "
        "(108.0 MiB) but has 64 MiB")


def test_trace_at_token_beyond_the_generation():
    d = base()
    d["traces"][3]["at_token"] = 64
    assert error_of(d) == (
        "demo.yaml: traces[3].at_token: must be < generate_tokens (64): "
        "token 64 is never generated")
    d["traces"][3]["at_token"] = 63
    assert parse_scenario(d, "x").traces[3].at_token == 63


def test_trace_triggers_and_changes_are_exactly_one():
    d = base()
    d["traces"][0]["at_s"] = 1.5
    assert error_of(d) == "demo.yaml: traces[0]: give exactly one trigger: at_token or at_s"
    d = base()
    del d["traces"][0]["at_token"]
    assert error_of(d) == "demo.yaml: traces[0]: give exactly one trigger: at_token or at_s"
    d = base()
    d["traces"][0]["memory_mib"] = 100
    assert error_of(d).startswith("demo.yaml: traces[0]: must be a mapping with exactly one change")
    d = base()
    d["traces"][0] = {"at_s": 2.0, "device": "d1", "background_load": 0.5}
    assert parse_scenario(d, "x").traces[0].at_s == 2.0


def test_several_problems_are_all_reported():
    d = base()
    d["devices"][0]["source"] = False
    d["traces"][0]["device"] = "zz"
    lines = error_of(d).splitlines()
    assert "demo.yaml: devices: no device has source: true; exactly one must" in lines
    assert any(line.startswith("demo.yaml: traces[0].device: unknown device 'zz'")
               for line in lines)


# ---------------------------------------------------------------- files


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert str(info.value) == f"{path}: no such file"


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\ndevices: [\n  {name: d0\n")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: line ")
    assert "YAML syntax error" in msg


def test_duplicate_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("version: 1\nname: a\nname: b\n")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert str(info.value) == f"{path}: line 3, column 1: YAML syntax error: duplicate key 'name'"


def test_empty_file_and_non_mapping(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    with pytest.raises(ScenarioError, match="the scenario is empty"):
        load_scenario(path)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ScenarioError, match=r"must be a mapping \(key: value\), not a list"):
        load_scenario(path)


def test_file_errors_carry_the_path_as_given(tmp_path):
    path = tmp_path / "demo.yaml"
    d = base()
    d["devices"][1]["compute_gflops"] = 0
    path.write_text(json.dumps(d))
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert str(info.value) == f"{path}: devices[1].compute_gflops: must be > 0"


def test_model_validate_directly_also_rejects():
    d = base()
    d["devices"][0]["source"] = False
    with pytest.raises(ValidationError, match="no device has source"):
        Scenario.model_validate(d)


def test_join_traces_bring_devices_in_late_or_back():
    d = base()
    d["traces"] += [
        {"at_token": 60, "device": "d1", "join": True},  # back after its fail at 56
        {"at_token": 10, "device": "d2", "join": True},  # new: offline until token 10
    ]
    s = parse_scenario(d, "x")
    assert [t.kind for t in s.traces][-2:] == ["join", "join"]
    assert s.offline_at_start == {"d2"}


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        (
            [{"at_token": 10, "device": "d2", "join": True},
             {"at_token": 12, "device": "d2", "join": True}],
            "traces[5].join: d2 is already online at token 12",
        ),
        (
            [{"at_token": 57, "device": "d1", "fail": True}],
            "traces[4].fail: d1 is already offline at token 57",
        ),
        (
            [{"at_token": 5, "device": "d0", "join": True}],
            "traces[4].join: the source device is online from the start",
        ),
        (
            [{"at_s": 5.0, "device": "d2", "fail": True},
             {"at_token": 9, "device": "d2", "join": True}],
            "traces[4].at_s: d2 has a join trace: its fail and join traces need at_token",
        ),
    ],
)
def test_fail_and_join_must_alternate(changes, problem):
    d = base()
    d["traces"] += changes
    assert problem in error_of(d)


def test_only_a_link_with_the_source_can_be_cut():
    d = base()
    d["traces"].append({"at_token": 30, "link": ["d0", "d2"], "bandwidth_mbit": 0})
    assert parse_scenario(d, "x").traces[-1].bandwidth_mbit == 0
    d = base()
    d["traces"].append({"at_token": 30, "link": ["d1", "d2"], "bandwidth_mbit": 0})
    assert "traces[4].bandwidth_mbit: 0 cuts a link, and only a link with the source" in (
        error_of(d)
    )
