"""Model description: the shapes of a decoder-only transformer, from presets or explicit values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Dtype = Literal["float32", "float16", "bfloat16"]
FfnKind = Literal["swiglu", "gelu"]
NormKind = Literal["rms", "layer"]

BYTES_PER_ELEMENT: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}

DTYPE_ALIASES: dict[str, str] = {
    "fp32": "float32",
    "float32": "float32",
    "f32": "float32",
    "fp16": "float16",
    "float16": "float16",
    "f16": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
}


def canonical_dtype(name: str) -> Dtype:
    """Map fp32/fp16/bf16 spellings to a canonical dtype name; raises ValueError."""
    try:
        return DTYPE_ALIASES[name.lower()]  # type: ignore[return-value]
    except KeyError:
        raise ValueError(
            f"unknown dtype {name!r}; use one of float32, float16, bfloat16 (or fp32, fp16, bf16)"
        ) from None


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of a decoder-only transformer; enough to size and cost every block."""

    name: str
    layers: int
    d_model: int
    heads: int
    kv_heads: int
    d_ff: int
    vocab: int
    dtype: Dtype = "float32"
    head_dim: int = 0  # 0 means d_model // heads
    tied_embeddings: bool = False
    ffn: FfnKind = "swiglu"
    qkv_bias: bool = False
    #: "layer" is GPT-2's LayerNorm, which also brings biases on every norm and on Wo
    norm: NormKind = "rms"
    #: learned position embeddings on the source (GPT-2); 0 for rotary positions
    learned_positions: int = 0
    extra: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for key in ("layers", "d_model", "heads", "kv_heads", "d_ff", "vocab"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if self.heads % self.kv_heads:
            raise ValueError(
                f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})"
            )
        if self.head_dim == 0:
            if self.d_model % self.heads:
                raise ValueError(
                    f"d_model ({self.d_model}) is not divisible by heads ({self.heads}); "
                    "give head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.heads)
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))

    @property
    def queries_per_group(self) -> int:
        """Query heads sharing one K/V head (1 for MHA)."""
        return self.heads // self.kv_heads

    @property
    def bytes_per_element(self) -> int:
        """Bytes of one weight, activation or cache element in this dtype."""
        return BYTES_PER_ELEMENT[self.dtype]


PRESETS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "smollm2-135m",
            layers=30,
            d_model=576,
            heads=9,
            kv_heads=3,
            d_ff=1536,
            vocab=49152,
            tied_embeddings=True,
        ),
        # The paper's three sizes (arXiv 2505.02533, Table II); we stack several layers
        # where the paper used one, with the usual 4x FFN.
        ModelSpec(
            "paper-small", layers=4, d_model=512, heads=8, kv_heads=8, d_ff=2048, vocab=32000
        ),
        ModelSpec(
            "paper-medium", layers=8, d_model=1024, heads=16, kv_heads=16, d_ff=4096, vocab=32000
        ),
        ModelSpec(
            "paper-large", layers=16, d_model=2048, heads=32, kv_heads=32, d_ff=8192, vocab=32000
        ),
        ModelSpec(
            "llama3-8b",
            layers=32,
            d_model=4096,
            heads=32,
            kv_heads=8,
            d_ff=14336,
            vocab=128256,
            dtype="bfloat16",
        ),
    )
}


def preset(name: str, dtype: str | None = None) -> ModelSpec:
    """The preset model of that name, optionally in another dtype; raises KeyError."""
    try:
        spec = PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None
    if dtype is None:
        return spec
    return ModelSpec(**{**_fields(spec), "dtype": canonical_dtype(dtype)})


def with_kv_heads(spec: ModelSpec, kv_heads: int) -> ModelSpec:
    """The same model with another number of K/V heads (e.g. an MHA variant of a GQA model)."""
    return ModelSpec(**{**_fields(spec), "kv_heads": kv_heads, "name": f"{spec.name}-kv{kv_heads}"})


def _fields(spec: ModelSpec) -> dict:
    return {k: getattr(spec, k) for k in ModelSpec.__dataclass_fields__ if k != "extra"}
