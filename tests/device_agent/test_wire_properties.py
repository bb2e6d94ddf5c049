"""Data-plane frames and tensor payloads against bad input, as properties.

Every way a valid frame or tensor payload can be spoilt (cut at any byte, a length field
changed, bytes flipped, a payload over the frame limit, an unknown dtype, a shape that
disagrees with the data) ends in a ``FrameError`` whose kind (the text before the first
colon) is one of a few fixed strings, so the receiver's per-kind counters and its
once-per-kind log stay small whatever arrives. Activations that parse but cannot be what
their route name carries (wrong dtype or shape) are caught by ``activation_problem``.
"""

from __future__ import annotations

import asyncio
import re
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_wire import tensors

from edgepart.device_agent.program import Routes, activation_problem, groups_name
from edgepart.device_agent.wire import (
    DTYPE_CODES,
    MAGIC,
    Frame,
    FrameError,
    Kind,
    StreamClosed,
    decode_frame,
    encode_frame,
    payload_to_tensor,
    read_frame,
    tensor_to_payload,
)
from edgepart.llm.model import ModelSpec

#: every kind of parse failure the receiving side can meet (DataPlane counts by these)
PARSE_KINDS = {
    "not a frame",
    "unsupported frame version",
    "unknown frame kind",
    "frame name is not UTF-8",
    "frame over the limit",
    "frame truncated",
    "frame length mismatch",
    "unknown tensor dtype",
    "tensor payload truncated",
    "tensor shape mismatch",
}
_HEAD = 16  # magic, version, kind, epoch, token, name length
_NAME_LEN_AT = 14

u32 = st.integers(0, 2**32 - 1)
frame_kinds = st.sampled_from(list(Kind))
names = st.text(max_size=24)
payloads = st.binary(max_size=96)
frames = st.builds(Frame, frame_kinds, u32, u32, names, payloads)
DTYPES = list(DTYPE_CODES)
SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def kind_of(exc: FrameError) -> str:
    """What a receiver counts the failure under."""
    return str(exc).split(":", 1)[0]


def refused(parse, *args, **kwargs) -> FrameError:
    """The FrameError parse raises (failing the test if it raises nothing or anything else)."""
    with pytest.raises(FrameError) as info:
        parse(*args, **kwargs)
    assert kind_of(info.value) in PARSE_KINDS, str(info.value)
    return info.value


