"""
History through the real protocol in memory: recovery on connect, late joiners, exactly-once
sending, malformed commands, history off, the replay's flow control, and a property: clients
dropping and resuming at random while others send all end with the room's one order.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawws import RawPeer, Transport
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from txaio.testutil import replace_loop

from wschat.bench.frames import OP_TEXT, openingHandshake
from wschat.limits import Limits
from wschat.server import ChatServer
from wschat.testing import MemoryRoom, QueueClientProtocol, received
from wschat.wire import JSON_SUBPROTOCOL


def objects(client: QueueClientProtocol) -> list[dict[str, Any]]:
    return [json.loads(payload) for payload, _ in received(client)]


def relayed(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The relayed messages only (no welcome, join or leave)."""
    return [o for o in objs if o["type"] == "message"]


def texts(client: QueueClientProtocol) -> list[str]:
    return [payload.decode() for payload, _ in received(client)]


def sample(chat: ChatServer, name: str, **labels: str) -> float | None:
    return chat.metrics.registry.get_sample_value(name, labels)


class Room(MemoryRoom):
    """A MemoryRoom with JSON clients by port, and plain senders."""

    def __init__(self, **options: Any) -> None:
        options.setdefault("welcome", "")
        options.setdefault("logMessages", False)
        options.setdefault("logConnections", False)
        super().__init__(**options)
        self.ports = iter(range(40000, 60000))

    def json(self, query: str = "") -> tuple[Any, QueueClientProtocol]:
        return self.connect(
            next(self.ports),
            path="/" + ("?" + query if query else ""),
            protocols=[JSON_SUBPROTOCOL],
        )

    def plain(self, query: str = "") -> tuple[Any, QueueClientProtocol]:
        return self.connect(next(self.ports), path="/" + ("?" + query if query else ""))

    def say(self, client: QueueClientProtocol, *lines: str) -> None:
        for line in lines:
            client.sendText(line)
        self.flush()


class RecoveryTests(SynchronousTestCase):
    """since= and history= on connect, through the protocol."""

    def setUp(self):
        self.room = Room(history=5)
        self.history = self.room.server.history
        _, self.sender = self.room.plain()

    def test_recoversExactlyTheMissed(self):
        """A client back with since= gets recovered true, exactly what it missed, then live."""
        server, reader = self.room.json()
        welcome = objects(reader)[0]
        self.room.say(self.sender, "a", "b")
        seen = objects(reader)
        self.assertEqual([(m["text"], m["seq"]) for m in seen], [("a", 1), ("b", 2)])
        self.assertEqual({m["epoch"] for m in seen}, {welcome["epoch"]})
        server.abort()
        self.room.say(self.sender, "c", "d")
        _, back = self.room.json(f"since={welcome['epoch']}:2")
        self.room.say(self.sender, "e")
        got = objects(back)
        self.assertEqual(
            (got[0]["type"], got[0]["recovered"], got[0]["seq"], got[0]["epoch"]),
            ("welcome", True, 4, welcome["epoch"]),
        )
        self.assertEqual(
            [(m["text"], m["seq"]) for m in relayed(got)], [("c", 3), ("d", 4), ("e", 5)]
        )
        self.assertEqual(sample(self.room.server, "wschat_recoveries_total", recovered="true"), 1)

    def test_nothingMissed(self):
        """since= at the head recovers with nothing to replay, then live."""
        self.room.say(self.sender, "a")
        _, back = self.room.json(f"since={self.history.epoch}:1")
        self.room.say(self.sender, "b")
        got = objects(back)
        self.assertEqual((got[0]["recovered"], [m["text"] for m in relayed(got)]), (True, ["b"]))

    def test_tooOld(self):
        """A position older than the window: recovered false, and the whole window."""
        self.room.say(self.sender, *"abcdefg")
        _, back = self.room.json(f"since={self.history.epoch}:1")
        got = objects(back)
        self.assertEqual(got[0]["recovered"], False)
        self.assertEqual([m["seq"] for m in relayed(got)], [3, 4, 5, 6, 7])
        self.assertEqual(sample(self.room.server, "wschat_recoveries_total", recovered="false"), 1)

    def test_otherEpoch(self):
        """A position of another epoch: recovered false, and the whole window."""
        self.room.say(self.sender, "a", "b")
        _, back = self.room.json("since=0123456789abcdef:1")
        got = objects(back)
        self.assertEqual(
            (got[0]["recovered"], [m["text"] for m in relayed(got)]), (False, ["a", "b"])
        )

    def test_lateJoiner(self):
        """history=N gives the last N (capped by the window) and no recovered field."""
        self.room.say(self.sender, *"abcdefg")
        _, last2 = self.room.json("history=2")
        _, all_ = self.room.json("history=100")
        got = objects(last2)
        self.assertNotIn("recovered", got[0])
        self.assertEqual([m["text"] for m in relayed(got)], ["f", "g"])
        self.assertEqual([m["text"] for m in relayed(objects(all_))], list("cdefg"))

    def test_plainHistory(self):
        """A plain client may ask for history=N: it gets the plain frames after its greeting."""
        room = Room(history=5, welcome="hello")
        _, sender = room.plain()
        room.say(sender, "a", "b")
        _, late = room.plain("history=1")
        room.say(sender, "c")
        self.assertEqual(texts(late), ["hello", "127.0.0.1:40000: b", "127.0.0.1:40000: c"])

    def test_noHistoryUnlessAsked(self):
        """Without since or history nobody gets earlier messages, plain or JSON."""
        self.room.say(self.sender, "a")
        _, js = self.room.json()
        _, plain = self.room.plain()
        self.assertEqual([o["type"] for o in objects(js)], ["welcome", "join"])
        self.assertEqual(texts(plain), [])

    def test_historyMetrics(self):
        """The history's size in messages and bytes is exported."""
        self.room.say(self.sender, "abc", "de")
        chat = self.room.server
        self.assertEqual(sample(chat, "wschat_history_messages"), 2)
        self.assertGreaterEqual(sample(chat, "wschat_history_bytes"), 5)


