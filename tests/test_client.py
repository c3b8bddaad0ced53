"""The CLI client's logic in memory: queueing, backoff on a fake clock, end of input, options."""

from __future__ import annotations

from typing import Any

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from wschat.client import ChatClientFactory, ChatSession, Options, StdinLines


class FakeConnection:
    """Stands in for an open ChatClientProtocol."""

    state = WebSocketProtocol.STATE_OPEN

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


class FakeConnector:
    def __init__(self) -> None:
        self.attempts = 0

    def connect(self) -> None:
        self.attempts += 1


def makeSession(maxPending: int = 1000) -> tuple[ChatSession, ChatClientFactory, list[str], Clock]:
    clock = Clock()
    status: list[str] = []
    session = ChatSession(clock, status.append, maxPending=maxPending)
    factory = ChatClientFactory("ws://127.0.0.1:2000", session, reactor=clock)
    factory.jitter = 0
    return session, factory, status, clock


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
    TOO_LONG = "input line longer than 10 bytes ignored"

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
        """Bad URLs, ports and counts are usage errors."""
        for args in (
            ["--url", "http://x"],
            ["--url", "ws://x", "--port", "1"],
            ["--port", "0"],
            ["--max-retries", "-1"],
            ["--queue-size", "0"],
        ):
            self.assertRaises(usage.UsageError, parse, *args)
