"""The migration blob (edgepart.llm.state, version 2) for every movable block kind of the real
SmolLM2-135M: round trips are bit-exact and rebuild working blocks without the checkpoint,
and any damaged or inconsistent blob is refused with a ValueError naming the cause."""

from __future__ import annotations

import json
import struct
import zlib
from functools import cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgepart.llm.loader import OpenModel, open_model
from edgepart.llm.runtime import BlockHost
from edgepart.llm.state import (
    MAGIC,
    VERSION,
    BlockState,
    block_state,
    dump_state,
    load_state,
    save_state,
)
from edgepart.llm.torch_blocks import (
    FFNBlock,
    KVGroupBlock,
    ProjBlock,
    block_from_weights,
    weight_shapes,
)

MODEL = "smollm2-135m"
SLOW = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@cache
def _model() -> OpenModel:
    return open_model(MODEL)


@cache
def _disk_block(name: str):
    """A block loaded from the checkpoint (weights only: never run, so its cache stays empty)."""
    opened = _model()
    return BlockHost("disk", opened.source, opened.arch).load(name)


def _block_names() -> st.SearchStrategy[str]:
    spec = _model().arch.spec
    layers = st.integers(0, spec.layers - 1)
    groups = st.builds(lambda ell, g: f"L{ell}.g{g}", layers, st.integers(0, spec.kv_heads - 1))
    others = st.builds(lambda ell, k: f"L{ell}.{k}", layers, st.sampled_from(["proj", "ffn"]))
    return st.one_of(groups, others)


def _names() -> st.SearchStrategy[str]:
    """Block names of SmolLM2, every kind (the model opens when first drawn from)."""
    return st.deferred(_block_names)


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _hidden(rows: int, seed: int) -> torch.Tensor:
    d = _model().arch.spec.d_model
    return torch.randn(rows, d, generator=torch.Generator().manual_seed(seed))


def _live(name: str, prompt: int, seed: int):
    """A fresh host's block of that name; a group has run a prompt of that many positions."""
    opened = _model()
    block = BlockHost("live", opened.source, opened.arch).load(name)
    if isinstance(block, KVGroupBlock) and prompt:
        block(_hidden(prompt, seed))
    return block


def _run(block, hidden: torch.Tensor) -> torch.Tensor:
    if isinstance(block, ProjBlock):
        spec = _model().arch.spec
        heads = hidden[:, :1].repeat(1, spec.heads * spec.head_dim) * 0.5 + 0.1
        return block(heads, hidden)
    return block(hidden)


# --- round trips of the real model's blocks -----------------------------------------------


