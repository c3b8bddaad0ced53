"""One port, two protocols: connections go to the room or the web site by their first head."""

from __future__ import annotations

import pytest_twisted
from rawws import rawExchange
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from wschat.dispatch import (
    LINGER,
    LINGER_BYTES,
    DispatchFactory,
    headerFields,
    isWebSocketUpgrade,
)
from wschat.limits import MAX_REQUEST_HEAD

UPGRADE = (
    b"GET /room HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
PLAIN = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"


class Recorder(Protocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.received = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True


class RecordingFactory(Factory):
    def __init__(self, name: str) -> None:
        self.name = name
        self.built: list[Recorder] = []
        self.openHandshakeTimeout = 10

    def buildProtocol(self, addr: object) -> Recorder:
        p = Recorder(self.name)
        self.built.append(p)
        return p


class AbortableTransport(StringTransport):
    aborted = False
    halfClosed = False

    def loseWriteConnection(self) -> None:
        self.halfClosed = True

    def abortConnection(self) -> None:
        self.aborted = True


def connection() -> tuple[object, RecordingFactory, RecordingFactory, AbortableTransport, Clock]:
    clock = Clock()
    websocket, site = RecordingFactory("websocket"), RecordingFactory("site")
    dispatcher = DispatchFactory(websocket, site, clock).buildProtocol(
        IPv4Address("TCP", "127.0.0.1", 1)
    )
    transport = AbortableTransport()
    dispatcher.makeConnection(transport)
    return dispatcher, websocket, site, transport, clock


class IsWebSocketUpgradeTests(SynchronousTestCase):
    def test_upgrade(self) -> None:
        """An Upgrade header naming websocket, in any case and among others, is an upgrade."""
        self.assertTrue(isWebSocketUpgrade(UPGRADE[:-4]))
        self.assertTrue(isWebSocketUpgrade(b"GET / HTTP/1.1\r\nUPGRADE: h2c, WebSocket"))

    def test_not_upgrade(self) -> None:
        """No Upgrade header, another protocol, or 'websocket' elsewhere is not an upgrade."""
        self.assertFalse(isWebSocketUpgrade(PLAIN[:-4]))
        self.assertFalse(isWebSocketUpgrade(b"GET / HTTP/1.1\r\nUpgrade: h2c"))
        self.assertFalse(isWebSocketUpgrade(b"GET /websocket HTTP/1.1\r\nX-Upgrade: websocket"))
        self.assertFalse(isWebSocketUpgrade(b"GET / HTTP/1.1\r\nUpgrade: websockets"))


class DispatcherTests(SynchronousTestCase):
    def test_websocket_gets_every_byte(self) -> None:
        """A head split over reads, and a frame right behind it, all reach the WebSocket side."""
        dispatcher, websocket, site, _, _ = connection()
        dispatcher.dataReceived(UPGRADE[:20])
        self.assertEqual(websocket.built, [])
        dispatcher.dataReceived(UPGRADE[20:] + b"\x81\x80frame")
        dispatcher.dataReceived(b"more")
        (inner,) = websocket.built
        self.assertEqual(inner.received, UPGRADE + b"\x81\x80framemore")
        self.assertEqual(site.built, [])

    def test_head_found_wherever_the_reads_split_it(self) -> None:
        """Read in two pieces split anywhere, or a byte at a time, the head is found at its end."""
        pieces = [[UPGRADE[:k], UPGRADE[k:]] for k in range(1, len(UPGRADE))]
        for reads in [*pieces, [UPGRADE[i : i + 1] for i in range(len(UPGRADE))]]:
            dispatcher, websocket, _, _, _ = connection()
            for data in reads[:-1]:
                dispatcher.dataReceived(data)
            self.assertEqual(websocket.built, [])
            dispatcher.dataReceived(reads[-1])
            (inner,) = websocket.built
            self.assertEqual(inner.received, UPGRADE)

    def test_plain_http_goes_to_the_site(self) -> None:
        """A request without Upgrade goes to the web site, with its bytes."""
        dispatcher, websocket, site, _, _ = connection()
        dispatcher.dataReceived(PLAIN)
        self.assertEqual([p.received for p in site.built], [PLAIN])
        self.assertEqual(websocket.built, [])

    def test_connection_lost_reaches_the_inner_protocol(self) -> None:
        """When the connection ends, the protocol it was handed to hears of it."""
        dispatcher, websocket, _, _, _ = connection()
        dispatcher.dataReceived(UPGRADE)
        dispatcher.connectionLost(None)
        self.assertTrue(websocket.built[0].lost)

    def test_slow_head_is_dropped(self) -> None:
        """A head not complete within the handshake timeout (slowloris) is dropped."""
        dispatcher, websocket, site, transport, clock = connection()
        dispatcher.dataReceived(UPGRADE[:30])
        clock.advance(9.9)
        self.assertFalse(transport.aborted)
        clock.advance(0.1)
        self.assertTrue(transport.aborted)

    def test_oversized_complete_head_is_refused(self) -> None:
        """A head that arrives whole but is longer than MAX_REQUEST_HEAD is refused too."""
        dispatcher, websocket, site, transport, _ = connection()
        dispatcher.dataReceived(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_REQUEST_HEAD + b"\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "))
        self.assertEqual((websocket.built, site.built), ([], []))
        self.assertEqual((websocket.built, site.built), ([], []))

    def test_timely_head_is_not_dropped(self) -> None:
        """Once the head is in, the dispatcher's timer is gone."""
        dispatcher, _, _, transport, clock = connection()
        dispatcher.dataReceived(UPGRADE)
        clock.advance(60)
        self.assertFalse(transport.aborted)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_one_timer_for_every_waiting_head(self) -> None:
        """
        Heads waiting at once share one timer; each connection is dropped at its own
        deadline, and one whose head arrives in time is not.
        """
        clock = Clock()
        factory = DispatchFactory(RecordingFactory("websocket"), RecordingFactory("site"), clock)
        connections = []
        for _ in range(3):
            dispatcher = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
            transport = AbortableTransport()
            dispatcher.makeConnection(transport)
            connections.append((dispatcher, transport))
            clock.advance(3)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        (first, t1), (second, t2), (third, t3) = connections
        clock.advance(1)  # t = 10: the first head's deadline
        self.assertEqual((t1.aborted, t2.aborted, t3.aborted), (True, False, False))
        third.dataReceived(UPGRADE)
        clock.advance(3)  # t = 13: the second's
        self.assertEqual((t2.aborted, t3.aborted), (True, False))
        clock.advance(60)
        self.assertFalse(t3.aborted)
        self.assertEqual((len(factory.deadlines), clock.getDelayedCalls()), (0, []))

    def test_lost_connection_leaves_the_queue(self) -> None:
        """A connection closed before its head arrives is forgotten at once."""
        dispatcher, _, _, transport, clock = connection()
        dispatcher.connectionLost(None)
        self.assertEqual(len(dispatcher.factory.deadlines), 0)
        clock.advance(60)
        self.assertFalse(transport.aborted)

    def test_oversized_head_is_refused(self) -> None:
        """A head that does not end within MAX_REQUEST_HEAD bytes gets 431 and is closed."""
        dispatcher, websocket, site, transport, clock = connection()
        dispatcher.dataReceived(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_REQUEST_HEAD)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "))
        self.assertTrue(transport.halfClosed)
        dispatcher.dataReceived(b"a" * 1000)
        self.assertEqual((websocket.built, site.built), ([], []))
        clock.advance(LINGER)
        self.assertTrue(transport.aborted)


class LaterHeadTests(SynchronousTestCase):
    """Heads after the first on a connection the web site serves, on the clock."""

    def test_each_head_goes_to_the_one_channel(self) -> None:
        """Pipelined heads, and empty lines between them, reach the same site channel."""
        dispatcher, _, site, _, _ = connection()
        dispatcher.dataReceived(PLAIN + b"\r\n" + PLAIN[:10])
        dispatcher.dataReceived(PLAIN[10:] + PLAIN)
        (channel,) = site.built
        self.assertEqual(channel.received, PLAIN * 3)

    def test_later_head_has_its_deadline(self) -> None:
        """A later head's deadline starts at its first byte; idle time before it is free."""
        dispatcher, _, _, transport, clock = connection()
        dispatcher.dataReceived(PLAIN)
        clock.advance(30)
        self.assertEqual(clock.getDelayedCalls(), [])
        dispatcher.dataReceived(b"G")
        clock.advance(5)
        dispatcher.dataReceived(b"ET / HT")
        clock.advance(4.9)
        self.assertFalse(transport.aborted)
        clock.advance(0.1)
        self.assertTrue(transport.aborted)

    def test_later_head_in_time_is_served(self) -> None:
        """A later head that completes in time leaves no timer behind."""
        dispatcher, _, site, transport, clock = connection()
        dispatcher.dataReceived(PLAIN + PLAIN[:5])
        clock.advance(9)
        dispatcher.dataReceived(PLAIN[5:])
        clock.advance(60)
        self.assertFalse(transport.aborted)
        self.assertEqual(site.built[0].received, PLAIN * 2)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_later_head_with_body_refused(self) -> None:
        """A later head announcing a body gets 413; the site sees neither head nor body."""
        dispatcher, _, site, transport, _ = connection()
        dispatcher.dataReceived(PLAIN)
        post = b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\n"
        dispatcher.dataReceived(post + b"0123456789")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertEqual(site.built[0].received, PLAIN)

    def test_refused_client_is_read_only_so_far(self) -> None:
        """A refused client still sending is dropped after LINGER_BYTES, before LINGER."""
        dispatcher, _, _, transport, _ = connection()
        dispatcher.dataReceived(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        dispatcher.dataReceived(b"x" * LINGER_BYTES)
        self.assertFalse(transport.aborted)
        dispatcher.dataReceived(b"x")
        self.assertTrue(transport.aborted)


class ConnectionCountTests(SynchronousTestCase):
    """--max-connections counts every connection on the port."""

    def test_over_the_limit_503_and_freed_slots(self) -> None:
        """Past the limit a connection gets 503 at once; a closed one frees its slot."""
        clock = Clock()
        websocket = RecordingFactory("websocket")
        websocket.maxConnections = 2  # type: ignore[attr-defined]
        factory = DispatchFactory(websocket, RecordingFactory("site"), clock)

        def accept() -> tuple[object, AbortableTransport]:
            dispatcher = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
            transport = AbortableTransport()
            dispatcher.makeConnection(transport)
            return dispatcher, transport

        (first, t1), (_, t2) = accept(), accept()
        self.assertEqual((t1.value(), t2.value(), factory.connections), (b"", b"", 2))
        third, t3 = accept()
        self.assertTrue(t3.value().startswith(b"HTTP/1.1 503 "))
        self.assertTrue(t3.halfClosed)
        third.connectionLost(None)
        self.assertEqual(factory.connections, 2)
        first.connectionLost(None)
        _, t4 = accept()
        self.assertEqual((t4.value(), factory.connections), (b"", 2))


class HeaderFieldsTests(SynchronousTestCase):
    def test_fields(self) -> None:
        """Names are lower-cased, values stripped and kept in order; folded lines continue."""
        head = b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nx-a:  2 \r\nX-B: b\r\n\tc"
        self.assertEqual(
            headerFields(head), {b"host": [b"a"], b"x-a": [b"1", b"2"], b"x-b": [b"b c"]}
        )

    def test_not_fields(self) -> None:
        """A line without a colon, or with space in or around the name, is not a field."""
        for line in [b"Host", b"Host : a", b" Host: a", b"Ho st: a", b": a"]:
            with self.subTest(line=line):
                self.assertIsNone(headerFields(b"GET / HTTP/1.1\r\n" + line))


@pytest_twisted.ensureDeferred
async def test_oversized_head_gets_an_http_error(daemon):
    """Over loopback, a request head too big to be one gets an HTTP error, never a hang."""
    _, url = daemon()
    response = await rawExchange(
        url, b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_REQUEST_HEAD * 2) + b"\r\n\r\n"
    )
    assert response.startswith(b"HTTP/1.1 431 "), response[:80]
