"""What one device does for one token under a placement: its steps and where outputs go.

Pure routing, no I/O. Tensors travel under names every agent derives from the same
placement, so no routing is negotiated per token:

- ``x{l}``   hidden state entering layer l (``x0`` from the embedding, ``x{L}`` into the head);
- ``o{l}:{g,..}`` the concatenated outputs of the layer-l groups one device holds;
- ``a{l}``   the hidden state after layer l's projection (into its FFN).

A tensor is sent once per consuming device, whatever the number of blocks there that read
it, which is what the cost model charges (one hop per device).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from edgepart.llm.model import ModelSpec

StepKind = Literal["embed", "groups", "proj", "ffn", "head"]


@dataclass(frozen=True)
class Step:
    """One unit of work on a device: run blocks on named inputs, publish one named output."""

    kind: StepKind
    layer: int  # -1 for embed and head
    blocks: tuple[str, ...]
    inputs: tuple[str, ...]  # tensor names awaited (in call order)
    output: str  # tensor name produced ("" for the head: its logits stay local)
    send_to: tuple[str, ...]  # other devices that consume the output, in a fixed order
    keep: bool  # whether a later step on this device consumes the output too


def hidden_name(layer: int) -> str:
    """Name of the hidden state entering layer ``layer`` (layer == layers: into the head)."""
    return f"x{layer}"


def groups_name(layer: int, groups: tuple[int, ...]) -> str:
    """Name of the concatenated outputs of these groups of a layer."""
    return f"o{layer}:{','.join(str(g) for g in groups)}"


def attention_name(layer: int) -> str:
    """Name of a layer's hidden state after its output projection."""
    return f"a{layer}"


#: the names above; numbers bounded, so a forged name costs nothing to parse
_ROUTE = re.compile(
    r"^(?:x(?P<x>\d{1,6})|a(?P<a>\d{1,6})|o(?P<o>\d{1,6}):(?P<groups>\d{1,6}(?:,\d{1,6}){0,999}))$"
)


def activation_problem(name: str, shape: Sequence[int], spec: ModelSpec) -> str | None:
    """Why a received activation cannot be the tensor its name carries under these shapes,
    or None: ``x{l}`` and ``a{l}`` are (T, d_model), ``o{l}:{g,..}`` is (T, the width of
    those groups' heads), T >= 1 tokens. Checked on arrival, so a forged tensor is dropped
    instead of taking the slot of the real one and failing the step that reads it."""
    m = _ROUTE.match(name)
    if m is None:
        return f"no tensor is named {name[:40]!r}"
    if m["x"] is not None:
        layer, limit, width = int(m["x"]), spec.layers, spec.d_model
    elif m["a"] is not None:
        layer, limit, width = int(m["a"]), spec.layers - 1, spec.d_model
    else:
        layer, limit = int(m["o"]), spec.layers - 1
        groups = [int(g) for g in m["groups"].split(",")]
        if groups != sorted(set(groups)) or groups[-1] >= spec.kv_heads:
            return f"{name[:40]} names groups outside 0..{spec.kv_heads - 1} or out of order"
        width = len(groups) * spec.queries_per_group * spec.head_dim
    if layer > limit:
        return f"{name[:40]} names layer {layer} of a {spec.layers}-layer model"
    if len(shape) != 2 or shape[0] < 1 or shape[1] != width:
        return f"{name[:40]} has shape {tuple(shape)[:8]}, want (tokens, {width})"
    return None


class Routes:
    """Producers and consumers of every tensor of one token under one placement."""

    def __init__(self, placement: Mapping[str, str], layers: int, kv_heads: int) -> None:
        self.placement = dict(placement)
        self.layers = layers
        self.kv_heads = kv_heads
        missing = [b for b in ("embed", *self._layer_blocks(), "head") if b not in self.placement]
        if missing:
            raise ValueError(f"placement misses {len(missing)} blocks, e.g. {missing[:3]}")

    def group_devices(self, layer: int) -> dict[str, tuple[int, ...]]:
        """Device -> the layer's groups it holds, in group order (devices in first-group order)."""
        out: dict[str, list[int]] = {}
        for g in range(self.kv_heads):
            out.setdefault(self.placement[f"L{layer}.g{g}"], []).append(g)
        return {d: tuple(gs) for d, gs in out.items()}

    def hidden_consumers(self, layer: int) -> tuple[str, ...]:
        """Devices reading ``x{layer}``: the layer's group holders and projection (or the head)."""
        if layer == self.layers:
            return (self.placement["head"],)
        devices = list(self.group_devices(layer))
        proj = self.placement[f"L{layer}.proj"]
        if proj not in devices:
            devices.append(proj)
        return tuple(devices)

    def hidden_producer(self, layer: int) -> str:
        """Device producing ``x{layer}``: the embedding's for layer 0, else the previous FFN's."""
        return self.placement["embed"] if layer == 0 else self.placement[f"L{layer - 1}.ffn"]

    def program(self, device: str) -> list[Step]:
        """The steps ``device`` runs for one token, in dependency order."""
        steps: list[Step] = []
        place = self.placement
        if place["embed"] == device:
            steps.append(self._publish("embed", -1, ("embed",), (), hidden_name(0), device))
        for layer in range(self.layers):
            x = hidden_name(layer)
            mine = self.group_devices(layer).get(device)
            if mine:
                out = groups_name(layer, mine)
                to = place[f"L{layer}.proj"]
                steps.append(
                    Step(
                        "groups",
                        layer,
                        tuple(f"L{layer}.g{g}" for g in mine),
                        (x,),
                        out,
                        () if to == device else (to,),
                        to == device,
                    )
                )
            if place[f"L{layer}.proj"] == device:
                parts = tuple(groups_name(layer, gs) for gs in self.group_devices(layer).values())
                to = place[f"L{layer}.ffn"]
                steps.append(
                    Step(
                        "proj",
                        layer,
                        (f"L{layer}.proj",),
                        (*parts, x),
                        attention_name(layer),
                        () if to == device else (to,),
                        to == device,
                    )
                )
            if place[f"L{layer}.ffn"] == device:
                steps.append(
                    self._publish(
                        "ffn",
                        layer,
                        (f"L{layer}.ffn",),
                        (attention_name(layer),),
                        hidden_name(layer + 1),
                        device,
                    )
                )
        if place["head"] == device:
            steps.append(Step("head", -1, ("head",), (hidden_name(self.layers),), "", (), False))
        return steps

    def _publish(
        self,
        kind: StepKind,
        layer: int,
        blocks: tuple[str, ...],
        inputs: tuple[str, ...],
        output: str,
        device: str,
    ) -> Step:
        """A step whose output is a hidden state entering the next layer (or the head)."""
        consumers = self.hidden_consumers(layer + 1)
        others = tuple(d for d in consumers if d != device)
        return Step(kind, layer, blocks, inputs, output, others, device in consumers)

    def devices(self) -> tuple[str, ...]:
        """Every device holding a block, in first-use order."""
        seen: dict[str, None] = {}
        for block in ("embed", *self._layer_blocks(), "head"):
            seen.setdefault(self.placement[block], None)
        return tuple(seen)

    def _layer_blocks(self):
        for layer in range(self.layers):
            for g in range(self.kv_heads):
                yield f"L{layer}.g{g}"
            yield f"L{layer}.proj"
            yield f"L{layer}.ffn"
