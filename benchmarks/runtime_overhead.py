"""Runtime overhead: data-plane hop latency, per-token control cost and scaling over devices.

SmolLM2-135M (the ``smollm2-135m`` preset, float32) on this host, three measurements:

(a) Per-hop data-plane latency. Two ``edgepart.device_agent.dataplane.DataPlane`` instances in one
asyncio loop on loopback, unshaped. A sends B one ACTIVATION frame holding a SmolLM2
hidden state (1 x 576 float32, made with ``tensor_to_payload``); B's handler parses it
(``payload_to_tensor``), serialises it again and sends it back; A's handler parses the
reply. One round trip is timed (perf_counter) from before A serialises to after A has the
tensor back; one-way latency = round trip / 2, so it includes what an agent pays per hop:
serialising, framing, TCP on loopback, reading and parsing. After a warm-up of 50 round
trips, 2000 are timed (--quick: 200); median and p90 are reported. Target: median <= 0.5 ms.

(b) Per-token control overhead. ``run_local`` (real agent processes, embedded MQTT broker,
algorithm myopic) on a one-device scenario: compute_gflops 7 (a CPU share of
7 / reference_gflops of one core), 1024 MiB, so every block is on the source, for 24
tokens (--quick: 8). The controller measures each token from sending the decode command to
receiving its reply (``RunResult.per_token_s``). ``RunResult`` does not expose the source
agent's own decode time, but the agent puts it in its decode reply (``Reply.seconds``, from
receiving the command to having the token), on the MQTT bus: this script runs its own
broker and a listening client subscribed to the source's reply topic, so it can pair each
token's controller time with the agent's time and report the median of the difference,
which is the control plane's cost per token (MQTT command and reply through the broker,
the controller's prediction and re-planning checks). The fallback the brief asked for is
reported as well: the median measured per-token time of this run against the monolithic
in-process decode time per token (``edgepart.llm.runtime.monolithic`` greedy on 1 torch thread,
the same prompt and token count, per-step stamps as in engine_overhead.py, one warm-up
generation, then --mono-rounds timed ones) scaled by the device's CPU share
(expected = monolithic / share, share = 7 / ``host_profile(threads=1).reference_gflops``).
The two engines' greedy ids are compared.

(c) Scaling over devices. Tokens/s (tokens / sum of per-token times) of 1, 2 and 4 local
devices of equal speed, unshaped (links 10000 Mbit/s, 0 ms), 7 GFLOP/s in total (1 x 7,
2 x 3.5, 4 x 1.75), 1024 MiB each, algorithm myopic, against the monolithic tokens/s at
the same total CPU share: share_total / monolithic per-token time (the total share is
below one core, so a single thread can use it). The one-device run is (b)'s run.
(--quick: 1 and 2 devices.) Each run's peak memory per device shows how myopic spread the
blocks.

The machine's load is not controlled (other processes may share the CPU; the 1-minute
load average is recorded); every wait is bounded.

Run: ``.venv/bin/python -m benchmarks.runtime_overhead [--quick] [--rounds N]
[--tokens N] [--devices N ...] [--mono-rounds R] [--out DIR]``. Writes
DIR/runtime_overhead.json; agent logs go under DIR/local/.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    BenchParser,
    ByMode,
    console,
    environment,
    line_printer,
    load1,
    load_span,
    ms,
    num,
    print_table,
    print_targets,
    quiet_cancelled,
    stats,
    target,
    tokens_per_s,
    write_json,
)
from edgepart.emulator.scenario import MIB

NAME = "runtime_overhead"
MODEL = "smollm2-135m"
DEFAULTS = {
    "rounds": ByMode(2000, 200),
    "tokens": ByMode(24, 8),
    "devices": ByMode([1, 2, 4], [1, 2]),
    "mono_rounds": ByMode(2, 1),
}
WARMUP_ROUNDS = 50
TOTAL_GFLOPS = 7.0
MEMORY_MIB = 1024
PROMPT_TOKENS = 32
HOP_TARGET_S = 0.5e-3
FRAME_TIMEOUT_S = 10.0  # for one frame or one round trip
LISTENER_TIMEOUT_S = 10.0  # for the reply listener to subscribe, stop or catch up


def _p90(values: list[float]) -> float | None:
    return float(np.percentile(values, 90)) if values else None


# ---------------------------------------------------------------- (a) hop latency


async def _ping_pong(rounds: int, warmup: int, d_model: int) -> dict[str, Any]:
    from edgepart.device_agent.dataplane import DataPlane
    from edgepart.device_agent.wire import (
        Frame,
        Kind,
        encode_frame,
        payload_to_tensor,
        tensor_to_payload,
    )

    loop = asyncio.get_running_loop()
    loop.set_exception_handler(quiet_cancelled)
    hidden = torch.randn(1, d_model, dtype=torch.float32)
    pending: dict[int, asyncio.Future] = {}

    async def on_a(frame: Frame) -> None:
        fut = pending.pop(frame.token, None)
        if fut is not None and not fut.done():
            fut.set_result(payload_to_tensor(frame.payload))

    async def on_b(frame: Frame) -> None:
        back = tensor_to_payload(payload_to_tensor(frame.payload))
        reply = Frame(Kind.ACTIVATION, frame.epoch, frame.token, "pong", back)
        await b.send("a", reply, FRAME_TIMEOUT_S)

    a = DataPlane("a", on_a)
    b = DataPlane("b", on_b)
    rtts: list[float] = []
    try:
        a_host, a_port = await a.start("127.0.0.1", 0)
        b_host, b_port = await b.start("127.0.0.1", 0)
        a.set_endpoints({"b": f"{b_host}:{b_port}"})
        b.set_endpoints({"a": f"{a_host}:{a_port}"})
        for i in range(warmup + rounds):
            fut = loop.create_future()
            pending[i] = fut
            t0 = time.perf_counter()
            frame = Frame(Kind.ACTIVATION, 1, i, "ping", tensor_to_payload(hidden))
            await a.send("b", frame, FRAME_TIMEOUT_S)
            back = await asyncio.wait_for(fut, timeout=FRAME_TIMEOUT_S)
            rtt = time.perf_counter() - t0
            if i == 0 and not torch.equal(back, hidden):
                raise RuntimeError("the hidden state came back changed")
            if i >= warmup:
                rtts.append(rtt)
    finally:
        await a.close()
        await b.close()
    one_way = [r / 2 for r in rtts]
    frame_bytes = len(encode_frame(Frame(Kind.ACTIVATION, 1, 0, "ping", tensor_to_payload(hidden))))
    return {
        "rounds": rounds,
        "warmup": warmup,
        "frame_bytes": frame_bytes,
        "shape": list(hidden.shape),
        "round_trip_s": stats(rtts),
        "one_way_s": stats(one_way),
        "one_way_p90_s": _p90(one_way),
        "round_trip_p90_s": _p90(rtts),
    }


def hop_latency(rounds: int, warmup: int, d_model: int) -> dict[str, Any]:
    """Ping-pong of one hidden state between two data planes on loopback."""
    return asyncio.run(_ping_pong(rounds, warmup, d_model))


# ---------------------------------------------------------------- (b, c) local runs


def scenario_of(devices: int, tokens: int):
    """Equal devices worth TOTAL_GFLOPS together, unshaped links, no traces."""
    from edgepart.emulator.scenario import parse_scenario

    each = TOTAL_GFLOPS / devices
    data = {
        "version": 1,
        "name": f"overhead-{devices}dev",
        "model": {"preset": MODEL},
        "prompt_tokens": PROMPT_TOKENS,
        "generate_tokens": tokens,
        "replan_every": 8,
        "weights_from": "disk",
        "devices": [
            {"name": f"d{i}", "compute_gflops": each, "memory_mib": MEMORY_MIB, "source": i == 0}
            for i in range(devices)
        ],
        "links": {"default": {"bandwidth_mbit": 10000.0, "latency_ms": 0.0}},
        "traces": [],
    }
    return parse_scenario(data, f"<{data['name']}>")


class DecodeReplies:
    """An MQTT client, in its own thread, recording the seconds of one device's decode replies."""

    def __init__(self, broker: str, device: str) -> None:
        self.broker = broker
        self.device = device
        self.seconds: list[float] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> DecodeReplies:
        self._thread = threading.Thread(target=self._run, name="bench-replies", daemon=True)
        self._thread.start()
        if not self._ready.wait(LISTENER_TIMEOUT_S):
            raise RuntimeError(f"reply listener not subscribed within {LISTENER_TIMEOUT_S} s")
        if self._error is not None:
            raise RuntimeError(f"reply listener failed: {self._error!r}") from self._error
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(LISTENER_TIMEOUT_S)

    def wait_for(self, count: int, timeout_s: float) -> bool:
        """Wait until at least count replies were recorded (False on timeout)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if len(self.seconds) >= count:
                    return True
            if time.monotonic() > deadline or self._error is not None:
                return False
            time.sleep(0.01)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        import aiomqtt

        from edgepart.control_plane import protocol as proto

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        host, _, port = self.broker.rpartition(":")
        async with aiomqtt.Client(
            host,
            int(port),
            identifier=f"bench-replies-{os.getpid()}",
            timeout=10,
            socket_options=proto.SOCKET_OPTIONS,
        ) as client:
            # any testbed: the broker is this script's own
            await client.subscribe(proto.subscription("+", "reply", self.device), qos=1)
            self._ready.set()
            reader = asyncio.create_task(self._read(client))
            try:
                await self._stop.wait()
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)

    async def _read(self, client) -> None:
        from edgepart.control_plane import protocol as proto

        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            reply = proto.decode("reply", payload)
            if isinstance(reply, proto.Reply) and reply.ok and reply.token_id is not None:
                with self._lock:
                    self.seconds.append(reply.seconds)


def local_run(devices: int, tokens: int, work_dir: Path, listen: bool) -> dict[str, Any]:
    """One myopic run of the equal-device scenario; with listen, the source's decode times."""
    from edgepart.emulator.backends.local import run_local
    from edgepart.emulator.broker import EmbeddedBroker

    scenario = scenario_of(devices, tokens)
    broker = EmbeddedBroker()
    broker.start()
    agent_s: list[float] | None = None
    try:
        if listen:
            with DecodeReplies(broker.endpoint, scenario.source_name) as replies:
                run = run_local(
                    scenario, "myopic", broker=broker.endpoint, work_dir=work_dir,
                    status=line_printer("    "),
                )  # fmt: skip
                # the prefill's reply, then one per timed token
                expected = len(run.result.per_token_s) + 1
                if not replies.wait_for(expected, LISTENER_TIMEOUT_S):
                    console.print(
                        f"  [yellow]only {len(replies.seconds)} of {expected} decode replies "
                        "seen on the bus[/]"
                    )
                agent_s = list(replies.seconds)
        else:
            run = run_local(
                scenario, "myopic", broker=broker.endpoint, work_dir=work_dir,
                status=line_printer("    "),
            )  # fmt: skip
    finally:
        broker.stop()
    r = run.result
    return {
        "devices": devices,
        "compute_gflops_each": TOTAL_GFLOPS / devices,
        "tokens": len(r.per_token_s),
        "per_token_s": stats(r.per_token_s),
        "tokens_per_s": tokens_per_s(r.per_token_s),
        "total_s": r.total_s,
        "migrations": r.migrations,
        "peak_memory_mib": {k: v / MIB for k, v in r.peak_memory_bytes.items()},
        "cpu_share": run.shares,
        "share_total": sum(run.shares.values()),
        "isolation": run.isolation,
        "agent_decode_s": agent_s,
        "run": run.to_json(),
    }


