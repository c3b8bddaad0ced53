"""
The write fast path, over real loopback TCP, TLS and UNIX connections.

These tests also pin the Twisted behaviour the fast path relies on: a plain TCP transport's
queued bytes are visible in ``dataBuffer``/``_tempDataBuffer``, and a streaming producer is
paused only while bytes are queued.
"""

from __future__ import annotations

import errno
import hashlib
import os

import pytest
import pytest_twisted
from tlsfiles import makeTLSFiles
from twisted.internet import defer, endpoints, protocol, reactor, ssl, task, tcp, unix
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from wschat import fastwrite
from wschat.bench import frames
from wschat.testing import connect


class Recorder(protocol.Protocol):
    """Keeps what it receives; ``waitFor(n)`` fires once ``n`` bytes are in."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.waiting: list[tuple[int, defer.Deferred[bytes]]] = []
        self.connected_: defer.Deferred[Recorder] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.connected_.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        still = []
        for n, d in self.waiting:
            if len(self.received) >= n:
                d.callback(bytes(self.received))
            else:
                still.append((n, d))
        self.waiting = still

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)

    def waitFor(self, n: int) -> defer.Deferred[bytes]:
        if len(self.received) >= n:
            return defer.succeed(bytes(self.received))
        d: defer.Deferred[bytes] = defer.Deferred()
        self.waiting.append((n, d))
        return d


class RecorderFactory(protocol.ClientFactory):
    def __init__(self) -> None:
        self.built: defer.Deferred[Recorder] = defer.Deferred()

    def buildProtocol(self, addr: object) -> Recorder:
        p = Recorder()
        p.factory = self
        p.connected_.chainDeferred(self.built)
        return p


class Pair:
    """A connected server and client, and their cleanup."""

    def __init__(self, port: object, server: Recorder, client: Recorder) -> None:
        self.port = port
        self.server = server
        self.client = client

    async def close(self) -> None:
        for p in (self.server, self.client):
            if p.transport is not None:
                p.transport.abortConnection()
        await defer.gatherResults([self.server.lost, self.client.lost])
        await self.port.stopListening()


async def tcpPair() -> Pair:
    serverFactory = RecorderFactory()
    port = reactor.listenTCP(0, serverFactory, interface="127.0.0.1")
    clientFactory = RecorderFactory()
    reactor.connectTCP("127.0.0.1", port.getHost().port, clientFactory)
    client = await clientFactory.built
    server = await serverFactory.built
    return Pair(port, server, client)


class StubSocket:
    """A socket whose first ``send`` misbehaves as told; later calls go to the real one."""

    def __init__(self, real: object, first: object) -> None:
        self.real = real
        self.first = first
        self.calls = 0

    def send(self, data: bytes) -> int:
        self.calls += 1
        if self.calls == 1:
            if isinstance(self.first, BaseException):
                raise self.first
            return self.real.send(bytes(data)[: self.first])
        return self.real.send(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)


# -- the Twisted behaviour relied on


@pytest_twisted.ensureDeferred
async def test_tcp_transport_shows_queued_bytes():
    """Pins Twisted: write() queues in _tempDataBuffer; a flushed transport has both empty."""
    pair = await tcpPair()
    try:
        t = pair.server.transport
        assert type(t) is tcp.Server
        assert t.dataBuffer == b"" and t._tempDataBuffer == []
        t.write(b"queued")
        assert t._tempDataBuffer == [b"queued"]
        await pair.client.waitFor(6)
        assert not t.dataBuffer and not t._tempDataBuffer
        assert type(pair.client.transport) is tcp.Client
    finally:
        await pair.close()


@implementer(IPushProducer)
class Producer:
    paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_paused_producer_means_bytes_queued():
    """Pins Twisted: a streaming producer is paused only when the buffer is over the limit."""
    pair = await tcpPair()
    try:
        t = pair.server.transport
        producer = Producer()
        t.registerProducer(producer, True)
        t.write(b"x" * (t.bufferSize + 1))
        assert producer.paused
        assert not fastwrite.canSendDirectly(t)
        assert fastwrite.write(t, b"tail") == 0
        await pair.client.waitFor(t.bufferSize + 5)
        assert not producer.paused
        assert pair.client.received.endswith(b"xtail")
        t.unregisterProducer()
    finally:
        await pair.close()


# -- the fast path


@pytest_twisted.ensureDeferred
async def test_idle_transport_sends_at_once():
    """With nothing queued, the kernel takes the frame now: Twisted's buffer stays empty."""
    pair = await tcpPair()
    try:
        t = pair.server.transport
        assert fastwrite.canSendDirectly(t)
        assert fastwrite.write(t, b"hello") == 5
        assert not t._tempDataBuffer and not t.dataBuffer
        assert await pair.client.waitFor(5) == b"hello"
    finally:
        await pair.close()


