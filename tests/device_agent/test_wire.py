"""Data-plane frames: round trips, exact layout, rejection of malformed input, a real echo."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgepart.device_agent.wire import (
    DTYPE_CODES,
    Frame,
    FrameError,
    Kind,
    StreamClosed,
    decode_batch,
    decode_frame,
    encode_batch,
    encode_frame,
    payload_to_tensor,
    read_frame,
    tensor_to_payload,
    write_frame,
)

TIMEOUT_S = 10.0  # generous bound on any single network wait in these tests

DTYPES = list(DTYPE_CODES)
names = st.text(max_size=40)
u32 = st.integers(0, 2**32 - 1)
kinds = st.sampled_from(list(Kind))


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """Tensors of every wire dtype, 0..4 dims (incl. scalars and empty dims), from raw bits."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 5), max_size=4))
    count = 1
    for s in shape:
        count *= s
    itemsize = torch.empty(0, dtype=dtype).element_size()
    # arbitrary bit patterns, so NaN payloads, infinities and subnormals are covered too
    raw = bytearray(draw(st.binary(min_size=count * itemsize, max_size=count * itemsize)))
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN-safe, unlike torch.equal)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.reshape(-1).view(torch.uint8).numpy().tobytes()
        == b.reshape(-1).view(torch.uint8).numpy().tobytes()
    )


@given(tensors())
def test_tensor_payload_round_trip(t: torch.Tensor) -> None:
    back = payload_to_tensor(tensor_to_payload(t))
    assert same_bits(back, t)


@given(kinds, u32, u32, names, tensors())
def test_frame_round_trip(kind: Kind, epoch: int, token: int, name: str, t: torch.Tensor) -> None:
    frame = Frame(kind, epoch, token, name, tensor_to_payload(t))
    back = decode_frame(encode_frame(frame))
    assert back == frame
    assert same_bits(payload_to_tensor(back.payload), t)


def test_non_contiguous_tensor_is_sent_in_logical_order() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).T
    back = payload_to_tensor(tensor_to_payload(t))
    assert back.shape == (4, 3)
    assert torch.equal(back, t)
    back[0, 0] = 99.0  # writable: the decoder owns its memory


def test_exact_byte_layout() -> None:
    t = torch.tensor([[1.0, -2.0]], dtype=torch.float32)
    frame = Frame(Kind.ACTIVATION, 7, 258, "L0.g1", tensor_to_payload(t))
    payload = (
        b"\x01"  # dtype float32
        + b"\x02"  # ndim
        + b"\x01\x00\x00\x00"  # dim 1
        + b"\x02\x00\x00\x00"  # dim 2
        + b"\x00\x00\x80\x3f"  # 1.0
        + b"\x00\x00\x00\xc0"  # -2.0
    )
    expected = (
        b"EPF1"
        + b"\x01"  # version
        + b"\x01"  # kind ACTIVATION
        + b"\x07\x00\x00\x00"  # epoch 7
        + b"\x02\x01\x00\x00"  # token 258
        + b"\x05\x00"  # name length
        + b"L0.g1"
        + b"\x12\x00\x00\x00\x00\x00\x00\x00"  # payload length 18
        + payload
    )
    assert frame.payload == payload
    assert encode_frame(frame) == expected


def _good() -> bytes:
    return encode_frame(Frame(Kind.ACK, 1, 2, "route", b"abc"))


def _patched(offset: int, value: bytes) -> bytes:
    b = bytearray(_good())
    b[offset : offset + len(value)] = value
    return bytes(b)


MALFORMED_FRAMES: dict[str, bytes] = {
    "empty": b"",
    "short header": _good()[:10],
    "bad magic": _patched(0, b"XXXX"),
    "bad version": _patched(4, b"\x09"),
    "kind 0": _patched(5, b"\x00"),
    "kind 5": _patched(5, b"\x05"),
    "name longer than buffer": _patched(14, b"\xff\xff"),
    "name not utf-8": _patched(16, b"\xff\xfe"),
    "payload length too large": _patched(21, struct.pack("<Q", 2**63)),
    "payload length too small": _patched(21, struct.pack("<Q", 1)),
    "truncated payload": _good()[:-1],
    "trailing bytes": _good() + b"!",
}


