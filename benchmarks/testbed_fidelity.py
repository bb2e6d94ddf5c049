"""Testbed fidelity: the Docker testbed's shaped links, CPU shares, per-token predictions, capacity.

Every part runs containers of the edgepart image (``--image``, default ``edgepart:latest``,
pinned to its image id when the run starts, so a rebuild by someone else mid-run changes
nothing) on networks this script creates with ``--internal``; every container and network
is named ``tbf-<pid>-...`` (compose projects ``edgepart-tbf-...-<pid>``) and removed again,
also on errors and Ctrl-C. The image's Python files of ``llm``, ``device_agent``,
``controller`` and ``emulator`` are compared with this tree's (sha256) and the result is
recorded under ``image``.

Part 1, ``links``: link shaping in the kernel. Two containers (``--cap-add NET_ADMIN``, one
internal network). In the sender a long-lived Python process (``docker exec -i``) runs
``device_agent.tc.TcShaper`` on the interface ``interface_for(receiver's IP)`` names:
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

Part 2, ``compute``: a container's CPU share against the host profile. For each share s
(0.25, 0.5, 1.0 cores) a container runs with ``--cpus s`` (docker's CFS quota: s x 100 ms
per 100 ms period), plus 0.25 with a 10 ms period (``--cpu-period 10000 --cpu-quota 2500``)
and one without a limit (the host's state right now). Inside it one Python process, one
torch thread, no agent and so none of the agent's time dilation, opens SmolLM2-135M
(float32, every block in one process) and times its blocks in two ways:

- per pass: ``llm.calibration.measure_gflops`` (contexts 32 and 128), the host profile's
  own method: the median of short timed passes (all 30 FFN blocks: about 20 ms at full
  speed; all 90 KV-group blocks: about 12 ms);
- sustained: passes run back to back for ``--sustain`` seconds (many CFS periods), time =
  wall time / blocks run, FFN blocks and KV-group blocks at context 128; the container's
  cgroup ``cpu.stat`` (periods, throttled periods, throttled time) before and after.

Both are compared with what the testbed assumes: the host profile's block time
(``llm.host_profile.host_profile(model, threads=1)``, the file the compose project's
``calibrate`` service copies) divided by s. Target: |sustained / expected - 1| <= 15 %
for the FFN and the KV group at every share. A short pass can run entirely inside one
period's quota, so the per-pass medians of a throttled container may show the host's full
speed: that is the CFS period effect the table shows next to the sustained numbers.

Part 3, ``tokens``: per-token fidelity on the testbed. ``emulator.backends.docker.run_docker``
runs ``scenarios/lan-3.yaml`` and ``scenarios/demo.yaml`` with ``myopic`` and ``edgeshard``
(``--quick``: lan-3 with myopic only and generate_tokens cut to 8 in a copy of the file).
For each run: median and p90 over the tokens of |measured / predicted - 1|
(``emulator.report.fidelity``), the median of measured / predicted (the bias), tokens/s =
tokens / sum of per-token decode times, migrated blocks, the start time (``run.start_s``:
``docker compose up`` until every container runs) and the wall time. Target: median <=
20 % for every run.

Part 4, ``capacity``: how many device containers this machine holds. For N in 8, 16, 24
(stop at the first failure; ``--quick``: 4) a scenario of N devices running SmolLM2-135M:
compute_gflops such that the N CPU shares add up to 1.7 cores (equal shares; the local
backend's check allows 1.75 of 2), memory_mib = 1.5 x the blocks' memory at the last token
/ N on every device plus the embedding and LM head on the source, links 1 Gbit/s and
0.3 ms; each container's mem_limit is that plus ``emulator.compose.AGENT_RUNTIME_MIB``.
A short myopic generation (``--capacity-tokens``, 4) runs through ``run_docker``. Recorded:
success (every token generated), start time (``run.start_s``), wall time, tokens/s, the
host's memory in use (MemTotal - MemAvailable from /proc/meminfo, every 0.5 s: the baseline
before and the peak during the run; other users of the machine count too) and the sum of
the project's containers' memory (``docker stats --no-stream``, every few seconds) at its
peak. Target: N >= 16 runs.

The machine's load is not controlled (others may run containers); the 1-minute load
average is recorded at the start and end of every part, and before parts 2 to 4 the script
waits up to ``--settle`` seconds for it to fall to ``--quiet-load`` (recorded). Every wait
is bounded (docker calls, iperf3, the container scripts, and each testbed run, whose
``testbed`` container a watchdog kills when its budget is spent or 30 s after the
controller's container exited with an error: the driver itself would wait for hours). A
part that fails is recorded with its error and the next part runs.

Parts 3 and 4 render the containers' commands with this tree's ``emulator.compose`` and run
them with the image's code: when the image is older than the tree (see ``image``), a run
can fail on a command-line option the image does not know yet; ``--build`` rebuilds the
image from this tree first (``emulator.images.build_image``, offline).

Run: ``.venv/bin/python benchmarks/testbed_fidelity.py [--quick] [--parts links compute
tokens capacity] [--image TAG] [--build] [--seconds T] [--sustain S] [--capacity-sizes N ...]
[--capacity-tokens N] [--settle S] [--quiet-load L] [--out DIR]``. Writes DIR/testbed_fidelity.json;
the testbed runs' compose projects go under DIR/docker/.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib
import hashlib
import json
import math
import os
import queue
import re
import statistics
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from benchmarks.common import (
    console,
    environment,
    make_parser,
    num,
    parse,
    pct,
    print_table,
    print_targets,
    target,
    write_json,
)

NAME = "testbed_fidelity"
ROOT = Path(__file__).resolve().parent.parent
PARTS = ("links", "compute", "tokens", "capacity")
MODEL = "smollm2-135m"
MIB = 2**20

# part 1
RATES_MBIT = [1.0, 10.0, 100.0]
SECONDS, SECONDS_QUICK = 10.0, 2.0
GOODPUT_TARGET = 0.05
IP_HEADER, TCP_HEADER, TCP_TIMESTAMP_OPTION, ETH_HEADER = 20, 20, 12, 14
IPERF_PORT = 5201
# part 2
SHARES = [0.25, 0.5, 1.0]
SHARES_QUICK = [0.5]
SHORT_PERIOD_US = 10_000  # the extra 0.25-core row's CFS period (docker's default: 100 ms)
SUSTAIN_S, SUSTAIN_S_QUICK = 4.0, 1.5
CONTEXTS = (32, 128)
SUSTAIN_CONTEXT = 128
REPS, REPS_QUICK = 15, 8
COMPUTE_TARGET = 0.15
COMPUTE_MEMORY = "1g"
# part 3
SCENARIOS = ["scenarios/lan-3.yaml", "scenarios/demo.yaml"]
SCENARIOS_QUICK = ["scenarios/lan-3.yaml"]
ALGORITHMS = ["myopic", "edgeshard"]
ALGORITHMS_QUICK = ["myopic"]
TOKENS_QUICK = 8
FIDELITY_TARGET = 0.20
# part 4
CAPACITY_SIZES = [8, 16, 24]
CAPACITY_SIZES_QUICK = [4]
CAPACITY_TOKENS = 4
CAPACITY_TOTAL_SHARE = 1.7  # cores shared by the N devices
CAPACITY_MEMORY_MARGIN = 1.5  # memory_mib = margin x blocks' memory / N
CAPACITY_TARGET = 16
# bounds of every wait (s)
DOCKER_TIMEOUT_S = 60.0
SHAPER_TIMEOUT_S = 60.0
IPERF_GRACE_S = 60.0
COMPUTE_TIMEOUT_S = 900.0
RUN_BASE_S, RUN_PER_TOKEN_S = 900.0, 15.0  # a testbed run's budget: base + per token
CAPACITY_RUN_S = 1500.0
CONTROLLER_POLL_S, CONTROLLER_GRACE_S = 5.0, 30.0
SETTLE_S, QUIET_LOAD = 90.0, 1.5
MEMORY_SAMPLE_S, DOCKER_STATS_S = 0.5, 3.0


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says which and what docker said."""


