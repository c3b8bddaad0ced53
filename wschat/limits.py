"""
The daemon's resource limits as plain values and small pure helpers: no reactor, no sockets.

:class:`Limits` is what the command line configures; :class:`TokenBucket` is the per-connection
message rate limit; :class:`InboundBudget` is each connection's share of the room's inbound
work; :class:`ConnectionCounter` counts open connections per client address.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress

KiB = 1 << 10
MiB = 1 << 20

#: The largest opening-handshake request head (request line and headers) the daemon buffers.
#: Browsers send well under 8 KiB; nginx's default allows 32 KiB. Past it: HTTP 431.
MAX_REQUEST_HEAD = 32 * KiB


@dataclass(frozen=True, slots=True)
class Limits:
    """
    Every per-connection and per-daemon bound, with the defaults the README explains.

    A value of 0 turns off the limits that may be off (``rateLimit``, ``maxConnections``,
    ``maxConnectionsPerIp``, ``pingInterval``).
    """

    #: Bytes a connection may have queued while its transport's write buffer is full.
    maxQueue: int = 1 * MiB
    #: Largest frame and largest reassembled (and decompressed) message a client may send.
    maxMessageSize: int = 64 * KiB
    #: Seconds between WebSocket pings to each client (0: no pings).
    pingInterval: float = 20.0
    #: Seconds to wait for the pong before dropping the connection.
    pingTimeout: float = 20.0
    #: Seconds a client has to complete the opening handshake.
    handshakeTimeout: float = 10.0
    #: Messages per second each connection may send on average (0: unlimited).
    rateLimit: float = 0.0
    #: Messages a connection may send at once before the rate applies.
    rateBurst: int = 20
    #: Open connections in all (0: unlimited); past it the handshake gets HTTP 503.
    maxConnections: int = 0
    #: Open connections from one IP address, or IPv6 /64 (0: unlimited); past it, HTTP 429.
    maxConnectionsPerIp: int = 0
    #: Frames (data and control) per second each connection is read at, on average (0: any).
    inboundRate: float = 250.0
    #: Payload bytes per second each connection is read at, on average (0: any).
    inboundBytes: int = 256 * KiB
    #: Seconds of ``inboundRate`` and ``inboundBytes`` a connection may send at once.
    inboundBurst: float = 2.0
    #: Seconds a connection may stay over its inbound share before it is closed (1008).
    inboundHold: float = 60.0
    #: Frames one message may come in; past it the connection is closed (1009).
    maxMessageFrames: int = 1024


_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": KiB, "m": MiB, "g": 1 << 30}


def parseSize(text: str) -> int:
    """
    A byte count from the command line: ``65536``, ``64K``, ``64KiB``, ``1M``, ``1MiB``, ``1G``.

    Units are binary (K = 1024). Raises :class:`ValueError` for anything else.
    """
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size in bytes (for example 65536, 64K, 1MiB)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


class TokenBucket:
    """
    Allows ``rate`` events per second on average, and up to ``burst`` at once.

    The bucket starts full. Each event takes one token; tokens come back at ``rate`` per
    second up to ``burst``.

    @param clock: returns the current time in seconds (``reactor.seconds``).
    """

    __slots__ = ("rate", "burst", "_clock", "_tokens", "_stamp")

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, not {rate!r}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, not {burst!r}")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()

    def take(self) -> bool:
        """
        Spend a token if there is one: ``True`` if the event is allowed now.
        """
        now = self._clock()
        # A clock that steps back must not drain the bucket.
        elapsed = now - self._stamp if now > self._stamp else 0.0
        self._stamp = now
        tokens = self._tokens + elapsed * self.rate
        if tokens > self.burst:
            tokens = self.burst
        # The tolerance lets a sender keeping exactly to the rate through despite rounding.
        if tokens >= 0.999999:
            self._tokens = tokens - 1.0 if tokens > 1.0 else 0.0
            return True
        self._tokens = tokens
        return False


class InboundBudget:
    """
    One connection's share of the room's inbound work: ``frameRate`` frames and ``byteRate``
    payload bytes per second on average, up to ``burst`` seconds' worth at once.

    Unlike :class:`TokenBucket` a frame is always counted, even past the budget: it has been
    read already. The budget then goes into debt, and :meth:`spend` says how long the
    connection must not be read for the debt to be paid back. A rate of 0 is not counted.

    :attr:`overSince` is when the connection went over its share, ``None`` once it has been
    back within it for a whole ``burst`` (its budget full again): how long a sender has been
    held back without a break.

    @param clock: returns the current time in seconds (``reactor.seconds``).
    """

    __slots__ = (
        "frameRate",
        "byteRate",
        "burst",
        "overSince",
        "_clock",
        "_frames",
        "_bytes",
        "_maxFrames",
        "_maxBytes",
        "_stamp",
    )

    def __init__(
        self, frameRate: float, byteRate: float, burst: float, clock: Callable[[], float]
    ) -> None:
        if frameRate < 0 or byteRate < 0 or not (frameRate or byteRate):
            raise ValueError(f"rates must be 0 or more, one above 0: {frameRate!r}, {byteRate!r}")
        if burst <= 0:
            raise ValueError(f"burst must be above 0 seconds, not {burst!r}")
        self.frameRate = frameRate
        self.byteRate = byteRate
        self.burst = burst
        self.overSince: float | None = None
        self._clock = clock
        self._maxFrames = self._frames = frameRate * burst
        self._maxBytes = self._bytes = byteRate * burst
        self._stamp = clock()

    def spend(self, frames: int, size: int) -> float:
        """
        Count ``frames`` frames of ``size`` payload bytes received now. Returns 0 while within
        the budget, else the seconds until the debt is paid back.
        """
        now = self._clock()
        elapsed = now - self._stamp if now > self._stamp else 0.0
        self._stamp = now
        wait = 0.0
        full = True
        if self.frameRate:
            tokens = self._frames + elapsed * self.frameRate
            if tokens >= self._maxFrames:
                tokens = self._maxFrames
            else:
                full = False
            tokens -= frames
            self._frames = tokens
            if tokens < 0:
                wait = -tokens / self.frameRate
        if self.byteRate:
            tokens = self._bytes + elapsed * self.byteRate
            if tokens >= self._maxBytes:
                tokens = self._maxBytes
            else:
                full = False
            tokens -= size
            self._bytes = tokens
            if tokens < 0:
                wait = max(wait, -tokens / self.byteRate)
        if full:
            self.overSince = None
        if wait and self.overSince is None:
            self.overSince = now
        return wait


def hostKey(address: IAddress | str) -> str | None:
    """
    What the per-address connection limit counts a peer as (an address, or an IP as text).

    An IPv4 address counts as itself. An IPv6 address counts as its /64 network, because
    one user is usually handed a whole /64. An IPv4-mapped IPv6 address counts as its IPv4
    address. Anything else (a UNIX socket peer) is not counted: ``None``.
    """
    if isinstance(address, str):
        host = address
    elif isinstance(address, IPv4Address | IPv6Address):
        host = address.host
    else:
        return None
    host = host.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class ConnectionCounter:
    """
    Counts connections per key and refuses one past ``limit`` (0: no limit, nothing counted).
    """

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"limit must be 0 or more, not {limit!r}")
        self.limit = limit
        self._counts: dict[str, int] = {}

    def __getitem__(self, key: str) -> int:
        return self._counts.get(key, 0)

    def __len__(self) -> int:
        """The number of keys holding at least one connection."""
        return len(self._counts)

    def acquire(self, key: str) -> bool:
        """
        Count one more connection for ``key``, if that stays within the limit.
        """
        if not self.limit:
            return True
        count = self._counts.get(key, 0)
        if count >= self.limit:
            return False
        self._counts[key] = count + 1
        return True

    def release(self, key: str) -> None:
        """
        Count one connection fewer for ``key``; forget the key at zero.
        """
        if key not in self._counts:
            return
        count = self._counts[key] - 1
        if count > 0:
            self._counts[key] = count
        else:
            self._counts.pop(key, None)