@pytest.mark.parametrize("case", list(MALFORMED_FRAMES))
def test_malformed_frames_raise(case: str) -> None:
    with pytest.raises(FrameError):
        decode_frame(MALFORMED_FRAMES[case])


def test_payload_over_limit_raises() -> None:
    frame = encode_frame(Frame(Kind.BLOCK_STATE, 0, 0, "b", b"x" * 100))
    assert decode_frame(frame, max_payload=100).payload == b"x" * 100
    with pytest.raises(FrameError, match="limit"):
        decode_frame(frame, max_payload=99)


def _tensor_payload(code: int, dims: list[int], data: bytes) -> bytes:
    return struct.pack("<BB", code, len(dims)) + b"".join(struct.pack("<I", d) for d in dims) + data


MALFORMED_TENSORS: dict[str, bytes] = {
    "empty": b"",
    "one byte": b"\x01",
    "unknown dtype": _tensor_payload(9, [1], b"\x00" * 4),
    "dtype 0": _tensor_payload(0, [], b""),
    "dims truncated": b"\x01\x03" + struct.pack("<I", 1),
    "data short": _tensor_payload(1, [2, 2], b"\x00" * 15),
    "data long": _tensor_payload(1, [2, 2], b"\x00" * 17),
    # a forged huge shape must be rejected by arithmetic, not by trying to allocate it
    "huge shape": _tensor_payload(4, [2**32 - 1] * 4, b"\x00" * 8),
    "empty shape with data": _tensor_payload(1, [0, 3], b"\x00" * 4),
}


@pytest.mark.parametrize("case", list(MALFORMED_TENSORS))
def test_malformed_tensor_payloads_raise(case: str) -> None:
    with pytest.raises(FrameError):
        payload_to_tensor(MALFORMED_TENSORS[case])


@pytest.mark.parametrize(
    "frame",
    [
        Frame(Kind.ACK, -1, 0, "x"),
        Frame(Kind.ACK, 0, 2**32, "x"),
        Frame(Kind.ACK, 0, 0, "x" * 70_000),
    ],
)
def test_unencodable_frames_raise(frame: Frame) -> None:
    with pytest.raises(FrameError):
        encode_frame(frame)


@given(
    st.dictionaries(st.text(min_size=1, max_size=12), st.binary(max_size=64), max_size=6).map(
        lambda d: list(d.items())
    )
)
def test_block_batch_round_trip(states: list[tuple[str, bytes]]) -> None:
    assert decode_batch(encode_batch(states)) == states


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\x01\x00", "truncated in the count"),
        (struct.pack("<IH", 1, 4) + b"L0.", "truncated in the name"),
        (struct.pack("<IH", 1, 6) + b"L0.ffn" + struct.pack("<Q", 2**40), "truncated in the state"),
        (encode_batch([("L0.ffn", b"")]) + b"x", "after the last entry"),
        (encode_batch([("L0.ffn", b""), ("L0.ffn", b"")]), "named twice"),
        (struct.pack("<IH", 1, 2) + b"\xff\xfe" + struct.pack("<Q", 0), "not UTF-8"),
    ],
)
def test_malformed_block_batches_raise_under_one_kind(payload: bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=f"^block batch: .*{reason}"):
        decode_batch(payload)


def test_unsupported_tensor_dtype_raises() -> None:
    with pytest.raises(FrameError, match="dtype"):
        tensor_to_payload(torch.zeros(2, dtype=torch.int8))


@settings(max_examples=200)
@given(st.binary(max_size=64))
def test_garbage_never_crashes_the_decoder(garbage: bytes) -> None:
    # only FrameError may escape: anything else would take the agent down
    for parse, result_type in ((decode_frame, Frame), (payload_to_tensor, torch.Tensor)):
        try:
            result = parse(garbage)
        except FrameError as exc:
            assert str(exc)  # a reason to log
        else:
            assert isinstance(result, result_type)


# --- asyncio streams ---------------------------------------------------------------------


