"""Tiny random checkpoints saved locally with transformers (never fetched from a hub)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# name -> (config class, kwargs, save_pretrained kwargs). No bos/eos/pad so that greedy
# generation never stops early; every model is fp32 and saved as safetensors. Weights are
# drawn 10x wider than the default (std 0.2) so that continuations vary instead of repeating
# one token, while the top-2 logit gaps stay far above float32 rounding.
_NO_SPECIAL = {
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
    "initializer_range": 0.2,
}
_LLAMA = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "vocab_size": 101,
    "tie_word_embeddings": False,
    **_NO_SPECIAL,
}
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "llama-gqa": ("LlamaConfig", {**_LLAMA, "rope_theta": 10000.0}, {}),
    # Llama 3 frequency scaling with a short original context, so all three bands occur.
    "llama3-rope": (
        "LlamaConfig",
        {
            **_LLAMA,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
        {},
    ),
    # Tied embeddings (no lm_head in the file) and a sharded checkpoint with an index.
    "qwen2": (
        "Qwen2Config",
        {**_LLAMA, "tie_word_embeddings": True, "rope_theta": 10000.0},
        {"max_shard_size": "40KB"},
    ),
    "gpt2": (
        "GPT2Config",
        {
            "n_embd": 64,
            "n_head": 4,
            "n_layer": 2,
            "vocab_size": 101,
            "n_positions": 128,
            **_NO_SPECIAL,
        },
        {},
    ),
}


def save_tiny_checkpoint(name: str, directory: Path, seed: int = 0) -> Path:
    """Build the random model ``name`` of TINY_CONFIGS and save it (fp32 safetensors)."""
    cls_name, kwargs, save_kwargs = TINY_CONFIGS[name]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True, **save_kwargs)
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: the directory of a tiny checkpoint by TINY_CONFIGS name, built once."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = save_tiny_checkpoint(name, tmp_path_factory.mktemp(name))
        return built[name]

    return get
