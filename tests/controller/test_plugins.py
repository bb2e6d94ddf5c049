"""Planner plugins: found through their entry point, their placements checked, their
failures named (a plugin written here as an installed distribution: a module and its
dist-info on the path, which is all an installer leaves)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgepart.controller.placement import Placement, algorithm_names, make_algorithm
from edgepart.controller.placement.plugins import PluginError, placement_problem
from edgepart.llm.blocks import block_table

REPO = Path(__file__).resolve().parents[2]
TOY = REPO / "scenarios" / "toy-5.yaml"
GiB = 2**30

PLANNER = """
import numpy as np
from edgepart.controller.placement import Placement

class Planner:
    name = "{name}"
    replans = True

    def place(self, view, model, current):
        mode = "{mode}"
        if mode == "raise":
            raise ZeroDivisionError("boom")
        if mode == "short":
            return Placement(np.zeros(model.size - 1, dtype=int))
        if mode == "all-on-one":  # every block on the slowest, smallest device
            return Placement(np.full(model.size, view.size - 1))
        usable = np.flatnonzero(view.usable)
        return Placement(usable[np.arange(model.size) % len(usable)])
"""


def install_plugin(site: Path, name: str, mode: str) -> None:
    """A distribution ``plugin-<name>`` with one planner entry point, as pip leaves it."""
    module = f"plugin_{name.replace('-', '_')}"
    (site / f"{module}.py").write_text(PLANNER.format(name=name, mode=mode))
    info = site / f"plugin_{module}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: plugin-{name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[edgepart.planners]\n{name} = {module}:Planner\n")


def edgepart(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    return subprocess.run(
        [sys.executable, "-m", "edgepart.controller.cli", *args],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip


def test_a_placement_that_cannot_run_is_named(make_view, tiny_spec) -> None:
    table = block_table(tiny_spec)
    view = make_view([10, 10, 10], [GiB, GiB, 1], alive=[True, False, True])
    fine = Placement(np.zeros(table.size, dtype=int))
    assert placement_problem(view, table, fine) is None
    assert "not a Placement" in placement_problem(view, table, [0] * table.size)
    assert "device indices for" in placement_problem(view, table, Placement(np.zeros(2, int)))
    assert "outside 0..2" in placement_problem(view, table, Placement(np.full(table.size, 3)))
    assert "gone: d1" in placement_problem(view, table, Placement(np.ones(table.size, int)))
    over = placement_problem(view, table, Placement(np.full(table.size, 2)))
    assert over is not None and "over memory" in over and "d2" in over


def test_plugins_are_listed_after_the_builtins_and_a_builtin_name_stays_builtin(
    tmp_path: Path,
) -> None:
    install_plugin(tmp_path, "spread", "spread")
    install_plugin(tmp_path, "myopic", "raise")  # cannot take a built-in's name
    listed = edgepart(tmp_path, "simulate", "--help")
    assert "spread" in listed.stdout
    run = edgepart(tmp_path, "simulate", str(TOY), "-a", "spread,myopic", "--json")
    assert run.returncode == 0, run.stderr
    assert [r["algorithm"] for r in json.loads(run.stdout)] == ["spread", "myopic"]
    assert "spread" not in algorithm_names()  # not installed in this process


@pytest.mark.parametrize(
    ("mode", "says"),
    [
        ("raise", "raised ZeroDivisionError('boom')"),
        ("short", "cannot run: "),
        ("all-on-one", "over memory"),
    ],
)
def test_a_broken_plugin_fails_the_run_naming_it(tmp_path: Path, mode: str, says: str) -> None:
    install_plugin(tmp_path, "broken", mode)
    for command in ("plan", "simulate"):
        run = edgepart(tmp_path, command, str(TOY), "-a", "broken")
        message = " ".join(run.stderr.split())
        assert run.returncode == 1, (command, run.stderr)
        assert "plugin 'broken'" in message and "plugin-broken 1.0" in message, message
        assert says in message and "Traceback" not in run.stderr


def test_an_unknown_name_lists_the_plugins_too(tmp_path: Path) -> None:
    install_plugin(tmp_path, "spread", "spread")
    run = edgepart(tmp_path, "plan", str(TOY), "-a", "nosuch")
    assert run.returncode == 2
    assert "myopic" in run.stderr and "spread" in run.stderr


def test_a_plugin_that_does_not_load_is_bad_input(tmp_path: Path) -> None:
    install_plugin(tmp_path, "gone", "spread")
    (tmp_path / "plugin_gone.py").unlink()
    run = edgepart(tmp_path, "plan", str(TOY), "-a", "gone")
    assert run.returncode == 2
    assert "plugin 'gone'" in run.stderr and "failed to load" in run.stderr


def test_make_algorithm_refuses_unknown_names() -> None:
    with pytest.raises(KeyError, match="unknown algorithm 'nosuch'"):
        make_algorithm("nosuch")
    assert issubclass(PluginError, RuntimeError)