@pytest_twisted.ensureDeferred
async def test_queued_data_goes_behind_the_queue():
    """With bytes already queued, the frame is queued after them: order is kept."""
    pair = await tcpPair()
    try:
        t = pair.server.transport
        t.write(b"first ")
        assert not fastwrite.canSendDirectly(t)
        assert fastwrite.write(t, b"second") == 0
        assert t._tempDataBuffer == [b"first ", b"second"]
        assert await pair.client.waitFor(12) == b"first second"
    finally:
        await pair.close()


#: How the first ``send`` misbehaves, how much of ``abcdefgh`` it takes, what must be queued.
REFUSALS = [
    (3, 3, b"defgh"),
    (BlockingIOError(errno.EAGAIN, "full"), 0, b"abcdefgh"),
    (ConnectionResetError(errno.ECONNRESET, "reset"), 0, b"abcdefgh"),
]


@pytest.mark.parametrize(("first", "sent", "kept"), REFUSALS)
@pytest_twisted.ensureDeferred
async def test_refused_bytes_go_to_the_transport(first, sent, kept):
    """
    A partial send, EAGAIN or another socket error: what the kernel did not take goes to
    transport.write (whose own path meets any error), in order, and so does the next frame.
    """
    pair = await tcpPair()
    try:
        t = pair.server.transport
        t.socket = StubSocket(t.socket, first)
        assert fastwrite.write(t, b"abcdefgh") == sent
        assert t._tempDataBuffer == [kept]
        assert fastwrite.write(t, b"ij") == 0
        assert await pair.client.waitFor(10) == b"abcdefghij"
    finally:
        t.socket = t.socket.real
        await pair.close()


@pytest_twisted.ensureDeferred
async def test_real_partial_send_of_a_large_frame():
    """A frame larger than the socket buffer: the kernel takes part, the peer gets all, in order."""
    pair = await tcpPair()
    try:
        t = pair.server.transport
        big = os.urandom(1 << 20) * 16
        sent = fastwrite.write(t, big)
        assert 0 < sent < len(big)
        fastwrite.write(t, b"end")
        got = await pair.client.waitFor(len(big) + 3)
        assert hashlib.sha256(got).digest() == hashlib.sha256(big + b"end").digest()
    finally:
        await pair.close()


@pytest_twisted.ensureDeferred
async def test_disconnecting_transport_is_not_bypassed():
    """After loseConnection the frame goes through transport.write (which may drop it)."""
    pair = await tcpPair()
    try:
        t = pair.server.transport
        t.loseConnection()
        assert not fastwrite.canSendDirectly(t)
        assert fastwrite.write(t, b"late") == 0
    finally:
        await pair.close()


def test_missing_attributes_fall_back():
    """A TCP transport without the private attributes (another Twisted) is never bypassed."""
    bare = object.__new__(tcp.Server)
    assert not fastwrite.canSendDirectly(bare)


class Writes:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


