"""Seeded random scenarios after the paper's simulator (Kafetzis et al., arXiv 2505.02533).

Devices come in three tiers, 10% cloud / 30% regional / 60% edge (at least one cloud
and one regional device; the first cloud device is the source), with log-normal memory
and compute per tier (`TierProfile`). Networks are a full mesh with uniform per-pair
bandwidth, or one of the simulator's topologies (`edge_cluster`, `distributed_edge`,
`hybrid`); a scenario joins every device pair, so a multi-hop topology is turned into
all-pairs links along the fewest-hop path (ties: widest bottleneck, then lowest latency):
the pair gets that path's bottleneck bandwidth and the sum of its per-hop latencies.

Sizes in GB are GiB here: memory_mib = GB * 1024.

Every generated scenario goes through `parse_scenario`. When the model does not fit
(all devices' memory at the last token, or the source's embedding and LM head), every
device's memory is scaled up by one factor so that it fits with 5% headroom, and the
factor is recorded in the scenario's name (``...-memfit1.37``); pass ``fit="raise"`` to
get a ValueError instead.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from pydantic import TypeAdapter

from edgepart.emulator.scenario import MIB, ModelSource, Scenario, parse_scenario
from edgepart.llm.blocks import block_table

Tier = Literal["cloud", "regional", "edge"]
TIERS: tuple[Tier, ...] = ("cloud", "regional", "edge")
GBIT = 1000.0  # Mbit/s per Gbit/s
FIT_HEADROOM = 1.05


@dataclass(frozen=True)
class TierProfile:
    """How device resources are drawn, per tier (cloud, regional, edge).

    Memory: lognormal(memory_mu, memory_sigma) GB times the tier factor, clipped to
    memory_clip_gb, then times memory_scale (after clipping, so a small scale makes
    memory-tight instances). Compute: lognormal around the tier median (GFLOP/s),
    clipped to compute_clip_gflops.
    """

    cloud_fraction: float = 0.1
    regional_fraction: float = 0.3
    memory_mu: float = 2.0  # ln GB: median e^2 = 7.4 GB
    memory_sigma: float = 0.5
    memory_factor: tuple[float, float, float] = (4.0, 2.0, 1.0)
    memory_clip_gb: tuple[float, float] = (2.0, 64.0)
    memory_scale: float = 1.0
    compute_median_gflops: tuple[float, float, float] = (40.0, 20.0, 10.0)
    compute_sigma: float = 0.5
    compute_clip_gflops: tuple[float, float] = (2.0, 400.0)


@dataclass(frozen=True)
class LatencyProfile:
    """Per-hop latency (ms): fixed on core/backbone links, uniform on edge links."""

    core_ms: float = 0.1
    edge_ms: tuple[float, float] = (0.2, 2.0)


@dataclass(frozen=True)
class Link:
    """One physical link of a topology (undirected)."""

    a: int
    b: int
    bandwidth_mbit: float
    latency_ms: float


@dataclass(frozen=True)
class Topology:
    """A network of n nodes and its physical links; tiers, if the topology fixes them."""

    name: str
    n: int
    links: tuple[Link, ...]
    tiers: tuple[Tier, ...] | None = field(default=None)


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


# ---------------------------------------------------------------- devices


def tier_counts(n: int, profile: TierProfile = TierProfile()) -> tuple[int, int, int]:
    """(cloud, regional, edge) device counts for n devices, as the paper's simulator has it."""
    if n < 1:
        raise ValueError(f"need at least one device, got {n}")
    cloud = min(n, max(1, int(n * profile.cloud_fraction)))
    regional = min(n - cloud, max(1, int(n * profile.regional_fraction)))
    return cloud, regional, n - cloud - regional


def device_tiers(n: int, profile: TierProfile = TierProfile()) -> tuple[Tier, ...]:
    """Tier of each of n devices: cloud first, then regional, then edge."""
    counts = tier_counts(n, profile)
    return tuple(t for t, c in zip(TIERS, counts, strict=True) for _ in range(c))


@dataclass(frozen=True)
class DeviceDraw:
    """One generated device: tier, compute (GFLOP/s) and memory (MiB)."""

    name: str
    tier: Tier
    compute_gflops: float
    memory_mib: int


