"""The history window, positions, recovery decisions and the room's paced replay, in memory."""

from __future__ import annotations

import json

from autobahn.websocket.protocol import PreparedMessage
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from wschat.history import BadQuery, History, Position, parseQuery
from wschat.metrics import Metrics
from wschat.room import Room
from wschat.tap import Options, buildServer
from wschat.wire import BadCommand, Format, Message, SendCommand, parseCommand


def message(n: int, size: int = 1, mid: str | None = None) -> Message:
    return Message("10.0.0.1:1", str(n).encode().rjust(size, b"."), id=mid)


def prepare(payload: bytes, isBinary: bool) -> PreparedMessage:
    return PreparedMessage(payload, isBinary, False, False)


class HistoryTests(SynchronousTestCase):
    """The window: numbering, bounds by count, age and bytes, restarts, ids."""

    def setUp(self):
        self.clock = Clock()

    def history(self, count=5, age=60.0, size=1 << 20, epoch="e" * 16) -> History:
        return History(count, age, size, clock=self.clock.seconds, epoch=epoch)

    def fill(self, history: History, n: int, **kw) -> None:
        for _ in range(n):
            history.append(history.nextPosition(), message(history.head + 1, **kw), 0.0)

    def seqs(self, history: History) -> list[int]:
        return [e.seq for e in (history.entry(s) for s in range(1, history.head + 1)) if e]

    def test_epochIsRandomHex(self):
        """Each history gets its own epoch of 16 lowercase hex characters."""
        a, b = History(clock=self.clock.seconds), History(clock=self.clock.seconds)
        self.assertRegex(a.epoch, "^[0-9a-f]{16}$")
        self.assertNotEqual(a.epoch, b.epoch)

    def test_numbering(self):
        """Positions start at 1 and grow by exactly one per message."""
        h = self.history()
        self.assertEqual(h.nextPosition(), Position("e" * 16, 1))
        self.fill(h, 3)
        self.assertEqual((h.head, h.first, len(h)), (3, 1, 3))
        self.assertEqual(h.nextPosition(), Position("e" * 16, 4))

    def test_boundedByCount(self):
        """Past maxCount the oldest messages go first."""
        h = self.history(count=3)
        self.fill(h, 7)
        self.assertEqual(self.seqs(h), [5, 6, 7])
        self.assertIsNone(h.entry(4))

    def test_boundedByAge(self):
        """Messages older than maxAge are gone at the next read."""
        h = self.history(age=10)
        self.fill(h, 2)
        self.clock.advance(6)
        self.fill(h, 1)
        self.clock.advance(5)
        h.expire()
        self.assertEqual(self.seqs(h), [3])
        self.clock.advance(10)
        self.assertEqual(h.start(Position(h.epoch, 2)), (4, False))
        self.assertEqual((len(h), h.head, h.first), (0, 3, 4))

    def test_boundedByBytes(self):
        """Payload bytes past maxBytes drop the oldest; one message over the bound is not kept."""
        h = self.history(count=100, size=250)
        self.fill(h, 3, size=100)
        self.assertEqual((self.seqs(h), h.bytes), ([2, 3], 200))
        self.fill(h, 1, size=300)
        self.assertEqual((len(h), h.bytes, h.head), (0, 0, 4))

    def test_cachedFramesCount(self):
        """A cached frame counts toward maxBytes; it evicts older messages only when asked."""
        h = self.history(count=100, size=320)
        self.fill(h, 2, size=100)
        first, second = h.entry(1), h.entry(2)
        assert first is not None and second is not None
        frame = prepare(b"x" * 40, False)
        h.cacheFrame(second, frame, True, evict=False)
        self.assertEqual((second.jsonFrame, h.bytes), (frame, 200 + 40 + 42))
        big = prepare(b"y" * 60, False)
        h.cacheFrame(first, big, False, evict=False)
        self.assertIsNone(first.plainFrame)
        h.cacheFrame(second, big, False, evict=True)
        self.assertEqual((self.seqs(h), second.plainFrame), ([2], big))
        self.assertEqual(h.bytes, 100 + 82 + 122)

    def test_restartOnHoleOrEpoch(self):
        """A position that does not follow the head restarts the window there."""
        h = self.history()
        self.fill(h, 3)
        h.append(Position(h.epoch, 7), message(7), 0.0)
        self.assertEqual((self.seqs(h), h.first), ([7], 7))
        h.append(Position("f" * 16, 1), message(1), 0.0)
        self.assertEqual((h.epoch, h.head, len(h)), ("f" * 16, 1, 1))

    def test_ids(self):
        """Ids are found while their message is in the window, and forgotten with it."""
        h = self.history(count=2)
        self.fill(h, 1, mid="a")
        self.fill(h, 1, mid="b")
        self.assertEqual(h.byId("a").seq, 1)  # type: ignore[union-attr]
        self.fill(h, 1)
        self.assertIsNone(h.byId("a"))
        self.assertEqual(h.byId("b").seq, 2)  # type: ignore[union-attr]

    def test_start(self):
        """since recovers when the window holds everything after it; otherwise the whole window."""
        h = self.history(count=5)
        e = h.epoch
        self.assertEqual(h.start(), (1, True))
        self.assertEqual(h.start(Position(e, 0)), (1, True))
        self.fill(h, 8)  # holds 4..8
        self.assertEqual(h.start(Position(e, 8)), (9, True))
        self.assertEqual(h.start(Position(e, 5)), (6, True))
        self.assertEqual(h.start(Position(e, 3)), (4, True))
        self.assertEqual(h.start(Position(e, 2)), (4, False))
        self.assertEqual(h.start(Position(e, 9)), (4, False))
        self.assertEqual(h.start(Position("0" * 16, 5)), (4, False))
        self.assertEqual(h.start(last=2), (7, True))
        self.assertEqual(h.start(last=50), (4, True))
        self.assertEqual(h.start(last=0), (9, True))
        self.assertEqual(h.start(Position(e, 7), last=1), (8, True))
        self.assertEqual(h.start(), (9, True))


