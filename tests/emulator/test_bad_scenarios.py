"""Bad scenario files through the real CLI: each exits 2 naming the file, the key path and why.

One table, one row per bad file: an id, the YAML that spoils a small valid scenario (its
top-level sections replace the base's; ``drop`` removes base sections; ``whole`` files are
taken as they are), the key path the message must name (``""`` for the file as a whole) and
a fragment of the reason. Each row runs ``edgepart plan`` on the file (the cheapest command
that loads a scenario) and expects exit 2, nothing on stdout and one problem line
``<file>: <key path>: <reason>`` on stderr.

Not in the table, on purpose: a ``fail`` trace of the source device. It is a valid
scenario whose run stops at that token with exit 1 (tests/test_cli.py,
tests/emulator/test_sim.py), the source's death being a fault to emulate, not bad input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgepart.controller.cli import app

#: a small valid scenario, by top-level section (explicit tiny shapes: nothing to read)
BASE: dict[str, str] = {
    "version": "version: 1",
    "name": "name: bad-input",
    "model": "model: {layers: 2, d_model: 64, heads: 4, kv_heads: 4, d_ff: 128, vocab: 1000}",
    "prompt_tokens": "prompt_tokens: 8",
    "generate_tokens": "generate_tokens: 16",
    "replan_every": "replan_every: 4",
    "devices": """devices:
  - {name: d0, compute_gflops: 10, memory_mib: 512, source: true}
  - {name: d1, compute_gflops: 5, memory_mib: 256}""",
    "links": """links:
  default: {bandwidth_mbit: 100, latency_ms: 2}
  pairs:
    - {a: d0, b: d1, bandwidth_mbit: 50}""",
    "traces": """traces:
  - {at_token: 4, device: d1, background_load: 0.5}""",
}


@dataclass(frozen=True)
class Bad:
    """One bad scenario file and what its error must say."""

    id: str
    yaml: str  # top-level sections replacing the base's (the whole file when whole)
    key: str  # the key path named (or where in the file, for YAML errors); "" = the file
    reason: str  # a fragment of the reason
    drop: tuple[str, ...] = ()  # base sections to leave out
    whole: bool = False


TWO_DEVICES = "devices:\n  - {{name: d0, {0}}}\n  - {{name: d1, {1}}}"
DEVICE_0 = "compute_gflops: 10, memory_mib: 512, source: true"
DEVICE_1 = "compute_gflops: 5, memory_mib: 256"


def devices(first: str = DEVICE_0, second: str = DEVICE_1) -> str:
    """The base's two devices, with other fields."""
    return TWO_DEVICES.format(first, second)


def links(pairs: str, default: str = "{bandwidth_mbit: 100, latency_ms: 2}") -> str:
    """A links section with the default link and these pairs (one flow mapping a line)."""
    lines = "".join(f"\n    - {p}" for p in pairs.split("\n")) if pairs else " []"
    return f"links:\n  default: {default}\n  pairs:{lines}"


def traces(*entries: str) -> str:
    """A traces section of these flow mappings."""
    return "traces:" + "".join(f"\n  - {e}" for e in entries)


