"""Closing with protocol-level codes, and the Autobahn behaviour that relies on."""

from __future__ import annotations

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.trial.unittest import SynchronousTestCase

from wschat.closing import MESSAGE_TOO_BIG, closeWith
from wschat.testing import MemoryRoom


def connectedPair():
    room = MemoryRoom(welcome="")
    server, client = room.connect()
    return server, client, room


class CloseWithTests(SynchronousTestCase):
    def test_autobahn_refuses_protocol_codes_in_sendClose(self) -> None:
        """Autobahn's public sendClose refuses 1009: why closeWith exists at all."""
        server, client, pump = connectedPair()
        with self.assertRaisesRegex(Exception, "invalid close code 1009"):
            server.sendClose(MESSAGE_TOO_BIG, "too big")

    def test_close_code_and_reason_reach_the_peer(self) -> None:
        """closeWith sends the given code and reason, and the handshake completes."""
        server, client, pump = connectedPair()
        closeWith(server, MESSAGE_TOO_BIG, "message too big")
        self.assertEqual(server.state, WebSocketProtocol.STATE_CLOSING)
        pump.flush()
        self.assertEqual(client.closed.result, (MESSAGE_TOO_BIG, "message too big"))
        self.assertEqual(server.state, WebSocketProtocol.STATE_CLOSED)

    def test_long_reason_is_truncated(self) -> None:
        """A reason too long for a close frame is cut to 123 bytes, on a character boundary."""
        server, client, pump = connectedPair()
        closeWith(server, MESSAGE_TOO_BIG, "é" * 100)
        pump.flush()
        self.assertEqual(client.closed.result, (MESSAGE_TOO_BIG, "é" * 61))

    def test_closing_twice_is_harmless(self) -> None:
        """closeWith on a connection already closing does nothing."""
        server, client, pump = connectedPair()
        closeWith(server, MESSAGE_TOO_BIG, "first")
        closeWith(server, 1001, "second")
        pump.flush()
        self.assertEqual(client.closed.result, (MESSAGE_TOO_BIG, "first"))

    def test_fallback_without_sendCloseFrame(self) -> None:
        """Should Autobahn drop sendCloseFrame, the close still happens through sendClose(1000)."""

        class WithoutSendCloseFrame:
            state = WebSocketProtocol.STATE_OPEN
            calls: list[tuple[int, str]] = []

            def sendClose(self, code: int, reason: str) -> None:
                self.calls.append((code, reason))

        protocol = WithoutSendCloseFrame()
        closeWith(protocol, MESSAGE_TOO_BIG, "too big")  # type: ignore[arg-type]
        self.assertEqual(protocol.calls, [(1000, "too big")])
