"""Part 1, ``links``: link shaping in the kernel, measured with iperf3 between two containers.

Two containers (``--cap-add NET_ADMIN``, one internal network). In the sender a long-lived
Python process (``programs/shaper.py`` through ``docker exec -i``) runs
``edgepart.device_agent.tc.TcShaper`` on the interface ``interface_for(receiver's IP)`` names:
``setup()`` once, then ``shape(receiver_ip, rate)`` for each rate in turn: 1, 10 and
100 Mbit/s (the first call adds the htb class, the others ``change`` it in place, as the agent
does when a trace changes a link), plus, in the full run, an unshaped reference before and
1 Mbit/s again at the end (a change downwards). For each rate the receiver runs ``iperf3 -s``
and the sender ``iperf3 -c <ip> -t T -J`` (T = ``--seconds``); the goodput is the receiver's
count, ``end.sum_received.bits_per_second`` (application bytes / the server's test
duration). htb charges each packet's length at the qdisc: the IP packet plus the 14-byte
Ethernet header (no preamble, FCS or gap). A full TCP segment on an MTU-1500 link carries
MSS = 1500 - 20 (IP) - 20 (TCP) - 12 (timestamp option, when net.ipv4.tcp_timestamps is
on in the sender) = 1448 bytes in a 1514-byte frame, so the expected goodput is rate x
1448/1514 = rate x 0.9564 (the factor is computed from the sender's MTU and timestamp
setting and the MSS iperf3 reports is recorded). Target: |goodput / expected - 1| <= 5 % at
every rate. The raw |goodput / rate - 1| is recorded too, as is a steady-state goodput
from the server's one-second intervals after the first.
"""

from __future__ import annotations

import json
import time
from typing import Any

from benchmarks.common import ByMode, console, num, pct, print_table
from benchmarks.testbed_fidelity.docker_calls import (
    BenchError,
    LineProcess,
    Scratch,
    call,
    container_ip,
)
from edgepart.emulator.docker_cli import exec_command

RATES_MBIT = [1.0, 10.0, 100.0]
DEFAULTS = {
    "seconds": ByMode(10.0, 2.0),  # iperf3 per rate (s)
    "unshaped_reference": ByMode(True, False),  # unshaped first, 1 Mbit/s again at the end
}
GOODPUT_TARGET = 0.05
IP_HEADER, TCP_HEADER, TCP_TIMESTAMP_OPTION, ETH_HEADER = 20, 20, 12, 14
IPERF_PORT = 5201
SHAPER_TIMEOUT_S = 60.0
IPERF_GRACE_S = 60.0


def iperf(sender: str, receiver_ip: str, seconds: float) -> dict[str, Any]:
    """``iperf3 -c`` from the sender for `seconds`; its JSON (retried while the server starts)."""
    cmd = exec_command(sender, "iperf3", "-c", receiver_ip, "-p", str(IPERF_PORT),
                       "-t", f"{seconds:g}", "-J", "--get-server-output")  # fmt: skip
    for attempt in range(10):
        text = call(cmd, timeout_s=seconds + IPERF_GRACE_S, check=False)
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise BenchError(f"iperf3 printed no JSON: {text.strip()[-500:]}") from None
        error = data.get("error")
        if not error:
            return data
        if "connect" in error and attempt < 9:  # the server is not listening yet
            time.sleep(1.0)
            continue
        raise BenchError(f"iperf3: {error}")
    raise AssertionError("unreachable")


def header_factor(mtu: int, timestamps: bool) -> dict[str, Any]:
    """Payload bytes per full frame as htb counts it, and their ratio."""
    payload = mtu - IP_HEADER - TCP_HEADER - (TCP_TIMESTAMP_OPTION if timestamps else 0)
    frame = mtu + ETH_HEADER
    return {"mtu": mtu, "timestamps": timestamps, "payload_bytes": payload,
            "frame_bytes": frame, "factor": payload / frame}  # fmt: skip


def _steady_mbit(data: dict[str, Any]) -> float | None:
    """Receiver goodput over the server's one-second intervals after the first (Mbit/s)."""
    server = data.get("server_output_json") or {}
    intervals = [i["sum"] for i in server.get("intervals", []) if not i["sum"].get("omitted")]
    later = intervals[1:]
    seconds = sum(i["seconds"] for i in later)
    if not later or seconds <= 0:
        return None
    return sum(i["bytes"] for i in later) * 8 / seconds / 1e6


