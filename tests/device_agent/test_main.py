"""``python -m edgepart.device_agent``'s options: the weight cache directory, the time dilation."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgepart.device_agent.__main__ import config_from_args

BASE = ["--name", "a", "--broker", "127.0.0.1:1883"]


def test_the_weight_cache_defaults_to_the_edgepart_cache_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("EDGEPART_CACHE", str(tmp_path))
    assert config_from_args(BASE).weight_cache == str(tmp_path)
    assert config_from_args([*BASE, "--weight-cache", "/w"]).weight_cache == "/w"
    assert config_from_args([*BASE, "--no-weight-cache"]).weight_cache is None


def test_a_weight_cache_and_none_at_once_is_bad_input() -> None:
    with pytest.raises(SystemExit) as exited:
        config_from_args([*BASE, "--weight-cache", "/w", "--no-weight-cache"])
    assert exited.value.code == 2


def test_the_time_dilation_defaults_to_one_and_is_never_less() -> None:
    assert config_from_args(BASE).time_dilation == 1.0
    assert config_from_args([*BASE, "--time-dilation", "2.5"]).time_dilation == 2.5
    with pytest.raises(SystemExit) as exited:
        config_from_args([*BASE, "--time-dilation", "0.5"])
    assert exited.value.code == 2
