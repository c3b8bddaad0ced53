"""
The lean receive path (wschat.lean.receiveFrames) against Autobahn's frame parser: the same
byte streams to a connection of each, and everything observable compared.
"""

from __future__ import annotations

import os
import random
import struct
from typing import Any

import pytest
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.utf8validator import Utf8Validator
from twisted.internet.base import DelayedCall
from txaio.testutil import replace_loop

from wschat import lean
from wschat.bench import frames as framer
from wschat.limits import Limits
from wschat.protocol import ChatServerProtocol
from wschat.testing import MemoryRoom
from wschat.wire import Format


class Recording(ChatServerProtocol):
    """A connection that records each message its hooks hand to onMessage."""

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.received.append((payload, isBinary))  # type: ignore[attr-defined]
        super().onMessage(payload, isBinary)


class AutobahnFrames(Recording):
    """The same connection, every frame read by Autobahn's parser."""

    leanFrames = False


def frame(
    payload: bytes, opcode: int = 1, fin: bool = True, rsv: int = 0, masked: bool = True
) -> bytes:
    """One client frame, masked (unless not ``masked``) with a fresh random key."""
    return framer.frame(opcode, payload, fin=fin, rsv=rsv, mask=os.urandom(4) if masked else None)


def notMinimal(payload: bytes, form: int, opcode: int = 1) -> bytes:
    """A masked frame whose length takes the 16-bit (126) or 64-bit (127) form it need not."""
    minimal = frame(payload, opcode)
    size = struct.pack("!H" if form == 126 else "!Q", len(payload))
    return minimal[:1] + bytes([0x80 | form]) + size + minimal[2 if len(payload) < 126 else 4 :]


def text(size: int, rng: random.Random) -> bytes:
    """Valid UTF-8 of ``size`` bytes, with multi-byte characters when it fits."""
    out = bytearray()
    while len(out) < size:
        c = rng.choice(["a", "é", "€", "😀", " "]).encode("utf-8")
        if len(out) + len(c) > size:
            c = b"z"
        out += c
    return bytes(out)


class Side:
    """One daemon (on its own fake clock) with one connection of ``cls``."""

    def __init__(self, cls: type, fmt: Format, limits: Limits) -> None:
        self.room = MemoryRoom(
            fmt=fmt, welcome="", logMessages=False, logConnections=False, limits=limits, history=0
        )
        factory: Any = self.room.factory
        factory.protocol = cls
        factory.received = []
        self.received: list[tuple[bytes, bool]] = factory.received
        # Autobahn's timers (pings, close handshake) on this daemon's clock.
        with replace_loop(self.room.clock):
            self.server, self.client = self.room.connect()
        self.transport: Any = self.server.transport
        self.transport.stream.clear()

    def feed(self, data: bytes) -> None:
        if self.server.transport is not None:
            self.server.dataReceived(data)

    def written(self) -> bytes:
        return b"".join(self.transport.stream)


#: Attributes per connection: alike in type only (the client's random key, Autobahn's
#: timers of each daemon's clock, when a ping went (wall clock), a masker used once, a
#: validator reset for each message).
_BY_TYPE = {
    "transport",
    "current_frame_masker",
    "utf8validator",
    "_wskey",
    "autoPingPendingCall",
    "autoPingPendingSent",
    "autoPingTimeoutCall",
    "closeHandshakeTimeoutCall",
    "openHandshakeTimeoutCall",
}


def alike(a: Any, b: Any, depth: int = 0) -> bool:
    """Whether two attribute values of two connections (of two daemons) are alike."""
    if a is b or (type(a) is type(b) and _equal(a, b)):
        return True
    if type(a) is not type(b) or depth > 3:
        return False
    if isinstance(a, DelayedCall):
        return bool(a.getTime() == b.getTime() and a.active() == b.active())
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(alike(x, y, depth + 1) for x, y in zip(a, b, strict=True))
    slots = getattr(type(a), "__slots__", None)
    if slots is not None and not hasattr(a, "__dict__"):
        return all(alike(getattr(a, k, None), getattr(b, k, None), depth + 1) for k in slots)
    if hasattr(a, "__dict__"):
        va, vb = vars(a), vars(b)
        return va.keys() == vb.keys() and all(alike(va[k], vb[k], depth + 1) for k in va)
    return False


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


