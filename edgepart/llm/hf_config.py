"""Read a Hugging Face ``config.json`` into a ModelSpec (llama, mistral, qwen2 and gpt2 keys)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgepart.llm.model import ModelSpec, canonical_dtype

# Architectures whose config keys and block layout we know. Other llama-like model types
# (same key names, gated MLP, no QKV bias unless `attention_bias`) are read the same way.
GPT2_TYPES = frozenset({"gpt2"})
QKV_BIAS_TYPES = frozenset({"qwen2", "gpt2"})  # GPT-2's c_attn carries a bias too


def spec_from_hf_config(config: dict[str, Any], name: str | None = None) -> ModelSpec:
    """A ModelSpec from a parsed config.json; raises ValueError naming a missing or bad key."""
    model_type = str(config.get("model_type", "")).lower()
    if config.get("is_encoder_decoder"):
        raise ValueError(f"{model_type or 'this model'} is an encoder-decoder; only decoders fit")
    gpt2 = model_type in GPT2_TYPES or ("n_embd" in config and "hidden_size" not in config)

    def get(*keys: str, default: Any = None) -> Any:
        for key in keys:
            if config.get(key) is not None:
                return config[key]
        if default is None:
            raise ValueError(f"config.json has none of {', '.join(keys)}")
        return default

    layers = int(get("num_hidden_layers", "n_layer"))
    d_model = int(get("hidden_size", "n_embd"))
    heads = int(get("num_attention_heads", "n_head"))
    # Without num_key_value_heads the model is plain multi-head attention.
    kv_heads = int(get("num_key_value_heads", default=heads))
    # GPT-2 leaves n_inner null and uses 4 * n_embd.
    d_ff = int(get("intermediate_size", "n_inner", default=4 * d_model))
    vocab = int(get("vocab_size"))
    # transformers >= 4.56 writes "dtype"; older versions "torch_dtype"; absent means fp32.
    dtype = canonical_dtype(str(get("torch_dtype", "dtype", default="float32")))
    # PretrainedConfig defaults to tied embeddings; llama/mistral/qwen2 configs override it
    # to False, and their config.json always spells it out when it matters.
    tied = bool(config.get("tie_word_embeddings", gpt2))
    head_dim = int(config.get("head_dim") or 0)
    if "attention_bias" in config:
        qkv_bias = bool(config["attention_bias"])
    else:
        qkv_bias = gpt2 or model_type in QKV_BIAS_TYPES
    spec_name = name or str(config.get("_name_or_path") or model_type or "hf-model")
    return ModelSpec(
        name=spec_name,
        layers=layers,
        d_model=d_model,
        heads=heads,
        kv_heads=kv_heads,
        d_ff=d_ff,
        vocab=vocab,
        dtype=dtype,
        head_dim=head_dim,
        tied_embeddings=tied,
        ffn="gelu" if gpt2 else "swiglu",
        qkv_bias=qkv_bias,
        norm="layer" if gpt2 else "rms",
        learned_positions=int(get("n_positions", "max_position_embeddings", default=1024))
        if gpt2
        else 0,
        extra={"model_type": model_type or "unknown", "format": "hf"},
    )


def load_hf_config(path: str | Path) -> ModelSpec:
    """The ModelSpec of a Hugging Face model directory (or its config.json file).

    Raises FileNotFoundError if there is no config.json, ValueError if it is malformed.
    """
    p = Path(path)
    cfg_path = p / "config.json" if p.is_dir() else p
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no config.json at {cfg_path}")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path} does not hold a JSON object")
    name = p.name if p.is_dir() else p.parent.name
    return spec_from_hf_config(config, name=name or None)