CASES: list[Bad] = [
    # -- the file as a whole
    Bad("yaml-syntax", "devices: [{name: d0, compute_gflops: 10", "line 2, column 8",
        "YAML syntax error"),
    Bad("yaml-tab-indent", "links:\n\tdefault: {bandwidth_mbit: 1}", "line 2, column 1",
        "YAML syntax error"),
    Bad("yaml-duplicate-key", "name: a\nname: b", "line 2, column 1", "duplicate key 'name'"),
    Bad("not-a-mapping", "- version: 1\n- name: x\n", "",
        "must be a mapping (key: value), not a list", whole=True),
    Bad("a-bare-string", "just some text\n", "", "must be a mapping (key: value), not a str",
        whole=True),
    Bad("empty-file", "", "", "the scenario is empty", whole=True),
    # -- top level
    Bad("unknown-top-level-key", "colour: blue", "colour", "unknown key"),
    Bad("version-2", "version: 2", "version", "must be 1"),
    Bad("version-as-text", 'version: "1"', "version", "must be 1"),
    Bad("version-missing", "", "version", "required", drop=("version",)),
    Bad("name-missing", "", "name", "required", drop=("name",)),
    Bad("name-empty", 'name: ""', "name", "must not be empty"),
    Bad("prompt-tokens-zero", "prompt_tokens: 0", "prompt_tokens", "must be >= 1"),
    Bad("prompt-tokens-negative", "prompt_tokens: -5", "prompt_tokens", "must be >= 1"),
    Bad("prompt-tokens-fraction", "prompt_tokens: 8.5", "prompt_tokens", "must be an integer"),
    Bad("prompt-tokens-missing", "", "prompt_tokens", "required (or give prompt: TEXT",
        drop=("prompt_tokens",)),
    Bad("generate-tokens-zero", "generate_tokens: 0", "generate_tokens", "must be >= 1"),
    Bad("replan-every-zero", "replan_every: 0", "replan_every", "must be >= 1"),
    Bad("replan-every-negative", "replan_every: -8", "replan_every", "must be >= 1"),
    Bad("weights-from-the-cloud", "weights_from: cloud", "weights_from",
        "must be 'disk' or 'peer'"),
    # -- model
    Bad("unknown-preset", "model: {preset: gpt-5}", "model.preset", "unknown preset 'gpt-5'"),
    Bad("gguf-missing", "model: {gguf: no/such/model.gguf}", "model.gguf", "no such file"),
    Bad("hf-folder-missing", "model: {hf: no/such/folder}", "model.hf", "no config.json"),
    Bad("two-model-sources", "model: {preset: smollm2-135m, layers: 2}", "model",
        "must be a mapping with exactly one of preset, gguf, hf"),
    Bad("model-not-a-mapping", "model: smollm2-135m", "model",
        "must be a mapping with exactly one"),
    Bad("heads-not-a-multiple", "model: {layers: 2, d_model: 64, heads: 4, kv_heads: 3, d_ff: 128, "
        "vocab: 1000}", "model", "heads (4) must be a multiple of kv_heads (3)"),
    Bad("shape-missing", "model: {layers: 2, d_model: 64, heads: 4, kv_heads: 4, vocab: 1000}",
        "model.d_ff", "required"),
    Bad("shape-zero", "model: {layers: 0, d_model: 64, heads: 4, kv_heads: 4, d_ff: 128, "
        "vocab: 1000}", "model.layers", "must be >= 1"),
    Bad("unknown-dtype", "model: {preset: smollm2-135m, dtype: int3}", "model.dtype",
        "unknown dtype 'int3'"),
    Bad("model-does-not-fit", "model: {preset: smollm2-135m}\n" + devices(
        "compute_gflops: 10, memory_mib: 200, source: true", "compute_gflops: 5, memory_mib: 64"),
        "model", "but the devices have 264.0 MiB together"),
    # -- devices
    Bad("devices-missing", "", "devices", "required", drop=("devices", "links", "traces")),
    Bad("devices-empty", "devices: []", "devices", "must have at least 1 item", drop=("links",
        "traces")),
    Bad("unknown-device-key", devices(second=DEVICE_1 + ", cpu_cores: 4"), "devices[1].cpu_cores",
        "unknown key"),
    Bad("duplicate-device-names", "devices:\n  - {name: d0, " + DEVICE_0 + "}\n  - {name: d0, "
        + DEVICE_1 + "}", "devices[1].name", "duplicate device name 'd0' (also devices[0])"),
    Bad("device-name-with-a-space", devices().replace("d1", '"d 1"'), "devices[1].name",
        "must match"),
    Bad("two-sources", devices(second=DEVICE_1 + ", source: true"), "devices[1].source",
        "several sources (d0, d1)"),
    Bad("no-source", devices(first="compute_gflops: 10, memory_mib: 512"), "devices",
        "no device has source: true"),
    Bad("source-not-a-flag", devices(first="compute_gflops: 10, memory_mib: 512, source: 1"),
        "devices[0].source", "must be true or false"),
    Bad("zero-compute", devices(first="compute_gflops: 0, memory_mib: 512, source: true"),
        "devices[0].compute_gflops", "must be > 0"),
    Bad("negative-compute", devices(second="compute_gflops: -5, memory_mib: 256"),
        "devices[1].compute_gflops", "must be > 0"),
    Bad("compute-as-text", devices(second='compute_gflops: "5", memory_mib: 256'),
        "devices[1].compute_gflops", "must be a number"),
    Bad("negative-memory", devices(second="compute_gflops: 5, memory_mib: -256"),
        "devices[1].memory_mib", "must be > 0"),
    Bad("source-too-small", devices(first="compute_gflops: 10, memory_mib: 0.25, source: true"),
        "devices[0].memory_mib", "the source holds the embedding and LM head"),
    # -- links
    Bad("link-to-an-unknown-device", links("{a: d0, b: d9, bandwidth_mbit: 50}"),
        "links.pairs[0].b", "unknown device 'd9'; devices are d0, d1"),
    Bad("link-to-itself", links("{a: d1, b: d1, bandwidth_mbit: 50}"), "links.pairs[0].b",
        "a link joins two different devices"),
    Bad("link-twice",
        links("{a: d0, b: d1, bandwidth_mbit: 50}\n{a: d1, b: d0, bandwidth_mbit: 9}"),
        "links.pairs[1]", "duplicate link d1-d0 (also links.pairs[0])"),
    Bad("negative-pair-bandwidth", links("{a: d0, b: d1, bandwidth_mbit: -50}"),
        "links.pairs[0].bandwidth_mbit", "must be > 0"),
    Bad("zero-default-bandwidth", links("", "{bandwidth_mbit: 0}"), "links.default.bandwidth_mbit",
        "must be > 0"),
    Bad("negative-default-latency", links("", "{latency_ms: -2}"), "links.default.latency_ms",
        "must be >= 0"),
    Bad("negative-pair-latency", links("{a: d0, b: d1, bandwidth_mbit: 50, latency_ms: -1}"),
        "links.pairs[0].latency_ms", "must be >= 0"),
    Bad("pair-missing-bandwidth", links("{a: d0, b: d1}"), "links.pairs[0].bandwidth_mbit",
        "required"),
    Bad("unknown-link-key", links("", "{bandwidth_mbit: 100, jitter_ms: 3}"),
        "links.default.jitter_ms", "unknown key"),
    # -- traces
    Bad("trace-at-the-last-token", traces("{at_token: 16, device: d1, background_load: 0.5}"),
        "traces[0].at_token", "must be < generate_tokens (16): token 16 is never generated"),
    Bad("trace-far-beyond", traces("{at_token: 1000, device: d1, memory_mib: 64}"),
        "traces[0].at_token", "must be < generate_tokens (16)"),
    Bad("trace-negative-token", traces("{at_token: -1, device: d1, background_load: 0.5}"),
        "traces[0].at_token", "must be >= 0"),
    Bad("trace-negative-time", traces("{at_s: -0.5, device: d1, background_load: 0.5}"),
        "traces[0].at_s", "must be >= 0"),
    Bad("trace-two-triggers", traces("{at_token: 2, at_s: 1.0, device: d1, background_load: 0.5}"),
        "traces[0]", "give exactly one trigger: at_token or at_s"),
    Bad("trace-no-trigger", traces("{device: d1, background_load: 0.5}"), "traces[0]",
        "give exactly one trigger"),
    Bad("trace-unknown-device", traces("{at_token: 2, device: d9, fail: true}"),
        "traces[0].device", "unknown device 'd9'"),
    Bad("trace-unknown-link-end", traces("{at_token: 2, link: [d0, d9], bandwidth_mbit: 5}"),
        "traces[0].link[1]", "unknown device 'd9'"),
    Bad("trace-link-to-itself", traces("{at_token: 2, link: [d1, d1], bandwidth_mbit: 5}"),
        "traces[0].link", "a link joins two different devices"),
    Bad("trace-two-kinds", traces("{at_token: 2, device: d1, background_load: 0.5, memory_mib: 9}"),
        "traces[0]", "must be a mapping with exactly one change"),
    Bad("trace-no-change", traces("{at_token: 2, device: d1}"), "traces[0]",
        "must be a mapping with exactly one change"),
    Bad("trace-full-load", traces("{at_token: 2, device: d1, background_load: 1.0}"),
        "traces[0].background_load", "must be < 1"),
    Bad("trace-zero-memory", traces("{at_token: 2, device: d1, memory_mib: 0}"),
        "traces[0].memory_mib", "must be > 0"),
    Bad("trace-fail-false", traces("{at_token: 2, device: d1, fail: false}"), "traces[0].fail",
        "must be true"),
    Bad("trace-unknown-key", traces("{at_token: 2, device: d1, fail: true, reason: power}"),
        "traces[0].reason", "unknown key"),
    Bad("second-trace-bad", traces("{at_token: 2, device: d1, fail: true}",
                                   "{at_token: 3, link: [d0, d1], bandwidth_mbit: -1}"),
        "traces[1].bandwidth_mbit", "must be >= 0"),
    Bad("cut-without-the-source",
        "devices:\n  - {name: d0, compute_gflops: 10, memory_mib: 512, source: true}\n"
        "  - {name: d1, compute_gflops: 5, memory_mib: 256}\n"
        "  - {name: d2, compute_gflops: 5, memory_mib: 256}\n"
        + traces("{at_token: 3, link: [d1, d2], bandwidth_mbit: 0}"),
        "traces[0].bandwidth_mbit", "only a link with the source"),
    Bad("join-while-online", traces("{at_token: 3, device: d1, join: true}",
                                    "{at_token: 5, device: d1, join: true}"),
        "traces[1].join", "already online at token 5"),
    Bad("source-joins-late", traces("{at_token: 3, device: d0, join: true}"),
        "traces[0].join", "online from the start"),
]  # fmt: skip


