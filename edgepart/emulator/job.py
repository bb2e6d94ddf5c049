"""A scenario's job as the controller runs it on real weights: the scenario -> controller glue.

- ``model_ref``: what ``edgepart.llm.loader.open_model`` opens for the scenario's model
(``JobError`` for explicit shapes: they have no weights).
- ``prompt_ids``: the prompt's token ids, the scenario's text or ``DEFAULT_PROMPT`` cut to
  ``prompt_tokens``.
- ``controller_config``: the ``ControllerConfig`` of the job on the scenario's devices.

Used by the local backend and by ``edgepart controller`` (the docker testbed's controller
service); the testbed's containers name the model with ``compose.container_model_ref``.
"""

from __future__ import annotations

from edgepart.controller.config import ControllerConfig, TelemetryMode
from edgepart.emulator.scenario import GgufModel, HfModel, PresetModel, Scenario
from edgepart.emulator.world import WorldState

DEFAULT_PROMPT = (
    "Edge devices in a home network can share the work of running a language model. "
    "Each device holds a few attention heads with their key and value caches, and the "
    "devices exchange hidden states over the local network for every generated token. "
    "When a device becomes busy or a link slows down, the planner moves heads elsewhere."
)


class JobError(ValueError):
    """The scenario's job cannot run on real weights as given (bad input: exit 2)."""


def model_ref(scenario: Scenario) -> str:
    """What ``edgepart.llm.loader.open_model`` opens for the scenario's model."""
    m = scenario.model
    if isinstance(m, PresetModel):
        return m.preset
    if isinstance(m, GgufModel):
        return str(m.gguf)
    if isinstance(m, HfModel):
        return str(m.hf)
    raise JobError(
        "model: the local backend runs real weights; give a preset, a gguf file or an hf "
        "folder instead of explicit shapes"
    )


def reference_ids(scenario: Scenario) -> list[int]:
    """The greedy ids of the whole model on one host for the scenario's prompt and length:
    what every partitioned run must reproduce (a partition must not change the tokens)."""
    from edgepart.llm.loader import open_model
    from edgepart.llm.runtime import monolithic

    opened = open_model(model_ref(scenario))
    ids = prompt_ids(scenario, opened.tokenizer)
    return list(monolithic(opened.source, opened.arch).greedy(ids, scenario.generate_tokens))


def prompt_ids(scenario: Scenario, tokenizer) -> list[int]:
    """The prompt's token ids: the scenario's text, or the default text cut to prompt_tokens."""
    if scenario.prompt is not None:
        return tokenizer.encode(scenario.prompt)
    ids: list[int] = []
    while len(ids) < scenario.prompt_tokens:
        ids += tokenizer.encode(DEFAULT_PROMPT)
    return ids[: scenario.prompt_tokens]


def controller_config(
    scenario: Scenario,
    table,
    ids: list[int],
    broker: str,
    testbed: str,
    algorithm: str,
    telemetry: TelemetryMode = "measured",
    metrics_port: int | None = None,
    time_dilation: float = 1.0,
) -> ControllerConfig:
    """The controller's settings for running a scenario's job on its devices, in a world
    ``time_dilation`` times slower than the scenario."""
    state = WorldState.from_scenario(scenario)
    return ControllerConfig(
        testbed=testbed,
        broker=broker,
        algorithm=algorithm,
        devices=scenario.device_names,
        source=scenario.source_name,
        nominal_gflops=state.nominal_gflops,
        memory_bytes=state.memory_bytes,
        bandwidth_mbit=state.bandwidth_mbit,
        latency_s=state.latency_s,
        table=table,
        prompt_ids=tuple(ids),
        generate_tokens=scenario.generate_tokens,
        replan_every=scenario.replan_every,
        weights_from=scenario.weights_from,
        telemetry=telemetry,
        metrics_port=metrics_port,
        late_devices=scenario.offline_at_start,
        time_dilation=time_dilation,
    )
