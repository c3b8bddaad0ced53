"""
A busy turn's frames, kept once per format and sent to every member as one shared buffer
(``SharedFrames``): who gets what, in which order, and what stays on the one-by-one path.
"""

from __future__ import annotations

import json as jsonlib
from typing import Any

import pytest_twisted
from autobahn.websocket.protocol import WebSocketProtocol
from tlsfiles import makeTLSFiles
from twisted.internet import defer, ssl, tcp
from twisted.internet.testing import MemoryReactorClock

from wschat import fastwrite
from wschat.limits import Limits
from wschat.protocol import ChatServerProtocol
from wschat.server import ChatServer
from wschat.testing import connect
from wschat.wire import Format, Message


class RecordingSocket:
    """Takes every byte at once and keeps what each ``send`` was handed."""

    def __init__(self) -> None:
        self.sends: list[Any] = []

    def send(self, data: Any) -> int:
        self.sends.append(data)
        return len(data)

    def received(self) -> bytes:
        return b"".join(bytes(d) for d in self.sends)


def stubTransport(socket: Any = None) -> Any:
    """A plain TCP transport, as the writer sees it, with nothing queued."""
    t: Any = object.__new__(tcp.Server)
    t.dataBuffer = b""
    t._tempDataBuffer = []
    t._tempDataLen = 0
    t.TLS = False
    t.disconnecting = False
    t._writeDisconnected = False
    t.connected = True
    t.socket = socket or RecordingSocket()
    t.producer = None
    return t


class Room:
    """A ChatServer's room on a fake clock, its members on recording sockets."""

    def __init__(self, **options: Any) -> None:
        self.clock = MemoryReactorClock()
        self.server = ChatServer(fmt=Format.RAW, welcome="", reactor=self.clock, **options)
        self.turns = fastwrite.Turns(self.clock)
        self.server.room.turns = self.turns

    def member(self, socket: Any = None, start: int | None = None) -> ChatServerProtocol:
        """
        A member on a recording socket; with ``start``, it replays the history from there
        (with budget for all of it) before going live.
        """
        p: ChatServerProtocol = self.server.factory.buildProtocol(None)
        transport = stubTransport(socket)
        transport.reactor = self.clock  # where a write that waits registers the socket
        p.transport = fastwrite.wrap(transport, self.turns)
        p._connectionMade()  # Autobahn's connection state, without a handshake
        p.closeHandshakeTimeout = 0  # no timer on the global reactor for a closed member
        p.state = WebSocketProtocol.STATE_OPEN
        p._plainFrames = True
        p._maxQueue = self.server.limits.maxQueue
        p._replayBudget = 1 << 20
        self.server.room.join(p, Format.RAW, start, writer=p.transport)
        if start is not None:
            self.server.room.catchUp(p)
        return p

    def broadcast(self, text: bytes) -> bytes:
        """Relay ``text``; its frame's bytes."""
        self.server.room.broadcast(Message("127.0.0.1:1", text, False))
        return bytes(self.server.factory.prepareMessage(text, False).payloadHybi)

    def busy(self) -> None:
        self.turns.busy = True

    def endTurn(self) -> None:
        self.clock.advance(0)


def sock(p: ChatServerProtocol) -> RecordingSocket:
    return p.transport.transport.socket  # type: ignore[union-attr]


def test_a_busy_turn_sends_one_shared_buffer_to_every_member():
    """
    In a busy turn every member gets the turn's frames in one send: the same bytes object
    for all of them, nothing before the turn's end.
    """
    room = Room()
    members = [room.member() for _ in range(3)]
    room.busy()
    frames = [room.broadcast(b"m%d" % k) for k in range(3)]
    assert all(sock(p).sends == [] for p in members)
    room.endTurn()
    sent = [sock(p).sends for p in members]
    assert all(len(s) == 1 for s in sent)
    assert sent[0][0] == b"".join(frames)
    assert sent[1][0] is sent[0][0] and sent[2][0] is sent[0][0]
    # Two frames in the turn: the next one is busy too.
    assert room.turns.busy


def test_a_member_joining_mid_turn_gets_only_the_frames_after_it_joined():
    """A member that joined during a busy turn gets a slice: nothing from before it joined."""
    room = Room()
    old = room.member()
    room.busy()
    before = room.broadcast(b"before")
    new = room.member()
    after = room.broadcast(b"after")
    room.endTurn()
    assert sock(old).received() == before + after
    [slice_] = sock(new).sends
    assert isinstance(slice_, memoryview)
    assert bytes(slice_) == after


def test_a_member_leaving_mid_turn_gets_nothing_after_it_left():
    """A member that left during a busy turn gets the frames before, none after."""
    room = Room()
    stays, leaves = room.member(), room.member()
    room.busy()
    first = room.broadcast(b"first")
    room.server.room.leave(leaves)
    second = room.broadcast(b"second")
    room.endTurn()
    assert sock(leaves).received() == first
    assert sock(stays).received() == first + second
    assert leaves.transport.shared is None  # type: ignore[union-attr]


