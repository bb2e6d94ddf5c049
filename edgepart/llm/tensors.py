"""Where a device's weights come from: named tensors read lazily, one slice at a time.

Every checkpoint format (a Hugging Face directory of safetensors, a GGUF file) is
exposed under Hugging Face tensor names and layouts (e.g.
``model.layers.3.self_attn.q_proj.weight`` of shape (out, in)), so the block code
is written once. A device asks only for the rows it needs: a source memory-maps
its file and materialises (and, for GGUF, dequantises) just those rows, so a
device holding a quarter of the heads never holds the whole model in RAM.
"""

from __future__ import annotations

from typing import Protocol

import torch


class TensorSource(Protocol):
    """Named tensors of one checkpoint, in Hugging Face names and layouts."""

    def names(self) -> list[str]:
        """All tensor names the checkpoint has."""
        ...

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a tensor, without reading it."""
        ...

    def get(
        self,
        name: str,
        rows: slice | None = None,
        cols: slice | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """The tensor, or its rows/columns (first/second dimension), as a new tensor of dtype.

        GPT-2 keeps its Conv1D layout (in, out), so its per-head slices are columns.
        """
        ...
