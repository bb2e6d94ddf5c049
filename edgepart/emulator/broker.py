"""MQTT brokers the emulator can start: amqtt in-process, or a mosquitto subprocess."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

log = logging.getLogger(__name__)

# Loggers amqtt (and its state-machine dependency) write INFO chatter to on every connection.
_NOISY_LOGGERS = ("amqtt", "transitions")

_MOSQUITTO_FALLBACK = "/usr/sbin/mosquitto"
_POLL_S = 0.02


class _DropStartupTraceback(logging.Filter):
    """Drop amqtt's startup-failure traceback: start() raises the same reason in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every record but amqtt's "Broker startup failed"."""
        return record.msg != "Broker startup failed"


_STARTUP_FILTER = _DropStartupTraceback()


class BrokerUnavailable(RuntimeError):
    """The broker's executable is not installed."""


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on `host` that was free a moment ago (the OS's pick for port 0)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def parse_endpoint(text: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:1883") into (host, port); ValueError when malformed."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"broker endpoint {text!r} is not of the form host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"broker endpoint {text!r}: write an IPv6 host in brackets, [::1]:1883")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"broker endpoint {text!r}: port {port_text!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"broker endpoint {text!r}: port {port} is outside 1-65535")
    if not host:
        raise ValueError(f"broker endpoint {text!r} has an empty host")
    return host, port


def _format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port_free(host: str, port: int) -> bool:
    # SO_REUSEADDR as the broker itself sets it: TIME_WAIT leftovers do not count as taken.
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _accepts_connections(host: str, port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


class _Broker:
    """What both brokers share: one TCP listener on host:port, started and stopped."""

    def __init__(self, host: str, port: int) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} is outside 0-65535")
        self._host = host
        self._port = port or free_port(host)

    @property
    def host(self) -> str:
        """Address the listener binds to."""
        return self._host

    @property
    def port(self) -> int:
        """TCP port the listener binds to."""
        return self._port

    @property
    def endpoint(self) -> str:
        """The listener as "host:port"."""
        return _format_endpoint(self._host, self._port)

    def start(self, timeout_s: float = 10.0) -> None:
        """Start serving; block until the listener accepts connections (s)."""
        raise NotImplementedError

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving (s); idempotent."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class SnapshotSubscriptions(dict):
    """amqtt's table of subscriptions, iterated over a snapshot.

    amqtt 0.12's broker walks its subscriptions with an ``await`` inside the loop (the
    retained messages of every topic, for each client that connects); a subscribe from
    another client in between raised "dictionary changed size during iteration" and
    dropped the connecting client, whose agent then waited out its reconnect. Iterating a
    copy lets both go on; the table itself is shared as before.
    """

    def __iter__(self):
        return iter(list(super().keys()))

    def items(self):  # type: ignore[override]
        return list(super().items())


class EmbeddedBroker(_Broker):
    """An amqtt broker serving plain MQTT 3.1.1 on TCP from its own thread and event loop."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Configure (not start) a broker on host:port; port 0 picks a free port."""
        if ":" in host:
            # amqtt 0.12 passes "[::1]" to getaddrinfo brackets and all, so the bind fails.
            raise ValueError(f"the embedded broker cannot listen on IPv6 address {host!r}")
        super().__init__(host, port)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.subscriptions: SnapshotSubscriptions | None = None  # the running broker's

    @property
    def running(self) -> bool:
        """Whether the broker's thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": self.endpoint}},
            # Listing plugins explicitly replaces amqtt's defaults (event/packet loggers and the
            # $SYS publisher every 20 s); without an auth plugin amqtt refuses every client.
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the broker thread and block until the listener accepts TCP connections (s)."""
        if self.running:
            return
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("amqtt.broker").addFilter(_STARTUP_FILTER)  # a no-op when present
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(
            target=self._run, name=f"edgepart-broker-{self._port}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout_s):
            self._abandon(timeout_s)
            raise RuntimeError(
                f"embedded MQTT broker on {self.endpoint} did not start within {timeout_s:g} s"
            )
        if self._error is not None:
            self._thread.join(timeout_s)
            self._thread = None
            raise RuntimeError(
                f"embedded MQTT broker could not listen on {self.endpoint}: {self._error}"
            ) from self._error

    def _abandon(self, timeout_s: float) -> None:
        # Start timed out: ask the loop to wind down if it got that far, and never block on it.
        loop, stop_requested = self._loop, self._stop_requested
        if loop is not None and stop_requested is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop_requested.set)
        if self._thread is not None:
            self._thread.join(min(timeout_s, 1.0))
        self._thread = None

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        # Kept for start() (or stop()) to report, rather than lost with the thread.
        except Exception as exc:
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        # amqtt is imported lazily: it pulls in websockets, transitions, dacite and more.
        from amqtt.broker import Broker

        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        broker = Broker(self._config())
        broker._subscriptions = SnapshotSubscriptions(broker._subscriptions)
        self.subscriptions = broker._subscriptions
        await broker.start()
        self._ready.set()
        try:
            await self._stop_requested.wait()
        finally:
            await broker.shutdown()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Shut the broker down and join its thread within timeout_s (s); a no-op when stopped."""
        thread, loop, stop_requested = self._thread, self._loop, self._stop_requested
        if thread is None:
            return
        if loop is not None and stop_requested is not None:
            # The loop may already be closed if the broker died on its own.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop_requested.set)
        thread.join(timeout_s)
        if thread.is_alive():
            raise RuntimeError(
                f"embedded MQTT broker on {self.endpoint} did not stop within {timeout_s:g} s"
            )
        if self._error is not None:
            log.warning("embedded MQTT broker on %s failed: %s", self.endpoint, self._error)
            self._error = None
        self._thread = None
        self._loop = None
        self._stop_requested = None


def mosquitto_path() -> str | None:
    """Path of the mosquitto executable, or None when it is not installed."""
    found = shutil.which("mosquitto")
    if found:
        return found
    # Debian installs it in /usr/sbin, which is not on a regular user's PATH.
    if os.access(_MOSQUITTO_FALLBACK, os.X_OK):
        return _MOSQUITTO_FALLBACK
    return None


def mosquitto_available() -> bool:
    """Whether a mosquitto executable is installed."""
    return mosquitto_path() is not None


# Started and not yet stopped: a child process outlives an interpreter that forgot to stop it.
_LIVE_MOSQUITTOS: set[Mosquitto] = set()


@atexit.register
def _stop_live_mosquittos() -> None:
    for broker in list(_LIVE_MOSQUITTOS):
        broker.stop(timeout_s=2.0)


class Mosquitto(_Broker):
    """A mosquitto subprocess serving anonymous MQTT on one TCP listener, without persistence."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Configure (not start) mosquitto on host:port; port 0 picks a free port."""
        super().__init__(host, port)
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: Path | None = None

    @property
    def running(self) -> bool:
        """Whether the mosquitto process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the current (or last) mosquitto process, None before the first start."""
        return None if self._proc is None else self._proc.pid

    def _log_text(self) -> str:
        if self._tmpdir is None:
            return ""
        try:
            return (self._tmpdir / "mosquitto.log").read_text(errors="replace").strip()
        except OSError:
            return ""

    def start(self, timeout_s: float = 10.0) -> None:
        """Launch mosquitto and block until it accepts TCP connections (s)."""
        if self.running:
            return
        binary = mosquitto_path()
        if binary is None:
            raise BrokerUnavailable(
                "mosquitto is not installed (apt-get install mosquitto), or use the embedded broker"
            )
        # The readiness probe below cannot tell mosquitto from another listener on the port.
        if not _port_free(self._host, self._port):
            raise RuntimeError(f"mosquitto cannot listen on {self.endpoint}: address in use")
        self._cleanup()  # files of an earlier run that died on its own
        self._tmpdir = Path(tempfile.mkdtemp(prefix="edgepart-mosquitto-"))
        conf = self._tmpdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self._port} {self._host}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            # without it every small message waits for the peer's delayed ACK (~40 ms)
            "set_tcp_nodelay true\n"
            "log_dest stderr\n"
            "log_type error\n"
            "log_type warning\n",
            encoding="utf-8",
        )
        # stderr goes to a file so a failed start can quote mosquitto's own reason.
        with open(self._tmpdir / "mosquitto.log", "wb") as err:
            self._proc = subprocess.Popen(
                [binary, "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            code = self._proc.poll()
            if code is not None:
                reason = self._log_text() or "no output"
                self._cleanup()
                raise RuntimeError(
                    f"mosquitto exited with code {code} while starting on {self.endpoint}: {reason}"
                )
            if _accepts_connections(self._host, self._port, _POLL_S * 5) and self.running:
                _LIVE_MOSQUITTOS.add(self)
                return
            if time.monotonic() >= deadline:
                reason = self._log_text() or "no output"
                self.stop()
                raise RuntimeError(
                    f"mosquitto did not accept connections on {self.endpoint} "
                    f"within {timeout_s:g} s: {reason}"
                )
            time.sleep(_POLL_S)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate mosquitto (kill after timeout_s, s) and remove its files; idempotent."""
        _LIVE_MOSQUITTOS.discard(self)
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout_s)
        # The log holds only errors and warnings; pass them on before the file goes.
        text = self._log_text()
        if proc is not None and text:
            log.warning("mosquitto on %s (exit %s): %s", self.endpoint, proc.returncode, text)
        self._cleanup()

    def _cleanup(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