def error_text(exc: BaseException) -> str:
    """Type and message of an error; an exception group's leaves, each on its own line."""
    if isinstance(exc, BaseExceptionGroup):
        return "\n".join(error_text(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


def load1() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


# ---------------------------------------------------------------- docker


def docker(*args: str, timeout_s: float = DOCKER_TIMEOUT_S, check: bool = True) -> str:
    """One docker CLI call; its stdout (BenchError on a failure or after timeout_s)."""
    cmd = ["docker", *args]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError:
        raise BenchError("docker is not installed (compose/docker-setup.sh)") from None
    except subprocess.TimeoutExpired:
        raise BenchError(f"docker {' '.join(args[:3])}: no answer in {timeout_s:.0f} s") from None
    if check and done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-10:])
        raise BenchError(f"docker {' '.join(args[:4])} failed (exit {done.returncode}): {tail}")
    return done.stdout


class Scratch:
    """Containers and networks this run creates; ``close`` removes every one of them."""

    def __init__(self, prefix: str) -> None:
        """Resources named ``<prefix>-...``."""
        self.prefix = prefix
        self.containers: list[str] = []
        self.networks: list[str] = []
        self.cleanup_errors: list[str] = []

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def name(self, what: str) -> str:
        """A resource name unique to this run."""
        return f"{self.prefix}-{what}"

    def network(self, what: str) -> str:
        """Create an internal bridge network (nothing leaves it); its name."""
        name = self.name(what)
        self.networks.append(name)  # before: a timed-out create may still have made it
        docker("network", "create", "--internal", name)
        return name

    def run(self, what: str, *args: str, timeout_s: float = DOCKER_TIMEOUT_S) -> str:
        """``docker run -d --name <prefix>-what ARGS``; the container's name."""
        name = self.name(what)
        self.containers.append(name)
        docker("run", "-d", "--name", name, *args, timeout_s=timeout_s)
        return name

    def close(self) -> None:
        """Remove the containers, then the networks (errors are kept, not raised)."""
        for name in reversed(self.containers):
            self._remove("rm", "-f", name)
        for name in reversed(self.networks):
            self._remove("network", "rm", name)
        self.containers.clear()
        self.networks.clear()

    def _remove(self, *args: str) -> None:
        try:
            done = subprocess.run(
                ["docker", *args], capture_output=True, text=True, timeout=DOCKER_TIMEOUT_S
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.cleanup_errors.append(f"docker {' '.join(args)}: {exc}")
            return
        err = done.stderr.strip()
        if done.returncode != 0 and "No such" not in err and "not found" not in err:
            self.cleanup_errors.append(f"docker {' '.join(args)}: {err}")


def container_ip(container: str, network: str) -> str:
    """The container's IPv4 address on a network."""
    template = f'{{{{(index .NetworkSettings.Networks "{network}").IPAddress}}}}'
    ip = docker("inspect", "-f", template, container).strip()
    if not ip:
        raise BenchError(f"{container} has no address on {network}")
    return ip


def _source_hashes() -> dict[str, str]:
    out = {}
    for package in ("llm", "device_agent", "controller", "emulator"):
        for path in sorted((ROOT / package).rglob("*.py")):
            out[str(path.relative_to(ROOT))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def image_info(tag: str, scratch: Scratch) -> dict[str, Any]:
    """The image's id and creation time, and whether its Python code is this tree's."""
    image_id, created = docker("image", "inspect", "--format", "{{.Id}} {{.Created}}", tag).split()
    name = scratch.name("image-check")
    scratch.containers.append(name)
    listing = docker(
        "run", "--rm", "--name", name, "--network", "none", "--entrypoint", "sh", image_id, "-c",
        "cd /opt/venv/lib/python3*/site-packages && "
        "find llm device_agent controller emulator -name '*.py' -exec sha256sum {} +",
        timeout_s=120,
    )  # fmt: skip
    inside = {}
    for line in listing.splitlines():
        digest, _, path = line.strip().partition("  ")
        inside[path] = digest
    local = _source_hashes()
    differing = sorted(p for p in set(local) | set(inside) if local.get(p) != inside.get(p))
    return {
        "tag": tag,
        "id": image_id,
        "created": created,
        "code_matches_tree": not differing,
        "differing_files": differing,
    }


# ---------------------------------------------------------------- waiting for a quiet host


def settle(max_wait_s: float, quiet_load: float) -> dict[str, Any]:
    """Wait up to max_wait_s for the 1-min load average to fall to quiet_load; what happened."""
    start, before = time.monotonic(), load1()
    while max_wait_s > 0 and load1() > quiet_load and time.monotonic() - start < max_wait_s:
        time.sleep(5)
    waited = time.monotonic() - start
    after = load1()
    if waited > 1:
        console.print(
            f"  waited {waited:.0f} s for a quieter host: load {before:.2f} -> {after:.2f}"
        )
    return {"waited_s": waited, "load_before": before, "load_after": after,
            "quiet": after <= quiet_load}  # fmt: skip


# ---------------------------------------------------------------- part 1: links

SHAPER = r"""
import json, sys
from device_agent.tc import TcShaper, interface_for
peer = sys.argv[1]
ifname = interface_for(peer)
shaper = TcShaper(ifname)
shaper.setup()
print(json.dumps({"ready": True, "ifname": ifname}), flush=True)
for line in sys.stdin:
    word = line.strip()
    if not word:
        continue
    try:
        verb = "change" if shaper.classid(peer) is not None else "add"
        shaper.shape(peer, None if word == "none" else float(word))
        print(json.dumps({"ok": True, "verb": verb, "classid": shaper.classid(peer),
                          "kernel_mbit": shaper.rates().get(peer)}), flush=True)
    except Exception as exc:
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
"""


class LineProcess:
    """A process fed commands on stdin that answers one JSON line each (bounded reads)."""

    def __init__(self, cmd: Sequence[str]) -> None:
        """Start cmd with pipes; a thread queues its stdout lines."""
        self.proc = subprocess.Popen(
            list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, bufsize=1,
        )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def read(self, timeout_s: float) -> dict[str, Any]:
        """The next JSON line (BenchError after timeout_s or when the process ended)."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"no answer from the shaper in {timeout_s:.0f} s")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise BenchError(f"the shaper process ended: {err.strip()[-1500:]}")
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)

    def send(self, text: str, timeout_s: float) -> dict[str, Any]:
        """Write one command line; its answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.read(timeout_s)

    def close(self) -> None:
        """Close stdin, wait briefly, then kill."""
        with contextlib.suppress(OSError):
            if self.proc.stdin:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def iperf(sender: str, receiver_ip: str, seconds: float) -> dict[str, Any]:
    """``iperf3 -c`` from the sender for `seconds`; its JSON (retried while the server starts)."""
    cmd = ["exec", sender, "iperf3", "-c", receiver_ip, "-p", str(IPERF_PORT),
           "-t", f"{seconds:g}", "-J", "--get-server-output"]  # fmt: skip
    for attempt in range(10):
        text = docker(*cmd, timeout_s=seconds + IPERF_GRACE_S, check=False)
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


def part_links(image: str, prefix: str, quick: bool, seconds: float) -> dict[str, Any]:
    """Part 1: iperf3 goodput through TcShaper's htb classes at each rate."""
    schedule: list[float | None] = list(RATES_MBIT)
    if not quick:
        schedule = [None, *schedule, RATES_MBIT[0]]  # unshaped first, a change down at the end
    rows: list[dict[str, Any]] = []
    with Scratch(prefix + "-link") as scratch:
        net = scratch.network("net")
        common = ["--network", net, "--cap-add", "NET_ADMIN", "--memory", "512m",
                  "--entrypoint", "sleep", image, "infinity"]  # fmt: skip
        rx = scratch.run("rx", *common)
        tx = scratch.run("tx", *common)
        rx_ip = container_ip(rx, net)
        docker("exec", "-d", rx, "iperf3", "-s", "-J", "-p", str(IPERF_PORT))
        shaper = LineProcess(["docker", "exec", "-i", tx, "python", "-u", "-c", SHAPER, rx_ip])
        try:
            ready = shaper.read(SHAPER_TIMEOUT_S)
            ifname = ready["ifname"]
            mtu_text, ts_text = docker(
                "exec", tx, "cat", f"/sys/class/net/{ifname}/mtu",
                "/proc/sys/net/ipv4/tcp_timestamps",
            ).split()  # fmt: skip
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
                data = iperf(tx, rx_ip, seconds)
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
                rows.append(row)
        finally:
            shaper.close()
    if scratch.cleanup_errors:
        raise BenchError("cleanup: " + "; ".join(scratch.cleanup_errors))
    return {"seconds_per_rate": seconds, "header": factor, "rows": rows, "receiver_ip": rx_ip}


def print_links(part: dict[str, Any]) -> None:
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


# ---------------------------------------------------------------- part 2: compute

COMPUTE = r"""
import json, os, statistics, sys, time
import torch
cfg = json.loads(sys.argv[1])
torch.set_num_threads(1)
from llm.blocks import ffn_flops, group_flops
from llm.calibration import measure_gflops
from llm.loader import open_model
from llm.runtime import monolithic
from llm.torch_blocks import FFNBlock, KVGroupBlock

def read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None

def cpu_stat():
    for path in ("/sys/fs/cgroup/cpu/cpu.stat", "/sys/fs/cgroup/cpu.stat"):
        text = read(path)
        if text:
            return {k: int(v) for k, v in (line.split() for line in text.splitlines())}
    return {}

limits = {
    "v1_quota_us": read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
    "v1_period_us": read("/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    "v2_cpu_max": read("/sys/fs/cgroup/cpu.max"),
}
t0 = time.perf_counter()
om = open_model(cfg["model"])
model = monolithic(om.source, om.arch, torch.float32)
load_s = time.perf_counter() - t0
t0 = time.perf_counter()
measured = measure_gflops(model, cfg["contexts"], cfg["warmup"], cfg["reps"])
measure_s = time.perf_counter() - t0
per_pass = {
    "ffn_block_s": measured["blocks"]["ffn"]["block_s"],
    "group_block_s": {n: e["block_s"] for n, e in measured["blocks"]["group"].items()},
    "ffn_pass_s": measured["blocks"]["ffn"]["pass_s"],
}
spec = model.arch.spec
blocks = next(iter(model.hosts.values())).blocks
ffns = [b for b in blocks.values() if isinstance(b, FFNBlock)]
groups = [b for b in blocks.values() if isinstance(b, KVGroupBlock)]
gen = torch.Generator().manual_seed(0)
x = torch.randn(1, spec.d_model, generator=gen)
n = cfg["sustain_context"]
for b in groups:
    b.set_cache(torch.randn(n - 1, b.head_dim, generator=gen),
                torch.randn(n - 1, b.head_dim, generator=gen))
model.length = n - 1

def ffn_pass():
    for b in ffns:
        b(x)

def group_pass():
    for b in groups:
        b(x)
        b.length -= 1

def sustained(run_pass, blocks_per_pass, flops_per_block, seconds):
    for _ in range(2):
        run_pass()
    before, cpu0, passes = cpu_stat(), time.thread_time(), []
    t0 = time.perf_counter()
    while True:
        s = time.perf_counter()
        run_pass()
        e = time.perf_counter()
        passes.append(e - s)
        if e - t0 >= seconds:
            break
    wall, cpu, after = e - t0, time.thread_time() - cpu0, cpu_stat()
    blocks_run = len(passes) * blocks_per_pass
    ordered = sorted(passes)
    return {
        "passes": len(passes), "blocks": blocks_run, "wall_s": wall, "cpu_s": cpu,
        "block_s": wall / blocks_run, "gflops": blocks_run * flops_per_block / wall / 1e9,
        "pass_median_s": statistics.median(passes),
        "pass_p90_s": ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))],
        "pass_max_s": ordered[-1], "pass_min_s": ordered[0],
        "cpu_stat_delta": {k: after[k] - before.get(k, 0) for k in after},
    }

with torch.no_grad():
    ffn = sustained(ffn_pass, len(ffns), ffn_flops(spec), cfg["seconds"])
    group = sustained(group_pass, len(groups), group_flops(spec, n), cfg["seconds"])
print("RESULT " + json.dumps({
    "limits": limits, "load_s": load_s, "measure_s": measure_s, "per_pass": per_pass,
    "gflops": {k: measured[k] for k in ("group", "proj", "ffn", "head")},
    "sustained": {"ffn": ffn, "group": group}, "nproc": os.cpu_count(),
}), flush=True)
"""


def _compute_configs(quick: bool) -> list[dict[str, Any]]:
    shares = SHARES_QUICK if quick else SHARES
    configs: list[dict[str, Any]] = [
        {"label": f"{s:g}", "share": s, "period_us": 100_000, "args": ["--cpus", f"{s:g}"]}
        for s in shares
    ]
    if not quick:
        s = shares[0]
        configs.append({
            "label": f"{s:g} (10 ms period)", "share": s, "period_us": SHORT_PERIOD_US,
            "args": ["--cpu-period", str(SHORT_PERIOD_US),
                     "--cpu-quota", str(round(s * SHORT_PERIOD_US))],
        })  # fmt: skip
    configs.append({"label": "no limit", "share": None, "period_us": None, "args": []})
    return configs


def run_compute(image: str, scratch: Scratch, config: dict[str, Any], settings: dict) -> dict:
    """One container at one CPU limit running the COMPUTE script; its RESULT."""
    name = scratch.name("cpu-" + re.sub(r"[^a-z0-9]+", "-", config["label"]).strip("-"))
    scratch.containers.append(name)
    cmd = [
        "run", "--rm", "--name", name, "--network", "none", "--memory", COMPUTE_MEMORY,
        *config["args"], "--entrypoint", "python", image, "-c", COMPUTE, json.dumps(settings),
    ]  # fmt: skip
    out = docker(*cmd, timeout_s=COMPUTE_TIMEOUT_S)
    for line in reversed(out.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise BenchError(f"the compute script printed no result: {out.strip()[-800:]}")


def part_compute(image: str, prefix: str, quick: bool, sustain_s: float) -> dict[str, Any]:
    """Part 2: block times inside CPU-limited containers against host profile / share."""
    from llm.host_profile import cache_path, host_profile

    profile = host_profile(MODEL, threads=1, progress=lambda m: console.print(f"  {m}"))
    settings = {
        "model": MODEL,
        "contexts": list(CONTEXTS),
        "warmup": 2,
        "reps": REPS_QUICK if quick else REPS,
        "seconds": sustain_s,
        "sustain_context": SUSTAIN_CONTEXT,
    }
    host_ffn_s = profile.ffn_s
    host_group_s = {n: profile.group_fixed_s + profile.group_per_context_s * n for n in CONTEXTS}
    rows = []
    with Scratch(prefix + "-cpu") as scratch:
        for config in _compute_configs(quick):
            console.print(f"  share {config['label']}: timing blocks in a container")
            load_before = load1()
            t0 = time.perf_counter()
            try:
                res = run_compute(image, scratch, config, settings)
            except BenchError as exc:
                rows.append({**config, "ok": False, "error": str(exc)})
                console.print(f"    [red]failed[/]: {exc}")
                continue
            share = config["share"] if config["share"] is not None else 1.0
            expected_ffn = host_ffn_s / share
            expected_group = host_group_s[SUSTAIN_CONTEXT] / share
            sus = res["sustained"]
            ffn_pass = res["per_pass"]["ffn_block_s"]
            group_pass = res["per_pass"]["group_block_s"][str(SUSTAIN_CONTEXT)]
            stat = sus["ffn"]["cpu_stat_delta"]
            row = {
                **{k: v for k, v in config.items() if k != "args"},
                "docker_args": config["args"],
                "ok": True,
                "wall_s": time.perf_counter() - t0,
                "load_before": load_before,
                "load_after": load1(),
                "expected_ffn_block_s": expected_ffn,
                "expected_group_block_s": expected_group,
                "ffn_sustained_block_s": sus["ffn"]["block_s"],
                "group_sustained_block_s": sus["group"]["block_s"],
                "ffn_error": sus["ffn"]["block_s"] / expected_ffn - 1.0,
                "group_error": sus["group"]["block_s"] / expected_group - 1.0,
                "ffn_per_pass_block_s": ffn_pass,
                "group_per_pass_block_s": group_pass,
                "ffn_per_pass_error": ffn_pass / expected_ffn - 1.0,
                "group_per_pass_error": group_pass / expected_group - 1.0,
                "ffn_throttled_periods": stat.get("nr_throttled"),
                "ffn_periods": stat.get("nr_periods"),
                "ffn_cpu_fraction": sus["ffn"]["cpu_s"] / sus["ffn"]["wall_s"],
                "group_cpu_fraction": sus["group"]["cpu_s"] / sus["group"]["wall_s"],
                # CPU time per block: the speed per CPU second, whatever share was obtained
                "ffn_cpu_block_s": sus["ffn"]["cpu_s"] / sus["ffn"]["blocks"],
                "ffn_cpu_error": sus["ffn"]["cpu_s"] / sus["ffn"]["blocks"] / host_ffn_s - 1.0,
                "container": res,
            }
            console.print(
                f"    FFN {1e6 * row['ffn_sustained_block_s']:.0f} us/block sustained "
                f"(expected {1e6 * expected_ffn:.0f}, {pct(row['ffn_error'], 1)}), "
                f"KV group {pct(row['group_error'], 1)}; per-pass median FFN "
                f"{pct(row['ffn_per_pass_error'], 1)}"
            )
            rows.append(row)
    if scratch.cleanup_errors:
        raise BenchError("cleanup: " + "; ".join(scratch.cleanup_errors))
    return {
        "settings": settings,
        "host_profile": {
            "file": str(cache_path(MODEL, threads=1)),
            "reference_gflops": profile.reference_gflops,
            "ffn_block_s": host_ffn_s,
            "group_block_s": host_group_s,
        },
        "rows": rows,
    }


def print_compute(part: dict[str, Any]) -> None:
    rows = []
    for r in part["rows"]:
        if not r["ok"]:
            rows.append((r["label"], "error", *[""] * 12))
            continue
        met = abs(r["ffn_error"]) <= COMPUTE_TARGET and abs(r["group_error"]) <= COMPUTE_TARGET
        throttled = (
            f"{r['ffn_throttled_periods']}/{r['ffn_periods']}"
            if r["ffn_periods"] is not None
            else "-"
        )
        rows.append((
            r["label"],
            f"{1e6 * r['expected_ffn_block_s']:.0f}",
            f"{1e6 * r['ffn_sustained_block_s']:.0f}",
            pct(r["ffn_error"], 1),
            f"{1e6 * r['expected_group_block_s']:.0f}",
            f"{1e6 * r['group_sustained_block_s']:.0f}",
            pct(r["group_error"], 1),
            "[green]yes[/]" if met else "[red]no[/]",
            pct(r["ffn_per_pass_error"], 1),
            pct(r["group_per_pass_error"], 1),
            throttled,
            f"{r['ffn_cpu_fraction']:.2f}",
            pct(r["ffn_cpu_error"], 1),
            f"{r['load_before']:.1f}",
        ))  # fmt: skip
    hp = part["host_profile"]
    print_table(
        f"Part 2: block times in a CPU-limited container (1 torch thread, no time dilation) "
        f"vs host profile / share; KV group at context {SUSTAIN_CONTEXT}",
        [
            "cpu limit",
            "FFN exp us",
            "FFN us",
            "FFN err",
            "group exp us",
            "group us",
            "group err",
            "<= 15%",
            "FFN per-pass err",
            "group per-pass err",
            "throttled",
            "cores got",
            "FFN CPU-s err",
            "load",
        ],
        rows,
        caption=f"host profile: FFN {1e6 * hp['ffn_block_s']:.0f} us, KV group "
        f"{1e6 * hp['group_block_s'][SUSTAIN_CONTEXT]:.0f} us per block at 1 core; sustained: "
        f"passes back to back for {part['settings']['seconds']:g} s; per-pass: "
        "measure_gflops' median pass; throttled: CFS periods throttled / periods during "
        "the sustained FFN run; cores got: CPU time / wall time of that run; FFN CPU-s err: "
        "CPU time per FFN block vs the profile's block time (speed per CPU second); "
        "no limit: compared with the profile at 1 core",
    )


# ---------------------------------------------------------------- parts 3 and 4: testbed runs


def _project(scenario) -> str:
    from emulator.compose import project_name

    return f"{project_name(scenario)}-{os.getpid()}"  # as run_docker names it


class Watchdog:
    """Stops a compose project's run that cannot finish: kills its ``testbed`` container.

    It fires when the budget is spent, or when the controller's container has exited with
    a non-zero code and the driver is still waiting CONTROLLER_GRACE_S later (a controller
    that dies before publishing an outcome leaves the driver waiting for hours); the kill
    is retried every 10 s until the with block ends.
    """

    def __init__(self, project: str, budget_s: float) -> None:
        """Arm for project."""
        self.project, self.budget_s = project, budget_s
        self.fired: str | None = None  # why it fired
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=DOCKER_TIMEOUT_S + 5)

    def _service(self, service: str, *fmt: str) -> list[str]:
        return docker(
            "ps", "-a", *fmt,
            "--filter", f"label=com.docker.compose.project={self.project}",
            "--filter", f"label=com.docker.compose.service={service}",
        ).split()  # fmt: skip

    def _controller_failed(self) -> int | None:
        """The controller container's exit code when it exited with one != 0, else None."""
        with contextlib.suppress(BenchError, ValueError):
            states = docker(
                "ps", "-a", "--format", "{{.State}}|{{.Status}}",
                "--filter", f"label=com.docker.compose.project={self.project}",
                "--filter", "label=com.docker.compose.service=controller",
            ).splitlines()  # fmt: skip
            for line in states:
                state, _, status = line.partition("|")
                m = re.match(r"Exited \((\d+)\)", status)
                if state == "exited" and m and int(m.group(1)) != 0:
                    return int(m.group(1))
        return None

    def _run(self) -> None:
        start, failed_at = time.monotonic(), None
        while not self._stop.wait(CONTROLLER_POLL_S):
            if time.monotonic() - start > self.budget_s:
                self.fired = f"over its budget of {self.budget_s:.0f} s"
                break
            code = self._controller_failed()
            if code is not None:
                failed_at = failed_at or time.monotonic()
                if time.monotonic() - failed_at > CONTROLLER_GRACE_S:
                    self.fired = f"the controller exited with code {code}, the driver waited on"
                    break
        if self.fired is None:
            return
        console.print(f"  [red]{self.project}: {self.fired}; stopping it[/]")
        while not self._stop.is_set():
            with contextlib.suppress(BenchError):
                ids = self._service("testbed", "-q")
                if ids:
                    docker("kill", *ids, check=False)
            self._stop.wait(10)


_UNITS = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 1e3, "mb": 1e6, "gb": 1e9}


def _bytes(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]+)\s*", text)
    if not m:
        return float("nan")
    return float(m.group(1)) * _UNITS.get(m.group(2).lower(), float("nan"))


