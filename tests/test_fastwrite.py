"""
The one writer of a plain TCP connection (``FastTransport``), over real loopback TCP, TLS and
UNIX connections, and the way the dispatcher and the protocol use it.

These tests also pin the Twisted behaviour the writer relies on: a plain TCP transport's
queued bytes are visible in ``dataBuffer``/``_tempDataBuffer``, and a streaming producer is
paused only while bytes are queued; and the Autobahn behaviour ``deliver`` relies on: every
write the server protocol makes reaches the transport within the call.
"""

from __future__ import annotations

import errno
import hashlib
import os
import weakref
import zlib

import pytest
import pytest_twisted
from rawws import RawPeer, frame, parseFrames
from tlsfiles import makeTLSFiles
from twisted.internet import defer, endpoints, protocol, reactor, ssl, task, tcp, unix
from twisted.internet.interfaces import (
    IConsumer,
    IPushProducer,
    ISSLTransport,
    ISystemHandle,
    ITCPTransport,
    ITransport,
)
from twisted.internet.testing import MemoryReactorClock, StringTransport
from zope.interface import implementer

from wschat import fastwrite
from wschat.bench import frames
from wschat.bench.frames import OP_PING, OP_PONG, OP_TEXT
from wschat.dispatch import DispatchFactory
from wschat.limits import Limits
from wschat.server import ChatServer
from wschat.testing import connect
from wschat.wire import Format, Message


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
    """
    Keeps what each ``send`` carried; its first ``send`` misbehaves as told (takes that many
    bytes, or raises), later ones go to the real socket.
    """

    def __init__(self, real: object, first: object = None) -> None:
        self.real = real
        self.first = first
        self.sends: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sends.append(bytes(data))
        if len(self.sends) == 1 and self.first is not None:
            if isinstance(self.first, BaseException):
                raise self.first
            return self.real.send(bytes(data)[: self.first])
        return self.real.send(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)


def stubbedWriter(
    t: tcp.Server, clock: task.Clock, first: object = None
) -> fastwrite.FastTransport:
    """``t`` behind its writer, on turns of ``clock``, its socket a :class:`StubSocket`."""
    t.socket = StubSocket(t.socket, first)
    w = fastwrite.wrap(t, fastwrite.Turns(clock))
    assert isinstance(w, fastwrite.FastTransport)
    return w


def unstub(t: tcp.Server) -> None:
    if isinstance(getattr(t, "socket", None), StubSocket):
        t.socket = t.socket.real


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
    """
    Pins Twisted: a streaming producer is paused only when the buffer is over the limit; the
    writer then queues behind the buffer.
    """
    pair = await tcpPair()
    t = pair.server.transport
    try:
        w = stubbedWriter(t, task.Clock())
        producer = Producer()
        w.registerProducer(producer, True)
        assert t.producer is producer
        t.write(b"x" * (t.bufferSize + 1))
        assert producer.paused
        assert not fastwrite.canSendDirectly(t)
        w.write(b"tail")
        assert t._tempDataBuffer[-1] == b"tail" and t.socket.sends == []
        await pair.client.waitFor(t.bufferSize + 5)
        assert not producer.paused
        assert pair.client.received.endswith(b"xtail")
        w.unregisterProducer()
        assert t.producer is None
    finally:
        unstub(t)
        await pair.close()


# -- the writer


@pytest_twisted.ensureDeferred
async def test_idle_transport_sends_at_once():
    """With nothing queued, the kernel takes the frame now: Twisted's buffer stays empty."""
    pair = await tcpPair()
    t = pair.server.transport
    try:
        assert fastwrite.canSendDirectly(t)
        w = stubbedWriter(t, task.Clock())
        w.write(b"hello")
        assert t.socket.sends == [b"hello"]
        assert not t._tempDataBuffer and not t.dataBuffer
        assert await pair.client.waitFor(5) == b"hello"
    finally:
        unstub(t)
        await pair.close()