def control_overhead(run: dict[str, Any]) -> dict[str, Any]:
    """Controller-measured time minus the source agent's own decode time, per token."""
    measured = run["run"]["per_token_s"]
    agent = run["agent_decode_s"] or []
    if len(agent) != len(measured) + 1:
        return {"available": False, "replies_seen": len(agent), "tokens": len(measured)}
    diffs = [m - a for m, a in zip(measured, agent[1:], strict=True)]
    return {
        "available": True,
        "agent_decode_s": stats(agent[1:]),
        "overhead_s": stats(diffs),
        "overhead_p90_s": _p90(diffs),
        "overhead_share_of_token": float(np.median(diffs)) / float(np.median(measured)),
    }


# ---------------------------------------------------------------- monolithic reference


def monolithic_reference(tokens: int, rounds: int) -> dict[str, Any]:
    """Per-step decode time of the in-process monolithic model at 1 torch thread."""
    from edgepart.emulator.job import prompt_ids
    from edgepart.llm.loader import open_model
    from edgepart.llm.runtime import monolithic

    om = open_model(MODEL)
    prompt = prompt_ids(scenario_of(1, tokens), om.tokenizer)
    model = monolithic(om.source, om.arch)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    steps: list[float] = []
    ids: list[int] = []
    try:
        with torch.no_grad():
            model.greedy(prompt, tokens)  # warm-up
            for _ in range(rounds):
                stamps: list[float] = []

                def stamp(_i: int, _m: object, stamps: list[float] = stamps) -> None:
                    stamps.append(time.perf_counter())

                ids = model.greedy(prompt, tokens, on_token=stamp)
                steps += [b - a for a, b in itertools.pairwise(stamps)]
    finally:
        torch.set_num_threads(previous)
    return {
        "threads": 1,
        "rounds": rounds,
        "tokens": tokens,
        "per_token_s": stats(steps),
        "token_ids": ids,
        "d_model": om.arch.spec.d_model,
    }


