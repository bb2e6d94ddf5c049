"""How every edgepart role connects to the MQTT broker: one place for the client's options.

A role gets its broker credentials from a file (``--broker-auth FILE``), never on the
command line or in the environment: a JSON object ``{"username": ..., "password": ...}``,
optionally with ``"ca_file"``, the CA certificate that signed the broker's (a relative
path is relative to the credentials file's directory). With a ``ca_file`` the client
speaks TLS and checks the broker's certificate and host name. Without a credentials file
the client connects anonymously (the local backend's broker on loopback).

``edgepart testbed render`` writes these files (``edgepart.emulator.testbed_secrets``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt

from edgepart.control_plane import protocol as proto

DEFAULT_KEEPALIVE_S = 60  # aiomqtt's default
MQTT_TIMEOUT_S = 30.0  # per MQTT operation (s): an embedded broker on a loaded host is slow


@dataclass(frozen=True)
class BrokerAuth:
    """One identity's broker credentials (the password never shows in a repr or a log)."""

    username: str
    password: str = field(repr=False)
    ca_file: Path | None = None  # the broker's CA certificate: connect with TLS

    @classmethod
    def load(cls, path: Path | str) -> BrokerAuth:
        """Read a credentials file; ValueError names the file and what is wrong (never
        its contents)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"{path}: {exc.strerror or exc}") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path}: not a JSON credentials file") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a JSON object")
        unknown = set(data) - {"username", "password", "ca_file"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {', '.join(sorted(unknown))}")
        for key in ("username", "password"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise ValueError(f"{path}: {key!r} must be a non-empty string")
        ca_file = data.get("ca_file")
        if ca_file is not None:
            if not isinstance(ca_file, str) or not ca_file:
                raise ValueError(f"{path}: 'ca_file' must be a path")
            ca_file = path.parent / ca_file  # an absolute ca_file stays as it is
            if not ca_file.is_file():
                raise ValueError(f"{path}: ca_file {ca_file} does not exist")
        return cls(data["username"], data["password"], ca_file)

    def to_json(self) -> str:
        """The credentials file's text (``ca_file`` as given: relative stays relative)."""
        data: dict[str, str] = {"username": self.username, "password": self.password}
        if self.ca_file is not None:
            data["ca_file"] = str(self.ca_file)
        return json.dumps(data, indent=1) + "\n"


def load_auth(path: Path | str | None) -> BrokerAuth | None:
    """The credentials of a ``--broker-auth`` option, None without one (ValueError)."""
    return None if path is None else BrokerAuth.load(path)


def split_endpoint(broker: str) -> tuple[str, int]:
    """``host:port`` -> (host, port)."""
    host, _, port = broker.rpartition(":")
    return host, int(port)


def client(
    broker: str,
    *,
    identifier: str | None = None,
    auth: BrokerAuth | None = None,
    will: aiomqtt.Will | None = None,
    keepalive: int = DEFAULT_KEEPALIVE_S,
    timeout: float = MQTT_TIMEOUT_S,
) -> aiomqtt.Client:
    """A fresh (not yet connected) client of the broker at ``host:port``: a client whose
    connect failed is not reused, so every attempt calls this again. Sockets send at once
    (TCP_NODELAY); with ``auth`` it logs in, and with ``auth.ca_file`` it speaks TLS."""
    host, port = split_endpoint(broker)
    tls = None
    if auth is not None and auth.ca_file is not None:
        tls = aiomqtt.TLSParameters(ca_certs=str(auth.ca_file))
    return aiomqtt.Client(
        host,
        port,
        identifier=identifier,
        username=None if auth is None else auth.username,
        password=None if auth is None else auth.password,
        will=will,
        keepalive=keepalive,
        timeout=timeout,
        tls_params=tls,
        socket_options=proto.SOCKET_OPTIONS,
    )
