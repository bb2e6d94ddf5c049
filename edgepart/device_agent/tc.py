"""Kernel link shaping of the agent's own interface: an htb per peer address, via pyroute2.

In the Docker testbed every device is a container with ``cap_add: [NET_ADMIN]``; its agent
shapes its own egress per peer in the kernel instead of pacing in Python. The layout on the
interface is::

    htb 1: (root, default 1:2)
     ├── class 1:2   line rate (LINE_RATE_MBIT)   leaf pfifo 2:   everything unclassified
     ├── class 1:10  peer A's rate                leaf tbf 10:    u32 match ip dst A/32
     └── class 1:11  peer B's rate                leaf tbf 11:    u32 match ip dst B/32 ...

Each class has ``ceil == rate`` (a peer's link never borrows) and explicit ``burst``,
``cburst`` and ``quantum`` from :func:`htb_burst_bytes` and :func:`htb_quantum_bytes`.
A new rate for a known peer is applied with ``change`` on its class and its leaf (same
ids, no gap in the filter), never by deleting and recreating them. Only the rate is shaped
here: latency stays in the data plane (``ShapedWriter``). IPv4 peers only (Docker's
default networks).

Leaves are chosen, not the system default (kernels without fq_codel, sfq or netem exist;
the testbed's is one): the default class gets a pfifo, a peer's class a tbf that does not
pace (it runs SEGMENTER_RATE_FACTOR times faster than its class) but whose bucket is the
class's burst plus one frame. tbf splits a GSO super-packet larger than its bucket into
frames, so no more than about BURST_S of traffic leaves at once. With a pfifo leaf, TCP's
64 KB TSO packets left a 1 Mbit/s class in half-second lumps: right on average, too coarse
for a link emulator (and for a measurement over a few seconds).

pyroute2 takes rates as bytes/s when given numbers (its strings use tc's suffixes, where
``mbit`` is 10^6 bit/s and ``MBps`` 10^6 bytes/s), so this module passes integer bytes/s.
Every call here is blocking (netlink round trips of about a millisecond): asyncio code
runs them in a thread.
"""

from __future__ import annotations

import errno
import ipaddress
import math
import socket
import threading
from contextlib import contextmanager

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

#: the rate of "unshaped": the default class and peers shaped with None (Mbit/s)
LINE_RATE_MBIT = 10_000.0
#: seconds of traffic a class may send at once after idling (the same as ShapedWriter's)
BURST_S = 0.005
#: htb's rate-to-quantum divisor (its r2q default): quantum = rate (bytes/s) / R2Q
R2Q = 10
#: largest quantum htb takes without warning (bytes)
MAX_QUANTUM = 200_000
#: Ethernet header htb counts in each packet's length on top of the MTU (bytes)
ETH_HLEN = 14
#: packets a leaf queue holds (a txqueuelen's worth; TCP small queues keep a local
#: stream to a few packets in it, so this only bounds many-flow or UDP bursts)
LEAF_LIMIT_PACKETS = 1000
#: a peer leaf's tbf runs this many times faster than its class: it splits, it does not pace.
#: pyroute2 sends tbf's bucket as whole microseconds at that rate, so it loses up to
#: factor × rate × 1 µs bytes: under 5000 (= BURST_S / 1 µs) a lone frame always fits
SEGMENTER_RATE_FACTOR = 256
MAX_TBF_RATE = 2**32 - 1  # bytes/s: pyroute2 sends tbf's rate as 32 bits (about 34 Gbit/s)

ROOT = 0x10000  # handle 1:
DEFAULT_MINOR = 0x2  # class 1:2
FIRST_PEER_MINOR = 0x10  # classes 1:10, 1:11, ...
MAX_MINOR = 0xFFFE
TC_H_ROOT = 0xFFFFFFFF
ETH_P_IP = 0x0800
FILTER_PRIO = 1

_FIX = "run the agent as root with CAP_NET_ADMIN (Docker: add cap_add: [NET_ADMIN])"


class TcUnavailable(RuntimeError):
    """Kernel shaping cannot be used here: no NET_ADMIN, no such interface, no htb."""