def _row(rate: float | None, answer: dict[str, Any], data: dict[str, Any],
         factor: dict[str, Any]) -> dict[str, Any]:
    """One rate's iperf3 result against the rate the shaper set (None: unshaped)."""
    end = data["end"]
    received = end["sum_received"]["bits_per_second"] / 1e6
    row = {
        "rate_mbit": rate,
        "tc_verb": answer["verb"],
        "classid": answer["classid"],
        "kernel_rate_mbit": answer["kernel_mbit"],
        "seconds": end["sum_received"]["seconds"],
        "bytes_received": end["sum_received"]["bytes"],
        "goodput_mbit": received,
        "sent_mbit": end["sum_sent"]["bits_per_second"] / 1e6,
        "retransmits": end["sum_sent"].get("retransmits"),
        "mss": data["start"].get("tcp_mss_default"),
        "steady_goodput_mbit": _steady_mbit(data),
    }
    if rate is not None:
        expected = rate * factor["factor"]
        row["expected_goodput_mbit"] = expected
        row["error"] = received / expected - 1.0
        row["raw_error"] = received / rate - 1.0
        steady = row["steady_goodput_mbit"]
        row["steady_error"] = None if steady is None else steady / expected - 1.0
    return row


def part_links(image: str, prefix: str, seconds: float, unshaped_reference: bool
               ) -> dict[str, Any]:  # fmt: skip
    """Part 1: iperf3 goodput through TcShaper's htb classes at each rate."""
    schedule: list[float | None] = list(RATES_MBIT)
    if unshaped_reference:
        schedule = [None, *schedule, RATES_MBIT[0]]  # unshaped first, a change down at the end
    rows: list[dict[str, Any]] = []
    with Scratch(prefix + "-link") as scratch:
        net = scratch.network("net")
        common = ["--network", net, "--cap-add", "NET_ADMIN", "--memory", "512m",
                  "--entrypoint", "sleep", image, "infinity"]  # fmt: skip
        rx = scratch.run("rx", *common)
        tx = scratch.run("tx", *common)
        rx_ip = container_ip(rx, net)
        call(exec_command(rx, "iperf3", "-s", "-J", "-p", str(IPERF_PORT), detach=True))
        shaper = LineProcess.in_container(tx, "shaper", rx_ip)
        try:
            ready = shaper.read(SHAPER_TIMEOUT_S)
            ifname = ready["ifname"]
            mtu_text, ts_text = call(exec_command(
                tx, "cat", f"/sys/class/net/{ifname}/mtu", "/proc/sys/net/ipv4/tcp_timestamps",
            )).split()  # fmt: skip
            factor = header_factor(int(mtu_text), ts_text.strip() != "0")
            console.print(
                f"  sender {tx} shapes {ifname} towards {rx_ip}; MTU {factor['mtu']}, "
                f"timestamps {'on' if factor['timestamps'] else 'off'}: goodput factor "
                f"{factor['payload_bytes']}/{factor['frame_bytes']} = {factor['factor']:.4f}"
            )
            for rate in schedule:
                if rate is None:
                    answer = {"ok": True, "verb": "none", "classid": None, "kernel_mbit": None}
                else:
                    answer = shaper.send(f"{rate:g}", SHAPER_TIMEOUT_S)
                    if not answer.get("ok"):
                        raise BenchError(f"TcShaper.shape at {rate:g} Mbit/s: {answer['error']}")
                label = "unshaped" if rate is None else f"{rate:g} Mbit/s"
                console.print(f"  {label} ({answer['verb']}): iperf3 for {seconds:g} s")
                rows.append(_row(rate, answer, iperf(tx, rx_ip, seconds), factor))
        finally:
            shaper.close()
    if scratch.cleanup_errors:
        raise BenchError("cleanup: " + "; ".join(scratch.cleanup_errors))
    return {"seconds_per_rate": seconds, "header": factor, "rows": rows, "receiver_ip": rx_ip}


def print_links(part: dict[str, Any]) -> None:
    """Part 1's table: goodput against the expected rate, per configured rate."""
    factor = part["header"]
    rows = []
    for r in part["rows"]:
        shaped = r["rate_mbit"] is not None
        rows.append((
            f"{r['rate_mbit']:g} Mbit/s" if shaped else "unshaped",
            r["tc_verb"],
            num(r["kernel_rate_mbit"], ".4g"),
            f"{r['goodput_mbit']:.4g}",
            num(r.get("expected_goodput_mbit"), ".4g"),
            pct(r.get("error")),
            ("[green]yes[/]" if abs(r["error"]) <= GOODPUT_TARGET else "[red]no[/]")
            if shaped else "",
            pct(r.get("raw_error")),
            pct(r.get("steady_error")),
            r["retransmits"],
            r["mss"],
        ))  # fmt: skip
    print_table(
        f"Part 1: iperf3 through TcShaper (htb + tbf) between two containers, "
        f"{part['seconds_per_rate']:g} s per rate",
        [
            "configured",
            "tc",
            "kernel Mbit/s",
            "goodput Mbit/s",
            "expected",
            "error",
            "<= 5%",
            "raw error",
            "steady error",
            "retrans",
            "MSS",
        ],
        rows,
        caption=f"expected = rate x {factor['payload_bytes']}/{factor['frame_bytes']} "
        f"= {factor['factor']:.4f} (MSS / (MTU + 14): TCP/IP/timestamp headers and Ethernet "
        "header, which htb counts); raw error = goodput / rate - 1; steady: server intervals "
        "after the first second; tc: add = new class, change = rate changed in place",
    )
