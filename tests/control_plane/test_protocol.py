"""The MQTT contract: topics, round trips, and malformed payloads turned into values."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgepart.control_plane.protocol import (
    MAX_PAYLOAD_BYTES,
    Commit,
    Discard,
    Drop,
    InjectLoad,
    Load,
    Malformed,
    PlacementEpoch,
    Prepare,
    Reply,
    SetBudget,
    Shape,
    Status,
    Telemetry,
    Topic,
    decode,
    device_topic,
    encode,
    parse_topic,
    placement_topic,
    subscription,
)

names = st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)
blocks = st.one_of(
    st.sampled_from(["embed", "head"]),
    st.builds(lambda layer, g: f"L{layer}.g{g}", st.integers(0, 99), st.integers(0, 31)),
    st.builds(
        lambda layer, k: f"L{layer}.{k}", st.integers(0, 99), st.sampled_from(["proj", "ffn"])
    ),
)
amounts = st.floats(0, 1e12, allow_nan=False)


@given(
    name=names,
    cpu=st.floats(0, 1),
    numbers=st.tuples(amounts, amounts, amounts, amounts, amounts),
    held=st.lists(blocks, max_size=8),
    peers=st.dictionaries(names, amounts, max_size=4),
)
def test_telemetry_round_trips(name, cpu, numbers, held, peers):
    ts, gflops, used, budget, kv = numbers
    msg = Telemetry(
        name=name,
        ts=ts,
        cpu_used=cpu,
        available_gflops=gflops,
        memory_used_bytes=used,
        memory_budget_bytes=budget,
        kv_bytes=kv,
        blocks=tuple(held),
        peer_throughput_mbit=peers,
    )
    assert decode("telemetry", encode(msg)) == msg


@pytest.mark.parametrize(
    "command",
    [
        Load(id="1", op="load", blocks=("L0.g0", "L0.proj"), weights_from="peer", peer="d1"),
        Drop(id="2", op="drop", blocks=("L3.ffn",)),
        Prepare(id="7", op="prepare", blocks=("L2.g1", "L2.ffn"), context=40, peers={}),
        Commit(id="8", op="commit", epoch=3, moves={"L2.g1": "d4", "L2.ffn": "d4"}),
        Discard(id="9", op="discard", blocks=("L2.g1",)),
        Shape(id="4", op="shape", peer="d2", bandwidth_mbit=20.0, latency_ms=5.0),
        InjectLoad(id="5", op="inject_load", fraction=0.6),
        SetBudget(id="6", op="set_budget", memory_bytes=256 * 2**20),
    ],
)
def test_every_command_round_trips_by_its_op(command):
    got = decode("cmd", encode(command))
    assert got == command and type(got) is type(command)


def test_status_reply_and_placement_round_trip():
    status = Status(name="d0", state="online", listen="127.0.0.1:7001", ts=1.5)
    reply = Reply(id="3", name="d4", ok=False, error="over budget: needs 300 MiB, has 256")
    epoch = PlacementEpoch(
        epoch=2, placement={"L0.g0": "d1", "embed": "d0"}, endpoints={"d1": "127.0.0.1:7002"}
    )
    assert decode("status", encode(status)) == status
    assert decode("reply", encode(reply)) == reply
    assert decode("placement", encode(epoch)) == epoch


@pytest.mark.parametrize(
    ("kind", "payload", "reason"),
    [
        ("telemetry", b"\xff\xfe", "not JSON"),
        ("telemetry", b"{", "not JSON"),
        ("telemetry", b"[1, 2]", "not a JSON object"),
        ("status", json.dumps({"v": 2, "name": "d0", "state": "online"}).encode(), "version 2"),
        ("status", json.dumps({"name": "d0", "state": "online"}).encode(), "version None"),
        ("status", json.dumps({"v": 1, "name": "d0", "state": "asleep"}).encode(), "state"),
        ("status", json.dumps({"v": 1, "name": "d 0", "state": "online"}).encode(), "name"),
        ("cmd", json.dumps({"v": 1, "id": "1", "op": "reboot"}).encode(), "op"),
        (
            "cmd",
            json.dumps({"v": 1, "id": "1", "op": "drop", "blocks": ["L0.x"]}).encode(),
            "blocks",
        ),
        (
            "cmd",
            json.dumps({"v": 1, "id": "1", "op": "inject_load", "fraction": 1.5}).encode(),
            "fraction",
        ),
        ("cmd", json.dumps({"v": 1, "id": "1", "op": "drop", "blocks": [], "x": 1}).encode(), "x"),
        ("placement", json.dumps({"v": 1, "epoch": -1, "placement": {}}).encode(), "epoch"),
        ("reply", b"x" * (MAX_PAYLOAD_BYTES + 1), "over"),
    ],
)
def test_malformed_payloads_become_values_with_a_reason(kind, payload, reason):
    got = decode(kind, payload)
    assert isinstance(got, Malformed)
    assert got.kind == kind and reason in got.reason


@given(st.binary(max_size=256))
def test_garbage_never_raises(payload):
    for kind in ("telemetry", "status", "cmd", "reply", "placement"):
        assert isinstance(decode(kind, payload), Malformed | Telemetry | Status | Reply)


def test_topics_build_and_parse():
    assert device_topic("tb", "d1", "telemetry") == "edgepart/tb/devices/d1/telemetry"
    assert placement_topic("tb") == "edgepart/tb/placement"
    assert subscription("tb", "status") == "edgepart/tb/devices/+/status"
    assert subscription("tb", "placement") == "edgepart/tb/placement"
    assert parse_topic("edgepart/tb/devices/d1/cmd") == Topic("tb", "cmd", "d1")
    assert parse_topic("edgepart/tb/placement") == Topic("tb", "placement", None)
    for bad in ("edgepart/tb/devices/d1", "other/tb/placement", "edgepart/tb/devices/d1/x"):
        assert parse_topic(bad) is None
