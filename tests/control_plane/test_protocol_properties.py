"""Every MQTT message schema against bad input: round trips, then every way to spoil one.

For each schema a valid message is drawn and round-tripped; then it is spoilt (wrong or
missing version, cut at every byte, padded over the size limit, each field given a value of
the wrong type or left out, an unknown field added, bytes flipped) and ``decode`` must give
``Malformed`` with a reason, never raise: a receiving loop that raised would take its
agent, controller or driver down.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from edgepart.control_plane import protocol as proto
from edgepart.control_plane.protocol import (
    MAX_JSON_DEPTH,
    MAX_PAYLOAD_BYTES,
    Malformed,
    decode,
    encode,
)

# -- valid messages, one strategy per schema ----------------------------------------------

names = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
blocks = st.one_of(
    st.sampled_from(["embed", "head"]),
    st.builds(lambda layer, g: f"L{layer}.g{g}", st.integers(0, 99), st.integers(0, 31)),
    st.builds(
        lambda layer, k: f"L{layer}.{k}", st.integers(0, 99), st.sampled_from(["proj", "ffn"])
    ),
)
block_tuples = st.lists(blocks, max_size=6).map(tuple)
ids = st.text(min_size=1, max_size=64)
texts = st.text(max_size=80)
amounts = st.floats(0, 1e15, allow_nan=False, allow_infinity=False)
positive = st.floats(1e-6, 1e6, allow_nan=False)
counts = st.integers(0, 2**62)
token_ids = st.integers(0, 2**31)
endpoints = st.from_regex(r"[a-z0-9.]{1,20}:[0-9]{1,5}", fullmatch=True)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

SCHEMAS: dict[str, tuple[proto.TopicKind, st.SearchStrategy[BaseModel]]] = {
    "telemetry": (
        "telemetry",
        st.builds(
            proto.Telemetry,
            name=names,
            ts=amounts,
            cpu_used=st.floats(0, 1),
            available_gflops=amounts,
            memory_used_bytes=amounts,
            memory_budget_bytes=amounts,
            kv_bytes=amounts,
            blocks=block_tuples,
            peer_throughput_mbit=st.dictionaries(names, amounts, max_size=3),
            compute_measured=st.booleans(),
            dropped_messages=counts,
            dropped_frames=counts,
            peer_latency_s=st.dictionaries(names, amounts, max_size=3),
            send_overhead_s=amounts,
            receive_overhead_s=amounts,
            occupied_bytes=amounts,
        ),
    ),
    "status": (
        "status",
        st.builds(
            proto.Status,
            name=names,
            state=st.sampled_from(["online", "offline", "failed"]),
            listen=st.none() | endpoints,
            ts=amounts,
        ),
    ),
    "load": (
        "cmd",
        st.builds(
            proto.Load,
            id=ids,
            op=st.just("load"),
            blocks=block_tuples,
            weights_from=st.sampled_from(["disk", "peer"]),
            peer=st.none() | names,
        ),
    ),
    "drop": ("cmd", st.builds(proto.Drop, id=ids, op=st.just("drop"), blocks=block_tuples)),
    "prepare": (
        "cmd",
        st.builds(
            proto.Prepare,
            id=ids,
            op=st.just("prepare"),
            blocks=block_tuples.filter(len),
            context=counts,
            peers=st.dictionaries(blocks, names, max_size=4),
        ),
    ),
    "commit": (
        "cmd",
        st.builds(
            proto.Commit,
            id=ids,
            op=st.just("commit"),
            epoch=counts,
            moves=st.dictionaries(blocks, names, min_size=1, max_size=4),
        ),
    ),
    "discard": (
        "cmd",
        st.builds(proto.Discard, id=ids, op=st.just("discard"), blocks=block_tuples),
    ),
    "shape": (
        "cmd",
        st.builds(
            proto.Shape,
            id=ids,
            op=st.just("shape"),
            peer=names,
            bandwidth_mbit=positive,
            latency_ms=amounts,
        ),
    ),
    "inject_load": (
        "cmd",
        st.builds(
            proto.InjectLoad,
            id=ids,
            op=st.just("inject_load"),
            fraction=st.floats(0, 1, exclude_max=True),
        ),
    ),
    "set_budget": (
        "cmd",
        st.builds(
            proto.SetBudget,
            id=ids,
            op=st.just("set_budget"),
            memory_bytes=st.integers(1, 2**50),
            occupied_bytes=st.integers(0, 2**50),
        ),
    ),
    "reset": ("cmd", st.builds(proto.Reset, id=ids, op=st.just("reset"))),
    "decode": (
        "cmd",
        st.builds(
            proto.Decode,
            id=ids,
            op=st.just("decode"),
            epoch=counts,
            position=counts,
            tokens=st.lists(token_ids, min_size=1, max_size=32).map(tuple),
        ),
    ),
    "reply": (
        "reply",
        st.builds(
            proto.Reply,
            id=ids,
            name=names,
            ok=st.booleans(),
            error=st.none() | texts,
            bytes_moved=amounts,
            seconds=amounts,
            token_id=st.none() | token_ids,
        ),
    ),
    "placement": (
        "placement",
        st.builds(
            proto.PlacementEpoch,
            epoch=counts,
            placement=st.dictionaries(blocks, names, max_size=8),
            endpoints=st.dictionaries(names, endpoints, max_size=4),
        ),
    ),
    "world": ("world", st.builds(proto.WorldTurn, token=counts)),
    "world_ready": (
        "world_ready",
        st.builds(
            proto.WorldReady,
            token=counts,
            ok=st.booleans(),
            error=texts,
            failed=st.lists(names, max_size=4).map(tuple),
        ),
    ),
    "progress": (
        "progress",
        st.builds(
            proto.Progress,
            token=counts,
            token_id=token_ids,
            measured_s=amounts,
            predicted_s=amounts,
            migrations=counts,
        ),
    ),
    "result": (
        "result",
        st.builds(
            proto.RunOutcome,
            ok=st.booleans(),
            error=texts,
            result=st.dictionaries(st.text(max_size=12), json_values, max_size=6),
        ),
    ),
}

#: values no field of any schema takes: a list of objects, an object of lists (which only
#: RunOutcome.result, a free-form object, takes)
WRONG_VALUES: list[Any] = [[{"x": 1}], {"x": [1]}]


CLASSES: dict[str, type[BaseModel]] = {
    "telemetry": proto.Telemetry, "status": proto.Status, "load": proto.Load,
    "drop": proto.Drop, "prepare": proto.Prepare, "commit": proto.Commit,
    "discard": proto.Discard, "shape": proto.Shape, "inject_load": proto.InjectLoad,
    "set_budget": proto.SetBudget, "reset": proto.Reset,
    "decode": proto.Decode, "reply": proto.Reply, "placement": proto.PlacementEpoch,
    "world": proto.WorldTurn, "world_ready": proto.WorldReady, "progress": proto.Progress,
    "result": proto.RunOutcome,
}  # fmt: skip
#: what a payload on a topic of each kind may decode to
KIND_CLASSES: dict[str, tuple[type[BaseModel], ...]] = {
    kind: tuple(CLASSES[s] for s, (k, _) in SCHEMAS.items() if k == kind)
    for kind in {k for k, _ in SCHEMAS.values()}
}


def _draw(schema: str, data: st.DataObject) -> tuple[proto.TopicKind, BaseModel]:
    """The schema's topic kind and a valid message of it."""
    kind, strategy = SCHEMAS[schema]
    return kind, data.draw(strategy, label=schema)