def sample_devices(
    rng: np.random.Generator | int | None,
    tiers: Sequence[Tier],
    profile: TierProfile = TierProfile(),
) -> list[DeviceDraw]:
    """Draw memory (MiB) and compute (GFLOP/s) for devices of the given tiers, named d0, d1..."""
    g = _rng(rng)
    k = np.array([TIERS.index(t) for t in tiers])
    mem_gb = g.lognormal(profile.memory_mu, profile.memory_sigma, len(k))
    mem_gb = np.clip(mem_gb * np.asarray(profile.memory_factor)[k], *profile.memory_clip_gb)
    mem_mib = np.maximum(1, np.round(mem_gb * profile.memory_scale * 1024)).astype(int)
    medians = np.asarray(profile.compute_median_gflops)[k]
    gflops = np.clip(
        g.lognormal(np.log(medians), profile.compute_sigma), *profile.compute_clip_gflops
    )
    return [
        DeviceDraw(f"d{i}", t, round(float(c), 2), int(m))
        for i, (t, c, m) in enumerate(zip(tiers, gflops, mem_mib, strict=True))
    ]


# ---------------------------------------------------------------- topologies


def _uniform_links(
    g: np.random.Generator,
    pairs: Sequence[tuple[int, int]],
    gbit: tuple[float, float],
    latency: LatencyProfile,
    core: bool,
) -> list[Link]:
    out = []
    for a, b in pairs:
        bw = float(g.uniform(*gbit)) * GBIT
        lat = latency.core_ms if core else float(g.uniform(*latency.edge_ms))
        out.append(Link(a, b, round(bw, 1), round(lat, 3)))
    return out


def full_mesh(
    n: int,
    bw_range_mbit: tuple[float, float] = (100.0, 1000.0),
    latency_range_ms: tuple[float, float] = (0.2, 2.0),
    rng: np.random.Generator | int | None = 0,
) -> Topology:
    """n nodes, every pair linked at uniform random bandwidth (Mbit/s) and latency (ms)."""
    g = _rng(rng)
    links = []
    for a in range(n):
        for b in range(a + 1, n):
            bw = float(g.uniform(*bw_range_mbit))
            lat = float(g.uniform(*latency_range_ms))
            links.append(Link(a, b, round(bw, 1), round(lat, 3)))
    return Topology("full-mesh", n, tuple(links))


def edge_cluster(
    rng: np.random.Generator | int | None = 0, latency: LatencyProfile = LatencyProfile()
) -> Topology:
    """8 nodes: core 0-1,2,3 at 5-10 Gbit/s; edge links to 4..7 at 1-5 Gbit/s."""
    g = _rng(rng)
    core = _uniform_links(g, [(0, 1), (0, 2), (0, 3)], (5.0, 10.0), latency, core=True)
    edge_pairs = [(1, 4), (1, 5), (2, 5), (2, 6), (3, 6), (3, 7)]
    edge = _uniform_links(g, edge_pairs, (1.0, 5.0), latency, core=False)
    return Topology("edge-cluster", 8, tuple(core + edge))


DISTRIBUTED_EDGE_BACKBONE = (
    (0, 4), (4, 8), (8, 12), (0, 8), (4, 12),
    (1, 5), (5, 9), (9, 13), (2, 6), (6, 10), (10, 14), (0, 12),
)


def distributed_edge(
    rng: np.random.Generator | int | None = 0, latency: LatencyProfile = LatencyProfile()
) -> Topology:
    """16 nodes in 4 clusters of 4: mesh inside at 0.5-1 Gbit/s, 12 links between at 0.1-0.5."""
    g = _rng(rng)
    inside = [
        (c + i, c + j) for c in range(0, 16, 4) for i in range(4) for j in range(i + 1, 4)
    ]
    links = _uniform_links(g, inside, (0.5, 1.0), latency, core=False)
    # Slow long-haul links between sites: edge-class (random) latency, not core.
    links += _uniform_links(g, DISTRIBUTED_EDGE_BACKBONE, (0.1, 0.5), latency, core=False)
    return Topology("distributed-edge", 16, tuple(links))


