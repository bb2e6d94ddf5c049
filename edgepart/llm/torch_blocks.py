"""Torch execution of one block each: embedding, KV group, output projection, FFN and LM head.

A block is built from a TensorSource, an Architecture and its block name ('embed', 'head',
'L{l}.g{g}', 'L{l}.proj', 'L{l}.ffn') and loads only its own slices. Batch size is 1:
hidden states are (T, d_model). The arithmetic follows transformers op for op where the
rounding depends on it (RMSNorm in float32 then cast, RoPE tables from float32 positions,
softmax in float32), so block-wise execution reproduces the monolithic model.

Every block counts the weight elements it loaded (``loaded_elements``) and the FLOPs of
the matrix products it ran (``flops``, a multiply-add is 2, from the operand shapes), so
the analytic costs of edgepart.llm.blocks can be checked against the tensors actually used.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgepart.llm.arch import Architecture
from edgepart.llm.tensors import TensorSource

_LAYER_BLOCK = re.compile(r"^L(\d+)\.(?:g(\d+)|(proj)|(ffn))$")


@dataclass(frozen=True)
class BlockName:
    """A parsed block name: kind is 'embed', 'head', 'group', 'proj' or 'ffn'."""

    kind: str
    layer: int = -1
    group: int = -1

    def __str__(self) -> str:
        if self.kind in ("embed", "head"):
            return self.kind
        suffix = f"g{self.group}" if self.kind == "group" else self.kind
        return f"L{self.layer}.{suffix}"


def parse_block_name(name: str) -> BlockName:
    """Parse 'embed', 'head', 'L3.g1', 'L3.proj' or 'L3.ffn'; raises ValueError."""
    if name in ("embed", "head"):
        return BlockName(name)
    m = _LAYER_BLOCK.match(name)
    if not m:
        raise ValueError(f"bad block name {name!r}; expected embed, head, L<l>.g<g>, L<l>.proj/ffn")
    layer = int(m.group(1))
    if m.group(2) is not None:
        return BlockName("group", layer, int(m.group(2)))
    return BlockName("proj" if m.group(3) else "ffn", layer)


def _parse_as(name: str, kind: str, what: str) -> BlockName:
    """Parse a block name that must be of one kind; ValueError naming what was expected."""
    parsed = parse_block_name(name)
    if parsed.kind != kind:
        raise ValueError(f"{name} is not {what}")
    return parsed


#: blocks that move between devices (and can be rebuilt from their weights alone)
MOVABLE_KINDS = ("group", "proj", "ffn")


def weight_shapes(arch: Architecture, name: str) -> dict[str, tuple[int, ...]]:
    """The local weight names and shapes a movable block holds (what ``weight_tensors`` gives)."""
    parsed = parse_block_name(name)
    spec = arch.spec
    if parsed.kind not in MOVABLE_KINDS:
        raise ValueError(f"{name} is pinned to the source: only groups, proj and ffn move")
    if not 0 <= parsed.layer < spec.layers or (
        parsed.kind == "group" and not 0 <= parsed.group < spec.kv_heads
    ):
        raise ValueError(f"{name} does not exist in {spec.name}")
    d, h, f = spec.d_model, spec.head_dim, spec.d_ff
    gpt2 = arch.family == "gpt2"
    out: dict[str, tuple[int, ...]] = {}
    if parsed.kind == "group":
        qkv = (spec.queries_per_group + 2) * h
        out["norm_w"] = (d,)
        if gpt2:
            out["norm_b"] = (d,)
        out["w_qkv"] = (d, qkv) if gpt2 else (qkv, d)  # Conv1D keeps (in, out)
        if gpt2 or arch.qkv_bias:
            out["b_qkv"] = (qkv,)
    elif parsed.kind == "proj":
        heads = spec.heads * h
        out["w_o"] = (heads, d) if gpt2 else (d, heads)
        if gpt2 or arch.o_bias:
            out["b_o"] = (d,)
    else:
        out["norm_w"] = (d,)
        if arch.norm == "layer":
            out["norm_b"] = (d,)
        out["w_up"] = (d, f) if gpt2 else (2 * f, d)  # SwiGLU: gate and up fused
        out["w_down"] = (f, d) if gpt2 else (d, f)
        if gpt2 or arch.mlp_bias:
            out["b_up"] = (f,) if gpt2 else (2 * f,)
            out["b_down"] = (d,)
    return out


def check_weights(arch: Architecture, name: str, weights: dict[str, torch.Tensor]) -> None:
    """ValueError naming what is wrong unless ``weights`` are exactly the block's tensors."""
    want = weight_shapes(arch, name)
    missing = sorted(set(want) - set(weights))
    extra = sorted(set(weights) - set(want))
    if missing or extra:
        raise ValueError(
            f"{name}: weights {sorted(weights)} do not match the expected {sorted(want)}"
            f" (missing {missing}, unexpected {extra})"
        )
    for key, shape in want.items():
        got = tuple(weights[key].shape)
        if got != shape:
            raise ValueError(f"{name}: weight {key} has shape {got}, expected {shape}")


