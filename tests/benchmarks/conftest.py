"""Shared pieces of the benchmarks' smoke tests: number checks, the JSON reader, torch threads."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Benchmarks set torch's thread count (--threads, one-thread references): restore it."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture
def finite() -> Callable[[Any], bool]:
    """Whether a JSON value is a finite number (not a bool)."""
    return _number


@pytest.fixture
def positive() -> Callable[[Any], bool]:
    """Whether a JSON value is a finite number above zero (not a bool)."""
    return lambda value: _number(value) and value > 0


@pytest.fixture
def quick_json() -> Callable[[Path, str], dict]:
    """Reads DIR/<name>.json of a --quick run, checking that it says so."""

    def load(out: Path, name: str) -> dict:
        data = json.loads((out / f"{name}.json").read_text())
        assert data["benchmark"] == name and data["quick"] is True
        return data

    return load
