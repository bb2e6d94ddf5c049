"""The MQTT control-plane contract: topics and versioned, validated JSON messages.

Topics live under ``edgepart/<testbed>/``:

- ``devices/<name>/telemetry`` agent -> all, periodic: what the device has and uses;
- ``devices/<name>/status``    retained; the agent's MQTT last will sets it offline;
- ``devices/<name>/cmd``       controller -> agent: load, prepare, commit, shape, ...;
- ``devices/<name>/reply``     agent -> controller: the outcome of one command;
- ``placement``                retained: the epoch and routing table every agent follows;
- ``run/world``                controller -> emulator driver: token T is next, apply its traces;
- ``run/world_ready``          driver -> controller: the traces before token T are in place;
- ``run/progress``             controller -> all: one token measured;
- ``run/result``               retained: the whole run's result, once generation ends.

Every message carries ``v`` (the protocol version). Anything malformed is turned
into a ``Malformed`` value with the reason, for the receiver to count and log; it is
never an exception in the receiving loop.
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

PROTOCOL_VERSION = 1
ROOT = "edgepart"
#: payloads above this are refused unread: the broker is shared, the agents are small
MAX_PAYLOAD_BYTES = 1 << 20
#: JSON nested deeper than this is refused: no message nests past 5 levels, and deeper
#: structures only risk the recursion limit of whoever walks them next
MAX_JSON_DEPTH = 32
MAX_REASON_CHARS = 300  # a Malformed reason is cut to this (it goes to logs)
#: in a device container: the file an agent that joins later waits for before it joins
#: (``edgepart agent --join-file``; the emulator driver makes it at the join trace)
JOIN_FILE = "/tmp/edgepart-join"

#: MQTT client sockets send at once: a control message per token must not wait ~40 ms for
#: Nagle's algorithm to meet the broker's delayed ACK
SOCKET_OPTIONS = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)

_NAME = r"[A-Za-z0-9_-]+"
DeviceName = Annotated[str, Field(pattern=f"^{_NAME}$", max_length=64)]
BlockName = Annotated[str, Field(pattern=r"^(embed|head|L\d+\.(g\d+|proj|ffn))$")]
NonNegative = Annotated[float, Field(ge=0)]
TokenId = Annotated[int, Field(ge=0)]
Endpoint = Annotated[str, Field(pattern=r"^[^\s:]+:\d{1,5}$")]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = PROTOCOL_VERSION


# -- agent -> all ------------------------------------------------------------------------


class Telemetry(_Message):
    """What a device has and uses, published every telemetry period."""

    name: DeviceName
    ts: NonNegative  # agent's wall clock, s
    cpu_used: Annotated[float, Field(ge=0, le=1)]  # fraction of its CPU share in use
    available_gflops: NonNegative  # compute left to edgepart after background load, GFLOP/s
    memory_used_bytes: NonNegative
    memory_budget_bytes: NonNegative
    kv_bytes: NonNegative
    blocks: tuple[BlockName, ...] = ()
    peer_throughput_mbit: dict[DeviceName, NonNegative] = {}  # measured, to each peer
    compute_measured: bool = False  # available_gflops measured on recent blocks, not nominal
    dropped_messages: Annotated[int, Field(ge=0)] = 0  # malformed MQTT payloads so far
    dropped_frames: Annotated[int, Field(ge=0)] = 0  # malformed data-plane input so far
    #: measured one-way latency to each peer (s): half the round trip of latency probes
    #: between the two agents' event loops, through the shaped links
    peer_latency_s: dict[DeviceName, NonNegative] = {}
    #: what a hop costs beyond that, measured on recent activations (s): an output's way from
    #: the compute thread to the event loop, and an input's way from the event loop to the
    #: step that waited for it
    send_overhead_s: NonNegative = 0.0
    receive_overhead_s: NonNegative = 0.0
    occupied_bytes: NonNegative = 0.0  # memory another application holds now (bytes)
    #: peers whose last latency probe got no answer: the link to them is down
    unreachable_peers: tuple[DeviceName, ...] = ()
    #: of memory_used_bytes, what blocks prepared for a coming switch take (bytes)
    prepared_bytes: NonNegative = 0.0


class Status(_Message):
    """Retained liveness of an agent (its last will publishes ``offline``)."""

    name: DeviceName
    state: Literal["online", "offline", "failed"]
    listen: Endpoint | None = None  # where its data plane accepts connections
    ts: NonNegative = 0.0


# -- controller -> agent -----------------------------------------------------------------


class _Command(_Message):
    id: Annotated[str, Field(min_length=1, max_length=64)]  # echoed in the reply


class Load(_Command):
    """Load blocks (weights from the device's own checkpoint or from a peer)."""

    op: Literal["load"]
    blocks: tuple[BlockName, ...]
    weights_from: Literal["disk", "peer"] = "disk"
    peer: DeviceName | None = None


class Drop(_Command):
    """Free blocks (after an epoch switch made them unused)."""

    op: Literal["drop"]
    blocks: tuple[BlockName, ...]


class Prepare(_Command):
    """Build blocks a coming switch brings here, beside the blocks in use (first phase).

    Their weights come from this device's weight cache or checkpoint, or from the peers
    named in ``peers`` (weights from peers), and are built in a background thread at low
    priority, paced to the device's share, while tokens go on. Memory is admitted first,
    for the weights and for the caches they will take (``context`` positions); blocks are
    admitted in the order given while they fit, and the reply's ``refused`` names the
    rest. A prepared block is used only once a commit hands it its state, and is freed by
    a discard (or when the budget is cut below what the device holds)."""

    op: Literal["prepare"]
    blocks: Annotated[tuple[BlockName, ...], Field(min_length=1)]
    context: Annotated[int, Field(ge=0)]
    peers: dict[BlockName, DeviceName] = {}


class Commit(_Command):
    """Hand prepared blocks their state (second phase, at a token boundary: no token runs).

    Sent to a block's current holder: for each target it sends one frame with the state
    of every block moving there (a KV group's cache; nothing more for the others) and
    waits until the target took them all, or refused them all. It keeps its own copies
    until an epoch no longer places them here. The reply's ``refused`` names the blocks
    of targets that refused (the reason in ``error``)."""

    op: Literal["commit"]
    epoch: Annotated[int, Field(ge=0)]  # the epoch that will name the targets
    moves: Annotated[dict[BlockName, DeviceName], Field(min_length=1)]  # block -> target


class Discard(_Command):
    """Free prepared blocks that will not be committed (every prepared one if none named)."""

    op: Literal["discard"]
    blocks: tuple[BlockName, ...] = ()


class Shape(_Command):
    """Shape this device's sending to one peer."""

    op: Literal["shape"]
    peer: DeviceName
    bandwidth_mbit: NonNegative  # 0: the link is cut, nothing reaches the peer
    latency_ms: NonNegative = 0.0


class InjectLoad(_Command):
    """Run background CPU burners taking this fraction of the device's share."""

    op: Literal["inject_load"]
    fraction: Annotated[float, Field(ge=0, lt=1)]


class SetBudget(_Command):
    """Change the memory the device offers to edgepart."""

    op: Literal["set_budget"]
    memory_bytes: Annotated[int, Field(gt=0)]
    #: memory another application takes on the device (bytes): the agent holds it in a
    #: ballast process once its own blocks leave room for it
    occupied_bytes: Annotated[int, Field(ge=0)] = 0


class Reset(_Command):
    """Forget every cached position (before the history is run again after a loss)."""

    op: Literal["reset"]


class Decode(_Command):
    """Run tokens through the model from the embedding (the source device's command).

    ``position`` is the number of positions cached before these tokens; every agent keys
    the step's data-plane frames by it. The reply carries the greedy next token.
    """

    op: Literal["decode"]
    epoch: Annotated[int, Field(ge=0)]
    position: Annotated[int, Field(ge=0)]
    tokens: Annotated[tuple[TokenId, ...], Field(min_length=1, max_length=1 << 15)]


Command = Annotated[
    Load | Drop | Prepare | Commit | Discard | Shape | InjectLoad | SetBudget | Reset | Decode,
    Field(discriminator="op"),
]


class Reply(_Message):
    """The outcome of one command (``ok`` false carries the reason, e.g. over budget)."""

    id: Annotated[str, Field(min_length=1, max_length=64)]
    name: DeviceName
    ok: bool
    error: str | None = None
    bytes_moved: NonNegative = 0.0
    seconds: NonNegative = 0.0
    token_id: Annotated[int, Field(ge=0)] | None = None  # a decode's greedy next token
    #: a load's or prepare's mean time (s) to build one block of each kind it built
    install_s: dict[Literal["group", "proj", "ffn"], NonNegative] = {}
    #: a prepare's blocks that did not fit, a commit's blocks whose target refused them
    refused: tuple[BlockName, ...] = ()


class PlacementEpoch(_Message):
    """The routing table every agent follows from ``epoch`` on (retained)."""

    epoch: Annotated[int, Field(ge=0)]
    placement: dict[BlockName, DeviceName]
    endpoints: dict[DeviceName, Endpoint] = {}


# -- controller <-> emulator driver ------------------------------------------------------


class WorldTurn(_Message):
    """The controller is about to run generated token ``token``: the world may change now."""

    token: Annotated[int, Field(ge=0)]


class WorldReady(_Message):
    """The emulator driver applied the traces due before ``token`` (or why it could not)."""

    token: Annotated[int, Field(ge=0)]
    ok: bool = True
    error: str = ""
    failed: tuple[DeviceName, ...] = ()  # devices it killed, for the controller to see gone
    joined: tuple[DeviceName, ...] = ()  # devices it started, for the controller to see online


class Progress(_Message):
    """One generated token as the controller measured it."""

    token: Annotated[int, Field(ge=0)]  # tokens generated so far
    token_id: TokenId
    measured_s: NonNegative  # 0 for the prefill's token
    predicted_s: NonNegative
    migrations: Annotated[int, Field(ge=0)]


class RunOutcome(_Message):
    """The run's result (docs/design.md's emulate JSON keys), or the error that ended it."""

    ok: bool
    error: str = ""
    result: dict = {}


# -- topics ------------------------------------------------------------------------------

RunKind = Literal["world", "world_ready", "progress", "result"]
TopicKind = Literal[
    "telemetry", "status", "cmd", "reply", "placement", "world", "world_ready", "progress",
    "result",
]  # fmt: skip
_TOPIC = re.compile(
    rf"^{ROOT}/(?P<testbed>{_NAME})/(?:devices/(?P<device>{_NAME})/"
    r"(?P<kind>telemetry|status|cmd|reply)|(?P<placement>placement)"
    r"|run/(?P<run>world|world_ready|progress|result))$"
)


def device_topic(testbed: str, device: str, kind: TopicKind) -> str:
    """The topic of one device's telemetry, status, cmd or reply."""
    return f"{ROOT}/{testbed}/devices/{device}/{kind}"


def placement_topic(testbed: str) -> str:
    """The retained placement topic of a testbed."""
    return f"{ROOT}/{testbed}/placement"


def run_topic(testbed: str, kind: RunKind) -> str:
    """A topic between the controller and the emulator driver (world turns, progress)."""
    return f"{ROOT}/{testbed}/run/{kind}"


def subscription(testbed: str, kind: TopicKind, device: str = "+") -> str:
    """A subscription filter: one kind of topic, for one device or all (+)."""
    if kind == "placement":
        return placement_topic(testbed)
    if kind in ("world", "world_ready", "progress", "result"):
        return run_topic(testbed, kind)  # type: ignore[arg-type]
    return device_topic(testbed, device, kind)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Topic:
    """A parsed topic name."""

    testbed: str
    kind: TopicKind
    device: str | None


def parse_topic(topic: str) -> Topic | None:
    """The parts of an edgepart topic, or None for anything else."""
    m = _TOPIC.match(topic)
    if m is None:
        return None
    if m["placement"]:
        return Topic(m["testbed"], "placement", None)
    if m["run"]:
        return Topic(m["testbed"], m["run"], None)  # type: ignore[arg-type]
    return Topic(m["testbed"], m["kind"], m["device"])  # type: ignore[arg-type]


# -- encoding ----------------------------------------------------------------------------

Message = (
    Telemetry
    | Status
    | Load
    | Drop
    | Prepare
    | Commit
    | Discard
    | Shape
    | InjectLoad
    | SetBudget
    | Reset
    | Decode
    | Reply
    | WorldTurn
    | WorldReady
    | Progress
    | RunOutcome
)
_ADAPTERS: dict[TopicKind, TypeAdapter] = {
    "telemetry": TypeAdapter(Telemetry),
    "status": TypeAdapter(Status),
    "cmd": TypeAdapter(Command),
    "reply": TypeAdapter(Reply),
    "placement": TypeAdapter(PlacementEpoch),
    "world": TypeAdapter(WorldTurn),
    "world_ready": TypeAdapter(WorldReady),
    "progress": TypeAdapter(Progress),
    "result": TypeAdapter(RunOutcome),
}


@dataclass(frozen=True)
class Malformed:
    """A payload that was not a valid message, and why (for counting and logging)."""

    kind: TopicKind
    reason: str


def encode(message: BaseModel) -> bytes:
    """The JSON payload of a message."""
    return message.model_dump_json().encode("utf-8")


def _nested_deeper(data: object, limit: int) -> bool:
    """Whether parsed JSON nests lists or objects more than ``limit`` levels (iterative)."""
    level: list[object] = [data]
    for _ in range(limit):
        level = [
            child
            for node in level
            if isinstance(node, dict | list)
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, dict | list)
        ]
        if not level:
            return False
    return True


