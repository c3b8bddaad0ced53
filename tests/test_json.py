"""The wschat.json subprotocol: what JSON clients receive, beside plain clients in one room."""

from __future__ import annotations

import base64
import json
import os
import re

import pytest
import pytest_twisted
from autobahn.websocket.protocol import PreparedMessage
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from wschat.metrics import Metrics
from wschat.room import Room
from wschat.server import ChatServer
from wschat.testing import QueueClientFactory, closeAll, connect, memoryConnection
from wschat.wire import (
    JSON_SUBPROTOCOL,
    Format,
    Message,
    isoTime,
    jsonMessage,
    jsonPresence,
    jsonWelcome,
)

WELCOME = "Welcome to chat! Type a message"
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


async def nextObject(client) -> dict:
    return json.loads(await client.nextText())


async def connectJSON(url: str):
    return await connect(url, protocols=[JSON_SUBPROTOCOL])


class WireTests(SynchronousTestCase):
    """The JSON objects, byte for byte."""

    def test_isoTime(self):
        """Times are ISO 8601 UTC with milliseconds and a Z."""
        self.assertEqual(isoTime(0), "1970-01-01T00:00:00.000Z")
        self.assertEqual(isoTime(1700000000.25), "2023-11-14T22:13:20.250Z")

    def test_message(self):
        """A text message carries type, from, text and time, in that order, as UTF-8 JSON."""
        payload = jsonMessage(Message("127.0.0.1:5", "héllo <b>".encode()), 0)
        self.assertEqual(
            payload,
            '{"type":"message","from":"127.0.0.1:5","text":"héllo <b>",'
            '"time":"1970-01-01T00:00:00.000Z"}'.encode(),
        )

    def test_binaryMessage(self):
        """A binary message carries its bytes as base64 in data, and no text."""
        obj = json.loads(jsonMessage(Message("[::1]:7", b"\x00\xff", isBinary=True), 0))
        self.assertEqual(obj["data"], "AP8=")
        self.assertNotIn("text", obj)

    def test_welcomeAndPresence(self):
        """welcome says who you are and how many are online; join/leave say who and how many."""
        self.assertEqual(
            json.loads(jsonWelcome("127.0.0.1:9", 3, "hi", 0)),
            {
                "type": "welcome",
                "you": "127.0.0.1:9",
                "online": 3,
                "text": "hi",
                "time": "1970-01-01T00:00:00.000Z",
            },
        )
        self.assertEqual(
            json.loads(jsonPresence("leave", "127.0.0.1:9", 2, 0)),
            {"type": "leave", "who": "127.0.0.1:9", "online": 2, "time": isoTime(0)},
        )


class Recorder:
    """A room member that keeps what it is given."""

    def __init__(self) -> None:
        self.frames: list[PreparedMessage] = []

    def deliver(self, frame: PreparedMessage) -> None:
        self.frames.append(frame)


class RoomFormatTests(SynchronousTestCase):
    """One broadcast frames each format present once, never once per member."""

    def setUp(self):
        self.prepared: list[tuple[bytes, bool]] = []

        def prepare(payload: bytes, isBinary: bool) -> PreparedMessage:
            self.prepared.append((payload, isBinary))
            return PreparedMessage(payload, isBinary, False, False)

        self.room = Room(prepare, Format.PREFIXED, metrics=Metrics(), now=lambda: 0.0)

    def test_oneFramePerFormat(self):
        """Three plain and two JSON members: two frames built, each member gets its format's."""
        plain = [Recorder() for _ in range(3)]
        js = [Recorder() for _ in range(2)]
        for m in plain:
            self.room.join(m)
        for m in js:
            self.room.join(m, Format.JSON)
        self.room.broadcast(Message("1.2.3.4:5", b"hi"))
        self.assertEqual(
            self.prepared,
            [(b"1.2.3.4:5: hi", False), (jsonMessage(Message("1.2.3.4:5", b"hi"), 0), False)],
        )
        for m in plain:
            self.assertEqual([f.payload for f in m.frames], [b"1.2.3.4:5: hi"])
        for m in js:
            self.assertEqual(json.loads(m.frames[0].payload)["text"], "hi")

    def test_noJSONWithoutJSONMembers(self):
        """With only plain members no JSON is built, and announcements build nothing."""
        self.room.join(Recorder())
        self.room.broadcast(Message("a", b"x"))
        self.room.announce("join", "b")
        self.assertEqual(self.prepared, [(b"a: x", False)])

    def test_announceSkipsExcluded(self):
        """An announcement reaches the JSON members but the one excluded, and no plain member."""
        plain, joiner, other = Recorder(), Recorder(), Recorder()
        self.room.join(plain)
        self.room.join(other, Format.JSON)
        self.room.join(joiner, Format.JSON)
        self.room.announce("join", "10.0.0.1:1", exclude=joiner)
        self.assertEqual(plain.frames, [])
        self.assertEqual(joiner.frames, [])
        self.assertEqual(
            [json.loads(f.payload) for f in other.frames],
            [{"type": "join", "who": "10.0.0.1:1", "online": 3, "time": isoTime(0)}],
        )

    def test_leaveAndMembership(self):
        """leave says whether the member was in the room; the count follows every group."""
        a, b = Recorder(), Recorder()
        self.room.join(a)
        self.room.join(b, Format.JSON)
        self.assertEqual((len(self.room), a in self.room, b in self.room), (2, True, True))
        self.assertTrue(self.room.leave(b))
        self.assertFalse(self.room.leave(b))
        self.assertEqual((len(self.room), list(self.room)), (1, [a]))


