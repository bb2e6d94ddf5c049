"""Placement epochs: the last few kept, the current one, and bounded waits for others."""

from __future__ import annotations

import asyncio

import pytest

from edgepart.device_agent import epochs as epochs_module
from edgepart.device_agent.epochs import Epoch, Epochs
from edgepart.device_agent.program import Routes

PLACEMENT = {"embed": "a", "head": "a", "L0.g0": "a", "L0.proj": "b", "L0.ffn": "b"}


def _epoch(number: int, endpoints: dict[str, str] | None = None) -> Epoch:
    routes = Routes(PLACEMENT, layers=1, kv_heads=1)
    return Epoch(number, dict(PLACEMENT), routes, endpoints or {"a": "h:1", "b": "h:2"})


def test_the_newest_is_current_and_old_ones_are_forgotten() -> None:
    known = Epochs()
    assert known.current == -1 and known.endpoint("b") is None
    assert known.add(_epoch(0))
    assert known.add(_epoch(3))
    assert 3 in known and 0 not in known  # more than two behind the one that arrived
    assert not known.add(_epoch(2))  # a late one is kept, the current stays
    assert known.current == 3 and known.get(2) is not None
    assert known.endpoint("b") == "h:2"


def test_a_wait_ends_when_the_epoch_arrives() -> None:
    async def main() -> int:
        known = Epochs()
        waiting = asyncio.create_task(known.wait_for(1))
        peer = asyncio.create_task(known.endpoint_known("c"))
        await asyncio.sleep(0)
        known.add(_epoch(1, {"a": "h:1", "c": "h:3"}))
        await peer
        return (await waiting).number

    assert asyncio.run(main()) == 1


def test_a_wait_for_an_epoch_that_never_comes_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(epochs_module, "EPOCH_WAIT_S", 0.05)

    async def main() -> None:
        known = Epochs()
        known.add(_epoch(0))
        with pytest.raises(TimeoutError, match="epoch 5 never arrived"):
            await known.wait_for(5)
        with pytest.raises(TimeoutError, match="endpoint of z"):
            await known.endpoint_known("z")

    asyncio.run(main())
