"""Serialised state of a movable block (KV group, output projection or FFN) for migration.

A block moves as its identity (model and block name), optionally its weights (enough to
rebuild it without the checkpoint, see ``edgepart.llm.torch_blocks.block_from_weights``) and, for a
KV group only, its K/V cache.

Layout (little-endian), version 2:

    magic  b"EPKV"            4 bytes
    version                   u16  (2; version 1 carried KV groups only)
    header length             u32
    header                    UTF-8 JSON object:
                                model   str
                                block   str   'L{l}.g{g}', 'L{l}.proj' or 'L{l}.ffn'
                                dtype   str   float32 | float16 | bfloat16
                                cache   {length, head_dim} for a KV group, null otherwise
                                tensors [{name, shape, offset, nbytes}], offsets into the
                                        payload, which they tile exactly in order; names are
                                        'keys', 'values' (a group's cache) and 'weight.<name>'
                                        (the block's ``weight_tensors()``)
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

from edgepart.llm.torch_blocks import (
    MOVABLE_KINDS,
    BlockName,
    FFNBlock,
    KVGroupBlock,
    ProjBlock,
    parse_block_name,
)

MAGIC = b"EPKV"
VERSION = 2
_PREFIX = struct.Struct("<4sHI")  # magic, version, header length
_CRC = struct.Struct("<I")
_WEIGHT = "weight."
_CACHE = ("keys", "values")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

MovableBlock = KVGroupBlock | ProjBlock | FFNBlock


@dataclass
class BlockState:
    """What a block carries when it moves: identity, weights (optional), a group's cache.

    ``keys``/``values`` ((length, head_dim) each) are set for a KV group, None otherwise.
    """

    model: str
    block: str
    dtype: str
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    @property
    def parsed(self) -> BlockName:
        """The parsed block name (kind, layer, group)."""
        return parse_block_name(self.block)

    @property
    def kind(self) -> str:
        """'group', 'proj' or 'ffn'."""
        return self.parsed.kind

    @property
    def layer(self) -> int:
        """The block's layer."""
        return self.parsed.layer

    @property
    def group(self) -> int:
        """The KV group's index (-1 for a projection or FFN)."""
        return self.parsed.group

    @property
    def block_name(self) -> str:
        """The block's name, e.g. 'L3.g1' (same as ``block``)."""
        return self.block

    @property
    def has_cache(self) -> bool:
        """Whether it carries a K/V cache (KV groups only)."""
        return self.keys is not None

    @property
    def length(self) -> int:
        """Cached positions (0 without a cache)."""
        return 0 if self.keys is None else int(self.keys.shape[0])


def _check_platform() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("block state serialisation assumes a little-endian host")


def _raw(t: torch.Tensor) -> bytes:
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def block_state(
    block: MovableBlock, model: str, with_weights: bool = False, with_cache: bool = True
) -> BlockState:
    """The state of a live block (tensors are copies, safe to send).

    A KV group carries its cache, or an empty one when ``with_cache`` is False (e.g. weights
    served to a device that loads the block before any token ran).
    """
    if not isinstance(block, KVGroupBlock | ProjBlock | FFNBlock):
        raise ValueError(f"{block.name} does not move: only KV groups, proj and ffn blocks do")
    weights = {k: v.clone() for k, v in block.weight_tensors().items()} if with_weights else {}
    keys = values = None
    if isinstance(block, KVGroupBlock):
        if with_cache:
            keys, values = block.keys.clone(), block.values.clone()
        else:
            keys = torch.empty(0, block.head_dim, dtype=block.dtype)
            values = torch.empty(0, block.head_dim, dtype=block.dtype)
    return BlockState(model, block.name, _DTYPE_NAMES[block.dtype], weights, keys, values)


def dump_state(state: BlockState) -> bytes:
    """Serialise a BlockState to bytes (format in the module docstring)."""
    _check_platform()
    dtype = DTYPES.get(state.dtype)
    if dtype is None:
        raise ValueError(f"block state dtype {state.dtype!r} is unknown")
    if (state.keys is None) != (state.values is None):
        raise ValueError(f"block state of {state.block}: keys and values come together")
    tensors: list[tuple[str, torch.Tensor]] = []
    cache = None
    if state.keys is not None and state.values is not None:
        tensors += [("keys", state.keys), ("values", state.values)]
        cache = {"length": state.length, "head_dim": int(state.keys.shape[-1])}
    tensors += [(_WEIGHT + k, v) for k, v in sorted(state.weights.items())]
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
            "block": state.block,
            "dtype": state.dtype,
            "cache": cache,
            "tensors": entries,
        },
        separators=(",", ":"),
    ).encode("utf-8")
    payload = b"".join(chunks)
    crc = zlib.crc32(payload, zlib.crc32(header))
    return _PREFIX.pack(MAGIC, VERSION, len(header)) + header + payload + _CRC.pack(crc)


