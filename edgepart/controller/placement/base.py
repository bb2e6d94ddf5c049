"""The one interface every placement algorithm implements, and the placement it returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edgepart.controller.view import ResourceView
from edgepart.llm.blocks import PINNED_BLOCKS, BlockTable


@dataclass(frozen=True)
class Placement:
    """Which device (by index into the view's devices) holds each placeable block."""

    assignment: np.ndarray  # (blocks,) int device index

    def __post_init__(self) -> None:
        arr = np.asarray(self.assignment, dtype=np.int64)
        arr.setflags(write=False)
        object.__setattr__(self, "assignment", arr)

    def to_dict(self, table: BlockTable, devices: Sequence[str], source: int) -> dict[str, str]:
        """Block name -> device name (``devices`` by index; ``source``, the index of the
        device holding the pinned blocks), pinned source blocks included."""
        mapping = {name: devices[source] for name in PINNED_BLOCKS}
        mapping.update(
            (name, devices[d]) for name, d in zip(table.names, self.assignment, strict=True)
        )
        return mapping

    def moved(self, other: Placement) -> np.ndarray:
        """Boolean mask of blocks whose device differs from ``other``."""
        return self.assignment != other.assignment

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Placement) and np.array_equal(self.assignment, other.assignment)

    def __hash__(self) -> int:
        return hash(self.assignment.tobytes())


class NoFeasiblePlacement(RuntimeError):
    """No placement fits the devices' memory for the planning window."""


class PlacementAlgorithm(Protocol):
    """A placement policy: pure, deterministic, no I/O and no clock."""

    name: str
    #: Whether the policy is consulted again at every re-plan (False: once, or on failure).
    replans: bool

    def place(self, view: ResourceView, model: BlockTable, current: Placement | None) -> Placement:
        """Decide where every block runs for the view's planning window."""
        ...