def differences(lean_: ChatServerProtocol, autobahn: ChatServerProtocol) -> set[str]:
    va, vb = vars(lean_), vars(autobahn)
    names = va.keys() | vb.keys()
    out = {n for n in names if n not in va or n not in vb}
    for n in names - out:
        if n in _BY_TYPE:
            if type(va[n]) is not type(vb[n]):
                out.add(n)
        elif n in ("factory", "is_open", "is_closed"):
            continue
        elif not alike(va[n], vb[n]):
            out.add(n)
    return out


def runBoth(
    reads: list[bytes], fmt: Format = Format.RAW, limits: Limits | None = None, tick: float = 0
) -> tuple[Side, Side]:
    """
    Feed ``reads`` to a lean connection and an Autobahn one (advancing each clock ``tick``
    seconds between reads), and check that they did and became the same.
    """
    limits = limits or Limits(inboundRate=0, inboundBytes=0)
    sides = []
    for cls in (Recording, AutobahnFrames):
        side = Side(cls, fmt, limits)
        with replace_loop(side.room.clock):
            for data in reads:
                side.feed(data)
                side.room.clock.advance(tick)
            side.room.clock.advance(0)
        sides.append(side)
    leanSide, abSide = sides
    assert leanSide.received == abSide.received
    assert leanSide.written() == abSide.written()
    assert leanSide.server.state == abSide.server.state
    assert (leanSide.server.localCloseCode, leanSide.server.localCloseReason) == (
        abSide.server.localCloseCode,
        abSide.server.localCloseReason,
    )
    assert differences(leanSide.server, abSide.server) == set()
    stats, abStats = leanSide.server.trafficStats, abSide.server.trafficStats
    if stats is not None:
        assert vars(stats) == vars(abStats)
    return leanSide, abSide


def randomStream(rng: random.Random, count: int, big: bool) -> bytes:
    """``count`` frames of every kind, good and bad, mostly data frames."""
    sizes = [0, 1, 2, 5, 64, 125, 126, 127, 1000, 1023, 1024, 4096]
    if big:
        sizes += [65535, 65536, 70000]
    out = []
    for _ in range(count):
        kind = rng.random()
        size = rng.choice(sizes)
        if kind < 0.45:
            out.append(frame(text(size, rng)))
        elif kind < 0.65:
            out.append(frame(rng.randbytes(size), opcode=2))
        elif kind < 0.72:
            out.append(frame(rng.randbytes(rng.randrange(0, 126)), opcode=rng.choice([9, 10])))
        elif kind < 0.77:
            # A fragmented message, maybe with a ping between its fragments.
            parts = [text(rng.choice([0, 1, 30]), rng) for _ in range(rng.randrange(2, 4))]
            out.append(frame(parts[0], fin=False))
            for p in parts[1:-1]:
                out.append(frame(p, opcode=0, fin=False))
                if rng.random() < 0.5:
                    out.append(frame(b"p", opcode=9))
            out.append(frame(parts[-1], opcode=0))
        elif kind < 0.97:
            out.append(badFrame(rng))
        else:
            out.append(frame(struct.pack("!H", 1000) + b"bye", opcode=8))
    return b"".join(out)


def badFrame(rng: random.Random) -> bytes:
    """A frame Autobahn refuses, or that is over a limit, or merely unusual."""
    choice = rng.randrange(9)
    if choice == 0:
        return frame(rng.choice(INVALID_UTF8))
    if choice == 1:
        return frame(b"unmasked", masked=False)
    if choice == 2:
        return frame(b"rsv", rsv=rng.choice([1, 2, 4]))
    if choice == 3:
        return frame(b"reserved", opcode=rng.choice([3, 7, 11, 15]))
    if choice == 4:
        return notMinimal(b"not minimal", rng.choice([126, 127]))
    if choice == 5:
        return frame(b"x" * 1001, opcode=rng.choice([1, 2]))  # over the small limit
    if choice == 6:
        return frame(b"", opcode=0)  # a continuation outside a message
    if choice == 7:
        return notMinimal(b"a" * 130, 127, opcode=2)  # 64-bit form, not minimal
    return frame(b"\x03", opcode=8)  # close with a 1-byte body


