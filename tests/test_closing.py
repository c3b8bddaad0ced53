"""Close codes Autobahn's sendClose refuses, and closing every connection within a bound."""

from __future__ import annotations

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from rawws import RawClient, handshake
from twisted.internet import defer, protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from wschat.closing import MAX_REASON_BYTES, closeAll, closeWith
from wschat.server import ChatServer
from wschat.testing import memoryConnection


class RecordingClient(WebSocketClientProtocol):
    closes: list[tuple[bool, int | None, str | None]]

    def onOpen(self) -> None:
        self.closes = []

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closes.append((wasClean, code, reason))


def openPair(**serverOptions):
    chat = ChatServer(welcome="", **serverOptions)
    clientFactory = WebSocketClientFactory("ws://127.0.0.1:2000")
    clientFactory.protocol = RecordingClient
    server, client, pump = memoryConnection(chat.factory, clientFactory)
    pump.flush()
    assert server.state == WebSocketProtocol.STATE_OPEN
    return chat, server, client, pump


class SendCloseCodeTests(SynchronousTestCase):
    def test_autobahnRefusesGoingAway(self) -> None:
        """Autobahn's public sendClose refuses 1001: the reason closeWith exists."""
        _, server, _, _ = openPair()
        try:
            server.sendClose(1001, "bye")
        except Exception as e:  # Autobahn raises a bare Exception
            self.assertIn("invalid close code 1001", str(e))
        else:
            self.fail("sendClose accepted 1001")
        self.assertEqual(server.state, WebSocketProtocol.STATE_OPEN)

    def test_goingAway(self) -> None:
        """closeWith starts a clean closing handshake that the peer sees as 1001."""
        _, server, client, pump = openPair()
        closeWith(server, 1001, "server shutting down")
        self.assertEqual(server.state, WebSocketProtocol.STATE_CLOSING)
        self.assertEqual(server.localCloseCode, 1001)
        pump.flush()
        self.assertEqual(client.closes, [(True, 1001, "server shutting down")])
        self.assertEqual(server.state, WebSocketProtocol.STATE_CLOSED)

    def test_closeHandshakeTimeoutArmed(self) -> None:
        """Like sendClose, it arms Autobahn's close-handshake timeout for a silent peer."""
        _, server, _, _ = openPair()
        closeWith(server, 1001, "bye")
        self.assertIsNotNone(server.closeHandshakeTimeoutCall)
        server.closeHandshakeTimeoutCall.cancel()

    def test_longReasonTruncated(self) -> None:
        """A reason longer than a control frame allows is cut at a character boundary."""
        _, server, client, pump = openPair()
        closeWith(server, 1001, "é" * 100)
        self.assertLessEqual(len(server.localCloseReason), MAX_REASON_BYTES)
        pump.flush()
        self.assertEqual(client.closes, [(True, 1001, "é" * (MAX_REASON_BYTES // 2))])

    def test_notOpen(self) -> None:
        """On a connection that is already closing, it does nothing."""
        _, server, client, pump = openPair()
        server.sendClose(1000)
        closeWith(server, 1001, "bye")
        self.assertEqual(server.localCloseCode, 1000)
        pump.flush()
        self.assertEqual(client.closes, [(True, 1000, None)])

    def test_fallback(self) -> None:
        """Without sendCloseFrame, the close is still clean, as 1000 with the reason."""

        class Minimal:
            state = WebSocketProtocol.STATE_OPEN

            def __init__(self) -> None:
                self.sent: list[tuple[int, str]] = []

            def sendClose(self, code: int, reason: str) -> None:
                self.sent.append((code, reason))

        connection = Minimal()
        closeWith(connection, 1001, "bye")  # type: ignore[arg-type]
        self.assertEqual(connection.sent, [(1000, "bye")])


class FakeConnection:
    def __init__(self) -> None:
        self.asked = 0
        self.aborted = False
        self.gone: defer.Deferred[None] = defer.Deferred()

    def goAway(self) -> defer.Deferred[None]:
        self.asked += 1
        return self.gone

    def abort(self) -> None:
        self.aborted = True
        self.gone.callback(None)


class CloseAllTests(SynchronousTestCase):
    def test_nobody(self) -> None:
        """With no connection, it is done at once."""
        self.successResultOf(closeAll([], 5, Clock()))

    def test_waitsForEveryone(self) -> None:
        """Everyone is told at once; it fires when the last is gone, and stops its timer."""
        clock = Clock()
        connections = [FakeConnection(), FakeConnection()]
        done = closeAll(connections, 5, clock)
        self.assertEqual([c.asked for c in connections], [1, 1])
        connections[0].gone.callback(None)
        self.assertNoResult(done)
        connections[1].gone.callback(None)
        self.successResultOf(done)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertFalse(any(c.aborted for c in connections))

    def test_abortsStragglers(self) -> None:
        """At the timeout, those still there are aborted, and then it fires."""
        clock = Clock()
        prompt, silent = FakeConnection(), FakeConnection()
        done = closeAll([prompt, silent], 5, clock)
        prompt.gone.callback(None)
        clock.advance(4.9)
        self.assertNoResult(done)
        clock.advance(0.1)
        self.assertFalse(prompt.aborted)
        self.assertTrue(silent.aborted)
        self.successResultOf(done)


class GoAwayTests(SynchronousTestCase):
    def test_goAwayFiresWhenGone(self) -> None:
        """A protocol's goAway sends 1001 and fires only once the connection is gone."""
        chat, server, client, pump = openPair()
        gone = server.goAway()
        self.assertNoResult(gone)
        pump.flush()
        self.successResultOf(gone)
        self.assertEqual(client.closes, [(True, 1001, "server shutting down")])
        self.assertEqual(len(chat.room), 0)

    def test_shutDownRefusesNewHandshakes(self) -> None:
        """While the server shuts down, a new handshake gets HTTP 503."""
        chat, server, client, pump = openPair(clock=Clock())
        done = chat.shutDown()
        pump.flush()
        self.successResultOf(done)
        late, raw, latePump = memoryConnection(
            chat.factory, protocol.Factory.forProtocol(RawClient)
        )
        lateTransport = late.transport
        raw.transport.write(handshake())
        latePump.flush()
        self.assertTrue(raw.received.startswith(b"HTTP/1.1 503 server shutting down\r\n"))
        self.assertTrue(lateTransport.disconnected)


class FallbackTests(SynchronousTestCase):
    def test_fallback_without_sendCloseFrame(self) -> None:
        """Should Autobahn drop sendCloseFrame, the close still happens through sendClose(1000)."""

        class WithoutSendCloseFrame:
            state = WebSocketProtocol.STATE_OPEN
            calls: list[tuple[int, str]] = []

            def sendClose(self, code: int, reason: str) -> None:
                self.calls.append((code, reason))

        protocol = WithoutSendCloseFrame()
        closeWith(protocol, 1009, "too big")  # type: ignore[arg-type]
        self.assertEqual(protocol.calls, [(1000, "too big")])