def refusal(server: ChatServer, query: str) -> bytes:
    """The HTTP response head to a handshake for ``/?query``."""
    peer = RawPeer(server.factory)
    peer.send(openingHandshake("127.0.0.1:2000", "/?" + query, ()))
    return peer.response()


class QueryRefusalTests(SynchronousTestCase):
    """Malformed since/history values, or any with history off, get HTTP 400 with a reason."""

    def test_malformed(self):
        """A malformed since is refused with 400 and says what is expected."""
        clock = MemoryReactorClock()
        with replace_loop(clock):
            server = ChatServer(reactor=clock, logConnections=False)
            head = refusal(server, "since=nope")
            self.assertTrue(head.startswith(b"HTTP/1.1 400 "), head)
            self.assertIn(b"EPOCH:SEQ", head)
            self.assertTrue(refusal(server, "history=x").startswith(b"HTTP/1.1 400 "))
            self.assertTrue(refusal(server, "other=1").startswith(b"HTTP/1.1 101 "))

    def test_historyOff(self):
        """With history off, since or history is refused: 400 "history is off"."""
        clock = MemoryReactorClock()
        with replace_loop(clock):
            server = ChatServer(reactor=clock, history=0, logConnections=False)
            head = refusal(server, "history=1")
            self.assertTrue(head.startswith(b"HTTP/1.1 400 history is off"), head)


class HistoryOffTests(SynchronousTestCase):
    """--history 0: no positions anywhere, as before."""

    def test_noPositions(self):
        """Messages and welcome carry no epoch or seq; send commands still work, unchecked."""
        room = Room(history=0)
        self.assertIsNone(room.server.history)
        _, js = room.json()
        room.say(js, '{"type":"send","text":"x","id":"1"}', '{"type":"send","text":"x","id":"1"}')
        got = objects(js)
        self.assertNotIn("epoch", got[0])
        self.assertNotIn("seq", got[0])
        self.assertEqual(got[0]["maxMessageSize"], Limits().maxMessageSize)
        self.assertEqual(
            [{k: m[k] for k in m if k != "time"} for m in relayed(got)],
            [{"type": "message", "from": "127.0.0.1:40000", "text": "x", "id": "1"}] * 2,
        )