#: Byte strings strict UTF-8 refuses: surrogates, overlongs, past U+10FFFF, cut off.
INVALID_UTF8 = [
    b"\xed\xa0\x80",
    b"a\xed\xbf\xbfb",
    b"\xc0\xaf",
    b"\xc1\xbf",
    b"\xe0\x80\xaf",
    b"\xf0\x80\x80\xaf",
    b"\xf4\x90\x80\x80",
    b"\xf5\x80\x80\x80",
    b"\xff",
    b"\xfe\xfe",
    b"\xc3",
    b"ok\xe2\x82",
    b"\xf0\x9f\x98",
    b"\x80",
    b"\xe2\x82\xac\xbf",
]

#: Byte strings it takes: the edges of each length.
VALID_UTF8 = [
    b"",
    b"\x00",
    b"\x7f",
    b"\xc2\x80",
    b"\xdf\xbf",
    b"\xe0\xa0\x80",
    b"\xed\x9f\xbf",
    b"\xee\x80\x80",
    b"\xef\xbf\xbf",
    b"\xf0\x90\x80\x80",
    b"\xf4\x8f\xbf\xbf",
    "κόσμε €😀".encode(),
]


def autobahnAccepts(payload: bytes) -> bool:
    """Autobahn's verdict on ``payload`` as a complete text message."""
    validator = Utf8Validator()
    valid, ended, _, _ = validator.validate(payload)
    return bool(valid and ended)


def strictAccepts(payload: bytes) -> bool:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_strict_utf8_is_autobahns_verdict():
    """Pins Autobahn: Python's strict decoder accepts exactly the messages its validator does."""
    rng = random.Random(15)
    corpus = VALID_UTF8 + INVALID_UTF8
    # Every 1-, 2- and 3-byte string from the lead bytes and continuation bytes that matter.
    edges = [0x00, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF, 0xE0]
    edges += [0xE1, 0xEC, 0xED, 0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xF8, 0xFF]
    corpus += [bytes([a]) for a in edges]
    corpus += [bytes([a, b]) for a in edges for b in edges]
    corpus += [bytes([a, b, c]) for a in edges for b in edges for c in edges]
    corpus += [
        bytes([a, b, c, d])
        for a in edges[8:]
        for b in edges
        for c in edges[2:8]
        for d in edges[2:8]
    ]
    corpus += [rng.randbytes(rng.randrange(1, 12)) for _ in range(20000)]
    corpus += [
        "".join(
            chr(
                rng.choice(
                    [
                        rng.randrange(0x80, 0x800),
                        rng.randrange(0x800, 0xD800),
                        rng.randrange(0x10000, 0x110000),
                    ]
                )
            )
            for _ in range(5)
        ).encode()
        for _ in range(2000)
    ]
    disagree = [p for p in corpus if autobahnAccepts(p) != strictAccepts(p)]
    assert disagree == []
    assert all(strictAccepts(p) for p in VALID_UTF8)
    assert not any(strictAccepts(p) for p in INVALID_UTF8)


def test_the_lean_path_is_taken():
    """Small complete frames are read by receiveFrames, not by Autobahn's frame parser."""
    side = Side(Recording, Format.RAW, Limits(inboundRate=0, inboundBytes=0))
    parsed = []
    server: Any = side.server
    server.processData = lambda: parsed.append(1) or WebSocketProtocol.processData(server)
    side.feed(frame(b"one") + frame(b"\x00\x01", opcode=2) + frame("é€".encode()))
    assert side.received == [(b"one", False), (b"\x00\x01", True), ("é€".encode(), False)]
    assert parsed == []
    # A ping is Autobahn's: parsed there, from its first byte.
    side.feed(frame(b"two") + frame(b"p", opcode=9) + frame(b"three"))
    assert side.received[3:] == [(b"two", False), (b"three", False)]
    assert parsed


def test_an_unpinned_autobahn_reads_every_frame(monkeypatch):
    """On an Autobahn version not pinned, receiveFrames declines and Autobahn parses all."""
    monkeypatch.setattr(lean, "ENABLED", False)
    lean._receivers.clear()
    try:
        side = Side(Recording, Format.RAW, Limits(inboundRate=0, inboundBytes=0))
        assert not lean.receiveFrames(side.server, frame(b"one"))
        side.feed(frame(b"two"))
        assert side.received == [(b"two", False)]
    finally:
        lean._receivers.clear()