def save_state(block: MovableBlock, model: str, with_weights: bool = False) -> bytes:
    """A live block's state (a group's cache, its weights if asked) as bytes."""
    return dump_state(block_state(block, model, with_weights))


def _as_int(value: Any, what: str) -> int:
    # bool is an int in Python, and JSON floats such as 2.5 must not pass as sizes
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"block state {what} {value!r} is not an integer")
    return value


def _header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"block state header is malformed: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"block state header is malformed: a {type(header).__name__}")
    for key, kind in (("model", str), ("block", str), ("dtype", str), ("tensors", list)):
        if not isinstance(header.get(key), kind):
            raise ValueError(f"block state header is malformed: {key!r} missing or not a {kind}")
    return header


def _tensors(entries: list[Any], payload: bytes, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The payload cut into the header's tensors; they must tile it exactly, in order."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"block state tensor entry is malformed: {entry!r}")
        name = entry["name"]
        if name in tensors:
            raise ValueError(f"block state has tensor {name!r} twice")
        if name not in _CACHE and not (name.startswith(_WEIGHT) and len(name) > len(_WEIGHT)):
            raise ValueError(f"block state tensor {name!r} is neither cache nor weight")
        shape_raw = entry.get("shape")
        if not isinstance(shape_raw, list):
            raise ValueError(f"block state tensor {name!r}: shape {shape_raw!r} is not a list")
        shape = [_as_int(s, f"tensor {name!r} dim") for s in shape_raw]
        start = _as_int(entry.get("offset"), f"tensor {name!r} offset")
        nbytes = _as_int(entry.get("nbytes"), f"tensor {name!r} nbytes")
        if any(s < 0 for s in shape):
            raise ValueError(f"block state tensor {name!r}: negative dim in {shape}")
        count = 1
        for s in shape:
            count *= s
        if count * itemsize != nbytes:
            raise ValueError(
                f"block state tensor {name!r}: shape {shape} needs {count * itemsize} bytes, "
                f"the header gives {nbytes}"
            )
        if start != offset or start + nbytes > len(payload):
            raise ValueError(
                f"block state tensor {name!r}: bytes {start}..{start + nbytes} do not follow "
                f"at {offset} within the payload of {len(payload)}"
            )
        offset += nbytes
        raw = bytearray(payload[start : start + nbytes])  # own copy: writable, outlives data
        flat = (
            torch.frombuffer(raw, dtype=torch.uint8)
            if nbytes
            else torch.empty(0, dtype=torch.uint8)
        )
        tensors[name] = flat.view(dtype).reshape(shape)
    if offset != len(payload):
        raise ValueError(
            f"block state payload has {len(payload) - offset} bytes no tensor accounts for"
        )
    return tensors


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
    header_raw = bytes(data[_PREFIX.size : header_end])
    payload = bytes(data[header_end:body_end])
    (crc,) = _CRC.unpack_from(data, body_end)
    actual = zlib.crc32(payload, zlib.crc32(header_raw))
    if crc != actual:
        raise ValueError(
            f"block state checksum mismatch: stored {crc:#010x}, computed {actual:#010x}"
        )
    header = _header(header_raw)
    model, block, dtype_name = header["model"], header["block"], header["dtype"]
    if dtype_name not in DTYPES:
        raise ValueError(f"block state dtype {dtype_name!r} is unknown")
    if expect_model is not None and model != expect_model:
        raise ValueError(f"block state is for model {model!r}, not {expect_model!r}")
    try:
        kind = parse_block_name(block).kind
    except ValueError as e:
        raise ValueError(f"block state names no block: {e}") from None
    if kind not in MOVABLE_KINDS:
        raise ValueError(f"block state is for {block}, which does not move")
    tensors = _tensors(header["tensors"], payload, DTYPES[dtype_name])
    cache = header.get("cache")
    keys = values = None
    if kind == "group":
        if not isinstance(cache, dict):
            raise ValueError(f"block state of KV group {block} has no cache description")
        length = _as_int(cache.get("length"), "cache length")
        head_dim = _as_int(cache.get("head_dim"), "cache head_dim")
        for name in _CACHE:
            t = tensors.get(name)
            if t is None:
                raise ValueError(f"block state of {block} has no {name} tensor")
            if tuple(t.shape) != (length, head_dim):
                raise ValueError(
                    f"block state {name} shape {tuple(t.shape)} disagrees with "
                    f"length {length} x head_dim {head_dim}"
                )
        keys, values = tensors["keys"], tensors["values"]
    else:
        if cache is not None:
            raise ValueError(f"block state of {block} has a cache, but only KV groups cache")
        stray = [n for n in _CACHE if n in tensors]
        if stray:
            raise ValueError(f"block state of {block} carries {stray}, but only KV groups cache")
    weights = {k.removeprefix(_WEIGHT): v for k, v in tensors.items() if k.startswith(_WEIGHT)}
    return BlockState(model, block, dtype_name, weights, keys, values)