class SendTests(SynchronousTestCase):
    """Exactly-once sending and commands on JSON connections."""

    def setUp(self):
        self.room = Room(history=3)
        _, self.js = self.room.json()
        _, self.other = self.room.json()
        _, self.plain = self.room.plain()
        received(self.js), received(self.other)

    def test_sendCarriesId(self):
        """A send's relayed copy carries its id to JSON clients; plain ones see the text."""
        self.room.say(self.js, '{"type":"send","text":"hi","id":"abc-1"}')
        mine, theirs = objects(self.js), objects(self.other)
        self.assertEqual((mine[0]["text"], mine[0]["id"], mine[0]["seq"]), ("hi", "abc-1", 1))
        self.assertEqual(theirs, mine)
        self.assertEqual(texts(self.plain), ["127.0.0.1:40000: hi"])

    def test_duplicateToSenderOnly(self):
        """A resend of an id inside the window: duplicate to the sender, nothing relayed."""
        self.room.say(self.js, '{"type":"send","text":"hi","id":"k"}')
        received(self.js), received(self.other), received(self.plain)
        self.room.say(self.other, '{"type":"send","text":"hi again","id":"k"}')
        epoch = self.room.server.history.epoch  # type: ignore[union-attr]
        self.assertEqual(
            objects(self.other), [{"type": "duplicate", "id": "k", "epoch": epoch, "seq": 1}]
        )
        self.assertEqual((objects(self.js), texts(self.plain)), ([], []))
        self.assertEqual(sample(self.room.server, "wschat_messages_deduplicated_total"), 1)

    def test_idForgottenOutsideWindow(self):
        """Once its message left the window, an id may be used again."""
        self.room.say(self.js, '{"type":"send","text":"a","id":"k"}', *"bcd")
        received(self.js)
        self.room.say(self.js, '{"type":"send","text":"a","id":"k"}')
        self.assertEqual([(m["type"], m["seq"]) for m in objects(self.js)], [("message", 5)])

    def test_malformedCommands(self):
        """Bad commands get a notice to the sender alone; the connection stays open."""
        self.room.say(
            self.js,
            '{"type":"edit"}',
            '{"type":"send"}',
            '{"type":"send","text":"x","id":""}',
            "still here",
        )
        got = objects(self.js)
        self.assertEqual([m["type"] for m in got], ["notice", "notice", "notice", "message"])
        self.assertIn("unknown command", got[0]["text"])
        self.assertIn('"text"', got[1]["text"])
        self.assertIn('"id"', got[2]["text"])
        self.assertEqual(texts(self.plain), ["127.0.0.1:40000: still here"])
        self.assertEqual(
            sample(self.room.server, "wschat_messages_refused_total", reason="malformed command"),
            3,
        )

    def test_notACommand(self):
        """JSON text without a type, and any text from plain clients, is relayed as it is."""
        self.room.say(self.js, '{"text":"x"}')
        self.room.say(self.plain, '{"type":"send","text":"x"}')
        self.assertEqual(
            [m["text"] for m in objects(self.other)], ['{"text":"x"}', '{"type":"send","text":"x"}']
        )


class FlowTransport(Transport):
    """An in-memory transport with a write buffer: full past ``bufferSize``, as TCP's."""

    bufferSize = 4096

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.paused = False
        self.peak = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        self.peak = max(self.peak, len(self.value()))
        if self.producer is not None and not self.paused and len(self.value()) > self.bufferSize:
            self.paused = True
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        """The peer reads everything; the buffer is empty again and the producer resumed."""
        data = self.value()
        self.clear()
        if self.paused and self.producer is not None:
            self.paused = False
            self.producer.resumeProducing()
        return data


