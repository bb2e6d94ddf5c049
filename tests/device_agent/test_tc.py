"""Kernel link shaping (edgepart.device_agent.tc): the htb burst/quantum formula, and real htb
classes on a veth pair between two network namespaces the tests create (root only).

Traffic only ever flows between those two namespaces (10.250.0.0/24): a Python TCP sender in
one, a receiver in the other, each started with ``ip netns exec``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgepart.device_agent.tc import (
    BURST_S,
    MAX_QUANTUM,
    TcShaper,
    TcUnavailable,
    frame_bytes,
    htb_burst_bytes,
    htb_class_params,
    htb_quantum_bytes,
    interface_for,
    mbit_to_bytes_per_s,
    tbf_leaf_params,
)

REPO = Path(__file__).resolve().parents[2]
A_IF, B_IF = "va", "vb"  # the veth ends, each inside its own test namespace
A_IP, B_IP, B_IP2 = "10.250.0.1", "10.250.0.2", "10.250.0.3"  # B_IP2: a second, unshaped host
#: TCP payload per Ethernet frame the shaper counts: MSS 1448 (timestamps on) of 1514 bytes
PAYLOAD_SHARE = 1448 / 1514
FLOW_TIMEOUT_S = 60.0  # bound on any one measured transfer

# -- the formula ----------------------------------------------------------------------------

rates = st.floats(min_value=0.1, max_value=10_000.0, allow_nan=False, allow_infinity=False)
mtus = st.sampled_from([576, 1280, 1500, 9000])


@given(rates, mtus)
def test_burst_holds_a_frame_and_the_burst_time_of_traffic(rate_mbit: float, mtu: int) -> None:
    burst = htb_burst_bytes(rate_mbit, mtu)
    assert burst >= frame_bytes(mtu) >= mtu
    assert burst >= rate_mbit * 1e6 / 8 * BURST_S
    assert isinstance(burst, int)


@given(rates, mtus)
def test_quantum_stays_within_htb_bounds(rate_mbit: float, mtu: int) -> None:
    quantum = htb_quantum_bytes(rate_mbit, mtu)
    assert frame_bytes(mtu) <= quantum <= MAX_QUANTUM


@given(rates)
def test_class_params_are_bytes_per_second_with_ceil_equal_to_rate(rate_mbit: float) -> None:
    params = htb_class_params(rate_mbit)
    assert params["rate"] == params["ceil"] == mbit_to_bytes_per_s(rate_mbit)
    assert params["burst"] == params["cburst"]
    assert all(isinstance(v, int) for v in params.values())


@given(rates, mtus)
def test_tbf_leaf_splits_what_exceeds_the_burst_and_never_paces(rate_mbit: float, mtu: int) -> None:
    leaf = tbf_leaf_params(rate_mbit, mtu)
    # a lone frame always fits the bucket, a GSO packet over the class's burst does not
    assert leaf["burst"] >= htb_burst_bytes(rate_mbit, mtu) + frame_bytes(mtu)
    assert leaf["burst"] <= htb_burst_bytes(rate_mbit, mtu) + 2 * frame_bytes(mtu)
    assert leaf["rate"] >= 2 * mbit_to_bytes_per_s(rate_mbit)  # far faster than its class
    assert leaf["rate"] < 2**32 and leaf["limit"] >= 100 * frame_bytes(mtu)
    # pyroute2 sends the bucket as whole microseconds at the tbf's rate: a frame still fits
    bucket_us = int(1e6 * leaf["burst"] / leaf["rate"])
    assert bucket_us * leaf["rate"] / 1e6 >= frame_bytes(mtu)


def test_units_are_megabits_not_megabytes() -> None:
    assert mbit_to_bytes_per_s(8.0) == 1_000_000  # 8 Mbit/s is 1 MB/s
    assert htb_class_params(100.0)["rate"] == 12_500_000
    assert htb_burst_bytes(100.0) == 62_500  # 5 ms at 12.5 MB/s
    assert htb_burst_bytes(1.0) == 1514  # 5 ms is 625 bytes: one frame instead
    assert htb_quantum_bytes(0.1) == 1514 and htb_quantum_bytes(10_000.0) == MAX_QUANTUM


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_rates_must_be_finite_and_positive(bad: float) -> None:
    with pytest.raises(ValueError):
        htb_burst_bytes(bad)
    with pytest.raises(ValueError):
        TcShaper("nothing").shape(B_IP, bad)


def test_peers_are_ipv4() -> None:
    with pytest.raises(ValueError, match="IPv4"):
        TcShaper("nothing").shape("fd00::2", 1.0)


# -- real namespaces ------------------------------------------------------------------------

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None,
    reason="kernel shaping tests create network namespaces: need root, `ip` and `tc`",
)


@dataclass(frozen=True)
class Pair:
    """Two fresh namespaces joined by a veth: A_IP on ``a``'s va, B_IP and B_IP2 on ``b``'s vb."""

    a: str
    b: str


def _ip(*args: str) -> subprocess.CompletedProcess:
    """Run `ip` with these arguments (bounded at 10 s), output captured."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


