"""Data-plane wire format: length-prefixed binary frames between agents (never pickle).

Frame layout (little-endian):

    magic  b"EPF1"            4 bytes
    version                   u8
    kind                      u8   (ACTIVATION=1, BLOCK_STATE=2, ACK=3, ERROR=4, PING=6,
                                    PONG=7, FETCH=8, CHALLENGE=9, HELLO=10, BLOCK_BATCH=11)
    epoch                     u32  placement epoch the frame belongs to
    token                     u32  decode step (token index); a FETCH's request number
    name length               u16
    name                      UTF-8 route / block name
    payload length            u64
    payload                   bytes

FETCH=8 (token: the requester's request number, from 1; payload: the requester's UTF-8
device name) asks a peer for a block's weights; the peer answers with a BLOCK_STATE (an
``edgepart.llm.state`` blob of them), or an ERROR giving the reason, carrying the request's token,
which tells the answer apart from a batch's (token 0).

BLOCK_BATCH=11 commits a prepared switch (``edgepart.control_plane.protocol.Commit``): one frame
from a block's current holder to one target with every block moving there, token 0, the
sender's device name as the name, the commit's epoch. The target answers ACK (it took
them all) or ERROR (the reason; it took none), with its own device name and the same
epoch. The payload (``encode_batch``) is:

    count                     u32
    per block:  name length   u16
                name          UTF-8 block name
                state length  u64  (0: a projection or FFN block, which carries no state)
                state         an ``edgepart.llm.state`` blob without weights (a KV group's cache)

A tensor payload (``tensor_to_payload``) is:

    dtype code                u8   (float32=1, float16=2, bfloat16=3, int64=4)
    ndim                      u8
    dims                      u32 each
    data                      raw little-endian element bytes, C order

Every parse failure raises ``FrameError`` naming what is wrong; sizes are checked against
limits before anything is allocated, so garbage on the port cannot exhaust memory.
"""

from __future__ import annotations

import asyncio
import enum
import struct
import sys
from dataclasses import dataclass

import torch

MAGIC = b"EPF1"
VERSION = 1
DEFAULT_MAX_PAYLOAD = 256 * 1024 * 1024  # bytes; a SmolLM2-sized block state fits with room

_HEAD = struct.Struct("<4sBBIIH")  # magic, version, kind, epoch, token, name length
_PAYLOAD_LEN = struct.Struct("<Q")
_TENSOR_HEAD = struct.Struct("<BB")  # dtype code, ndim
_DIM = struct.Struct("<I")
_U32_MAX = 0xFFFF_FFFF
_U16_MAX = 0xFFFF
_COUNT = struct.Struct("<I")
_NAME_LEN = struct.Struct("<H")

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.int64: 4,
}
_CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


class FrameError(ValueError):
    """A frame or tensor payload is malformed, truncated or over a limit.

    A parse failure reads ``<kind>: <detail>``: the kind before the first colon is fixed
    text (no numbers, no names), so the receiver counts and logs bad input per kind.
    """


class StreamClosed(EOFError):
    """The peer closed the stream cleanly between frames."""


class Kind(enum.IntEnum):
    """What a frame carries."""

    ACTIVATION = 1
    BLOCK_STATE = 2
    ACK = 3
    ERROR = 4
    PING = 6  # a latency probe: the peer answers PONG with the same token at once
    PONG = 7
    FETCH = 8  # a block's weights, please: answered by BLOCK_STATE or ERROR, same token
    CHALLENGE = 9  # first frame of an accepted connection: a nonce the connecting peer signs
    HELLO = 10  # the connecting peer's answer: its name and its signature of the nonce
    BLOCK_BATCH = 11  # a commit: the states of every block moving from sender to receiver


@dataclass(frozen=True)
class Frame:
    """One data-plane message: kind, placement epoch, token index, route/block name, payload."""

    kind: Kind
    epoch: int
    token: int
    name: str
    payload: bytes = b""


def _check_platform() -> None:
    if sys.byteorder != "little":
        # raw tensor bytes go out in host order; the format promises little-endian
        raise RuntimeError("the data-plane wire format assumes a little-endian host")


def _kind(value: int) -> Kind:
    try:
        return Kind(value)
    except ValueError:
        raise FrameError(f"unknown frame kind: {value}") from None


