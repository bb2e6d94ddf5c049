"""The docker testbed's broker secrets: who may log in to the broker and what each may do.

They are made in one of two places, and never enter an image (the image is built from a
wheelhouse of the Python packages only), a command line or a log; each role finds its own
under ``/run/secrets/`` and is told the path:

- at start-up (``write_role_secrets``, the compose project's one-shot ``secrets``
  service): into one directory per role (``broker``, ``controller``, ``driver``,
  ``agent-<device>``), each a named volume only that role mounts, holding only what that
  role needs (``role_secrets``). Nothing on the host, so a project runs from a fresh clone;
- at render time (``write_secrets``, for a TLS project, whose certificates need openssl on
  the host, and for a swarm stack): into ``<project>/secrets/`` (mode 0700, every file
  0600, a ``.gitignore`` of ``*``), each file mounted read-only into the containers that
  need it (compose and swarm ``secrets:``).

- one identity per role: ``controller``, ``driver`` (the emulator driver) and
  ``agent-<device>`` per device agent, each with a random password
  (``mqtt-<identity>``: a JSON credentials file, ``edgepart.control_plane.mqtt.BrokerAuth``);
- ``broker-passwd``: mosquitto's password file (PBKDF2-SHA512, mosquitto's ``$7$``);
- ``broker-acl``: mosquitto's ACL. An agent may publish only its own telemetry, status and
  replies and read only its own commands, the placement and its peers' statuses; only the
  controller and the driver send commands; the placement and run topics are each written
  by the one role that owns them;
- ``dataplane-key``: the agents' shared data-plane secret (every agent signs its
  connections to its peers with it, ``edgepart.device_agent.dataplane``);
- with TLS: ``broker-ca`` (a CA made for this testbed; its key is thrown away once it
  signed), ``broker-cert`` and ``broker-key`` (the broker's, for the names ``broker``,
  ``localhost``, 127.0.0.1 and ::1).

Rendering again (or starting again) keeps every password, hash and certificate (running
containers keep working; unchanged files are not rewritten) unless asked to rotate them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from edgepart.control_plane import protocol as proto
from edgepart.control_plane.mqtt import BrokerAuth

#: where compose and swarm mount the secrets in a container
MOUNT_DIR = "/run/secrets"
#: the project's subdirectory that holds them on the host
SECRETS_DIR = "secrets"
CONTROLLER = "controller"
DRIVER = "driver"
#: the broker's own directory of secrets, when they are made at start-up
BROKER = "broker"
AGENT_PREFIX = "agent-"
PASSWD = "broker-passwd"
DATAPLANE_KEY = "dataplane-key"
ACL = "broker-acl"
CA_CERT = "broker-ca"
SERVER_CERT = "broker-cert"
SERVER_KEY = "broker-key"
TLS_FILES = (CA_CERT, SERVER_CERT, SERVER_KEY)
#: the names the broker's certificate is valid for (the compose service, and loopback)
SERVER_NAMES = ("DNS:broker", "DNS:localhost", "IP:127.0.0.1", "IP:::1")
#: mosquitto's own default: the passwords are 256 random bits, stretching adds nothing
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12  # as mosquitto_passwd
HASH_BYTES = 64
OPENSSL_TIMEOUT_S = 60.0


class SecretsError(RuntimeError):
    """The secrets could not be made (e.g. openssl missing for TLS)."""


def agent_user(device: str) -> str:
    """The broker identity of a device's agent."""
    return f"{AGENT_PREFIX}{device}"


def identities(devices: Iterable[str]) -> tuple[str, ...]:
    """Every identity of a testbed: the controller, the driver, one per device agent."""
    return (CONTROLLER, DRIVER, *(agent_user(d) for d in devices))


def credentials_secret(identity: str) -> str:
    """The secret (file name) holding an identity's credentials."""
    return f"mqtt-{identity}"


def secret_names(devices: Iterable[str], tls: bool) -> tuple[str, ...]:
    """Every secret a testbed's compose project mounts."""
    names = [PASSWD, ACL, DATAPLANE_KEY, *(credentials_secret(i) for i in identities(devices))]
    return (*names, *(TLS_FILES if tls else ()))


def role_secrets(role: str, tls: bool) -> tuple[str, ...]:
    """The secrets one role mounts: the broker its password file and ACL (with TLS, its
    certificate and key); a client its credentials (with TLS, the CA); an agent also the
    data-plane key."""
    if role == BROKER:
        return (PASSWD, ACL, *((SERVER_CERT, SERVER_KEY) if tls else ()))
    names = (credentials_secret(role), *((CA_CERT,) if tls else ()))
    return (*names, DATAPLANE_KEY) if role.startswith(AGENT_PREFIX) else names