class MemoryJSONTests(SynchronousTestCase):
    """The real protocol in memory, with the time under test's control."""

    def test_welcomeStampedWithReactorTime(self):
        """A JSON client's welcome is stamped with the server's reactor time."""
        clock = MemoryReactorClock()
        clock.advance(1700000000.5)
        chat = ChatServer(reactor=clock)
        assert chat.history is not None
        client = QueueClientFactory("ws://127.0.0.1:2000", protocols=[JSON_SUBPROTOCOL])
        _, proto, pump = memoryConnection(
            chat.factory, client, peer=IPv4Address("TCP", "192.0.2.7", 40000)
        )
        pump.flush()
        payload, isBinary = self.successResultOf(proto.messages.get())
        self.assertFalse(isBinary)
        self.assertEqual(
            json.loads(payload),
            {
                "type": "welcome",
                "you": "192.0.2.7:40000",
                "online": 1,
                "text": WELCOME,
                "time": "2023-11-14T22:13:20.500Z",
                "maxMessageSize": 65536,
                "format": "prefixed",
                "epoch": chat.history.epoch,
                "seq": 0,
            },
        )


@pytest_twisted.ensureDeferred
async def test_json_client_negotiates_and_gets_welcome(daemon):
    """Offering wschat.json selects it; the welcome names the client and counts who is online."""
    service, url = daemon()
    plain = await connect(url)
    assert await plain.nextText() == WELCOME
    js = await connectJSON(url)
    assert js.websocket_protocol_in_use == JSON_SUBPROTOCOL
    welcome = await nextObject(js)
    assert ISO.match(welcome.pop("time"))
    assert re.fullmatch("[0-9a-f]{16}", welcome.pop("epoch"))
    assert welcome == {
        "type": "welcome",
        "you": js.address,
        "online": 2,
        "text": WELCOME,
        "maxMessageSize": 65536,
        "format": "prefixed",
        "seq": 0,
    }


@pytest_twisted.ensureDeferred
async def test_json_welcome_names_the_rooms_format_under_a_small_limit(daemon):
    """The welcome says the room's format; it arrives even when longer than the message limit
    (which bounds what clients send), as do notices and duplicate answers."""
    service, url = daemon("--format", "raw", "--max-message-size", "60")
    js = await connectJSON(url)
    welcome = await nextObject(js)
    assert (welcome["type"], welcome["format"], welcome["maxMessageSize"]) == ("welcome", "raw", 60)
    assert len(json.dumps(welcome)) > 60
    js.sendText('{"type":"send","text":"a","id":"x"}')
    assert (await nextObject(js))["id"] == "x"
    js.sendText('{"type":"send","text":"a","id":"x"}')
    assert (await nextObject(js))["type"] == "duplicate"
    js.sendText('{"type":"nonsense"}')
    assert (await nextObject(js))["text"] == 'unknown command type "nonsense": nothing relayed'
    js.sendClose()
    await js.closed


@pytest_twisted.ensureDeferred
async def test_json_welcome_sent_even_without_greeting(daemon):
    """With --welcome '' a JSON client still gets its welcome object, with empty text."""
    service, url = daemon("--welcome", "")
    js = await connectJSON(url)
    welcome = await nextObject(js)
    assert (welcome["type"], welcome["text"], welcome["online"]) == ("welcome", "", 1)


@pytest_twisted.ensureDeferred
async def test_plain_and_json_clients_share_messages(daemon):
    """Plain clients get exactly the prefixed text; JSON clients get message objects."""
    service, url = daemon()
    js = await connectJSON(url)
    await nextObject(js)
    plain = await connect(url)
    assert await plain.nextText() == WELCOME
    assert (await nextObject(js))["type"] == "join"

    plain.sendText("hi <b>there</b>")
    assert await plain.nextText() == f"{plain.address}: hi <b>there</b>"
    message = await nextObject(js)
    assert ISO.match(message.pop("time"))
    assert message.pop("epoch") == service.history.epoch
    assert message == {
        "type": "message",
        "from": plain.address,
        "text": "hi <b>there</b>",
        "seq": 1,
    }

    js.sendText("from json")
    assert await plain.nextText() == f"{js.address}: from json"
    assert (await nextObject(js))["from"] == js.address