# ---------------------------------------------------------------- main


def make_parser() -> BenchParser:
    """The command line: the common options, round trips, tokens, devices, monolithic rounds."""
    parser = BenchParser(NAME, __doc__.splitlines()[0], DEFAULTS)
    parser.add_argument(
        "--rounds", type=int, default=None,
        help=f"timed ping-pong round trips ({DEFAULTS['rounds']})",
    )
    parser.add_argument(
        "--tokens", type=int, default=None,
        help=f"tokens per local run and monolithic round ({DEFAULTS['tokens']})",
    )
    parser.add_argument(
        "--devices", type=int, nargs="+", default=None,
        help=f"device counts for (c) ({DEFAULTS['devices']}); 1 is always run",
    )
    parser.add_argument(
        "--mono-rounds", type=int, default=None,
        help=f"timed monolithic generations ({DEFAULTS['mono_rounds']})",
    )
    return parser


def local_runs(counts: list[int], tokens: int, work_dir: Path) -> list[dict[str, Any]]:
    """local_run for each device count (the source's replies heard on the one-device run)."""
    runs: list[dict[str, Any]] = []
    for n in counts:
        console.rule(f"local backend, {n} device(s) x {TOTAL_GFLOPS / n:g} GFLOP/s, myopic")
        run = local_run(n, tokens, work_dir, listen=n == 1)
        console.print(
            f"  {run['tokens']} tokens, {num(run['tokens_per_s'], '.2f')} tokens/s, "
            f"median {1000 * run['per_token_s']['median']:.1f} ms"
        )
        runs.append(run)
    return runs