def test_other_transports_use_write():
    """Anything that is not exactly a TCP connection (wrappers, test doubles) gets write()."""
    w = Writes()
    assert fastwrite.write(w, b"frame") == 0
    assert w.written == [b"frame"]


@pytest_twisted.ensureDeferred
async def test_unix_socket_uses_write(tmp_path):
    """A UNIX-socket connection is never bypassed, and its frame still arrives."""
    path = str(tmp_path / "s.sock")
    serverFactory = RecorderFactory()
    port = reactor.listenUNIX(path, serverFactory)
    clientFactory = RecorderFactory()
    reactor.connectUNIX(path, clientFactory)
    client = await clientFactory.built
    server = await serverFactory.built
    pair = Pair(port, server, client)
    try:
        assert isinstance(server.transport, unix.Server)
        assert not fastwrite.canSendDirectly(server.transport)
        assert fastwrite.write(server.transport, b"over unix") == 0
        assert await client.waitFor(9) == b"over unix"
    finally:
        await pair.close()


@pytest_twisted.ensureDeferred
async def test_tls_uses_write(tmp_path):
    """A TLS connection is never bypassed: the frame is encrypted and arrives as plaintext."""
    files = makeTLSFiles(tmp_path)
    cert = files.serverCertificate()
    serverFactory = RecorderFactory()
    endpoint = endpoints.SSL4ServerEndpoint(reactor, 0, cert.options(), interface="127.0.0.1")
    port = await endpoint.listen(serverFactory)
    clientFactory = RecorderFactory()
    clientEndpoint = endpoints.SSL4ClientEndpoint(
        reactor,
        "127.0.0.1",
        port.getHost().port,
        ssl.optionsForClientTLS("localhost", trustRoot=files.trustRoot()),
    )
    await clientEndpoint.connect(clientFactory)
    client = await clientFactory.built
    server = await serverFactory.built
    pair = Pair(port, server, client)
    try:
        assert not fastwrite.canSendDirectly(server.transport)
        assert fastwrite.write(server.transport, b"secret") == 0
        assert await client.waitFor(6) == b"secret"
    finally:
        await pair.close()


@pytest_twisted.ensureDeferred
async def test_started_tls_uses_write(tmp_path):
    """A plain TCP connection that has started TLS is no longer bypassed."""
    pair = await tcpPair()
    try:
        t = pair.server.transport
        assert fastwrite.canSendDirectly(t)
        t.startTLS(makeTLSFiles(tmp_path).serverCertificate().options())
        assert not fastwrite.canSendDirectly(t)
    finally:
        await pair.close()


class CountingSocket:
    """Passes sends to the real socket and keeps what each one carried."""

    def __init__(self, real: object) -> None:
        self.real = real
        self.sends: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sends.append(bytes(data))
        return self.real.send(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)


def countingWriter(t: tcp.Server, clock: task.Clock) -> fastwrite.DirectWriter:
    t.socket = CountingSocket(t.socket)
    return fastwrite.DirectWriter(t, fastwrite.Turns(clock))


@pytest_twisted.ensureDeferred
async def test_quiet_turn_sends_at_once():
    """In a quiet turn a frame goes to the kernel at once; the turn's end is scheduled."""
    pair = await tcpPair()
    clock = task.Clock()
    t = pair.server.transport
    w = countingWriter(t, clock)
    try:
        w.write(b"now")
        assert t.socket.sends == [b"now"] and not t._tempDataBuffer
        assert len(clock.getDelayedCalls()) == 1
        assert await pair.client.waitFor(3) == b"now"
        clock.advance(0)
        assert w.turns.turn == 1 and not w.turns.busy
    finally:
        t.socket = t.socket.real
        await pair.close()


