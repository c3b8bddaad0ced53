"""
Hand-made WebSocket bytes for tests that must send what no well-behaved client would, built
with the load tool's framer (:mod:`wschat.bench.frames`).

:class:`RawPeer` drives one server protocol through an in-memory transport: feed it bytes,
read back the HTTP response and the frames the server wrote. :class:`RawClient`,
:func:`rawConnect` and :func:`rawExchange` send bytes by hand over real TCP.
"""

from __future__ import annotations

import functools
import socket
import struct
import zlib
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import defer, endpoints
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from wschat.bench import frames
from wschat.bench.frames import OP_CLOSE, OP_TEXT, openingHandshake, parseFrames

#: The mask key of the frames tests send: not zero, so the server's unmasking is exercised.
MASK = b"\x37\xfa\x21\x3d"


def handshake(*extraHeaders: str, host: str = "127.0.0.1:2000") -> bytes:
    """A valid client opening handshake, with any extra header lines."""
    return openingHandshake(host, "/", extraHeaders)


#: One frame as a client sends it: masked with :data:`MASK` unless ``mask=`` says otherwise
#: (``frame(opcode, payload, fin=, rsv=, mask=)``, see :func:`wschat.bench.frames.frame`).
frame = functools.partial(frames.frame, mask=MASK)


def deflate(data: bytes) -> bytes:
    """``data`` as one permessage-deflate message payload."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    return (compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


def deflateBomb(size: int) -> bytes:
    """A permessage-deflate payload that inflates to ``size`` zero bytes, built in chunks."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(1 << 20)
    out = []
    left = size
    while left > 0:
        out.append(compressor.compress(chunk[: min(left, len(chunk))]))
        left -= len(chunk)
    out.append(compressor.flush(zlib.Z_SYNC_FLUSH))
    data = b"".join(out)
    assert data.endswith(b"\x00\x00\xff\xff")
    return data[:-4]


class Transport(StringTransport):
    """
    A StringTransport that, like Twisted's real transports, lets a producer be unregistered
    twice (Autobahn unregisters on every drop).
    """

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None


class RawPeer:
    """
    One server protocol from ``factory`` on an in-memory transport, driven byte by byte.
    """

    def __init__(self, factory: Any, host: str = "127.0.0.1", port: int = 50000) -> None:
        kind = IPv6Address if ":" in host else IPv4Address
        self.address = kind("TCP", host, port)
        self.protocol = factory.buildProtocol(self.address)
        self.transport = Transport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 2000), peerAddress=self.address
        )
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def open(self, *extraHeaders: str) -> RawPeer:
        """Complete the opening handshake; the welcome (if any) is then in :meth:`frames`."""
        self.send(handshake(*extraHeaders))
        assert self.response().startswith(b"HTTP/1.1 101 "), self.response()
        return self

    def sendText(self, text: bytes | str) -> None:
        self.send(frame(OP_TEXT, text.encode() if isinstance(text, str) else text))

    def output(self) -> bytes:
        return self.transport.value()

    def response(self) -> bytes:
        """The HTTP response head the server wrote (up to the blank line)."""
        head, sep, _ = self.output().partition(b"\r\n\r\n")
        return head + sep if sep else self.output()

    def frames(self) -> list[tuple[int, bytes]]:
        _, sep, rest = self.output().partition(b"\r\n\r\n")
        return parseFrames(rest) if sep else []

    def texts(self) -> list[bytes]:
        return [p for op, p in self.frames() if op == OP_TEXT]

    def closeFrame(self) -> tuple[int, str] | None:
        """The code and reason of the close frame the server sent, if it sent one."""
        for op, payload in self.frames():
            if op == OP_CLOSE:
                (code,) = struct.unpack("!H", payload[:2])
                return code, payload[2:].decode("utf-8")
        return None

    @property
    def dropped(self) -> bool:
        """The server let go of the TCP connection (closed or aborted it)."""
        return bool(self.transport.disconnecting)

    @property
    def aborted(self) -> bool:
        return bool(self.transport.disconnected)

    def lose(self) -> None:
        """The TCP connection ends, as the reactor would report it."""
        self.protocol.connectionLost(Failure(ConnectionDone()))


class RawClient(Protocol):
    """
    A TCP client that writes bytes by hand (what no well-behaved client would send) and keeps
    everything it receives; ``lost`` fires with all of it when the connection closes, and
    ``until(condition)`` once what it has received so far meets ``condition``.

    With ``read=False`` it never reads: the smallest receive window, and reading paused.
    """

    def __init__(self, data: bytes = b"", read: bool = True) -> None:
        self.data = data
        self.read = read
        self.received = b""
        self.lost: defer.Deferred[bytes] = defer.Deferred()
        self._waiting: list[tuple[Callable[[bytes], bool], defer.Deferred[bytes]]] = []

    def until(self, condition: Callable[[bytes], bool]) -> defer.Deferred[bytes]:
        """Fires with all received so far once ``condition`` holds; fails if it closes first."""
        d: defer.Deferred[bytes] = defer.Deferred()
        self._waiting.append((condition, d))
        self._check()
        return d

    def connectionMade(self) -> None:
        assert self.transport is not None
        if not self.read:
            self.transport.getHandle().setsockopt(  # type: ignore[attr-defined]
                socket.SOL_SOCKET, socket.SO_RCVBUF, 1
            )
            self.transport.pauseProducing()  # type: ignore[attr-defined]
        if self.data:
            self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self._check()

    def _check(self) -> None:
        # Fire the waits whose condition now holds; a callback may add new ones.
        waiting, self._waiting = self._waiting, []
        for condition, d in waiting:
            if condition(self.received):
                d.callback(self.received)
            else:
                self._waiting.append((condition, d))

    def connectionLost(self, reason: Failure | None = None) -> None:
        waiting, self._waiting = self._waiting, []
        for _, d in waiting:
            d.errback(ConnectionError(f"connection closed first; received {self.received!r}"))
        self.lost.callback(self.received)


async def rawConnect(url: str, client: RawClient) -> RawClient:
    """Connect ``client`` over TCP to the host and port of ``url`` (``ws://host:port/...``)."""
    from twisted.internet import reactor

    parts = urlsplit(url)
    host, port = parts.hostname, parts.port
    assert host is not None and port is not None, f"{url!r} has no host:port"
    endpointClass = endpoints.TCP6ClientEndpoint if ":" in host else endpoints.TCP4ClientEndpoint
    endpoint = endpointClass(reactor, host, port)
    await endpoints.connectProtocol(endpoint, client)
    return client


#: Seconds :func:`rawExchange` waits for the daemon to close: a daemon that never does fails
#: the test then, not at the suite's outer time limit.
EXCHANGE_TIMEOUT = 30.0


async def rawExchange(url: str, data: bytes) -> bytes:
    """Send ``data`` by hand; everything the daemon sent back until it closed."""
    from twisted.internet import reactor

    client = await rawConnect(url, RawClient(data))
    try:
        return await client.lost.addTimeout(EXCHANGE_TIMEOUT, reactor)
    except defer.TimeoutError:
        client.transport.abortConnection()  # type: ignore[union-attr]
        raise AssertionError(
            f"the daemon did not close within {EXCHANGE_TIMEOUT:g} s; it sent {client.received!r}"
        ) from None