def host_used_mib() -> float:
    """MemTotal - MemAvailable (MiB)."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            info[key] = float(rest.split()[0]) * 1024
    return (info["MemTotal"] - info["MemAvailable"]) / MIB


class MemorySampler:
    """Host memory every MEMORY_SAMPLE_S and a project's containers' memory (docker stats)."""

    def __init__(self, project: str) -> None:
        """Sample while in the with block."""
        self.project = project
        self.baseline_mib = host_used_mib()
        self.host_peak_mib = self.baseline_mib
        self.containers_peak_mib = 0.0
        self.container_max_mib: dict[str, float] = {}
        self.stats_samples = 0
        self.stats_errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._host, daemon=True),
            threading.Thread(target=self._containers, daemon=True),
        ]

    def __enter__(self) -> MemorySampler:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=DOCKER_TIMEOUT_S + 5)

    def _host(self) -> None:
        while not self._stop.wait(MEMORY_SAMPLE_S):
            self.host_peak_mib = max(self.host_peak_mib, host_used_mib())

    def _containers(self) -> None:
        while not self._stop.is_set():
            try:
                out = docker("stats", "--no-stream", "--format", "{{.Name}}\t{{.MemUsage}}")
            except BenchError as exc:
                if len(self.stats_errors) < 5:
                    self.stats_errors.append(str(exc))
                self._stop.wait(DOCKER_STATS_S)
                continue
            total, seen = 0.0, 0
            for line in out.splitlines():
                name, _, usage = line.partition("\t")
                if not name.startswith(self.project + "-"):
                    continue
                mib = _bytes(usage.split("/")[0]) / MIB
                if math.isfinite(mib):
                    total += mib
                    seen += 1
                    self.container_max_mib[name] = max(self.container_max_mib.get(name, 0), mib)
            if seen:
                self.stats_samples += 1
                self.containers_peak_mib = max(self.containers_peak_mib, total)
            self._stop.wait(DOCKER_STATS_S)

    def summary(self) -> dict[str, Any]:
        per = self.container_max_mib
        agents = {
            k: v
            for k, v in per.items()
            if not re.search(r"-(broker|controller|testbed|calibrate)-\d+$", k)
        }
        return {
            "host_used_baseline_mib": self.baseline_mib,
            "host_used_peak_mib": self.host_peak_mib,
            "host_used_increase_mib": self.host_peak_mib - self.baseline_mib,
            "containers_peak_sum_mib": self.containers_peak_mib,
            "container_peak_mib": per,
            "agent_peak_max_mib": max(agents.values(), default=None),
            "agent_peak_median_mib": statistics.median(agents.values()) if agents else None,
            "docker_stats_samples": self.stats_samples,
            "docker_stats_errors": self.stats_errors,
        }


def testbed_run(
    scenario,
    text: str,
    algorithm: str,
    image: str,
    work_dir: Path,
    budget_s: float,
    sample_memory: bool = False,
) -> dict[str, Any]:
    """One run_docker, summarised (or its error); bounded by a watchdog."""
    from emulator.backends.docker import run_docker
    from emulator.report import fidelity

    project = _project(scenario)
    t0 = time.perf_counter()
    load_before = load1()
    sampler = MemorySampler(project) if sample_memory else contextlib.nullcontext()
    watchdog = Watchdog(project, budget_s)
    try:
        with watchdog, sampler:
            run = run_docker(
                scenario, text, algorithm, work_dir=work_dir, image=image,
                status=lambda msg: console.print(f"    {msg}"),
            )  # fmt: skip
    except Exception as exc:  # recorded, not worked around
        out = {
            "algorithm": algorithm,
            "ok": False,
            "error": error_text(exc),
            "stopped_by_watchdog": watchdog.fired,
            "budget_s": budget_s,
            "traceback": "".join(traceback.format_exception(exc)),
            "wall_s": time.perf_counter() - t0,
            "load_before": load_before,
            "load_after": load1(),
            "project": project,
        }
        if sample_memory:
            out["memory"] = sampler.summary()  # type: ignore[union-attr]
        return out
    r = run.result
    median, p90 = fidelity(run)
    ratios = [m / p for m, p in zip(r.per_token_s, r.predicted_per_token_s, strict=True) if p > 0]
    decode_s = sum(r.per_token_s)
    out = {
        "algorithm": algorithm,
        "ok": True,
        "tokens": len(r.per_token_s),
        "complete": len(r.per_token_s) == scenario.generate_tokens - 1,
        "fidelity_median": median,
        "fidelity_p90": p90,
        "ratio_median": statistics.median(ratios) if ratios else None,
        "tokens_per_s": len(r.per_token_s) / decode_s if decode_s > 0 else None,
        "total_s": r.total_s,
        "prefill_s": r.prefill_s,
        "migrations": r.migrations,
        "migration_s": r.migration_s,
        "replans": r.replans,
        "recoveries": r.recoveries,
        "start_s": run.start_s,
        "wall_s": time.perf_counter() - t0,
        "load_before": load_before,
        "load_after": load1(),
        "cpu_share": run.shares,
        "project": run.project,
        "run": run.to_json(),
        "driver_log_tail": run.logs[-3000:],
    }
    if sample_memory:
        out["memory"] = sampler.summary()  # type: ignore[union-attr]
    return out


def _resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() or p.exists() else ROOT / p


def shorten(data: dict[str, Any], tokens: int) -> dict[str, Any]:
    """A scenario mapping cut to `tokens` tokens, its token traces moved proportionally."""
    original = int(data["generate_tokens"])
    out = {**data, "generate_tokens": tokens}
    traces = []
    for trace in data.get("traces", []):
        if "at_token" in trace:
            at = int(trace["at_token"]) * tokens // original
            trace = {**trace, "at_token": min(tokens - 1, max(1, at))}
        traces.append(trace)
    if traces:
        out["traces"] = traces
    return out


def part_tokens(image: str, out_dir: Path, quick: bool) -> dict[str, Any]:
    """Part 3: run_docker on each scenario and algorithm, measured against predicted."""
    from emulator.scenario import parse_scenario

    scenarios = SCENARIOS_QUICK if quick else SCENARIOS
    algorithms = ALGORITHMS_QUICK if quick else ALGORITHMS
    runs = []
    for file in scenarios:
        path = _resolve(file)
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if quick:
            data = shorten(data, TOKENS_QUICK)
        text = yaml.safe_dump(data, sort_keys=False)
        scenario = parse_scenario(data, str(path), base_dir=path.parent)
        budget = RUN_BASE_S + RUN_PER_TOKEN_S * scenario.generate_tokens
        for algorithm in algorithms:
            console.rule(f"{scenario.name}: {algorithm} ({scenario.generate_tokens} tokens)")
            run = testbed_run(scenario, text, algorithm, image, out_dir / "docker", budget)
            run.update(scenario=scenario.name, file=file,
                       generate_tokens=scenario.generate_tokens)  # fmt: skip
            if run["ok"]:
                console.print(
                    f"  {run['tokens']} tokens, {num(run['tokens_per_s'], '.2f')} tokens/s, "
                    f"|m/p-1| median {pct(run['fidelity_median'], 1)}, {run['migrations']} "
                    f"migrated, start {run['start_s']:.1f} s, wall {run['wall_s']:.0f} s"
                )
            else:
                console.print(f"  [red]failed[/]: {run['error'][:600]}")
            runs.append(run)
    return {"scenarios": scenarios, "algorithms": algorithms, "runs": runs}


def print_tokens(part: dict[str, Any]) -> None:
    rows = []
    for r in part["runs"]:
        if not r["ok"]:
            rows.append((r["scenario"], r["algorithm"], "error", "", "", "", "", "", "", "",
                         f"{r['wall_s']:.0f}"))  # fmt: skip
            continue
        rows.append((
            r["scenario"],
            r["algorithm"],
            f"{r['tokens']}/{r['generate_tokens'] - 1}",
            pct(r["fidelity_median"], 1),
            pct(r["fidelity_p90"], 1),
            "[green]yes[/]" if r["fidelity_median"] <= FIDELITY_TARGET else "[red]no[/]",
            num(r["ratio_median"], ".3f"),
            num(r["tokens_per_s"], ".2f"),
            r["migrations"],
            f"{r['start_s']:.1f}",
            f"{r['wall_s']:.0f}",
            f"{r['load_before']:.1f}",
        ))  # fmt: skip
    print_table(
        "Part 3: per-token time on the docker testbed, measured vs predicted",
        [
            "scenario",
            "algorithm",
            "tokens",
            "|m/p-1| median",
            "p90",
            "<= 20%",
            "m/p median",
            "tokens/s",
            "migrated",
            "start s",
            "wall s",
            "load",
        ],
        rows,
        caption="tokens/s = tokens / sum of per-token decode times; start: compose up until "
        "every container runs (run.start_s); m/p median: the bias of the prediction",
    )


def capacity_scenario(n: int, reference_gflops: float, tokens: int) -> dict[str, Any]:
    """N equal devices sharing CAPACITY_TOTAL_SHARE cores and 1.5x the model's memory."""
    from llm.blocks import block_table
    from llm.model import preset

    spec = preset(MODEL)
    prompt = 32
    table = block_table(spec)
    blocks_mib = float(table.memory_bytes(prompt + tokens).sum()) / MIB
    source_mib = table.source_weight_bytes / MIB
    per_device = math.ceil(CAPACITY_MEMORY_MARGIN * blocks_mib / n)
    gflops = round(CAPACITY_TOTAL_SHARE / n * reference_gflops, 4)
    devices = [
        {"name": f"d{i}", "compute_gflops": gflops,
         "memory_mib": per_device + (math.ceil(source_mib) if i == 0 else 0),
         **({"source": True} if i == 0 else {})}
        for i in range(n)
    ]  # fmt: skip
    return {
        "version": 1,
        "name": f"tbf-capacity-{n}",
        "model": {"preset": MODEL},
        "prompt_tokens": prompt,
        "generate_tokens": tokens,
        "replan_every": 8,
        "weights_from": "disk",
        "devices": devices,
        "links": {"default": {"bandwidth_mbit": 1000, "latency_ms": 0.3}},
    }


