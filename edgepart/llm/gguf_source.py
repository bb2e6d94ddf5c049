"""GGUF checkpoints as a TensorSource: Hugging Face names and layouts, rows read on demand.

The file is memory-mapped (gguf.GGUFReader); ``get(name, rows=...)`` copies and
dequantises only the rows asked for. That works for every GGML type because a
quantisation block never crosses a row: blocks run along the inner (column) dimension.

Two llama.cpp conventions are undone so tensors equal what transformers loads from
the same file:

- GGUF lists dimensions innermost first, so a Linear weight stored as ``[in, out]``
  is the (out, in) matrix Hugging Face uses; GPT-2's Conv1D weights were transposed by
  the converter and are transposed back to (in, out).
- For the ``llama`` architecture, llama.cpp's converter permutes the rows of Wq and Wk
  (and their biases) inside each head, from the two-halves RoPE layout to interleaved
  pairs. transformers reverses it on load (``reverse_permute_weights``); we map each
  requested Hugging Face row to the GGUF row it comes from, so a head's rows still come
  from that head's rows in the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgepart.llm.arch import Architecture
from edgepart.llm.gguf_meta import (
    field_value,
    import_gguf,
    open_gguf,
    read_metadata,
    spec_from_reader,
)

# Per-layer GGUF tensor stems (blk.N.<stem>.weight|bias) -> Hugging Face module paths.
_LLAMA_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LLAMA_GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_GPT2_LAYER = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
_GPT2_GLOBAL = {
    "token_embd": "transformer.wte",
    "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
}
# GPT-2 Conv1D weights, which Hugging Face keeps as (in, out).
_GPT2_CONV1D = frozenset({"attn_qkv", "attn_output", "ffn_up", "ffn_down"})

# GGUF architectures laid out like Llama; only "llama" files carry the Q/K row permutation.
LLAMA_LIKE_ARCHS = frozenset({"llama", "mistral", "qwen2"})
GPT2_ARCHS = frozenset({"gpt2"})
_PERMUTED_ARCHS = frozenset({"llama"})

# Values dequantised per step (1 MiB of float32): bounds gguf's temporaries.
_CHUNK_ELEMENTS = 1 << 18

_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")
_GLOBAL_NAME = re.compile(r"^([a-z_0-9]+)\.(weight|bias)$")


class _Entry:
    """Where one Hugging Face tensor lives in the file and how to turn it around."""

    __slots__ = ("heads", "tensor", "transposed")

    def __init__(self, tensor: Any, transposed: bool, heads: int) -> None:
        self.tensor = tensor  # gguf ReaderTensor; .data is a memmap view, (rows, row bytes)
        self.transposed = transposed
        self.heads = heads  # >0: rows are llama.cpp-permuted within each of this many heads


class GGUFSource:
    """Tensors of a GGUF file under Hugging Face names, dequantised row by row on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._gguf = import_gguf()
        self._reader = open_gguf(self.path)
        self.architecture: str = str(field_value(self._reader, "general.architecture"))
        arch = self.architecture
        if arch in LLAMA_LIKE_ARCHS:
            layer_map, global_map = _LLAMA_LAYER, _LLAMA_GLOBAL
        elif arch in GPT2_ARCHS:
            layer_map, global_map = _GPT2_LAYER, _GPT2_GLOBAL
        else:
            known = ", ".join(sorted(LLAMA_LIKE_ARCHS | GPT2_ARCHS))
            raise ValueError(
                f"{self.path.name}: GGUF architecture {arch!r} is not supported; known: {known}"
            )
        heads = int(field_value(self._reader, f"{arch}.attention.head_count"))
        kv_heads = int(field_value(self._reader, f"{arch}.attention.head_count_kv", heads))
        permuted = arch in _PERMUTED_ARCHS
        self._entries: dict[str, _Entry] = {}
        self._by_gguf_name: dict[str, Any] = {}
        for t in self._reader.tensors:
            self._by_gguf_name[t.name] = t
            hf_name, stem = _hf_name(t.name, layer_map, global_map)
            if hf_name is None:
                continue  # e.g. rope_freqs: not a Hugging Face weight (see raw())
            transposed = arch in GPT2_ARCHS and stem in _GPT2_CONV1D and t.name.endswith(".weight")
            n_heads = 0
            if permuted and stem == "attn_q":
                n_heads = heads
            elif permuted and stem == "attn_k":
                n_heads = kv_heads
            self._entries[hf_name] = _Entry(t, transposed, n_heads)
        embed = "transformer.wte.weight" if arch in GPT2_ARCHS else "model.embed_tokens.weight"
        # A tied file has no output.weight; like SafetensorsSource (and transformers'
        # state_dict) we serve the embedding under the LM head's name.
        self.tied = "lm_head.weight" not in self._entries
        if self.tied and embed in self._entries:
            self._entries["lm_head.weight"] = self._entries[embed]

    def close(self) -> None:
        """Drop the memory map (tensors already returned stay valid: they are copies)."""
        self._entries.clear()
        self._by_gguf_name.clear()
        self._reader = None  # type: ignore[assignment]

    def __enter__(self) -> GGUFSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def reader(self) -> Any:
        """The underlying gguf.GGUFReader (e.g. to build the Tokenizer without re-parsing)."""
        return self._reader

    @property
    def metadata(self) -> dict[str, Any]:
        """The file's key/value metadata as plain Python values, token arrays left out."""
        return read_metadata(self._reader)

    def names(self) -> list[str]:
        """All tensor names, Hugging Face style (lm_head.weight aliases the embedding if tied)."""
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape in Hugging Face layout ((out, in) for Linear, (in, out) for GPT-2 Conv1D)."""
        entry = self._entry(name)
        ne = tuple(int(n) for n in entry.tensor.shape)  # innermost first
        return ne if entry.transposed else ne[::-1]

    def ggml_type(self, name: str) -> str:
        """The GGML storage type of a tensor (e.g. 'Q4_1', 'F32')."""
        return self._entry(name).tensor.tensor_type.name

    def get(
        self,
        name: str,
        rows: slice | None = None,
        cols: slice | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """The tensor, or its rows/columns, dequantised into a new tensor of dtype.

        Only the file rows behind the requested rows (columns of a transposed Conv1D
        weight) are read and dequantised.
        """
        entry = self._entry(name)
        shape = self.shape(name)
        if len(shape) == 1:
            if cols is not None:
                raise ValueError(f"{name} is one-dimensional; it has no columns to slice")
            values = self._read_rows(entry, _indices(rows, shape[0]))
        elif entry.transposed:
            # File rows are the Hugging Face columns.
            values = self._read_rows(entry, _indices(cols, shape[1]))
            values = values[:, _indices(rows, shape[0])].T
        else:
            values = self._read_rows(entry, _indices(rows, shape[0]))
            if cols is not None:
                values = values[:, _indices(cols, shape[1])]
        return torch.from_numpy(np.ascontiguousarray(values)).to(dtype)

    def raw(self, gguf_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A tensor by its GGUF name (e.g. 'rope_freqs.weight'), dequantised, file layout."""
        t = self._by_gguf_name.get(gguf_name)
        if t is None:
            raise KeyError(f"{self.path.name} has no tensor {gguf_name!r}")
        values = self._dequantize(t, t.data)
        return torch.from_numpy(np.ascontiguousarray(values)).to(dtype)

    def rope_freq_factors(self) -> tuple[float, ...] | None:
        """llama.cpp's RoPE frequency divisors (tensor rope_freqs, Llama 3.1+), or None."""
        if "rope_freqs.weight" not in self._by_gguf_name:
            return None
        return tuple(float(v) for v in self.raw("rope_freqs.weight").flatten().tolist())

    # ------------------------------------------------------------------ internals

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path.name} has no tensor {name!r}") from None

    def _read_rows(self, entry: _Entry, hf_rows: slice) -> np.ndarray:
        """Dequantised file rows behind the given Hugging Face rows, in that order (float32)."""
        t = entry.tensor
        n_rows = t.data.shape[0]
        index: np.ndarray | None = None  # None: the contiguous file rows first..first+count
        first, stop, step = hf_rows.indices(n_rows)
        if entry.heads:
            index = _unpermute_rows(np.arange(first, stop, step), n_rows, entry.heads)
        elif step != 1:
            index = np.arange(first, stop, step)
        count = len(index) if index is not None else stop - first
        if t.data.ndim == 1:
            rows = t.data[first:stop] if index is None else t.data[index]
            return self._dequantize(t, rows)
        out = np.empty((count, int(t.shape[0])), dtype=np.float32)
        # Dequantise a few rows at a time: gguf's dequantisers allocate temporaries a few
        # times the size of their input, which would otherwise double the peak memory.
        chunk = max(1, _CHUNK_ELEMENTS // out.shape[1])
        for lo in range(0, count, chunk):
            hi = min(lo + chunk, count)
            # A slice of the memmap reads only those rows; an index array copies only them.
            raw = t.data[first + lo : first + hi] if index is None else t.data[index[lo:hi]]
            out[lo:hi] = self._gguf.quants.dequantize(raw, t.tensor_type)
        return out

    def _dequantize(self, t: Any, data: np.ndarray) -> np.ndarray:
        """float32 values of raw file data (always a new array, never a view of the file)."""
        values = self._gguf.quants.dequantize(data, t.tensor_type)
        if np.may_share_memory(values, self._reader.data):  # F32 comes back as a view
            values = np.array(values, dtype=np.float32)
        return values


def _hf_name(
    gguf_name: str, layer_map: dict[str, str], global_map: dict[str, str]
) -> tuple[str | None, str]:
    """(Hugging Face name or None, GGUF stem) of a GGUF tensor name."""
    m = _BLOCK_NAME.match(gguf_name)
    if m:
        layer, stem, kind = m.groups()
        module = layer_map.get(stem)
        if module is None:
            return None, stem
        prefix = "transformer.h" if "attn_qkv" in layer_map else "model.layers"
        return f"{prefix}.{layer}.{module}.{kind}", stem
    m = _GLOBAL_NAME.match(gguf_name)
    if m:
        stem, kind = m.groups()
        module = global_map.get(stem)
        return (None if module is None else f"{module}.{kind}"), stem
    return None, gguf_name


def _indices(sel: slice | None, n: int) -> slice:
    """A bounded slice of range(n); a step is allowed, a slice selecting nothing is not."""
    if sel is None:
        return slice(0, n)
    if not isinstance(sel, slice):
        raise TypeError(f"rows/cols must be a slice, got {type(sel).__name__}")
    start, stop, step = sel.indices(n)
    if len(range(start, stop, step)) == 0:
        raise ValueError(f"slice {sel} selects nothing of {n}")
    return slice(start, stop, step)


def _unpermute_rows(hf_rows: np.ndarray, n_rows: int, heads: int) -> np.ndarray:
    """File rows holding the given Hugging Face rows of a llama.cpp-permuted Wq/Wk.

    llama.cpp stores head h's rows as (dim, 2) pairs where Hugging Face has (2, dim)
    halves (dim = head_dim / 2); transformers undoes it with
    ``w.reshape(heads, dim, 2, ...).swapaxes(1, 2)``, i.e. HF row h·2·dim + i·dim + j
    is file row h·2·dim + j·2 + i.
    """
    if n_rows % (2 * heads):
        raise ValueError(f"{n_rows} rows do not split into {heads} heads of pairs")
    dim = n_rows // heads // 2
    head, rest = np.divmod(hf_rows, 2 * dim)
    half, j = np.divmod(rest, dim)
    return head * 2 * dim + j * 2 + half


def open_gguf_model(path: str | Path) -> tuple[GGUFSource, Architecture]:
    """The tensor source and architecture of a GGUF file (like open_hf_model for directories)."""
    source = GGUFSource(path)
    # computed in float32 whatever the file's storage type
    spec = spec_from_reader(source.reader, Path(path).stem, dtype="float32")
    arch = Architecture.from_gguf_metadata(
        source.metadata,
        spec=spec,
        rope_freq_factors=source.rope_freq_factors(),
        tied_embeddings=source.tied,
    )
    return source, arch