HYBRID_REGIONAL_TO_CLOUD = {4: 0, 5: 0, 6: 1, 7: 1, 8: 2, 9: 2, 10: 3, 11: 3}
HYBRID_EDGE_TO_REGIONAL = {
    4: (12, 13, 14), 5: (15, 16, 17), 6: (18, 19), 7: (20, 21), 8: (22, 23),
    9: (), 10: (), 11: (),
}


def hybrid(
    rng: np.random.Generator | int | None = 0, latency: LatencyProfile = LatencyProfile()
) -> Topology:
    """24 nodes: cloud 0-3 mesh at 20-40 Gbit/s, regional 4-11 up at 5-10, edge 12-23 at 0.1-1."""
    g = _rng(rng)
    cloud = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    links = _uniform_links(g, cloud, (20.0, 40.0), latency, core=True)
    up = [(c, r) for r, c in HYBRID_REGIONAL_TO_CLOUD.items()]
    links += _uniform_links(g, up, (5.0, 10.0), latency, core=True)
    down = [(r, e) for r, es in HYBRID_EDGE_TO_REGIONAL.items() for e in es]
    links += _uniform_links(g, down, (0.1, 1.0), latency, core=False)
    tiers: tuple[Tier, ...] = ("cloud",) * 4 + ("regional",) * 8 + ("edge",) * 12
    return Topology("hybrid", 24, tuple(links), tiers=tiers)


TOPOLOGIES = {"edge-cluster": edge_cluster, "distributed-edge": distributed_edge, "hybrid": hybrid}


def is_connected(topo: Topology) -> bool:
    """Whether every node reaches every other over the topology's links."""
    adj = _adjacency(topo)
    seen = {0}
    todo = deque([0])
    while todo:
        u = todo.popleft()
        for v in adj[u]:
            if v not in seen:
                seen.add(v)
                todo.append(v)
    return len(seen) == topo.n


def _adjacency(topo: Topology) -> list[dict[int, Link]]:
    adj: list[dict[int, Link]] = [{} for _ in range(topo.n)]
    for link in topo.links:
        if link.a == link.b or not (0 <= link.a < topo.n and 0 <= link.b < topo.n):
            raise ValueError(f"bad link {link.a}-{link.b} in a {topo.n}-node topology")
        adj[link.a][link.b] = link
        adj[link.b][link.a] = link
    return adj


def pairwise_links(topo: Topology) -> dict[tuple[int, int], tuple[float, float]]:
    """(bandwidth Mbit/s, latency ms) for every pair a < b along its chosen path.

    The path has the fewest hops; among those the widest bottleneck, then the lowest
    summed latency. Raises ValueError if the topology is not connected.
    """
    adj = _adjacency(topo)
    out: dict[tuple[int, int], tuple[float, float]] = {}
    for s in range(topo.n):
        hops = _hops_from(adj, s)
        if len(hops) < topo.n:
            missing = sorted(set(range(topo.n)) - set(hops))
            raise ValueError(f"{topo.name}: node {s} cannot reach {missing}")
        order = sorted(hops, key=hops.__getitem__)
        # Widest bottleneck over shortest-hop paths: a max-min DP along the BFS layers.
        width = {s: math.inf}
        for v in order[1:]:
            width[v] = max(
                min(width[u], link.bandwidth_mbit)
                for u, link in adj[v].items()
                if hops[u] == hops[v] - 1
            )
        for t in order:
            if t <= s:
                continue
            if t in adj[s]:  # one hop: the direct link is the only fewest-hop path
                out[(s, t)] = (adj[s][t].bandwidth_mbit, adj[s][t].latency_ms)
                continue
            # Lowest latency over shortest-hop paths whose links all reach that width.
            floor = width[t]
            lat = {s: 0.0}
            for v in order[1:]:
                if hops[v] > hops[t]:
                    break
                cands = [
                    lat[u] + link.latency_ms
                    for u, link in adj[v].items()
                    if hops[u] == hops[v] - 1 and u in lat and link.bandwidth_mbit >= floor
                ]
                if cands:
                    lat[v] = min(cands)
            out[(s, t)] = (floor, round(lat[t], 6))
    return out


