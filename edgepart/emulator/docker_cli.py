"""The one way edgepart talks to Docker: a CLI runner, pure command and label builders, the SDK.

- Labels and commands (pure): the labels docker compose puts on a project's containers,
  networks and volumes (``project_label``, ``service_labels``; a swarm stack's
  ``stack_service_label``), their filters for the CLI (``label_filters``) and the SDK
  (``sdk_filters``), and the command lines of ``docker compose``, ``docker stack``,
  ``docker ps`` and ``docker exec``.
- The runner (I/O): ``run`` for a short call whose output is captured, ``stream`` for a long
  one whose lines go to a callback as they come (also the image build's pip and bash steps),
  ``run_attached`` for one whose output goes to this terminal. Each has a timeout, leaves
  nothing running when it gives up, and raises one error saying what failed: the program
  missing, no result in time, or a failure with the tail of what it printed. The error is a
  ``DockerError`` unless the caller names its own (``error=ImageBuildError``).
- The SDK (I/O): ``client()`` opens ``docker.from_env()``, always closes it and turns the
  SDK's errors into ``DockerError``; ``project_containers`` lists a compose project's (or one
  service's) containers.

The docker SDK is imported only when a client is opened: importing this module is cheap.
"""

from __future__ import annotations

import collections
import contextlib
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the SDK is imported lazily (client())
    from docker import DockerClient

#: label docker compose puts on everything of a project (value: the project's name)
PROJECT_LABEL = "com.docker.compose.project"
#: label docker compose puts on a service's containers (value: the service's name)
SERVICE_LABEL = "com.docker.compose.service"
#: label docker swarm puts on a stack service's containers (value: <stack>_<service>)
STACK_SERVICE_LABEL = "com.docker.swarm.service.name"
SHORT_TIMEOUT_S = 30.0  # a docker CLI call that only asks the engine something, s
FAILURE_TAIL_LINES = 15  # lines of a failed short call's output its error quotes
STREAM_TAIL_LINES = 30  # lines of a failed long command's output its error quotes
STREAM_KEEP_LINES = 400  # lines of a long command's output kept by default
POLL_S = 0.5  # how often a long command's wait looks at its stop event, s
READER_JOIN_S = 5.0  # for the output reader to drain after the process ended, s

ErrorType = Callable[[str], Exception]
LineSink = Callable[[str], None]


class DockerError(RuntimeError):
    """A docker call failed: docker missing, no answer in time, or what docker said."""


# ---------------------------------------------------------------- labels and commands (pure)


def project_label(project: str) -> str:
    """The label of everything compose made for a project ("key=value")."""
    return f"{PROJECT_LABEL}={project}"


def service_labels(project: str, service: str) -> list[str]:
    """The labels of one compose service's containers ("key=value" each)."""
    return [project_label(project), f"{SERVICE_LABEL}={service}"]


def stack_service_label(stack: str, service: str) -> str:
    """The label of one swarm stack service's containers ("key=value")."""
    return f"{STACK_SERVICE_LABEL}={stack}_{service}"


def label_filters(labels: Iterable[str]) -> list[str]:
    """CLI options that keep what carries every one of the labels ("key=value" each)."""
    return [arg for label in labels for arg in ("--filter", f"label={label}")]


def sdk_filters(labels: Iterable[str]) -> dict[str, list[str]]:
    """The SDK's ``filters=`` that keep what carries every one of the labels."""
    return {"label": list(labels)}


def compose_command(project: str, compose_file: Path, *args: str) -> list[str]:
    """``docker compose`` on a project's compose file, with these arguments."""
    return ["docker", "compose", "-p", project, "-f", str(compose_file), *args]


def stack_deploy_command(compose_file: Path, stack: str) -> list[str]:
    """``docker stack deploy`` of a compose file as a swarm stack."""
    return ["docker", "stack", "deploy", "--compose-file", str(compose_file), stack]


def stack_rm_command(stack: str) -> list[str]:
    """``docker stack rm``: the stack's services, networks, configs and secrets."""
    return ["docker", "stack", "rm", stack]


def ps_command(labels: Iterable[str], *options: str) -> list[str]:
    """``docker ps -a`` of the containers carrying every label (options: --format, -q...)."""
    return ["docker", "ps", "-a", *options, *label_filters(labels)]


def exec_command(
    container: str, *argv: str, interactive: bool = False, detach: bool = False
) -> list[str]:
    """``docker exec`` of argv in a running container (interactive: its stdin stays open,
    for a process fed commands; detach: started in the background)."""
    options = ["-i"] * interactive + ["-d"] * detach
    return ["docker", "exec", *options, container, *argv]


def tail(lines: str | Iterable[str], n: int) -> str:
    """The last n lines of a text (or of lines), trailing blanks dropped."""
    if isinstance(lines, str):
        lines = lines.strip().splitlines()
    kept = collections.deque((line.rstrip() for line in lines), maxlen=n)
    return "\n".join(kept)