@pytest.fixture
def pair() -> Iterator[Pair]:
    """A fresh namespace pair for one test, deleted afterwards even when the test fails."""
    tag = uuid.uuid4().hex[:10]
    p = Pair(f"edgepart-tc-{tag}-a", f"edgepart-tc-{tag}-b")
    made: list[str] = []
    try:
        for ns in (p.a, p.b):
            done = _ip("netns", "add", ns)
            if done.returncode != 0:
                pytest.skip(f"`ip netns add` is not available here: {done.stderr.strip()}")
            made.append(ns)
        steps = [
            ("-n", p.a, "link", "add", A_IF, "type", "veth", "peer", "name", B_IF, "netns", p.b),
            ("-n", p.a, "addr", "add", f"{A_IP}/24", "dev", A_IF),
            ("-n", p.b, "addr", "add", f"{B_IP}/24", "dev", B_IF),
            ("-n", p.b, "addr", "add", f"{B_IP2}/24", "dev", B_IF),
            ("-n", p.a, "link", "set", A_IF, "up"),
            ("-n", p.b, "link", "set", B_IF, "up"),
            ("-n", p.a, "link", "set", "lo", "up"),
            ("-n", p.b, "link", "set", "lo", "up"),
        ]
        for step in steps:
            done = _ip(*step)
            assert done.returncode == 0, f"ip {' '.join(step)}: {done.stderr}"
        yield p
    finally:
        for ns in made:  # deleting a namespace deletes its veth end (and so the pair)
            _ip("netns", "del", ns)


RECEIVER = textwrap.dedent(
    """
    import json, socket, sys, time
    port, seconds, warmup = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1)
    srv.settimeout(30)
    print("ready", flush=True)
    conn, _ = srv.accept()
    conn.settimeout(30)
    buf = bytearray(1 << 16)
    first = mark = None
    total = 0
    while True:
        n = conn.recv_into(buf)
        now = time.monotonic()
        if n == 0:
            break
        first = now if first is None else first
        total += n
        if mark is None and now - first >= warmup:
            mark = (now, total)  # the measured window starts after this read
        if now - first >= seconds:
            break
    conn.close()
    print(json.dumps({"bytes": total - mark[1], "seconds": now - mark[0]}), flush=True)
    """
)

SENDER = textwrap.dedent(
    """
    import socket, sys, time
    host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    s = socket.create_connection((host, port), timeout=10)
    data = b"x" * (1 << 16)
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            s.sendall(data)
    except OSError:
        pass  # the receiver closed at the end of its window
    s.close()
    """
)


def goodput_mbit(p: Pair, dst: str, seconds: float, warmup: float, port: int = 5201) -> float:
    """TCP goodput (Mbit/s) from namespace a to dst in b, over (warmup, seconds] of the flow."""
    exec_in = ["ip", "netns", "exec"]
    receiver = subprocess.Popen(
        [*exec_in, p.b, sys.executable, "-c", RECEIVER, str(port), str(seconds), str(warmup)],
        stdout=subprocess.PIPE,
        text=True,
    )
    sender = None
    try:
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == "ready"
        sender = subprocess.Popen(
            [*exec_in, p.a, sys.executable, "-c", SENDER, dst, str(port), str(seconds + 5)]
        )
        out, _ = receiver.communicate(timeout=FLOW_TIMEOUT_S)
        sender.wait(timeout=FLOW_TIMEOUT_S)
    finally:
        for proc in (receiver, sender):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    result = json.loads(out)
    return result["bytes"] * 8 / result["seconds"] / 1e6