def mbit_to_bytes_per_s(rate_mbit: float) -> int:
    """Megabits (10^6 bits) per second as whole bytes per second (at least 1)."""
    return max(1, round(rate_mbit * 1e6 / 8))


def frame_bytes(mtu: int) -> int:
    """Largest non-GSO packet htb accounts on an Ethernet device of this MTU (bytes)."""
    return mtu + ETH_HLEN


def htb_burst_bytes(rate_mbit: float, mtu: int = 1500) -> int:
    """Bucket size for a class of rate_mbit (Mbit/s): max(rate × BURST_S, one frame), bytes.

    htb's own default (rate / HZ + MTU, from ``tc``) is one 1500-byte packet at low rates
    and depends on the kernel's HZ; BURST_S of traffic keeps the shaped rate exact when
    the dequeue runs a few milliseconds late, and one frame is the least a bucket may hold.
    """
    _check_rate(rate_mbit)
    return max(math.ceil(rate_mbit * 1e6 / 8 * BURST_S), frame_bytes(mtu))


def htb_quantum_bytes(rate_mbit: float, mtu: int = 1500) -> int:
    """Bytes a class sends per deficit round: rate / R2Q, clamped to [one frame, 200000]."""
    _check_rate(rate_mbit)
    quantum = mbit_to_bytes_per_s(rate_mbit) // R2Q
    return int(min(MAX_QUANTUM, max(frame_bytes(mtu), quantum)))


def htb_class_params(rate_mbit: float, mtu: int = 1500) -> dict[str, int]:
    """pyroute2 keyword arguments of one htb class at rate_mbit (Mbit/s): bytes/s and bytes."""
    rate = mbit_to_bytes_per_s(rate_mbit)
    burst = htb_burst_bytes(rate_mbit, mtu)
    return {
        "rate": rate,
        "ceil": rate,
        "burst": burst,
        "cburst": burst,
        "quantum": htb_quantum_bytes(rate_mbit, mtu),
        "mtu": frame_bytes(mtu),
    }


def tbf_leaf_params(rate_mbit: float, mtu: int = 1500) -> dict[str, int]:
    """pyroute2 keyword arguments of a peer's tbf leaf for a class of rate_mbit: bytes/s, bytes.

    The bucket is the class's burst plus one frame: GSO packets larger than that are split
    into frames, while a lone frame always fits (the kernel rounds the bucket down a little).
    """
    rate = min(SEGMENTER_RATE_FACTOR * mbit_to_bytes_per_s(rate_mbit), MAX_TBF_RATE)
    burst = htb_burst_bytes(rate_mbit, mtu) + frame_bytes(mtu)
    return {"rate": rate, "burst": burst, "limit": LEAF_LIMIT_PACKETS * frame_bytes(mtu)}


def _check_rate(rate_mbit: float) -> None:
    """Raise ValueError unless rate_mbit (Mbit/s) is finite and > 0."""
    if not (rate_mbit > 0 and math.isfinite(rate_mbit)):
        raise ValueError(f"a shaped rate must be finite and > 0 Mbit/s, got {rate_mbit}")


def _ipv4(address: str) -> ipaddress.IPv4Address:
    """The address as IPv4 (raises ValueError for anything else, IPv6 included)."""
    try:
        return ipaddress.IPv4Address(address)
    except ValueError:
        raise ValueError(f"kernel shaping takes IPv4 peer addresses, got {address!r}") from None


def _unavailable(ifname: str, what: str, exc: BaseException) -> TcUnavailable:
    """A TcUnavailable naming the interface, the step that failed and the fix."""
    code = getattr(exc, "code", None) or getattr(exc, "errno", None)
    if code in (errno.EPERM, errno.EACCES):
        return TcUnavailable(
            f"tc on {ifname}: {what} not permitted: the process lacks CAP_NET_ADMIN; {_FIX}"
        )
    kind = what.split()[1] if what.startswith("add ") else ""
    if code == errno.ENOENT and kind in ("htb", "tbf", "pfifo", "u32"):
        return TcUnavailable(f"tc on {ifname}: {what} failed: this kernel has no {kind}")
    if code == errno.ENOENT and kind == "class":
        return TcUnavailable(f"tc on {ifname}: {what} failed: no htb root (call setup() first)")
    return TcUnavailable(f"tc on {ifname}: {what} failed: {exc}")