# -- mosquitto's password file ------------------------------------------------------------


def password_hash(
    password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    """A password as mosquitto stores it: ``$7$<iterations>$<base64 salt>$<base64 hash>``
    (PBKDF2-HMAC-SHA512 over the raw salt, 64 bytes; mosquitto_passwd's format)."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, HASH_BYTES)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """Whether a ``$7$`` hash is of this password (False for anything else)."""
    try:
        _, kind, iterations, salt, digest = hashed.split("$")
        if kind != "7":
            return False
        expected = base64.b64decode(digest, validate=True)
        got = hashlib.pbkdf2_hmac(
            "sha512", password.encode(), base64.b64decode(salt, validate=True), int(iterations),
            len(expected),
        )  # fmt: skip
    except ValueError:
        return False
    return hmac.compare_digest(got, expected)


def parse_password_file(text: str) -> dict[str, str]:
    """username -> hash of a mosquitto password file (blank and # lines skipped)."""
    found = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and ":" in line:
            user, _, hashed = line.partition(":")
            found[user] = hashed
    return found


# -- mosquitto's ACL ----------------------------------------------------------------------


def acl(testbed: str, devices: Sequence[str]) -> str:
    """The ACL of a testbed (mosquitto ``acl_file``): what is not granted is denied;
    ``read`` is to subscribe and receive, ``write`` to publish."""

    def device(name: str, kind: proto.TopicKind) -> str:
        return proto.device_topic(testbed, name, kind)

    def run(kind: proto.RunKind) -> str:
        return proto.run_topic(testbed, kind)

    any_device = "+"
    rules: dict[str, list[tuple[str, str]]] = {
        CONTROLLER: [
            ("read", device(any_device, "status")),
            ("read", device(any_device, "telemetry")),
            ("read", device(any_device, "reply")),
            ("write", device(any_device, "cmd")),
            ("write", proto.placement_topic(testbed)),
            ("write", run("world")),
            ("read", run("world_ready")),
            ("write", run("progress")),
            ("write", run("result")),
        ],
        DRIVER: [
            ("write", device(any_device, "cmd")),  # the traces: burners, budgets, link rates
            ("read", device(any_device, "reply")),
            ("read", device(any_device, "status")),  # a device it started is online
            ("read", run("world")),
            ("write", run("world_ready")),
            ("read", run("progress")),
            ("read", run("result")),
        ],
    }
    for name in devices:
        rules[agent_user(name)] = [
            ("write", device(name, "telemetry")),
            ("write", device(name, "status")),  # also its last will
            ("write", device(name, "reply")),
            ("read", device(name, "cmd")),
            ("read", proto.placement_topic(testbed)),
            ("read", device(any_device, "status")),  # peers' data ports
        ]
    lines = [
        f"# Who may do what on the broker of testbed {testbed!r}: written by",
        "# `edgepart testbed render`; anything not granted here is denied.",
    ]
    for user, grants in rules.items():
        lines += ["", f"user {user}", *(f"topic {access} {topic}" for access, topic in grants)]
    return "\n".join(lines) + "\n"


# -- TLS ----------------------------------------------------------------------------------


def make_tls(openssl: str | None = None) -> dict[str, str]:
    """A CA of its own and the broker's certificate and key signed by it (PEM texts by
    secret name); the CA's key is not kept."""
    openssl = openssl or shutil.which("openssl")
    if openssl is None:
        raise SecretsError("--tls needs the openssl command (apt-get install openssl)")
    with tempfile.TemporaryDirectory(prefix="edgepart-tls-") as tmp:
        d = Path(tmp)
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        _openssl(
            openssl, "req", "-x509", *ec, "-keyout", d / "ca.key", "-out", d / "ca.crt",
            "-days", "3650", "-subj", "/CN=edgepart testbed CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        _openssl(
            openssl, "req", "-new", *ec, "-keyout", d / "broker.key", "-out", d / "broker.csr",
            "-subj", "/CN=broker",
        )  # fmt: skip
        (d / "ext.cnf").write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=serverAuth\n"
            f"subjectAltName={','.join(SERVER_NAMES)}\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid\n",
            encoding="ascii",
        )
        _openssl(
            openssl, "x509", "-req", "-in", d / "broker.csr", "-CA", d / "ca.crt",
            "-CAkey", d / "ca.key", "-set_serial", f"0x{secrets.token_hex(16)}",
            "-days", "825", "-extfile", d / "ext.cnf", "-out", d / "broker.crt",
        )  # fmt: skip
        return {
            CA_CERT: (d / "ca.crt").read_text(encoding="ascii"),
            SERVER_CERT: (d / "broker.crt").read_text(encoding="ascii"),
            SERVER_KEY: (d / "broker.key").read_text(encoding="ascii"),
        }


def _openssl(*args: str | Path) -> None:
    cmd = [str(a) for a in args]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=OPENSSL_TIMEOUT_S, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SecretsError(f"openssl {cmd[1]}: {exc}") from None
    if done.returncode != 0:
        raise SecretsError(f"openssl {cmd[1]} failed: {done.stderr.strip()[-500:]}")


# -- the secrets directory ----------------------------------------------------------------


def write_secrets(
    directory: Path,
    testbed: str,
    devices: Sequence[str],
    *,
    tls: bool = False,
    rotate: bool = False,
) -> dict[str, BrokerAuth]:
    """Write (or bring up to date) a testbed's secrets in directory; every identity's
    credentials as written (``ca_file`` relative to the directory). Existing passwords,
    hashes and certificates are kept unless ``rotate``; credentials of identities the
    scenario no longer has are removed."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    ignore = directory / ".gitignore"
    if not ignore.is_file():
        ignore.write_text("# generated secrets: never commit them\n*\n", encoding="ascii")
    names = identities(devices)
    if tls:
        if rotate or not all((directory / name).is_file() for name in TLS_FILES):
            for name, text in make_tls().items():
                _write_private(directory / name, text)
        else:
            for name in TLS_FILES:
                os.chmod(directory / name, 0o600)
    hashes = {} if rotate else _read_password_file(directory / PASSWD)
    creds: dict[str, BrokerAuth] = {}
    lines = []
    for identity in names:
        path = directory / credentials_secret(identity)
        password = None if rotate else _kept_password(path, identity)
        if password is None:
            password = secrets.token_urlsafe(32)
        auth = BrokerAuth(identity, password, Path(CA_CERT) if tls else None)
        _write_private(path, auth.to_json())
        creds[identity] = auth
        hashed = hashes.get(identity)
        if hashed is None or not verify_password(password, hashed):
            hashed = password_hash(password)
        lines.append(f"{identity}:{hashed}\n")
    _write_private(directory / PASSWD, "".join(lines))
    key = directory / DATAPLANE_KEY
    if rotate or not key.is_file() or len(key.read_bytes().strip()) < 32:
        _write_private(key, secrets.token_hex(32))
    else:
        os.chmod(key, 0o600)
    _write_private(directory / ACL, acl(testbed, devices))
    wanted = {credentials_secret(i) for i in names}
    for stale in directory.glob(credentials_secret("*")):
        if stale.name not in wanted:
            stale.unlink()
    return creds


def write_role_secrets(root: Path, testbed: str, devices: Sequence[str]) -> bool:
    """Make a testbed's secrets (no TLS) at start-up, one directory per role under root
    (``BROKER`` and every identity), each holding only that role's ``role_secrets``. Kept as
    they are when every one is there (a testbed started again keeps its passwords), else
    all made anew; True when made."""
    roles = (BROKER, *identities(devices))
    if all((root / role / name).is_file() for role in roles for name in role_secrets(role, False)):
        return False
    with tempfile.TemporaryDirectory(prefix="edgepart-secrets-") as tmp:
        made = Path(tmp)
        write_secrets(made, testbed, devices, rotate=True)
        for role in roles:
            directory = root / role
            directory.mkdir(parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
            for name in role_secrets(role, False):
                _write_private(directory / name, (made / name).read_text(encoding="utf-8"))
    return True


def _kept_password(path: Path, identity: str) -> str | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("username") != identity:
        return None
    password = data.get("password")
    return password if isinstance(password, str) and password else None


def _read_password_file(path: Path) -> dict[str, str]:
    try:
        return parse_password_file(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner may read; an unchanged file is left as it is (a running
    container's bind mount keeps seeing it), a changed one is replaced whole."""
    try:
        if path.read_text(encoding="utf-8") == text:
            os.chmod(path, 0o600)
            return
    except (OSError, ValueError):
        pass
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