def scenario_text(case: Bad) -> str:
    """The file a case writes: its sections first, then the base's it leaves alone."""
    if case.whole:
        return case.yaml
    replaced = {line.split(":", 1)[0] for line in case.yaml.splitlines() if line[:1].isalpha()}
    kept = [text for key, text in BASE.items() if key not in replaced and key not in case.drop]
    return "\n".join([case.yaml, *kept] if case.yaml else kept) + "\n"


def squash(text: str) -> str:
    """Text without whitespace: rich wraps long error lines at the console width."""
    return "".join(text.split())


def problems(stderr: str, path: Path) -> list[str]:
    """The problems of an error message, squashed, each without its ``<file>: `` prefix."""
    return squash(stderr).split(squash(f"{path}:"))[1:]


def test_the_base_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "base.yaml"
    path.write_text(scenario_text(Bad("base", "", "", "")), encoding="utf-8")
    result = CliRunner().invoke(app, ["plan", str(path), "--algorithm", "edgeshard"])
    assert result.exit_code == 0, result.stderr


def test_the_table_is_wide_and_its_ids_unique() -> None:
    assert len(CASES) >= 20
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_bad_scenario_exits_2_naming_key_path_and_reason(case: Bad, tmp_path: Path) -> None:
    path = tmp_path / f"{case.id}.yaml"
    path.write_text(scenario_text(case), encoding="utf-8")
    result = CliRunner().invoke(app, ["plan", str(path)])
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == ""
    found = problems(result.stderr, path)
    assert found, result.stderr
    head = squash(f"{case.key}:") if case.key else ""
    assert any(p.startswith(head) and squash(case.reason) in p for p in found), (
        f"no problem '{case.key}: ...{case.reason}...' in:\n{result.stderr}"
    )