def part_capacity(
    image: str, out_dir: Path, quick: bool, tokens: int, sizes: Sequence[int]
) -> dict[str, Any]:
    """Part 4: N device containers with a short generation, N growing until one fails."""
    from emulator.compose import AGENT_RUNTIME_MIB, mem_limit_mib
    from emulator.scenario import parse_scenario
    from llm.host_profile import host_profile

    reference = host_profile(MODEL, threads=1).reference_gflops
    rows = []
    for n in sizes:
        data = capacity_scenario(n, reference, tokens)
        scenario = parse_scenario(data, f"capacity-{n}")
        text = yaml.safe_dump(data, sort_keys=False)
        console.rule(f"capacity: {n} device containers, {tokens} tokens")
        run = testbed_run(scenario, text, "myopic", image, out_dir / "docker", CAPACITY_RUN_S,
                          sample_memory=True)  # fmt: skip
        devices = data["devices"]
        run.update(
            devices=n,
            share_per_device=CAPACITY_TOTAL_SHARE / n,
            compute_gflops=devices[0]["compute_gflops"],
            memory_mib=devices[1]["memory_mib"] if n > 1 else devices[0]["memory_mib"],
            source_memory_mib=devices[0]["memory_mib"],
            mem_limit_mib=mem_limit_mib(devices[1]["memory_mib"] if n > 1 else 0),
            mem_limit_total_mib=sum(mem_limit_mib(d["memory_mib"]) for d in devices),
            agent_runtime_mib=AGENT_RUNTIME_MIB,
            generate_tokens=tokens,
        )
        run["success"] = bool(run["ok"] and run.get("complete"))
        mem = run.get("memory", {})
        if run["ok"]:
            console.print(
                f"  {run['tokens']} tokens, start {run['start_s']:.1f} s, wall "
                f"{run['wall_s']:.0f} s, host memory peak {mem.get('host_used_peak_mib', 0):.0f}"
                f" MiB (+{mem.get('host_used_increase_mib', 0):.0f}), containers "
                f"{mem.get('containers_peak_sum_mib', 0):.0f} MiB"
            )
        else:
            console.print(f"  [red]failed[/]: {run['error'][:600]}")
        rows.append(run)
        if not run["success"]:
            break
    held = [r["devices"] for r in rows if r["success"]]
    return {"sizes": list(sizes), "tokens": tokens, "total_share": CAPACITY_TOTAL_SHARE,
            "rows": rows, "max_devices": max(held, default=0)}  # fmt: skip