@pytest_twisted.ensureDeferred
async def test_queued_data_goes_behind_the_queue():
    """With bytes already queued in the transport, the frame is queued after them."""
    pair = await tcpPair()
    t = pair.server.transport
    try:
        t.write(b"first ")
        w = stubbedWriter(t, task.Clock())
        assert not fastwrite.canSendDirectly(t)
        w.write(b"second")
        assert t._tempDataBuffer == [b"first ", b"second"] and t.socket.sends == []
        assert await pair.client.waitFor(12) == b"first second"
    finally:
        unstub(t)
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
    transport.write (whose own path meets any error), in order, and so do later frames.
    """
    pair = await tcpPair()
    clock = task.Clock()
    t = pair.server.transport
    try:
        w = stubbedWriter(t, clock, first)
        w.write(b"abcdefgh")
        assert t._tempDataBuffer == [kept] and w.dirty
        assert len(t.socket.sends) == 1
        clock.advance(0)
        w.write(b"ij")
        assert t._tempDataBuffer == [kept, b"ij"] and len(t.socket.sends) == 1
        assert await pair.client.waitFor(10) == b"abcdefghij"
    finally:
        unstub(t)
        await pair.close()


@pytest.mark.parametrize(("first", "sent", "kept"), REFUSALS)
@pytest_twisted.ensureDeferred
async def test_refused_bytes_of_held_frames_go_to_the_transport(first, sent, kept):
    """The same when the kernel refuses the frames held to a turn's end."""
    pair = await tcpPair()
    clock = task.Clock()
    t = pair.server.transport
    try:
        w = stubbedWriter(t, clock)
        w.write(b"0")
        w.write(b"abcd")
        w.write(b"efgh")
        assert w.held == [b"abcd", b"efgh"]
        t.socket.first = first
        t.socket.sends = []
        clock.advance(0)
        assert t.socket.sends == [b"abcdefgh"]
        assert t._tempDataBuffer == [kept] and w.dirty
        w.write(b"ij")
        assert t._tempDataBuffer == [kept, b"ij"]
        assert await pair.client.waitFor(11) == b"0abcdefghij"
    finally:
        unstub(t)
        await pair.close()


@pytest_twisted.ensureDeferred
async def test_real_partial_send_of_a_large_frame():
    """A frame larger than the socket buffer: the kernel takes part, the peer gets all, in order."""
    pair = await tcpPair()
    clock = task.Clock()
    t = pair.server.transport
    try:
        w = stubbedWriter(t, clock)
        big = os.urandom(1 << 20) * 16
        w.write(big)
        queued = b"".join(t._tempDataBuffer)
        assert 0 < len(queued) < len(big) and big.endswith(queued)
        clock.advance(0)
        w.write(b"end")
        got = await pair.client.waitFor(len(big) + 3)
        assert hashlib.sha256(got).digest() == hashlib.sha256(big + b"end").digest()
    finally:
        unstub(t)
        await pair.close()


@pytest_twisted.ensureDeferred
async def test_disconnecting_transport_is_not_bypassed():
    """After loseConnection a frame goes through transport.write (which may drop it)."""
    pair = await tcpPair()
    clock = task.Clock()
    t = pair.server.transport
    try:
        w = stubbedWriter(t, clock)
        w.write(b"before")
        clock.advance(0)
        w.loseConnection()
        assert not fastwrite.canSendDirectly(t)
        w.write(b"late")
        assert t.socket.sends == [b"before"]
    finally:
        unstub(t)
        await pair.close()


def test_missing_attributes_fall_back():
    """A TCP transport without the private attributes (another Twisted) is never bypassed."""
    bare = object.__new__(tcp.Server)
    assert not fastwrite.canSendDirectly(bare)
    # Without a socket it is not even wrapped.
    assert fastwrite.wrap(bare, fastwrite.Turns(task.Clock())) is bare
    # With one, every write still goes to its write().
    written: list[bytes] = []
    bare.socket = StubSocket(None)
    bare.write = written.append
    w = fastwrite.wrap(bare, fastwrite.Turns(task.Clock()))
    assert isinstance(w, fastwrite.FastTransport)
    w.write(b"frame")
    assert written == [b"frame"] and bare.socket.sends == []


class Writes:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


def test_other_transports_are_not_wrapped():
    """Anything that is not exactly a TCP connection (wrappers, test doubles) stays as it is."""
    turns = fastwrite.Turns(task.Clock())
    for other in (Writes(), StringTransport()):
        assert fastwrite.wrap(other, turns) is other


