"""The bus in memory: the envelope, --redis/--channel parsing, and what RedisBus does offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from unittest import mock

import msgpack
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from wschat.bus import LocalBus
from wschat.envelope import Envelope, MalformedEnvelope, decodeEnvelope, encodeEnvelope
from wschat.history import Position
from wschat.redisaddress import RedisAddress, parseRedisURL
from wschat.redisbus import REFUSED_DOWN, RedisBus, _BusFactory, _PublisherProtocol
from wschat.room import Room
from wschat.server import ChatServer
from wschat.tap import Options, buildServer
from wschat.testing import QueueClientFactory, memoryConnection
from wschat.wire import Format, Message, isoTime


def envelope(payload: bytes = b"hello", isBinary: bool = False, **kw: object) -> bytes:
    fields = [1, "node1", "127.0.0.1:5000", isBinary, 1700000000.25, payload]
    return msgpack.packb(fields + list(kw.get("extra", [])))  # type: ignore[arg-type]


class EnvelopeTests(SynchronousTestCase):
    def test_roundTripText(self) -> None:
        """A text message, its sender, node and time survive encoding and decoding."""
        e = Envelope(Message("[::1]:4000", "héllo".encode(), False), "n1", 1700000000.5)
        self.assertEqual(decodeEnvelope(encodeEnvelope(e)), e)

    def test_roundTripBinary(self) -> None:
        """A binary payload travels as bytes, unchanged, with its binary flag."""
        e = Envelope(Message("unix", bytes(range(256)), True), "n2", 0.0)
        self.assertEqual(decodeEnvelope(encodeEnvelope(e)), e)

    def test_layout(self) -> None:
        """Version 1 is the array [1, node, sender, isBinary, time, payload]."""
        e = Envelope(Message("127.0.0.1:5000", b"hi", False), "abcd", 12.5)
        self.assertEqual(
            msgpack.unpackb(encodeEnvelope(e)), [1, "abcd", "127.0.0.1:5000", False, 12.5, b"hi"]
        )

    def test_compact(self) -> None:
        """A typical envelope costs at most 40 bytes on top of the payload."""
        payload = b"x" * 100
        e = Envelope(Message("127.0.0.1:54321", payload, False), "0123abcd", 1700000000.123)
        self.assertLessEqual(len(encodeEnvelope(e)) - len(payload), 40)

    def test_laterFieldsIgnored(self) -> None:
        """A version-1 reader ignores fields a later writer appends (after id, epoch, seq)."""
        decoded = decodeEnvelope(envelope(extra=["k-1", "ab", 3, "more", 3]))
        assert isinstance(decoded, Envelope)
        self.assertEqual((decoded.message.payload, decoded.message.id), (b"hello", "k-1"))

    def test_malformed(self) -> None:
        """Anything but a version-1 envelope is refused with MalformedEnvelope."""
        bad = [
            b"",
            b"garbage",
            b"\xc1",
            msgpack.packb({"v": 1}),
            msgpack.packb([]),
            msgpack.packb([2, "n", "s", False, 0.0, b"x"]),
            msgpack.packb([True, "n", "s", False, 0.0, b"x"]),
            msgpack.packb(["1", "n", "s", False, 0.0, b"x"]),
            msgpack.packb([1, "n", "s", False, 0.0]),
            msgpack.packb([1, b"n", "s", False, 0.0, b"x"]),
            msgpack.packb([1, "n", "s", 0, 0.0, b"x"]),
            msgpack.packb([1, "n", "s", False, "now", b"x"]),
            msgpack.packb([1, "n", "s", False, True, b"x"]),
            msgpack.packb([1, "n", "s", False, 0.0, "text as str"]),
            envelope(b"\xff\xfe not utf-8"),
            envelope() + b"trailing",
        ]
        for data in bad:
            with self.subTest(data=data):
                self.assertRaises(MalformedEnvelope, decodeEnvelope, data)

    def test_binaryNeedNotBeUTF8(self) -> None:
        """Only a text payload must be UTF-8."""
        self.assertEqual(decodeEnvelope(envelope(b"\xff", True)).message.payload, b"\xff")

    @given(st.binary())
    def test_anyBytes(self, data: bytes) -> None:
        """Arbitrary bytes either decode or raise MalformedEnvelope, nothing else."""
        try:
            decodeEnvelope(data)
        except MalformedEnvelope:
            pass

    @given(st.text(), st.text(), st.binary(), st.booleans(), st.floats(allow_nan=False))
    def test_anyEnvelope(
        self, sender: str, node: str, payload: bytes, isBinary: bool, time: float
    ) -> None:
        """Every binary envelope, and every text one with a UTF-8 payload, round-trips."""
        if not isBinary:
            payload = payload.decode("utf-8", "replace").encode("utf-8")
        e = Envelope(Message(sender, payload, isBinary), node, time)
        self.assertEqual(decodeEnvelope(encodeEnvelope(e)), e)


class ParseRedisURLTests(SynchronousTestCase):
    def test_parsed(self) -> None:
        """Host, port, database, user and percent-encoded password come from the URL."""
        cases = {
            "redis://localhost": RedisAddress("localhost"),
            "redis://10.0.0.5:6380/": RedisAddress("10.0.0.5", 6380),
            "redis://h:1/3": RedisAddress("h", 1, 3),
            "redis://:s%40cret@h:2/0": RedisAddress("h", 2, 0, None, "s@cret"),
            "redis://secret@h": RedisAddress("h", password="secret"),
            "redis://me:pw@h/1": RedisAddress("h", 6379, 1, "me", "pw"),
            "redis://[::1]:7000/2": RedisAddress("::1", 7000, 2),
        }
        for url, expected in cases.items():
            with self.subTest(url=url):
                self.assertEqual(parseRedisURL(url), expected)

    def test_refused(self) -> None:
        """URLs that do not say where Redis is are refused with a reason."""
        for url in [
            "localhost:6379",
            "rediss://h",
            "http://h",
            "redis://",
            "redis://h:99999",
            "redis://h:port",
            "redis://h/db",
            "redis://h/-1",
            "redis://h/1?x=1",
        ]:
            with self.subTest(url=url):
                self.assertRaises(ValueError, parseRedisURL, url)

    def test_passwordNotShown(self) -> None:
        """The address as logged never contains the password."""
        text = str(parseRedisURL("redis://me:hunter2@h:1/2"))
        self.assertEqual(text, "redis://me:***@h:1/2")


class OptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """Without --redis there is no Redis, and the channel is 'wschat'."""
        options = Options()
        options.parseOptions([])
        self.assertIsNone(options["redis"])
        self.assertEqual(options["channel"], "wschat")

    def test_redis(self) -> None:
        """--redis and --channel are parsed into an address and a name."""
        options = Options()
        options.parseOptions(["--redis", "redis://:pw@127.0.0.1:7000/1", "--channel", "lobby"])
        self.assertEqual(options["redis"], RedisAddress("127.0.0.1", 7000, 1, None, "pw"))
        self.assertEqual(options["channel"], "lobby")

    def test_badRedis(self) -> None:
        """A malformed --redis URL or an empty --channel is a usage error."""
        for args in (["--redis", "localhost:6379"], ["--channel", ""]):
            with self.subTest(args=args):
                self.assertRaises(usage.UsageError, Options().parseOptions, args)

    def test_serviceWithoutRedis(self) -> None:
        """The default daemon relays through a LocalBus and runs no Redis service."""
        options = Options()
        options.parseOptions([])
        daemon = buildServer(options)
        self.assertIsInstance(daemon.bus, LocalBus)
        self.assertFalse([s for s in daemon if isinstance(s, RedisBus)])

    def test_serviceWithRedis(self) -> None:
        """With --redis the server's bus is a RedisBus, started and stopped with the daemon."""
        options = Options()
        options.parseOptions(["--redis", "redis://h:1", "--channel", "c"])
        daemon = buildServer(options)
        bus = daemon.bus
        assert isinstance(bus, RedisBus)
        self.assertIn(bus, list(daemon))
        self.assertIs(bus.room, daemon.room)
        self.assertEqual((bus.address, bus.channel), (RedisAddress("h", 1), "c"))


