"""How a decoder computes (norms, positions, activation, biases), beyond the shapes of ModelSpec.

Two families are executed: 'llama' (RMSNorm, RoPE, SwiGLU; covers SmolLM2, Llama 2/3,
Mistral and Qwen2 with its QKV bias) and 'gpt2' (LayerNorm, learned positions, GELU,
biases everywhere). An Architecture is read from a Hugging Face ``config.json`` dict or
from GGUF metadata, and carries the ModelSpec the planner costs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from edgepart.llm.gguf_meta import spec_from_metadata
from edgepart.llm.hf_config import spec_from_hf_config
from edgepart.llm.model import ModelSpec

Family = Literal["llama", "gpt2"]
NormKind = Literal["rms", "layer"]
PositionKind = Literal["rope", "learned"]
ActKind = Literal["silu", "gelu_new"]

# Model types laid out like Llama (same tensor names, gated MLP, RoPE, RMSNorm).
LLAMA_LIKE = frozenset({"llama", "mistral", "qwen2", "smollm", "smollm2"})
GPT2_LIKE = frozenset({"gpt2"})


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 ('llama3') RoPE frequency scaling, as transformers implements it."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_positions: int


@dataclass(frozen=True)
class Architecture:
    """The compute recipe of a decoder: its ModelSpec plus everything the blocks need to run."""

    spec: ModelSpec
    family: Family
    norm: NormKind
    norm_eps: float
    positions: PositionKind
    act: ActKind
    qkv_bias: bool
    o_bias: bool  # bias on the attention output projection (GPT-2, Llama with attention_bias)
    mlp_bias: bool
    tie_word_embeddings: bool
    max_positions: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    # llama.cpp's per-frequency divisors (GGUF 'rope_freqs'), an alternative to rope_scaling.
    rope_freq_factors: tuple[float, ...] | None = field(default=None, repr=False)
    attn_scale_by_layer: bool = False  # GPT-2 scale_attn_by_inverse_layer_idx

    @property
    def head_dim(self) -> int:
        """Width of one attention head (elements)."""
        return self.spec.head_dim

    def attn_scale(self, layer: int) -> float:
        """Factor applied to q·k scores in that layer (1/sqrt(head_dim), GPT-2 may divide more)."""
        scale = self.head_dim**-0.5
        if self.attn_scale_by_layer:
            scale /= float(layer + 1)
        return scale

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies (head_dim/2 values, float32), scaled as transformers does."""
        if self.positions != "rope":
            raise ValueError(f"{self.family} uses learned positions, not RoPE")
        dim = self.head_dim
        inv = 1.0 / (
            self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim)
        )
        if self.rope_scaling is not None:
            inv = _llama3_scale(inv, self.rope_scaling)
        if self.rope_freq_factors is not None:
            factors = torch.tensor(self.rope_freq_factors, dtype=torch.float32)
            if factors.shape != inv.shape:
                raise ValueError(
                    f"rope_freq_factors has {factors.numel()} values, expected {inv.numel()}"
                )
            inv = inv / factors
        return inv

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], name: str | None = None) -> Architecture:
        """The architecture of a parsed HF config.json; raises ValueError if it is not supported."""
        cfg = dict(config)
        spec = spec_from_hf_config(cfg, name=name)
        model_type = str(cfg.get("model_type", "")).lower()
        gpt2 = model_type in GPT2_LIKE or ("n_embd" in cfg and "hidden_size" not in cfg)
        if gpt2:
            act = str(cfg.get("activation_function", "gelu_new"))
            if act != "gelu_new":
                raise ValueError(f"GPT-2 activation {act!r} is not supported (only gelu_new)")
            return cls._gpt2(
                spec,
                norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
                max_positions=int(cfg.get("n_positions") or cfg.get("n_ctx") or 1024),
                attn_scale_by_layer=bool(cfg.get("scale_attn_by_inverse_layer_idx", False)),
            )
        if model_type and model_type not in LLAMA_LIKE:
            raise ValueError(
                f"model_type {model_type!r} is not supported; "
                f"known: {', '.join(sorted(LLAMA_LIKE | GPT2_LIKE))}"
            )
        if cfg.get("use_sliding_window"):
            raise ValueError("sliding-window attention (use_sliding_window) is not supported")
        act = str(cfg.get("hidden_act", "silu"))
        if act != "silu":
            raise ValueError(f"activation {act!r} is not supported (only silu for llama-like)")
        theta, scaling = _rope_from_hf(cfg)
        max_positions = int(cfg.get("max_position_embeddings", 2048))
        if scaling is not None and scaling.original_max_positions <= 0:
            scaling = RopeScaling(
                scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor, max_positions
            )
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            spec=spec,
            family="llama",
            norm="rms",
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            positions="rope",
            act="silu",
            qkv_bias=spec.qkv_bias,
            # Qwen2 has q/k/v biases but none on o_proj; Llama's attention_bias sets all four.
            o_bias=attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=spec.tied_embeddings,
            max_positions=max_positions,
            rope_theta=theta,
            rope_scaling=scaling,
        )

    @classmethod
    def _gpt2(
        cls,
        spec: ModelSpec,
        norm_eps: float,
        max_positions: int,
        attn_scale_by_layer: bool = False,
    ) -> Architecture:
        """GPT-2: LayerNorm, learned positions, gelu_new, biases on every projection."""
        return cls(
            spec=spec,
            family="gpt2",
            norm="layer",
            norm_eps=norm_eps,
            positions="learned",
            act="gelu_new",
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            tie_word_embeddings=spec.tied_embeddings,
            max_positions=max_positions,
            attn_scale_by_layer=attn_scale_by_layer,
        )

    @classmethod
    def from_gguf_metadata(
        cls,
        meta: Mapping[str, Any],
        spec: ModelSpec | None = None,
        rope_freq_factors: tuple[float, ...] | None = None,
        tied_embeddings: bool = False,
    ) -> Architecture:
        """The architecture from GGUF key/value metadata (plain Python values).

        ``spec`` defaults to one built from the same metadata (``tied_embeddings``: the file
        has no ``output.weight``); ``rope_freq_factors`` are the values of the file's
        ``rope_freqs.weight`` tensor where it has one (Llama 3.1+).
        """
        arch = str(meta.get("general.architecture", "")).lower()
        if arch not in LLAMA_LIKE | GPT2_LIKE:
            raise ValueError(f"GGUF architecture {arch!r} is not supported")

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise ValueError(f"GGUF metadata has no {arch}.{key}")
            return value

        if spec is None:
            spec = replace(
                spec_from_metadata(dict(meta), dtype="float32"), tied_embeddings=tied_embeddings
            )
        if arch in GPT2_LIKE:
            return cls._gpt2(
                spec,
                norm_eps=float(get("attention.layer_norm_epsilon", 1e-5)),
                max_positions=int(get("context_length")),
            )
        # llama.cpp stores Llama 3 scaling as the rope_freqs tensor, not as metadata.
        rope_type = str(meta.get(f"{arch}.rope.scaling.type", "none"))
        if rope_type not in ("none", "llama3"):
            raise ValueError(f"GGUF rope scaling {rope_type!r} is not supported")
        return cls(
            spec=spec,
            family="llama",
            norm="rms",
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            positions="rope",
            act="silu",
            qkv_bias=spec.qkv_bias,
            o_bias=False,
            mlp_bias=False,
            tie_word_embeddings=spec.tied_embeddings,
            max_positions=int(get("context_length")),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_freq_factors=rope_freq_factors,
        )


def _rope_from_hf(cfg: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, llama3 scaling or None) from either the new rope_parameters or old keys."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"rope_parameters must be a mapping, got {type(params).__name__}")
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = str(params.get("rope_type", params.get("type", "default")))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"rope type {kind!r} is not supported (default and llama3 are)")
    try:
        scaling = RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_positions=int(params.get("original_max_position_embeddings", 0)),
        )
    except KeyError as e:
        raise ValueError(f"llama3 rope scaling lacks {e.args[0]!r}") from None
    return theta, scaling


def _llama3_scale(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """transformers' _compute_llama3_parameters, step for step (same float32 rounding)."""
    low_freq_wavelen = s.original_max_positions / s.low_freq_factor
    high_freq_wavelen = s.original_max_positions / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_positions / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * inv_llama / s.factor + smooth * inv_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_llama)