@pytest_twisted.ensureDeferred
async def test_unix_socket_is_not_wrapped(tmp_path):
    """A UNIX-socket connection keeps its own transport, and its frame still arrives."""
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
        w = fastwrite.wrap(server.transport, fastwrite.Turns(task.Clock()))
        assert w is server.transport
        w.write(b"over unix")
        assert await client.waitFor(9) == b"over unix"
    finally:
        await pair.close()


@pytest_twisted.ensureDeferred
async def test_tls_is_not_wrapped(tmp_path):
    """A TLS connection keeps its own transport: the frame is encrypted, arrives as plaintext."""
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
        w = fastwrite.wrap(server.transport, fastwrite.Turns(task.Clock()))
        assert w is server.transport and ISSLTransport.providedBy(w)
        w.write(b"secret")
        assert await client.waitFor(6) == b"secret"
    finally:
        await pair.close()


@pytest_twisted.ensureDeferred
async def test_started_tls_uses_write(tmp_path):
    """
    Once TLS is started through the writer, frames go through transport.write (to be
    encrypted), and the writer says it is an ISSLTransport, as the transport does.
    """
    pair = await tcpPair()
    clock = task.Clock()
    t = pair.server.transport
    try:
        w = stubbedWriter(t, clock)
        assert fastwrite.canSendDirectly(t) and not ISSLTransport.providedBy(w)
        w.write(b"clear")
        w.write(b"held")
        w.startTLS(makeTLSFiles(tmp_path).serverCertificate().options())
        # What was written before TLS started leaves first, in the clear.
        assert t.socket.sends == [b"clear", b"held"]
        assert not fastwrite.canSendDirectly(t) and ISSLTransport.providedBy(w)
        clock.advance(0)
        w.write(b"secret")
        assert t.socket.sends == [b"clear", b"held"]
        assert await pair.client.waitFor(9) == b"clearheld"
    finally:
        unstub(t)
        await pair.close()


@pytest_twisted.ensureDeferred
async def test_writer_passes_everything_else_to_the_transport():
    """
    Addresses, producers, reading, socket options and state are the transport's own; the
    writer is an ITCPTransport (not an ISSLTransport), weakly referable.
    """
    pair = await tcpPair()
    t = pair.server.transport
    try:
        w = stubbedWriter(t, task.Clock())
        assert w.getPeer() == t.getPeer() and w.getHost() == t.getHost()
        # The peer, asked for several times while a connection opens, is made once.
        assert w.getPeer() is w.getPeer()
        assert w.getHandle() is t.socket
        for interface in (ITCPTransport, ITransport, IConsumer, IPushProducer, ISystemHandle):
            assert interface.providedBy(t) and interface.providedBy(w), interface
        assert not ISSLTransport.providedBy(w)
        assert w.connected and not w.disconnecting and not w.disconnected
        w.setTcpKeepAlive(True)
        assert t.getTcpKeepAlive() and w.getTcpKeepAlive()
        w.setTcpNoDelay(True)
        assert t.getTcpNoDelay() and w.getTcpNoDelay()
        w.setTcpNoDelay(False)
        assert not t.getTcpNoDelay()
        w.pauseProducing()
        assert t not in reactor.getReaders()
        w.resumeProducing()
        assert t in reactor.getReaders()
        producer = Producer()
        w.registerProducer(producer, True)
        assert t.producer is producer and w.producer is producer and t.streamingProducer
        w.unregisterProducer()
        assert t.producer is None
        w.writeSequence([b"a", b"b", b"c"])
        assert t.socket.sends == [b"abc"]
        assert weakref.ref(w)() is w
        assert await pair.client.waitFor(3) == b"abc"
    finally:
        unstub(t)
        await pair.close()


@pytest_twisted.ensureDeferred
async def test_quiet_turn_sends_at_once():
    """In a quiet turn a frame goes to the kernel at once; the turn's end is scheduled."""
    pair = await tcpPair()
    clock = task.Clock()
    t = pair.server.transport
    try:
        w = stubbedWriter(t, clock)
        w.write(b"now")
        assert t.socket.sends == [b"now"] and not t._tempDataBuffer
        assert len(clock.getDelayedCalls()) == 1
        assert await pair.client.waitFor(3) == b"now"
        clock.advance(0)
        assert w.turns.turn == 1 and not w.turns.busy
    finally:
        unstub(t)
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
    try:
        w = stubbedWriter(t, clock)
        turns = w.turns
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
        unstub(t)
        await pair.close()


