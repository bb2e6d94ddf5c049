"""Block decomposition and per-block costs, checked against numbers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from edgepart.llm import blocks
from edgepart.llm.blocks import BlockKind, block_table
from edgepart.llm.model import ModelSpec, preset

SMOL = preset("smollm2-135m")  # d 576, 9 heads, 3 KV heads, head_dim 64, d_ff 1536, tied, fp32
LLAMA = preset("llama3-8b")  # d 4096, 32 heads, 8 KV heads, head_dim 128, d_ff 14336, bf16

# SmolLM2-135M's published parameter count (HF safetensors metadata).
SMOL_PARAMS = 134_515_008
LLAMA3_8B_PARAMS = 8_030_261_248


def test_presets_have_the_expected_shapes():
    assert (SMOL.layers, SMOL.d_model, SMOL.heads, SMOL.kv_heads) == (30, 576, 9, 3)
    assert (SMOL.head_dim, SMOL.queries_per_group, SMOL.bytes_per_element) == (64, 3, 4)
    assert SMOL.tied_embeddings and SMOL.dtype == "float32"
    assert (LLAMA.head_dim, LLAMA.queries_per_group, LLAMA.bytes_per_element) == (128, 4, 2)
    assert not LLAMA.tied_embeddings and LLAMA.dtype == "bfloat16"


# ----------------------------------------------------------------- smollm2-135m by hand


def test_smollm2_group_flops():
    # QKV: 2 * d * (q + 2) * head_dim = 2*576*5*64 = 368_640
    # attention over n positions: scores + weighted sum = 4 * q * head_dim * n = 768 n
    assert blocks.group_flops(SMOL, 10) == 2 * 576 * (3 + 2) * 64 + 4 * 3 * 64 * 10
    assert blocks.group_flops(SMOL, 10) == 376_320
    assert blocks.group_flops(SMOL, 0) == 368_640
    np.testing.assert_array_equal(
        blocks.group_flops(SMOL, np.array([0, 1, 100])), [368_640, 369_408, 445_440]
    )


def test_smollm2_proj_ffn_and_head_flops():
    assert blocks.proj_flops(SMOL) == 2 * 9 * 64 * 576 == 663_552
    assert blocks.ffn_flops(SMOL) == 6 * 576 * 1536 == 5_308_416  # SwiGLU: 3 matrices
    assert blocks.lm_head_flops(SMOL) == 2 * 576 * 49152 == 56_623_104


def test_smollm2_weight_bytes():
    # Wq/Wk/Wv slices: (3 + 2) * 64 * 576 = 184_320 weights, + the attention norm (576)
    assert blocks.group_weight_bytes(SMOL) == (184_320 + 576) * 4 == 739_584
    assert blocks.proj_weight_bytes(SMOL) == 9 * 64 * 576 * 4 == 1_327_104
    # gate, up, down: 3 * 576 * 1536 = 2_654_208, + the post-attention norm (576)
    assert blocks.ffn_weight_bytes(SMOL) == (2_654_208 + 576) * 4 == 10_619_136


def test_smollm2_kv_and_output_bytes():
    assert blocks.kv_bytes_per_token(SMOL) == 2 * 64 * 4 == 512  # K and V of one head
    assert blocks.group_output_bytes(SMOL) == 3 * 64 * 4 == 768  # three heads' outputs
    assert blocks.hidden_bytes(SMOL) == 576 * 4 == 2304


def test_smollm2_source_weights_are_tied():
    # tied: embedding (49152 x 576) doubles as LM head; + final norm (576)
    assert blocks.source_weight_bytes(SMOL) == (49152 * 576 + 576) * 4 == 113_248_512


def test_untied_source_weights_count_the_lm_head():
    # llama3-8b: embedding + LM head (2 x 128256 x 4096) + final norm, bf16
    assert blocks.source_weight_bytes(LLAMA) == (2 * 128256 * 4096 + 4096) * 2
    untied = ModelSpec(**{**_fields(SMOL), "tied_embeddings": False})
    tied_bytes = blocks.source_weight_bytes(SMOL)
    assert blocks.source_weight_bytes(untied) - tied_bytes == 49152 * 576 * 4


def test_smollm2_total_weights_match_the_parameter_count():
    table = block_table(SMOL)
    params = (table.weight_bytes.sum() + table.source_weight_bytes) / 4
    # per layer: 3 groups (184_896) + Wo (331_776) + FFN (2_654_784) = 3_541_248; x 30,
    # + embedding and final norm 28_312_128 = 134_549_568 (the 2 extra attention-norm
    # copies per layer are the 34_560 over the published count)
    assert params == 134_549_568
    assert params == pytest.approx(SMOL_PARAMS, rel=0.01)
    assert table.source_weight_bytes / 4 == pytest.approx(28.3e6, rel=0.01)


# ----------------------------------------------------------------- llama3-8b by hand


def test_llama3_8b_formulas():
    # q = 4 query heads per group, head_dim 128
    assert blocks.group_flops(LLAMA, 0) == 2 * 4096 * 6 * 128 == 6_291_456
    assert blocks.group_flops(LLAMA, 1000) == 6_291_456 + 4 * 4 * 128 * 1000
    assert blocks.proj_flops(LLAMA) == 2 * 32 * 128 * 4096
    assert blocks.ffn_flops(LLAMA) == 6 * 4096 * 14336
    assert blocks.lm_head_flops(LLAMA) == 2 * 4096 * 128256
    assert blocks.group_weight_bytes(LLAMA) == (6 * 128 * 4096 + 4096) * 2 == 6_299_648
    assert blocks.proj_weight_bytes(LLAMA) == 32 * 128 * 4096 * 2 == 33_554_432
    assert blocks.ffn_weight_bytes(LLAMA) == (3 * 4096 * 14336 + 4096) * 2 == 352_329_728
    assert blocks.kv_bytes_per_token(LLAMA) == 2 * 128 * 2 == 512
    assert blocks.group_output_bytes(LLAMA) == 4 * 128 * 2 == 1024
    assert blocks.hidden_bytes(LLAMA) == 4096 * 2


def test_llama3_8b_total_weights_match_the_parameter_count():
    table = block_table(LLAMA)
    params = (table.weight_bytes.sum() + table.source_weight_bytes) / 2
    assert params == pytest.approx(LLAMA3_8B_PARAMS, rel=0.01)


def test_qkv_bias_adds_one_bias_per_projected_column():
    biased = ModelSpec(**{**_fields(SMOL), "qkv_bias": True})
    extra = blocks.group_weight_bytes(biased) - blocks.group_weight_bytes(SMOL)
    assert extra == (3 + 2) * 64 * 4


# ----------------------------------------------------------------- dtypes and FFN kinds


def test_fp16_halves_every_byte_count_and_keeps_flops():
    half = preset("smollm2-135m", "fp16")
    assert half.dtype == "float16" and half.bytes_per_element == 2
    full, small = block_table(SMOL), block_table(half)
    np.testing.assert_array_equal(small.weight_bytes * 2, full.weight_bytes)
    np.testing.assert_array_equal(small.kv_bytes_per_token * 2, full.kv_bytes_per_token)
    np.testing.assert_array_equal(small.output_bytes * 2, full.output_bytes)
    assert small.source_weight_bytes * 2 == full.source_weight_bytes
    np.testing.assert_array_equal(small.flops(37), full.flops(37))
    assert small.source_flops == full.source_flops


def test_gelu_ffn_has_two_matrices_with_biases():
    gelu = ModelSpec("g", layers=1, d_model=8, heads=2, kv_heads=2, d_ff=32, vocab=10, ffn="gelu")
    assert blocks.ffn_flops(gelu) == 4 * 8 * 32  # up and down, 2 FLOPs per multiply-add
    # W_up (8x32) + b_up (32) + W_down (32x8) + b_down (8) + norm (8), fp32
    assert blocks.ffn_weight_bytes(gelu) == (2 * 8 * 32 + 32 + 8 + 8) * 4 == 2240
    swiglu = ModelSpec("s", layers=1, d_model=8, heads=2, kv_heads=2, d_ff=32, vocab=10)
    assert blocks.ffn_weight_bytes(swiglu) == (3 * 8 * 32 + 8) * 4
    assert blocks.ffn_flops(swiglu) == 6 * 8 * 32


# ----------------------------------------------------------------- the block table


def test_block_ids_and_names_run_layer_by_layer():
    table = block_table(SMOL)
    assert table.size == 30 * (3 + 2) == 150
    assert table.per_layer == 5 and table.groups == 3
    assert table.names[:10] == (
        "L0.g0", "L0.g1", "L0.g2", "L0.proj", "L0.ffn",
        "L1.g0", "L1.g1", "L1.g2", "L1.proj", "L1.ffn",
    )  # fmt: skip
    assert table.names[-1] == "L29.ffn"
    assert list(table.kind[:5]) == [BlockKind.HEADS] * 3 + [BlockKind.PROJ, BlockKind.FFN]
    np.testing.assert_array_equal(table.layer[:10], [0] * 5 + [1] * 5)
    np.testing.assert_array_equal(table.group_ids(2), [10, 11, 12])
    assert (table.proj_id(2), table.ffn_id(2)) == (13, 14)
    assert table.index("L3.g1") == 16 and table.index("L29.ffn") == 149
    with pytest.raises(KeyError, match=r"L30\.g0"):
        table.index("L30.g0")


@pytest.mark.parametrize(
    ("layers", "heads", "kv_heads"), [(1, 4, 4), (3, 8, 2), (5, 6, 1), (2, 9, 3)]
)
def test_table_size_is_layers_times_groups_plus_two(layers, heads, kv_heads):
    spec = ModelSpec(
        "t", layers=layers, d_model=heads * 8, heads=heads, kv_heads=kv_heads, d_ff=16, vocab=10
    )
    table = block_table(spec)
    assert table.size == layers * (kv_heads + 2) == len(table.kind) == len(table.weight_bytes)
    assert (table.kind == BlockKind.HEADS).sum() == layers * kv_heads


def test_table_arrays_carry_the_block_formulas():
    table = block_table(SMOL)
    g, p, f = 0, table.proj_id(0), table.ffn_id(0)
    n = 10
    assert table.flops(n)[g] == 376_320
    assert table.flops(n)[p] == 663_552 and table.flops(n)[f] == 5_308_416
    assert table.flops_per_context[g] == 768 and table.flops_per_context[p] == 0
    assert list(table.weight_bytes[[g, p, f]]) == [739_584, 1_327_104, 10_619_136]
    assert list(table.kv_bytes_per_token[[g, p, f]]) == [512, 0, 0]
    assert list(table.kv_bytes(n)[[g, p, f]]) == [5120, 0, 0]
    assert list(table.memory_bytes(n)[[g, p, f]]) == [739_584 + 5120, 1_327_104, 10_619_136]
    assert list(table.output_bytes[[g, p, f]]) == [768, 2304, 2304]
    assert table.source_weight_bytes == 113_248_512
    assert table.source_flops == 56_623_104


def test_explicit_head_dim_is_used():
    spec = ModelSpec("h", layers=1, d_model=100, heads=4, kv_heads=2, d_ff=8, vocab=5, head_dim=32)
    assert spec.head_dim == 32
    assert blocks.group_flops(spec, 0) == 2 * 100 * (2 + 2) * 32
    assert blocks.proj_weight_bytes(spec) == 4 * 32 * 100 * 4


# ----------------------------------------------------------------- validation


def test_heads_must_be_a_multiple_of_kv_heads():
    with pytest.raises(ValueError, match=r"heads \(9\) must be a multiple of kv_heads \(2\)"):
        ModelSpec("x", layers=1, d_model=576, heads=9, kv_heads=2, d_ff=8, vocab=5)


def test_d_model_must_divide_by_heads_without_head_dim():
    with pytest.raises(ValueError, match="not divisible"):
        ModelSpec("x", layers=1, d_model=100, heads=3, kv_heads=3, d_ff=8, vocab=5)


@pytest.mark.parametrize("dtype", ["int8", "float64", ""])
def test_unknown_dtype_is_rejected(dtype):
    with pytest.raises(ValueError, match="unknown dtype"):
        ModelSpec("x", layers=1, d_model=8, heads=2, kv_heads=2, d_ff=8, vocab=5, dtype=dtype)


@pytest.mark.parametrize("key", ["layers", "d_model", "heads", "kv_heads", "d_ff", "vocab"])
def test_shapes_must_be_positive(key):
    shapes = {"layers": 1, "d_model": 8, "heads": 2, "kv_heads": 2, "d_ff": 8, "vocab": 5}
    with pytest.raises(ValueError, match=f"{key} must be positive"):
        ModelSpec("x", **{**shapes, key: 0})


def test_dtype_aliases_are_canonicalised():
    spec = ModelSpec("x", layers=1, d_model=8, heads=2, kv_heads=2, d_ff=8, vocab=5, dtype="BF16")
    assert spec.dtype == "bfloat16" and spec.bytes_per_element == 2


def _fields(spec: ModelSpec) -> dict:
    return {k: getattr(spec, k) for k in ModelSpec.__dataclass_fields__ if k != "extra"}