@pytest_twisted.ensureDeferred
async def test_join_and_leave_reach_json_clients_only(daemon):
    """JSON clients hear who joins and leaves, with the new count; plain clients hear nothing."""
    service, url = daemon()
    js = await connectJSON(url)
    await nextObject(js)
    plain = await connect(url)
    assert await plain.nextText() == WELCOME
    joined = await nextObject(js)
    assert (joined["type"], joined["who"], joined["online"]) == ("join", plain.address, 2)

    other = await connectJSON(url)
    assert (await nextObject(other))["online"] == 3
    assert (await nextObject(js))["who"] == other.address
    otherAddress = other.address
    other.sendClose(1000)
    await other.closed
    left = await nextObject(js)
    assert (left["type"], left["who"], left["online"]) == ("leave", otherAddress, 2)

    # The plain client's next message is a relayed one: no event came before it.
    js.sendText("after")
    assert await plain.nextText() == f"{js.address}: after"


@pytest_twisted.ensureDeferred
async def test_raw_binary_reaches_json_clients_as_base64(daemon):
    """In raw format a binary message goes unchanged to plain clients, as base64 to JSON ones."""
    service, url = daemon("--format", "raw")
    js = await connectJSON(url)
    await nextObject(js)
    raw = await connect(url)
    await raw.messages.get()
    await nextObject(js)
    raw.sendMessage(b"\x00\x01\xfe\xff", isBinary=True)
    assert await raw.messages.get() == (b"\x00\x01\xfe\xff", True)
    message = await nextObject(js)
    assert base64.b64decode(message["data"]) == b"\x00\x01\xfe\xff"
    assert "text" not in message


@pytest_twisted.ensureDeferred
async def test_other_subprotocols_are_not_selected(daemon):
    """Only wschat.json is ever selected: other offers get the plain format, no subprotocol."""
    service, url = daemon()
    other = await connect(url, protocols=["chat.v9"])
    assert other.websocket_protocol_in_use is None
    assert await other.nextText() == WELCOME
    both = await connect(url, protocols=["chat.v9", JSON_SUBPROTOCOL])
    assert both.websocket_protocol_in_use == JSON_SUBPROTOCOL
    assert (await nextObject(both))["type"] == "welcome"


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "deflate"])
@pytest_twisted.ensureDeferred
async def test_max_message_size_bounds_what_clients_send_not_what_the_server_sends(
    daemon, compress
):
    """
    Under a --max-message-size smaller than the server's own messages (compressed or not), a
    JSON client gets its welcome, relayed messages, its duplicate and its notice; a plain one
    its greeting.
    """
    # Random text: it stays over the limit compressed too.
    welcome = base64.b64encode(os.urandom(90)).decode()
    shout = base64.b64encode(os.urandom(75)).decode()
    extra = ["--compression"] if compress else []
    service, url = daemon("--max-message-size", "100", "--welcome", welcome, *extra)

    async def chat() -> None:
        js = await connect(url, protocols=[JSON_SUBPROTOCOL], offerDeflate=compress)
        assert bool(js.websocket_extensions_in_use) is compress
        hello = await nextObject(js)
        assert (hello["type"], hello["text"], hello["maxMessageSize"]) == ("welcome", welcome, 100)
        plain = await connect(url)
        assert await plain.nextText() == welcome
        assert (await nextObject(js))["type"] == "join"

        send = json.dumps({"type": "send", "text": "hi", "id": "a1"})
        js.sendText(send)
        relayed = await nextObject(js)
        assert (relayed["type"], relayed["text"], relayed["id"]) == ("message", "hi", "a1")
        assert await plain.nextText() == f"{js.address}: hi"
        js.sendText(send)
        assert (await nextObject(js))["type"] == "duplicate"
        js.sendText('{"type": "shout"}')
        notice = await nextObject(js)
        assert (notice["type"], notice["text"]) == (
            "notice",
            'unknown command type "shout": nothing relayed',
        )
        plain.sendText(shout)
        assert (await nextObject(js))["text"] == shout
        assert await plain.nextText() == f"{plain.address}: {shout}"
        await closeAll([js, plain])

    # Refused under the old limit, a message never came: fail, rather than wait for ever.
    await defer.ensureDeferred(chat()).addTimeout(20, reactor)