def _not_installed(cmd: Sequence[str], what: str) -> str:
    """The message of a program that is not installed."""
    if cmd[0] == "docker":
        return f"{what}: docker is not installed; run compose/docker-setup.sh (as root)"
    return f"{what}: {cmd[0]} is not installed"


# ---------------------------------------------------------------- the runner (I/O)


def run(
    cmd: Sequence[str],
    *,
    timeout_s: float = SHORT_TIMEOUT_S,
    check: bool = True,
    what: str | None = None,
    error: ErrorType = DockerError,
) -> subprocess.CompletedProcess[str]:
    """A short call with its output captured (``what`` names it in errors; default: its
    first words). Raises ``error`` when the program is missing or gives no answer in
    timeout_s, and, with check, when it exits non-zero (the tail of what it said)."""
    what = what or " ".join(cmd[:4])
    try:
        done = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError:
        raise error(_not_installed(cmd, what)) from None
    except subprocess.TimeoutExpired:
        raise error(f"{what}: no answer in {timeout_s:.0f} s") from None
    if check and done.returncode != 0:
        raise error(f"{what} failed:\n{tail(done.stderr or done.stdout, FAILURE_TAIL_LINES)}")
    return done


def run_attached(
    cmd: Sequence[str], *, timeout_s: float, what: str, error: ErrorType = DockerError
) -> None:
    """A call whose output goes to this terminal; ``error`` when the program is missing,
    runs over timeout_s (killed) or fails ("output above")."""
    try:
        code = subprocess.run(list(cmd), stdin=subprocess.DEVNULL, timeout=timeout_s).returncode
    except FileNotFoundError:
        raise error(_not_installed(cmd, what)) from None
    except subprocess.TimeoutExpired:
        raise error(f"{what}: no result after {timeout_s:.0f} s (output above)") from None
    if code != 0:
        raise error(f"{what} failed (output above)")


def stream(
    cmd: Sequence[str],
    what: str,
    *,
    timeout_s: float,
    on_line: LineSink | None = None,
    error: ErrorType = DockerError,
    check: bool = True,
    stop: threading.Event | None = None,
    keep_lines: int | None = STREAM_KEEP_LINES,
) -> str:
    """A long command, each line of its output (stdout and stderr merged) fed to on_line as
    it comes; the last keep_lines lines (None: all) of it.

    Raises ``error`` with the tail of the output when the program is missing, runs over
    timeout_s or, with check, exits non-zero. Setting ``stop`` (from another thread) ends
    the command early without an error. Killed on any way out, Ctrl-C included.
    """
    try:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
    except FileNotFoundError:
        raise error(_not_installed(cmd, what)) from None
    lines: collections.deque[str] = collections.deque(maxlen=keep_lines)
    reader = threading.Thread(target=_pump, args=(proc, lines, on_line), daemon=True)
    reader.start()
    try:
        code = _wait(proc, timeout_s, stop)
    finally:
        if proc.poll() is None:  # over time, stopped, or Ctrl-C: leave nothing running
            proc.kill()
            proc.wait()
        reader.join(timeout=READER_JOIN_S)
    if code is None and not (stop is not None and stop.is_set()):
        raise error(
            f"{what}: no result after {timeout_s:.0f} s; last output:\n"
            f"{tail(lines, STREAM_TAIL_LINES)}"
        )
    if check and code not in (None, 0):
        raise error(f"{what} failed (exit {code}); last output:\n{tail(lines, STREAM_TAIL_LINES)}")
    return "".join(lines)


def _pump(proc: subprocess.Popen[str], lines: collections.deque[str], on_line) -> None:
    """Read a process's output to its end, keeping lines and feeding on_line."""
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if on_line is not None:
            on_line(line.rstrip("\r\n"))


def _wait(
    proc: subprocess.Popen[str], timeout_s: float, stop: threading.Event | None
) -> int | None:
    """The process's exit code; None when timeout_s passed or stop was set first."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or (stop is not None and stop.is_set()):
            return None
        try:
            return proc.wait(timeout=min(left, POLL_S) if stop is not None else left)
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------- the SDK (I/O)


@contextlib.contextmanager
def client() -> Iterator[DockerClient]:
    """A docker SDK client for the with block, always closed; the SDK's errors (engine
    down, API errors) come out as DockerError."""
    import docker
    from docker.errors import DockerException

    try:
        sdk = docker.from_env()
    except DockerException as exc:
        raise DockerError(f"the Docker engine does not answer: {exc}") from None
    try:
        yield sdk
    except DockerException as exc:
        raise DockerError(f"docker: {exc}") from exc
    finally:
        sdk.close()


def project_containers(
    sdk: DockerClient, project: str, service: str | None = None, *, stopped: bool = False
) -> list[Any]:
    """The containers of a compose project (of one of its services): running ones, and
    with ``stopped`` also the exited ones."""
    labels = [project_label(project)] if service is None else service_labels(project, service)
    return sdk.containers.list(all=stopped, filters=sdk_filters(labels))
