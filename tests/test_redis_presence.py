"""Room-wide presence in memory: the presence envelope, and the view of the other daemons."""

from __future__ import annotations

import msgpack
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from wschat.envelope import (
    Envelope,
    MalformedEnvelope,
    PresenceEnvelope,
    PresenceEvent,
    decodeEnvelope,
    encodeEnvelope,
    encodePresence,
    envelopeHead,
)
from wschat.history import Position
from wschat.presence import PresenceView
from wschat.redishistory import Alive, MalformedReply, readAlive, readRelayed, readStored
from wschat.wire import Message


class PositionedEnvelopeTests(SynchronousTestCase):
    def test_roundTrip(self) -> None:
        """A message's id and position travel in elements 7 to 9 of the envelope."""
        e = Envelope(Message("h:1", b"hi", False, "id-1"), "n", 5.0, Position("00ff", 42))
        self.assertEqual(decodeEnvelope(encodeEnvelope(e)), e)
        self.assertEqual(
            msgpack.unpackb(encodeEnvelope(e)),
            [1, "n", "h:1", False, 5.0, b"hi", "id-1", "00ff", 42],
        )

    def test_withoutPositionUnchanged(self) -> None:
        """Without position or id the envelope is the six elements of version 1, as before."""
        e = Envelope(Message("h:1", b"hi"), "n", 5.0)
        self.assertEqual(msgpack.unpackb(encodeEnvelope(e)), [1, "n", "h:1", False, 5.0, b"hi"])

    def test_headCompletedByRedis(self) -> None:
        """Head + packed epoch + packed seq (what the Lua script builds) is an envelope."""
        message = Message("h:1", b"\x00bin", True, None)
        head = envelopeHead(message, "node", 7.5)
        data = head + msgpack.packb("abcdef0123456789") + msgpack.packb(2**40)
        self.assertEqual(
            decodeEnvelope(data),
            Envelope(message, "node", 7.5, Position("abcdef0123456789", 2**40)),
        )

    def test_malformedPosition(self) -> None:
        """A position or id of the wrong shape makes the envelope malformed."""
        base = [1, "n", "h:1", False, 0.0, b"x"]
        for extra in (
            [None, "EPOCH", 1],
            [None, "ab", 0],
            [None, "ab", True],
            [None, "ab", None],
            [None, None, 3],
            ["", "ab", 1],
            ["x" * 65, "ab", 1],
            [7, "ab", 1],
        ):
            with self.subTest(extra=extra):
                self.assertRaises(MalformedEnvelope, decodeEnvelope, msgpack.packb(base + extra))


class PresenceEnvelopeTests(SynchronousTestCase):
    def test_roundTrip(self) -> None:
        """A presence envelope carries the node, its version and count, and its events."""
        p = PresenceEnvelope(
            "n1", 7, 2, (PresenceEvent("join", "h:1", 3), PresenceEvent("leave", "h:2", 2))
        )
        self.assertEqual(decodeEnvelope(encodePresence(p)), p)

    def test_notAMessageToVersion1(self) -> None:
        """Its first element is not a version number: a version-1 reader skips it."""
        data = encodePresence(PresenceEnvelope("n1", 1, 0))
        self.assertEqual(msgpack.unpackb(data)[0], "presence")

    def test_malformed(self) -> None:
        """Presence envelopes of the wrong shape are refused."""
        for fields in (
            ["presence", "n", 1, 0],
            ["presence", 3, 1, 0, []],
            ["presence", "n", 1, -1, []],
            ["presence", "n", 1, 0, [["wave", "h:1", 1]]],
            ["presence", "n", 1, 0, [["join", "h:1"]]],
            ["presence", "n", "1", 0, []],
        ):
            with self.subTest(fields=fields):
                self.assertRaises(MalformedEnvelope, decodeEnvelope, msgpack.packb(fields))


class PresenceViewTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.view = PresenceView("me", 15.0, self.clock.seconds)

    def test_countedUntilExpiry(self) -> None:
        """A daemon heard from counts for ttl seconds, then drops out unless heard again."""
        self.assertTrue(self.view.heard("a", 1, 3))
        self.assertEqual(self.view.elsewhere(), 3)
        self.clock.advance(14.9)
        self.assertEqual(self.view.elsewhere(), 3)
        self.clock.advance(0.2)
        self.assertEqual(self.view.elsewhere(), 0)

    def test_ownNodeAndOldVersionsIgnored(self) -> None:
        """Reports of this daemon, and older reports of another, change nothing."""
        self.assertFalse(self.view.heard("me", 1, 5))
        self.view.heard("a", 5, 2)
        self.assertFalse(self.view.heard("a", 4, 9))
        self.assertEqual(self.view.elsewhere(), 2)

    def test_goodbye(self) -> None:
        """A report of 0 connections (goodbye) drops the daemon at once."""
        self.view.heard("a", 1, 4)
        self.view.heard("a", 2, 0)
        self.assertEqual(self.view.elsewhere(), 0)

    def test_censusKeyLifetime(self) -> None:
        """A census counts a daemon until its alive key expires, whatever the ttl."""
        self.view.census([Alive("a", 1, 2, 3.0), Alive("me", 9, 9, 15.0)], asked=0.0)
        self.assertEqual(self.view.nodes(), {"a": 2})
        self.clock.advance(3.1)
        self.assertEqual(self.view.elsewhere(), 0)

    def test_censusDropsTheUnlisted(self) -> None:
        """A daemon missing from a census is gone, unless heard from since it was asked."""
        self.view.heard("a", 1, 1)
        self.clock.advance(1)
        asked = self.clock.seconds()
        self.clock.advance(1)
        self.view.heard("b", 1, 1)
        self.view.census([], asked)
        self.assertEqual(self.view.nodes(), {"b": 1})

    def test_censusOlderThanChannel(self) -> None:
        """A census read before a newer report does not undo it (versions decide)."""
        self.view.heard("a", 1, 1)
        self.view.heard("a", 3, 0)  # goodbye
        self.view.census([Alive("a", 2, 5, 10.0)], asked=0.0)
        self.assertEqual(self.view.elsewhere(), 0)


class ScriptReplyTests(SynchronousTestCase):
    def test_relayed(self) -> None:
        """The relay script's replies: relayed at a position, or a duplicate of one."""
        relayed = readRelayed([1, b"ab", 4, 2])
        self.assertEqual((relayed.duplicate, relayed.seq, relayed.receivers), (False, 4, 2))
        self.assertTrue(readRelayed([0, b"ab", 3]).duplicate)
        self.assertRaises(MalformedReply, readRelayed, b"OK")

    def test_stored(self) -> None:
        """Stream entries out of place or unreadable are skipped and counted."""
        good = encodeEnvelope(Envelope(Message("h:1", b"a"), "n", 1.0, Position("ab", 2)))
        wrong = encodeEnvelope(Envelope(Message("h:1", b"b"), "n", 1.0, Position("ab", 9)))
        stored = readStored(
            [b"ab", 3, 1, [[b"2-1", [b"e", good]], [b"3-1", [b"e", wrong]], [b"4-1", [b"x"]]]]
        )
        self.assertEqual([p for p, _ in stored.entries], [Position("ab", 2)])
        self.assertEqual((stored.epoch, stored.head, stored.malformed), ("ab", 3, 2))
        # The last entries come newest first: put in order.
        last = readStored([b"cd", 2, 0, [[b"2-1", [b"e", good]]]])
        self.assertFalse(last.after)

    def test_alive(self) -> None:
        """The report script's census: node, "version count", milliseconds left."""
        self.assertEqual(readAlive([b"a", b"7 3", 1500, b"b", b"bad", 10]), [Alive("a", 7, 3, 1.5)])