@pytest_twisted.ensureDeferred
async def test_writer_leaves_a_queued_transport_to_twisted():
    """
    Once the writer has queued bytes in the transport, later frames queue behind them; once
    Twisted has sent its queue (with the same socket), the writer sends directly again.
    """
    pair = await tcpPair()
    clock = task.Clock()
    t = pair.server.transport
    try:
        w = stubbedWriter(t, clock, first=3)
        w.write(b"direct ")
        clock.advance(0)
        w.write(b"frame")
        assert t.socket.sends == [b"direct "] and w.held is None
        assert t._tempDataBuffer == [b"ect ", b"frame"]
        assert await pair.client.waitFor(12) == b"direct frame"
        clock.advance(0)
        w.write(b"!")
        assert t.socket.sends == [b"direct ", b"ect frame", b"!"] and not w.dirty
        assert await pair.client.waitFor(13) == b"direct frame!"
    finally:
        unstub(t)
        await pair.close()


@pytest_twisted.ensureDeferred
async def test_held_frames_of_a_lost_connection_are_dropped_quietly():
    """Frames held for a connection that is gone by the turn's end go nowhere, without error."""
    pair = await tcpPair()
    clock = task.Clock()
    w = fastwrite.wrap(pair.server.transport, fastwrite.Turns(clock))
    w.write(b"one")
    w.write(b"two")
    assert await pair.client.waitFor(3) == b"one"
    await pair.close()
    clock.advance(0)
    assert w.held is None and pair.client.received == b"one"


@pytest_twisted.ensureDeferred
async def test_every_write_keeps_its_place_and_closing_sends_held_frames_first():
    """
    A write after held frames (a pong, a close frame) is held behind them; loseConnection
    sends everything held before the connection closes.
    """
    pair = await tcpPair()
    clock = task.Clock()
    t = pair.server.transport
    try:
        w = stubbedWriter(t, clock)
        sock = t.socket
        w.write(b"A")
        w.write(b"B")
        w.write(b"close")
        assert sock.sends == [b"A"] and w.held == [b"B", b"close"]
        w.loseConnection()
        assert sock.sends == [b"A", b"Bclose"] and w.held is None
        await pair.client.lost
        assert pair.client.received == b"ABclose"
        # Nothing is sent twice at the turn's end (Twisted's own last send is empty).
        clock.advance(0)
        assert b"".join(sock.sends) == b"ABclose"
    finally:
        unstub(t)
        await pair.close()


@pytest_twisted.ensureDeferred
async def test_abort_drops_held_frames():
    """abortConnection drops the frames held, as the transport drops its queue."""
    pair = await tcpPair()
    clock = task.Clock()
    t = pair.server.transport
    w = stubbedWriter(t, clock)
    sock = t.socket
    w.write(b"A")
    w.write(b"B")
    w.abortConnection()
    await pair.client.lost
    clock.advance(0)
    assert sock.sends == [b"A"] and pair.client.received == b"A"
    await pair.close()


# -- the protocol over the writer


def test_autobahn_writes_reach_the_transport_at_once():
    """
    Pins Autobahn: every write the server protocol makes (handshake response, greeting,
    pong, ping, message, close) reaches the transport within the call, so a frame that
    deliver writes to the transport directly can never overtake one Autobahn still holds.
    """
    peer = RawPeer(ChatServer(welcome="hi", reactor=MemoryReactorClock()).factory)
    peer.open()
    assert peer.texts() == [b"hi"]
    steps = [
        lambda: peer.send(frame(OP_PING, b"p")),
        lambda: peer.protocol.sendPing(b"q"),
        lambda: peer.protocol.sendMessage(b"m"),
        lambda: peer.protocol.sendClose(1000),
    ]
    for step in steps:
        before = len(peer.output())
        step()
        assert len(peer.output()) > before
    assert [op for op, _ in peer.frames()] == [OP_TEXT, OP_PONG, OP_PING, OP_TEXT, 8]


