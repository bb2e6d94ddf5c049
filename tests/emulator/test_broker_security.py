"""The testbed's broker security on a real mosquitto: the files `testbed render` writes
(password file, ACL, credentials, TLS) run on this host's loopback with the rendered
mosquitto.conf. Nobody gets in without a password; an agent can neither command a device
(another's or its own) nor speak for another device nor move the placement; TLS needs
the testbed's CA.

An ACL-denied publish is dropped in silence, so each check is made deterministic with a
marker: after the denied publishes the same client publishes an allowed message that the
observers also receive. mosquitto handles one connection's publishes in order and delivers
to each subscriber in order, so once the marker is in, a delivered denied message would
have come before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from edgepart.control_plane import mqtt
from edgepart.control_plane import protocol as proto
from edgepart.control_plane.mqtt import BrokerAuth
from edgepart.emulator.broker import free_port, mosquitto_path
from edgepart.emulator.compose import mosquitto_conf
from edgepart.emulator.driver import Driver
from edgepart.emulator.scenario import parse_scenario
from edgepart.emulator.testbed_secrets import (
    ACL,
    BROKER,
    CA_CERT,
    CONTROLLER,
    DATAPLANE_KEY,
    DRIVER,
    PASSWD,
    TLS_FILES,
    acl,
    agent_user,
    credentials_secret,
    identities,
    parse_password_file,
    password_hash,
    role_secrets,
    verify_password,
    write_role_secrets,
    write_secrets,
)

TESTBED = "sec"
DEVICES = ("a", "b")
TIMEOUT_S = 10.0  # bounds every wait on the broker; each wait is on a condition
AGENT_START_S = 120.0  # an agent process opens the model before it connects

needs_mosquitto = pytest.mark.skipif(
    mosquitto_path() is None, reason="mosquitto missing: apt-get install mosquitto"
)


# -- files (no broker) --------------------------------------------------------------------


def test_password_hashes_are_mosquittos_pbkdf2_format() -> None:
    hashed = password_hash("s3cret", salt=bytes(range(12)))
    assert hashed.startswith("$7$101$AAECAwQFBgcICQoL$")
    _, kind, iterations, salt, digest = hashed.split("$")
    assert (kind, iterations, len(salt), len(digest)) == ("7", "101", 16, 88)
    assert verify_password("s3cret", hashed)
    assert not verify_password("s3creT", hashed)
    assert password_hash("s3cret") != password_hash("s3cret")  # a fresh salt each time
    assert not verify_password("s3cret", "$6$abc$def")


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="no mosquitto_passwd")
def test_mosquitto_passwd_hashes_verify_here(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    done = subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(path), "alice", "s3cret"],
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    hashed = parse_password_file(path.read_text())["alice"]
    assert hashed.startswith("$7$")
    assert verify_password("s3cret", hashed)
    assert not verify_password("other", hashed)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_secrets_are_private_and_a_render_again_keeps_them(tmp_path: Path) -> None:
    d = tmp_path / "secrets"
    first = write_secrets(d, TESTBED, DEVICES)
    assert set(first) == {CONTROLLER, DRIVER, agent_user("a"), agent_user("b")}
    assert _mode(d) == 0o700
    for path in d.iterdir():
        if path.name != ".gitignore":
            assert _mode(path) == 0o600, path.name
    assert (d / ".gitignore").read_text().splitlines()[-1] == "*"
    passwd = (d / PASSWD).read_bytes()
    hashes = parse_password_file(passwd.decode())
    for identity, auth in first.items():
        assert BrokerAuth.load(d / credentials_secret(identity)) == auth
        assert verify_password(auth.password, hashes[identity])
    assert len({auth.password for auth in first.values()}) == len(first)

    key = (d / DATAPLANE_KEY).read_bytes()
    assert len(key) == 64 and key not in passwd

    again = write_secrets(d, TESTBED, DEVICES)
    assert again == first
    assert (d / PASSWD).read_bytes() == passwd  # byte for byte: a swarm secret stays valid
    assert (d / DATAPLANE_KEY).read_bytes() == key

    rotated = write_secrets(d, TESTBED, DEVICES, rotate=True)
    assert all(rotated[i].password != first[i].password for i in first)
    assert (d / DATAPLANE_KEY).read_bytes() != key

    # a device gone from the scenario loses its identity
    fewer = write_secrets(d, TESTBED, ("a",))
    assert agent_user("b") not in fewer
    assert not (d / credentials_secret(agent_user("b"))).exists()
    assert agent_user("b") not in parse_password_file((d / PASSWD).read_text())
    assert "user agent-b" not in (d / ACL).read_text()


def test_secrets_made_at_start_up_give_each_role_only_its_own(tmp_path: Path) -> None:
    root = tmp_path / "volumes"
    assert write_role_secrets(root, TESTBED, DEVICES)
    roles = (BROKER, *identities(DEVICES))
    assert sorted(p.name for p in root.iterdir()) == sorted(roles)
    for role in roles:
        assert _mode(root / role) == 0o700
        assert sorted(p.name for p in (root / role).iterdir()) == sorted(role_secrets(role, False))
        assert all(_mode(p) == 0o600 for p in (root / role).iterdir())
    hashes = parse_password_file((root / BROKER / PASSWD).read_text())
    for identity in identities(DEVICES):
        auth = BrokerAuth.load(root / identity / credentials_secret(identity))
        assert verify_password(auth.password, hashes[identity])
    keys = {(root / agent_user(d) / DATAPLANE_KEY).read_bytes() for d in DEVICES}
    assert len(keys) == 1  # the agents share the data plane's key
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    # started again: every password kept; one missing: all made anew
    assert not write_role_secrets(root, TESTBED, DEVICES)
    assert {p: p.read_bytes() for p in before} == before
    (root / DRIVER / credentials_secret(DRIVER)).unlink()
    assert write_role_secrets(root, TESTBED, DEVICES)
    again = root / CONTROLLER / credentials_secret(CONTROLLER)
    assert again.read_bytes() != before[again]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_tls_files_are_kept_until_rotated(tmp_path: Path) -> None:
    d = tmp_path / "secrets"
    creds = write_secrets(d, TESTBED, DEVICES, tls=True)
    assert all(auth.ca_file == Path(CA_CERT) for auth in creds.values())
    loaded = BrokerAuth.load(d / credentials_secret(CONTROLLER))
    assert loaded.ca_file == d / CA_CERT  # relative to the credentials file
    pems = {name: (d / name).read_text() for name in TLS_FILES}
    assert "PRIVATE KEY" in pems["broker-key"] and "CERTIFICATE" in pems["broker-ca"]
    write_secrets(d, TESTBED, DEVICES, tls=True)
    assert {name: (d / name).read_text() for name in TLS_FILES} == pems
    write_secrets(d, TESTBED, DEVICES, tls=True, rotate=True)
    assert (d / CA_CERT).read_text() != pems[CA_CERT]
    assert not list(d.glob("*.key")) and not list(d.glob("ca*"))  # the CA key is not kept


def test_the_acl_grants_each_identity_only_its_part() -> None:
    text = acl(TESTBED, DEVICES)
    sections = {
        block.splitlines()[0].removeprefix("user "): set(block.splitlines()[1:])
        for block in text.split("\n\n")[1:]
    }
    p = f"edgepart/{TESTBED}"
    assert sections[agent_user("a")] == {
        f"topic write {p}/devices/a/telemetry",
        f"topic write {p}/devices/a/status",
        f"topic write {p}/devices/a/reply",
        f"topic read {p}/devices/a/cmd",
        f"topic read {p}/placement",
        f"topic read {p}/devices/+/status",
    }
    writers = {
        user for user, grants in sections.items() for g in grants if g.endswith("/cmd")
        and g.startswith("topic write")
    }  # fmt: skip
    assert writers == {CONTROLLER, DRIVER}
    placement = {u for u, grants in sections.items() if f"topic write {p}/placement" in grants}
    assert placement == {CONTROLLER}


def test_credentials_errors_name_the_file_never_the_password(tmp_path: Path) -> None:
    auth = BrokerAuth("agent-a", "hunter2-very-secret")
    assert "hunter2" not in repr(auth) and "hunter2" not in str(auth)
    broken = tmp_path / "creds"
    broken.write_text('{"username": "a", "password": "hunter2-very-secret"')
    with pytest.raises(ValueError) as info:
        BrokerAuth.load(broken)
    assert str(broken) in str(info.value) and "hunter2" not in str(info.value)
    broken.write_text('{"username": "a", "password": "hunter2", "ca_file": "nope"}')
    with pytest.raises(ValueError, match="ca_file"):
        BrokerAuth.load(broken)
    with pytest.raises(ValueError, match="does-not-exist"):
        BrokerAuth.load(tmp_path / "does-not-exist")


# -- a real mosquitto with the rendered files -----------------------------------------------


@contextlib.contextmanager
def secured_broker(
    tmp_path: Path, tls: bool = False, at_start: bool = False
) -> Iterator[tuple[str, dict]]:
    """mosquitto with the rendered conf, password file and ACL on a loopback port; yields
    its endpoint and every identity's credentials (as the roles load them). ``at_start``:
    the secrets as a project's start-up makes them, each role's in its own folder."""
    d = tmp_path / "secrets"
    if at_start:
        write_role_secrets(d, TESTBED, DEVICES)
        broker_dir = d / BROKER
        auths = {i: BrokerAuth.load(d / i / credentials_secret(i)) for i in identities(DEVICES)}
    else:
        creds = write_secrets(d, TESTBED, DEVICES, tls=tls)
        broker_dir = d
        auths = {i: BrokerAuth.load(d / credentials_secret(i)) for i in creds}
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    text = mosquitto_conf(tls=tls, port=port, host="127.0.0.1", secrets_dir=str(broker_dir))
    conf.write_text(text + "log_dest stderr\n", encoding="utf-8")
    log_path = tmp_path / "mosquitto.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [mosquitto_path(), "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mosquitto exited with {proc.returncode}: {log_path.read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"mosquitto did not listen in {TIMEOUT_S} s: {log_path.read_text()}")
            time.sleep(0.02)
        yield f"127.0.0.1:{port}", auths
    finally:
        proc.terminate()
        try:
            proc.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(TIMEOUT_S)


def _client(endpoint: str, auth: BrokerAuth | None, identifier: str | None = None):
    return mqtt.client(endpoint, identifier=identifier, auth=auth, timeout=TIMEOUT_S)


async def _until(client: aiomqtt.Client, marker: bytes) -> list[tuple[str, bytes]]:
    """Every message the client receives up to and including the one with this payload."""
    seen: list[tuple[str, bytes]] = []

    async def scan() -> list[tuple[str, bytes]]:
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            seen.append((message.topic.value, payload))
            if payload == marker:
                return seen
        raise AssertionError("message stream ended")

    try:
        return await asyncio.wait_for(scan(), TIMEOUT_S)
    except TimeoutError:
        raise AssertionError(f"no {marker!r} in {TIMEOUT_S} s; got {seen}") from None


async def _subscribe(client: aiomqtt.Client, *filters: str) -> None:
    for f in filters:
        granted = await client.subscribe(f, qos=1)
        codes = [getattr(g, "value", g) for g in granted]
        assert all(c < 0x80 for c in codes), f"{f}: refused ({codes})"


def _device(device: str, kind: proto.TopicKind) -> str:
    return proto.device_topic(TESTBED, device, kind)


@needs_mosquitto
@pytest.mark.parametrize("at_start", [False, True], ids=["rendered", "made-at-start"])
def test_nobody_gets_in_without_the_right_password(tmp_path: Path, at_start: bool) -> None:
    async def scenario(endpoint: str, auths: dict) -> None:
        refused = [
            None,  # anonymous
            BrokerAuth(CONTROLLER, "not-the-password"),
            BrokerAuth(agent_user("a"), auths[agent_user("b")].password),  # another's password
            BrokerAuth("intruder", auths[CONTROLLER].password),
        ]
        for auth in refused:
            with pytest.raises(aiomqtt.MqttError):
                async with _client(endpoint, auth):
                    pass
        for auth in auths.values():
            async with _client(endpoint, auth):
                pass

    with secured_broker(tmp_path, at_start=at_start) as (endpoint, auths):
        asyncio.run(scenario(endpoint, auths))


@needs_mosquitto
def test_an_agent_can_only_do_its_own_part(tmp_path: Path) -> None:
    a, b = agent_user("a"), agent_user("b")

    async def scenario(endpoint: str, auths: dict) -> None:
        async with (
            _client(endpoint, auths[a]) as agent_a,
            _client(endpoint, auths[b]) as agent_b,
            _client(endpoint, auths[CONTROLLER]) as controller,
            _client(endpoint, auths[DRIVER]) as driver,
        ):
            # each subscribes to what its code subscribes to (and an agent tries for more)
            status = proto.subscription(TESTBED, "status")
            await _subscribe(agent_a, _device("a", "cmd"), proto.placement_topic(TESTBED), status)
            await _subscribe(agent_b, _device("b", "cmd"), proto.placement_topic(TESTBED), status)
            await agent_a.subscribe(_device("b", "cmd"), qos=1)  # granted or not: never served
            await _subscribe(
                controller,
                *(proto.subscription(TESTBED, k) for k in ("status", "telemetry", "reply")),
                proto.run_topic(TESTBED, "world_ready"),
            )
            await _subscribe(
                driver,
                *(proto.subscription(TESTBED, k) for k in ("world", "progress", "result")),
                proto.subscription(TESTBED, "reply"),
                proto.subscription(TESTBED, "status"),
            )

            # agent a: commands to b and to itself, the placement, b's status and reply, a
            # world turn's answer -- then its own status, which everyone above reads
            for topic in (
                _device("b", "cmd"),
                _device("a", "cmd"),
                proto.placement_topic(TESTBED),
                _device("b", "status"),
                _device("b", "reply"),
                _device("b", "telemetry"),
                proto.run_topic(TESTBED, "world_ready"),
                proto.run_topic(TESTBED, "result"),
            ):
                await agent_a.publish(topic, b"forged", qos=1)
            await agent_a.publish(_device("a", "status"), b"marker-a", qos=1)
            await agent_a.publish(_device("a", "reply"), b"marker-a-reply", qos=1)
            for observer in (agent_a, agent_b):
                seen = await _until(observer, b"marker-a")
                assert seen == [(_device("a", "status"), b"marker-a")], seen
            assert await _until(controller, b"marker-a-reply") == [
                (_device("a", "status"), b"marker-a"),
                (_device("a", "reply"), b"marker-a-reply"),
            ]
            assert await _until(driver, b"marker-a-reply") == [
                (_device("a", "status"), b"marker-a"),
                (_device("a", "reply"), b"marker-a-reply"),
            ]

            # what the controller sends reaches b, and b's own (allowed) output reaches the
            # controller; agent a, subscribed to b's commands, never gets them
            await controller.publish(_device("b", "cmd"), b"cmd-from-controller", qos=1)
            await controller.publish(proto.placement_topic(TESTBED), b"placement", qos=1)
            assert [p for _, p in await _until(agent_b, b"placement")] == [
                b"cmd-from-controller",
                b"placement",
            ]
            assert [p for _, p in await _until(agent_a, b"placement")] == [b"placement"]
            await agent_b.publish(_device("b", "reply"), b"reply-b", qos=1)
            assert [p for _, p in await _until(controller, b"reply-b")] == [b"reply-b"]

            # the driver commands devices but does not move the placement
            await driver.publish(proto.placement_topic(TESTBED), b"forged", qos=1)
            await driver.publish(_device("b", "cmd"), b"cmd-from-driver", qos=1)
            assert [p for _, p in await _until(agent_b, b"cmd-from-driver")] == [b"cmd-from-driver"]

    with secured_broker(tmp_path) as (endpoint, auths):
        asyncio.run(scenario(endpoint, auths))


@needs_mosquitto
def test_one_identity_cannot_take_over_anothers_session(tmp_path: Path) -> None:
    """The client id is the username: an agent naming the controller's client id does not
    disconnect the controller."""

    async def scenario(endpoint: str, auths: dict) -> None:
        controller_id = f"edgepart-{TESTBED}-controller"
        async with _client(endpoint, auths[CONTROLLER], controller_id) as controller:
            await _subscribe(controller, proto.subscription(TESTBED, "status"))
            async with _client(endpoint, auths[agent_user("a")], controller_id) as agent_a:
                await agent_a.publish(_device("a", "status"), b"still-there", qos=1)
                assert [p for _, p in await _until(controller, b"still-there")] == [b"still-there"]

    with secured_broker(tmp_path) as (endpoint, auths):
        asyncio.run(scenario(endpoint, auths))


@needs_mosquitto
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_tls_needs_the_testbeds_ca(tmp_path: Path) -> None:
    async def scenario(endpoint: str, auths: dict) -> None:
        controller = auths[CONTROLLER]
        assert controller.ca_file is not None
        async with _client(endpoint, controller) as client:  # TLS, the broker's cert checked
            await _subscribe(client, proto.subscription(TESTBED, "status"))
            await client.publish(proto.placement_topic(TESTBED), b"over-tls", qos=1)
        plain = BrokerAuth(controller.username, controller.password)  # no TLS at all
        # the broker takes the CONNECT for the start of a long TLS record and waits for the
        # rest: no CONNACK ever comes (a short timeout keeps the test short)
        with pytest.raises(aiomqtt.MqttError):
            async with mqtt.client(endpoint, auth=plain, timeout=2.0):
                pass
        # TLS, but trusting only the system's CAs: the testbed's certificate is refused
        system_ca = aiomqtt.Client(
            *mqtt.split_endpoint(endpoint),
            username=controller.username,
            password=controller.password,
            tls_params=aiomqtt.TLSParameters(),
            timeout=TIMEOUT_S,
        )
        with pytest.raises(aiomqtt.MqttError, match=r"(?i)certificate"):
            async with system_ca:
                pass

    with secured_broker(tmp_path, tls=True) as (endpoint, auths):
        asyncio.run(scenario(endpoint, auths))


# -- the roles, with --broker-auth ---------------------------------------------------------


@needs_mosquitto
def test_an_agent_process_joins_with_its_credentials_file(tmp_path: Path) -> None:
    """A real agent logs in with --broker-auth, subscribes, answers the controller and
    publishes its telemetry; its last will (offline) passes the ACL too."""
    name = "a"
    creds = tmp_path / "secrets" / credentials_secret(agent_user(name))

    async def scenario(endpoint: str, auths: dict, agent: subprocess.Popen) -> None:
        async with _client(endpoint, auths[CONTROLLER]) as controller:
            for kind in ("status", "telemetry", "reply"):
                await _subscribe(controller, proto.subscription(TESTBED, kind, name))

            async def first(kind: str, check, timeout_s: float):
                async def scan():
                    async for message in controller.messages:
                        topic = proto.parse_topic(message.topic.value)
                        if topic is not None and topic.kind == kind:
                            decoded = proto.decode(kind, message.payload)
                            if not isinstance(decoded, proto.Malformed) and check(decoded):
                                return decoded
                    raise AssertionError("message stream ended")

                return await asyncio.wait_for(scan(), timeout_s)

            await first("status", lambda s: s.state == "online", AGENT_START_S)
            drop = proto.Drop(id="d1", op="drop", blocks=("L0.ffn",))
            await controller.publish(_device(name, "cmd"), proto.encode(drop), qos=1)
            await first("reply", lambda r: r.id == "d1", TIMEOUT_S)
            await first("telemetry", lambda t: t.name == name, TIMEOUT_S)
            agent.kill()  # no DISCONNECT: the broker publishes the agent's last will
            await first("status", lambda s: s.state == "offline", TIMEOUT_S)

    with secured_broker(tmp_path) as (endpoint, auths):
        cmd = [
            sys.executable, "-m", "edgepart.device_agent", "--name", name, "--broker", endpoint,
            "--broker-auth", str(creds), "--testbed", TESTBED, "--memory-mib", "64",
        ]  # fmt: skip
        agent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            asyncio.run(scenario(endpoint, auths, agent))
        finally:
            agent.kill()
            _, err = agent.communicate(timeout=TIMEOUT_S)
        # the password shows nowhere the agent writes
        assert auths[agent_user(name)].password.encode() not in err


def test_an_agent_with_unusable_credentials_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    cmd = [
        sys.executable, "-m", "edgepart.device_agent", "--name", "a", "--broker", "127.0.0.1:1",
        "--broker-auth", str(missing),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--broker-auth" in done.stderr and str(missing) in done.stderr


@needs_mosquitto
def test_the_driver_logs_in_and_reads_the_outcome(tmp_path: Path) -> None:
    scenario = parse_scenario(
        {
            "version": 1,
            "name": TESTBED,
            "model": {"preset": "smollm2-135m"},
            "prompt_tokens": 4,
            "generate_tokens": 2,
            "devices": [
                {"name": "a", "compute_gflops": 1.0, "memory_mib": 400, "source": True},
                {"name": "b", "compute_gflops": 1.0, "memory_mib": 400},
            ],
            "links": {"default": {"bandwidth_mbit": 100, "latency_ms": 1}},
        },
        "sec",
    )

    async def no_kill(device: str) -> None:
        raise AssertionError(f"nothing is killed here ({device})")

    async def run(endpoint: str, auths: dict) -> proto.RunOutcome:
        outcome = proto.RunOutcome(ok=False, error="a test outcome")
        async with _client(endpoint, auths[CONTROLLER]) as controller:
            topic = proto.run_topic(TESTBED, "result")
            await controller.publish(topic, proto.encode(outcome), qos=1, retain=True)
        driver = Driver(scenario, endpoint, TESTBED, no_kill, auth=auths[DRIVER])
        return await asyncio.wait_for(driver.run(timeout_s=TIMEOUT_S), 2 * TIMEOUT_S)

    with secured_broker(tmp_path) as (endpoint, auths):
        got = asyncio.run(run(endpoint, auths))
    assert got.ok is False and got.error == "a test outcome"


def test_credentials_files_are_not_world_readable(tmp_path: Path) -> None:
    d = tmp_path / "secrets"
    write_secrets(d, TESTBED, DEVICES)
    os.chmod(d / PASSWD, 0o644)  # loosened by hand: the next render tightens it again
    write_secrets(d, TESTBED, DEVICES)
    assert _mode(d / PASSWD) == 0o600
