"""Reading Hugging Face config.json files into ModelSpecs."""

from __future__ import annotations

import json

import pytest

from edgepart.llm.blocks import block_table
from edgepart.llm.hf_config import load_hf_config, spec_from_hf_config
from edgepart.llm.model import preset

SMOLLM2_135M = {  # HuggingFaceTB/SmolLM2-135M, trimmed to the keys that matter
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "attention_bias": False,
}

QWEN2_05B = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}

MISTRAL_7B = {
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "head_dim": None,
}

GPT2 = {
    "model_type": "gpt2",
    "n_layer": 12,
    "n_embd": 768,
    "n_head": 12,
    "n_inner": None,
    "n_positions": 1024,
    "vocab_size": 50257,
    "activation_function": "gelu_new",
}


def test_llama_config_matches_the_smollm2_preset_shapes():
    spec = spec_from_hf_config(SMOLLM2_135M, name="SmolLM2-135M")
    want = preset("smollm2-135m", "bfloat16")
    for key in ("layers", "d_model", "heads", "kv_heads", "d_ff", "vocab", "head_dim",
                "tied_embeddings", "ffn", "qkv_bias", "dtype"):
        assert getattr(spec, key) == getattr(want, key), key
    assert spec.name == "SmolLM2-135M"
    # Same shapes => same block table sizes.
    assert block_table(spec).weight_bytes.sum() == block_table(want).weight_bytes.sum()


def test_qwen2_has_qkv_bias_and_gqa():
    spec = spec_from_hf_config(QWEN2_05B)
    assert (spec.layers, spec.d_model, spec.heads, spec.kv_heads) == (24, 896, 14, 2)
    assert spec.head_dim == 64
    assert spec.qkv_bias is True
    assert spec.ffn == "swiglu"
    assert spec.tied_embeddings is True
    assert spec.dtype == "bfloat16"


def test_mistral_untied_no_bias_null_head_dim():
    spec = spec_from_hf_config(MISTRAL_7B)
    assert (spec.kv_heads, spec.d_ff, spec.head_dim) == (8, 14336, 128)
    assert spec.tied_embeddings is False
    assert spec.qkv_bias is False


def test_gpt2_defaults_ffn_to_four_times_width_and_gelu():
    spec = spec_from_hf_config(GPT2)
    assert spec.d_ff == 4 * 768
    assert spec.ffn == "gelu"
    assert spec.kv_heads == spec.heads == 12
    assert spec.tied_embeddings is True  # PretrainedConfig's default, which GPT-2 keeps
    assert spec.dtype == "float32"  # no torch_dtype: fp32 checkpoint
    assert spec.qkv_bias is True  # c_attn has a bias


def test_explicit_head_dim_and_new_dtype_key():
    cfg = {**MISTRAL_7B, "head_dim": 256, "num_attention_heads": 8, "num_key_value_heads": 4}
    del cfg["torch_dtype"]
    cfg["dtype"] = "float16"
    spec = spec_from_hf_config(cfg)
    assert spec.head_dim == 256
    assert spec.dtype == "float16"


def test_missing_key_is_named():
    cfg = {k: v for k, v in SMOLLM2_135M.items() if k != "hidden_size"}
    with pytest.raises(ValueError, match="hidden_size, n_embd"):
        spec_from_hf_config(cfg)


def test_bad_dtype_and_encoder_decoder_are_rejected():
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        spec_from_hf_config({**SMOLLM2_135M, "torch_dtype": "int8"})
    with pytest.raises(ValueError, match="encoder-decoder"):
        spec_from_hf_config({**SMOLLM2_135M, "model_type": "t5", "is_encoder_decoder": True})


def test_load_from_folder_and_from_file(tmp_path):
    folder = tmp_path / "SmolLM2-135M"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SMOLLM2_135M))
    from_dir = load_hf_config(folder)
    from_file = load_hf_config(folder / "config.json")
    assert from_dir == from_file
    assert from_dir.name == "SmolLM2-135M"
    assert from_dir.extra["model_type"] == "llama"


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_hf_config(tmp_path)