#: Builds the daemon from the command line ARGS and prints which Redis modules it loaded.
LOADED_SCRIPT = """
import sys
from wschat.tap import Options, buildServer
options = Options()
options.parseOptions(sys.argv[1:])
buildServer(options)
print(sorted(m for m in ("txredisapi", "msgpack", "wschat.redisbus") if m in sys.modules))
"""


class RedisExtraTests(SynchronousTestCase):
    """The Redis client is the ``redis`` extra: loaded for --redis only, asked for if missing."""

    def loaded(self, *args: str) -> str:
        # A fresh interpreter, outside the checkout, so that it imports the installed package.
        cwd = self.mktemp()
        os.makedirs(cwd)
        result = subprocess.run(
            [sys.executable, "-c", LOADED_SCRIPT, "--port", "0", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout.strip()

    def test_singleDaemonLoadsNoRedisClient(self) -> None:
        """A daemon without --redis imports neither txredisapi nor msgpack."""
        self.assertEqual(self.loaded(), "[]")

    def test_redisLoadsTheClient(self) -> None:
        """With --redis the Redis bus, its client and the envelope codec are loaded."""
        self.assertEqual(
            self.loaded("--redis", "redis://h"), "['msgpack', 'txredisapi', 'wschat.redisbus']"
        )

    def test_redisWithoutTheExtra(self) -> None:
        """--redis without the Redis client installed is a one-line usage error saying how."""
        with mock.patch.dict(sys.modules, {"txredisapi": None}):
            sys.modules.pop("wschat.redisbus", None)
            with self.assertRaises(usage.UsageError) as caught:
                Options().parseOptions(["--redis", "redis://h"])
        message = str(caught.exception)
        self.assertEqual(
            message,
            "--redis needs the Redis client (txredisapi is not installed): "
            "pip install 'wschat[redis]'",
        )
        self.assertNotIn("\n", message)

    def test_noRedisNeedsNoExtra(self) -> None:
        """Without --redis, a missing Redis client does not matter."""
        with mock.patch.dict(sys.modules, {"txredisapi": None}):
            sys.modules.pop("wschat.redisbus", None)
            options = Options()
            options.parseOptions([])
            self.assertIsInstance(buildServer(options).bus, LocalBus)


class FakeOrigin:
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def refused(self, reason: str) -> None:
        self.reasons.append(reason)


class FakeMember:
    def __init__(self) -> None:
        self.frames: list[object] = []

    def deliver(self, frame: object) -> None:
        self.frames.append(frame)


def roomWithMembers(fmt: Format = Format.PREFIXED) -> tuple[Room, list[tuple[bytes, bool]]]:
    prepared: list[tuple[bytes, bool]] = []

    def prepare(payload: bytes, isBinary: bool) -> object:
        prepared.append((payload, isBinary))
        return (payload, isBinary)

    room = Room(prepare, fmt)  # type: ignore[arg-type]
    for _ in range(3):
        room.join(FakeMember())
    return room, prepared


class RedisBusOfflineTests(SynchronousTestCase):
    """RedisBus logic that needs no Redis: refusing, and relaying what the channel carries."""

    def bus(self, fmt: Format = Format.PREFIXED) -> tuple[RedisBus, list[tuple[bytes, bool]]]:
        room, prepared = roomWithMembers(fmt)
        return RedisBus(room, RedisAddress("h"), reactor=MemoryReactorClock()), prepared

    def test_refusedWhileDown(self) -> None:
        """Before Redis is reached a message is refused, counted, and not relayed."""
        bus, prepared = self.bus()
        origin = FakeOrigin()
        self.assertFalse(bus.available)
        bus.publish(Message("127.0.0.1:1", b"hi"), origin)
        self.assertEqual((origin.reasons, bus.refused, bus.published), ([REFUSED_DOWN], 1, 0))
        self.assertEqual(prepared, [])

    def test_backoff(self) -> None:
        """Reconnecting waits 0.1 s, then e times longer per failed attempt, at most 10 s."""
        bus, _ = self.bus()
        factory = _BusFactory(bus, _PublisherProtocol)
        factory.jitter = 0
        delays = [round(factory.retryDelay(attempt), 2) for attempt in range(1, 9)]
        self.assertEqual(delays, [0.1, 0.27, 0.74, 2.01, 5.46, 10, 10, 10])

    def test_relayedOnceFramed(self) -> None:
        """An envelope from the channel is framed once for all members, sender prefixed."""
        bus, prepared = self.bus()
        bus.relayEnvelope(envelope(b"hello"))
        self.assertEqual(prepared, [(b"127.0.0.1:5000: hello", False)])
        self.assertEqual(bus.received, 1)
        for member in bus.room:
            self.assertEqual(member.frames, [(b"127.0.0.1:5000: hello", False)])  # type: ignore[attr-defined]

    def test_malformedSkipped(self) -> None:
        """A malformed envelope is counted and skipped; the next one is relayed."""
        bus, prepared = self.bus()
        bus.relayEnvelope(b"garbage")
        bus.relayEnvelope(envelope(b"after"))
        self.assertEqual((bus.malformed, bus.received), (1, 1))
        self.assertEqual(prepared, [(b"127.0.0.1:5000: after", False)])
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_binaryInPrefixedRoom(self) -> None:
        """A prefixed room skips binary envelopes (from a raw daemon); a raw room relays them."""
        bus, prepared = self.bus(Format.PREFIXED)
        bus.relayEnvelope(envelope(b"\x00\x01", True))
        self.assertEqual((prepared, bus.malformed), ([], 1))
        bus, prepared = self.bus(Format.RAW)
        bus.relayEnvelope(envelope(b"\x00\x01", True))
        self.assertEqual(prepared, [(b"\x00\x01", True)])

    def test_jsonTimeIsTheSendersDaemons(self) -> None:
        """JSON members see a relayed message stamped with the time its envelope carries."""
        bus, prepared = self.bus()
        bus.room.join(FakeMember(), Format.JSON)
        bus.relayEnvelope(envelope(b"hi"))
        stamped = [json.loads(p) for p, _ in prepared if p.startswith(b"{")]
        self.assertEqual([o["time"] for o in stamped], [isoTime(1700000000.25)])

    def test_roomFailureContained(self) -> None:
        """A failing broadcast is logged; the bus goes on relaying."""
        bus, prepared = self.bus()
        calls: list[Message] = []

        def broken(
            message: Message, when: float | None = None, position: Position | None = None
        ) -> None:
            calls.append(message)
            raise RuntimeError("bug")

        bus.room.broadcast = broken  # type: ignore[method-assign]
        bus.relayEnvelope(envelope(b"one"))
        bus.relayEnvelope(envelope(b"two"))
        self.assertEqual([m.payload for m in calls], [b"one", b"two"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)


class RefusalNoticeTests(SynchronousTestCase):
    def test_notice(self) -> None:
        """A refused sender gets 'wschat: <reason>' as text and stays connected."""
        chat = ChatServer(welcome="")
        chat.bus = RedisBus(chat.room, RedisAddress("h"), reactor=MemoryReactorClock())
        clientFactory = QueueClientFactory("ws://127.0.0.1:2000")
        server, client, pump = memoryConnection(chat.factory, clientFactory)
        pump.flush()
        client.sendText("hello")
        pump.flush()
        self.assertEqual(client.messages.pending, [(f"wschat: {REFUSED_DOWN}".encode(), False)])
        self.assertEqual(chat.bus.refused, 1)
        self.assertEqual(server.state, server.STATE_OPEN)

    def test_json_notice_and_metric(self) -> None:
        """A refused JSON client gets a 'notice' object, and the refusal is counted in metrics."""
        chat = ChatServer(welcome="", reactor=MemoryReactorClock())
        chat.bus = RedisBus(chat.room, RedisAddress("h"), reactor=MemoryReactorClock())
        clientFactory = QueueClientFactory("ws://127.0.0.1:2000", protocols=["wschat.json"])
        server, client, pump = memoryConnection(chat.factory, clientFactory)
        pump.flush()
        client.messages.pending.clear()  # the welcome object
        client.sendText("hello")
        pump.flush()
        ((payload, isBinary),) = client.messages.pending
        self.assertEqual(
            json.loads(payload), {"type": "notice", "text": REFUSED_DOWN, "time": isoTime(0)}
        )
        refused = chat.metrics.registry.get_sample_value(
            "wschat_messages_refused_total", {"reason": "relay unavailable"}
        )
        self.assertEqual(refused, 1)