def print_capacity(part: dict[str, Any]) -> None:
    rows = []
    for r in part["rows"]:
        mem = r.get("memory", {})
        rows.append((
            r["devices"],
            f"{r['share_per_device']:.3f}",
            f"{r['memory_mib']} ({r['source_memory_mib']})",
            f"{r['mem_limit_total_mib'] / 1024:.1f}",
            "[green]yes[/]" if r["success"] else "[red]no[/]",
            f"{r['tokens']}/{r['generate_tokens'] - 1}" if r["ok"] else "-",
            f"{r['start_s']:.1f}" if r["ok"] else "-",
            f"{r['wall_s']:.0f}",
            num(r.get("tokens_per_s"), ".2f"),
            f"{mem.get('host_used_baseline_mib', 0) / 1024:.1f}",
            f"{mem.get('host_used_peak_mib', 0) / 1024:.1f}",
            f"{mem.get('containers_peak_sum_mib', 0) / 1024:.1f}",
            num(mem.get("agent_peak_max_mib"), ".0f"),
            f"{r['load_before']:.1f}",
        ))  # fmt: skip
    print_table(
        f"Part 4: device containers on this host (SmolLM2-135M, shares adding up to "
        f"{part['total_share']:g} cores, myopic, {part['tokens']} tokens)",
        [
            "devices",
            "cores each",
            "memory_mib (source)",
            "mem_limit sum GiB",
            "ok",
            "tokens",
            "start s",
            "wall s",
            "tokens/s",
            "host used before GiB",
            "host used peak GiB",
            "containers peak GiB",
            "agent peak MiB",
            "load",
        ],
        rows,
        caption="host used: MemTotal - MemAvailable (every other process included); "
        "containers: the project's containers in docker stats, summed, at the peak sample; "
        "agent peak: the largest device container",
    )


