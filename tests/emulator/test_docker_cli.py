"""The docker runner and builders: labels and command lines (pure), and the runner's errors
on plain programs (sh, sleep), so no Docker engine is needed."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from edgepart.emulator import docker_cli
from edgepart.emulator.docker_cli import DockerError


class StepError(RuntimeError):
    """A caller's own error type."""


def test_labels_are_what_compose_and_swarm_put_on_containers():
    assert docker_cli.project_label("p") == "com.docker.compose.project=p"
    assert docker_cli.service_labels("p", "d0") == [
        "com.docker.compose.project=p",
        "com.docker.compose.service=d0",
    ]
    assert docker_cli.stack_service_label("s", "d0") == "com.docker.swarm.service.name=s_d0"
    assert docker_cli.sdk_filters(["a=1", "b=2"]) == {"label": ["a=1", "b=2"]}
    assert docker_cli.label_filters(["a=1", "b=2"]) == [
        "--filter", "label=a=1", "--filter", "label=b=2",
    ]  # fmt: skip


def test_command_lines():
    compose = Path("/x/compose.yaml")
    assert docker_cli.compose_command("p", compose, "up", "--detach") == [
        "docker", "compose", "-p", "p", "-f", "/x/compose.yaml", "up", "--detach",
    ]  # fmt: skip
    assert docker_cli.stack_deploy_command(compose, "s") == [
        "docker", "stack", "deploy", "--compose-file", "/x/compose.yaml", "s",
    ]  # fmt: skip
    assert docker_cli.stack_rm_command("s") == ["docker", "stack", "rm", "s"]
    assert docker_cli.exec_command("c", "cat", "f") == ["docker", "exec", "c", "cat", "f"]
    assert docker_cli.exec_command("c", "sh", interactive=True)[:3] == ["docker", "exec", "-i"]
    assert docker_cli.exec_command("c", "iperf3", detach=True)[:3] == ["docker", "exec", "-d"]
    assert docker_cli.ps_command(["a=1"], "-q") == [
        "docker", "ps", "-a", "-q", "--filter", "label=a=1",
    ]  # fmt: skip


def test_tail_keeps_the_last_lines():
    assert docker_cli.tail("a\nb\nc\n\n", 2) == "b\nc"
    assert docker_cli.tail(["a \n", "b\n"], 5) == "a\nb"


def test_a_short_call_returns_its_output_or_says_what_failed():
    assert docker_cli.run(["sh", "-c", "echo hi"]).stdout == "hi\n"
    done = docker_cli.run(["sh", "-c", "exit 4"], check=False)
    assert done.returncode == 4
    with pytest.raises(DockerError, match=r"(?s)^step failed:\n.*why$"):
        docker_cli.run(["sh", "-c", "echo noise; echo why >&2; exit 1"], what="step")
    with pytest.raises(StepError, match="sleep 30: no answer in 0 s"):
        docker_cli.run(["sleep", "30"], timeout_s=0.3, error=StepError)
    with pytest.raises(DockerError, match="not installed"):
        docker_cli.run(["edgepart-no-such-program"])


def test_an_attached_call_fails_with_a_clear_error():
    docker_cli.run_attached(["true"], timeout_s=30, what="true")
    with pytest.raises(DockerError, match=r"^false failed \(output above\)$"):
        docker_cli.run_attached(["false"], timeout_s=30, what="false")
    with pytest.raises(DockerError, match="sleep: no result after 0 s"):
        docker_cli.run_attached(["sleep", "30"], timeout_s=0.3, what="sleep")


def test_a_failed_step_reports_the_tail_of_its_output_and_a_hung_one_is_stopped():
    seen: list[str] = []
    with pytest.raises(StepError, match=r"(?s)step failed \(exit 3\).*\nb$"):
        docker_cli.stream(
            ["sh", "-c", "echo a; echo b; exit 3"],
            "step",
            timeout_s=30,
            on_line=seen.append,
            error=StepError,
        )
    assert seen == ["a", "b"]
    with pytest.raises(DockerError, match="no result after"):
        docker_cli.stream(["sleep", "30"], "sleep", timeout_s=0.3)


def test_a_stream_returns_its_output_and_a_stop_ends_it_without_error():
    text = docker_cli.stream(["sh", "-c", "echo a; echo b"], "two", timeout_s=30)
    assert text == "a\nb\n"
    assert docker_cli.stream(["sh", "-c", "exit 2"], "x", timeout_s=30, check=False) == ""
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    # run to its end, it would fail (exit 5): stopped, it is killed and no error is raised
    text = docker_cli.stream(
        ["sh", "-c", "echo up; sleep 30; exit 5"], "slow", timeout_s=60, stop=stop, keep_lines=None
    )
    assert text == "up\n"
