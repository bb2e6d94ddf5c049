"""A pytest plugin: under CI=true a skipped test fails the run.

A dead Docker engine or a missing mosquitto or Prometheus would otherwise turn a hundred
tests into skips and leave CI green. Loaded by tests/conftest.py.
"""

from __future__ import annotations

import os

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Under CI=true a skipped test fails: a dead Docker engine or a missing mosquitto or
    Prometheus must not turn a hundred tests into skips and leave the run green."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") != "true" or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = f"skipped under CI=true (everything a test needs must be there): {reason}"
