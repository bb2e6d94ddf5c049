"""Resolving a model argument: preset name, .gguf file, Hugging Face directory."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest

from edgepart.llm import files
from edgepart.llm.files import ModelFile, preset_file, resolve_model

SMOLLM2 = files.PRESET_FILES["smollm2-135m"]


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """An edgepart cache directory with nothing fetched into it."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGEPART_CACHE", str(cache))
    return cache


def test_preset_resolves_in_the_cache(empty_cache):
    fetched = empty_cache / "models" / SMOLLM2.filename
    fetched.parent.mkdir(parents=True)
    fetched.write_bytes(b"GGUF" + b"\0" * 20)
    mf = resolve_model("smollm2-135m")
    assert mf == ModelFile("gguf", fetched, preset="smollm2-135m")
    assert files.models_dir() == empty_cache / "models"


def test_preset_falls_back_to_an_installed_wheel_without_importing_it(
    empty_cache, tmp_path, monkeypatch
):
    package = tmp_path / "site" / "fake_model_pkg_xyz"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('needs llama_cpp')\n")
    (package / "m.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    entry = dataclasses.replace(SMOLLM2, package="fake_model_pkg_xyz", filename="m.gguf")
    monkeypatch.setitem(files.PRESET_FILES, "smollm2-135m", entry)
    assert preset_file("smollm2-135m") == package / "m.gguf"
    assert "fake_model_pkg_xyz" not in sys.modules  # its __init__ is never run


def test_a_missing_file_names_the_command_that_fetches_it(empty_cache, monkeypatch):
    entry = dataclasses.replace(SMOLLM2, package="no_such_pkg_xyz")
    monkeypatch.setitem(files.PRESET_FILES, "smollm2-135m", entry)
    with pytest.raises(FileNotFoundError, match=r"fetch it with `edgepart fetch-model`$"):
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
