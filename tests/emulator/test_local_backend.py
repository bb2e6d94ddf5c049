"""End to end on the local backend: real agent processes, a real broker, the real model.

The generated ids must equal the monolithic reference for every algorithm, the traces must
make the re-planning algorithm move blocks, and nothing started may outlive the run.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from live_e2e import (
    SCENARIO,
    agent_pid,
    assert_no_orphans,
    make_scenario,
    make_tiny_scenario,
    reference_ids,
)
from typer.testing import CliRunner

from edgepart.controller.cli import app
from edgepart.emulator.backends.local import LocalBackendError, run_local
from edgepart.emulator.broker import Mosquitto, mosquitto_available
from edgepart.emulator.host_limits import RESERVED_CORES, model_footprint_bytes
from edgepart.emulator.scenario import MIB
from edgepart.llm.blocks import block_table
from edgepart.llm.host_profile import host_profile
from edgepart.llm.loader import open_model


@pytest.mark.parametrize(
    "algorithm", ["static-heads", "edgeshard", "memory-proportional", "galaxy"]
)
def test_every_algorithm_generates_the_monolithic_ids(tmp_path: Path, algorithm: str) -> None:
    # myopic: test_traces_make_the_planner_migrate_blocks; optimal: test_the_milp_planner_runs_live
    # (a static split under the traces only runs slower: none of its decisions change)
    run = run_local(make_scenario(traces=[]), algorithm, telemetry="configured", work_dir=tmp_path)
    assert run.result.output_token_ids == reference_ids()
    assert len(run.result.per_token_s) == SCENARIO["generate_tokens"] - 1
    assert all(t > 0 for t in run.result.predicted_per_token_s)
    assert run.text
    assert_no_orphans(run.pids)


def test_the_milp_planner_runs_live(tmp_path: Path, tiny_live_model: Path) -> None:
    # on SmolLM2's 30 layers each exact solve takes tens of seconds on two cores; the tiny
    # model's 4 layers solve at once. 1.5 MiB per device: no device holds the model alone
    scenario = make_tiny_scenario(tiny_live_model)
    run = run_local(scenario, "optimal", telemetry="configured", work_dir=tmp_path)
    assert run.result.output_token_ids == reference_ids(model=str(tiny_live_model))
    # it ran split: no device can hold the whole model
    assert model_footprint_bytes(scenario) > max(d.memory_mib for d in scenario.devices) * MIB
    assert_no_orphans(run.pids)


def test_traces_make_the_planner_migrate_blocks(tmp_path: Path) -> None:
    run = run_local(make_scenario(), "myopic", telemetry="configured", work_dir=tmp_path)
    assert run.result.migrations >= 1
    assert run.result.migration_bytes > 0  # KV caches travelled between agents
    assert run.result.output_token_ids == reference_ids()
    # b lost 90 % of its compute at token 2: the re-plan moved work off it
    assert run.result.replans >= 2
    assert all(t > 0 for t in run.result.predicted_per_token_s)
    assert run.text
    assert_no_orphans(run.pids)


def test_weights_from_peer_travel_with_every_move(tmp_path: Path) -> None:
    # only the source's checkpoint is used: b and c load from it over the data plane, and
    # every moved block's target fetches its weights from the holder while it prepares
    # (a group's cache follows at the commit), as the cost model says.
    # Moving weights does not pay off within two tokens, so b's memory shrinks to force moves
    scenario = make_scenario(
        weights_from="peer", traces=[{"at_token": 2, "device": "b", "memory_mib": 40}]
    )
    run = run_local(scenario, "myopic", telemetry="configured", work_dir=tmp_path)
    assert run.result.output_token_ids == reference_ids()
    assert run.result.migrations >= 1
    table = block_table(open_model("smollm2-135m").arch.spec)
    # the lightest block's weights (a KV group's, ~0.7 MB) dwarf any cache moved here
    # (2 x 16 positions x 64 x 4 B = 8 KiB): weights travelled for each of the moves
    assert run.result.migration_bytes >= run.result.migrations * table.weight_bytes.min()
    assert_no_orphans(run.pids)


def test_a_device_killed_mid_generation_is_recovered(tmp_path: Path) -> None:
    # c is the fastest device, so it holds blocks when it dies; a and b can hold the model
    scenario = make_scenario(
        devices=[
            {"name": "a", "compute_gflops": 1.0, "memory_mib": 300, "source": True},
            {"name": "b", "compute_gflops": 1.0, "memory_mib": 360},
            {"name": "c", "compute_gflops": 4.0, "memory_mib": 200},
        ],
        traces=[{"at_token": 3, "device": "c", "fail": True}],
    )
    run = run_local(scenario, "myopic", telemetry="configured", work_dir=tmp_path)
    assert run.result.recoveries == 1
    assert run.result.output_token_ids == reference_ids()
    assert_no_orphans(run.pids)


#: a switch plans at one boundary, prepares during the next token and commits after it:
#: a joined device can be used only with tokens left after that
JOIN_TOKENS = 12
JOIN_DEVICES = [
    {"name": "a", "compute_gflops": 1.0, "memory_mib": 300, "source": True},
    {"name": "b", "compute_gflops": 1.0, "memory_mib": 360},
    {"name": "c", "compute_gflops": 4.0, "memory_mib": 200},
]


def test_a_device_that_joins_late_is_used_from_the_next_replan(tmp_path: Path) -> None:
    # c, the fastest, is not there at the start: a and b hold the model until it joins
    scenario = make_scenario(
        devices=JOIN_DEVICES,
        generate_tokens=JOIN_TOKENS,
        traces=[{"at_token": 2, "device": "c", "join": True}],
    )
    run = run_local(scenario, "myopic", telemetry="configured", work_dir=tmp_path)
    assert run.result.output_token_ids == reference_ids(JOIN_TOKENS)
    assert run.result.recoveries == 0
    assert run.result.peak_memory_bytes["c"] > 0, run.result.switches  # it held blocks
    assert all(s.token >= 2 for s in run.result.switches)
    assert_no_orphans(run.pids)


def test_a_device_back_after_a_fail_is_used_again(tmp_path: Path) -> None:
    scenario = make_scenario(
        devices=JOIN_DEVICES,
        generate_tokens=JOIN_TOKENS,
        traces=[
            {"at_token": 2, "device": "c", "fail": True},
            {"at_token": 4, "device": "c", "join": True},
        ],
    )
    run = run_local(scenario, "myopic", telemetry="configured", work_dir=tmp_path)
    assert run.result.output_token_ids == reference_ids(JOIN_TOKENS)
    assert run.result.recoveries == 1
    # blocks moved after c came back: to c, the only device faster than the others
    assert any(s.token >= 4 for s in run.result.switches)
    assert_no_orphans(run.pids)


def test_a_device_cut_off_the_source_is_lost_then_used_again(tmp_path: Path) -> None:
    # measured telemetry: the controller learns of the cut only from the source's probes
    # (enough tokens after the restore for moving back to c to pay)
    scenario = make_scenario(
        devices=JOIN_DEVICES,
        generate_tokens=12,
        traces=[
            {"at_token": 2, "link": ["a", "c"], "bandwidth_mbit": 0},
            {"at_token": 4, "link": ["a", "c"], "bandwidth_mbit": 1000},
        ],
    )
    run = run_local(scenario, "myopic", work_dir=tmp_path)
    assert run.result.output_token_ids == reference_ids(12)
    assert run.result.recoveries == 1
    assert any(s.token >= 4 for s in run.result.switches)  # c, the fastest, used again
    assert_no_orphans(run.pids)


@pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")
def test_runs_over_a_real_mosquitto(tmp_path: Path, tiny_live_model: Path) -> None:
    scenario = make_tiny_scenario(tiny_live_model)
    with Mosquitto() as broker:
        run = run_local(scenario, "myopic", broker=broker.endpoint, work_dir=tmp_path)
    assert run.result.output_token_ids == reference_ids(model=str(tiny_live_model))
    assert run.broker == broker.endpoint
    assert_no_orphans(run.pids)


@pytest.fixture
def reference_gflops(monkeypatch: pytest.MonkeyPatch) -> float:
    """This CPU's speed per core (GFLOP/s) as the runs of the test see it: one profile, not
    one per call (a profile measured on a busy host is measured again, not cached)."""
    profile = host_profile("smollm2-135m", threads=1)
    monkeypatch.setattr("edgepart.llm.host_profile.host_profile", lambda *_a, **_k: profile)
    return profile.reference_gflops


def test_a_run_forced_twice_slower_reports_scenario_time(
    tmp_path: Path, reference_gflops: float
) -> None:
    # every device at half its share and speed, links at half their rate and twice their
    # latency: the controller divides what it measures by 2 and plans as at k = 1
    run = run_local(make_scenario(traces=[]), "myopic", work_dir=tmp_path, time_dilation=2.0)
    assert run.result.output_token_ids == reference_ids()
    assert run.result.time_dilation == 2.0
    assert run.to_json()["time_dilation"] == 2.0
    assert run.shares == pytest.approx(
        {d["name"]: d["compute_gflops"] / reference_gflops / 2 for d in SCENARIO["devices"]}
    )
    ratios = [
        m / p for m, p in zip(run.result.per_token_s, run.result.predicted_per_token_s, strict=True)
    ]
    # scenario time, not wall time (which is twice as long): near the prediction on any
    # host, within a band wide enough for a loaded one
    assert 0.5 <= statistics.median(ratios) <= 2.0, ratios
    assert_no_orphans(run.pids)


def test_a_scenario_larger_than_this_host_runs_dilated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference_gflops: float
) -> None:
    # a host with one core free for devices, and devices worth 1.5 cores of it
    monkeypatch.setattr("edgepart.emulator.host_limits.host_cores", lambda: 1.0 + RESERVED_CORES)
    devices = [
        {**d, "compute_gflops": cores * reference_gflops}
        for d, cores in zip(SCENARIO["devices"], (0.6, 0.5, 0.4), strict=True)
    ]
    big = make_scenario(devices=devices, traces=[], generate_tokens=3)
    run = run_local(big, "static-heads", telemetry="configured", work_dir=tmp_path)
    assert run.result.output_token_ids == reference_ids(3)
    assert run.result.time_dilation == pytest.approx(1.5)
    assert sum(run.shares.values()) == pytest.approx(1.0)
    assert_no_orphans(run.pids)


def test_a_scenario_whose_agents_cannot_fit_this_hosts_memory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("edgepart.emulator.host_limits.free_memory_bytes", lambda: 100 * MIB)
    with pytest.raises(LocalBackendError, match=r"need about \d+ MiB .* but 100 MiB are free"):
        run_local(make_scenario(), "myopic", work_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # refused before anything started


def _agents_of(testbed: str) -> list[int]:
    """Pids of live agent processes started for a testbed."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"edgepart.device_agent" in cmdline and testbed.encode() in cmdline:
            found.append(int(entry))
    return found


