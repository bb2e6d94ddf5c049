"""CPU burners: the fraction of a device's cores they burn, spread and reaped."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from edgepart.device_agent.burners import Burners

REPO = Path(__file__).resolve().parents[2]


def test_burners_use_their_fraction_and_are_reaped(
    burners: Callable[..., Burners], processes
) -> None:
    b = burners(0.5)
    b.set_load(0.5)
    pids = b.pids
    assert len(pids) == 1
    processes.assert_cpu_rate(b.cpu_seconds, 0.25)

    spent = b.cpu_seconds()
    b.stop()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()  # reaped: no zombie left
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert b.pids == []
    # what the burners used stays counted after they are gone
    assert b.cpu_seconds() >= spent
    b.stop()  # idempotent


def test_burners_spread_more_than_a_core(burners: Callable[..., Burners]) -> None:
    b = burners(2.0)
    b.set_load(0.75)  # 1.5 cores: two burners at 0.75 each
    assert len(b.pids) == 2
    b.set_load(0.25)  # 0.5 cores: one is enough
    assert len(b.pids) == 1
    b.set_load(0.0)
    assert b.pids == []
    with pytest.raises(ValueError, match="fraction"):
        b.set_load(1.5)


def test_burners_die_with_their_parent(
    spawn: Callable[..., subprocess.Popen[bytes]], processes
) -> None:
    parent = spawn(
        "import sys, time\nfrom edgepart.device_agent.burners import Burners\n"
        "b = Burners(0.2)\nb.set_load(1.0)\nprint(*b.pids, flush=True)\ntime.sleep(60)\n",
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    assert parent.stdout is not None
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 1
    assert not processes.gone_or_zombie(pids[0])
    processes.reap(parent)
    # orphans are reaped by whoever inherits them; a zombie is dead enough
    processes.wait_until(
        lambda: all(processes.gone_or_zombie(pid) for pid in pids), "orphaned burners to exit"
    )
