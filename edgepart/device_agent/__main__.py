"""``python -m edgepart.device_agent``: run one device agent (the same as ``edgepart agent``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgepart.control_plane.mqtt import load_auth
from edgepart.device_agent.agent import AgentConfig, run_agent

MIB = 2**20


def parser() -> argparse.ArgumentParser:
    """The agent's command-line options."""
    p = argparse.ArgumentParser(prog="edgepart agent", description=__doc__)
    p.add_argument("--name", required=True, help="device name (as in the scenario)")
    p.add_argument("--broker", required=True, help="MQTT broker host:port")
    p.add_argument(
        "--broker-auth",
        type=Path,
        help="file with this agent's broker credentials (JSON; default: anonymous)",
    )
    p.add_argument("--listen", default="127.0.0.1:0", help="data plane host:port (0: any)")
    p.add_argument("--advertise", help="host:port peers should connect to (default: bound)")
    p.add_argument("--testbed", default="default", help="topic namespace of the testbed")
    p.add_argument("--model", default="smollm2-135m", help="preset, .gguf file or HF directory")
    p.add_argument("--memory-mib", type=float, default=1024, help="memory budget (MiB)")
    p.add_argument("--cpu-share", type=float, help="cores this device is worth (paces compute)")
    p.add_argument("--gflops", type=float, help="nominal speed (GFLOP/s) reported before measuring")
    p.add_argument(
        "--time-dilation",
        type=float,
        default=1.0,
        metavar="K",
        help="the emulator runs the world K times slower than its scenario (K >= 1; give the "
        "share and speed already divided by K): waits on links and peers are K times longer",
    )
    p.add_argument("--profile", type=Path, help="host calibration JSON (block speeds)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    p.add_argument("--exit-with-parent", action="store_true", help="exit when the parent dies")
    p.add_argument(
        "--join-file",
        help="join only once this file exists (a device that joins later; the driver makes it)",
    )
    p.add_argument(
        "--dataplane-key",
        type=Path,
        help="file holding the testbed's data-plane secret (peers must prove they know it)",
    )
    cache = p.add_mutually_exclusive_group()
    cache.add_argument(
        "--weight-cache",
        type=Path,
        metavar="DIR",
        help="cache of dequantised block weights, shared by the agents of a host "
        "(default: the edgepart cache directory, $EDGEPART_CACHE or ~/.cache/edgepart)",
    )
    cache.add_argument(
        "--no-weight-cache",
        action="store_true",
        help="read every block from the checkpoint, cache nothing",
    )
    p.add_argument(
        "--shaping",
        choices=("software", "tc"),
        default="software",
        help="link bandwidth paced in the data plane, or by kernel htb (needs NET_ADMIN)",
    )
    return p


def config_from_args(argv: list[str] | None = None) -> AgentConfig:
    """Parse the command line into an AgentConfig (exits 2 on bad input)."""
    args = parser().parse_args(argv)
    profile = opened = None
    if args.profile is not None:
        from edgepart.llm.blocks import block_table
        from edgepart.llm.calibration import ComputeProfile
        from edgepart.llm.loader import open_model

        try:
            opened = open_model(args.model)
            table = block_table(opened.arch.spec)
            profile = ComputeProfile.load(args.profile, table)
        except (OSError, ValueError, KeyError) as exc:
            parser().error(f"--profile {args.profile}: {exc}")
    if args.cpu_share is not None and args.cpu_share <= 0:
        parser().error("--cpu-share must be > 0 cores")
    if not args.time_dilation >= 1.0:
        parser().error(f"--time-dilation must be at least 1, got {args.time_dilation}")
    try:
        broker_auth = load_auth(args.broker_auth)
    except ValueError as exc:
        parser().error(f"--broker-auth {exc}")
    key = None
    if args.dataplane_key is not None:
        try:
            key = args.dataplane_key.read_bytes().strip()
        except OSError as exc:
            parser().error(f"--dataplane-key {args.dataplane_key}: {exc.strerror}")
        if len(key) < 16:
            parser().error(f"--dataplane-key {args.dataplane_key}: shorter than 16 bytes")
    weight_cache = None
    if not args.no_weight_cache:
        from edgepart.llm.host_profile import default_cache_dir

        weight_cache = str(args.weight_cache or default_cache_dir())
    return AgentConfig(
        name=args.name,
        broker=args.broker,
        broker_auth=broker_auth,
        listen=args.listen,
        advertise=args.advertise,
        model=args.model,
        testbed=args.testbed,
        memory_bytes=int(args.memory_mib * MIB),
        cpu_share=args.cpu_share,
        nominal_gflops=args.gflops,
        profile=profile,
        metrics_port=args.metrics_port,
        exit_with_parent=args.exit_with_parent,
        shaping=args.shaping,
        dataplane_key=key,
        join_file=args.join_file,
        weight_cache=weight_cache,
        time_dilation=args.time_dilation,
        opened=opened,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the agent; the process exit code."""
    return run_agent(config_from_args(argv))


if __name__ == "__main__":
    sys.exit(main())