class ReplayFlowTests(SynchronousTestCase):
    """Replaying history never holds more than the transport's buffer and one message."""

    def test_pacedReplay(self):
        """A large replay under a tiny --max-queue: bounded, paced by drains, never dropped."""
        clock = MemoryReactorClock()
        with replace_loop(clock):
            chat = ChatServer(
                reactor=clock,
                welcome="",
                logMessages=False,
                logConnections=False,
                limits=Limits(maxQueue=100),
                history=500,
            )
            sender = RawPeer(chat.factory, port=1).open()
            for n in range(300):
                sender.sendText(b"message %03d " % n + b"x" * 200)
            peer = RawPeer(chat.factory, port=2)
            peer.transport = transport = FlowTransport(
                hostAddress=peer.transport.getHost(), peerAddress=peer.address
            )
            peer.protocol.makeConnection(transport)
            peer.send(openingHandshake("127.0.0.1:2000", "/?history=300", ()))
            head, _, first = transport.drain().partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 101 "))
            chunks = [first]
            turns = 0
            while chat.room.replaying(peer.protocol) or turns < 100:
                # Messages keep coming while it catches up.
                if turns < 100:
                    sender.sendText(b"live %03d" % turns)
                # The peer reads a little at a time; the reactor turns.
                if turns % 2:
                    chunks.append(transport.drain())
                clock.advance(0)
                turns += 1
                self.assertLess(turns, 2000)
            chunks.append(transport.drain())
            self.assertFalse(chat.room.replaying(peer.protocol))
            self.assertLessEqual(transport.peak, transport.bufferSize + 300)
            self.assertFalse(peer.dropped)
            from wschat.bench.frames import parseFrames

            got = [p for op, p in parseFrames(b"".join(chunks)) if op == OP_TEXT]
            expected = [b"127.0.0.1:1: message %03d " % n + b"x" * 200 for n in range(300)]
            expected += [b"127.0.0.1:1: live %03d" % n for n in range(100)]
            self.assertEqual(got, expected)


# -- the property: K clients dropping and resuming at random while M senders send


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, int, list[tuple[str, int, bool]]]:
    """K resuming clients, M senders, and a list of steps (what, whom, flush after)."""
    k = draw(st.integers(1, 3))
    m = draw(st.integers(1, 3))
    step = st.one_of(
        st.tuples(st.just("send"), st.integers(0, m - 1), st.booleans()),
        st.tuples(st.sampled_from(["drop", "cut", "resume"]), st.integers(0, k - 1), st.booleans()),
    )
    return k, m, draw(st.lists(step, min_size=1, max_size=40))


class Resumer:
    """A client that keeps one log across its connections, resuming with since=."""

    def __init__(self, room: Room) -> None:
        self.room = room
        self.log: list[tuple[int, str]] = []
        self.welcomes: list[dict[str, Any]] = []
        self.position: str | None = None
        self.server: Any = None
        self.client: QueueClientProtocol | None = None
        self.connect()

    def connect(self) -> None:
        query = f"since={self.position}" if self.position else ""
        self.server, self.client = self.room.json(query)

    def read(self) -> None:
        if self.client is None:
            return
        for obj in objects(self.client):
            if obj["type"] == "welcome":
                self.welcomes.append(obj)
                if self.position is None:
                    self.position = f"{obj['epoch']}:{obj['seq']}"
            elif obj["type"] == "message":
                self.log.append((obj["seq"], obj["text"]))
                self.position = f"{obj['epoch']}:{obj['seq']}"

    def drop(self, side: str) -> None:
        if self.client is None:
            return
        self.read()
        # Cut at the TCP level, by the server or by the client: no closing handshake.
        if side == "drop":
            self.server.transport.abortConnection()
        else:
            self.client.transport.abortConnection()
        self.client = None

    def resume(self) -> None:
        if self.client is None:
            self.connect()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_resuming_clients_see_the_rooms_one_order(
    scenario: tuple[int, int, list[tuple[str, int, bool]]],
) -> None:
    """Clients cut and resuming at random points while others send: every log is the room's."""
    k, m, steps = scenario
    room = Room(history=1000)
    history = room.server.history
    assert history is not None
    senders = [room.plain()[1] for _ in range(m)]
    resumers = [Resumer(room) for _ in range(k)]
    room.flush()
    count = 0
    for what, who, flush in steps:
        if what == "send":
            senders[who].sendText(f"s{who}-{count}")
            count += 1
        elif what == "resume":
            resumers[who].resume()
        else:
            resumers[who].drop(what)
        if flush:
            room.flush()
    for r in resumers:
        r.resume()
    room.flush()
    for s in senders:
        s.sendText("last")
    room.flush()
    order = [
        (seq, history.entry(seq).message.payload.decode()) for seq in range(1, history.head + 1)
    ]  # type: ignore[union-attr]
    assert len(order) == count + m
    for r in resumers:
        r.read()
        assert all(w["recovered"] for w in r.welcomes[1:])
        start = r.welcomes[0]["seq"]
        assert r.log == order[start:]
