"""Open a model argument (preset, .gguf file or Hugging Face directory) for execution."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgepart.llm.arch import Architecture
from edgepart.llm.files import ModelFile, resolve_model
from edgepart.llm.tensors import TensorSource
from edgepart.llm.tokenizer import Tokenizer


@dataclass
class OpenModel:
    """A model ready to run: where its tensors come from, its architecture and tokenizer."""

    file: ModelFile
    source: TensorSource
    arch: Architecture
    tokenizer: Tokenizer


def open_model(model: str | Path) -> OpenModel:
    """Resolve and open a model; FileNotFoundError / ValueError name what is wrong."""
    file = resolve_model(model)
    if file.format == "gguf":
        from edgepart.llm.gguf_source import open_gguf_model

        source, arch = open_gguf_model(file.path)
        # parsing a GGUF header (its whole vocabulary) takes seconds: read it once
        tokenizer = Tokenizer.from_gguf(file.path, reader=source.reader)
    else:
        from edgepart.llm.safetensors_source import open_hf_model

        source, arch = open_hf_model(file.path)
        tokenizer = Tokenizer.from_hf_dir(file.path)
    return OpenModel(file, source, arch, tokenizer)