def decode(kind: TopicKind, payload: bytes) -> BaseModel | Malformed:
    """The message a payload on a topic of that kind holds, or Malformed with the reason."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        return Malformed(kind, f"payload of {len(payload)} bytes is over {MAX_PAYLOAD_BYTES}")
    try:
        data = json.loads(payload)
    # ValueError: besides bad UTF-8 and bad JSON, an integer of over 4300 digits;
    # RecursionError: arrays or objects nested past the interpreter's stack
    except (ValueError, RecursionError) as exc:
        return Malformed(kind, f"not JSON: {exc}")
    if not isinstance(data, dict):
        return Malformed(kind, "not a JSON object")
    if _nested_deeper(data, MAX_JSON_DEPTH):
        return Malformed(kind, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    version = data.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # not true, not 1.0
        return Malformed(kind, f"protocol version {version!r:.40}, want {PROTOCOL_VERSION}")
    try:
        return _ADAPTERS[kind].validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = first["loc"]
        if not loc and "discriminator" in first.get("ctx", {}):  # a command's op: name it
            loc = (str(first["ctx"]["discriminator"]).strip("'"),)
        where = ".".join(str(p) for p in loc) or "message"
        # cut: a message may quote the bad value, which can be most of a megabyte
        return Malformed(kind, f"{where}: {first['msg']}"[:MAX_REASON_CHARS])
