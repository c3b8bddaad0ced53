"""
The load tool's wire format: the payload it sends, the frames it writes, and its reader.

:func:`frame`, :func:`parseFrames` (:class:`Frames` for a stream) and :func:`openingHandshake`
are the package's one RFC 6455 framer, written by hand: the load tool sends with them, the
benchmarks read with them, and the tests build with them what no well-behaved client would send.

A bench payload is ASCII text, so a server may relay it as a text message and prefix it::

    #wsb<run>#<sender:6><seq:10><sent µs:16>xxxx...

``<run>`` (4 hex digits) tells one run's messages from another's; the fields after the marker
are fixed-width decimal. The reader looks for the marker *inside* each message, so it works
against servers that relay payloads unchanged and against servers that prefix them
(``127.0.0.1:5000: #wsb...``). Messages without the marker (a greeting) are ignored.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from wschat.wire import hostPort

SENDER_DIGITS = 6
SEQ_DIGITS = 10
TIME_DIGITS = 16
FIELDS = SENDER_DIGITS + SEQ_DIGITS + TIME_DIGITS

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


def marker(run: int) -> bytes:
    """The marker of run ``run`` (0-65535). It cannot overlap itself, so counts are exact."""
    if not 0 <= run <= 0xFFFF:
        raise ValueError(f"run id {run} is not in 0-65535")
    return b"#wsb%04x#" % run


def minimumSize(run: int) -> int:
    """The smallest payload that holds the marker and the fields."""
    return len(marker(run)) + FIELDS


def payload(mark: bytes, sender: int, seq: int, sentMicros: int, size: int) -> bytes:
    """One bench payload of exactly ``size`` bytes (at least :func:`minimumSize`)."""
    head = b"%s%06d%010d%016d" % (mark, sender, seq, sentMicros)
    if len(head) > size:
        raise ValueError(f"payload size {size} is below the minimum {len(head)}")
    return head + b"x" * (size - len(head))


#: The zero mask key: RFC 6455 allows it on the wire and every server accepts it, and masking
#: with it is the identity, so the load tool's frames cost nothing to mask.
ZERO_MASK = b"\0\0\0\0"


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = None,
) -> bytes:
    """
    One frame carrying ``payload``: masked with the 4-byte key ``mask`` (a client's frame), or
    unmasked when ``mask`` is None (a server's). ``rsv`` sets the three reserved bits.
    """
    n = len(payload)
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    maskBit = 0 if mask is None else 0x80
    if n < 126:
        head = struct.pack("!BB", b0, maskBit | n)
    elif n <= 0xFFFF:
        head = struct.pack("!BBH", b0, maskBit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, maskBit | 127, n)
    if mask is None:
        return head + payload
    if mask == ZERO_MASK:
        return head + mask + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def clientFrame(data: bytes, opcode: int = OP_TEXT) -> bytes:
    """A final client-to-server frame carrying ``data``, masked with :data:`ZERO_MASK`."""
    return frame(opcode, data, mask=ZERO_MASK)


def serverFrame(data: bytes, opcode: int = OP_TEXT) -> bytes:
    """An unmasked final server-to-client frame (for tests and the fake servers in them)."""
    return frame(opcode, data)


def splitFrames(data: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """
    The ``(opcode, payload)`` of every complete frame at the start of ``data``, unmasked, and
    how many bytes they take: what follows is a partial frame (or nothing).
    """
    frames = []
    end = 0
    size = len(data)
    while end + 2 <= size:
        opcode = data[end] & 0x0F
        masked = data[end + 1] & 0x80
        length = data[end + 1] & 0x7F
        i = end + 2
        if length == 126:
            if i + 2 > size:
                break
            (length,) = struct.unpack("!H", data[i : i + 2])
            i += 2
        elif length == 127:
            if i + 8 > size:
                break
            (length,) = struct.unpack("!Q", data[i : i + 8])
            i += 8
        key = data[i : i + 4] if masked else None
        i += 4 if masked else 0
        if i + length > size:
            break
        body = bytes(data[i : i + length])
        if key is not None:
            body = bytes(b ^ key[n % 4] for n, b in enumerate(body))
        frames.append((opcode, body))
        end = i + length
    return frames, end


def parseFrames(data: bytes) -> list[tuple[int, bytes]]:
    """
    The ``(opcode, payload)`` of every complete frame in ``data``, unmasked; a partial frame
    at the end is left out. (:class:`FrameReader` is the load tool's own, faster, reader.)
    """
    return splitFrames(data)[0]


class Frames:
    """The frames of a byte stream, fed as it is read: a frame split across reads is kept."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """The ``(opcode, payload)`` of each frame ``data`` completes."""
        buf = self._buf + data
        frames, used = splitFrames(buf)
        self._buf = buf[used:]
        return frames


@dataclass(slots=True)
class Tally:
    """What one client has seen of the run's messages."""

    received: int = 0
    reordered: int = 0
    #: Latencies (µs) of messages sent inside the measured window.
    latencies: list[int] = field(default_factory=list)


class FrameReader:
    """
    Reads the server-to-client frames of one connection and tallies bench messages.

    Walks frame headers only; within each data frame it looks for the run's marker and reads
    the fixed-width fields after it. ``onOwn(seq)`` is called for messages this client sent
    (its own echo, the closed loop's acknowledgement); ``onControl(opcode, data)`` for pings
    and closes.

    Order is checked per sender: a sequence number at or below the last one seen from that
    sender counts as reordered. (Loss is counted from totals: what a client received against
    what was sent.)
    """

    __slots__ = (
        "_buf",
        "_mark",
        "_markLen",
        "_own",
        "_last",
        "tally",
        "window",
        "onOwn",
        "onControl",
    )

    def __init__(
        self,
        mark: bytes,
        own: int = -1,
        onOwn: Callable[[int], None] | None = None,
        onControl: Callable[[int, bytes], None] | None = None,
    ) -> None:
        self._buf = b""
        self._mark = mark
        self._markLen = len(mark)
        self._own = own
        self._last: dict[int, int] = {}
        self.tally = Tally()
        #: Messages sent in [start, end) µs have their latency recorded.
        self.window = (0, 0)
        self.onOwn = onOwn
        self.onControl = onControl

    def feed(self, data: bytes, nowMicros: int) -> None:
        """Read ``data``, which arrived at ``nowMicros``; a partial frame waits for more."""
        buf = self._buf + data if self._buf else data
        n = len(buf)
        i = 0
        mark = self._mark
        ml = self._markLen
        last = self._last
        tally = self.tally
        lat = tally.latencies
        start, end = self.window
        own = self._own
        while n - i >= 2:
            b1 = buf[i + 1] & 0x7F
            if b1 < 126:
                h = i + 2
                length = b1
            elif b1 == 126:
                if n - i < 4:
                    break
                h = i + 4
                length = (buf[i + 2] << 8) | buf[i + 3]
            else:
                if n - i < 10:
                    break
                h = i + 10
                length = int.from_bytes(buf[i + 2 : h], "big")
            if buf[i + 1] & 0x80:
                h += 4  # a masked frame: servers must not send one, but read past the key
            e = h + length
            if e > n:
                break
            op = buf[i] & 0x0F
            i = e
            if op < OP_CLOSE:
                j = buf.find(mark, h, e)
                if j < 0 or e - j < ml + FIELDS:
                    continue
                j += ml
                sender = int(buf[j : j + SENDER_DIGITS])
                seq = int(buf[j + SENDER_DIGITS : j + SENDER_DIGITS + SEQ_DIGITS])
                sent = int(buf[j + SENDER_DIGITS + SEQ_DIGITS : j + FIELDS])
                tally.received += 1
                prev = last.get(sender, -1)
                if seq > prev:
                    last[sender] = seq
                else:
                    tally.reordered += 1
                if start <= sent < end:
                    lat.append(nowMicros - sent)
                if sender == own and self.onOwn is not None:
                    self.onOwn(seq)
            elif self.onControl is not None:
                self.onControl(op, bytes(buf[h:e]))
        self._buf = buf[i:] if i < n else b""


class MarkerCounter:
    """
    Counts a run's messages in a byte stream without reading frames: the cheap receiver.

    The marker cannot overlap itself, so counting it in the stream (keeping the bytes that
    might start a marker split across reads) counts messages exactly. It neither answers
    pings nor checks order; :class:`FrameReader` does.
    """

    __slots__ = ("_mark", "_keep", "_tail", "tally")

    def __init__(self, mark: bytes) -> None:
        self._mark = mark
        self._keep = len(mark) - 1
        self._tail = b""
        self.tally = Tally()

    def feed(self, data: bytes, nowMicros: int = 0) -> None:
        buf = self._tail + data
        self.tally.received += buf.count(self._mark)
        self._tail = buf[-self._keep :]


#: The client's ``Sec-WebSocket-Key``: a fixed one is fine, the server only hashes it.
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def openingHandshake(hostHeader: str, path: str = "/", extraHeaders: Sequence[str] = ()) -> bytes:
    """A client's opening handshake for ``path`` with this ``Host`` and any extra header lines."""
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {hostHeader}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {KEY}",
        "Sec-WebSocket-Version: 13",
        *extraHeaders,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def handshakeRequest(host: str, port: int, path: str) -> bytes:
    """The opening handshake the load tool sends to ``host``:``port``."""
    return openingHandshake(hostPort(host, port), path)


class HandshakeError(Exception):
    """The server did not switch protocols."""


def handshakeResponse(buf: bytes) -> tuple[bool, bytes]:
    """
    Read the server's handshake response from ``buf``.

    Returns ``(False, buf)`` while the headers are incomplete, ``(True, rest)`` once the
    server switched protocols (``rest`` is the first frame data); raises
    :class:`HandshakeError` for any other answer.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > 65536:
            raise HandshakeError("handshake response headers longer than 64 KiB")
        return False, buf
    status = buf[: buf.find(b"\r\n")]
    parts = status.split(None, 2)
    if len(parts) < 2 or parts[1] != b"101":
        raise HandshakeError(f"server answered {status.decode('latin-1')!r}, not 101")
    return True, buf[end + 4 :]


class RawWebSocket(asyncio.Protocol):
    """
    One raw WebSocket client connection for the benchmarks' own clients: it sends its opening
    handshake, reads the 101, then hands each frame to :meth:`frameReceived`.
    """

    def __init__(self, hostHeader: str, path: str = "/", headers: Sequence[str] = ()) -> None:
        self.request = openingHandshake(hostHeader, path, headers)
        self.open = False
        self._head = b""
        self.frames = Frames()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.open:
            done, rest = handshakeResponse(self._head + data)
            if not done:
                self._head = rest
                return
            self.open = True
            self._head = b""
            self.opened()
            data = rest
        for opcode, payload in self.frames.feed(data):
            self.frameReceived(opcode, payload)

    def opened(self) -> None:
        """The server switched protocols."""

    def frameReceived(self, opcode: int, payload: bytes) -> None:
        """A frame arrived (after the handshake)."""