@pytest.mark.parametrize("seed", range(12))
def test_random_streams_read_as_autobahn_reads_them(seed):
    """Pins Autobahn: random mixes of frames, cut into random reads, read identically."""
    rng = random.Random(seed)
    big = seed % 3 == 0
    limits = Limits(inboundRate=0, inboundBytes=0, maxMessageSize=(1 << 17) if big else 1000)
    stream = randomStream(rng, 40, big)
    reads = []
    i = 0
    while i < len(stream):
        n = rng.choice([1, 2, 7, 64, 512, 4096, 1 << 20])
        reads.append(stream[i : i + n])
        i += n
    runBoth(reads, Format.RAW, limits)


@pytest.mark.parametrize("seed", range(6))
def test_streams_of_good_frames_read_as_autobahn_reads_them(seed):
    """Pins Autobahn: good frames only (in one read, then cut), the lean path's own case."""
    rng = random.Random(100 + seed)
    frames = [frame(text(rng.choice([0, 1, 60, 125, 126, 2000]), rng)) for _ in range(30)]
    frames += [frame(rng.randbytes(rng.choice([0, 3, 130])), opcode=2) for _ in range(10)]
    rng.shuffle(frames)
    stream = b"".join(frames)
    runBoth([stream])
    cut = rng.randrange(1, len(stream))
    runBoth([stream[:cut], stream[cut:]])


def test_a_frame_cut_at_every_offset_reads_as_autobahn_reads_it():
    """Pins Autobahn: two frames and a ping, split in two reads at every byte offset."""
    stream = frame(b"hello") + frame(b"p", opcode=9) + frame("wörld".encode() * 30)
    for cut in range(len(stream) + 1):
        runBoth([stream[:cut], stream[cut:]])


@pytest.mark.parametrize("seed", range(4))
def test_a_tiny_inbound_share_holds_reading_as_autobahn(seed):
    """Pins the inbound share: holds and refusals mid-read, as through Autobahn's parser."""
    rng = random.Random(200 + seed)
    limits = Limits(
        inboundRate=5, inboundBytes=300, inboundBurst=1, inboundHold=0.5, maxMessageSize=1000
    )
    stream = (
        randomStream(rng, 30, False)
        if seed % 2
        else b"".join(frame(text(rng.choice([0, 10, 100]), rng)) for _ in range(60))
    )
    reads = [stream[i : i + 700] for i in range(0, len(stream), 700)]
    runBoth(reads, Format.RAW, limits, tick=0.3)


def test_empty_frames_and_frame_counts_as_autobahn():
    """Many empty messages: counted per message (not refused), as through Autobahn."""
    runBoth([frame(b"") * 40 + frame(b"", opcode=2) * 10])


def test_binary_in_the_prefixed_format_is_refused_as_autobahn():
    """Binary where text is expected closes (1003); the frames behind it are Autobahn's."""
    leanSide, _ = runBoth(
        [frame(b"fine") + frame(b"\x01", opcode=2) + frame(b"after")], Format.PREFIXED
    )
    assert leanSide.server.localCloseCode == 1003


def test_json_commands_read_as_autobahn():
    """JSON clients' commands and bad commands (notices) answered the same."""
    runBoth(
        [frame(b'{"type":"message","text":"hi","id":"a1"}') + frame(b"{bad") + frame(b"plain")],
        Format.JSON,
    )


def test_a_ping_timeout_is_cancelled_by_a_data_frame():
    """Pins Autobahn: a data frame read the lean way cancels a pending ping timeout."""
    limits = Limits(inboundRate=0, inboundBytes=0, pingInterval=1, pingTimeout=5)
    sides = []
    for cls in (Recording, AutobahnFrames):
        side = Side(cls, Format.RAW, limits)
        with replace_loop(side.room.clock):
            side.room.clock.advance(1.5)
            assert side.server.autoPingTimeoutCall is not None
            side.feed(frame(b"alive"))
        sides.append(side)
    assert sides[0].server.autoPingTimeoutCall is None is sides[1].server.autoPingTimeoutCall
    assert differences(sides[0].server, sides[1].server) == set()


