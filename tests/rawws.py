"""
Hand-made WebSocket bytes for tests that must send what no well-behaved client would.

:class:`RawPeer` drives one server protocol through an in-memory transport: feed it bytes,
read back the HTTP response and the frames the server wrote.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


def handshake(*extraHeaders: str, host: str = "127.0.0.1:2000") -> bytes:
    """A valid client opening handshake, with any extra header lines."""
    lines = [
        "GET / HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {KEY.decode()}",
        "Sec-WebSocket-Version: 13",
        *extraHeaders,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = b"\x37\xfa\x21\x3d",
) -> bytes:
    """One frame as a client sends it: masked, unless ``mask`` is None."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    length = len(payload)
    maskBit = 0x80 if mask is not None else 0
    if length <= 125:
        head += bytes([maskBit | length])
    elif length <= 0xFFFF:
        head += bytes([maskBit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([maskBit | 127]) + struct.pack("!Q", length)
    if mask is None:
        return head + payload
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


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


def parseFrames(data: bytes) -> list[tuple[int, bytes]]:
    """The (opcode, payload) of every complete unmasked frame in ``data``."""
    frames = []
    i = 0
    while i + 2 <= len(data):
        opcode = data[i] & 0x0F
        length = data[i + 1] & 0x7F
        i += 2
        if length == 126:
            (length,) = struct.unpack("!H", data[i : i + 2])
            i += 2
        elif length == 127:
            (length,) = struct.unpack("!Q", data[i : i + 8])
            i += 8
        if i + length > len(data):
            break
        frames.append((opcode, data[i : i + length]))
        i += length
    return frames


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