def _fields(message: BaseModel) -> list[str]:
    """The fields a test may spoil: all but the version (tested on its own)."""
    return [f for f in type(message).model_fields if f != "v"]


def _malformed(kind: proto.TopicKind, payload: bytes) -> Malformed:
    got = decode(kind, payload)
    assert isinstance(got, Malformed), f"accepted {payload[:200]!r} as {got!r}"
    assert got.kind == kind and got.reason
    assert len(got.reason) <= proto.MAX_REASON_CHARS
    return got


def _as_json(message: BaseModel) -> dict[str, Any]:
    return json.loads(encode(message))


def _dump(data: Any) -> bytes:
    return json.dumps(data).encode("utf-8")


ALL = pytest.mark.parametrize("schema", list(SCHEMAS))
#: each example of these decodes the message hundreds to a thousand times
FEW = settings(max_examples=25, suppress_health_check=[HealthCheck.too_slow], deadline=None)


# -- properties ---------------------------------------------------------------------------


@ALL
@settings(deadline=None)
@given(data=st.data())
def test_every_schema_round_trips(schema: str, data: st.DataObject) -> None:
    kind, message = _draw(schema, data)
    got = decode(kind, encode(message))
    assert type(got) is CLASSES[schema] and got == message


@ALL
@settings(deadline=None)
@given(data=st.data())
def test_a_wrong_or_missing_version_is_refused(schema: str, data: st.DataObject) -> None:
    kind, message = _draw(schema, data)
    fields = _as_json(message)
    # true and 1.0 equal 1 in Python, and "1" is what a sloppy encoder writes: all refused
    wrong = data.draw(
        st.sampled_from([0, 2, -1, 99, True, 1.0, "1", None, [1], {"v": 1}])
        | json_values.filter(lambda v: not (type(v) is int and v == 1)),
        label="v",
    )
    assert "version" in _malformed(kind, _dump({**fields, "v": wrong})).reason
    del fields["v"]
    assert "version None" in _malformed(kind, _dump(fields)).reason