@SLOW
@given(
    name=_names(),
    prompt=st.integers(0, 12),
    with_weights=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_every_block_kind_round_trips_bit_exactly(
    name: str, prompt: int, with_weights: bool, seed: int
) -> None:
    opened = _model()
    block = _live(name, prompt, seed)
    data = save_state(block, opened.arch.spec.name, with_weights=with_weights)
    state = load_state(data, expect_model=opened.arch.spec.name)
    assert (state.model, state.block, state.dtype) == (opened.arch.spec.name, name, "float32")
    assert state.kind == {KVGroupBlock: "group", ProjBlock: "proj", FFNBlock: "ffn"}[type(block)]
    if with_weights:
        held = block.weight_tensors()
        assert state.weights.keys() == held.keys()
        for key, t in held.items():
            assert state.weights[key].dtype == t.dtype
            assert state.weights[key].shape == t.shape
            assert _bits(state.weights[key]) == _bits(t), key
    else:
        assert state.weights == {}
    if isinstance(block, KVGroupBlock):
        assert state.keys is not None and state.values is not None
        assert state.length == block.length == prompt
        assert _bits(state.keys) == _bits(block.keys)
        assert _bits(state.values) == _bits(block.values)
    else:
        assert state.keys is None and state.values is None and state.length == 0
    # serialising the parsed state again gives the same bytes
    assert dump_state(state) == data


@SLOW
@given(name=_names(), prompt=st.integers(0, 12), seed=st.integers(0, 2**16))
def test_a_block_rebuilt_from_its_blob_computes_the_same(name: str, prompt: int, seed: int) -> None:
    opened = _model()
    block = _live(name, prompt, seed)
    state = load_state(save_state(block, opened.arch.spec.name, with_weights=True))
    # a host whose source is never read: the blob alone rebuilds the block
    target = BlockHost("target", opened.source, opened.arch)
    restored = target.restore(state)
    assert restored.loaded_elements == 0  # nothing came from the checkpoint
    assert type(restored) is type(block)
    assert restored.weight_bytes() == block.weight_bytes()
    hidden = _hidden(2, seed + 1)
    assert torch.equal(_run(restored, hidden), _run(block, hidden))
    if isinstance(block, KVGroupBlock):
        assert isinstance(restored, KVGroupBlock)
        assert restored.length == block.length == prompt + 2
        assert torch.equal(restored.keys, block.keys)


@SLOW
@given(name=_names())
def test_served_weights_equal_the_checkpoints(name: str) -> None:
    opened = _model()
    server = BlockHost("server", opened.source, opened.arch)
    state = load_state(dump_state(server.weights_of(name)), expect_model=opened.arch.spec.name)
    assert name not in server.blocks  # read for the peer, not held
    assert state.length == 0 and state.has_cache == (state.kind == "group")
    disk = _disk_block(name)
    assert {k: _bits(v) for k, v in state.weights.items()} == {
        k: _bits(v) for k, v in disk.weight_tensors().items()
    }
    shapes = weight_shapes(opened.arch, name)
    assert {k: tuple(v.shape) for k, v in state.weights.items()} == shapes


# --- arbitrary tensors: any bit pattern survives ----------------------------------------

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@st.composite
def _tensor(draw, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    if shape is None:
        shape = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=3)))
    count = 1
    for s in shape:
        count *= s
    size = torch.empty(0, dtype=dtype).element_size()
    raw = draw(st.binary(min_size=count * size, max_size=count * size))
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


@st.composite
def _states(draw) -> BlockState:
    dtype_name = draw(st.sampled_from(sorted(_DTYPES)))
    dtype = _DTYPES[dtype_name]
    name = draw(st.sampled_from(["L0.g0", "L7.g2", "L3.proj", "L29.ffn"]))
    keys = values = None
    if ".g" in name:
        length, head_dim = draw(st.integers(0, 6)), draw(st.integers(1, 4))
        keys = draw(_tensor(dtype, (length, head_dim)))
        values = draw(_tensor(dtype, (length, head_dim)))
    local = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
    names = draw(st.lists(local, unique=True, max_size=4))
    weights = {n: draw(_tensor(dtype)) for n in names}
    model = draw(st.text(max_size=12))
    return BlockState(model, name, dtype_name, weights, keys, values)


@settings(max_examples=200, deadline=None)
@given(_states())
def test_any_state_round_trips_bit_exactly(state: BlockState) -> None:
    back = load_state(dump_state(state), expect_model=state.model)
    assert (back.model, back.block, back.dtype) == (state.model, state.block, state.dtype)
    assert back.weights.keys() == state.weights.keys()
    for key, t in state.weights.items():
        assert back.weights[key].shape == t.shape and _bits(back.weights[key]) == _bits(t)
    if state.keys is None:
        assert back.keys is None and back.values is None
    else:
        assert back.keys is not None and back.values is not None
        assert state.values is not None
        assert back.keys.shape == state.keys.shape
        assert _bits(back.keys) == _bits(state.keys)
        assert _bits(back.values) == _bits(state.values)


# --- damaged blobs ------------------------------------------------------------------------


