"""
Limits and hostile input, driven in memory with a clock: backlog, size, invalid input,
dead peers, floods and connection limits.
"""

from __future__ import annotations

import struct
import tracemalloc
from typing import Any

from autobahn.websocket.protocol import WebSocketProtocol
from rawws import RawPeer, deflate, deflateBomb, frame, handshake
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from txaio.testutil import replace_loop

from wschat.bench.frames import OP_BINARY, OP_PING, OP_PONG, OP_TEXT
from wschat.bench.frames import OP_CONTINUATION as OP_CONT
from wschat.limits import Limits
from wschat.protocol import ChatServerFactory
from wschat.server import ChatServer
from wschat.wire import Format

DEFLATE_OFFER = "Sec-WebSocket-Extensions: permessage-deflate"


class ClockedTestCase(SynchronousTestCase):
    """
    A factory whose timers all run on ``self.clock``.

    Autobahn schedules its timers (handshake, close, ping) through txaio's loop, not the
    factory's ``reactor``; the factory's ``reactor`` drives wschat's own (the rate limit).
    """

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        loop = replace_loop(self.clock)
        loop.__enter__()
        self.addCleanup(loop.__exit__, None, None, None)

    def factory(self, fmt: Format = Format.RAW, **limits: Any) -> ChatServerFactory:
        compression = limits.pop("compression", False)
        return ChatServer(
            fmt=fmt,
            welcome="",
            logMessages=False,
            limits=Limits(**limits),
            compression=compression,
            reactor=self.clock,
        ).factory


class SlowReaderTests(ClockedTestCase):
    """--max-queue: the transport's flow control bounds what waits for each client."""

    def test_registered_as_streaming_producer(self) -> None:
        """Each connection is its transport's streaming (push) producer from the start."""
        peer = RawPeer(self.factory())
        self.assertIs(peer.transport.producer, peer.protocol)
        self.assertTrue(peer.transport.streaming)

    def test_backlog_past_limit_closes_1008(self) -> None:
        """While paused, deliveries are counted; the one that would pass the bound closes."""
        factory = self.factory(maxQueue=4096)
        slow, sender = RawPeer(factory, port=1).open(), RawPeer(factory, port=2).open()
        slow.protocol.pauseProducing()
        payload = b"x" * 1000  # 1004 bytes framed: four fit in 4096, the fifth does not
        for _ in range(10):
            sender.sendText(payload)
        self.assertEqual(len(slow.texts()), 4)
        self.assertEqual(
            slow.closeFrame(), (1008, "too slow: more than 4096 bytes waiting to be sent")
        )
        self.assertEqual(len(sender.texts()), 10)
        self.assertEqual(slow.protocol.state, WebSocketProtocol.STATE_CLOSING)

    def test_slow_reader_dropped_after_close_timeout(self) -> None:
        """A slow reader that never answers the 1008 close is aborted at the TCP level."""
        factory = self.factory(maxQueue=100)
        slow, sender = RawPeer(factory, port=1).open(), RawPeer(factory, port=2).open()
        slow.protocol.pauseProducing()
        sender.sendText(b"y" * 200)
        self.assertEqual(slow.closeFrame()[0], 1008)  # type: ignore[index]
        self.assertFalse(slow.dropped)
        self.clock.advance(factory.closeHandshakeTimeout + 0.5)
        self.assertTrue(slow.aborted)
        slow.lose()
        self.assertEqual(list(factory.chatServer.room), [sender.protocol])

    def test_transport_released_when_lost(self) -> None:
        """A lost connection lets go of its transport (and the unsent bytes it holds)."""
        peer = RawPeer(self.factory()).open()
        peer.lose()
        self.assertIsNone(peer.protocol.transport)
        self.clock.advance(60)

    def test_resume_resets_the_count(self) -> None:
        """Once the transport drains (resumeProducing), the count starts again from zero."""
        factory = self.factory(maxQueue=4096)
        slow, sender = RawPeer(factory, port=1).open(), RawPeer(factory, port=2).open()
        for _ in range(5):
            slow.protocol.pauseProducing()
            for _ in range(4):
                sender.sendText(b"x" * 1000)
            slow.protocol.resumeProducing()
        self.assertIsNone(slow.closeFrame())
        self.assertEqual(len(slow.texts()), 20)

    def test_repeated_pause_keeps_the_count(self) -> None:
        """The transport calls pauseProducing on every write while full; the count survives."""
        factory = self.factory(maxQueue=4096)
        slow, sender = RawPeer(factory, port=1).open(), RawPeer(factory, port=2).open()
        slow.protocol.pauseProducing()
        for _ in range(5):
            sender.sendText(b"x" * 1000)
            slow.protocol.pauseProducing()
        self.assertEqual(slow.closeFrame()[0], 1008)  # type: ignore[index]

    def test_unpaused_writes_are_not_counted(self) -> None:
        """A client that keeps up is never closed, however much it is sent."""
        factory = self.factory(maxQueue=1000)
        reader, sender = RawPeer(factory, port=1).open(), RawPeer(factory, port=2).open()
        for _ in range(100):
            sender.sendText(b"x" * 900)
        self.assertIsNone(reader.closeFrame())
        self.assertEqual(len(reader.texts()), 100)

    def test_pongs_count_while_paused(self) -> None:
        """A client that pings but never reads is closed once its pongs pass the bound."""
        factory = self.factory(maxQueue=1000)
        peer = RawPeer(factory).open()
        peer.protocol.pauseProducing()
        for _ in range(20):
            peer.send(frame(OP_PING, b"p" * 125))
        pongs = [p for op, p in peer.frames() if op == OP_PONG]
        self.assertEqual(len(pongs), 7)  # 7 * 127 = 889 <= 1000 < 8 * 127
        self.assertEqual(peer.closeFrame()[0], 1008)  # type: ignore[index]

    def test_refusal_notices_count_while_paused(self) -> None:
        """A client that sends but never reads is closed once the notices it is owed pass it."""
        factory = self.factory(maxQueue=1000)
        factory.chatServer.bus = RefusingBus()
        peer = RawPeer(factory).open()
        peer.protocol.pauseProducing()
        for _ in range(100):
            peer.sendText(b"hi")
        notice = b"wschat: " + RefusingBus.reason
        self.assertEqual(peer.texts(), [notice] * 71)  # 71 * 14 = 994 <= 1000 < 72 * 14
        self.assertEqual(peer.closeFrame()[0], 1008)  # type: ignore[index]


