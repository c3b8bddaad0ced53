"""The server protocol and the room, in memory: no sockets, time on a fake clock."""

from __future__ import annotations

from typing import Any

from autobahn.websocket.protocol import WebSocketProtocol
from rawws import RawPeer
from twisted.internet.address import IPv6Address
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from txaio.testutil import replace_loop

from wschat.limits import Limits
from wschat.room import Room
from wschat.server import ChatServer
from wschat.testing import MemoryRoom, received
from wschat.wire import Format, Message


class ProtocolTests(SynchronousTestCase):
    def test_welcome(self) -> None:
        """A new client is greeted with --welcome, and only it."""
        room = MemoryRoom(welcome="hi there")
        _, first = room.connect(1)
        self.assertEqual(received(first), [(b"hi there", False)])
        room.connect(2)
        self.assertEqual(received(first), [])

    def test_no_welcome(self) -> None:
        """An empty --welcome sends no greeting at all."""
        room = MemoryRoom(welcome="")
        server, client = room.connect()
        self.assertEqual(server.state, WebSocketProtocol.STATE_OPEN)
        self.assertEqual(received(client), [])

    def test_broadcast_includes_sender(self) -> None:
        """A message reaches every client, the sender included, prefixed with its address."""
        room = MemoryRoom(welcome="")
        _, alice = room.connect(1111)
        _, bob = room.connect(2222)
        alice.sendMessage("héllo".encode())
        room.flush()
        expected = [("127.0.0.1:1111: héllo".encode(), False)]
        self.assertEqual(received(alice), expected)
        self.assertEqual(received(bob), expected)

    def test_ipv6_prefix(self) -> None:
        """An IPv6 sender is shown as [address]:port."""
        room = MemoryRoom(welcome="")
        _, client = room.connect(peer=IPv6Address("TCP", "::1", 4242))
        client.sendMessage(b"hi")
        room.flush()
        self.assertEqual(received(client), [(b"[::1]:4242: hi", False)])

    def test_binary_refused_when_prefixed(self) -> None:
        """In prefixed format a binary message closes its sender with 1003, and nobody gets it."""
        room = MemoryRoom(welcome="")
        _, alice = room.connect(1)
        _, bob = room.connect(2)
        alice.sendMessage(b"\x00\x01", isBinary=True)
        room.flush()
        self.assertEqual(alice.closed.result[0], 1003)
        self.assertEqual(received(bob), [])
        self.assertEqual(len(room.server.room), 1)
        bob.sendMessage(b"still here")
        room.flush()
        self.assertEqual(received(bob), [(b"127.0.0.1:2: still here", False)])

    def test_raw_relays_unchanged(self) -> None:
        """In raw format text and binary are relayed unchanged, without a prefix."""
        room = MemoryRoom(welcome="", fmt=Format.RAW)
        _, alice = room.connect(1)
        _, bob = room.connect(2)
        alice.sendMessage(b"\x00\x01", isBinary=True)
        alice.sendMessage(b"text")
        room.flush()
        self.assertEqual(received(bob), [(b"\x00\x01", True), (b"text", False)])

    def test_closing_peer_skipped(self) -> None:
        """A peer that is closing gets no more frames, and the others still get theirs."""
        room = MemoryRoom(welcome="")
        closingServer, closing = room.connect(1)
        _, alice = room.connect(2)
        _, bob = room.connect(3)
        closingServer.sendClose(1000)  # the server side is now CLOSING, not yet closed
        self.assertEqual(closingServer.state, WebSocketProtocol.STATE_CLOSING)
        alice.sendMessage(b"after")
        room.flush()
        self.assertEqual(received(bob), [(b"127.0.0.1:2: after", False)])
        self.assertEqual(received(closing), [])
        self.assertEqual(closing.closed.result[0], 1000)

    def test_leaves_room_on_close(self) -> None:
        """A closed connection leaves the room."""
        room = MemoryRoom(welcome="")
        _, alice = room.connect(1)
        room.connect(2)
        self.assertEqual(len(room.server.room), 2)
        alice.sendClose(1000)
        room.flush()
        self.assertEqual(len(room.server.room), 1)


class LoggingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def formats(self) -> list[str]:
        return [e["log_format"] for e in self.events]

    def test_connect_message_close(self) -> None:
        """Connections, messages (with structured fields) and closes are logged."""
        room = MemoryRoom(welcome="")
        _, alice = room.connect(1234)
        alice.sendMessage(b"hi")
        alice.sendClose(1000)
        room.flush()
        byFormat = {e["log_format"]: e for e in self.events}
        self.assertEqual(byFormat["New connection from {peer}"]["peer"], "127.0.0.1:1234")
        self.assertEqual(byFormat["From client {peer}: {text}"]["text"], "hi")
        self.assertEqual(
            byFormat["Connection from {peer} closed: code {code} {reason}"]["code"], 1000
        )

    def test_connection_lines_name_their_source(self) -> None:
        """A connection's lines come from its class's namespace, with itself as the source."""
        room = MemoryRoom(welcome="")
        server, alice = room.connect(1234)
        room.flush()
        (event,) = [e for e in self.events if e["log_format"] == "New connection from {peer}"]
        self.assertEqual(event["log_namespace"], "wschat.protocol.ChatServerProtocol")
        self.assertIs(event["log_source"], server)
        self.assertEqual(event["log_namespace"], server._log.namespace)

    def test_no_message_log(self) -> None:
        """With message logging off, message bodies never reach the log."""
        room = MemoryRoom(welcome="", logMessages=False)
        _, alice = room.connect(1234)
        alice.sendMessage(b"secret")
        room.flush()
        self.assertNotIn("From client {peer}: {text}", self.formats())
        self.assertFalse(any("secret" in repr(e) for e in self.events))

    def test_no_connection_log(self) -> None:
        """With connection logging off, connections and closes are not logged; messages are."""
        room = MemoryRoom(welcome="", logConnections=False)
        _, alice = room.connect(1234)
        alice.sendMessage(b"hi")
        alice.sendClose(1000)
        room.flush()
        self.assertEqual(self.formats(), ["From client {peer}: {text}"])


class RoomTests(SynchronousTestCase):
    def test_frames_once(self) -> None:
        """A broadcast frames its message once and hands the same frame to every member."""
        prepared: list[tuple[bytes, bool]] = []

        def prepare(payload: bytes, isBinary: bool) -> Any:
            prepared.append((payload, isBinary))
            return object()

        frames: list[object] = []

        class Member:
            def deliver(self, frame: object) -> None:
                frames.append(frame)

        room = Room(prepare)
        for _ in range(5):
            room.join(Member())
        room.broadcast(Message("1.2.3.4:5", b"x"))
        self.assertEqual(prepared, [(b"1.2.3.4:5: x", False)])
        self.assertEqual(len(frames), 5)
        self.assertEqual(len(set(map(id, frames))), 1)

    def test_member_leaving_during_broadcast(self) -> None:
        """A member that leaves while a broadcast runs does not disturb delivery to the rest."""
        room = Room(lambda payload, isBinary: payload)  # type: ignore[arg-type,return-value]
        got: list[str] = []

        class Member:
            def __init__(self, name: str) -> None:
                self.name = name

            def deliver(self, frame: object) -> None:
                got.append(self.name)
                room.leave(self)

        for name in "abc":
            room.join(Member(name))
        room.broadcast(Message("s", b"x"))
        self.assertEqual(got, ["a", "b", "c"])
        self.assertEqual(len(room), 0)


class LateTimerTests(SynchronousTestCase):
    def test_ping_timeout_run_after_the_connection_is_gone(self) -> None:
        """
        A ping timeout that Autobahn's batched timer runs after its connection was lost (txaio
        runs a bucket of over 1000 calls in chunks, and cannot cancel a call of a later chunk)
        raises nothing.
        """
        clock = MemoryReactorClock()
        with replace_loop(clock):
            chat = ChatServer(
                reactor=clock,
                welcome="",
                logConnections=False,
                limits=Limits(pingInterval=1, pingTimeout=1),
            )
            peers = [RawPeer(chat.factory, port=n).open() for n in range(1, 1002)]
            clock.advance(1)  # the first 1000 pings
            clock.advance(0.1)  # the last one, in the bucket's second chunk
            clock.advance(0.9)  # the first 1000 ping timeouts: those peers are dropped
            late = peers[-1]
            self.assertFalse(late.dropped)
            late.lose()
            clock.advance(0.1)  # the last timeout, its cancel too late
        self.assertEqual(late.protocol.state, WebSocketProtocol.STATE_CLOSED)
        self.assertTrue(all(peer.dropped for peer in peers[:-1]))
