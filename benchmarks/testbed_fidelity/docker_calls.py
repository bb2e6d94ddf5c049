"""Every docker CLI call of the testbed benchmark, and the programs it ships into containers.

Each call goes through ``edgepart.emulator.docker_cli`` (its runner, ``docker ps`` and ``docker
exec`` command lines and compose labels), its failures raised as ``BenchError``.

- ``call``: one docker command line, bounded, its stdout (``BenchError`` on a failure);
- ``Scratch``: the containers and networks one part creates, all removed again;
- queries: ``container_ip``, ``compose_containers`` (one service of a compose project),
  ``memory_usage`` (``docker stats``), ``image_info`` (the image's id and whether its
  Python code is this tree's);
- programs: ``program_source`` (the text of a file under ``programs/``, which runs inside
  a container through ``python -c``) and ``LineProcess`` (a ``docker exec -i`` program
  answering one JSON line per command).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import queue
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT
from edgepart.emulator import docker_cli
from edgepart.emulator.images import PACKAGES

DOCKER_TIMEOUT_S = 60.0  # for any one docker call unless the caller says otherwise
PROGRAMS = Path(__file__).resolve().parent / "programs"


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says which and what docker said."""


def call(cmd: Sequence[str], *, timeout_s: float = DOCKER_TIMEOUT_S, check: bool = True) -> str:
    """One docker command line; its stdout (BenchError when docker is missing, after
    timeout_s, or with check on a non-zero exit)."""
    return docker_cli.run(cmd, timeout_s=timeout_s, check=check, error=BenchError).stdout


class Scratch:
    """Containers and networks this run creates; ``close`` removes every one of them."""

    def __init__(self, prefix: str) -> None:
        """Resources named ``<prefix>-...``."""
        self.prefix = prefix
        self.containers: list[str] = []
        self.networks: list[str] = []
        self.cleanup_errors: list[str] = []

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def name(self, what: str) -> str:
        """A resource name unique to this run."""
        return f"{self.prefix}-{what}"

    def network(self, what: str) -> str:
        """Create an internal bridge network (nothing leaves it); its name."""
        name = self.name(what)
        self.networks.append(name)  # before: a timed-out create may still have made it
        call(["docker", "network", "create", "--internal", name])
        return name

    def run(self, what: str, *args: str, timeout_s: float = DOCKER_TIMEOUT_S) -> str:
        """``docker run -d --name <prefix>-what ARGS``; the container's name."""
        name = self.name(what)
        self.containers.append(name)
        call(["docker", "run", "-d", "--name", name, *args], timeout_s=timeout_s)
        return name

    def close(self) -> None:
        """Remove the containers, then the networks (errors are kept, not raised)."""
        for name in reversed(self.containers):
            self._remove("rm", "-f", name)
        for name in reversed(self.networks):
            self._remove("network", "rm", name)
        self.containers.clear()
        self.networks.clear()

    def _remove(self, *args: str) -> None:
        cmd = ["docker", *args]
        try:
            done = docker_cli.run(cmd, timeout_s=DOCKER_TIMEOUT_S, check=False, error=BenchError)
        except BenchError as exc:  # docker missing or no answer
            self.cleanup_errors.append(str(exc))
            return
        err = done.stderr.strip()
        if done.returncode != 0 and "No such" not in err and "not found" not in err:
            self.cleanup_errors.append(f"docker {' '.join(args)}: {err}")


def container_ip(container: str, network: str) -> str:
    """The container's IPv4 address on a network."""
    template = f'{{{{(index .NetworkSettings.Networks "{network}").IPAddress}}}}'
    ip = call(["docker", "inspect", "-f", template, container]).strip()
    if not ip:
        raise BenchError(f"{container} has no address on {network}")
    return ip


def compose_containers(project: str, service: str, *options: str) -> str:
    """``docker ps -a OPTIONS`` of one service of a compose project (e.g. ``-q``); its output."""
    return call(docker_cli.ps_command(docker_cli.service_labels(project, service), *options))


def memory_usage() -> list[tuple[str, str]]:
    """Every running container's name and memory use as ``docker stats`` words it."""
    out = call(["docker", "stats", "--no-stream", "--format", "{{.Name}}\t{{.MemUsage}}"])
    rows = []
    for line in out.splitlines():
        name, _, usage = line.partition("\t")
        rows.append((name, usage))
    return rows


def _source_hashes() -> dict[str, str]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            out[str(path.relative_to(ROOT))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def image_info(tag: str, scratch: Scratch) -> dict[str, Any]:
    """The image's id and creation time, and whether its Python code is this tree's."""
    inspect = ["docker", "image", "inspect", "--format", "{{.Id}} {{.Created}}", tag]
    image_id, created = call(inspect).split()
    name = scratch.name("image-check")
    scratch.containers.append(name)
    listing = call([
        "docker", "run", "--rm", "--name", name, "--network", "none", "--entrypoint", "sh",
        image_id, "-c",
        "cd /opt/venv/lib/python3*/site-packages && "
        f"find {' '.join(PACKAGES)} -name '*.py' -exec sha256sum {{}} +",
    ], timeout_s=120)  # fmt: skip
    inside = {}
    for line in listing.splitlines():
        digest, _, path = line.strip().partition("  ")
        inside[path] = digest
    local = _source_hashes()
    differing = sorted(p for p in set(local) | set(inside) if local.get(p) != inside.get(p))
    return {
        "tag": tag,
        "id": image_id,
        "created": created,
        "code_matches_tree": not differing,
        "differing_files": differing,
    }


# ---------------------------------------------------------------- programs in containers


def program_source(name: str) -> str:
    """The text of ``programs/<name>.py``, for ``python -c`` inside a container."""
    return (PROGRAMS / f"{name}.py").read_text(encoding="utf-8")


class LineProcess:
    """A process fed commands on stdin that answers one JSON line each (bounded reads)."""

    def __init__(self, cmd: Sequence[str]) -> None:
        """Start cmd with pipes; a thread queues its stdout lines."""
        self.proc = subprocess.Popen(
            list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, bufsize=1,
        )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    @classmethod
    def in_container(cls, container: str, program: str, *args: str) -> LineProcess:
        """``docker exec -i CONTAINER python -u -c <programs/PROGRAM.py> ARGS``."""
        source = program_source(program)
        return cls(
            docker_cli.exec_command(
                container, "python", "-u", "-c", source, *args, interactive=True
            )
        )

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def read(self, timeout_s: float) -> dict[str, Any]:
        """The next JSON line (BenchError after timeout_s or when the process ended)."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"no answer from the shaper in {timeout_s:.0f} s")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise BenchError(f"the shaper process ended: {err.strip()[-1500:]}")
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)

    def send(self, text: str, timeout_s: float) -> dict[str, Any]:
        """Write one command line; its answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.read(timeout_s)

    def close(self) -> None:
        """Close stdin, wait briefly, then kill."""
        with contextlib.suppress(OSError):
            if self.proc.stdin:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