def _hops_from(adj: list[dict[int, Link]], s: int) -> dict[int, int]:
    hops = {s: 0}
    todo = deque([s])
    while todo:
        u = todo.popleft()
        for v in adj[u]:
            if v not in hops:
                hops[v] = hops[u] + 1
                todo.append(v)
    return hops


# ---------------------------------------------------------------- scenarios


def random_scenario(
    seed: int,
    devices: int | None = None,
    topology: str | Topology | None = None,
    model: str | Mapping[str, Any] = "paper-small",
    prompt_tokens: int = 32,
    generate_tokens: int = 64,
    replan_every: int = 8,
    bandwidth_mbit: tuple[float, float] = (100.0, 1000.0),
    latency_ms: tuple[float, float] = (0.2, 2.0),
    memory_scale: float = 1.0,
    traces: Literal["none", "load-and-bandwidth"] = "none",
    trace_events: int | None = None,
    weights_from: Literal["disk", "peer"] = "disk",
    profile: TierProfile = TierProfile(),
    memory_drop: bool = False,
    fit: Literal["scale", "raise"] = "scale",
    name: str | None = None,
) -> Scenario:
    """A validated random scenario, reproducible from its seed.

    Give `devices` (a full mesh with bandwidth_mbit and latency_ms ranges) or `topology`
    (a name in TOPOLOGIES or a Topology; its tiers, if fixed, replace the 10/30/60 split).
    Devices are d0, d1, ...; d0 (the first cloud device) is the source.
    `model` is a preset name or a scenario `model:` mapping. memory_scale multiplies every
    device's memory (on top of profile.memory_scale). traces="load-and-bandwidth" adds
    ``trace_events`` (default max(2, generate_tokens // 16)) events at random tokens, each a
    background load U(0, 0.6) on a random device or a bandwidth drop x U(0.1, 0.5) on a
    random pair; memory_drop
    adds one memory drop on a non-source device, kept small enough that the model still
    fits (skipped when there is no slack).
    """
    g = np.random.default_rng(seed)
    topo = _pick_topology(g, devices, topology, bandwidth_mbit, latency_ms)
    n = topo.n
    tiers = topo.tiers or device_tiers(n, profile)
    scaled = replace(profile, memory_scale=profile.memory_scale * memory_scale)
    draws = sample_devices(g, tiers, scaled)
    links = pairwise_links(topo)
    model_map: dict[str, Any] = {"preset": model} if isinstance(model, str) else dict(model)
    scenario_name = name or f"random-{topo.name}-n{n}-s{seed}"

    data: dict[str, Any] = {
        "version": 1,
        "name": scenario_name,
        "model": model_map,
        "prompt_tokens": prompt_tokens,
        "generate_tokens": generate_tokens,
        "replan_every": replan_every,
        "weights_from": weights_from,
        "devices": [
            {"name": d.name, "compute_gflops": d.compute_gflops, "memory_mib": d.memory_mib}
            | ({"source": True} if i == 0 else {})
            for i, d in enumerate(draws)
        ],
        "links": {
            "pairs": [
                {"a": f"d{a}", "b": f"d{b}", "bandwidth_mbit": bw, "latency_ms": lat}
                for (a, b), (bw, lat) in sorted(links.items())
            ]
        },
        "traces": [],
    }
    mem, need = _fit_memory(data, fit)

    if traces == "load-and-bandwidth":
        events = max(2, generate_tokens // 16) if trace_events is None else trace_events
        if events < 0:
            raise ValueError(f"trace_events must be >= 0, got {events}")
        data["traces"] = _load_and_bandwidth_traces(g, n, generate_tokens, links, events)
    elif traces != "none":
        raise ValueError(f"traces must be 'none' or 'load-and-bandwidth', got {traces!r}")
    if memory_drop and n > 1:
        drop = _memory_drop(g, mem, need, generate_tokens)
        if drop is not None:
            data["traces"].append(drop)
            data["traces"].sort(key=lambda t: t["at_token"])
    return parse_scenario(data, f"<random seed={seed}>")


def _fit_memory(data: dict[str, Any], fit: Literal["scale", "raise"]) -> tuple[list[int], float]:
    """Make a scenario's devices (``data``, changed in place) hold its model with
    FIT_HEADROOM: every device's memory scaled up (and ``-memfit<factor>`` added to the
    name), or with ``fit="raise"`` a ValueError. The devices' memory (MiB each) and what
    the model needs at the final context (bytes)."""
    spec = TypeAdapter(ModelSource).validate_python(data["model"]).spec()
    table = block_table(spec)
    need = float(table.memory_bytes(data["prompt_tokens"] + data["generate_tokens"]).sum())
    need += table.source_weight_bytes
    mem = [d["memory_mib"] for d in data["devices"]]
    factor = max(
        need * FIT_HEADROOM / (sum(mem) * MIB),
        table.source_weight_bytes * FIT_HEADROOM / (mem[0] * MIB),
        1.0,
    )
    if factor > 1.0:
        if fit == "raise":
            raise ValueError(
                f"{data['name']}: {spec.name} needs {need / MIB:.1f} MiB but the devices have "
                f"{sum(mem)} MiB (source {mem[0]} MiB for {table.source_weight_bytes / MIB:.1f})"
            )
        mem = [math.ceil(m * factor) for m in mem]
        for d, m in zip(data["devices"], mem, strict=True):
            d["memory_mib"] = m
        data["name"] = f"{data['name']}-memfit{factor:.2f}"
    return mem, need


def _pick_topology(
    g: np.random.Generator,
    devices: int | None,
    topology: str | Topology | None,
    bandwidth_mbit: tuple[float, float],
    latency_ms: tuple[float, float],
) -> Topology:
    if topology is None or topology == "full-mesh":
        if devices is None:
            raise ValueError("give devices (a full mesh) or a topology")
        return full_mesh(devices, bandwidth_mbit, latency_ms, g)
    if isinstance(topology, str):
        try:
            topo = TOPOLOGIES[topology](g)
        except KeyError:
            known = ", ".join(["full-mesh", *TOPOLOGIES])
            raise ValueError(f"unknown topology {topology!r}; known: {known}") from None
    else:
        topo = topology
    if devices is not None and devices != topo.n:
        raise ValueError(f"topology {topo.name} has {topo.n} devices, not {devices}")
    return topo


def _load_and_bandwidth_traces(
    g: np.random.Generator,
    n: int,
    generate_tokens: int,
    links: dict[tuple[int, int], tuple[float, float]],
    events: int,
) -> list[dict[str, Any]]:
    tokens = np.sort(g.integers(0, generate_tokens, events))
    pairs = sorted(links)
    bandwidth = {p: links[p][0] for p in pairs}
    out: list[dict[str, Any]] = []
    for t in tokens:
        if n < 2 or g.random() < 0.5:
            dev = int(g.integers(0, n))
            load = round(float(g.uniform(0.0, 0.6)), 3)
            out.append({"at_token": int(t), "device": f"d{dev}", "background_load": load})
        else:
            a, b = pairs[int(g.integers(0, len(pairs)))]
            # Drops compound: a second drop on a link starts from the first one's value.
            bandwidth[(a, b)] = max(0.1, round(bandwidth[(a, b)] * g.uniform(0.1, 0.5), 1))
            out.append(
                {"at_token": int(t), "link": [f"d{a}", f"d{b}"],
                 "bandwidth_mbit": bandwidth[(a, b)]}
            )
    return out


def _memory_drop(
    g: np.random.Generator, mem: list[int], need_bytes: float, generate_tokens: int
) -> dict[str, Any] | None:
    dev = int(g.integers(1, len(mem)))
    token = int(g.integers(0, generate_tokens))
    wanted = mem[dev] * float(g.uniform(0.3, 0.7))
    slack = sum(mem) - need_bytes * FIT_HEADROOM / MIB
    new = math.ceil(max(wanted, mem[dev] - slack))
    if new >= mem[dev]:
        return None
    return {"at_token": token, "device": f"d{dev}", "memory_mib": new}