class QueryTests(SynchronousTestCase):
    """since= and history= in the WebSocket URL."""

    def test_valid(self):
        """since=EPOCH:SEQ and history=N parse; other parameters are ignored."""
        self.assertEqual(
            parseQuery("since=0123456789abcdef:42&history=5&x=1"),
            (Position("0123456789abcdef", 42), 5),
        )
        self.assertEqual(parseQuery("x=1"), (None, None))

    def test_malformed(self):
        """Malformed or repeated values are refused with a reason."""
        for query in [
            "since=",
            "since=abc",
            "since=abc:",
            "since=:5",
            "since=ABC:5",
            "since=abc:-1",
            "since=abc:1x",
            "since=a:1&since=a:2",
            "history=",
            "history=-1",
            "history=ten",
            "history=1&history=2",
            "history=" + "9" * 19,
        ]:
            self.assertRaises(BadQuery, parseQuery, query)


class CommandTests(SynchronousTestCase):
    """JSON clients' commands: what is a command, what is text, what is refused."""

    def test_send(self):
        """A send command gives its text and optional id."""
        self.assertEqual(
            parseCommand(b' {"type":"send","text":"hi","id":"u-1"}'), SendCommand("hi", "u-1")
        )
        self.assertEqual(parseCommand(b'{"type":"send","text":""}'), SendCommand(""))

    def test_notCommands(self):
        """Text that is not a JSON object with a type is no command: it is relayed as text."""
        for payload in [b"hello", b"{not json", b'{"text":"x"}', b"[1]", b'"{"', b""]:
            self.assertIsNone(parseCommand(payload))

    def test_bad(self):
        """An unknown type, a missing or non-string text, a bad id: refused, with why."""
        for payload in [
            b'{"type":"edit","text":"x"}',
            b'{"type":7}',
            b'{"type":"send"}',
            b'{"type":"send","text":5}',
            b'{"type":"send","text":"\\ud800"}',
            b'{"type":"send","text":"x","id":""}',
            b'{"type":"send","text":"x","id":5}',
            b'{"type":"send","text":"x","id":"' + b"a" * 65 + b'"}',
            b'{"type":"send","text":"x","id":"caf\\u00e9"}',
            b'{"type":"send","text":"x","id":"a\\nb"}',
        ]:
            self.assertRaises(BadCommand, parseCommand, payload)