class RefusingBus:
    """A bus whose link is down: every message is refused, its sender told."""

    reason = b"down"
    published = refused = 0

    def publish(self, message: Any, origin: Any) -> None:
        self.refused += 1
        origin.refused(self.reason.decode())


class SizeTests(ClockedTestCase):
    """--max-message-size bounds frames and reassembled messages: 1009."""

    def test_at_limit_relayed(self) -> None:
        """A message of exactly the limit is relayed."""
        factory = self.factory(maxMessageSize=1000)
        a, b = RawPeer(factory, port=1).open(), RawPeer(factory, port=2).open()
        a.sendText(b"x" * 1000)
        self.assertEqual(b.texts(), [b"x" * 1000])

    def test_frame_over_limit_1009(self) -> None:
        """One frame over the limit closes with 1009 and is not relayed."""
        factory = self.factory(maxMessageSize=1000)
        a, b = RawPeer(factory, port=1).open(), RawPeer(factory, port=2).open()
        a.sendText(b"x" * 1001)
        self.assertEqual(a.closeFrame()[0], 1009)  # type: ignore[index]
        self.assertEqual(b.texts(), [])

    def test_frame_refused_from_its_header(self) -> None:
        """A frame announcing a huge length is refused before its payload arrives."""
        factory = self.factory(maxMessageSize=1000)
        a = RawPeer(factory).open()
        a.send(b"\x81\xff" + struct.pack("!Q", 1 << 40) + b"mask")
        self.assertEqual(a.closeFrame()[0], 1009)  # type: ignore[index]

    def test_fragments_over_limit_1009(self) -> None:
        """Fragments each under the limit but together over it close with 1009."""
        factory = self.factory(maxMessageSize=1000)
        a, b = RawPeer(factory, port=1).open(), RawPeer(factory, port=2).open()
        a.send(frame(OP_TEXT, b"x" * 600, fin=False))
        a.send(frame(OP_CONT, b"x" * 600))
        self.assertEqual(a.closeFrame()[0], 1009)  # type: ignore[index]
        self.assertEqual(b.texts(), [])

    def test_compressed_message_relayed(self) -> None:
        """With --compression, a client's deflated message is inflated and relayed."""
        factory = self.factory(compression=True)
        a = RawPeer(factory, port=1)
        a.send(handshake(DEFLATE_OFFER))
        self.assertIn(b"permessage-deflate", a.response())
        b = RawPeer(factory, port=2).open()
        a.send(frame(OP_TEXT, deflate(b"hello " * 100), rsv=4))
        self.assertEqual(b.texts(), [b"hello " * 100])

    def test_compression_off_by_default(self) -> None:
        """Without --compression the deflate offer is declined."""
        a = RawPeer(self.factory())
        a.send(handshake(DEFLATE_OFFER))
        self.assertTrue(a.response().startswith(b"HTTP/1.1 101 "))
        self.assertNotIn(b"permessage-deflate", a.response())

    def test_compression_bomb_refused_not_inflated(self) -> None:
        """A 32 MiB deflate bomb in a 32 KiB frame gets 1009; memory peaks far below 32 MiB."""
        factory = self.factory(compression=True)
        a = RawPeer(factory, port=1)
        a.send(handshake(DEFLATE_OFFER))
        b = RawPeer(factory, port=2).open()
        bomb = frame(OP_TEXT, deflateBomb(32 << 20), rsv=4)
        self.assertLess(len(bomb), 64 << 10)
        tracemalloc.start()
        try:
            a.send(bomb)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertEqual(a.closeFrame()[0], 1009)  # type: ignore[index]
        self.assertLess(peak, 1 << 20)
        self.assertEqual(b.texts(), [])