# ---------------------------------------------------------------- main


def _targets(parts: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    links = parts.get("links", {})
    for r in links.get("rows", []):
        if r["rate_mbit"] is not None:
            out.append(target(f"goodput error at {r['rate_mbit']:g} Mbit/s ({r['tc_verb']})",
                              abs(r["error"]), GOODPUT_TARGET))  # fmt: skip
    for r in parts.get("compute", {}).get("rows", []):
        if r.get("ok") and r["share"] is not None:
            worst = max(abs(r["ffn_error"]), abs(r["group_error"]))
            out.append(target(f"sustained block time error at {r['label']} cores", worst,
                              COMPUTE_TARGET))  # fmt: skip
    for r in parts.get("tokens", {}).get("runs", []):
        out.append(
            target(
                f"fidelity median {r['scenario']} {r['algorithm']}",
                r.get("fidelity_median") if r["ok"] else None,
                FIDELITY_TARGET,
            )
        )
    return out


def _target_value(v: float | None) -> str:
    """A target's value or limit: a ratio as a percentage, a count (>= 1) as a number."""
    if v is None:
        return "-"
    return f"{v:g}" if float(v).is_integer() and v >= 1 else pct(v, 1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what it writes to DIR/testbed_fidelity.json."""
    parser = make_parser(__doc__.splitlines()[0], default_seeds=1, quick_seeds=1)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="parts to run (all)")  # fmt: skip
    parser.add_argument(
        "--image",
        default="edgepart:latest",
        help="the edgepart image (edgepart:latest; never pulled)",
    )
    parser.add_argument(
        "--build",
        action="store_true",
        help="build the image from this tree first (edgepart testbed build; offline)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help=f"iperf3 time per rate (s; {SECONDS:g}; quick {SECONDS_QUICK:g})",
    )
    parser.add_argument(
        "--sustain",
        type=float,
        default=None,
        help=f"sustained timing per block type (s; {SUSTAIN_S:g}; quick {SUSTAIN_S_QUICK:g})",
    )
    parser.add_argument(
        "--capacity-sizes",
        type=int,
        nargs="+",
        default=None,
        help=f"device counts ({CAPACITY_SIZES}; quick {CAPACITY_SIZES_QUICK})",
    )
    parser.add_argument(
        "--capacity-tokens",
        type=int,
        default=CAPACITY_TOKENS,
        help=f"tokens per capacity run ({CAPACITY_TOKENS})",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=None,
        help=f"longest wait for a quiet host before parts 2-4 (s; {SETTLE_S:g}; quick 0)",
    )
    parser.add_argument(
        "--quiet-load",
        type=float,
        default=QUIET_LOAD,
        help=f"1-min load average counted as quiet ({QUIET_LOAD:g})",
    )
    args = parse(parser, argv)
    seconds = args.seconds or (SECONDS_QUICK if args.quick else SECONDS)
    sustain = args.sustain or (SUSTAIN_S_QUICK if args.quick else SUSTAIN_S)
    sizes = args.capacity_sizes or (CAPACITY_SIZES_QUICK if args.quick else CAPACITY_SIZES)
    settle_s = args.settle if args.settle is not None else (0.0 if args.quick else SETTLE_S)
    if args.capacity_tokens < 2:
        parser.error("--capacity-tokens must be at least 2")
    prefix = f"tbf-{os.getpid()}"
    wanted = [p for p in PARTS if p in args.parts]
    started = time.perf_counter()
    load_start = load1()

    from emulator.images import docker_available

    parts: dict[str, Any] = {}
    image: dict[str, Any] = {"tag": args.image}
    problem = None
    if not docker_available():
        problem = "the Docker engine does not answer (compose/docker-setup.sh starts it)"
    else:
        try:
            if args.build:
                from emulator.images import build_image

                console.rule(f"building {args.image} from this tree")
                build_image(args.image, progress=lambda m: console.print(f"  {m}"))
            with Scratch(prefix + "-img") as scratch:
                image = image_info(args.image, scratch)
            if not image["code_matches_tree"]:
                # parts 3 and 4 render the containers' commands with this tree's code and
                # run them with the image's: a mismatch can fail every run (--build)
                console.print(
                    f"[yellow]the image's code differs from this tree in "
                    f"{len(image['differing_files'])} files: "
                    f"{', '.join(image['differing_files'][:6])}; --build rebuilds it[/]"
                )
        except Exception as exc:  # BenchError, ImageBuildError
            problem = f"image {args.image}: {error_text(exc)} (build it: edgepart testbed build)"
    image_ref = image.get("id", args.image)

    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "links": lambda: part_links(image_ref, prefix, args.quick, seconds),
        "compute": lambda: part_compute(image_ref, prefix, args.quick, sustain),
        "tokens": lambda: part_tokens(image_ref, args.out, args.quick),
        "capacity": lambda: part_capacity(
            image_ref, args.out, args.quick, args.capacity_tokens, sizes
        ),
    }
    for part in wanted:
        console.rule(f"part {PARTS.index(part) + 1}: {part}")
        if problem is not None:
            parts[part] = {"ok": False, "error": problem, "wall_s": 0.0}
            console.print(f"  [red]skipped[/]: {problem}")
            continue
        quiet = settle(settle_s, args.quiet_load) if part != "links" else None
        load_before = load1()
        t0 = time.perf_counter()
        try:
            result = {"ok": True, **runners[part]()}
        except Exception as exc:  # recorded; the next part runs
            result = {
                "ok": False,
                "error": error_text(exc),
                "traceback": "".join(traceback.format_exception(exc)),
            }
            console.print(f"  [red]part {part} failed[/]: {error_text(exc)}")
        items = result.get("runs", result.get("rows", []))
        result.update(
            failed_items=sum(1 for item in items if item.get("ok") is False),
            wall_s=time.perf_counter() - t0,
            load_average_1min={"start": load_before, "end": load1()},
            settle=quiet,
        )
        parts[part] = result
        console.print(f"  part {part}: {result['wall_s']:.0f} s")

    printers = {"links": print_links, "compute": print_compute, "tokens": print_tokens,
                "capacity": print_capacity}  # fmt: skip
    for part, result in parts.items():
        if result["ok"]:
            printers[part](result)
    targets = _targets(parts)
    if parts.get("capacity", {}).get("ok"):
        targets.append(target("device containers held", parts["capacity"]["max_devices"],
                              CAPACITY_TARGET, ">="))  # fmt: skip
    print_table(
        "Parts",
        ["part", "ok", "failed runs/rows", "wall s", "waited s", "load start", "load end",
         "error"],
        [
            (p, "[green]yes[/]" if r["ok"] else "[red]no[/]", r.get("failed_items", "-"),
             f"{r['wall_s']:.0f}", f"{(r.get('settle') or {}).get('waited_s', 0):.0f}",
             f"{r.get('load_average_1min', {}).get('start', 0):.1f}",
             f"{r.get('load_average_1min', {}).get('end', 0):.1f}",
             "" if r["ok"] else r["error"].splitlines()[0][:100])
            for p, r in parts.items()
        ],
        caption="ok: the part ran (a failed run or row inside it is counted, with its error "
        "in the JSON); wall s: the part itself; waited s: the wait for a quiet host before it",
    )  # fmt: skip
    if targets:
        print_targets(targets, fmt=_target_value)

    data = {
        "benchmark": NAME,
        "quick": args.quick,
        "environment": environment(),
        "setup": {
            "parts": wanted,
            "image": args.image,
            "model": MODEL,
            "rates_mbit": RATES_MBIT,
            "seconds_per_rate": seconds,
            "shares": SHARES_QUICK if args.quick else SHARES,
            "sustain_s": sustain,
            "scenarios": SCENARIOS_QUICK if args.quick else SCENARIOS,
            "algorithms": ALGORITHMS_QUICK if args.quick else ALGORITHMS,
            "tokens_override": TOKENS_QUICK if args.quick else None,
            "capacity_sizes": sizes,
            "capacity_tokens": args.capacity_tokens,
            "settle_s": settle_s,
            "quiet_load": args.quiet_load,
            "goodput": "iperf3 end.sum_received (receiver), vs rate x MSS / (MTU + 14)",
            "compute": "sustained wall time per block vs host profile block time / share",
            "fidelity": "median and p90 over tokens of |measured / predicted - 1|",
        },
        "image": image,
        "load_average_1min": {"start": load_start, "end": load1()},
        "wall_s": time.perf_counter() - started,
        "parts": parts,
        "targets": targets,
    }
    write_json(args.out, NAME, data)
    return data


if __name__ == "__main__":
    main()