async def _stream_of(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def test_read_frame_from_stream_then_clean_eof() -> None:
    frames = [Frame(Kind.ACTIVATION, 3, i, f"r{i}", bytes([i]) * i) for i in range(5)]

    async def main() -> None:
        reader = await _stream_of(b"".join(encode_frame(f) for f in frames))
        for f in frames:
            assert await read_frame(reader) == f
        with pytest.raises(StreamClosed):
            await read_frame(reader)

    asyncio.run(main())


# a stream cannot tell a short length or trailing bytes from the start of the next frame, and
# an empty stream is a clean close
STREAM_UNDETECTABLE = ("empty", "trailing bytes", "payload length too small")


@pytest.mark.parametrize("case", [c for c in MALFORMED_FRAMES if c not in STREAM_UNDETECTABLE])
def test_read_frame_rejects_malformed(case: str) -> None:
    async def main() -> None:
        with pytest.raises(FrameError):
            await read_frame(await _stream_of(MALFORMED_FRAMES[case]))

    asyncio.run(main())


def test_read_frame_rejects_oversized_payload_before_reading_it() -> None:
    # the stream holds only the header; without the early check read_frame would wait forever
    head = encode_frame(Frame(Kind.BLOCK_STATE, 0, 0, "b", b""))[:-8] + struct.pack("<Q", 10**12)

    async def main() -> None:
        reader = await _stream_of(head, eof=False)
        with pytest.raises(FrameError, match="limit"):
            await asyncio.wait_for(read_frame(reader, max_payload=1 << 20), TIMEOUT_S)

    asyncio.run(main())


class EchoServer:
    """Echoes frames back; on a bad frame replies ERROR, records it and drops the connection."""

    def __init__(self) -> None:
        self.errors: list[FrameError] = []
        self.error_seen = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    frame = await read_frame(reader, max_payload=1 << 20)
                except StreamClosed:
                    return
                except FrameError as e:
                    self.errors.append(e)
                    self.error_seen.set()
                    await write_frame(writer, Frame(Kind.ERROR, 0, 0, "", str(e).encode()))
                    return
                await write_frame(writer, frame)
        finally:
            writer.close()


async def _with_echo_server(body: Callable[[EchoServer, int], Awaitable[None]]) -> None:
    echo = EchoServer()
    server = await asyncio.start_server(echo.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await asyncio.wait_for(body(echo, port), TIMEOUT_S)
    finally:
        server.close()
        await server.wait_closed()


async def _echo_round_trip(port: int, frames: list[Frame]) -> list[Frame]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        back = []
        for f in frames:
            await write_frame(writer, f)
            back.append(await read_frame(reader))
        return back
    finally:
        writer.close()
        await writer.wait_closed()


def test_echo_server_returns_100_frames_identical() -> None:
    gen = torch.Generator().manual_seed(0)
    frames = [
        Frame(
            Kind.ACTIVATION if i % 2 else Kind.BLOCK_STATE,
            i // 10,
            i,
            f"L{i % 3}.g{i % 2}",
            tensor_to_payload(torch.randn(1, i % 7, 64, generator=gen)),
        )
        for i in range(100)
    ]

    async def body(echo: EchoServer, port: int) -> None:
        back = await _echo_round_trip(port, frames)
        assert back == frames
        assert echo.errors == []

    asyncio.run(_with_echo_server(body))


def test_garbage_on_socket_is_rejected_and_server_keeps_serving() -> None:
    async def body(echo: EchoServer, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await echo.error_seen.wait()
        assert "magic" in str(echo.errors[0])
        reply = await read_frame(reader)
        assert reply.kind == Kind.ERROR
        assert b"magic" in reply.payload
        # the server dropped the connection after its error reply
        with pytest.raises(StreamClosed):
            await read_frame(reader)
        writer.close()
        await writer.wait_closed()

        frame = Frame(Kind.ACK, 1, 1, "next", b"ok")
        assert await _echo_round_trip(port, [frame]) == [frame]
        assert len(echo.errors) == 1

    asyncio.run(_with_echo_server(body))