@ALL
@FEW
@given(data=st.data())
def test_a_message_cut_at_any_byte_is_refused(schema: str, data: st.DataObject) -> None:
    kind, message = _draw(schema, data)
    payload = encode(message)
    for cut in range(len(payload)):
        assert "not JSON" in _malformed(kind, payload[:cut]).reason


@ALL
@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_the_size_limit_holds_to_the_byte(schema: str, data: st.DataObject) -> None:
    kind, message = _draw(schema, data)
    payload = encode(message)
    # JSON allows trailing whitespace: the same message, padded to the limit, still decodes
    at_limit = payload + b" " * (MAX_PAYLOAD_BYTES - len(payload))
    assert decode(kind, at_limit) == message
    assert "over" in _malformed(kind, at_limit + b" ").reason


@ALL
@settings(deadline=None)
@given(data=st.data())
def test_each_field_of_the_wrong_type_is_named(schema: str, data: st.DataObject) -> None:
    kind, message = _draw(schema, data)
    fields = _as_json(message)
    for field in _fields(message):
        for wrong in WRONG_VALUES:
            if field == "result" and isinstance(wrong, dict):
                continue  # a free-form object takes any object
            reason = _malformed(kind, _dump({**fields, field: wrong})).reason
            assert field in reason, (field, reason)


@ALL
@settings(deadline=None)
@given(data=st.data())
def test_any_value_in_any_field_decodes_or_is_refused(schema: str, data: st.DataObject) -> None:
    kind, message = _draw(schema, data)
    fields = _as_json(message)
    field = data.draw(st.sampled_from(_fields(message)), label="field")
    value = data.draw(json_values, label="value")
    got = decode(kind, _dump({**fields, field: value}))
    assert isinstance(got, (Malformed, *KIND_CLASSES[kind]))
    if isinstance(got, Malformed):
        assert got.reason and len(got.reason) <= proto.MAX_REASON_CHARS


@ALL
@settings(deadline=None)
@given(data=st.data())
def test_a_missing_required_field_or_an_unknown_one_is_named(
    schema: str, data: st.DataObject
) -> None:
    kind, message = _draw(schema, data)
    fields = _as_json(message)
    for field in _fields(message):
        if not type(message).model_fields[field].is_required():
            continue
        reason = _malformed(kind, _dump({k: v for k, v in fields.items() if k != field})).reason
        assert field in reason, (field, reason)
    extra = data.draw(st.from_regex(r"[a-z_]{1,12}", fullmatch=True), label="extra")
    if extra not in fields:
        assert extra in _malformed(kind, _dump({**fields, extra: 1})).reason


