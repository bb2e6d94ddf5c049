"""examples/planner-plugin, installed by pip as a user would, runs through ``simulate`` and
``emulate --backend local`` (real agents, the tiny live model) by its entry point alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from live_e2e import SCENARIO, reference_ids

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "planner-plugin"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the example plugin installed (no dependencies: edgepart is here)."""
    source = tmp_path_factory.mktemp("src") / "planner-plugin"
    shutil.copytree(EXAMPLE, source)  # pip builds in place: keep the repository clean
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--target", str(target), str(source)],
        check=True, timeout=300,
    )  # fmt: skip
    return target


def edgepart(site: Path, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    return subprocess.run(
        [sys.executable, "-m", "edgepart.controller.cli", *args],
        capture_output=True, text=True, env=env, timeout=timeout_s,
    )  # fmt: skip


def test_the_example_plugin_simulates_beside_the_builtins(site: Path) -> None:
    run = edgepart(site, "simulate", str(REPO / "scenarios" / "demo.yaml"),
                   "-a", "round-robin,edgeshard", "--json")  # fmt: skip
    assert run.returncode == 0, run.stderr
    results = {r["algorithm"]: r for r in json.loads(run.stdout)}
    assert set(results) == {"round-robin", "edgeshard"}
    assert results["round-robin"]["total_s"] > 0


def test_the_example_plugin_emulates_on_real_agents(
    site: Path, tmp_path: Path, tiny_live_model: Path
) -> None:
    scenario = tmp_path / "plugin.yaml"
    scenario.write_text(json.dumps({**SCENARIO, "model": {"hf": str(tiny_live_model)}}))
    run = edgepart(site, "emulate", str(scenario), "--backend", "local",
                   "-a", "round-robin", "--out", str(tmp_path / "out"), "--json")  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)  # one algorithm: one object
    assert result["algorithm"] == "round-robin"
    assert result["output_token_ids"] == reference_ids(model=str(tiny_live_model))


DOCKER_RUN = """
import json, sys
from pathlib import Path
from edgepart.emulator.backends.docker import run_docker
from edgepart.emulator.images import build_image
from edgepart.emulator.scenario import load_scenario

path, tag, work = sys.argv[1:4]
build_image(tag)  # carries the plugin installed beside edgepart
run = run_docker(load_scenario(path), open(path).read(), "round-robin", work_dir=Path(work),
                 image=tag)
print(json.dumps({"algorithm": run.result.algorithm, "ids": run.result.output_token_ids}))
"""


def test_the_example_plugin_plans_in_the_docker_testbed(site: Path, tmp_path: Path) -> None:
    from edgepart.emulator.images import docker_available

    assert docker_available(), "the Docker engine is not running (compose/docker-setup.sh)"
    scenario = tmp_path / "plugin.yaml"
    scenario.write_text(json.dumps({**SCENARIO, "traces": []}))
    tag = "edgepart:plugin-test"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    try:
        run = subprocess.run(
            [sys.executable, "-c", DOCKER_RUN, str(scenario), tag, str(tmp_path / "work")],
            capture_output=True, text=True, env=env, timeout=900,
        )  # fmt: skip
    finally:
        subprocess.run(["docker", "rmi", "--force", tag], capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == {"algorithm": "round-robin", "ids": reference_ids()}
