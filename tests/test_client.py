"""The CLI client's logic in memory: queueing, backoff on a fake clock, end of input, options."""

from __future__ import annotations

import json
from typing import Any

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from wschat.client import (
    DEFAULT_MAX_MESSAGE_SIZE,
    MAX_MESSAGE_SIZE_HEADER,
    ChatClientFactory,
    ChatClientProtocol,
    ChatSession,
    Options,
    StdinLines,
)
from wschat.limits import Limits
from wschat.protocol import MAX_MESSAGE_SIZE_HEADER as SERVER_HEADER
from wschat.wire import JSON_SUBPROTOCOL


class FakeConnection:
    """Stands in for an open ChatClientProtocol."""

    state = WebSocketProtocol.STATE_OPEN
    maxMessageSize = DEFAULT_MAX_MESSAGE_SIZE

    def __init__(self, factory: ChatClientFactory) -> None:
        self.factory = factory
        self.sent: list[bytes] = []
        self.closes: list[int] = []

    def sendMessage(self, payload: bytes) -> None:
        self.sent.append(payload)

    def sendClose(self, code: int) -> None:
        self.closes.append(code)
        self.state = WebSocketProtocol.STATE_CLOSING


class FakeStdio:
    """Stands in for the stdio transport: records pauses, output and closing."""

    def __init__(self) -> None:
        self.paused = False
        self.written: list[bytes] = []
        self.lost = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def loseConnection(self) -> None:
        self.lost = True


class FakeInput:
    def __init__(self) -> None:
        self.transport = FakeStdio()


