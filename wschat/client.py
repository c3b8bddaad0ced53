"""
The command-line client: ``python -m wschat.client`` sends stdin's lines to the room and prints
what the room says. Room messages go to stdout, one per line, control characters escaped
(:func:`escapeLine`); status lines and the daemon's notices go to stderr.

Exit status: 0 every line was sent; 1 gave up connecting (``--max-retries``); 2 usage error;
3 some lines were refused or not delivered (too long for the room, refused by the room, or the
room closed the connection over them).
"""

from __future__ import annotations

import os
import random
import re
import sys
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from autobahn.exception import Disconnected
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    connectWS,
)
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionResponse
from autobahn.websocket.util import parse_url
from OpenSSL import SSL
from twisted.internet import defer, ssl, stdio
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import (
    IConnector,
    IHalfCloseableProtocol,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, ReconnectingClientFactory, connectionDone
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from wschat.limits import Limits

DEFAULT_URL = "ws://127.0.0.1:2000"

#: How long Ctrl-C waits for the server to answer our close before quitting anyway.
CLOSE_TIMEOUT = 3.0

#: Exit statuses.
EXIT_OK = 0
EXIT_GAVE_UP = 1
EXIT_USAGE = 2
EXIT_NOT_DELIVERED = 3

#: The handshake response header in which the daemon states its largest message, in bytes.
MAX_MESSAGE_SIZE_HEADER = "x-wschat-max-message-size"

#: The line limit when the daemon does not state one: the daemon's default.
DEFAULT_MAX_MESSAGE_SIZE = Limits().maxMessageSize

#: A text message starting so is the daemon's own notice (a message it did not relay).
NOTICE_PREFIX = b"wschat: "

#: Close codes that say nothing about what we sent; any other code from the daemon refused
#: something of ours (1008 rate limit, 1009 too big, ...), and lines may be lost with it.
_NORMAL_CLOSES = (
    WebSocketProtocol.CLOSE_STATUS_CODE_NORMAL,
    WebSocketProtocol.CLOSE_STATUS_CODE_GOING_AWAY,
)

#: TLS record types a TLS server may answer a plain-text request with (alert, handshake).
_TLS_RECORDS = (0x15, 0x16)


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 line``, ``2 lines``."""
    return f"{count} {noun if count == 1 else (nouns or noun + 's')}"


_SHORT_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_NEEDS_ESCAPE = re.compile("[\\x00-\\x1f\\x7f-\\x9f\\\\]")
_ESCAPE = re.compile(r"\\(x[0-9a-f]{2}|[\\nrt])")
_UNESCAPES = {"\\": "\\", "n": "\n", "r": "\r", "t": "\t"}


def escapeLine(text: str) -> str:
    """
    ``text`` on one line, safe for a terminal: backslash becomes ``\\\\``; LF, CR and TAB
    become ``\\n``, ``\\r``, ``\\t``; every other C0 control, DEL and C1 control (U+0000-U+001F,
    U+007F-U+009F) becomes ``\\xHH`` (two lowercase hex digits). :func:`unescapeLine` undoes it.
    """
    return _NEEDS_ESCAPE.sub(
        lambda m: _SHORT_ESCAPES.get(m.group(), f"\\x{ord(m.group()):02x}"), text
    )


def unescapeLine(line: str) -> str:
    """The text that :func:`escapeLine` turned into ``line``."""
    return _ESCAPE.sub(lambda m: _UNESCAPES.get(m.group(1)) or chr(int(m.group(1)[1:], 16)), line)


class ChatClientProtocol(WebSocketClientProtocol):
    """One connection to the room; everything it sees goes to the session."""

    factory: ChatClientFactory

    #: The largest message the room accepts, from the handshake (or the daemon's default).
    maxMessageSize = DEFAULT_MAX_MESSAGE_SIZE
    # Bytes received before the handshake completed: none, or a TLS record, means a TLS port.
    _firstBytes = b""

    def dataReceived(self, data: bytes) -> None:
        if self.state == WebSocketProtocol.STATE_CONNECTING and not self._firstBytes:
            self._firstBytes = data[:1]
        super().dataReceived(data)

    def onConnect(self, response: ConnectionResponse) -> None:
        stated = response.headers.get(MAX_MESSAGE_SIZE_HEADER, "")
        if stated.isascii() and stated.isdigit() and int(stated) > 0:
            self.maxMessageSize = int(stated)

    def onOpen(self) -> None:
        self.factory.resetDelay()
        self.factory.session.connected(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.session.received(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        # An unclean close reads as 1006 even when the server did send its close code.
        if self.remoteCloseCode is not None:
            code, reason = self.remoteCloseCode, self.remoteCloseReason
        self.factory.session.disconnected(self, code, reason)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # The factory only hears that TCP closed; say why when TLS failed (a certificate
        # that does not verify), or it reads as a mere dropped connection.
        session = self.factory.session
        if reason.check(SSL.Error):
            error = reason.value
            errors = error.args[0] if error is not None and error.args else []
            detail = "; ".join(e[-1] for e in errors if isinstance(e, tuple) and e[-1])
            session.status(
                f"TLS with {self.factory.url} failed: {detail or reason.getErrorMessage()}"
            )
        elif (
            not self.factory.isSecure
            and self.state == WebSocketProtocol.STATE_CONNECTING
            and (not self._firstBytes or self._firstBytes[0] in _TLS_RECORDS)
        ):
            # A TLS port closes (or sends an alert) at a plain HTTP request.
            secure = "wss://" + self.factory.url.split("://", 1)[1]
            session.status(
                f"{self.factory.url} closed the connection without answering the WebSocket "
                f"handshake; if it serves TLS, try {secure}"
            )
        super().connectionLost(reason)


class ChatClientFactory(WebSocketClientFactory, ReconnectingClientFactory):
    """
    Connects, and reconnects with exponential backoff (capped at ``maxDelay`` seconds, with
    jitter) when refused or dropped.
    """

    protocol = ChatClientProtocol  # type: ignore[assignment]
    maxDelay = 10
    # The session reports every attempt; Twisted's own lines would repeat them.
    noisy = False

    def __init__(self, url: str, session: ChatSession, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.session = session
        session.factory = self
        clock = kwargs.get("reactor")
        if clock is not None:
            self.clock = clock

    def startedConnecting(self, connector: IConnector) -> None:
        self.session.status(f"connecting to {self.url}")

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        if reason.check(ConnectionRefusedError):
            what = f"connection to {self.url} refused"
        else:
            what = f"could not connect to {self.url}: {reason.getErrorMessage()}"
        self._retryOrGiveUp(connector, what)

    def clientConnectionLost(self, connector: IConnector, reason: Failure) -> None:
        self._retryOrGiveUp(connector, f"connection to {self.url} lost")

    def _retryOrGiveUp(self, connector: IConnector, what: str) -> None:
        if not self.continueTrying:
            return
        if self.maxRetries is not None and self.retries >= self.maxRetries:
            self.session.status(
                f"{what}; giving up after {plural(self.retries, 'retry', 'retries')}"
            )
            self.session.gaveUp()
            return
        # Jitter here rather than in retry(), to tell the user the delay actually waited;
        # never past the cap.
        delay = self.delay
        if self.jitter:
            delay = min(max(random.normalvariate(delay, delay * self.jitter), 0.0), self.maxDelay)
        jitter, self.delay, self.jitter = self.jitter, delay, 0
        try:
            self.retry(connector)
        finally:
            self.jitter = jitter
        self.session.status(f"{what}; retrying in {delay:.1f} s")


@implementer(IHalfCloseableProtocol)
class StdinLines(Protocol):
    """
    Standard input, read line by line; standard output, written by the session.

    A line longer than ``MAX_LENGTH`` is skipped whole, counted as not sent, and the lines after
    it are read as usual. (Twisted's ``LineOnlyReceiver`` expects to drop the connection at
    such a line: it stops reading the lines behind it and keeps buffering the rest of it.)
    In listen-only mode nothing is read: only standard output is used.
    """

    MAX_LENGTH = 1 << 20
    _buffer = b""
    # The rest of an over-long line is still coming: drop it up to its newline.
    _skipping = False

    def __init__(self, session: ChatSession) -> None:
        self.session = session

    def connectionMade(self) -> None:
        self.session.attachInput(self)

    def dataReceived(self, data: bytes) -> None:
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        for line in lines:
            if self._skipping:
                self._skipping = False
            elif len(line) > self.MAX_LENGTH:
                self._tooLong()
            else:
                self.lineReceived(line)
        if len(self._buffer) > self.MAX_LENGTH:
            self._buffer = b""
            if not self._skipping:
                self._skipping = True
                self._tooLong()

    def lineReceived(self, line: bytes) -> None:
        self.session.send(line.rstrip(b"\r").decode("utf-8", "replace"))

    def _tooLong(self) -> None:
        self.session.lineRefused(f"input line longer than {self.MAX_LENGTH} bytes not sent")

    def readConnectionLost(self) -> None:
        if self._buffer and not self._skipping:
            # The last line had no newline; it is still a line the user typed.
            self.lineReceived(self._buffer)
        self._buffer = b""
        self.session.inputEnded()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.session.outputClosed()


class ChatSession:
    """
    What the user typed and what the room said, across connections that come and go.

    Lines typed while disconnected wait in a bounded queue and go out in order on the
    next connection. When the queue is full, input is paused (never dropped) until then.

    Everything shown to the user goes through three methods, which another front end (the
    terminal UI) overrides: :meth:`showMessage` (a room message), :meth:`status` (the client's
    status lines and the daemon's notices) and :meth:`showClose` (the code the room closed
    with). The exit status is :attr:`exitCode` once :attr:`done` has fired.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        status: Callable[[str], None],
        maxPending: int = 1000,
        listenOnly: bool = False,
        rawOutput: bool = False,
    ) -> None:
        self._reactor = reactor
        self._statusWriter = status
        self.maxPending = maxPending
        self.listenOnly = listenOnly
        self.rawOutput = rawOutput
        self.pending: deque[str] = deque()
        self.factory: ChatClientFactory | None = None
        self.connection: ChatClientProtocol | None = None
        self.input: StdinLines | None = None
        self._inputPaused = False
        self._inputEnded = False
        self._finishing = False
        #: Lines refused here or by the room, and closes that may have lost lines.
        self.notDelivered = 0
        self._sentOnConnection = 0
        self.exitCode = EXIT_OK
        self.done: defer.Deferred[None] = defer.Deferred()
        self._closeWaiters: list[defer.Deferred[None]] = []

    # -- what the user sees

    def showMessage(self, payload: bytes, isBinary: bool) -> None:
        """A room message: one line on standard output, escaped unless ``rawOutput``."""
        if isBinary:
            self._write(b"<%s binary>\n" % plural(len(payload), "byte").encode())
        elif self.rawOutput:
            self._write(payload + b"\n")
        else:
            self._write(escapeLine(payload.decode("utf-8", "replace")).encode("utf-8") + b"\n")

    def status(self, text: str) -> None:
        """A status line or a notice from the daemon (standard error)."""
        self._statusWriter(text)

    def showClose(self, code: int, reason: str | None) -> None:
        """The close code (and reason) the room closed the connection with."""
        self.status(f"closed with code {code}" + (f": {escapeLine(reason)}" if reason else ""))

    # -- standard input and output

    def attachInput(self, lines: StdinLines) -> None:
        self.input = lines
        if self.listenOnly and lines.transport is not None:
            # StandardIO pauses like a push producer: stop reading standard input at all.
            cast(Any, lines.transport).pauseProducing()

    def send(self, text: str) -> None:
        if self.connection is not None and not self.pending:
            try:
                self._transmit(self.connection, text)
                return
            except Disconnected:
                pass
        self.pending.append(text)
        if len(self.pending) >= self.maxPending and not self._inputPaused:
            self.status(
                f"{plural(len(self.pending), 'line')} waiting for a connection; "
                "input paused until connected"
            )
            self._setInputPaused(True)

    def _transmit(self, connection: ChatClientProtocol, text: str) -> None:
        """Send ``text``, unless it is longer than the room accepts (then say so)."""
        data = text.encode("utf-8")
        limit = connection.maxMessageSize
        if len(data) > limit:
            self.lineRefused(
                f"line of {len(data)} bytes not sent: the room accepts at most {limit} bytes"
            )
            return
        connection.sendMessage(data)
        self._sentOnConnection += 1

    def lineRefused(self, why: str) -> None:
        """A line was not sent; say why, and exit with status 3 in the end."""
        self.notDelivered += 1
        self.status(why)

    def inputEnded(self) -> None:
        if self.listenOnly:
            return
        self._inputEnded = True
        if self.connection is not None:
            self._closeWhenSent()
        elif not self.pending:
            self.finish(EXIT_OK)

    def outputClosed(self) -> None:
        waiters, self._closeWaiters = self._closeWaiters, []
        for waiter in waiters:
            waiter.callback(None)
        if not self.done.called:
            self.done.callback(None)

    def _setInputPaused(self, paused: bool) -> None:
        self._inputPaused = paused
        # StandardIO pauses and resumes like a push producer, though it does not declare it.
        transport: Any = self.input.transport if self.input is not None else None
        if transport is not None and not self.listenOnly:
            if paused:
                transport.pauseProducing()
            else:
                transport.resumeProducing()

    def _write(self, data: bytes) -> None:
        if self.input is not None and self.input.transport is not None:
            self.input.transport.write(data)

    # -- the connection

    def connected(self, connection: ChatClientProtocol) -> None:
        self.connection = connection
        self.status(f"connected to {connection.factory.url}")
        while self.pending:
            text = self.pending.popleft()
            try:
                self._transmit(connection, text)
            except Disconnected:
                self.pending.appendleft(text)
                return
        if self._inputPaused:
            self._setInputPaused(False)
        if self._inputEnded:
            self._closeWhenSent()

    def received(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary and payload.startswith(NOTICE_PREFIX):
            # The daemon did not relay a message of ours.
            self.notDelivered += 1
            self.status(escapeLine(payload[len(NOTICE_PREFIX) :].decode("utf-8", "replace")))
        else:
            self.showMessage(payload, isBinary)

    def disconnected(
        self, connection: ChatClientProtocol, code: int | None, reason: str | None
    ) -> None:
        if self.connection is connection:
            self.connection = None
        sent, self._sentOnConnection = self._sentOnConnection, 0
        if code is not None and code != WebSocketProtocol.CLOSE_STATUS_CODE_ABNORMAL_CLOSE:
            self.showClose(code, reason)
            if code not in _NORMAL_CLOSES:
                # The room closed over something we sent: lines sent since may be lost.
                self.notDelivered += 1
        elif sent:
            # No closing handshake confirmed that the room read what we sent.
            self.notDelivered += 1
            self.status("connection lost before the room confirmed the lines sent on it")
        if self._finishing:
            self.finish(self.exitCode)

    def gaveUp(self) -> None:
        self.finish(EXIT_GAVE_UP)

    def _closeWhenSent(self) -> None:
        assert self.connection is not None
        self._finishing = True
        if self.factory is not None:
            self.factory.stopTrying()
        self.connection.sendClose(WebSocketProtocol.CLOSE_STATUS_CODE_NORMAL)

    def close(self) -> defer.Deferred[None]:
        """
        Close the connection cleanly (Ctrl-C): wait for the server's close, but not forever.
        """
        if self.factory is not None:
            self.factory.stopTrying()
        connection = self.connection
        if connection is None or connection.state != WebSocketProtocol.STATE_OPEN:
            return defer.succeed(None)
        self._finishing = True
        waiter: defer.Deferred[None] = defer.Deferred()
        self._closeWaiters.append(waiter)
        connection.sendClose(WebSocketProtocol.CLOSE_STATUS_CODE_NORMAL)
        waiter.addTimeout(CLOSE_TIMEOUT, self._reactor)  # type: ignore[arg-type]
        return waiter.addErrback(lambda _: None)

    def finish(self, code: int) -> None:
        """
        Stop for good once standard output is flushed, with exit status ``code``, or 3 when
        ``code`` is 0 but lines were not sent or not delivered.
        """
        if self.pending:
            self.notDelivered += len(self.pending)
            self.status(f"{plural(len(self.pending), 'line')} never sent")
            self.pending.clear()
        if code == EXIT_OK and self.notDelivered:
            self.status(f"{plural(self.notDelivered, 'line')} not sent or not delivered")
            code = EXIT_NOT_DELIVERED
        self.exitCode = code
        if self.factory is not None:
            self.factory.stopTrying()
        if self.input is not None and self.input.transport is not None:
            self.input.transport.loseConnection()
        else:
            self.outputClosed()


def _whole(option: str, value: str, least: int, most: int | None = None) -> int:
    """``value`` as a whole number in range for ``--option``, or a usage error saying so."""
    accepted = f"from {least} to {most}" if most is not None else f"of {least} or more"
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < least or (most is not None and number > most):
        raise usage.UsageError(f"--{option} takes a whole number {accepted}, not {value!r}")
    return number


def version() -> str:
    """wschat's version, from the installed package's metadata."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as packageVersion

    try:
        return packageVersion("wschat")
    except PackageNotFoundError:
        from wschat import __version__

        return __version__


class Options(usage.Options):
    synopsis = "Usage: python -m wschat.client [--url ws://HOST:PORT/ | --port N] [options]"
    longdesc = (
        "Send each line of standard input to a wschat room and print what the room says. "
        "Room messages go to standard output, one per line with control characters escaped "
        "(\\\\ \\n \\r \\t \\xHH); status and the daemon's notices go to standard error. "
        "Exit status: 0 all lines sent, 1 gave up connecting, 2 usage error, "
        "3 some lines refused or not delivered. "
        "On a terminal (standard input and output) it is interactive instead: the room scrolls "
        "above an input line (/help there lists the commands)."
    )
    optParameters: list[list[Any]] = [
        ["url", "u", None, f"WebSocket URL of the room (ws:// or wss://; default {DEFAULT_URL})."],
        ["ca-file", None, None, "PEM file of the CA that signs the server's certificate (wss)."],
    ]
    optFlags: list[list[Any]] = [
        [
            "listen-only",
            "l",
            "Only receive: do not read standard input; stay (and reconnect) until killed.",
        ],
        ["raw-output", None, "Print room messages' exact text, control characters unescaped."],
        # Interactive mode (wschat.terminal).
        ["no-tty", None, "Line mode even on a terminal (no input line, no status bar)."],
        ["no-color", None, "No sender colours in interactive mode (as NO_COLOR=1 does)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["port"] = None
        self["max-retries"] = None
        self["queue-size"] = 1000

    def opt_port(self, value: str) -> None:
        """Shortcut for --url ws://127.0.0.1:PORT."""
        self["port"] = _whole("port", value, 1, 65535)

    opt_p = opt_port

    def opt_max_retries(self, value: str) -> None:
        """Give up (exit 1) after this many retries in a row [default: never]."""
        self["max-retries"] = _whole("max-retries", value, 0)

    def opt_queue_size(self, value: str) -> None:
        """Lines kept while disconnected before input pauses [default: 1000]."""
        self["queue-size"] = _whole("queue-size", value, 1)

    def opt_version(self) -> None:
        """Print wschat's version and exit."""
        print(f"wschat {version()}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        if self["url"] is not None and self["port"] is not None:
            raise usage.UsageError("give --url or --port, not both")
        if self["port"] is not None:
            self["url"] = f"ws://127.0.0.1:{self['port']}"
        elif self["url"] is None:
            self["url"] = DEFAULT_URL
        try:
            isSecure, host, port, resource, path, params = parse_url(self["url"])
        except Exception as e:
            raise usage.UsageError(
                f"--url takes a ws:// or wss:// URL, not {self['url']!r} ({e})"
            ) from e
        self["secure"] = isSecure
        self["host"] = host


def _status(text: str) -> None:
    sys.stderr.write(f"wschat: {text}\n")
    sys.stderr.flush()


def tlsOptions(host: str, caFile: str | None) -> Any:
    """Verified TLS for ``host``: the system's CAs, or only ``caFile``'s."""
    trustRoot = None
    if caFile is not None:
        with open(caFile, "rb") as f:
            trustRoot = ssl.Certificate.loadPEM(f.read())
    return ssl.optionsForClientTLS(host, trustRoot=trustRoot)


async def run(reactor: Any, options: Options) -> None:
    # On a terminal: the interactive mode of wschat.terminal instead of lines in, lines out.
    from wschat import terminal

    interactive, colour = terminal.wanted(options, os.environ)
    if interactive:
        await terminal.run(reactor, options, colour)
        return

    session = ChatSession(
        reactor,
        _status,
        maxPending=options["queue-size"],
        listenOnly=options["listen-only"],
        rawOutput=options["raw-output"],
    )
    factory = ChatClientFactory(options["url"], session, reactor=reactor)
    factory.maxRetries = options["max-retries"]
    stdio.StandardIO(StdinLines(session), reactor=reactor)
    reactor.addSystemEventTrigger("before", "shutdown", session.close)
    contextFactory = tlsOptions(options["host"], options["ca-file"]) if options["secure"] else None
    connectWS(factory, contextFactory)
    await session.done
    if session.exitCode:
        raise SystemExit(session.exitCode)


def main(argv: list[str] | None = None) -> None:
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.stderr.write(f"wschat.client: error: {e} (try --help)\n")
        raise SystemExit(EXIT_USAGE) from None

    from twisted.internet import task

    task.react(lambda reactor: defer.ensureDeferred(run(reactor, options)))


if __name__ == "__main__":
    main()