def against_monolithic(one: dict[str, Any], mono_step: float, share: float) -> dict[str, Any]:
    """The one-device run's median token time against the monolithic step / its CPU share."""
    expected = mono_step / share
    measured = one["per_token_s"]["median"]
    return {
        "share": share,
        "monolithic_per_token_s": mono_step,
        "expected_per_token_s": expected,
        "measured_per_token_s": measured,
        "difference_s": measured - expected,
        "ratio": measured / expected,
    }


def scaling_of(runs: list[dict[str, Any]], mono_step: float, share: float) -> list[dict]:
    """Each run's tokens/s against the monolithic model's at the same total share."""
    mono_tps = share / mono_step  # share: equal to sum(run["cpu_share"].values()) in each run
    return [
        {
            "devices": run["devices"],
            "compute_gflops_each": run["compute_gflops_each"],
            "share_total": share,
            "tokens_per_s": run["tokens_per_s"],
            "monolithic_tokens_per_s": mono_tps,
            "efficiency": run["tokens_per_s"] / mono_tps if run["tokens_per_s"] else None,
            "peak_memory_mib": run["peak_memory_mib"],
        }
        for run in runs
    ]


def print_hop(hop: dict[str, Any]) -> None:
    """(a): one-way and round-trip latency statistics."""
    print_table(
        f"(a) data-plane hop on loopback: {hop['shape']} float32, {hop['frame_bytes']} B frame, "
        f"{hop['rounds']} round trips",
        ["measure", "median", "p90", "p95", "min", "max"],
        [
            (label, *(f"{1e3 * v:.3f} ms"
                      for v in (s["median"], p90, s["p95"], s["min"], s["max"])))
            for label, s, p90 in (
                ("one-way (round trip / 2)", hop["one_way_s"], hop["one_way_p90_s"]),
                ("round trip", hop["round_trip_s"], hop["round_trip_p90_s"]),
            )
        ],
        caption="includes serialising, framing, TCP on loopback, reading and parsing",
    )  # fmt: skip


def print_control(one: dict[str, Any], control: dict[str, Any], mono: dict[str, Any],
                  fallback: dict[str, Any], ids_identical: bool) -> None:  # fmt: skip
    """(b): the control plane's cost per token, and the run against the monolithic model."""
    rows = [
        ("controller per-token time (median)", ms(one["per_token_s"]["median"])),
    ]
    if control["available"]:
        rows += [
            ("source agent's own decode time (median)", ms(control["agent_decode_s"]["median"])),
            (
                "control overhead per token (median)",
                f"{1e3 * control['overhead_s']['median']:.2f} ms",
            ),
            ("control overhead per token (p90)", f"{1e3 * control['overhead_p90_s']:.2f} ms"),
            ("overhead / per-token time", f"{100 * control['overhead_share_of_token']:.1f}%"),
        ]
    else:
        rows.append(("source agent's decode time", "not seen on the bus"))
    rows += [
        (f"monolithic step, 1 thread (median of {mono['per_token_s']['count']})",
         ms(fallback["monolithic_per_token_s"])),
        (f"expected at share {fallback['share']:.3f} (monolithic / share)",
         ms(fallback["expected_per_token_s"])),
        ("measured - expected", f"{1e3 * fallback['difference_s']:.1f} ms"),
        ("measured / expected", f"{fallback['ratio']:.3f}x"),
        ("greedy ids equal to monolithic", "yes" if ids_identical else "[red]NO[/]"),
    ]  # fmt: skip
    print_table(
        f"(b) per-token control overhead: 1 device x {TOTAL_GFLOPS:g} GFLOP/s, "
        f"{one['tokens']} tokens, local backend ({one['isolation']})",
        ["measure", "value"],
        rows,
    )