def test_message_listeners_are_told():
    """A listener of Autobahn's 'message' event hears messages read either way."""
    heard = []
    side = Side(Recording, Format.RAW, Limits(inboundRate=0, inboundBytes=0))
    side.server.on("message", lambda payload, is_binary: heard.append((payload, is_binary)))
    side.feed(frame(b"one") + frame(b"\x02", opcode=2))
    assert heard == [(b"one", False), (b"\x02", True)]


@pytest.mark.parametrize("bad", INVALID_UTF8)
def test_invalid_utf8_is_autobahns_1007(bad):
    """Pins Autobahn: a text frame of invalid UTF-8 after a good one closes with its 1007."""
    leanSide, _ = runBoth([frame(b"ok") + frame(bad) + frame(b"after")])
    assert leanSide.received == [(b"ok", False)]
    assert leanSide.server.localCloseCode == 1007


def test_a_refusal_on_an_empty_frame_ending_the_read_is_as_through_autobahn():
    """
    Pins the inbound share: a connection refused on an empty frame that ends its read has
    that frame finished (onMessage with nothing, the frame's state reset) as Autobahn does.
    """
    limits = Limits(inboundRate=1, inboundBytes=0, inboundBurst=1, inboundHold=0)
    leanSide, _ = runBoth([frame(b"")] * 12, Format.RAW, limits, tick=0.7)
    assert leanSide.server.localCloseCode == 1008
    assert leanSide.server.current_frame is None


def test_a_refusal_on_an_empty_frame_cancels_the_ping_timeout_as_autobahn():
    """Pins Autobahn: the refused empty frame, finished, cancels a pending ping timeout."""
    limits = Limits(
        inboundRate=1,
        inboundBytes=0,
        inboundBurst=1,
        inboundHold=0,
        pingInterval=1,
        pingTimeout=30,
    )
    sides = []
    for cls in (Recording, AutobahnFrames):
        side = Side(cls, Format.RAW, limits)
        with replace_loop(side.room.clock):
            side.feed(frame(b""))
            side.feed(frame(b""))
            side.room.clock.advance(1.5)
            assert side.server.autoPingTimeoutCall is not None
            side.feed(frame(b""))
            side.room.clock.advance(0)
        sides.append(side)
    assert sides[0].server.localCloseCode == 1008 == sides[1].server.localCloseCode
    assert sides[0].server.autoPingTimeoutCall is None is sides[1].server.autoPingTimeoutCall
    assert differences(sides[0].server, sides[1].server) == set()


def test_a_refusal_mid_read_is_as_through_autobahn():
    """
    Pins the inbound share: a connection refused (1008) on a frame read the lean way reads
    that frame's payload and what follows as Autobahn's parser does.
    """
    # 16-byte frames: the 512-byte slices of a held read start on a frame.
    stream = b"".join(frame(b"%09d" % n + b"!") for n in range(64))
    limits = Limits(inboundRate=1, inboundBytes=0, inboundBurst=1, inboundHold=0)
    leanSide, _ = runBoth([stream], Format.RAW, limits, tick=2)
    assert leanSide.server.localCloseCode == 1008
    # The first slice read before the hold; from the refused frame on (the rest of its
    # slice), Autobahn's parser drops each payload and calls onMessage with none.
    assert [p for p, _ in leanSide.received[:32]] == [b"%09d!" % n for n in range(32)]
    assert leanSide.received[32:] == [(b"", False)] * 32


class Listening(Recording):
    """A connection that starts listening to its own 'message' event on its first message."""

    heard: list[tuple[bytes, bool]]

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        super().onMessage(payload, isBinary)
        if self._listeners is None:
            self.heard = []
            self.on("message", lambda p, is_binary: self.heard.append((p, is_binary)))


class AutobahnListening(Listening):
    leanFrames = False


def test_a_listener_added_by_onmessage_is_told():
    """A listener of Autobahn's 'message' event added during a read hears that very message."""
    sides = []
    for cls in (Listening, AutobahnListening):
        side = Side(cls, Format.RAW, Limits(inboundRate=0, inboundBytes=0))
        side.feed(frame(b"one") + frame(b"two") + frame(b"\x03", opcode=2))
        sides.append(side)
    heard = [s.server.heard for s in sides]  # type: ignore[attr-defined]
    assert heard[0] == heard[1] == [(b"one", False), (b"two", False), (b"\x03", True)]