def tc_classes(p: Pair) -> dict[str, tuple[str, int]]:
    """`tc -s class show` of va in namespace a: class id -> (rate as tc prints it, bytes sent)."""
    out = subprocess.run(
        ["ip", "netns", "exec", p.a, "tc", "-s", "class", "show", "dev", A_IF],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    found = re.findall(r"class htb (\S+) .*? rate (\S+) .*?\n\s*Sent (\d+) bytes", out)
    return {classid: (rate, int(sent)) for classid, rate, sent in found}


@needs_netns
@pytest.mark.parametrize("rate_mbit", [1.0, 10.0, 100.0])
def test_shaped_tcp_goodput_matches_the_rate(pair: Pair, rate_mbit: float) -> None:
    shaper = TcShaper(A_IF, netns=pair.a)
    shaper.setup()
    shaper.shape(B_IP, 3 * rate_mbit)  # first another rate: the measured one is a change
    shaper.shape(B_IP, rate_mbit)
    measured = goodput_mbit(pair, B_IP, seconds=4.0, warmup=1.0)
    expected = rate_mbit * PAYLOAD_SHARE
    print(f"\nshaped {rate_mbit:g} Mbit/s: TCP goodput {measured:.3f} Mbit/s ({expected:.3f})")
    assert measured == pytest.approx(expected, rel=0.10)


@needs_netns
def test_shape_changes_the_class_in_place_and_spares_other_hosts(pair: Pair) -> None:
    shaper = TcShaper(A_IF, netns=pair.a)
    shaper.setup()
    shaper.shape(B_IP, 20.0)
    classid = shaper.classid(B_IP)
    assert classid is not None
    goodput_mbit(pair, B_IP, seconds=1.0, warmup=0.2)  # traffic through the class
    rate, sent = tc_classes(pair)[classid]
    assert rate == "20Mbit" and sent > 0

    shaper.shape(B_IP, 7.0)
    assert shaper.classid(B_IP) == classid
    classes = tc_classes(pair)
    assert set(classes) == {"1:2", classid}  # the default class and the one peer: none added
    rate, sent_after = classes[classid]
    assert rate == "7Mbit"
    # a recreated class would start from zero: the counters show it is the same class
    assert sent_after >= sent
    assert shaper.rates() == {B_IP: 7.0}
    filters = subprocess.run(
        ["ip", "netns", "exec", pair.a, "tc", "filter", "show", "dev", A_IF],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"flowid {classid}" in filters and "match 0afa0002/ffffffff at 16" in filters

    # B_IP2 goes out of the same interface, through the default (line-rate) class
    other = goodput_mbit(pair, B_IP2, seconds=1.5, warmup=0.5, port=5202)
    print(f"\nunshaped host next to a 7 Mbit/s peer: {other:.1f} Mbit/s")
    assert other > 10 * 7.0


@needs_netns
def test_unshape_and_clear(pair: Pair) -> None:
    shaper = TcShaper(A_IF, netns=pair.a)
    shaper.setup()
    shaper.shape(B_IP, 5.0)
    shaper.shape(B_IP, None)
    assert shaper.rates() == {B_IP: 10_000.0}
    shaper.setup()  # again: starts over from an empty htb
    assert shaper.rates() == {} and set(tc_classes(pair)) == {"1:2"}
    shaper.clear()
    shaper.clear()  # nothing left to remove is fine
    assert tc_classes(pair) == {}


@needs_netns
def test_interface_for_finds_own_and_routed_addresses(pair: Pair) -> None:
    assert interface_for(A_IP, netns=pair.a) == A_IF  # held on va
    assert interface_for(B_IP, netns=pair.a) == A_IF  # routed out of va
    with pytest.raises(TcUnavailable, match="advertise"):
        interface_for("0.0.0.0", netns=pair.a)
    with pytest.raises(TcUnavailable, match=re.escape("10.251.0.9")):
        interface_for("10.251.0.9", netns=pair.a)  # no route to it in the test namespace


@needs_netns
def test_missing_interface_or_root_is_named(pair: Pair) -> None:
    with pytest.raises(TcUnavailable, match="no interface named 'eth9'"):
        TcShaper("eth9", netns=pair.a).setup()
    with pytest.raises(TcUnavailable, match="setup"):
        TcShaper(A_IF, netns=pair.a).shape(B_IP, 1.0)  # no htb root yet


def _without_net_admin(argv: list[str]) -> list[str]:
    """argv run without CAP_NET_ADMIN (setpriv, else capsh); skips when neither exists."""
    if shutil.which("setpriv"):
        return ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", *argv]
    if shutil.which("capsh"):
        return ["capsh", "--drop=cap_net_admin", "--", "-c", 'exec "$@"', "sh", *argv]
    pytest.skip("neither setpriv (util-linux) nor capsh is installed to drop NET_ADMIN")


NO_CAP_SCRIPT = textwrap.dedent(
    f"""
    import sys
    from edgepart.device_agent.tc import TcShaper, TcUnavailable
    try:
        TcShaper({A_IF!r}).setup()
    except TcUnavailable as exc:
        print(exc)
        sys.exit(3)
    """
)


@needs_netns
def test_without_net_admin_setup_raises_tc_unavailable(pair: Pair) -> None:
    argv = _without_net_admin([sys.executable, "-c", NO_CAP_SCRIPT])
    done = subprocess.run(
        ["ip", "netns", "exec", pair.a, *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "CAP_NET_ADMIN" in done.stdout and "cap_add: [NET_ADMIN]" in done.stdout
    assert A_IF in done.stdout


@needs_netns
def test_agent_without_net_admin_exits_2_naming_the_capability(pair: Pair) -> None:
    agent = [sys.executable, "-m", "edgepart.device_agent", "--name", "dev"]
    agent += ["--broker", "127.0.0.1:1"]
    agent += ["--listen", f"{A_IP}:0", "--shaping", "tc"]
    done = subprocess.run(
        ["ip", "netns", "exec", pair.a, *_without_net_admin(agent)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "CAP_NET_ADMIN" in done.stderr and "cap_add: [NET_ADMIN]" in done.stderr


AGENT_SCRIPT = textwrap.dedent(
    f"""
    import asyncio, json, subprocess, sys
    import aiomqtt
    from edgepart.control_plane import protocol as proto
    from edgepart.device_agent.tc import TcShaper
    from edgepart.emulator.broker import EmbeddedBroker
    from edgepart.llm.blocks import PINNED_BLOCKS, block_table
    from edgepart.llm.loader import open_model

    T, NAME = "tc-test", "dev"

    async def reply(client, cid):
        async for m in client.messages:
            r = proto.decode("reply", m.payload)
            if getattr(r, "id", None) == cid:
                return r

    def classes():
        out = subprocess.run(["tc", "class", "show", "dev", {A_IF!r}], capture_output=True,
                             text=True, check=True).stdout
        return sorted(line.split()[2] + " " + line.split(" rate ")[1].split()[0]
                      for line in out.splitlines() if line.startswith("class htb"))

    async def until_classes(n):
        for _ in range(100):
            if len(classes()) == n:
                return classes()
            await asyncio.sleep(0.1)
        return classes()

    async def main(endpoint):
        host, _, port = endpoint.rpartition(":")
        names = list(PINNED_BLOCKS) + list(block_table(open_model("smollm2-135m").arch.spec).names)
        out = {{}}
        async with aiomqtt.Client(host, int(port), identifier="tc-test") as c:
            await c.subscribe(proto.subscription(T, "status", NAME), qos=1)
            async for m in c.messages:
                s = proto.decode("status", m.payload)
                if getattr(s, "state", None) == "online":
                    break
            await c.unsubscribe(proto.subscription(T, "status", NAME))
            await c.subscribe(proto.subscription(T, "reply", NAME), qos=1)
            cmd = proto.device_topic(T, NAME, "cmd")
            shape = proto.Shape(id="s1", op="shape", peer="peer", bandwidth_mbit=3.0, latency_ms=4)
            await c.publish(cmd, proto.encode(shape), qos=1)
            out["first_reply"] = (await reply(c, "s1")).ok
            out["before_placement"] = classes()  # no endpoint for the peer yet
            epoch = proto.PlacementEpoch(epoch=0, placement={{b: NAME for b in names}},
                                         endpoints={{NAME: s.listen, "peer": "{B_IP}:7000"}})
            await c.publish(proto.placement_topic(T), proto.encode(epoch), qos=1, retain=True)
            out["after_placement"] = await until_classes(2)
            shape = proto.Shape(id="s2", op="shape", peer="peer", bandwidth_mbit=9.0)
            await c.publish(cmd, proto.encode(shape), qos=1)
            out["second_reply"] = (await reply(c, "s2")).ok
            out["after_change"] = classes()
        print(json.dumps(out), flush=True)

    with EmbeddedBroker() as broker:
        agent = subprocess.Popen([sys.executable, "-m", "edgepart.device_agent", "--name", NAME,
                                  "--broker", broker.endpoint, "--testbed", T,
                                  "--listen", "{A_IP}:0", "--shaping", "tc"])
        try:
            asyncio.run(asyncio.wait_for(main(broker.endpoint), 90))
        finally:
            agent.terminate()
            agent.wait(10)
        print(json.dumps({{"after_exit": classes()}}), flush=True)
    """
)


@needs_netns
def test_agent_in_tc_mode_shapes_its_interface_once_the_peer_endpoint_is_known(
    pair: Pair,
) -> None:
    done = subprocess.run(
        ["ip", "netns", "exec", pair.a, sys.executable, "-c", AGENT_SCRIPT],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=150,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    out, after = lines
    assert out["first_reply"] and out["second_reply"]
    assert out["before_placement"] == ["1:2 10Gbit"]
    assert out["after_placement"] == ["1:10 3Mbit", "1:2 10Gbit"]
    assert out["after_change"] == ["1:10 9Mbit", "1:2 10Gbit"]
    assert after["after_exit"] == []  # the agent removed its htb on the way out