# --- tensor names (Hugging Face layout) -------------------------------------------------


def _layer_prefix(arch: Architecture, layer: int) -> str:
    return f"transformer.h.{layer}." if arch.family == "gpt2" else f"model.layers.{layer}."


class _Loader:
    """Reads tensors from a source in the compute dtype and tallies the elements read."""

    def __init__(self, source: TensorSource, dtype: torch.dtype) -> None:
        self.source = source
        self.dtype = dtype
        self.elements = 0

    def __call__(self, name: str, rows: slice | None = None, cols: slice | None = None):
        t = self.source.get(name, rows=rows, cols=cols, dtype=self.dtype)
        self.elements += t.numel()
        return t


class Linear:
    """y = x @ W^T + b (nn.Linear layout) or x @ W + b (GPT-2 Conv1D layout), counting FLOPs."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, conv1d: bool) -> None:
        self.weight = weight
        self.bias = bias
        self.conv1d = conv1d
        self.out_features = weight.shape[1] if conv1d else weight.shape[0]
        self.in_features = weight.shape[0] if conv1d else weight.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv1d:
            # transformers' Conv1D: addmm(bias, x, W) on the flattened rows.
            flat = x.reshape(-1, self.in_features)
            y = (
                torch.addmm(self.bias, flat, self.weight)
                if self.bias is not None
                else flat @ self.weight
            )
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def flops(self, rows: int) -> int:
        """FLOPs of applying this layer to ``rows`` vectors (bias adds not counted)."""
        return 2 * rows * self.in_features * self.out_features


class Norm:
    """RMSNorm (transformers LlamaRMSNorm op order) or LayerNorm."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, arch: Architecture):
        self.weight = weight
        self.bias = bias
        self.eps = arch.norm_eps
        self.rms = arch.norm == "rms"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            dtype = x.dtype
            h = x.to(torch.float32)
            variance = h.pow(2).mean(-1, keepdim=True)
            h = h * torch.rsqrt(variance + self.eps)
            return self.weight * h.to(dtype)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def _load_norm(load: _Loader, arch: Architecture, name: str) -> Norm:
    """The norm whose weight is ``name`` (and, for LayerNorm, its bias next to it)."""
    bias = load(name.removesuffix("weight") + "bias") if arch.norm == "layer" else None
    return Norm(load(name), bias, arch)


