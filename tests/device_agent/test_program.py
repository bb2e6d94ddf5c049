"""Routing of one token over a placement: every tensor produced is consumed, in order."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from edgepart.device_agent.program import Routes, groups_name, hidden_name

LAYERS, GROUPS = 3, 3


def _placement(devices: list[str]) -> dict[str, str]:
    names = [f"L{layer}.g{g}" for layer in range(LAYERS) for g in range(GROUPS)]
    names += [f"L{layer}.{k}" for layer in range(LAYERS) for k in ("proj", "ffn")]
    placement = dict(zip(names, devices, strict=True))
    placement.update(embed="src", head="src")
    return placement


BLOCKS = LAYERS * (GROUPS + 2)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["src", "a", "b"]), min_size=BLOCKS, max_size=BLOCKS))
def test_every_input_is_produced_once_and_sent_to_its_device(devices: list[str]) -> None:
    routes = Routes(_placement(devices), LAYERS, GROUPS)
    produced: dict[str, str] = {}  # tensor -> producing device
    delivered: dict[str, set[str]] = {}  # tensor -> devices it reaches
    for device in routes.devices():
        for step in routes.program(device):
            if step.output:
                assert step.output not in produced
                produced[step.output] = device
                targets = set(step.send_to) | ({device} if step.keep else set())
                assert device not in step.send_to
                delivered[step.output] = targets
    run_blocks: list[str] = []
    for device in routes.devices():
        seen: set[str] = set()
        for step in routes.program(device):
            for name in step.inputs:
                assert device in delivered[name], (name, device)
            run_blocks += step.blocks
            if step.output:
                seen.add(step.output)
    # every block runs exactly once, on its device
    assert sorted(run_blocks) == sorted(_placement(devices))


def test_groups_of_one_device_travel_as_one_tensor() -> None:
    devices = ["a", "b", "a"] + ["src", "src"] + ["src"] * (BLOCKS - 5)
    routes = Routes(_placement(devices), LAYERS, GROUPS)
    a_steps = routes.program("a")
    assert [s.output for s in a_steps] == [groups_name(0, (0, 2))]
    assert a_steps[0].send_to == ("src",)
    proj = next(s for s in routes.program("src") if s.kind == "proj" and s.layer == 0)
    assert proj.inputs == (groups_name(0, (0, 2)), groups_name(0, (1,)), hidden_name(0))


def test_missing_blocks_are_named() -> None:
    placement = _placement(["src"] * BLOCKS)
    del placement["L1.ffn"]
    try:
        Routes(placement, LAYERS, GROUPS)
    except ValueError as exc:
        assert "L1.ffn" in str(exc)
    else:
        raise AssertionError("a placement without L1.ffn was accepted")