def test_deliver_writes_the_prepared_frame_unless_compressed():
    """
    A client without compression gets the prepared frame's bytes as they are; one that
    negotiated permessage-deflate gets the message compressed by Autobahn.
    """
    server = ChatServer(welcome="", fmt=Format.RAW, compression=True, reactor=MemoryReactorClock())
    factory = server.factory
    plain = RawPeer(factory, port=1).open()
    deflating = RawPeer(factory, port=2).open("Sec-WebSocket-Extensions: permessage-deflate")
    assert b"permessage-deflate" in deflating.response()
    payload = b"hello " * 20
    server.room.broadcast(Message("127.0.0.1:3", payload, False))
    expected = factory.prepareMessage(payload, False).payloadHybi
    assert plain.output().endswith(expected)
    _, _, body = deflating.output().partition(b"\r\n\r\n")
    assert body[0] == 0xC1  # FIN, RSV1 (compressed), text
    [(_, compressed)] = parseFrames(body)
    inflate = zlib.decompressobj(-15)
    assert inflate.decompress(compressed + b"\x00\x00\xff\xff") == payload


@pytest_twisted.ensureDeferred
async def test_dispatcher_hands_websocket_connections_to_the_writer():
    """
    The dispatcher hands a WebSocket connection over plain TCP to the room behind its
    writer, whose turns end on the dispatcher's clock: the handshake response leaves through
    it, and the room's second frame in a turn waits for that clock.
    """
    clock = task.Clock()
    server = ChatServer(welcome="", fmt=Format.RAW, limits=Limits(pingInterval=0))
    websocket = server.factory
    site = protocol.Factory.forProtocol(protocol.Protocol)
    port = reactor.listenTCP(0, DispatchFactory(websocket, site, clock), interface="127.0.0.1")
    clientFactory = RecorderFactory()
    reactor.connectTCP("127.0.0.1", port.getHost().port, clientFactory)
    client = await clientFactory.built
    try:
        client.transport.write(frames.handshakeRequest("127.0.0.1", port.getHost().port, "/"))
        head = await client.waitFor(1)
        while b"\r\n\r\n" not in head:
            head = await client.waitFor(len(head) + 1)
        start = head.index(b"\r\n\r\n") + 4
        (member,) = list(server.room)
        w = member.transport
        assert isinstance(w, fastwrite.FastTransport) and type(w.transport) is tcp.Server
        assert w.turns.clock is clock and w.turns.scheduled
        clock.advance(0)
        first = websocket.prepareMessage(b"first", False)
        second = websocket.prepareMessage(b"second", False)
        member.deliver(first)
        member.deliver(second)
        assert w.held == [second.payloadHybi]
        got = await client.waitFor(start + len(first.payloadHybi))
        clock.advance(0)
        got = await client.waitFor(start + len(first.payloadHybi) + len(second.payloadHybi))
        assert got[start:] == first.payloadHybi + second.payloadHybi
    finally:
        client.transport.abortConnection()
        await client.lost
        await port.stopListening()


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
    """A client of the daemon (handshake through the web site) is written to by its writer."""
    service, url = daemon("--format", "raw", "--welcome", "")
    client = await connect(url)
    try:
        (member,) = list(service.room)
        assert isinstance(member.transport, fastwrite.FastTransport)
        assert member.transport.turns.clock is service.reactor
        assert fastwrite.canSendDirectly(member.transport.transport)
        client.sendText("fast")
        assert await client.nextText() == "fast"
    finally:
        client.sendClose(1000)
        await client.closed


@pytest_twisted.ensureDeferred
async def test_no_fast_write_leaves_the_transport_alone(daemon):
    """With --no-fast-write a client's transport is Twisted's own, and messages still flow."""
    service, url = daemon("--format", "raw", "--welcome", "", "--no-fast-write")
    client = await connect(url)
    try:
        (member,) = list(service.room)
        assert type(member.transport) is tcp.Server
        client.sendText("slow")
        assert await client.nextText() == "slow"
    finally:
        client.sendClose(1000)
        await client.closed
