"""The emulator driver's reading loop fed malformed MQTT payloads: each is dropped and counted
by topic kind, the first of each kind is logged, and the valid messages after them still
count (a turn is queued, a token reported, the outcome taken)."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import pytest

from edgepart.control_plane import protocol as proto
from edgepart.emulator.driver import Driver
from edgepart.emulator.scenario import parse_scenario

TESTBED = "tb"
SCENARIO = {
    "version": 1,
    "name": "driver-bad-input",
    "model": {"layers": 2, "d_model": 64, "heads": 4, "kv_heads": 4, "d_ff": 128, "vocab": 100},
    "prompt_tokens": 4,
    "generate_tokens": 4,
    "devices": [
        {"name": "a", "compute_gflops": 1.0, "memory_mib": 64, "source": True},
        {"name": "b", "compute_gflops": 1.0, "memory_mib": 64},
    ],
}


async def _no_kill(device: str) -> None:
    raise AssertionError("nothing is killed here")


def test_malformed_messages_are_counted_per_kind_and_logged_once(
    caplog: pytest.LogCaptureFixture, replayed
) -> None:
    run = proto.run_topic
    bad = [
        (run(TESTBED, "world"), b'{"v": 1, "token": -3}'),
        (run(TESTBED, "world"), b'{"v": 1.0, "token": 3}'),
        (run(TESTBED, "progress"), b'{"v": 1, "token": 1'),
        (run(TESTBED, "result"), b'{"v": 1, "ok": true, "result": ' + b"[" * 100_000),
        (proto.device_topic(TESTBED, "b", "reply"), b'{"v": 1, "id": "", "name": "b"}'),
    ]
    progress = proto.Progress(token=1, token_id=5, measured_s=0.1, predicted_s=0.1, migrations=0)
    outcome = proto.RunOutcome(ok=True, result={"output_token_ids": [5]})
    good = [
        (run(TESTBED, "world"), proto.encode(proto.WorldTurn(token=2))),
        (run(TESTBED, "progress"), proto.encode(progress)),
        (run(TESTBED, "result"), proto.encode(outcome)),
    ]
    tokens: list[proto.Progress] = []

    async def main() -> Driver:
        driver = Driver(
            parse_scenario(SCENARIO, "driver"), "127.0.0.1:1883", TESTBED, _no_kill, tokens.append
        )
        driver._outcome = asyncio.get_running_loop().create_future()
        await driver.session.read(replayed(bad + good))
        assert driver._turns.get_nowait() == 2
        assert driver._outcome.result() == outcome
        return driver

    with caplog.at_level(logging.WARNING, logger="edgepart.driver"):
        driver = asyncio.run(main())
    want = {"world": 2, "progress": 1, "result": 1, "reply": 1}
    assert dict(driver.session.dropped.by_kind) == want
    assert tokens == [progress]
    logged = Counter(r.args[0] for r in caplog.records if "once per kind" in r.getMessage())
    assert logged == {kind: 1 for kind in want}
