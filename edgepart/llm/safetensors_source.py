"""TensorSource over a Hugging Face directory of safetensors files, read one slice at a time."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from edgepart.llm.arch import Architecture

LM_HEAD = "lm_head.weight"
# Where a checkpoint with tied embeddings keeps the matrix its LM head reuses.
TIED_EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight")


class SafetensorsSource:
    """The tensors of ``model.safetensors`` (or a sharded index) in a local model directory.

    ``get`` maps the file with ``safe_open``, copies only the requested rows/columns via
    ``get_slice`` and unmaps it again, so a block's slices are all that stay in RAM (a
    mapping kept open would keep every page it touched counted in the process's RSS).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        single = self.directory / "model.safetensors"
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text("utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index} is not a safetensors index: {e}") from None
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files = [single.name]
            weight_map = {}
        else:
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {self.directory}"
            )
        self._files: dict[str, Path] = {}
        self._where: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for fname in files:
            path = self.directory / fname
            if not path.is_file():
                raise FileNotFoundError(f"{path} (listed in the index) does not exist")
            self._files[fname] = path
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                    self._where[key] = fname
                    self._shapes[key] = tuple(handle.get_slice(key).get_shape())
        # A tied checkpoint omits the LM head; serve the embedding under the head's name.
        self._aliases: dict[str, str] = {}
        if LM_HEAD not in self._where:
            for embed in TIED_EMBEDDINGS:
                if embed in self._where:
                    self._aliases[LM_HEAD] = embed
                    break

    def close(self) -> None:
        """Nothing stays open between reads; kept for symmetry with other sources."""

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def names(self) -> list[str]:
        """All tensor names, including the LM head alias of a tied checkpoint."""
        return sorted([*self._where, *self._aliases])

    def _resolve(self, name: str) -> tuple[Path, str]:
        real = self._aliases.get(name, name)
        try:
            return self._files[self._where[real]], real
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.directory}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a tensor, from the file header."""
        _, real = self._resolve(name)
        return self._shapes[real]

    def get(
        self,
        name: str,
        rows: slice | None = None,
        cols: slice | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """The tensor or its rows/columns as a new, contiguous tensor of dtype."""
        path, real = self._resolve(name)
        ndim = len(self._shapes[real])
        if cols is not None and ndim != 2:
            raise ValueError(f"{name} has {ndim} dimensions; columns need 2")
        rows = rows or slice(None)
        with safe_open(str(path), framework="pt") as handle:
            sl = handle.get_slice(real)
            if cols is not None:
                t = sl[rows, cols]
            elif ndim == 0:
                t = sl[()]
            else:
                t = sl[rows]
            # A copy that owns its memory, so nothing refers to the mapping once it closes.
            return t.to(dtype=dtype, copy=True).contiguous()


def open_hf_model(directory: str | Path) -> tuple[SafetensorsSource, Architecture]:
    """The tensor source and architecture of a local HF model directory (config.json + weights)."""
    path = Path(directory)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    try:
        config = json.loads(cfg_path.read_text("utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path} does not hold a JSON object")
    arch = Architecture.from_hf_config(config, name=path.name or None)
    return SafetensorsSource(path), arch