class FakeResponse:
    """Stands in for Autobahn's ConnectionResponse: its headers, names in lower case."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers


class FakeConnector:
    def __init__(self) -> None:
        self.attempts = 0

    def connect(self) -> None:
        self.attempts += 1


def makeSession(
    maxPending: int = 1000, **options: Any
) -> tuple[ChatSession, ChatClientFactory, list[str], Clock]:
    clock = Clock()
    status: list[str] = []
    session = ChatSession(clock, status.append, maxPending=maxPending, **options)
    factory = ChatClientFactory("ws://127.0.0.1:2000", session, reactor=clock)
    factory.jitter = 0
    return session, factory, status, clock


REFUSED = "connection to ws://127.0.0.1:2000 refused"


def refused() -> Failure:
    return Failure(ConnectionRefusedError())


class SessionTests(SynchronousTestCase):
    def test_lines_wait_for_a_connection_in_order(self) -> None:
        """Lines typed while disconnected are sent in order once connected."""
        session, factory, _, _ = makeSession()
        session.send("one")
        session.send("two")
        connection = FakeConnection(factory)
        session.connected(connection)  # type: ignore[arg-type]
        session.send("three")
        self.assertEqual(connection.sent, [b"one", b"two", b"three"])
        self.assertEqual(list(session.pending), [])

    def test_full_queue_pauses_input(self) -> None:
        """A full queue pauses standard input with a warning, and connecting resumes it."""
        session, factory, status, _ = makeSession(maxPending=2)
        stdin = FakeInput()
        session.attachInput(stdin)  # type: ignore[arg-type]
        session.send("one")
        self.assertFalse(stdin.transport.paused)
        session.send("two")
        self.assertTrue(stdin.transport.paused)
        self.assertIn("input paused", status[-1])
        connection = FakeConnection(factory)
        session.connected(connection)  # type: ignore[arg-type]
        self.assertFalse(stdin.transport.paused)
        self.assertEqual(connection.sent, [b"one", b"two"])

    def test_room_messages_go_to_output(self) -> None:
        """What the room says is written to standard output, one message per line."""
        session, _, _, _ = makeSession()
        stdin = FakeInput()
        session.attachInput(stdin)  # type: ignore[arg-type]
        session.received(b"127.0.0.1:1: hi", False)
        session.received(b"\x00\x01", True)
        self.assertEqual(stdin.transport.written, [b"127.0.0.1:1: hi\n", b"<2 bytes binary>\n"])

    def test_control_characters_escaped(self) -> None:
        """A message with LF, CR and ESC is printed as one line with them escaped."""
        session, _, _, _ = makeSession()
        stdin = FakeInput()
        session.attachInput(stdin)  # type: ignore[arg-type]
        session.received(b"1.2.3.4:5: hello\n127.0.0.1:1: I am the admin\r\x1b[31m", False)
        self.assertEqual(
            stdin.transport.written,
            [b"1.2.3.4:5: hello\\n127.0.0.1:1: I am the admin\\r\\x1b[31m\n"],
        )

    def test_raw_output(self) -> None:
        """With rawOutput the message's exact bytes are printed."""
        session, _, _, _ = makeSession(rawOutput=True)
        stdin = FakeInput()
        session.attachInput(stdin)  # type: ignore[arg-type]
        session.received(b"a\\b\r\x1b", False)
        session.received(b"\x00", True)
        self.assertEqual(stdin.transport.written, [b"a\\b\r\x1b\n", b"<1 byte binary>\n"])

    def test_notice_goes_to_status(self) -> None:
        """The daemon's ``wschat: `` notice is a status line, not output, and means exit 3."""
        session, factory, status, _ = makeSession()
        stdin = FakeInput()
        session.attachInput(stdin)  # type: ignore[arg-type]
        session.received(b"wschat: message not delivered: bus down\x1b", False)
        self.assertEqual(stdin.transport.written, [])
        self.assertEqual(status, ["message not delivered: bus down\\x1b"])
        session.finish(0)
        self.assertEqual(session.exitCode, 3)

    def test_line_over_the_connections_limit_refused(self) -> None:
        """A line longer than the room's limit is reported and skipped; the next one is sent."""
        session, factory, status, _ = makeSession()
        connection = FakeConnection(factory)
        connection.maxMessageSize = 5
        session.connected(connection)  # type: ignore[arg-type]
        session.send("short")
        session.send("toolong")
        session.send("ok")
        self.assertEqual(connection.sent, [b"short", b"ok"])
        self.assertEqual(status[-1], "line of 7 bytes not sent: the room accepts at most 5 bytes")
        session.inputEnded()
        session.disconnected(connection, 1000, None)  # type: ignore[arg-type]
        self.assertEqual(session.exitCode, 3)
        self.assertEqual(status[-1], "1 line not sent or not delivered")

    def test_limit_read_from_handshake(self) -> None:
        """The client takes the room's limit from the handshake header, else the default."""
        self.assertEqual(MAX_MESSAGE_SIZE_HEADER, SERVER_HEADER.lower())
        self.assertEqual(DEFAULT_MAX_MESSAGE_SIZE, Limits().maxMessageSize)
        for headers, expected in (
            ({MAX_MESSAGE_SIZE_HEADER: "100"}, 100),
            ({}, DEFAULT_MAX_MESSAGE_SIZE),
            ({MAX_MESSAGE_SIZE_HEADER: "nonsense"}, DEFAULT_MAX_MESSAGE_SIZE),
        ):
            protocol = ChatClientProtocol()
            protocol.onConnect(FakeResponse(headers))  # type: ignore[arg-type]
            self.assertEqual(protocol.maxMessageSize, expected)

    def test_close_code_reported_and_error_codes_mean_exit_3(self) -> None:
        """Every close code the room sends is reported; one other than 1000/1001 means exit 3."""
        session, factory, status, _ = makeSession()
        connection = FakeConnection(factory)
        session.connected(connection)  # type: ignore[arg-type]
        session.disconnected(connection, 1001, "going away")  # type: ignore[arg-type]
        self.assertEqual(status[-1], "closed with code 1001: going away")
        self.assertEqual(session.notDelivered, 0)
        session.connected(connection)  # type: ignore[arg-type]
        session.disconnected(connection, 1009, "too big\r")  # type: ignore[arg-type]
        self.assertEqual(status[-1], "closed with code 1009: too big\\r")
        session.finish(0)
        self.assertEqual(session.exitCode, 3)

    def test_lost_with_lines_unconfirmed_means_exit_3(self) -> None:
        """A connection lost without a closing handshake after lines were sent: exit 3."""
        session, factory, status, _ = makeSession()
        connection = FakeConnection(factory)
        session.connected(connection)  # type: ignore[arg-type]
        session.disconnected(connection, 1006, None)  # type: ignore[arg-type]
        self.assertEqual(session.notDelivered, 0)
        session.connected(connection)  # type: ignore[arg-type]
        session.send("maybe lost")
        session.disconnected(connection, 1006, None)  # type: ignore[arg-type]
        self.assertEqual(session.notDelivered, 1)
        self.assertIn("before the room confirmed", status[-1])

    def test_listen_only_ignores_input(self) -> None:
        """Listen-only: standard input is paused at once, and its end does not end the session."""
        session, factory, _, _ = makeSession(listenOnly=True)
        stdin = FakeInput()
        session.attachInput(stdin)  # type: ignore[arg-type]
        self.assertTrue(stdin.transport.paused)
        session.inputEnded()
        connection = FakeConnection(factory)
        session.connected(connection)  # type: ignore[arg-type]
        self.assertTrue(stdin.transport.paused)
        self.assertEqual(connection.closes, [])
        self.assertNoResult(session.done)
        self.assertTrue(factory.continueTrying)

    def test_end_of_input_while_connected(self) -> None:
        """End of input closes with 1000, stops retrying, and exits 0 once closed."""
        session, factory, _, _ = makeSession()
        stdin = FakeInput()
        session.attachInput(stdin)  # type: ignore[arg-type]
        connection = FakeConnection(factory)
        session.connected(connection)  # type: ignore[arg-type]
        session.inputEnded()
        self.assertEqual(connection.closes, [1000])
        self.assertFalse(factory.continueTrying)
        session.disconnected(connection, 1000, None)  # type: ignore[arg-type]
        self.assertTrue(stdin.transport.lost)
        session.outputClosed()
        self.successResultOf(session.done)
        self.assertEqual(session.exitCode, 0)

    def test_end_of_input_with_lines_pending(self) -> None:
        """End of input while disconnected waits to connect, sends, then closes."""
        session, factory, _, _ = makeSession()
        session.send("last words")
        session.inputEnded()
        self.assertNoResult(session.done)
        connection = FakeConnection(factory)
        session.connected(connection)  # type: ignore[arg-type]
        self.assertEqual(connection.sent, [b"last words"])
        self.assertEqual(connection.closes, [1000])

    def test_end_of_input_with_nothing_to_send(self) -> None:
        """End of input with nothing pending and no connection exits 0 at once."""
        session, _, _, _ = makeSession()
        session.inputEnded()
        self.successResultOf(session.done)
        self.assertEqual(session.exitCode, 0)

    def test_ctrl_c_closes_cleanly(self) -> None:
        """Shutting down closes an open connection with 1000 and waits for it, within a bound."""
        session, factory, _, clock = makeSession()
        connection = FakeConnection(factory)
        session.connected(connection)  # type: ignore[arg-type]
        closed = session.close()
        self.assertEqual(connection.closes, [1000])
        self.assertNoResult(closed)
        clock.advance(10)
        self.successResultOf(closed)

    def test_ctrl_c_while_disconnected(self) -> None:
        """Shutting down while disconnected stops retrying and does not wait."""
        session, factory, _, _ = makeSession()
        self.successResultOf(session.close())
        self.assertFalse(factory.continueTrying)