class LeavingSocket(RecordingSocket):
    """Takes every byte, and the first ``send`` makes another member leave the room."""

    def __init__(self, leave: Any) -> None:
        super().__init__()
        self.leave = leave

    def send(self, data: Any) -> int:
        leave, self.leave = self.leave, None
        if leave is not None:
            leave()
        return super().send(data)


def test_a_member_leaving_while_the_turn_is_sent_gets_nothing_more():
    """
    A member that leaves while the turn's buffer is being handed out (a slow reader dropped
    meanwhile) is not sent the turn's frames after it left; the others all are.
    """
    room = Room()
    members: list[ChatServerProtocol] = []
    first = room.member(LeavingSocket(lambda: room.server.room.leave(members[1])))
    members += [first, room.member(), room.member()]
    room.busy()
    frames = [room.broadcast(b"one"), room.broadcast(b"two")]
    room.endTurn()
    assert sock(members[1]).sends == []
    assert sock(members[0]).sends == [b"".join(frames)]
    assert sock(members[2]).sends == [b"".join(frames)]


def test_a_write_during_the_turn_keeps_its_place():
    """
    Anything else written to a member during a busy turn (a notice, a pong, a close) comes
    after the frames broadcast before it and before those broadcast after it.
    """
    room = Room()
    writer, other = room.member(), room.member()
    room.busy()
    first = room.broadcast(b"first")
    writer.sendMessage(b"own")
    own = bytes(room.server.factory.prepareMessage(b"own", False).payloadHybi)
    second = room.broadcast(b"second")
    room.endTurn()
    assert sock(writer).received() == first + own + second
    assert sock(other).sends == [first + second]


def test_a_member_paused_mid_turn_gets_the_frames_one_by_one_and_counted():
    """
    A member whose transport paused it during the turn gets the frames through deliver,
    counted against --max-queue, while the others still get one shared send.
    """
    room = Room()
    slow, fast = room.member(), room.member()
    room.busy()
    frames = [room.broadcast(b"a" * 10)]
    slow.pauseProducing()
    frames.append(room.broadcast(b"b" * 10))
    room.endTurn()
    assert slow._unsent == sum(len(f) for f in frames)
    assert sock(slow).received() == b"".join(frames)
    assert sock(fast).sends == [b"".join(frames)]


def test_a_member_paused_after_a_busy_turn_gets_the_next_one_frame_by_frame():
    """
    A member that took earlier busy turns' buffers and is then paused gets the next busy
    turn's frames through deliver (counted), not the shared buffer.
    """
    room = Room()
    slow, fast = room.member(), room.member()
    room.busy()
    earlier = room.broadcast(b"earlier")
    room.endTurn()
    room.busy()
    slow.pauseProducing()
    frames = [room.broadcast(b"a" * 10), room.broadcast(b"b" * 10)]
    room.endTurn()
    assert slow._unsent == sum(len(f) for f in frames)
    assert sock(slow).received() == earlier + b"".join(frames)
    assert sock(fast).sends == [earlier, b"".join(frames)]


def test_a_member_that_sent_its_close_frame_gets_no_more_frames():
    """
    After a member's close frame (the connection closing) no busy turn's frames reach it,
    though it took the shared buffer of the turn before.
    """
    room = Room()
    closing, other = room.member(), room.member()
    room.busy()
    earlier = room.broadcast(b"earlier")
    room.endTurn()
    closing.sendClose(1000)
    closeFrame = sock(closing).received()[len(earlier) :]
    assert closeFrame[:1] == b"\x88"
    room.busy()
    later = room.broadcast(b"later")
    room.endTurn()
    assert sock(closing).received() == earlier + closeFrame
    assert sock(other).received() == earlier + later


class ShortSocket(RecordingSocket):
    """Takes ``limit`` bytes of its first send, then everything; or fails with ``error``."""

    def __init__(self, limit: int | None = None, error: OSError | None = None) -> None:
        super().__init__()
        self.limit = limit
        self.error = error

    def send(self, data: Any) -> int:
        if self.error is not None:
            raise self.error
        if self.limit is not None:
            data, self.limit = data[: self.limit], None
        return super().send(data)


def test_a_partial_shared_send_queues_the_rest_in_order():
    """
    When the kernel takes only part of a member's shared buffer, the rest goes to the
    transport's own buffer, and what is written next goes behind it.
    """
    room = Room()
    short, other = room.member(ShortSocket(limit=5)), room.member()
    room.busy()
    frames = [room.broadcast(b"first"), room.broadcast(b"second")]
    room.endTurn()
    whole = b"".join(frames)
    assert sock(short).received() == whole[:5]
    tcpTransport: Any = short.transport.transport  # type: ignore[union-attr]
    assert tcpTransport.dataBuffer + b"".join(tcpTransport._tempDataBuffer) == whole[5:]
    assert short.transport.dirty  # type: ignore[union-attr]
    assert sock(other).sends == [whole]