async def _stream(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


# -- frames -------------------------------------------------------------------------------


@SLOW
@given(frames)
def test_a_frame_cut_at_any_byte_is_refused(frame: Frame) -> None:
    raw = encode_frame(frame)
    for cut in range(len(raw)):
        # a whole buffer with less payload than declared disagrees with its length field
        kind = kind_of(refused(decode_frame, raw[:cut]))
        assert kind == (
            "frame length mismatch" if cut >= len(raw) - len(frame.payload) else "frame truncated"
        )

    async def on_a_stream() -> None:
        with pytest.raises(StreamClosed):  # nothing at all: a clean close between frames
            await read_frame(await _stream(b""))
        for cut in range(1, len(raw)):
            with pytest.raises(FrameError, match=r"^frame truncated: "):
                await read_frame(await _stream(raw[:cut]))

    asyncio.run(on_a_stream())


@given(frames, st.data())
def test_a_wrong_payload_length_is_refused(frame: Frame, data: st.DataObject) -> None:
    raw = bytearray(encode_frame(frame))
    at = _HEAD + len(frame.name.encode("utf-8"))
    limit = data.draw(st.integers(len(frame.payload), 2**40), label="limit")
    wrong = data.draw(st.integers(0, 2**64 - 1).filter(lambda n: n != len(frame.payload)))
    raw[at : at + 8] = struct.pack("<Q", wrong)
    kind = kind_of(refused(decode_frame, bytes(raw), max_payload=limit))
    assert kind == ("frame over the limit" if wrong > limit else "frame length mismatch")


@given(frames, st.data())
def test_a_wrong_name_length_never_escapes_as_another_error(
    frame: Frame, data: st.DataObject
) -> None:
    raw = bytearray(encode_frame(frame))
    true_len = len(frame.name.encode("utf-8"))
    wrong = data.draw(st.integers(0, 2**16 - 1).filter(lambda n: n != true_len), label="len")
    raw[_NAME_LEN_AT : _NAME_LEN_AT + 2] = struct.pack("<H", wrong)
    try:
        got = decode_frame(bytes(raw))
    except FrameError as exc:
        assert kind_of(exc) in PARSE_KINDS
    else:
        # the format has no checksum: a shifted name can still frame consistent bytes, but
        # never the frame that was sent
        assert got != frame


@given(frames, st.data())
def test_flipped_bytes_only_raise_frame_errors(frame: Frame, data: st.DataObject) -> None:
    raw = bytearray(encode_frame(frame))
    for _ in range(data.draw(st.integers(1, 6), label="flips")):
        at = data.draw(st.integers(0, len(raw) - 1), label="at")
        raw[at] ^= data.draw(st.integers(1, 255), label="mask")
    try:
        decode_frame(bytes(raw))
    except FrameError as exc:
        assert kind_of(exc) in PARSE_KINDS


@given(payload_len=st.integers(0, 4096), limit=st.integers(0, 4096))
def test_the_frame_limit_holds_to_the_byte(payload_len: int, limit: int) -> None:
    raw = encode_frame(Frame(Kind.BLOCK_STATE, 1, 0, "L0.g0", b"\x00" * payload_len))
    if payload_len <= limit:
        assert len(decode_frame(raw, max_payload=limit).payload) == payload_len
    else:
        assert kind_of(refused(decode_frame, raw, max_payload=limit)) == "frame over the limit"


@settings(deadline=None)
@given(claimed=st.integers(2**20 + 1, 2**64 - 1))
def test_an_oversized_frame_is_refused_from_its_header_alone(claimed: int) -> None:
    # only the header is on the stream and it stays open: reading on would hang (or allocate
    # the claimed size), so the refusal must come from the length field alone
    head = encode_frame(Frame(Kind.ACTIVATION, 0, 0, "x0", b""))[:-8] + struct.pack("<Q", claimed)

    async def main() -> None:
        reader = await _stream(head, eof=False)
        with pytest.raises(FrameError, match=r"^frame over the limit: "):
            await asyncio.wait_for(read_frame(reader, max_payload=2**20), 5.0)

    asyncio.run(main())


@settings(max_examples=300)
@given(st.binary(max_size=64), st.booleans())
def test_garbage_fails_with_a_fixed_kind(garbage: bytes, magic: bool) -> None:
    # with the magic in front, random bytes reach the later checks too
    data = (MAGIC + b"\x01" + garbage) if magic else garbage
    for parse in (decode_frame, payload_to_tensor):
        try:
            parse(data)
        except FrameError as exc:
            assert kind_of(exc) in PARSE_KINDS, str(exc)
            assert not re.search(r"\d", kind_of(exc))


# -- tensor payloads ----------------------------------------------------------------------


@given(tensors(), st.integers(0, 255).filter(lambda c: c not in DTYPE_CODES.values()))
def test_an_unknown_dtype_code_is_refused(t: torch.Tensor, code: int) -> None:
    raw = bytearray(tensor_to_payload(t))
    raw[0] = code
    assert kind_of(refused(payload_to_tensor, bytes(raw))) == "unknown tensor dtype"


@given(tensors(), st.sampled_from(DTYPES))
def test_another_dtype_is_refused_unless_the_bytes_fit_it(t: torch.Tensor, dtype) -> None:
    raw = bytearray(tensor_to_payload(t))
    raw[0] = DTYPE_CODES[dtype]
    need = t.numel() * torch.empty(0, dtype=dtype).element_size()
    if need != t.numel() * t.element_size():
        assert kind_of(refused(payload_to_tensor, bytes(raw))) == "tensor shape mismatch"
    else:  # same element size: the same bits, read as the other dtype
        got = payload_to_tensor(bytes(raw))
        assert got.dtype == dtype and got.shape == t.shape


@given(tensors(), st.lists(u32, max_size=6))
def test_a_shape_that_disagrees_with_the_data_is_refused(t: torch.Tensor, dims: list[int]) -> None:
    count = 1
    for d in dims:
        count *= d
    nbytes = t.numel() * t.element_size()
    if count * t.element_size() == nbytes:  # make it disagree
        dims = [*dims, 2] if nbytes else [1]
    raw = tensor_to_payload(t)
    data = raw[2 + 4 * t.dim() :]
    forged = struct.pack("<BB", raw[0], len(dims)) + b"".join(struct.pack("<I", d) for d in dims)
    # dims of up to 2^32 - 1 each: refused by arithmetic, before anything is allocated
    assert kind_of(refused(payload_to_tensor, forged + data)) == "tensor shape mismatch"


@given(tensors(), st.data())
def test_a_tensor_payload_cut_or_extended_is_refused(t: torch.Tensor, data: st.DataObject) -> None:
    raw = tensor_to_payload(t)
    cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
    assert kind_of(refused(payload_to_tensor, raw[:cut])) in {
        "tensor payload truncated",
        "tensor shape mismatch",
    }
    extra = data.draw(st.binary(min_size=1, max_size=16), label="extra")
    assert kind_of(refused(payload_to_tensor, raw + extra)) == "tensor shape mismatch"


# -- activations that parse but do not fit their route ------------------------------------

SPEC = ModelSpec("t", layers=3, d_model=64, heads=8, kv_heads=2, d_ff=128, vocab=100)
GROUP_WIDTH = SPEC.queries_per_group * SPEC.head_dim  # 32


@pytest.mark.parametrize(
    ("name", "width"),
    [("x0", 64), ("x3", 64), ("a0", 64), ("a2", 64), ("o1:0", 32), ("o1:1", 32), ("o2:0,1", 64)],
)
@given(tokens=st.integers(1, 4096))
def test_activations_of_the_right_shape_pass(name: str, width: int, tokens: int) -> None:
    assert activation_problem(name, (tokens, width), SPEC) is None


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("x4", "layer 4"),  # x{layers} goes into the head; nothing beyond
        ("a3", "layer 3"),
        ("o3:0", "layer 3"),
        ("o0:2", "groups"),  # two KV groups: 0 and 1
        ("o0:1,0", "groups"),
        ("o0:0,0", "groups"),
        ("", "no tensor"),
        ("x", "no tensor"),
        ("y0", "no tensor"),
        ("x-1", "no tensor"),
        ("o0:", "no tensor"),
        ("L0.g0", "no tensor"),
        ("x" + "9" * 50, "no tensor"),
    ],
)
def test_names_no_program_sends_are_refused(name: str, fragment: str) -> None:
    problem = activation_problem(name, (1, 64), SPEC)
    assert problem is not None and fragment in problem and len(problem) < 200