class Replayer:
    """A member whose transport takes ``room`` frames before it is full."""

    def __init__(self, room: int = 1 << 30) -> None:
        self.room = room
        self.frames: list[bytes] = []
        self.live: list[bytes] = []
        self.behind = False

    def deliver(self, frame: PreparedMessage) -> None:
        self.live.append(frame.payload)
        self.frames.append(frame.payload)

    def writable(self) -> bool:
        return self.room > 0

    def deliverNow(self, frame: PreparedMessage) -> None:
        assert self.room > 0, "written to while full"
        self.room -= 1
        self.frames.append(frame.payload)

    def fellBehind(self) -> None:
        self.behind = True

    def seqs(self) -> list[int]:
        return [json.loads(p)["seq"] for p in self.frames]


class RoomReplayTests(SynchronousTestCase):
    """The room relays positions, replays under flow control, and joins live without a seam."""

    def setUp(self):
        self.clock = Clock()
        self.history = History(10, 60, 1 << 20, clock=self.clock.seconds, epoch="a" * 16)
        self.room = Room(
            prepare,
            Format.PREFIXED,
            metrics=Metrics(),
            now=self.clock.seconds,
            history=self.history,
        )

    def send(self, n: int) -> None:
        for _ in range(n):
            self.room.broadcast(Message("10.0.0.1:1", b"m%d" % (self.history.head + 1)))

    def test_positionsInJSONOnly(self):
        """JSON members see epoch and seq; plain members the plain frame, unchanged."""
        plain, js = Replayer(), Replayer()
        self.room.join(plain)
        self.room.join(js, Format.JSON)
        self.send(2)
        self.assertEqual(plain.frames, [b"10.0.0.1:1: m1", b"10.0.0.1:1: m2"])
        self.assertEqual(js.seqs(), [1, 2])
        self.assertEqual(json.loads(js.frames[0])["epoch"], "a" * 16)

    def test_busPosition(self):
        """A position handed in by the bus is the one relayed and kept."""
        js = Replayer()
        self.room.join(js, Format.JSON)
        self.room.broadcast(Message("x", b"y"), 5.0, Position("b" * 16, 41))
        self.assertEqual((json.loads(js.frames[0])["seq"], self.history.head), (41, 41))
        self.assertEqual(self.history.epoch, "b" * 16)

    def test_replayThenLive(self):
        """A replaying member gets the window from its cursor, then live messages, paced."""
        self.send(5)
        member = Replayer(room=2)
        self.room.join(member, Format.JSON, start=2)
        self.assertTrue(self.room.replaying(member))
        self.room.catchUp(member)
        self.assertEqual(member.seqs(), [2, 3])
        self.send(2)  # messages flow while it is paused: they wait in the history
        self.assertEqual(member.seqs(), [2, 3])
        self.assertEqual(len(self.room), 1)
        member.room = 3
        self.room.catchUp(member)
        self.assertEqual(member.seqs(), [2, 3, 4, 5, 6])
        member.room = 10
        self.room.catchUp(member)
        self.assertFalse(self.room.replaying(member))
        self.assertEqual(member.live, [])
        self.send(1)
        self.assertEqual(member.seqs(), [2, 3, 4, 5, 6, 7, 8])
        self.assertEqual(len(member.live), 1)

    def test_replayCachesFrames(self):
        """The frames built at broadcast serve the replay: nothing is framed twice."""
        other = Replayer()
        self.room.join(other, Format.JSON)
        self.send(3)
        member = Replayer()
        self.room.join(member, Format.JSON, start=1)
        self.room.catchUp(member)
        self.assertEqual(member.frames, other.frames)
        entry = self.history.entry(1)
        assert entry is not None
        self.assertIs(entry.jsonFrame is not None, True)

    def test_plainReplay(self):
        """A plain member replays plain frames."""
        self.send(2)
        member = Replayer()
        self.room.join(member, start=1)
        self.room.catchUp(member)
        self.assertEqual(member.frames, [b"10.0.0.1:1: m1", b"10.0.0.1:1: m2"])

    def test_fellBehind(self):
        """A cursor the window dropped while paused ends the replay explicitly."""
        self.send(3)
        member = Replayer(room=1)
        self.room.join(member, Format.JSON, start=1)
        self.room.catchUp(member)
        self.send(10)  # the window (10) now holds 4..13: seq 2 is gone
        member.room = 100
        self.room.catchUp(member)
        self.assertEqual((member.seqs(), member.behind), ([1], True))
        self.assertNotIn(member, self.room)

    def test_fellBehindEpoch(self):
        """A new epoch under a paused replay ends it too."""
        self.send(3)
        member = Replayer(room=1)
        self.room.join(member, Format.JSON, start=1)
        self.room.catchUp(member)
        self.room.broadcast(Message("x", b"y"), None, Position("c" * 16, 1))
        member.room = 100
        self.room.catchUp(member)
        self.assertTrue(member.behind)

    def test_nothingToReplay(self):
        """A start past the head joins live at once."""
        self.send(2)
        member = Replayer()
        self.room.join(member, Format.JSON, start=3)
        self.assertFalse(self.room.replaying(member))
        self.assertIn(member, self.room)

    def test_leaveWhileReplaying(self):
        """A replaying member can leave; it counts and iterates as a member until then."""
        self.send(2)
        member = Replayer(room=0)
        self.room.join(member, Format.JSON, start=1)
        self.assertEqual((len(self.room), list(self.room)), (1, [member]))
        self.assertTrue(self.room.leave(member))
        self.assertEqual(len(self.room), 0)
        self.room.catchUp(member)
        self.assertEqual(member.frames, [])


