"""Serialised state of a KV-group block (its K/V cache, optionally its weights) for migration.

Layout (little-endian):

    magic  b"EPKV"            4 bytes
    version                   u16
    header length             u32
    header                    UTF-8 JSON: model, layer, group, dtype, length, head_dim,
                              tensors [{name, shape, offset, nbytes}] (offsets into payload)
    payload                   raw tensor bytes, in header order
    crc32                     u32 over header + payload

``load_state`` checks every part and raises ValueError naming what is wrong.
"""

from __future__ import annotations

import json
import struct
import sys
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch

from llm.torch_blocks import KVGroupBlock

MAGIC = b"EPKV"
VERSION = 1
_PREFIX = struct.Struct("<4sHI")  # magic, version, header length
_CRC = struct.Struct("<I")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class BlockState:
    """What a KV-group block carries when it moves: identity, cache and (optionally) weights."""

    model: str
    layer: int
    group: int
    dtype: str
    keys: torch.Tensor  # (length, head_dim)
    values: torch.Tensor  # (length, head_dim)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def length(self) -> int:
        """Cached positions."""
        return int(self.keys.shape[0])

    @property
    def block_name(self) -> str:
        """The block's name, 'L{layer}.g{group}'."""
        return f"L{self.layer}.g{self.group}"


def _check_platform() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("block state serialisation assumes a little-endian host")


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(torch.uint8).numpy().tobytes()


def block_state(block: KVGroupBlock, model: str, with_weights: bool = False) -> BlockState:
    """The state of a live block (tensors are copies, safe to send)."""
    return BlockState(
        model=model,
        layer=block.layer,
        group=block.group,
        dtype=_DTYPE_NAMES[block.dtype],
        keys=block.keys.clone(),
        values=block.values.clone(),
        weights={k: v.clone() for k, v in block.weight_tensors().items()} if with_weights else {},
    )


def dump_state(state: BlockState) -> bytes:
    """Serialise a BlockState to bytes (format in the module docstring)."""
    _check_platform()
    dtype = DTYPES[state.dtype]
    tensors: list[tuple[str, torch.Tensor]] = [("keys", state.keys), ("values", state.values)]
    tensors += [(f"weight.{k}", v) for k, v in sorted(state.weights.items())]
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    offset = 0
    for name, t in tensors:
        raw = _raw(t.to(dtype))
        entries.append({"name": name, "shape": list(t.shape), "offset": offset, "nbytes": len(raw)})
        chunks.append(raw)
        offset += len(raw)
    header = json.dumps(
        {
            "model": state.model,
            "layer": state.layer,
            "group": state.group,
            "dtype": state.dtype,
            "length": state.length,
            "head_dim": int(state.keys.shape[1]),
            "tensors": entries,
        },
        separators=(",", ":"),
    ).encode("utf-8")
    payload = b"".join(chunks)
    crc = zlib.crc32(payload, zlib.crc32(header))
    return _PREFIX.pack(MAGIC, VERSION, len(header)) + header + payload + _CRC.pack(crc)


def save_state(block: KVGroupBlock, model: str, with_weights: bool = False) -> bytes:
    """A live block's cache (and optionally weights) as bytes."""
    return dump_state(block_state(block, model, with_weights))


def load_state(data: bytes, expect_model: str | None = None) -> BlockState:
    """Parse and validate bytes from dump_state; raises ValueError with the reason."""
    _check_platform()
    if len(data) < _PREFIX.size + _CRC.size:
        raise ValueError(f"block state truncated: {len(data)} bytes is shorter than any state")
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"not a block state: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise ValueError(f"block state version {version} is not supported (this reads {VERSION})")
    body_end = len(data) - _CRC.size
    header_end = _PREFIX.size + header_len
    if header_end > body_end:
        raise ValueError(f"block state truncated: header of {header_len} bytes does not fit")
    header_raw = data[_PREFIX.size : header_end]
    payload = data[header_end:body_end]
    (crc,) = _CRC.unpack_from(data, body_end)
    actual = zlib.crc32(payload, zlib.crc32(header_raw))
    if crc != actual:
        raise ValueError(
            f"block state checksum mismatch: stored {crc:#010x}, computed {actual:#010x}"
        )
    try:
        header = json.loads(header_raw.decode("utf-8"))
        dtype_name = str(header["dtype"])
        entries = list(header["tensors"])
        model, layer, group = str(header["model"]), int(header["layer"]), int(header["group"])
        length, head_dim = int(header["length"]), int(header["head_dim"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"block state header is malformed: {e}") from None
    if dtype_name not in DTYPES:
        raise ValueError(f"block state dtype {dtype_name!r} is unknown")
    if expect_model is not None and model != expect_model:
        raise ValueError(f"block state is for model {model!r}, not {expect_model!r}")
    dtype = DTYPES[dtype_name]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    tensors: dict[str, torch.Tensor] = {}
    for entry in entries:
        try:
            name, shape = str(entry["name"]), [int(s) for s in entry["shape"]]
            offset, nbytes = int(entry["offset"]), int(entry["nbytes"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"block state tensor entry is malformed: {e}") from None
        count = 1
        for s in shape:
            count *= s
        if count * itemsize != nbytes or offset < 0 or offset + nbytes > len(payload):
            raise ValueError(f"block state tensor {name!r}: shape {shape} does not fit its bytes")
        raw = bytearray(payload[offset : offset + nbytes])
        flat = (
            torch.frombuffer(raw, dtype=torch.uint8)
            if nbytes
            else torch.empty(0, dtype=torch.uint8)
        )
        tensors[name] = flat.view(dtype).reshape(shape)
    for name in ("keys", "values"):
        t = tensors.get(name)
        if t is None:
            raise ValueError(f"block state has no {name} tensor")
        if tuple(t.shape) != (length, head_dim):
            raise ValueError(
                f"block state {name} shape {tuple(t.shape)} disagrees with "
                f"length {length} x head_dim {head_dim}"
            )
    weights = {k.removeprefix("weight."): v for k, v in tensors.items() if k.startswith("weight.")}
    return BlockState(model, layer, group, dtype_name, tensors["keys"], tensors["values"], weights)