@given(
    name=st.sampled_from(["x0", "a1", "o2:0", "o0:0,1"]),
    shape=st.lists(st.integers(0, 2**32 - 1), max_size=4),
)
def test_any_other_shape_is_refused(name: str, shape: list[int]) -> None:
    width = {"x0": 64, "a1": 64, "o2:0": 32, "o0:0,1": 64}[name]
    fits = len(shape) == 2 and shape[0] >= 1 and shape[1] == width
    problem = activation_problem(name, tuple(shape), SPEC)
    assert (problem is None) == fits
    if problem is not None:
        assert "shape" in problem


@given(st.data())
def test_every_tensor_a_placement_sends_passes(data: st.DataObject) -> None:
    blocks = ["embed", "head"] + [
        f"L{layer}.{b}"
        for layer in range(SPEC.layers)
        for b in [*(f"g{g}" for g in range(SPEC.kv_heads)), "proj", "ffn"]
    ]
    placement = {b: data.draw(st.sampled_from(["d0", "d1", "d2"]), label=b) for b in blocks}
    routes = Routes(placement, SPEC.layers, SPEC.kv_heads)
    tokens = data.draw(st.integers(1, 64), label="tokens")
    for device in routes.devices():
        for step in routes.program(device):
            if not step.send_to:
                continue
            if step.kind == "groups":
                groups = tuple(int(b.rsplit(".g", 1)[1]) for b in step.blocks)
                assert step.output == groups_name(step.layer, groups)
                width = len(groups) * GROUP_WIDTH
            else:
                width = SPEC.d_model
            assert activation_problem(step.output, (tokens, width), SPEC) is None
