"""GGUF metadata: plain Python values of its key/value fields, and the ModelSpec they describe.

A GGUF file carries its hyperparameters as ``<arch>.<key>`` metadata (llama.cpp's names,
e.g. ``llama.rope.freq_base``) and its tokenizer as ``tokenizer.ggml.*``. Reading is
memory-mapped: nothing but the header is touched until a tensor is read.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepart.llm.model import Dtype, ModelSpec, canonical_dtype

if TYPE_CHECKING:
    import gguf

GGUF_MISSING = "reading GGUF metadata needs the gguf package (pip install gguf)"

# general.file_type (llama_ftype): 0 all F32, 1 mostly F16, 32 mostly BF16; anything else is a
# quantised file, which we cost (and by default compute) as float16.
_GGUF_FILE_TYPES: dict[int, Dtype] = {0: "float32", 1: "float16", 32: "bfloat16"}
_GELU_ARCHS = frozenset({"gpt2", "gptj", "gptneox", "starcoder", "bloom", "falcon", "phi2"})
_NO_DEFAULT = object()


def import_gguf() -> Any:
    """The gguf module; raises ImportError saying how to install it."""
    try:
        import gguf  # optional: only GGUF models need it
    except ImportError:
        raise ImportError(GGUF_MISSING) from None
    return gguf


@cache
def _reader_class() -> type:
    """gguf.GGUFReader, parsing over a plain ndarray view of its memory map.

    The reader slices its np.memmap once per header item, and each memmap slice runs
    Python-level bookkeeping: SmolLM2's 98,000 vocabulary strings took 1.8 s to parse
    (each agent's start-up), 0.5 s over the plain view. The slices still share the map.
    """
    import numpy as np

    gguf = import_gguf()

    class PlainViewReader(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
            count = int(count)
            end = offset + np.dtype(dtype).itemsize * count
            arr = plain[offset:end].view(dtype=dtype)[:count]
            order = self.byte_order if override_order is None else override_order
            return arr.view(arr.dtype.newbyteorder(order))

    return PlainViewReader


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """A memory-mapped reader of a GGUF file; raises FileNotFoundError, ImportError, ValueError."""
    import_gguf()  # ImportError first: without gguf no file can be read
    reader = _reader_class()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {p}")
    try:
        return reader(str(p), "r")
    except ValueError as e:  # bad magic, unknown version, truncated header
        raise ValueError(f"{p} is not a readable GGUF file: {e}") from None


def field_value(reader: gguf.GGUFReader, key: str, default: Any = _NO_DEFAULT) -> Any:
    """A metadata value as int, float, bool, str or list; KeyError if absent and no default."""
    gguf = import_gguf()
    field = reader.fields.get(key)
    if field is None:
        if default is _NO_DEFAULT:
            raise KeyError(f"GGUF metadata has no {key}")
        return default
    types = field.types
    if types and types[0] == gguf.GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    part = field.parts[field.data[0]]
    if types and types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    if types and types[0] == gguf.GGUFValueType.BOOL:
        return bool(part[0])
    return part.tolist()[0]


def array_length(reader: gguf.GGUFReader, key: str) -> int | None:
    """Number of elements of an array field without decoding it, or None if absent."""
    field = reader.fields.get(key)
    return None if field is None else len(field.data)


def read_metadata(reader: gguf.GGUFReader, arrays: bool = False) -> dict[str, Any]:
    """Every key/value field as plain Python values; arrays (token lists...) only if asked."""
    gguf = import_gguf()
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # header entries (version, counts), not metadata
            continue
        if not arrays and field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        meta[key] = field_value(reader, key)
    return meta


def spec_from_metadata(
    meta: dict[str, Any],
    tensor_names: frozenset[str] = frozenset(),
    name: str = "gguf-model",
    dtype: str | None = None,
    vocab: int | None = None,
) -> ModelSpec:
    """Shapes from GGUF key/value metadata (plain values) and, where known, its tensor names.

    ``vocab`` defaults to ``<arch>.vocab_size`` or the length of ``tokenizer.ggml.tokens``;
    quantised files are costed as float16 unless ``dtype`` says otherwise. Without tensor
    names, tied embeddings, QKV biases and the FFN kind follow the architecture's usual.
    """
    arch = str(meta.get("general.architecture", "")).lower()

    def value(key: str, default: Any = _NO_DEFAULT) -> Any:
        got = meta.get(key, None if default is _NO_DEFAULT else default)
        if got is None:
            raise ValueError(f"GGUF metadata of {name} has no {key}")
        return got

    heads = int(value(f"{arch}.attention.head_count"))
    d_model = int(value(f"{arch}.embedding_length"))
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens is not None else int(value(f"{arch}.vocab_size"))
    key_length = int(value(f"{arch}.attention.key_length", 0))
    gelu = arch in _GELU_ARCHS
    if tensor_names:
        tied = "output.weight" not in tensor_names
        qkv_bias = bool({"blk.0.attn_q.bias", "blk.0.attn_qkv.bias"} & tensor_names)
        gelu = "blk.0.ffn_gate.weight" not in tensor_names
    else:  # metadata only: what the architecture usually is
        tied, qkv_bias = False, arch in {"qwen2", "gpt2"}
    file_dtype = _GGUF_FILE_TYPES.get(int(value("general.file_type", 1)), "float16")
    return ModelSpec(
        name=str(value("general.name", name)),
        layers=int(value(f"{arch}.block_count")),
        d_model=d_model,
        heads=heads,
        kv_heads=int(value(f"{arch}.attention.head_count_kv", heads)),
        d_ff=int(value(f"{arch}.feed_forward_length")),
        vocab=int(vocab),
        dtype=canonical_dtype(dtype) if dtype else file_dtype,
        head_dim=0 if key_length * heads == d_model else key_length,
        tied_embeddings=tied,
        ffn="gelu" if gelu else "swiglu",
        qkv_bias=qkv_bias,
        norm="layer" if arch == "gpt2" else "rms",
        learned_positions=int(value(f"{arch}.context_length")) if arch == "gpt2" else 0,
        extra={"architecture": arch, "format": "gguf"},
    )


def spec_from_reader(reader: gguf.GGUFReader, name: str, dtype: str | None = None) -> ModelSpec:
    """Shapes from an open GGUF reader (see spec_from_metadata)."""
    return spec_from_metadata(
        read_metadata(reader),
        frozenset(t.name for t in reader.tensors),
        name=name,
        dtype=dtype,
        vocab=array_length(reader, "tokenizer.ggml.tokens"),
    )


def spec_from_gguf(path: str | Path, dtype: str | None = None) -> ModelSpec:
    """Shapes from a GGUF file's metadata; raises ImportError without the gguf package.

    Quantized files are costed as float16 unless dtype says otherwise.
    """
    p = Path(path)
    return spec_from_reader(open_gguf(p), p.stem, dtype)
