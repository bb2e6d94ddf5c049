"""Block decomposition of a decoder and the analytic cost of each block per decode step.

Per layer: one block per KV group (its query heads, their K/V cache and their slices of
Wq/Wk/Wv), one output-projection block (Wo + residual) and one FFN block (norm, MLP,
residual). Embedding, final norm and LM head are pinned to the source device.

All costs are for one decode step at context length ``n`` (the number of cached
positions the new token attends to, itself included): FLOPs count a multiply-add as 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from edgepart.llm.model import ModelSpec


class BlockKind(IntEnum):
    """What a placeable block computes."""

    HEADS = 0  # one KV group: its query heads with their K/V head
    PROJ = 1  # attention output projection Wo and the residual add
    FFN = 2  # post-attention norm, MLP and the residual add


def group_flops(spec: ModelSpec, n: int | np.ndarray) -> int | np.ndarray:
    """FLOPs of one KV-group block for one token at context n: QKV projections + attention."""
    q, h, d = spec.queries_per_group, spec.head_dim, spec.d_model
    return 2 * d * (q + 2) * h + 4 * q * h * n


def proj_flops(spec: ModelSpec) -> int:
    """FLOPs of the output projection for one token: concat(heads) @ Wo."""
    return 2 * spec.heads * spec.head_dim * spec.d_model


def ffn_flops(spec: ModelSpec) -> int:
    """FLOPs of the MLP for one token (3 matrices for SwiGLU, 2 for GELU)."""
    return (6 if spec.ffn == "swiglu" else 4) * spec.d_model * spec.d_ff


def lm_head_flops(spec: ModelSpec) -> int:
    """FLOPs of the LM head for one token."""
    return 2 * spec.d_model * spec.vocab


def _norm_elements(spec: ModelSpec) -> int:
    """Elements of one norm: a scale, plus a bias for LayerNorm."""
    return spec.d_model * (2 if spec.norm == "layer" else 1)


def group_weight_bytes(spec: ModelSpec) -> int:
    """Bytes of a KV group's Wq/Wk/Wv slices (+ biases) and its copy of the attention norm."""
    q, h, d, b = spec.queries_per_group, spec.head_dim, spec.d_model, spec.bytes_per_element
    bias = (q + 2) * h if spec.qkv_bias else 0
    return ((q + 2) * h * d + bias + _norm_elements(spec)) * b


def proj_weight_bytes(spec: ModelSpec) -> int:
    """Bytes of Wo (and its bias with GPT-2's LayerNorm architecture)."""
    bias = spec.d_model if spec.norm == "layer" else 0
    return (spec.heads * spec.head_dim * spec.d_model + bias) * spec.bytes_per_element


def ffn_weight_bytes(spec: ModelSpec) -> int:
    """Bytes of the MLP matrices and the post-attention norm."""
    d, f = spec.d_model, spec.d_ff
    mats = 3 * d * f if spec.ffn == "swiglu" else 2 * d * f + f + d  # GELU MLPs carry biases
    return (mats + _norm_elements(spec)) * spec.bytes_per_element


def kv_bytes_per_token(spec: ModelSpec) -> int:
    """Bytes one cached position adds to a KV group's cache (K and V)."""
    return 2 * spec.head_dim * spec.bytes_per_element


def source_weight_bytes(spec: ModelSpec) -> int:
    """Bytes pinned on the source: embeddings (token, learned positions), final norm, LM head."""
    d, v = spec.d_model, spec.vocab
    head = 0 if spec.tied_embeddings else v * d
    positions = spec.learned_positions * d
    return (v * d + positions + _norm_elements(spec) + head) * spec.bytes_per_element


def hidden_bytes(spec: ModelSpec) -> int:
    """Bytes of one token's hidden state (what FFN, projection and embedding send)."""
    return spec.d_model * spec.bytes_per_element


def group_output_bytes(spec: ModelSpec) -> int:
    """Bytes a KV-group block sends to the projection per token (its heads' outputs)."""
    return spec.queries_per_group * spec.head_dim * spec.bytes_per_element