@cache
def _blobs() -> dict[str, bytes]:
    """A group with its cache and weights, a projection with weights, an FFN without."""
    opened = _model()
    model = opened.arch.spec.name
    return {
        "group": save_state(_live("L2.g1", 5, 0), model, with_weights=True),
        "proj": save_state(_live("L4.proj", 0, 0), model, with_weights=True),
        "ffn": save_state(_live("L6.ffn", 0, 0), model),
    }


@SLOW
@given(kind=st.sampled_from(["group", "proj", "ffn"]), data=st.data())
def test_any_flipped_bit_is_refused(kind: str, data: st.DataObject) -> None:
    blob = _blobs()[kind]
    bit = data.draw(st.integers(0, 8 * len(blob) - 1), label="bit")
    damaged = bytearray(blob)
    damaged[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(ValueError):
        load_state(bytes(damaged))


@SLOW
@given(kind=st.sampled_from(["group", "proj", "ffn"]), data=st.data())
def test_any_truncation_or_extension_is_refused(kind: str, data: st.DataObject) -> None:
    blob = _blobs()[kind]
    cut = data.draw(st.integers(0, len(blob) - 1), label="cut")
    with pytest.raises(ValueError, match=r"truncated|checksum|magic|header"):
        load_state(blob[:cut])
    extra = data.draw(st.binary(min_size=1, max_size=16), label="extra")
    with pytest.raises(ValueError):
        load_state(blob + extra)


def test_damaged_prefix_fields_are_named() -> None:
    blob = _blobs()["group"]
    assert blob[:4] == MAGIC and struct.unpack_from("<H", blob, 4)[0] == VERSION == 2
    with pytest.raises(ValueError, match="magic"):
        load_state(b"EPKW" + blob[4:])
    with pytest.raises(ValueError, match="version 1"):
        load_state(blob[:4] + struct.pack("<H", 1) + blob[6:])
    with pytest.raises(ValueError, match="truncated"):
        load_state(blob[:9])
    with pytest.raises(ValueError, match="header of"):
        load_state(blob[:6] + struct.pack("<I", len(blob)) + blob[10:])
    with pytest.raises(ValueError, match="model"):
        load_state(blob, expect_model="another-model")


def _forge(header: object, payload: bytes = b"") -> bytes:
    """A blob with a valid checksum around any header: only the content checks can object."""
    raw = json.dumps(header).encode()
    crc = zlib.crc32(payload, zlib.crc32(raw))
    return struct.pack("<4sHI", MAGIC, VERSION, len(raw)) + raw + payload + struct.pack("<I", crc)


def _entry(name: str, shape: list[int], offset: int, nbytes: int | None = None) -> dict:
    count = 1
    for s in shape:
        count *= s
    return {
        "name": name,
        "shape": shape,
        "offset": offset,
        "nbytes": 4 * count if nbytes is None else nbytes,
    }


_CACHE_2x2 = [_entry("keys", [2, 2], 0), _entry("values", [2, 2], 16)]


def _header(**changes) -> dict:
    base = {
        "model": "m",
        "block": "L0.g0",
        "dtype": "float32",
        "cache": {"length": 2, "head_dim": 2},
        "tensors": _CACHE_2x2,
    }
    return {**base, **changes}


FORGED: dict[str, tuple[bytes, str]] = {
    "header not an object": (_forge([1, 2]), "header is malformed"),
    "no block": (_forge({k: v for k, v in _header().items() if k != "block"}), "'block'"),
    "bad block name": (_forge(_header(block="L0.x")), "names no block"),
    "pinned block": (_forge(_header(block="embed", cache=None, tensors=[])), "does not move"),
    "unknown dtype": (_forge(_header(dtype="int8")), "dtype"),
    "group without cache": (_forge(_header(cache=None), bytes(32)), "no cache"),
    "group without values": (
        _forge(_header(tensors=_CACHE_2x2[:1]), bytes(16)),
        "no values",
    ),
    "proj with a cache": (_forge(_header(block="L0.proj"), bytes(32)), "only KV groups"),
    "ffn with keys": (
        _forge(_header(block="L0.ffn", cache=None), bytes(32)),
        "only KV groups",
    ),
    "cache length disagrees": (
        _forge(_header(cache={"length": 3, "head_dim": 2}), bytes(32)),
        "keys shape",
    ),
    "unknown tensor": (
        _forge(_header(tensors=[*_CACHE_2x2, _entry("bias", [1], 32)]), bytes(36)),
        "neither cache nor weight",
    ),
    "duplicate tensor": (
        _forge(_header(tensors=[*_CACHE_2x2, _entry("keys", [1], 32)]), bytes(36)),
        "twice",
    ),
    "gap between tensors": (
        _forge(
            _header(tensors=[_entry("keys", [2, 2], 0), _entry("values", [2, 2], 20)]), bytes(36)
        ),
        "do not follow",
    ),
    "tensor past the payload": (_forge(_header(), bytes(24)), "do not follow"),
    "bytes no tensor accounts for": (_forge(_header(), bytes(40)), "no tensor accounts"),
    "nbytes disagrees with shape": (
        _forge(
            _header(tensors=[_entry("keys", [2, 2], 0, 12), _entry("values", [2, 2], 12)]),
            bytes(28),
        ),
        "needs 16 bytes",
    ),
    "negative dim": (
        _forge(_header(tensors=[_entry("keys", [-2, -2], 0, 16), _CACHE_2x2[1]]), bytes(32)),
        "negative",
    ),
    "float offset": (
        _forge(_header(tensors=[{**_CACHE_2x2[0], "offset": 0.5}, _CACHE_2x2[1]]), bytes(32)),
        "not an integer",
    ),
    "entry not an object": (_forge(_header(tensors=[3])), "entry is malformed"),
    "header not utf-8": (
        struct.pack("<4sHI", MAGIC, VERSION, 2)
        + b"\xff\xfe"
        + struct.pack("<I", zlib.crc32(b"\xff\xfe")),
        "header is malformed",
    ),
}


@pytest.mark.parametrize("case", list(FORGED))
def test_inconsistent_contents_are_named(case: str) -> None:
    blob, reason = FORGED[case]
    with pytest.raises(ValueError, match=reason):
        load_state(blob)


def test_a_consistent_forged_blob_loads() -> None:
    # the forging helper itself is sound: the same header with the right payload is accepted
    state = load_state(_forge(_header(), bytes(32)))
    assert state.block == "L0.g0" and state.length == 2 and state.weights == {}


# --- rebuilding from weights checks them ----------------------------------------------------


@pytest.mark.parametrize("name", ["L1.g0", "L1.proj", "L1.ffn"])
def test_wrong_weights_do_not_build_a_block(name: str) -> None:
    arch = _model().arch
    good = {k: v.clone() for k, v in _disk_block(name).weight_tensors().items()}
    assert block_from_weights(arch, name, good).weight_bytes() == _disk_block(name).weight_bytes()
    first = sorted(good)[0]
    with pytest.raises(ValueError, match="missing"):
        block_from_weights(arch, name, {k: v for k, v in good.items() if k != first})
    with pytest.raises(ValueError, match="unexpected"):
        block_from_weights(arch, name, {**good, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        block_from_weights(arch, name, {**good, first: good[first][..., :-1]})
    with pytest.raises(ValueError, match="does not exist"):
        block_from_weights(arch, name.replace("L1.", "L99."), good)
    with pytest.raises(ValueError, match="pinned"):
        block_from_weights(arch, "embed", good)


def test_only_movable_blocks_have_a_state() -> None:
    opened = _model()
    host = BlockHost("h", opened.source, opened.arch)
    with pytest.raises(ValueError, match="pinned"):
        host.weights_of("head")
    embed = host.load("embed")
    with pytest.raises(ValueError, match="does not move"):
        block_state(embed, "m")  # type: ignore[arg-type]