@pytest_twisted.ensureDeferred
async def test_second_frame_in_a_turn_is_held_and_makes_the_next_turn_busy():
    """
    A second frame for one connection in a turn waits for the turn's end; the next turn holds
    every frame (one send per connection); a turn with one frame per connection ends that.
    """
    pair = await tcpPair()
    clock = task.Clock()
    t = pair.server.transport
    w = countingWriter(t, clock)
    turns = w.turns
    try:
        w.write(b"a")
        w.write(b"b")
        w.write(b"c")
        assert t.socket.sends == [b"a"]
        clock.advance(0)
        assert t.socket.sends == [b"a", b"bc"] and turns.busy
        w.write(b"d")
        assert t.socket.sends == [b"a", b"bc"]
        clock.advance(0)
        assert t.socket.sends == [b"a", b"bc", b"d"] and not turns.busy
        w.write(b"e")
        assert t.socket.sends[-1] == b"e"
        assert await pair.client.waitFor(5) == b"abcde"
    finally:
        t.socket = t.socket.real
        await pair.close()


@pytest_twisted.ensureDeferred
async def test_writer_leaves_a_queued_transport_to_twisted():
    """Told that the transport was written to, the writer queues behind what it holds."""
    pair = await tcpPair()
    clock = task.Clock()
    t = pair.server.transport
    w = countingWriter(t, clock)
    try:
        w.write(b"direct ")
        t.write(b"queued ")
        w.wrote()
        w.write(b"frame")
        assert t.socket.sends == [b"direct "] and w.held is None
        assert t._tempDataBuffer == [b"queued ", b"frame"]
        assert await pair.client.waitFor(19) == b"direct queued frame"
        # Once Twisted has sent its queue (with the same socket), the writer sends directly.
        clock.advance(0)
        w.write(b"!")
        assert t.socket.sends == [b"direct ", b"queued frame", b"!"] and not w.dirty
        assert await pair.client.waitFor(20) == b"direct queued frame!"
    finally:
        t.socket = t.socket.real
        await pair.close()


@pytest.mark.parametrize(("first", "sent", "kept"), REFUSALS)
@pytest_twisted.ensureDeferred
async def test_writer_refused_bytes_wait_for_the_reactor(first, sent, kept):
    """
    A partial send, EAGAIN or another socket error: what the kernel did not take goes to
    transport.write (whose own path meets any error), and so do later frames.
    """
    pair = await tcpPair()
    clock = task.Clock()
    t = pair.server.transport
    t.socket = StubSocket(t.socket, first)
    w = fastwrite.DirectWriter(t, fastwrite.Turns(clock))
    try:
        w.write(b"abcdefgh")
        assert t._tempDataBuffer == [kept] and w.dirty
        clock.advance(0)
        w.write(b"ij")
        assert t._tempDataBuffer == [kept, b"ij"]
        assert await pair.client.waitFor(10) == b"abcdefghij"
    finally:
        t.socket = t.socket.real
        await pair.close()


@pytest_twisted.ensureDeferred
async def test_held_frames_of_a_lost_connection_are_dropped_quietly():
    """Frames held for a connection that is gone by the turn's end go nowhere, without error."""
    pair = await tcpPair()
    clock = task.Clock()
    t = pair.server.transport
    w = fastwrite.DirectWriter(t, fastwrite.Turns(clock))
    w.write(b"one")
    w.write(b"two")
    assert await pair.client.waitFor(3) == b"one"
    await pair.close()
    clock.advance(0)
    assert w.held is None and pair.client.received == b"one"


class FakeFrame:
    payloadHybi = b"\x81\x02hi"


class AutobahnLike:
    """Stands for Autobahn's protocol: sendData writes to the transport."""

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        self.transport.write(data)

    def sendPreparedMessage(self, frame: object) -> None:
        self.prepared.append(frame)


class Delivering(fastwrite.FastDelivery, AutobahnLike):
    def __init__(self, transport: object, compress: object = None, queued: object = ()) -> None:
        self._perMessageCompress = compress
        self.send_queue = list(queued)
        self.transport = transport
        self.prepared: list[object] = []