class FakeJSONConnection(FakeConnection):
    """An open connection that negotiated wschat.json."""

    websocket_protocol_in_use = JSON_SUBPROTOCOL


EPOCH = "0123456789abcdef"


def obj(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def welcome(seq: int | None = 0, epoch: str = EPOCH, **fields: Any) -> bytes:
    position = {"epoch": epoch, "seq": seq} if seq is not None else {}
    defaults = {
        "you": "127.0.0.1:9",
        "online": 1,
        "text": "",
        "format": "prefixed",
        "maxMessageSize": DEFAULT_MAX_MESSAGE_SIZE,
    }
    return obj(type="welcome", **{**defaults, **position, **fields})


def message(seq: int | None, text: str, sender: str = "127.0.0.1:7", **fields: Any) -> bytes:
    position = {"epoch": fields.pop("epoch", EPOCH), "seq": seq} if seq is not None else {}
    return obj(type="message", **{"from": sender, "text": text, **position, **fields})


def sentCommands(connection: FakeConnection) -> list[dict[str, Any]]:
    return [json.loads(payload) for payload in connection.sent]


class ResumeTests(SynchronousTestCase):
    """The session over wschat.json: positions, no message twice, lines relayed once."""

    def connect(
        self, session: ChatSession, factory: ChatClientFactory, hello: bytes
    ) -> FakeJSONConnection:
        connection = FakeJSONConnection(factory)
        session.connected(connection)  # type: ignore[arg-type]
        session.received(hello, False)
        return connection

    def test_objects_printed_as_the_rooms_plain_lines(self) -> None:
        """Messages print as today's plain lines: prefixed or raw by the welcome's format,
        escaped, binary as its size; the greeting too; presence not at all."""
        for fmt, line in (("prefixed", rb"1.2.3.4:5: a\\b\x1b\n"), ("raw", rb"a\\b\x1b\n")):
            session, factory, _, _ = makeSession()
            stdin = FakeInput()
            session.attachInput(stdin)  # type: ignore[arg-type]
            self.connect(session, factory, welcome(format=fmt, text="hi\x1b"))
            session.received(message(1, "a\\b\x1b\n", "1.2.3.4:5"), False)
            session.received(obj(type="join", who="1.2.3.4:6", online=2), False)
            session.received(obj(type="message", **{"from": "x", "data": "AAE="}), False)
            self.assertEqual(
                stdin.transport.written, [b"hi\\x1b\n", line + b"\n", b"<2 bytes binary>\n"]
            )

    def test_resumes_from_the_last_message_shown_and_shows_none_twice(self) -> None:
        """After a drop the next URL asks since the last position shown; messages up to it
        are not shown again."""
        session, factory, _, _ = makeSession()
        stdin = FakeInput()
        session.attachInput(stdin)  # type: ignore[arg-type]
        self.assertEqual(session.query(), "")
        connection = self.connect(session, factory, welcome(0))
        for seq in (1, 2, 3):
            session.received(message(seq, f"m{seq}"), False)
        session.disconnected(connection, 1006, None)  # type: ignore[arg-type]
        self.assertEqual(session.query(), f"since={EPOCH}:3")
        self.connect(session, factory, welcome(5, recovered=True))
        for seq in (3, 4, 5):
            session.received(message(seq, f"m{seq}"), False)
        shown = [line.decode().split(": ")[1] for line in stdin.transport.written]
        self.assertEqual(shown, ["m1\n", "m2\n", "m3\n", "m4\n", "m5\n"])

    def test_unanswered_line_sent_again_after_the_replay_with_its_id(self) -> None:
        """A line whose copy had not come back when the connection dropped goes out again,
        with the same id, once the missed messages are in; a duplicate answer settles it."""
        session, factory, _, _ = makeSession()
        first = self.connect(session, factory, welcome(0))
        session.send("hello")
        (sent,) = sentCommands(first)
        self.assertEqual((sent["type"], sent["text"]), ("send", "hello"))
        session.disconnected(first, 1006, None)  # type: ignore[arg-type]
        second = self.connect(session, factory, welcome(2, recovered=True))
        session.send("typed meanwhile")
        self.assertEqual(second.sent, [])
        session.received(message(1, "other"), False)
        self.assertEqual(second.sent, [])
        session.received(message(2, "other"), False)
        again, meanwhile = sentCommands(second)
        self.assertEqual(again, sent)
        self.assertEqual(meanwhile["text"], "typed meanwhile")
        session.inputEnded()
        session.received(obj(type="duplicate", id=sent["id"], epoch=EPOCH, seq=1), False)
        self.assertEqual(second.closes, [])
        session.received(message(3, "typed meanwhile", id=meanwhile["id"]), False)
        self.assertEqual(second.closes, [1000])
        session.disconnected(second, 1000, None)  # type: ignore[arg-type]
        self.assertEqual(session.exitCode, 0)

    def test_line_in_the_replay_not_sent_again(self) -> None:
        """A line the replay shows relayed (its id came back) is not sent again."""
        session, factory, _, _ = makeSession()
        first = self.connect(session, factory, welcome(0))
        session.send("hello")
        (sent,) = sentCommands(first)
        session.disconnected(first, 1006, None)  # type: ignore[arg-type]
        second = self.connect(session, factory, welcome(1, recovered=True))
        session.received(message(1, "hello", "127.0.0.1:9", id=sent["id"]), False)
        self.assertEqual(second.sent, [])
        self.assertEqual(session.notDelivered, 0)

    def test_not_recovered_said_and_lines_sent_again_at_once(self) -> None:
        """recovered false: a status line says messages may have been missed; the new
        epoch's messages are all shown; unanswered lines go out again at once."""
        session, factory, status, _ = makeSession()
        first = self.connect(session, factory, welcome(0))
        session.received(message(1, "m1"), False)
        session.send("hello")
        session.disconnected(first, 1001, "server shutting down")  # type: ignore[arg-type]
        second = self.connect(session, factory, welcome(0, "fedcba9876543210", recovered=False))
        self.assertIn(
            "some messages may have been missed (the room's history has restarted)", status
        )
        self.assertEqual(sentCommands(second), sentCommands(first))
        self.assertEqual(session.query(), "since=fedcba9876543210:0")

    def test_room_without_history_lines_lost_are_counted(self) -> None:
        """A room keeping no history (no epoch): nothing to resume; a line unanswered at a
        drop is counted as not delivered, not sent again."""
        session, factory, status, _ = makeSession()
        first = self.connect(session, factory, welcome(None))
        session.send("hello")
        session.disconnected(first, 1006, None)  # type: ignore[arg-type]
        self.assertEqual(session.notDelivered, 1)
        self.assertIn("before the room confirmed 1 line", status[-1])
        self.assertEqual(session.query(), "")
        second = self.connect(session, factory, welcome(None))
        self.assertEqual(second.sent, [])

    def test_refusing_close_counts_every_unanswered_line(self) -> None:
        """A close over our lines (1008): each unanswered line is counted and none resent."""
        session, factory, _, _ = makeSession()
        first = self.connect(session, factory, welcome(0))
        for n in range(3):
            session.send(f"line {n}")
        ids = [command["id"] for command in sentCommands(first)]
        session.received(message(1, "line 0", "127.0.0.1:9", id=ids[0]), False)
        session.disconnected(first, 1008, "rate limit exceeded")  # type: ignore[arg-type]
        self.assertEqual(session.notDelivered, 2)
        second = self.connect(session, factory, welcome(1, recovered=True))
        self.assertEqual(second.sent, [])

    def test_notice_answers_the_oldest_line(self) -> None:
        """A notice counts as not delivered and settles the oldest unanswered line."""
        session, factory, status, _ = makeSession()
        connection = self.connect(session, factory, welcome(0))
        session.send("refused")
        session.inputEnded()
        self.assertEqual(connection.closes, [])
        session.received(obj(type="notice", text="not delivered\x1b"), False)
        self.assertEqual(status[-1], "not delivered\\x1b")
        self.assertEqual(connection.closes, [1000])
        session.disconnected(connection, 1000, None)  # type: ignore[arg-type]
        self.assertEqual(session.exitCode, 3)

    def test_history_asked_on_the_first_connection_only(self) -> None:
        """--history N asks history=N until a welcome came; the replayed messages show."""
        session, factory, _, _ = makeSession(history=3)
        stdin = FakeInput()
        session.attachInput(stdin)  # type: ignore[arg-type]
        self.assertEqual(session.query(), "history=3")
        connection = self.connect(session, factory, welcome(10))
        for seq in (8, 9, 10):
            session.received(message(seq, f"m{seq}"), False)
        self.assertEqual(len(stdin.transport.written), 3)
        session.disconnected(connection, 1006, None)  # type: ignore[arg-type]
        self.assertEqual(session.query(), f"since={EPOCH}:10")

    def test_history_refused_dropped(self) -> None:
        """A room that refuses the query (400 history is off): said, and not asked again."""
        session, factory, status, _ = makeSession(history=3)
        self.assertEqual(session.query(), "history=3")
        session.handshakeRefused(400, "history is off")
        self.assertEqual(status[-1], "the room refused the connection: 400 history is off")
        self.assertEqual(session.query(), "")

    def test_room_without_commands_gets_text(self) -> None:
        """A daemon whose welcome has no maxMessageSize knows no commands: lines go as text."""
        session, factory, _, _ = makeSession()
        hello = json.loads(welcome(None))
        del hello["maxMessageSize"]
        connection = self.connect(session, factory, json.dumps(hello).encode())
        session.send("hello")
        self.assertEqual(connection.sent, [b"hello"])
        session.received(message(None, "hello", "127.0.0.1:9"), False)
        session.inputEnded()
        self.assertEqual(connection.closes, [1000])

    def test_line_too_long_for_an_id_sent_as_text(self) -> None:
        """A line that fits the room's limit but not with a command around it is sent as its
        text, settled by its copy from us; one the room would read as a command is refused."""
        session, factory, status, _ = makeSession()
        connection = self.connect(session, factory, welcome(0))
        connection.maxMessageSize = 40
        session.send("x" * 40)
        session.send('{"type":"y","z":"' + "x" * 20 + '"}')
        self.assertEqual(connection.sent, [b"x" * 40])
        self.assertIn("as a command it takes", status[-1])
        session.received(message(1, "x" * 40, "127.0.0.1:9"), False)
        session.inputEnded()
        self.assertEqual(connection.closes, [1000])


class InputSession:
    """Stands in for the ChatSession behind StdinLines: records what the input gives it."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.statuses: list[str] = []
        self.ended = False

    def attachInput(self, lines: StdinLines) -> None:
        pass

    def send(self, text: str) -> None:
        self.lines.append(text)

    def status(self, text: str) -> None:
        self.statuses.append(text)

    def lineRefused(self, text: str) -> None:
        self.statuses.append(text)

    def inputEnded(self) -> None:
        self.ended = True


def stdinLines(session: InputSession, *chunks: bytes, end: bool = False) -> StdinLines:
    """Standard input with a 10-byte line limit, fed ``chunks`` (then closed if ``end``)."""
    lines = StdinLines(session)  # type: ignore[arg-type]
    lines.MAX_LENGTH = 10
    lines.makeConnection(StringTransport())
    for chunk in chunks:
        lines.dataReceived(chunk)
        assert len(lines._buffer) <= lines.MAX_LENGTH
    if end:
        lines.readConnectionLost()
    return lines


class StdinLinesTests(SynchronousTestCase):
    TOO_LONG = "input line longer than 10 bytes not sent"

    def test_lines_and_last_line_without_newline(self) -> None:
        """Lines end with LF or CRLF; at end of input an unfinished last line is still sent."""
        session = InputSession()
        stdinLines(session, b"one\r\ntw", b"o\nthree", end=True)
        self.assertEqual(session.lines, ["one", "two", "three"])
        self.assertTrue(session.ended)

    def test_long_line_skipped_lines_behind_it_read(self) -> None:
        """A line over the limit is skipped, the user told; the lines after it still go out."""
        session = InputSession()
        stdinLines(session, b"x" * 11 + b"\nok1\nok2\n")
        self.assertEqual(session.lines, ["ok1", "ok2"])
        self.assertEqual(session.statuses, [self.TOO_LONG])

    def test_long_line_in_pieces_skipped_once(self) -> None:
        """A long line arriving in pieces is not buffered past the limit and is reported once."""
        session = InputSession()
        stdinLines(session, b"x" * 6, b"x" * 6, b"x" * 6, b"x\nok\n")
        self.assertEqual(session.lines, ["ok"])
        self.assertEqual(session.statuses, [self.TOO_LONG])

    def test_long_last_line_not_sent_at_end(self) -> None:
        """An over-long line cut off by the end of input is not sent either."""
        session = InputSession()
        stdinLines(session, b"ok\n" + b"x" * 11, b"xx", end=True)
        self.assertEqual(session.lines, ["ok"])
        self.assertEqual(session.statuses, [self.TOO_LONG])
        self.assertTrue(session.ended)


class BackoffTests(SynchronousTestCase):
    def test_refused_is_reported_and_retried(self) -> None:
        """A refused connection is reported, and retried after a delay that grows."""
        session, factory, status, clock = makeSession()
        connector = FakeConnector()
        factory.clientConnectionFailed(connector, refused())  # type: ignore[arg-type]
        self.assertEqual(status[-1], "connection to ws://127.0.0.1:2000 refused; retrying in 1.0 s")
        clock.advance(0.99)
        self.assertEqual(connector.attempts, 0)
        clock.advance(0.01)
        self.assertEqual(connector.attempts, 1)
        factory.clientConnectionFailed(connector, refused())  # type: ignore[arg-type]
        self.assertIn("retrying in 2.7 s", status[-1])

    def test_successful_connect_resets_backoff(self) -> None:
        """Once a connection opens, the next drop retries after the initial delay again."""
        session, factory, status, clock = makeSession()
        connector = FakeConnector()
        for _ in range(3):
            factory.clientConnectionFailed(connector, refused())  # type: ignore[arg-type]
            clock.advance(60)
        protocol = factory.buildProtocol(None)
        protocol.onOpen = type(protocol).onOpen.__get__(protocol)
        session.connected = lambda connection: None  # type: ignore[method-assign]
        protocol.onOpen()
        factory.clientConnectionLost(connector, Failure(ConnectionError()))  # type: ignore[arg-type]
        self.assertEqual(status[-1], "connection to ws://127.0.0.1:2000 lost; retrying in 1.0 s")

    def test_max_retries(self) -> None:
        """With --max-retries N, the N+1th failure gives up with exit status 1."""
        session, factory, status, clock = makeSession()
        factory.maxRetries = 2
        connector = FakeConnector()
        for _ in range(3):
            factory.clientConnectionFailed(connector, refused())  # type: ignore[arg-type]
            clock.advance(60)
        self.assertEqual(connector.attempts, 2)
        self.assertIn("giving up after 2 retries", status[-1])
        self.successResultOf(session.done)
        self.assertEqual(session.exitCode, 1)

    def test_backoff_capped_at_10_seconds(self) -> None:
        """The retry delay grows to 10 s and no further, with jitter kept below the cap."""
        session, factory, status, clock = makeSession()
        connector = FakeConnector()
        for _ in range(12):
            factory.clientConnectionFailed(connector, refused())  # type: ignore[arg-type]
            clock.advance(60)
        self.assertEqual(
            status[-1], "connection to ws://127.0.0.1:2000 refused; retrying in 10.0 s"
        )
        factory.jitter = ChatClientFactory.jitter
        self.assertGreater(factory.jitter, 0)
        delays = set()
        for _ in range(20):
            factory.clientConnectionFailed(connector, refused())  # type: ignore[arg-type]
            (call,) = clock.getDelayedCalls()
            delay = call.getTime() - clock.seconds()
            delays.add(delay)
            self.assertTrue(status[-1].endswith(f"; retrying in {delay:.1f} s"), status[-1])
            clock.advance(60)
        self.assertLessEqual(max(delays), 10)
        self.assertGreater(len(delays), 1)

    def test_plurals(self) -> None:
        """One retry is 'after 1 retry'."""
        session, factory, status, clock = makeSession()
        factory.maxRetries = 1
        connector = FakeConnector()
        for _ in range(2):
            factory.clientConnectionFailed(connector, refused())  # type: ignore[arg-type]
            clock.advance(60)
        self.assertEqual(
            status[-1], "connection to ws://127.0.0.1:2000 refused; giving up after 1 retry"
        )

    def test_twisted_does_not_log_retries(self) -> None:
        """The factory is not noisy: Twisted adds no retry lines of its own."""
        self.assertFalse(ChatClientFactory.noisy)

    def test_other_failures_are_named(self) -> None:
        """A failure other than refusal is reported with its own message."""
        session, factory, status, clock = makeSession()
        factory.clientConnectionFailed(FakeConnector(), Failure(OSError("no route")))  # type: ignore[arg-type]
        self.assertIn("could not connect to ws://127.0.0.1:2000: no route", status[-1])


def parse(*args: str) -> dict[str, Any]:
    options = Options()
    options.parseOptions(list(args))
    return dict(options)


class OptionsTests(SynchronousTestCase):
    def test_default_url(self) -> None:
        """Without options the client goes to ws://127.0.0.1:2000."""
        self.assertEqual(parse()["url"], "ws://127.0.0.1:2000")

    def test_port_shortcut(self) -> None:
        """--port N means ws://127.0.0.1:N."""
        self.assertEqual(parse("--port", "8080")["url"], "ws://127.0.0.1:8080")

    def test_wss(self) -> None:
        """A wss:// URL is secure and keeps its host for certificate checks."""
        options = parse("--url", "wss://chat.example.com/room")
        self.assertEqual((options["secure"], options["host"]), (True, "chat.example.com"))

    def test_errors(self) -> None:
        """Bad URLs, ports and counts are usage errors naming the option and what it takes."""
        for args, message in (
            (["--url", "http://x"], "--url takes a ws:// or wss:// URL, not 'http://x'"),
            (["--url", "ws://x", "--port", "1"], "give --url or --port, not both"),
            (["--port", "0"], "--port takes a whole number from 1 to 65535, not '0'"),
            (["--port", "abc"], "--port takes a whole number from 1 to 65535, not 'abc'"),
            (["--max-retries", "-1"], "--max-retries takes a whole number of 0 or more, not '-1'"),
            (["--queue-size", "0"], "--queue-size takes a whole number of 1 or more, not '0'"),
        ):
            error = self.assertRaises(usage.UsageError, parse, *args)
            self.assertTrue(str(error).startswith(message), str(error))

    def test_flags(self) -> None:
        """--listen-only (-l) and --raw-output are off unless given."""
        self.assertEqual((parse()["listen-only"], parse()["raw-output"]), (0, 0))
        options = parse("-l", "--raw-output", "--max-retries", "3")
        self.assertEqual((options["listen-only"], options["raw-output"]), (1, 1))
        self.assertEqual(options["max-retries"], 3)
