"""Policy closes (1008, 1003): the Autobahn behaviour wschat.closing relies on, and its fallback."""

from __future__ import annotations

import struct

from autobahn.websocket.protocol import WebSocketProtocol
from rawws import RawPeer, frame
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from txaio.testutil import replace_loop

from wschat.bench.frames import OP_CLOSE
from wschat.closing import closeWith
from wschat.server import ChatServer
from wschat.wire import Format


class PolicyCloseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        loop = replace_loop(self.clock)
        loop.__enter__()
        self.addCleanup(loop.__exit__, None, None, None)
        self.factory = ChatServer(fmt=Format.RAW, welcome="", reactor=self.clock).factory

    def test_sends_rfc_code_and_reason(self) -> None:
        """A code sendClose refuses (1008) goes out in a close frame with its reason."""
        peer = RawPeer(self.factory).open()
        self.assertRaisesRegex(Exception, "invalid close code", peer.protocol.sendClose, 1008, "x")
        closeWith(peer.protocol, 1008, "policy")
        self.assertEqual(peer.closeFrame(), (1008, "policy"))
        self.assertEqual(peer.protocol.state, WebSocketProtocol.STATE_CLOSING)
        self.assertEqual(peer.protocol.localCloseCode, 1008)

    def test_drops_after_close_handshake_timeout(self) -> None:
        """A peer that never answers the close is aborted after closeHandshakeTimeout."""
        peer = RawPeer(self.factory).open()
        closeWith(peer.protocol, 1008, "policy")
        self.clock.advance(self.factory.closeHandshakeTimeout - 0.3)
        self.assertFalse(peer.dropped)
        self.clock.advance(0.6)
        self.assertTrue(peer.aborted)

    def test_answered_close_is_clean(self) -> None:
        """A peer answering the close ends it cleanly, without waiting for the timeout."""
        peer = RawPeer(self.factory).open()
        closeWith(peer.protocol, 1003, "no")
        peer.send(frame(OP_CLOSE, struct.pack("!H", 1003)))
        self.assertTrue(peer.dropped)
        self.assertTrue(peer.protocol.wasClean)
        self.clock.advance(10)
        self.assertFalse(peer.protocol.wasCloseHandshakeTimeout)

    def test_not_open_does_nothing(self) -> None:
        """Closing a connection still handshaking, or already closing, writes nothing."""
        peer = RawPeer(self.factory)
        closeWith(peer.protocol, 1008, "early")
        self.assertEqual(peer.output(), b"")
        peer.open()
        closeWith(peer.protocol, 1008, "first")
        closeWith(peer.protocol, 1003, "second")
        self.assertEqual(peer.closeFrame(), (1008, "first"))
        self.assertEqual(len([f for f in peer.frames() if f[0] == 8]), 1)