def print_scaling(scaling: list[dict[str, Any]], mono_step: float, reference_gflops: float
                  ) -> None:  # fmt: skip
    """(c): tokens/s per device count against the monolithic model at the same share."""
    print_table(
        f"(c) tokens/s over devices: {TOTAL_GFLOPS:g} GFLOP/s in total, unshaped, myopic",
        ["devices", "GFLOP/s each", "tokens/s", "monolithic at same share", "efficiency",
         "peak MiB per device"],
        [
            (
                s["devices"],
                f"{s['compute_gflops_each']:g}",
                num(s["tokens_per_s"], ".2f"),
                num(s["monolithic_tokens_per_s"], ".2f"),
                "-" if s["efficiency"] is None else f"{100 * s['efficiency']:.0f}%",
                " ".join(f"{d} {v:.0f}" for d, v in s["peak_memory_mib"].items()),
            )
            for s in scaling
        ],
        caption=f"monolithic tokens/s at share = share / monolithic step ({ms(mono_step)} at "
        f"1 thread); share = {TOTAL_GFLOPS:g} / {reference_gflops:.2f} GFLOP/s per core",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what it writes to DIR/runtime_overhead.json."""
    parser = make_parser()
    args = parser.parse(argv)
    rounds, tokens, mono_rounds = args.rounds, args.tokens, args.mono_rounds
    counts = sorted({1, *args.devices})
    if tokens < 3:
        parser.error("--tokens must be at least 3 (two decode steps after the prefill)")
    if any(n < 1 for n in counts):
        parser.error("--devices must be positive")
    load_start = load1()

    from edgepart.llm.host_profile import host_profile

    console.rule(f"monolithic {MODEL}, 1 thread, {tokens} tokens")
    reference_gflops = host_profile(MODEL, threads=1).reference_gflops
    mono = monolithic_reference(tokens, mono_rounds)
    mono_step = mono["per_token_s"]["median"]
    console.print(f"  median decode step {1000 * mono_step:.1f} ms")

    console.rule(f"data-plane ping-pong, {rounds} round trips")
    hop = hop_latency(rounds, WARMUP_ROUNDS, mono["d_model"])
    console.print(f"  median one-way {1e3 * hop['one_way_s']['median']:.3f} ms")

    runs = local_runs(counts, tokens, args.out / "local")
    one = runs[0]
    control = control_overhead(one)
    share = TOTAL_GFLOPS / reference_gflops
    fallback = against_monolithic(one, mono_step, share)
    ids_identical = one["run"]["output_token_ids"] == mono["token_ids"]
    scaling = scaling_of(runs, mono_step, share)
    targets = [target("one-way hop latency, median", hop["one_way_s"]["median"], HOP_TARGET_S)]

    print_hop(hop)
    print_control(one, control, mono, fallback, ids_identical)
    print_scaling(scaling, mono_step, reference_gflops)
    print_targets(targets, fmt=lambda v: "-" if v is None else f"{1e3 * v:.3f} ms")

    data = {
        "benchmark": NAME,
        "quick": args.quick,
        "environment": environment(),
        "setup": {
            "model": MODEL,
            "dtype": "float32",
            "prompt_tokens": PROMPT_TOKENS,
            "tokens": tokens,
            "devices": counts,
            "total_gflops": TOTAL_GFLOPS,
            "memory_mib": MEMORY_MIB,
            "algorithm": "myopic",
            "reference_gflops": reference_gflops,
            "ping_pong_rounds": rounds,
            "ping_pong_warmup": WARMUP_ROUNDS,
            "monolithic_rounds": mono_rounds,
        },
        "load_average_1min": load_span(load_start),
        "hop": hop,
        "control": control,
        "control_fallback": fallback,
        "token_ids_identical": ids_identical,
        "monolithic": mono,
        "scaling": scaling,
        "runs": runs,
        "targets": targets,
    }
    write_json(args.out, NAME, data)
    return data


if __name__ == "__main__":
    main()