def test_ctrl_c_tears_everything_down(tmp_path: Path) -> None:
    scenario = tmp_path / "e2e.yaml"
    scenario.write_text(json.dumps({**SCENARIO, "generate_tokens": 400}))
    cli = [sys.executable, "-c", "from edgepart.controller.cli import app; app()"]
    proc = subprocess.Popen(
        [*cli, "emulate", str(scenario), "--algorithm", "myopic", "--json"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    testbed = f"e2e-{proc.pid}"
    logs = tmp_path / "out" / "local" / testbed
    deadline = time.monotonic() + 120

    def online(device: str) -> bool:
        log = logs / f"{device}.log"
        return log.is_file() and "online" in log.read_text()

    # poll until every agent is up (the run then goes on for hundreds of tokens)
    while not all(online(d["name"]) for d in SCENARIO["devices"]):
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "agents did not come online in 120 s"
        time.sleep(0.1)
    pids = _agents_of(testbed)
    assert len(pids) == len(SCENARIO["devices"])
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert _agents_of(testbed) == []
    assert_no_orphans({str(p): p for p in pids})


@pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")
def test_a_restarted_broker_loses_and_repeats_nothing(
    tmp_path: Path, tiny_live_model: Path
) -> None:
    with Mosquitto() as broker:

        def restart_once(done: int, result) -> None:
            # on the controller's loop, mid-generation: every client loses the broker, and
            # the new one has no retained placement, status or session of the old one
            if done == 3 and result.broker_losses == 0:
                broker.stop()
                broker.start()

        run = run_local(
            make_tiny_scenario(tiny_live_model),
            "myopic",
            broker=broker.endpoint,
            work_dir=tmp_path,
            progress=restart_once,
        )
    assert run.result.broker_losses == 1
    # nothing lost, nothing twice
    assert run.result.output_token_ids == reference_ids(model=str(tiny_live_model))
    assert run.result.recoveries == 0  # no device was taken for dead meanwhile
    assert_no_orphans(run.pids)


def test_a_device_killed_by_hand_during_a_token_is_recovered(tmp_path: Path) -> None:
    scenario = make_scenario(
        devices=[
            {"name": "a", "compute_gflops": 1.0, "memory_mib": 300, "source": True},
            {"name": "b", "compute_gflops": 1.0, "memory_mib": 360},
            {"name": "c", "compute_gflops": 4.0, "memory_mib": 200},
        ],
        traces=[],
    )

    def kill_c(done: int, result) -> None:
        # kill -9 from outside, on the controller's loop: it starts the next token before
        # it can see the last will, so the loss is found while that token waits for c
        if done == 3:
            os.killpg(agent_pid("c"), signal.SIGKILL)

    run = run_local(scenario, "myopic", telemetry="configured", work_dir=tmp_path, progress=kill_c)
    assert run.result.recoveries == 1
    assert run.result.output_token_ids == reference_ids()
    assert_no_orphans(run.pids)


def test_survivors_too_small_stop_with_a_clear_error_and_keep_the_output(tmp_path: Path) -> None:
    # without c, a and b hold less than the model's weights
    data = {
        **SCENARIO,
        "devices": [
            {"name": "a", "compute_gflops": 1.0, "memory_mib": 300, "source": True},
            {"name": "b", "compute_gflops": 1.0, "memory_mib": 150},
            {"name": "c", "compute_gflops": 2.0, "memory_mib": 300},
        ],
        "traces": [{"at_token": 3, "device": "c", "fail": True}],
    }
    path = tmp_path / "small.yaml"
    path.write_text(json.dumps(data), encoding="utf-8")
    result = CliRunner().invoke(
        app, ["emulate", str(path), "--backend", "local", "--algorithm", "myopic", "--json"]
    )
    assert result.exit_code == 1
    assert "the surviving devices cannot hold the model" in result.stderr
    partial = json.loads(result.stdout)
    assert "cannot hold" in partial["error"]
    assert partial["output_token_ids"] == reference_ids()[:3]  # the tokens before the loss
    assert partial["text"] and "partial output (3 tokens)" in result.stderr
