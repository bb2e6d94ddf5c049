"""Under CI=true a skipped test fails the run (tests/ci_skips.py); elsewhere it is a skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ("pytester",)

SKIPPING = """
import pytest

def test_needs_something():
    pytest.skip("nothing here")

@pytest.mark.skipif(True, reason="never here")
def test_marked():
    pass

@pytest.mark.xfail(reason="known")
def test_known():
    assert False
"""


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    tests = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    pytester.makeconftest('pytest_plugins = ("ci_skips",)')
    pytester.makepyfile(test_skipping=SKIPPING)
    return pytester


def test_a_skip_fails_under_ci(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    result = project.runpytest_subprocess()
    result.assert_outcomes(failed=1, errors=1, xfailed=1)  # a skipif fails in its setup
    result.stdout.fnmatch_lines(["*skipped under CI=true*nothing here*"])


def test_a_skip_is_a_skip_elsewhere(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CI", raising=False)
    project.runpytest_subprocess().assert_outcomes(skipped=2, xfailed=1)