class RopeTable:
    """cos/sin of RoPE for positions 0..capacity-1, grown by doubling; shared by a host's blocks."""

    def __init__(self, arch: Architecture, dtype: torch.dtype) -> None:
        self.inv_freq = arch.inv_freq()
        self.dtype = dtype
        self.cos = torch.empty(0, 2 * self.inv_freq.numel(), dtype=dtype)
        self.sin = torch.empty_like(self.cos)

    def get(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (count, head_dim), for positions start..start+count-1."""
        end = start + count
        if end > self.cos.shape[0]:
            cap = max(64, end, 2 * self.cos.shape[0])
            # Same float32 products as transformers' rotary embedding, so the same roundings.
            freqs = torch.arange(cap, dtype=torch.int64).float()[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            self.cos = emb.cos().to(self.dtype)
            self.sin = emb.sin().to(self.dtype)
        return self.cos[start:end], self.sin[start:end]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Block:
    """Common bookkeeping: name, weights loaded (elements) and FLOPs run so far."""

    def __init__(self, name: str, arch: Architecture, dtype: torch.dtype) -> None:
        self.name = name
        self.arch = arch
        self.dtype = dtype
        self.loaded_elements = 0  # weight elements read from the source
        self.flops = 0  # FLOPs of the matrix products run so far

    def weight_tensors(self) -> dict[str, torch.Tensor]:
        """The block's own weight tensors by local name."""
        raise NotImplementedError

    def weight_bytes(self) -> int:
        """Bytes of the block's weights as held (compute dtype)."""
        return sum(t.numel() * t.element_size() for t in self.weight_tensors().values())


class EmbedBlock(Block):
    """Token embedding (plus learned positions for GPT-2): ids (T,) -> hidden (T, d)."""

    def __init__(
        self, source: TensorSource, arch: Architecture, dtype: torch.dtype = torch.float32
    ):
        super().__init__("embed", arch, dtype)
        load = _Loader(source, dtype)
        if arch.family == "gpt2":
            self.wte = load("transformer.wte.weight")
            self.wpe: torch.Tensor | None = load("transformer.wpe.weight")
        else:
            self.wte = load("model.embed_tokens.weight")
            self.wpe = None
        self.loaded_elements = load.elements

    def weight_tensors(self) -> dict[str, torch.Tensor]:
        out = {"wte": self.wte}
        if self.wpe is not None:
            out["wpe"] = self.wpe
        return out

    def __call__(self, token_ids: torch.Tensor, start: int) -> torch.Tensor:
        """Hidden states of tokens at positions start..start+T-1."""
        h = F.embedding(token_ids, self.wte)
        if self.wpe is not None:
            end = start + token_ids.shape[0]
            if end > self.wpe.shape[0]:
                raise ValueError(f"position {end - 1} exceeds the model's {self.wpe.shape[0]}")
            h = h + self.wpe[start:end]
        return h


class KVGroupBlock(Block):
    """One KV group of one layer: attention norm, its Q heads and K/V head, and its K/V cache.

    Input: the layer's hidden states (T, d) at positions length..length+T-1. Output: the
    attention outputs of its query heads, concatenated in head order, (T, q_per_group*head_dim).
    """

    def __init__(
        self,
        source: TensorSource | None,
        arch: Architecture,
        name: str,
        dtype: torch.dtype = torch.float32,
        rope: RopeTable | None = None,
        weights: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(name, arch, dtype)
        parsed = _parse_as(name, "group", "a KV-group block")
        spec = arch.spec
        if not 0 <= parsed.layer < spec.layers or not 0 <= parsed.group < spec.kv_heads:
            raise ValueError(f"{name} does not exist in {spec.name}")
        self.layer, self.group = parsed.layer, parsed.group
        self.q_heads = spec.queries_per_group
        self.head_dim = spec.head_dim
        self.scale = arch.attn_scale(self.layer)
        if weights is not None:
            check_weights(arch, name, weights)
            self._set_weights({k: v.to(dtype) for k, v in weights.items()})
        elif source is not None:
            self._load(source)
        else:
            raise ValueError("a KV-group block needs a source or its weights")
        self.rope: RopeTable | None = None
        if arch.positions == "rope":
            self.rope = rope if rope is not None else RopeTable(arch, dtype)
        self.length = 0  # cached positions
        self._k = torch.empty(0, self.head_dim, dtype=dtype)
        self._v = torch.empty(0, self.head_dim, dtype=dtype)

    # -- weights --
    def _load(self, source: TensorSource) -> None:
        arch, spec = self.arch, self.arch.spec
        load = _Loader(source, self.dtype)
        p = _layer_prefix(arch, self.layer)
        h, q, g, d = self.head_dim, self.q_heads, self.group, spec.d_model
        q_rows = slice(g * q * h, (g + 1) * q * h)  # query heads g*q .. g*q+q-1
        kv_rows = slice(g * h, (g + 1) * h)
        w: dict[str, torch.Tensor] = {}
        if arch.family == "gpt2":
            norm = f"{p}ln_1."
            w["norm_w"], w["norm_b"] = load(norm + "weight"), load(norm + "bias")
            # c_attn is (d, 3d) in Conv1D layout: Q, K, V column blocks; MHA so kv rows = q rows.
            name = f"{p}attn.c_attn."
            parts = [q_rows, _shift(kv_rows, spec.heads * h), _shift(kv_rows, 2 * spec.heads * h)]
            w["w_qkv"] = torch.cat([load(name + "weight", cols=s) for s in parts], dim=1)
            w["b_qkv"] = torch.cat([load(name + "bias", rows=s) for s in parts])
        else:
            w["norm_w"] = load(f"{p}input_layernorm.weight")
            a = f"{p}self_attn."
            rows = [("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)]
            # One fused (q+2)h x d matrix: a single matmul per step, same dot products.
            w["w_qkv"] = torch.cat([load(f"{a}{n}.weight", rows=s) for n, s in rows])
            if arch.qkv_bias:
                w["b_qkv"] = torch.cat([load(f"{a}{n}.bias", rows=s) for n, s in rows])
        if w["w_qkv"].numel() != (q + 2) * h * d:
            raise ValueError(f"{self.name}: QKV slice has {w['w_qkv'].numel()} elements")
        self._set_weights(w)
        self.loaded_elements = load.elements

    def _set_weights(self, w: dict[str, torch.Tensor]) -> None:
        self._weights = w
        self.norm = Norm(w["norm_w"], w.get("norm_b"), self.arch)
        self.qkv = Linear(w["w_qkv"], w.get("b_qkv"), conv1d=self.arch.family == "gpt2")

    def weight_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._weights)

    # -- cache --
    @property
    def keys(self) -> torch.Tensor:
        """Cached keys (length, head_dim), RoPE applied."""
        return self._k[: self.length]

    @property
    def values(self) -> torch.Tensor:
        """Cached values (length, head_dim)."""
        return self._v[: self.length]

    def cache_bytes(self) -> int:
        """Bytes of the cached K and V (used positions only)."""
        return 2 * self.length * self.head_dim * self._k.element_size()

    def set_cache(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the cache with (n, head_dim) keys and values (e.g. after a migration)."""
        if keys.shape != values.shape or keys.dim() != 2 or keys.shape[1] != self.head_dim:
            raise ValueError(
                f"cache shapes {tuple(keys.shape)}/{tuple(values.shape)} do not fit "
                f"head_dim {self.head_dim}"
            )
        self._k = keys.to(self.dtype).clone()
        self._v = values.to(self.dtype).clone()
        self.length = keys.shape[0]

    def reset(self) -> None:
        """Forget every cached position."""
        self.length = 0

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        end = self.length + k.shape[0]
        if end > self._k.shape[0]:
            cap = max(64, end, 2 * self._k.shape[0])
            grown_k = torch.empty(cap, self.head_dim, dtype=self.dtype)
            grown_v = torch.empty(cap, self.head_dim, dtype=self.dtype)
            grown_k[: self.length] = self._k[: self.length]
            grown_v[: self.length] = self._v[: self.length]
            self._k, self._v = grown_k, grown_v
        self._k[self.length : end] = k
        self._v[self.length : end] = v
        self.length = end

    # -- compute --
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Attend T new positions (prefill T>1, decode T=1) over the cache plus themselves."""
        t, h, q = hidden.shape[0], self.head_dim, self.q_heads
        start = self.length
        x = self.norm(hidden)
        qkv = self.qkv(x)
        self.flops += self.qkv.flops(t)
        qs = qkv[:, : q * h].view(t, q, h).transpose(0, 1)  # (q, T, h)
        ks = qkv[:, q * h : (q + 1) * h]  # (T, h)
        vs = qkv[:, (q + 1) * h :]
        if self.rope is not None:
            cos, sin = self.rope.get(start, t)
            qs = (qs * cos) + (_rotate_half(qs) * sin)
            ks = (ks * cos) + (_rotate_half(ks) * sin)
        self._append(ks, vs)
        n = self.length
        keys = self.keys.unsqueeze(0).expand(q, n, h)
        values = self.values.unsqueeze(0).expand(q, n, h)
        mask = None
        if t > 1:
            # Query i sits at position start+i and may see keys 0..start+i.
            mask = torch.ones(t, n, dtype=torch.bool).tril(diagonal=start)
        # 4-D (batch, heads, T, h) as transformers calls it: the 3-D form of this kernel
        # was seen to stall on its second thread whenever another process held a core
        out = F.scaled_dot_product_attention(
            qs[None], keys[None], values[None], attn_mask=mask, scale=self.scale
        )[0]
        self.flops += 4 * q * t * n * h  # q·k scores and weights·v, as two (T x n x h) products
        return out.transpose(0, 1).reshape(t, q * h)


def _shift(s: slice, by: int) -> slice:
    return slice(s.start + by, s.stop + by)


class ProjBlock(Block):
    """Output projection of one layer: concat(all heads) @ Wo^T (+ bias) + residual."""

    def __init__(
        self,
        source: TensorSource | None,
        arch: Architecture,
        name: str,
        dtype: torch.dtype = torch.float32,
        weights: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(name, arch, dtype)
        parsed = _parse_as(name, "proj", "a projection block")
        conv1d = arch.family == "gpt2"
        if weights is not None:
            # rebuilt from weight_tensors() of a copy elsewhere: no checkpoint read
            check_weights(arch, name, weights)
            w = {k: v.to(dtype) for k, v in weights.items()}
            self.o = Linear(w["w_o"], w.get("b_o"), conv1d=conv1d)
            return
        if source is None:
            raise ValueError("a projection block needs a source or its weights")
        load = _Loader(source, dtype)
        p = _layer_prefix(arch, parsed.layer)
        if arch.family == "gpt2":
            w, b = load(f"{p}attn.c_proj.weight"), load(f"{p}attn.c_proj.bias")
        else:
            w = load(f"{p}self_attn.o_proj.weight")
            b = load(f"{p}self_attn.o_proj.bias") if arch.o_bias else None
        self.o = Linear(w, b, conv1d=conv1d)
        self.loaded_elements = load.elements

    def weight_tensors(self) -> dict[str, torch.Tensor]:
        out = {"w_o": self.o.weight}
        if self.o.bias is not None:
            out["b_o"] = self.o.bias
        return out

    def __call__(self, heads: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """heads (T, heads*head_dim) in head order, residual (T, d) -> hidden (T, d)."""
        self.flops += self.o.flops(heads.shape[0])
        return residual + self.o(heads)


class FFNBlock(Block):
    """Post-attention norm, MLP (SwiGLU or GELU) and the residual add."""

    def __init__(
        self,
        source: TensorSource | None,
        arch: Architecture,
        name: str,
        dtype: torch.dtype = torch.float32,
        weights: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(name, arch, dtype)
        parsed = _parse_as(name, "ffn", "an FFN block")
        if weights is not None:
            # rebuilt from weight_tensors() of a copy elsewhere: no checkpoint read
            check_weights(arch, name, weights)
            w = {k: v.to(dtype) for k, v in weights.items()}
            conv1d = arch.family == "gpt2"
            self.norm = Norm(w["norm_w"], w.get("norm_b"), arch)
            self.up = Linear(w["w_up"], w.get("b_up"), conv1d=conv1d)
            self.down = Linear(w["w_down"], w.get("b_down"), conv1d=conv1d)
            return
        if source is None:
            raise ValueError("an FFN block needs a source or its weights")
        load = _Loader(source, dtype)
        p = _layer_prefix(arch, parsed.layer)
        if arch.family == "gpt2":
            self.norm = _load_norm(load, arch, f"{p}ln_2.weight")
            m = f"{p}mlp."
            self.up = Linear(load(m + "c_fc.weight"), load(m + "c_fc.bias"), conv1d=True)
            self.down = Linear(load(m + "c_proj.weight"), load(m + "c_proj.bias"), conv1d=True)
        else:
            self.norm = _load_norm(load, arch, f"{p}post_attention_layernorm.weight")
            m = f"{p}mlp."

            def bias(n: str) -> torch.Tensor | None:
                return load(f"{m}{n}.bias") if arch.mlp_bias else None

            # gate and up fused into one (2f x d) matmul; chunked apart afterwards.
            w_gu = torch.cat([load(m + "gate_proj.weight"), load(m + "up_proj.weight")])
            b_gate, b_up = bias("gate_proj"), bias("up_proj")
            b_gu = None if b_gate is None or b_up is None else torch.cat([b_gate, b_up])
            self.up = Linear(w_gu, b_gu, conv1d=False)
            self.down = Linear(load(m + "down_proj.weight"), bias("down_proj"), conv1d=False)
        self.loaded_elements = load.elements

    def weight_tensors(self) -> dict[str, torch.Tensor]:
        out = {"norm_w": self.norm.weight, "w_up": self.up.weight, "w_down": self.down.weight}
        optional = {"norm_b": self.norm.bias, "b_up": self.up.bias, "b_down": self.down.bias}
        out.update({k: t for k, t in optional.items() if t is not None})
        return out

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (T, d) -> hidden (T, d)."""
        rows = hidden.shape[0]
        x = self.norm(hidden)
        self.flops += self.up.flops(rows) + self.down.flops(rows)
        if self.arch.act == "silu":
            gate, up = self.up(x).chunk(2, dim=-1)
            return hidden + self.down(F.silu(gate) * up)
        y = self.up(x)
        # transformers' NewGELUActivation, same expression.
        inner = math.sqrt(2.0 / math.pi) * (y + 0.044715 * torch.pow(y, 3.0))
        y = 0.5 * y * (1.0 + torch.tanh(inner))
        return hidden + self.down(y)


class HeadBlock(Block):
    """Final norm and LM head: hidden (T, d) -> logits of the last position (vocab,)."""

    def __init__(
        self,
        source: TensorSource,
        arch: Architecture,
        dtype: torch.dtype = torch.float32,
        tied_embedding: torch.Tensor | None = None,
    ) -> None:
        super().__init__("head", arch, dtype)
        load = _Loader(source, dtype)
        final = "transformer.ln_f.weight" if arch.family == "gpt2" else "model.norm.weight"
        self.norm = _load_norm(load, arch, final)
        if arch.tie_word_embeddings and tied_embedding is not None:
            # The embedding block on this host already holds the matrix: share it.
            self.lm_head = tied_embedding
            self.shared = True
        else:
            self.lm_head = load("lm_head.weight")
            self.shared = False
        self.loaded_elements = load.elements

    def weight_tensors(self) -> dict[str, torch.Tensor]:
        out = {"norm_w": self.norm.weight}
        if self.norm.bias is not None:
            out["norm_b"] = self.norm.bias
        if not self.shared:
            out["lm_head"] = self.lm_head
        return out

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (vocab,) of the last of the T positions."""
        x = self.norm(hidden[-1:])
        self.flops += 2 * self.lm_head.shape[0] * self.lm_head.shape[1]
        return F.linear(x, self.lm_head)[0]


AnyBlock = EmbedBlock | KVGroupBlock | ProjBlock | FFNBlock | HeadBlock


def build_block(
    source: TensorSource,
    arch: Architecture,
    name: str,
    dtype: torch.dtype = torch.float32,
    rope: RopeTable | None = None,
    tied_embedding: torch.Tensor | None = None,
) -> AnyBlock:
    """The block of that name, loading only its slices from the source."""
    kind = parse_block_name(name).kind
    if kind == "embed":
        return EmbedBlock(source, arch, dtype)
    if kind == "head":
        return HeadBlock(source, arch, dtype, tied_embedding=tied_embedding)
    if kind == "group":
        return KVGroupBlock(source, arch, name, dtype, rope=rope)
    if kind == "proj":
        return ProjBlock(source, arch, name, dtype)
    return FFNBlock(source, arch, name, dtype)


def block_from_weights(
    arch: Architecture,
    name: str,
    weights: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    rope: RopeTable | None = None,
) -> KVGroupBlock | ProjBlock | FFNBlock:
    """A movable block rebuilt from its ``weight_tensors()`` alone (no checkpoint read).

    Raises ValueError if the name is not a movable block of the model or the weights are not
    exactly that block's tensors and shapes.
    """
    kind = parse_block_name(name).kind
    if kind == "group":
        return KVGroupBlock(None, arch, name, dtype, rope=rope, weights=weights)
    if kind == "proj":
        return ProjBlock(None, arch, name, dtype, weights=weights)
    if kind == "ffn":
        return FFNBlock(None, arch, name, dtype, weights=weights)
    raise ValueError(f"{name} is pinned to the source: only groups, proj and ffn move")
