"""The memory ballast: real resident bytes in a child process, resized and freed."""

from __future__ import annotations

import os

import pytest

from edgepart.device_agent.ballast import Ballast, resident_bytes

MIB = 1024 * 1024


def test_the_ballast_holds_what_it_is_told_and_frees_it() -> None:
    ballast = Ballast()
    try:
        ballast.hold(64 * MIB)
        pid = ballast.pid
        assert pid is not None and ballast.held_bytes == 64 * MIB
        assert resident_bytes(pid) >= 64 * MIB  # every page touched, not just reserved
        ballast.hold(8 * MIB)
        assert ballast.pid == pid and resident_bytes(pid) < 40 * MIB
        ballast.hold(0)
        assert ballast.pid is None and ballast.held_bytes == 0
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        with pytest.raises(ValueError):
            ballast.hold(-1)
    finally:
        ballast.stop()
