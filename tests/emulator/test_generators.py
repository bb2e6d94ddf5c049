"""Seeded random scenarios: tiers, resources, topologies, path links and validity."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import yaml

from edgepart.emulator.generators import (
    DISTRIBUTED_EDGE_BACKBONE,
    LatencyProfile,
    Link,
    TierProfile,
    Topology,
    device_tiers,
    distributed_edge,
    edge_cluster,
    full_mesh,
    hybrid,
    is_connected,
    pairwise_links,
    random_scenario,
    sample_devices,
    tier_counts,
)
from edgepart.emulator.scenario import (
    MIB,
    LinkTrace,
    LoadTrace,
    MemoryTrace,
    load_scenario,
    parse_scenario,
)
from edgepart.llm.blocks import block_table


@pytest.mark.parametrize(
    ("n", "counts"),
    [(1, (1, 0, 0)), (2, (1, 1, 0)), (3, (1, 1, 1)), (5, (1, 1, 3)), (8, (1, 2, 5)),
     (24, (2, 7, 15)), (48, (4, 14, 30))],
)
def test_tier_counts(n, counts):
    assert tier_counts(n) == counts
    tiers = device_tiers(n)
    assert len(tiers) == n
    assert tiers[0] == "cloud"  # the source is the first cloud device
    assert tiers == tuple(sorted(tiers, key=["cloud", "regional", "edge"].index))


def test_tier_counts_rejects_no_devices():
    with pytest.raises(ValueError):
        tier_counts(0)


def test_sampled_resources_follow_the_profile():
    profile = TierProfile()
    edge = sample_devices(0, ["edge"] * 4000, profile)
    mem_gb = np.array([d.memory_mib for d in edge]) / 1024
    gflops = np.array([d.compute_gflops for d in edge])
    assert mem_gb.min() >= 2.0 - 1e-3 and mem_gb.max() <= 64.0 + 1e-3
    assert np.median(mem_gb) == pytest.approx(np.exp(2.0), rel=0.05)
    assert np.median(gflops) == pytest.approx(10.0, rel=0.05)
    assert gflops.min() >= 2.0 and gflops.max() <= 400.0
    cloud = sample_devices(0, ["cloud"] * 4000, profile)
    assert np.median([d.compute_gflops for d in cloud]) == pytest.approx(40.0, rel=0.05)
    # Memory factor x4 for cloud, before the clip at 64 GB.
    assert np.median([d.memory_mib for d in cloud]) / 1024 == pytest.approx(
        4 * np.exp(2.0), rel=0.05)


def test_tier_profile_makes_memory_tight_instances():
    tight = TierProfile(memory_scale=0.01, memory_clip_gb=(1.0, 4.0))
    devs = sample_devices(3, ["cloud", "regional", "edge", "edge"], tight)
    assert all(d.memory_mib <= round(4.0 * 0.01 * 1024) for d in devs)
    assert [d.name for d in devs] == ["d0", "d1", "d2", "d3"]


def test_sampling_is_deterministic_per_seed():
    tiers = device_tiers(8)
    assert sample_devices(7, tiers) == sample_devices(7, tiers)
    assert sample_devices(7, tiers) != sample_devices(8, tiers)


# ---------------------------------------------------------------- topologies


def test_full_mesh_links_every_pair_in_range():
    topo = full_mesh(6, (200.0, 300.0), (1.0, 2.0), rng=1)
    assert len(topo.links) == 15
    assert all(200 <= link.bandwidth_mbit <= 300 for link in topo.links)
    assert all(1.0 <= link.latency_ms <= 2.0 for link in topo.links)
    assert is_connected(topo)


def test_edge_cluster_shape():
    topo = edge_cluster(1)
    assert topo.n == 8 and len(topo.links) == 9 and is_connected(topo)
    core = [link for link in topo.links if link.a == 0]
    assert {(link.a, link.b) for link in core} == {(0, 1), (0, 2), (0, 3)}
    assert all(5000 <= link.bandwidth_mbit <= 10000 and link.latency_ms == 0.1 for link in core)
    edge = [link for link in topo.links if link.a != 0]
    assert all(1000 <= link.bandwidth_mbit <= 5000 for link in edge)
    assert all(0.2 <= link.latency_ms <= 2.0 for link in edge)


def test_distributed_edge_shape():
    topo = distributed_edge(1)
    assert topo.n == 16 and is_connected(topo)
    assert len(topo.links) == 4 * 6 + len(DISTRIBUTED_EDGE_BACKBONE) == 36
    inside = [link for link in topo.links if link.a // 4 == link.b // 4]
    between = [link for link in topo.links if link.a // 4 != link.b // 4]
    assert len(inside) == 24 and len(between) == 12
    assert all(500 <= link.bandwidth_mbit <= 1000 for link in inside)
    assert all(100 <= link.bandwidth_mbit <= 500 for link in between)


def test_hybrid_shape_and_tiers():
    topo = hybrid(1)
    assert topo.n == 24 and len(topo.links) == 6 + 8 + 12 and is_connected(topo)
    assert topo.tiers is not None
    assert topo.tiers.count("cloud") == 4 and topo.tiers.count("regional") == 8
    degree = np.zeros(24, dtype=int)
    for link in topo.links:
        degree[link.a] += 1
        degree[link.b] += 1
    assert list(degree[9:12]) == [1, 1, 1]  # regionals 9-11 serve no edge node
    assert all(degree[12:] == 1)


def test_custom_latency_profile():
    topo = edge_cluster(0, LatencyProfile(core_ms=0.5, edge_ms=(3.0, 3.0)))
    assert {link.latency_ms for link in topo.links} == {0.5, 3.0}


def test_pairwise_links_fewest_hops_then_widest_then_fastest():
    topo = Topology("hand", 5, (
        Link(0, 1, 100, 1.0), Link(1, 3, 50, 1.0),
        Link(0, 2, 80, 2.0), Link(2, 3, 80, 2.0),
        Link(3, 4, 10, 0.5),
    ))
    links = pairwise_links(topo)
    assert len(links) == 10
    assert links[(0, 1)] == (100, 1.0)
    assert links[(0, 3)] == (80, 4.0)  # two 2-hop paths: the wider one, via 2
    assert links[(0, 4)] == (10, 2.5)  # bottlenecks tie at 10: the faster one, via 1
    assert links[(1, 2)] == (80, 3.0)  # 1-0-2 (80 Mbit/s) beats 1-3-2 (50 Mbit/s)
    # A direct link beats a wider detour.
    direct = Topology("hand", 5, (*topo.links, Link(1, 4, 1, 0.1)))
    assert pairwise_links(direct)[(1, 4)] == (1, 0.1)
    assert pairwise_links(direct)[(0, 4)] == (1, 1.1)


def test_pairwise_latency_is_not_fooled_by_a_wide_slow_prefix():
    # Node 3 is reached widely but slowly via 1, narrowly but fast via 2; the last link
    # is narrow, so both full paths tie on width and the fast one must win.
    topo = Topology("trap", 5, (
        Link(0, 1, 10, 5.0), Link(1, 3, 10, 0.0),
        Link(0, 2, 5, 1.0), Link(2, 3, 5, 0.0),
        Link(3, 4, 5, 0.0),
    ))
    assert pairwise_links(topo)[(0, 4)] == (5, 1.0)
    assert pairwise_links(topo)[(0, 3)] == (10, 5.0)


def test_pairwise_links_rejects_disconnected():
    topo = Topology("split", 4, (Link(0, 1, 10, 1.0), Link(2, 3, 10, 1.0)))
    assert not is_connected(topo)
    with pytest.raises(ValueError, match="cannot reach"):
        pairwise_links(topo)


# ---------------------------------------------------------------- scenarios


CASES = [
    {"devices": 3}, {"devices": 5, "traces": "load-and-bandwidth"},
    {"devices": 8, "memory_drop": True, "traces": "load-and-bandwidth"},
    {"topology": "edge-cluster", "traces": "load-and-bandwidth", "memory_drop": True},
    {"topology": "distributed-edge", "model": "smollm2-135m"},
    {"topology": "hybrid", "traces": "load-and-bandwidth", "weights_from": "peer"},
    {"devices": 48, "model": {"layers": 2, "d_model": 256, "heads": 4, "kv_heads": 2,
                              "d_ff": 1024, "vocab": 1000}},
]


@pytest.mark.parametrize(("seed", "case"), list(itertools.product([0, 1, 2], CASES)))
def test_generated_scenarios_validate_and_round_trip(seed, case, tmp_path):
    s = random_scenario(seed, **case)
    n = len(s.devices)
    assert len(s.links.pairs) == n * (n - 1) // 2
    assert s.source_name == "d0"
    assert parse_scenario(s.model_dump(), "again") == s
    text = s.to_yaml()
    assert parse_scenario(yaml.safe_load(text), "again") == s
    path = tmp_path / "s.yaml"
    path.write_text(text)
    assert load_scenario(path) == s


def test_random_scenario_is_deterministic_per_seed():
    kw = {"topology": "edge-cluster", "traces": "load-and-bandwidth", "memory_drop": True}
    assert random_scenario(5, **kw) == random_scenario(5, **kw)
    assert random_scenario(5, **kw).to_yaml() == random_scenario(5, **kw).to_yaml()
    assert random_scenario(5, **kw) != random_scenario(6, **kw)


def test_full_mesh_scenario_uses_the_bandwidth_range():
    s = random_scenario(0, devices=6, bandwidth_mbit=(10.0, 20.0), latency_ms=(3.0, 4.0))
    assert all(10 <= p.bandwidth_mbit <= 20 and 3 <= p.latency_ms <= 4 for p in s.links.pairs)


def test_traces_are_seeded_load_and_bandwidth_changes():
    s = random_scenario(3, devices=8, generate_tokens=128, traces="load-and-bandwidth")
    assert len(s.traces) == 128 // 16
    tokens = [t.at_token for t in s.traces]
    assert tokens == sorted(tokens) and all(0 <= t < 128 for t in tokens)
    for t in s.traces:
        assert isinstance(t, LoadTrace | LinkTrace)
        if isinstance(t, LoadTrace):
            assert 0 <= t.background_load < 0.6
        else:
            assert t.bandwidth_mbit < s.link(*t.link)[0]
    assert {type(t) for t in s.traces} == {LoadTrace, LinkTrace}


def test_memory_tight_instances_are_scaled_to_fit_and_say_so():
    s = random_scenario(1, devices=5, model="smollm2-135m", memory_scale=0.001)
    assert "-memfit" in s.name
    table = block_table(s.model_spec())
    need = table.memory_bytes(s.final_context).sum() + table.source_weight_bytes
    have = sum(d.memory_mib for d in s.devices) * MIB
    assert need <= have <= need * 1.06 + len(s.devices) * MIB
    with pytest.raises(ValueError, match="needs"):
        random_scenario(1, devices=5, model="smollm2-135m", memory_scale=0.001, fit="raise")


def test_memory_drop_keeps_the_model_feasible():
    for seed in range(10):
        s = random_scenario(seed, devices=4, model="smollm2-135m", memory_scale=0.02,
                            memory_drop=True)
        table = block_table(s.model_spec())
        need = table.memory_bytes(s.final_context).sum() + table.source_weight_bytes
        drops = [t for t in s.traces if isinstance(t, MemoryTrace)]
        assert len(drops) <= 1
        for t in drops:
            before = s.device(t.device).memory_mib
            assert t.memory_mib < before and t.device != s.source_name
            after = sum(d.memory_mib for d in s.devices) - before + t.memory_mib
            assert after * MIB >= need


def test_bad_arguments():
    with pytest.raises(ValueError, match="give devices"):
        random_scenario(0)
    with pytest.raises(ValueError, match="unknown topology"):
        random_scenario(0, topology="ring")
    with pytest.raises(ValueError, match="has 8 devices, not 5"):
        random_scenario(0, devices=5, topology="edge-cluster")
    with pytest.raises(ValueError, match="traces must be"):
        random_scenario(0, devices=3, traces="chaos")  # type: ignore[arg-type]