class TcShaper:
    """Egress shaping of one interface: an htb root, one class per peer address (u32 dst).

    Thread-safe: every operation holds a lock and, unless an ``ipr`` was given, opens its
    own netlink socket (in ``netns`` when named), so any thread may call it.
    """

    def __init__(self, ifname: str, ipr: IPRoute | None = None, netns: str | None = None):
        """Shaper of interface ifname, through ipr or a fresh IPRoute (in netns) per call."""
        self.ifname = ifname
        self._ipr = ipr
        self._netns = netns
        self._lock = threading.Lock()
        self._classes: dict[str, tuple[int, float]] = {}  # peer IPv4 -> (class minor, Mbit/s)
        self._mtu = 1500

    @contextmanager
    def _route(self, what: str):
        """A netlink socket for one operation; netlink and OS errors become TcUnavailable."""
        try:
            if self._ipr is not None:
                yield self._ipr
            else:
                with IPRoute(netns=self._netns) as ipr:
                    yield ipr
        except (NetlinkError, OSError) as exc:
            raise _unavailable(self.ifname, what, exc) from exc

    def _index(self, ipr: IPRoute) -> int:
        """Interface index of ifname (raises TcUnavailable when there is none)."""
        found = ipr.link_lookup(ifname=self.ifname)
        if not found:
            where = f"network namespace {self._netns!r}" if self._netns else "this container"
            raise TcUnavailable(
                f"tc: no interface named {self.ifname!r} in {where}; "
                "pass the interface of the agent's advertised address"
            )
        return found[0]

    def setup(self) -> None:
        """Replace the root qdisc with the htb and its line-rate default class (1:2)."""
        with self._lock, self._route("setup") as ipr:
            index = self._index(ipr)
            self._mtu = int(ipr.link("get", index=index)[0].get("IFLA_MTU") or 1500)
            try:  # an htb cannot be replaced in place: drop whatever root is there first
                ipr.tc("del", index=index, handle=ROOT, parent=TC_H_ROOT)
            except NetlinkError as exc:
                if exc.code not in (errno.EINVAL, errno.ENOENT):
                    raise _unavailable(self.ifname, "delete root qdisc", exc) from exc
            self._classes.clear()
            self._call(ipr, "add htb root 1:", "replace", "htb", index, ROOT, default=DEFAULT_MINOR)
            self._htb_class(ipr, "add", index, DEFAULT_MINOR, LINE_RATE_MBIT)
            leaf = {"parent": ROOT | DEFAULT_MINOR, "limit": LEAF_LIMIT_PACKETS}
            self._call(ipr, "add pfifo 2:", "add", "pfifo", index, DEFAULT_MINOR << 16, **leaf)

    def shape(self, peer_ip: str, rate_mbit: float | None) -> None:
        """Shape egress to peer_ip at rate_mbit (Mbit/s; None = LINE_RATE_MBIT, unshaped).

        The first call for a peer adds its class, leaf and filter; later calls ``change``
        the class and its leaf in place, keeping their ids.
        """
        address = str(_ipv4(peer_ip))
        rate = LINE_RATE_MBIT if rate_mbit is None else float(rate_mbit)
        _check_rate(rate)
        with self._lock, self._route(f"shape {address}") as ipr:
            index = self._index(ipr)
            known = self._classes.get(address)
            if known is not None:
                minor = known[0]
                self._htb_class(ipr, "change", index, minor, rate)
                self._tbf_leaf(ipr, "change", index, minor, rate)
                self._classes[address] = (minor, rate)
                return
            minor = FIRST_PEER_MINOR + len(self._classes)
            if minor > MAX_MINOR:
                raise TcUnavailable(f"tc on {self.ifname}: no class id left for {address}")
            self._htb_class(ipr, "add", index, minor, rate)
            self._tbf_leaf(ipr, "add", index, minor, rate)
            key = f"0x{int(ipaddress.IPv4Address(address)):08x}/0xffffffff+16"  # ip dst
            self._call(
                ipr,
                f"add u32 filter dst {address}",
                "add-filter",
                "u32",
                index,
                parent=ROOT,
                prio=FILTER_PRIO,
                protocol=ETH_P_IP,
                target=ROOT | minor,
                keys=[key],
            )
            self._classes[address] = (minor, rate)

    def rates(self) -> dict[str, float]:
        """Rate of each shaped peer as the kernel has it now (Mbit/s, LINE_RATE_MBIT = unshaped)."""
        with self._lock, self._route("dump classes") as ipr:
            index = self._index(ipr)
            by_handle = {}
            for msg in ipr.get_classes(index):
                options = msg.get("TCA_OPTIONS")
                parms = options.get("TCA_HTB_PARMS") if options else None
                if parms is None:
                    continue
                rate = options.get("TCA_HTB_RATE64") or parms["rate"]
                by_handle[msg["handle"]] = rate * 8 / 1e6
            return {
                ip: by_handle[ROOT | m]
                for ip, (m, _) in self._classes.items()
                if ROOT | m in by_handle
            }

    def classid(self, peer_ip: str) -> str | None:
        """The tc class id ("1:10") shaping peer_ip, None if it was never shaped."""
        known = self._classes.get(str(_ipv4(peer_ip)))
        return None if known is None else f"1:{known[0]:x}"

    def clear(self) -> None:
        """Remove the root qdisc (and so every class and filter); no-op when there is none."""
        with self._lock, self._route("clear") as ipr:
            index = self._index(ipr)
            try:
                ipr.tc("del", index=index, handle=ROOT, parent=TC_H_ROOT)
            except NetlinkError as exc:
                if exc.code not in (errno.EINVAL, errno.ENOENT):
                    raise _unavailable(self.ifname, "delete root qdisc", exc) from exc
            self._classes.clear()

    def _htb_class(self, ipr: IPRoute, verb: str, index: int, minor: int, rate: float) -> None:
        """Add or change (verb) htb class 1:minor to run at rate (Mbit/s)."""
        params = htb_class_params(rate, self._mtu)
        what = f"{verb} class 1:{minor:x}"
        self._call(ipr, what, f"{verb}-class", "htb", index, ROOT | minor, parent=ROOT, **params)

    def _tbf_leaf(self, ipr: IPRoute, verb: str, index: int, minor: int, rate: float) -> None:
        """Add or change (verb) the tbf leaf minor: of a class running at rate (Mbit/s)."""
        params = tbf_leaf_params(rate, self._mtu)
        what = f"{verb} tbf {minor:x}:"
        self._call(ipr, what, verb, "tbf", index, minor << 16, parent=ROOT | minor, **params)

    def _call(self, ipr: IPRoute, what: str, *args, **kwargs) -> None:
        """One ipr.tc request; a netlink error becomes TcUnavailable naming ``what``."""
        try:
            ipr.tc(*args, **kwargs)
        except NetlinkError as exc:
            raise _unavailable(self.ifname, what, exc) from exc


def interface_for(address: str, netns: str | None = None) -> str:
    """Name of the interface that holds address (IPv4 or host name), else the one routing to it."""
    try:
        ip = socket.gethostbyname(address)
    except OSError as exc:
        raise TcUnavailable(f"tc: cannot resolve {address!r} to find its interface: {exc}") from exc
    if ipaddress.IPv4Address(ip).is_unspecified:
        raise TcUnavailable(
            f"tc: {address!r} names no interface; give the agent an --advertise or --listen "
            "address of its own interface"
        )
    try:
        with IPRoute(netns=netns) as ipr:
            held = [a["index"] for a in ipr.get_addr(family=socket.AF_INET, address=ip)]
            if held:
                index = held[0]
            else:
                routes = ipr.route("get", dst=ip)
                index = routes[0].get("RTA_OIF") if routes else None
            if index is None:
                raise TcUnavailable(f"tc: no interface holds or routes to {ip}")
            return ipr.link("get", index=index)[0].get("IFLA_IFNAME")
    except (NetlinkError, OSError) as exc:
        raise TcUnavailable(f"tc: cannot find the interface of {ip}: {exc}") from exc