@dataclass(frozen=True)
class BlockTable:
    """All placeable blocks of a model as parallel arrays (index = block id).

    Block ids run layer by layer: groups 0..G-1, then the projection, then the FFN.
    """

    spec: ModelSpec
    names: tuple[str, ...]
    kind: np.ndarray  # BlockKind per block
    layer: np.ndarray
    flops_fixed: np.ndarray  # FLOP per token, independent of context
    flops_per_context: np.ndarray  # FLOP per token per context position
    weight_bytes: np.ndarray
    kv_bytes_per_token: np.ndarray
    output_bytes: np.ndarray  # bytes sent to each consumer per token
    source_weight_bytes: int
    source_flops: int  # LM head on the source, per token

    @property
    def groups(self) -> int:
        """KV groups per layer."""
        return self.spec.kv_heads

    @property
    def per_layer(self) -> int:
        """Blocks per layer (groups + projection + FFN)."""
        return self.spec.kv_heads + 2

    @property
    def size(self) -> int:
        """Number of placeable blocks."""
        return len(self.names)

    def group_ids(self, layer: int) -> np.ndarray:
        """Block ids of that layer's KV groups."""
        start = layer * self.per_layer
        return np.arange(start, start + self.groups)

    def proj_id(self, layer: int) -> int:
        """Block id of that layer's output projection."""
        return layer * self.per_layer + self.groups

    def ffn_id(self, layer: int) -> int:
        """Block id of that layer's FFN."""
        return layer * self.per_layer + self.groups + 1

    def flops(self, n: float) -> np.ndarray:
        """FLOPs of every block for one token at context n."""
        return self.flops_fixed + self.flops_per_context * n

    def kv_bytes(self, n: float) -> np.ndarray:
        """KV-cache bytes of every block holding n positions (0 for non-group blocks)."""
        return self.kv_bytes_per_token * n

    def memory_bytes(self, n: float) -> np.ndarray:
        """Resident bytes of every block at context n: weights + KV cache."""
        return self.weight_bytes + self.kv_bytes_per_token * n

    def index(self, name: str) -> int:
        """Block id of a block name such as 'L3.g1', 'L3.proj' or 'L3.ffn'; raises KeyError."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no block named {name!r} in {self.spec.name}") from None


PINNED_BLOCKS = ("embed", "head")


def block_table(spec: ModelSpec) -> BlockTable:
    """Decompose a model into its placeable blocks with their per-token costs."""
    names: list[str] = []
    kind: list[int] = []
    layer: list[int] = []
    flops_fixed: list[float] = []
    flops_ctx: list[float] = []
    weights: list[float] = []
    kv: list[float] = []
    out: list[float] = []
    g_fixed = group_flops(spec, 0)
    g_ctx = group_flops(spec, 1) - g_fixed
    for ell in range(spec.layers):
        for g in range(spec.kv_heads):
            names.append(f"L{ell}.g{g}")
            kind.append(BlockKind.HEADS)
            flops_fixed.append(g_fixed)
            flops_ctx.append(g_ctx)
            weights.append(group_weight_bytes(spec))
            kv.append(kv_bytes_per_token(spec))
            out.append(group_output_bytes(spec))
        for k, f, w in (
            (BlockKind.PROJ, proj_flops(spec), proj_weight_bytes(spec)),
            (BlockKind.FFN, ffn_flops(spec), ffn_weight_bytes(spec)),
        ):
            names.append(f"L{ell}.{'proj' if k == BlockKind.PROJ else 'ffn'}")
            kind.append(k)
            flops_fixed.append(f)
            flops_ctx.append(0)
            weights.append(w)
            kv.append(0)
            out.append(hidden_bytes(spec))
        layer.extend([ell] * (spec.kv_heads + 2))
    return BlockTable(
        spec=spec,
        names=tuple(names),
        kind=np.array(kind, dtype=np.int8),
        layer=np.array(layer, dtype=np.int32),
        flops_fixed=np.array(flops_fixed, dtype=np.float64),
        flops_per_context=np.array(flops_ctx, dtype=np.float64),
        weight_bytes=np.array(weights, dtype=np.float64),
        kv_bytes_per_token=np.array(kv, dtype=np.float64),
        output_bytes=np.array(out, dtype=np.float64),
        source_weight_bytes=source_weight_bytes(spec),
        source_flops=lm_head_flops(spec),
    )