class InvalidInputTests(ClockedTestCase):
    """Invalid frames close with the RFC 6455 code; the others carry on."""

    def assertClosed(self, peer: RawPeer, code: int) -> None:
        close = peer.closeFrame()
        self.assertIsNotNone(close, "no close frame sent")
        self.assertEqual(close[0], code, close)  # type: ignore[index]

    def test_invalid_utf8_1007(self) -> None:
        """Invalid UTF-8 in a text message closes with 1007; nothing is relayed."""
        factory = self.factory()
        a, b = RawPeer(factory, port=1).open(), RawPeer(factory, port=2).open()
        a.sendText(b"ok \xff\xfe")
        self.assertClosed(a, 1007)
        b.sendText(b"still here")
        self.assertEqual(b.texts(), [b"still here"])

    def test_invalid_utf8_across_fragments_1007(self) -> None:
        """A UTF-8 sequence broken across fragments closes with 1007."""
        a = RawPeer(self.factory()).open()
        a.send(frame(OP_TEXT, b"\xe2\x82", fin=False))
        a.send(frame(OP_CONT, b"A"))
        self.assertClosed(a, 1007)

    def test_reserved_opcode_1002(self) -> None:
        """A frame with a reserved opcode is a protocol error: 1002."""
        a = RawPeer(self.factory()).open()
        a.send(frame(3, b"?"))
        self.assertClosed(a, 1002)

    def test_unmasked_frame_1002(self) -> None:
        """A client frame without a mask is a protocol error: 1002."""
        a = RawPeer(self.factory()).open()
        a.send(frame(OP_TEXT, b"hi", mask=None))
        self.assertClosed(a, 1002)

    def test_rsv_bits_1002(self) -> None:
        """RSV bits with no extension negotiated are a protocol error: 1002."""
        a = RawPeer(self.factory()).open()
        a.send(frame(OP_TEXT, b"hi", rsv=4))
        self.assertClosed(a, 1002)

    def test_continuation_without_start_1002(self) -> None:
        """A continuation frame with no message to continue is a protocol error: 1002."""
        a = RawPeer(self.factory()).open()
        a.send(frame(OP_CONT, b"hi"))
        self.assertClosed(a, 1002)

    def test_binary_in_prefixed_1003(self) -> None:
        """In prefixed format a binary message closes with 1003 and is not relayed."""
        factory = self.factory(fmt=Format.PREFIXED)
        a, b = RawPeer(factory, port=1).open(), RawPeer(factory, port=2).open()
        a.send(frame(OP_BINARY, b"\x00\x01"))
        self.assertEqual(a.closeFrame(), (1003, "binary messages are not accepted; send text"))
        self.assertEqual(b.texts(), [])

    def test_nothing_relayed_after_our_close(self) -> None:
        """Messages arriving after the server started closing are not relayed."""
        factory = self.factory(fmt=Format.PREFIXED)
        a, b = RawPeer(factory, port=1).open(), RawPeer(factory, port=2).open()
        a.send(frame(OP_BINARY, b"\x00") + frame(OP_TEXT, b"late"))
        self.assertEqual(a.closeFrame()[0], 1003)  # type: ignore[index]
        self.assertEqual(b.texts(), [])

    def test_plain_http_426(self) -> None:
        """A plain HTTP GET without Upgrade gets 426 Upgrade Required and is closed."""
        a = RawPeer(self.factory())
        a.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.assertTrue(a.response().startswith(b"HTTP/1.1 426 "), a.response())
        self.assertTrue(a.dropped)

    def test_no_open_redirect(self) -> None:
        """Autobahn's status page (and its ?redirect= open redirect) is off."""
        a = RawPeer(self.factory())
        a.send(b"GET /?redirect=https%3A%2F%2Fevil.example HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertNotIn(b"evil", a.output())
        self.assertTrue(a.response().startswith(b"HTTP/1.1 426 "))

    def test_garbage_request_400(self) -> None:
        """A request head that is not HTTP gets 400 and is closed."""
        a = RawPeer(self.factory())
        a.send(b"\x16\x03\x01 hello\r\n\r\n")
        self.assertTrue(a.response().startswith(b"HTTP/1.1 400 "), a.response())
        self.assertTrue(a.dropped)

    def test_handshake_then_frames_in_one_read(self) -> None:
        """A handshake and a first message arriving together both count: no 431, relayed."""
        factory = self.factory()
        b = RawPeer(factory, port=2).open()
        a = RawPeer(factory, port=1)
        a.send(handshake() + frame(OP_TEXT, b"x" * 60000))
        self.assertEqual(b.texts(), [b"x" * 60000])


class DeadPeerTests(ClockedTestCase):
    """--handshake-timeout, --ping-interval and --ping-timeout, on the clock."""

    def test_handshake_timeout_drops(self) -> None:
        """A client that never finishes the opening handshake is dropped after the timeout."""
        a = RawPeer(self.factory(handshakeTimeout=10))
        a.send(b"GET / HTTP/1.1\r\nHost: x\r\n")
        self.clock.advance(9.5)
        self.assertFalse(a.dropped)
        self.clock.advance(1)
        self.assertTrue(a.aborted)
        self.assertTrue(a.protocol.wasOpenHandshakeTimeout)

    def test_silent_connection_dropped(self) -> None:
        """A client that connects and sends nothing at all is dropped after the timeout."""
        a = RawPeer(self.factory(handshakeTimeout=3))
        self.clock.advance(3.5)
        self.assertTrue(a.aborted)

    def test_handshake_timeout_spares_open_connections(self) -> None:
        """A client that finished the handshake is not touched by the handshake timeout."""
        a = RawPeer(self.factory(handshakeTimeout=3, pingInterval=0)).open()
        self.clock.advance(60)
        self.assertFalse(a.dropped)

    def test_ping_unanswered_drops(self) -> None:
        """A ping goes out every interval; no pong within the timeout drops the client."""
        a = RawPeer(self.factory(pingInterval=20, pingTimeout=5)).open()
        self.clock.advance(19.5)
        self.assertEqual([op for op, _ in a.frames()], [])
        self.clock.advance(1)
        self.assertEqual([op for op, _ in a.frames()], [OP_PING])
        self.clock.advance(4)
        self.assertFalse(a.dropped)
        self.clock.advance(1.5)
        self.assertTrue(a.aborted)

    def test_pong_keeps_alive(self) -> None:
        """A client answering every ping stays connected."""
        a = RawPeer(self.factory(pingInterval=20, pingTimeout=5)).open()
        for _ in range(5):
            seen = len(a.frames())
            self.clock.advance(20.5)
            op, payload = a.frames()[seen]
            self.assertEqual(op, OP_PING)
            a.send(frame(OP_PONG, payload))
            self.clock.advance(5.5)
            self.assertFalse(a.dropped)

    def test_no_pings_when_interval_zero(self) -> None:
        """--ping-interval 0 sends no pings."""
        a = RawPeer(self.factory(pingInterval=0)).open()
        self.clock.advance(3600)
        self.assertEqual(a.frames(), [])
        self.assertFalse(a.dropped)


class FloodTests(ClockedTestCase):
    """--rate-limit/--rate-burst per connection; --max-connections, --max-connections-per-ip."""

    def test_burst_then_1008(self) -> None:
        """Past the burst, the next message closes with 1008 and is not relayed."""
        factory = self.factory(rateLimit=2, rateBurst=3)
        a, b = RawPeer(factory, port=1).open(), RawPeer(factory, port=2).open()
        for i in range(5):
            a.sendText(f"m{i}")
        self.assertEqual(b.texts(), [b"m0", b"m1", b"m2"])
        self.assertEqual(a.closeFrame()[0], 1008)  # type: ignore[index]
        self.assertIn("rate limit exceeded", a.closeFrame()[1])  # type: ignore[index]

    def test_within_rate_never_refused(self) -> None:
        """A client sending at the allowed rate is never refused."""
        factory = self.factory(rateLimit=10, rateBurst=1)
        a, b = RawPeer(factory, port=1).open(), RawPeer(factory, port=2).open()
        for i in range(50):
            a.sendText(f"m{i}")
            self.clock.advance(0.1)
        self.assertIsNone(a.closeFrame())
        self.assertEqual(len(b.texts()), 50)

    def test_rate_is_per_connection(self) -> None:
        """One client's flood does not spend another's allowance."""
        factory = self.factory(rateLimit=1, rateBurst=2)
        a, b = RawPeer(factory, port=1).open(), RawPeer(factory, port=2).open()
        for i in range(3):
            a.sendText(f"a{i}")
        b.sendText("b0")
        b.sendText("b1")
        self.assertIsNone(b.closeFrame())
        self.assertEqual(b.texts(), [b"a0", b"a1", b"b0", b"b1"])

    def test_rate_limit_off_by_default(self) -> None:
        """By default no client is closed for its rate: a flood is read more slowly, all relayed."""
        factory = self.factory()
        a, b = RawPeer(factory, port=1).open(), RawPeer(factory, port=2).open()
        for i in range(1000):
            a.sendText(f"m{i}")
        for _ in range(20):
            self.clock.advance(1)
        self.assertIsNone(a.closeFrame())
        self.assertEqual(b.texts(), [b"m%d" % i for i in range(1000)])

    def test_max_connections_503(self) -> None:
        """Past --max-connections the handshake gets 503; a freed slot is usable again."""
        factory = self.factory(maxConnections=2)
        a, _ = RawPeer(factory, port=1).open(), RawPeer(factory, port=2).open()
        c = RawPeer(factory, port=3)
        c.send(handshake())
        self.assertTrue(c.response().startswith(b"HTTP/1.1 503 "), c.response())
        c.lose()
        a.lose()
        RawPeer(factory, port=4).open()

    def test_max_connections_per_ip_429(self) -> None:
        """Past --max-connections-per-ip one address gets 429; others and freed slots get in."""
        factory = self.factory(maxConnectionsPerIp=2)
        a = RawPeer(factory, "10.0.0.1", 1).open()
        RawPeer(factory, "10.0.0.1", 2).open()
        c = RawPeer(factory, "10.0.0.1", 3)
        c.send(handshake())
        self.assertTrue(c.response().startswith(b"HTTP/1.1 429 "), c.response())
        c.lose()
        RawPeer(factory, "10.0.0.2", 1).open()
        a.lose()
        RawPeer(factory, "10.0.0.1", 4).open()
        self.assertEqual(factory.chatServer.connectionsPerHost["10.0.0.1"], 2)

    def test_per_ip_ipv6_slash_64(self) -> None:
        """IPv6 clients in one /64 share the per-address allowance."""
        factory = self.factory(maxConnectionsPerIp=1)
        RawPeer(factory, "2001:db8::1", 1).open()
        c = RawPeer(factory, "2001:db8::2", 2)
        c.send(handshake())
        self.assertTrue(c.response().startswith(b"HTTP/1.1 429 "), c.response())

    def test_per_ip_counts_released_on_every_close(self) -> None:
        """Connections that close in any way give back their slot: no leak."""
        factory = self.factory(maxConnectionsPerIp=3, rateLimit=1, rateBurst=1)
        for i in range(20):
            a = RawPeer(factory, "10.0.0.1", i).open()
            if i % 2:
                a.sendText("x")
                a.sendText("y")  # rate limited: closed by the server
            a.lose()
        self.assertEqual(len(factory.chatServer.connectionsPerHost), 0)