def test_a_socket_error_in_a_shared_send_leaves_the_bytes_to_twisted():
    """
    A socket error (a reset) during the shared send hands the bytes to the transport, so that
    Twisted meets the error in its own write and closes the connection its usual way.
    """
    room = Room()
    broken, other = room.member(ShortSocket(error=ConnectionResetError())), room.member()
    room.busy()
    frames = [room.broadcast(b"first"), room.broadcast(b"second")]
    room.endTurn()
    queued = broken.transport.transport._tempDataBuffer  # type: ignore[union-attr]
    assert b"".join(queued) == b"".join(frames)
    assert sock(other).sends == [b"".join(frames)]


def closingCount(busy: bool) -> tuple[int, int]:
    """
    A paused member under --max-queue 100 and 20 frames of 12 bytes: the bytes counted when
    it was closed, and how many frames reached its transport, in busy or quiet turns.
    """
    room = Room(limits=Limits(maxQueue=100))
    slow = room.member()
    room.member()
    slow.pauseProducing()
    data = []
    for k in range(20):
        if busy:
            room.busy()
        else:
            room.endTurn()
        room.broadcast(b"%010d" % k)
    room.endTurn()
    room.endTurn()
    data = sock(slow).received()
    assert slow.state != WebSocketProtocol.STATE_OPEN
    return slow._unsent, data.count(b"\x81\x0a")


def test_max_queue_closes_at_the_same_byte_count_in_busy_turns():
    """--max-queue closes a paused member after the same bytes whether turns are busy or not."""
    assert closingCount(busy=True) == closingCount(busy=False)
    unsent, frames = closingCount(busy=True)
    assert unsent == 108 and frames == 8  # the 9th frame (12 bytes each) crosses 100


def test_no_fast_write_room_delivers_one_by_one():
    """Without turns (--no-fast-write) the room hands each member each frame."""
    room = Room()
    room.server.room.turns = None
    p = room.member()
    room.busy()
    frame = room.broadcast(b"x")
    assert p.transport.shared is None
    room.endTurn()
    assert sock(p).received() == frame


@pytest_twisted.ensureDeferred
async def test_a_mixed_room_gets_every_message_in_one_order(daemon, tmp_path):
    """
    Plain, JSON, TLS and compressed clients in one room, messages sent in bursts (busy turns):
    every client gets every message, all in the same order.
    """
    files = makeTLSFiles(tmp_path)
    service, url = daemon(
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--listen",
        files.listen(),
        "--compression",
        "--format",
        "raw",
        "--welcome",
        "",
    )
    tlsPort = service.endpoints[1].port.getHost().port
    trust = ssl.optionsForClientTLS(
        "127.0.0.1", trustRoot=ssl.Certificate.loadPEM(files.ca.read_bytes())
    )
    plain = [await connect(url) for _ in range(3)]
    json = await connect(url, protocols=["wschat.json"])
    secure = await connect(f"wss://127.0.0.1:{tlsPort}", contextFactory=trust)
    deflating = await connect(url, offerDeflate=True)
    assert deflating.websocket_extensions_in_use
    members = list(service.room)
    shared = [m for m in members if getattr(m.transport, "shared", None) is not None]
    # The plain clients and the JSON one (a buffer of its own); TLS and deflate one by one.
    assert len(shared) == 4
    await json.nextText()  # its welcome
    senders = [plain[0], plain[1]]
    sent = []
    for burst in range(10):
        for k in range(20):
            sender = senders[k % 2]
            text = f"{burst}-{k}"
            sender.sendText(text)
            sent.append(text)
    everyone = [*plain, secure, deflating]
    got = [await c.texts(len(sent)) for c in everyone]
    jsonGot: list[str] = []
    while len(jsonGot) < len(sent):
        obj = jsonlib.loads(await json.nextText())
        if obj["type"] == "message":  # not the others' presence
            jsonGot.append(obj["text"])
    # Each sender's messages in its order, and one order for all.
    for order in [*got, jsonGot]:
        assert order == got[0]
        for sender in range(2):
            mine = [t for t in order if int(t.split("-")[1]) % 2 == sender]
            assert mine == [t for t in sent if int(t.split("-")[1]) % 2 == sender]
    assert sorted(got[0]) == sorted(sent)
    for c in [*everyone, json]:
        c.sendClose(1000)
    await defer.gatherResults([c.closed for c in [*everyone, json]])


def test_a_replay_that_goes_live_mid_turn_gets_each_message_once():
    """
    A member replaying history that reaches the head during a busy turn gets the turn's
    earlier messages from the replay and the later ones from the shared buffer: each once.
    """
    room = Room()
    other = room.member()
    history = room.server.history
    assert history is not None
    before = room.broadcast(b"before")
    room.endTurn()
    room.busy()
    during = room.broadcast(b"during")
    start, _ = history.start(None, 2)
    p = room.member(start=start)
    assert not room.server.room.replaying(p)
    after = room.broadcast(b"after")
    room.endTurn()
    assert sock(p).received() == before + during + after
    assert sock(other).received() == before + during + after
