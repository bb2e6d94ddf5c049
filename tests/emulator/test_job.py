"""The scenario -> controller glue: the model a job opens, its prompt and its controller
settings (no model is opened: a stand-in tokenizer counts words)."""

from __future__ import annotations

import pytest

from edgepart.emulator.job import DEFAULT_PROMPT, JobError, controller_config, model_ref, prompt_ids
from edgepart.emulator.scenario import parse_scenario

DEVICES = [
    {"name": "a", "compute_gflops": 2.0, "memory_mib": 400, "source": True},
    {"name": "b", "compute_gflops": 1.0, "memory_mib": 300},
]


def _scenario(**changes):
    data = {
        "version": 1,
        "name": "job",
        "model": {"preset": "smollm2-135m"},
        "prompt_tokens": 10,
        "generate_tokens": 6,
        "replan_every": 2,
        "devices": DEVICES,
        "links": {"default": {"bandwidth_mbit": 100, "latency_ms": 1}},
        **changes,
    }
    return parse_scenario(data, "job")


class Words:
    """A tokenizer whose tokens are the words' lengths."""

    def encode(self, text: str) -> list[int]:
        return [len(word) for word in text.split()]


def test_model_ref_names_what_open_model_opens_and_refuses_shapes():
    assert model_ref(_scenario()) == "smollm2-135m"
    shapes = {"layers": 2, "d_model": 64, "heads": 4, "kv_heads": 4, "d_ff": 128, "vocab": 1000}
    with pytest.raises(JobError, match="explicit shapes"):
        model_ref(_scenario(model=shapes))


def test_the_prompt_is_the_scenarios_text_or_the_default_cut_to_prompt_tokens():
    assert prompt_ids(_scenario(prompt="one two three"), Words()) == [3, 3, 5]
    words = Words().encode(DEFAULT_PROMPT)
    assert prompt_ids(_scenario(prompt_tokens=10), Words()) == words[:10]
    long = prompt_ids(_scenario(prompt_tokens=len(words) + 3), Words())
    assert long == words + words[:3]


def test_the_controller_config_carries_the_scenarios_job_and_devices():
    config = controller_config(_scenario(), None, [1, 2], "127.0.0.1:1883", "tb", "myopic")
    assert config.devices == ("a", "b")
    assert config.source == "a"
    assert config.prompt_ids == (1, 2)
    assert config.generate_tokens == 6 and config.replan_every == 2
    assert config.telemetry == "measured" and config.metrics_port is None