@ALL
@FEW
@given(data=st.data())
def test_flipped_inserted_or_deleted_bytes_never_raise(schema: str, data: st.DataObject) -> None:
    kind, message = _draw(schema, data)
    payload = bytearray(encode(message))
    for _ in range(data.draw(st.integers(1, 8), label="edits")):
        at = data.draw(st.integers(0, len(payload)), label="at")
        edit = data.draw(st.sampled_from(["flip", "insert", "delete"]), label="edit")
        if edit == "insert":
            payload[at:at] = data.draw(st.binary(min_size=1, max_size=4), label="bytes")
        elif at < len(payload):
            if edit == "flip":
                payload[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
            else:
                del payload[at]
    assert isinstance(decode(kind, bytes(payload)), (Malformed, *KIND_CLASSES[kind]))


@given(kind=st.sampled_from(sorted(KIND_CLASSES)), value=json_values)
def test_any_json_document_decodes_or_is_refused(kind: proto.TopicKind, value: Any) -> None:
    got = decode(kind, _dump(value))
    if not isinstance(value, dict):
        assert isinstance(got, Malformed) and got.reason == "not a JSON object"
    else:
        assert isinstance(got, (Malformed, *KIND_CLASSES[kind]))


# -- inputs a random search does not reach, which once escaped decode --------------------


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        # Python refuses to parse integers of over 4300 digits: a ValueError, not JSON's own
        (b'{"v": 1, "token": ' + b"9" * 5000 + b"}", "not JSON"),
        (b'{"v": ' + b"1" * 5000 + b"}", "not JSON"),
        # nesting past the interpreter's stack: a RecursionError inside json.loads
        (b"[" * 100_000, "not JSON"),
        (b'{"v": 1, "token": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"}", "not JSON"),
        # nesting the parser takes, refused before anyone walks it recursively
        (
            b'{"v": 1, "ok": true, "result": '
            + b'{"a": ' * MAX_JSON_DEPTH
            + b"1"
            + b"}" * MAX_JSON_DEPTH
            + b"}",
            "nested deeper",
        ),
        (b'{"v": 1, "token": 1e400}', "finite"),
        (b'{"v": 1, "token": NaN}', "finite"),
        (b'{"v": 1, "token": -1}', "token"),
        (b'{"v": 1, "token": 1.5}', "token"),
        (b'{"v": "' + b"x" * 100_000 + b'", "token": 1}', "version"),
        (b'{"v": 1, "token": 1}\x00', "not JSON"),
        (b"", "not JSON"),
        (b"null", "not a JSON object"),
        (b'"{\\"v\\": 1}"', "not a JSON object"),
    ],
)
def test_pathological_payloads_are_refused(payload: bytes, reason: str) -> None:
    assert reason in _malformed("world", payload).reason


def test_nesting_up_to_the_limit_is_taken() -> None:
    inner = MAX_JSON_DEPTH - 1  # the message object itself is the first level
    nested = b'{"a": ' * inner + b"1" + b"}" * inner
    got = decode("result", b'{"v": 1, "ok": true, "result": ' + nested + b"}")
    assert isinstance(got, proto.RunOutcome)


def test_a_huge_bad_value_gives_a_short_reason() -> None:
    huge = "x" * 500_000
    got = _malformed("cmd", _dump({"v": 1, "id": "1", "op": huge}))
    assert got.reason.startswith("op: ")


def test_a_message_whose_fields_push_it_over_the_limit_is_refused() -> None:
    big = proto.RunOutcome(ok=True, result={"per_token_s": [0.125] * (MAX_PAYLOAD_BYTES // 6)})
    payload = encode(big)
    assert len(payload) > MAX_PAYLOAD_BYTES
    assert "over" in _malformed("result", payload).reason