class OptionTests(SynchronousTestCase):
    """--history, --history-ttl and --history-bytes on the command line."""

    def parse(self, *args: str) -> Options:
        options = Options()
        options.parseOptions(list(args))
        return options

    def test_defaults(self):
        """By default the window keeps 1000 messages, 300 s, 16 MiB: the server gets them."""
        options = self.parse()
        self.assertEqual(
            (options["history"], options["history-ttl"], options["history-bytes"]),
            (1000, 300.0, 16 << 20),
        )
        history = buildServer(options, reactor=Clock()).history
        assert history is not None
        self.assertEqual(
            (history.maxCount, history.maxAge, history.maxBytes), (1000, 300.0, 16 << 20)
        )

    def test_values(self):
        """Sizes take units; --history 0 turns history off."""
        options = self.parse("--history", "50", "--history-ttl", "2.5", "--history-bytes", "1M")
        history = buildServer(options, reactor=Clock()).history
        assert history is not None
        self.assertEqual((history.maxCount, history.maxAge, history.maxBytes), (50, 2.5, 1 << 20))
        self.assertIsNone(buildServer(self.parse("--history", "0"), reactor=Clock()).history)

    def test_refused(self):
        """Negative or malformed values are usage errors naming the option."""
        for args in [
            ("--history", "-1"),
            ("--history", "lots"),
            ("--history-ttl", "0"),
            ("--history-ttl", "-5"),
            ("--history-bytes", "0"),
            ("--history-bytes", "big"),
        ]:
            e = self.assertRaises(usage.UsageError, self.parse, *args)
            self.assertIn(args[0], str(e))


class EnvelopeIdTests(SynchronousTestCase):
    """A message's client-chosen id crosses the Redis bus in the envelope."""

    def test_roundTrip(self):
        """The id travels as a seventh element; without one the envelope is as before."""
        from wschat.envelope import Envelope, decodeEnvelope, encodeEnvelope

        with_ = Envelope(Message("1.2.3.4:5", b"hi", id="abc"), "node", 1.5)
        without = Envelope(Message("1.2.3.4:5", b"hi"), "node", 1.5)
        self.assertEqual(decodeEnvelope(encodeEnvelope(with_)), with_)
        self.assertEqual(decodeEnvelope(encodeEnvelope(without)), without)
        self.assertEqual(len(encodeEnvelope(with_)) - len(encodeEnvelope(without)), 4)

    def test_badId(self):
        """An id that is not a string is a malformed envelope."""
        import msgpack

        from wschat.envelope import MalformedEnvelope, decodeEnvelope

        data = msgpack.packb([1, "node", "a", False, 1.0, b"x", 7])
        self.assertRaises(MalformedEnvelope, decodeEnvelope, data)