def _header(frame: Frame) -> bytes:
    """The bytes before the payload (validates every field)."""
    kind = _kind(int(frame.kind))
    for field_name, value in (("epoch", frame.epoch), ("token", frame.token)):
        if not 0 <= value <= _U32_MAX:
            raise FrameError(f"frame {field_name} {value} does not fit in u32")
    name = frame.name.encode("utf-8")
    if len(name) > _U16_MAX:
        raise FrameError(f"frame name of {len(name)} bytes exceeds {_U16_MAX}")
    return (
        _HEAD.pack(MAGIC, VERSION, kind, frame.epoch, frame.token, len(name))
        + name
        + _PAYLOAD_LEN.pack(len(frame.payload))
    )


def encode_frame(frame: Frame) -> bytes:
    """A frame as bytes on the wire (layout in the module docstring)."""
    return _header(frame) + bytes(frame.payload)


def _parse_head(raw: bytes) -> tuple[Kind, int, int, int]:
    """Validate the fixed header; returns kind, epoch, token and name length (bytes)."""
    magic, version, kind, epoch, token, name_len = _HEAD.unpack(raw)
    if magic != MAGIC:
        raise FrameError(f"not a frame: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise FrameError(f"unsupported frame version: {version} (this reads {VERSION})")
    return _kind(kind), epoch, token, name_len


def _parse_name(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FrameError(f"frame name is not UTF-8: {e}") from None


def _check_payload_len(length: int, max_payload: int) -> None:
    if length > max_payload:
        raise FrameError(
            f"frame over the limit: payload of {length} bytes exceeds the limit of {max_payload}"
        )


def decode_frame(
    buf: bytes | bytearray | memoryview, max_payload: int = DEFAULT_MAX_PAYLOAD
) -> Frame:
    """Parse exactly one frame from buf; raises FrameError on anything malformed."""
    view = memoryview(buf).cast("B")
    if len(view) < _HEAD.size:
        raise FrameError(f"frame truncated: {len(view)} bytes is shorter than the header")
    kind, epoch, token, name_len = _parse_head(bytes(view[: _HEAD.size]))
    name_end = _HEAD.size + name_len
    if len(view) < name_end + _PAYLOAD_LEN.size:
        raise FrameError(f"frame truncated: name of {name_len} bytes does not fit")
    name = _parse_name(bytes(view[_HEAD.size : name_end]))
    (length,) = _PAYLOAD_LEN.unpack(view[name_end : name_end + _PAYLOAD_LEN.size])
    _check_payload_len(length, max_payload)
    start = name_end + _PAYLOAD_LEN.size
    if len(view) - start != length:
        raise FrameError(
            f"frame length mismatch: payload length {length} disagrees with the "
            f"{len(view) - start} bytes given"
        )
    return Frame(kind, epoch, token, name, bytes(view[start:]))


def encode_batch(states: list[tuple[str, bytes]]) -> bytes:
    """A BLOCK_BATCH payload: (block name, its state blob or b"") in order."""
    parts = [_COUNT.pack(len(states))]
    for name, blob in states:
        raw = name.encode("utf-8")
        if len(raw) > _U16_MAX:
            raise FrameError(f"block batch: a name of {len(raw)} bytes is too long")
        parts += [_NAME_LEN.pack(len(raw)), raw, _PAYLOAD_LEN.pack(len(blob)), blob]
    return b"".join(parts)


def decode_batch(payload: bytes | bytearray | memoryview) -> list[tuple[str, bytes]]:
    """The (block name, state blob) entries of a BLOCK_BATCH payload; FrameError (kind
    ``block batch``) when it is truncated, has trailing bytes or names a block twice."""
    view = memoryview(payload).cast("B")
    at = 0

    def take(n: int, what: str) -> memoryview:
        nonlocal at
        if len(view) - at < n:
            raise FrameError(f"block batch: truncated in the {what}")
        at += n
        return view[at - n : at]

    (count,) = _COUNT.unpack(take(_COUNT.size, "count"))
    states: list[tuple[str, bytes]] = []
    for _ in range(count):
        (name_len,) = _NAME_LEN.unpack(take(_NAME_LEN.size, "name length"))
        try:
            name = bytes(take(name_len, "name")).decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError("block batch: a name is not UTF-8") from None
        (length,) = _PAYLOAD_LEN.unpack(take(_PAYLOAD_LEN.size, "state length"))
        states.append((name, bytes(take(length, "state"))))
    if at != len(view):
        raise FrameError(f"block batch: {len(view) - at} bytes after the last entry")
    if len({name for name, _ in states}) != len(states):
        raise FrameError("block batch: a block is named twice")
    return states


def tensor_to_payload(t: torch.Tensor) -> bytes:
    """A CPU copy of t as dtype code, ndim, dims and raw little-endian bytes."""
    _check_platform()
    code = DTYPE_CODES.get(t.dtype)
    if code is None:
        raise FrameError(f"tensor dtype {t.dtype} cannot be sent (supported: {list(DTYPE_CODES)})")
    if t.dim() > 255:
        raise FrameError(f"tensor of {t.dim()} dims exceeds the 255 the format allows")
    if any(s > _U32_MAX for s in t.shape):
        raise FrameError(f"tensor shape {tuple(t.shape)} has a dim over u32")
    flat = t.detach().cpu().contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy().tobytes()
    head = _TENSOR_HEAD.pack(code, t.dim()) + b"".join(_DIM.pack(s) for s in t.shape)
    return head + raw


def payload_to_tensor(b: bytes | bytearray | memoryview) -> torch.Tensor:
    """Parse a tensor payload into a new (writable) CPU tensor; raises FrameError if malformed."""
    _check_platform()
    view = memoryview(b).cast("B")
    if len(view) < _TENSOR_HEAD.size:
        raise FrameError(f"tensor payload truncated: {len(view)} bytes")
    code, ndim = _TENSOR_HEAD.unpack(view[: _TENSOR_HEAD.size])
    dtype = _CODE_DTYPES.get(code)
    if dtype is None:
        raise FrameError(f"unknown tensor dtype: code {code}")
    data_start = _TENSOR_HEAD.size + ndim * _DIM.size
    if len(view) < data_start:
        raise FrameError(f"tensor payload truncated: {ndim} dims do not fit")
    shape = [_DIM.unpack_from(view, _TENSOR_HEAD.size + i * _DIM.size)[0] for i in range(ndim)]
    count = 1
    for s in shape:
        count *= s
    itemsize = torch.empty(0, dtype=dtype).element_size()
    nbytes = len(view) - data_start
    # compare before allocating: a forged shape must not size any buffer
    if count * itemsize != nbytes:
        raise FrameError(
            f"tensor shape mismatch: shape {shape} of {dtype} needs {count * itemsize} bytes, "
            f"payload has {nbytes}"
        )
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    raw = bytearray(view[data_start:])  # own copy, so the tensor is writable and outlives buf
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape)


async def write_frame(writer: asyncio.StreamWriter, frame: Frame) -> None:
    """Send one frame and wait for the transport to drain."""
    writer.write(_header(frame))
    if frame.payload:
        writer.write(frame.payload)  # separately, so a large payload is not copied to concatenate
    await writer.drain()


async def _read(reader: asyncio.StreamReader, n: int, what: str) -> bytes:
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError as e:
        got = len(e.partial)
        raise FrameError(f"frame truncated: in the {what}, got {got} of {n} bytes") from None


async def read_frame(reader: asyncio.StreamReader, max_payload: int = DEFAULT_MAX_PAYLOAD) -> Frame:
    """Read one frame; StreamClosed on a clean EOF between frames, FrameError on bad input."""
    try:
        head = await reader.readexactly(_HEAD.size)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            raise StreamClosed("peer closed the stream") from None
        raise FrameError(
            f"frame truncated: in the header, got {len(e.partial)} of {_HEAD.size} bytes"
        ) from None
    # validated before reading further, so garbage is rejected after 16 bytes
    kind, epoch, token, name_len = _parse_head(head)
    rest = await _read(reader, name_len + _PAYLOAD_LEN.size, "name")
    name = _parse_name(rest[:name_len])
    (length,) = _PAYLOAD_LEN.unpack_from(rest, name_len)
    _check_payload_len(length, max_payload)
    payload = await _read(reader, length, "payload") if length else b""
    return Frame(kind, epoch, token, name, payload)