@pytest.mark.parametrize(
    ("compress", "queued", "direct"),
    [(None, [], True), (object(), [], False), (None, [b"chopped"], False)],
)
@pytest_twisted.ensureDeferred
async def test_frame_bytes_used_only_uncompressed(compress, queued, direct):
    """The prepared frame's bytes go to the writer only without compression or queue."""
    pair = await tcpPair()
    try:
        p = Delivering(pair.server.transport, compress, queued)
        p.sendPreparedFast(FakeFrame)
        if direct:
            assert p.prepared == [] and isinstance(p._writer, fastwrite.DirectWriter)
            assert await pair.client.waitFor(4) == FakeFrame.payloadHybi
        else:
            assert p.prepared == [FakeFrame] and p._writer is False
    finally:
        await pair.close()


def test_other_transports_take_autobahns_path():
    """A transport that is not plain TCP never gets a writer."""
    p = Delivering(Writes())
    p.sendPreparedFast(FakeFrame)
    assert p.prepared == [FakeFrame] and p._writer is False


@pytest_twisted.ensureDeferred
async def test_any_other_write_flushes_held_frames_first():
    """sendData (every other Autobahn write: close, pong) first sends the frames held."""
    pair = await tcpPair()
    try:
        p = Delivering(pair.server.transport)
        p.sendPreparedFast(FakeFrame)
        p.sendPreparedFast(FakeFrame)
        assert p._writer.held == [FakeFrame.payloadHybi]
        p.sendData(b"close")
        assert p._writer.held is None and p._writer.dirty
        assert await pair.client.waitFor(13) == FakeFrame.payloadHybi * 2 + b"close"
    finally:
        await pair.close()


@pytest.mark.parametrize("how", [{"sync": True}, {"chopsize": 2}])
@pytest_twisted.ensureDeferred
async def test_autobahns_own_queue_ends_the_fast_path(how):
    """After a chopped or sync send (Autobahn queues those), frames take Autobahn's path."""
    pair = await tcpPair()
    try:
        p = Delivering(pair.server.transport)
        p.sendPreparedFast(FakeFrame)
        p.sendData(b"queued", **how)
        p.sendPreparedFast(FakeFrame)
        assert p._writer is False and p.prepared == [FakeFrame]
    finally:
        await pair.close()


@pytest_twisted.ensureDeferred
async def test_echo_precedes_close_reply(daemon):
    """A message and a close in one packet: the client gets its echo before the close reply."""
    service, url = daemon("--format", "raw", "--welcome", "")
    port = service.ports[0].getHost().port
    factory = RecorderFactory()
    reactor.connectTCP("127.0.0.1", port, factory)
    client = await factory.built
    try:
        client.transport.write(frames.handshakeRequest("127.0.0.1", port, "/"))
        head = await client.waitFor(1)
        while b"\r\n\r\n" not in head:
            head = await client.waitFor(len(head) + 1)
        start = head.index(b"\r\n\r\n") + 4
        client.transport.write(
            frames.clientFrame(b"bye") + frames.clientFrame(b"\x03\xe8", frames.OP_CLOSE)
        )
        expected = frames.serverFrame(b"bye") + frames.serverFrame(b"\x03\xe8", frames.OP_CLOSE)
        got = await client.waitFor(start + len(expected))
        assert got[start:] == expected
    finally:
        client.transport.abortConnection()
        await client.lost


@pytest_twisted.ensureDeferred
async def test_daemon_connections_take_the_fast_path(daemon):
    """A client of the daemon (handshake through the web site) is a plain TCP transport."""
    service, url = daemon("--format", "raw", "--welcome", "")
    client = await connect(url)
    try:
        (member,) = list(service.room)
        assert fastwrite.canSendDirectly(member.transport)
        client.sendText("fast")
        assert await client.nextText() == "fast"
        assert isinstance(member._writer, fastwrite.DirectWriter)
    finally:
        client.sendClose(1000)
        await client.closed
