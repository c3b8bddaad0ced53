"""
The command-line client: ``python -m wschat.client`` sends stdin's lines to the room and prints
what the room says. Room messages go to stdout, one per line; status goes to stderr.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

from autobahn.exception import Disconnected
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    connectWS,
)
from autobahn.websocket.protocol import WebSocketProtocol
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

DEFAULT_URL = "ws://127.0.0.1:2000"

#: How long Ctrl-C waits for the server to answer our close before quitting anyway.
CLOSE_TIMEOUT = 3.0


class ChatClientProtocol(WebSocketClientProtocol):
    """One connection to the room; everything it sees goes to the session."""

    factory: ChatClientFactory

    def onOpen(self) -> None:
        self.factory.resetDelay()
        self.factory.session.connected(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.session.received(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.session.disconnected(self, code, reason)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # The factory only hears that TCP closed; say why when TLS failed (a certificate
        # that does not verify), or it reads as a mere dropped connection.
        if reason.check(SSL.Error):
            error = reason.value
            errors = error.args[0] if error is not None and error.args else []
            detail = "; ".join(e[-1] for e in errors if isinstance(e, tuple) and e[-1])
            self.factory.session.status(
                f"TLS with {self.factory.url} failed: {detail or reason.getErrorMessage()}"
            )
        super().connectionLost(reason)


class ChatClientFactory(WebSocketClientFactory, ReconnectingClientFactory):
    """
    Connects, and reconnects with exponential backoff when refused or dropped.
    """

    protocol = ChatClientProtocol  # type: ignore[assignment]
    maxDelay = 30

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
            self.session.status(f"{what}; giving up after {self.retries} retries")
            self.session.gaveUp()
            return
        delay = self.delay
        self.retry(connector)
        self.session.status(f"{what}; retrying in {delay:.1f} s")


@implementer(IHalfCloseableProtocol)
class StdinLines(Protocol):
    """
    Standard input, read line by line; standard output, written by the session.

    A line longer than ``MAX_LENGTH`` is skipped whole, the user told once, and the lines after
    it are read as usual. (Twisted's ``LineOnlyReceiver`` expects to drop the connection at
    such a line: it stops reading the lines behind it and keeps buffering the rest of it.)
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
        self.session.status(f"input line longer than {self.MAX_LENGTH} bytes ignored")

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
    """

    def __init__(
        self,
        reactor: IReactorTime,
        status: Callable[[str], None],
        maxPending: int = 1000,
    ) -> None:
        self._reactor = reactor
        self.status = status
        self.maxPending = maxPending
        self.pending: deque[str] = deque()
        self.factory: ChatClientFactory | None = None
        self.connection: ChatClientProtocol | None = None
        self.input: StdinLines | None = None
        self._inputPaused = False
        self._inputEnded = False
        self._finishing = False
        self.exitCode = 0
        self.done: defer.Deferred[None] = defer.Deferred()
        self._closeWaiters: list[defer.Deferred[None]] = []

    # -- standard input and output

    def attachInput(self, lines: StdinLines) -> None:
        self.input = lines

    def send(self, text: str) -> None:
        if self.connection is not None and not self.pending:
            try:
                self.connection.sendMessage(text.encode("utf-8"))
                return
            except Disconnected:
                pass
        self.pending.append(text)
        if len(self.pending) >= self.maxPending and not self._inputPaused:
            self.status(
                f"{len(self.pending)} lines waiting for a connection; input paused until connected"
            )
            self._setInputPaused(True)

    def inputEnded(self) -> None:
        self._inputEnded = True
        if self.connection is not None:
            self._closeWhenSent()
        elif not self.pending:
            self.finish(0)

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
        if transport is not None:
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
                connection.sendMessage(text.encode("utf-8"))
            except Disconnected:
                self.pending.appendleft(text)
                return
        if self._inputPaused:
            self._setInputPaused(False)
        if self._inputEnded:
            self._closeWhenSent()

    def received(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self._write(b"<%d bytes binary>\n" % len(payload))
        else:
            self._write(payload + b"\n")

    def disconnected(
        self, connection: ChatClientProtocol, code: int | None, reason: str | None
    ) -> None:
        if self.connection is connection:
            self.connection = None
        if code is not None and code != WebSocketProtocol.CLOSE_STATUS_CODE_ABNORMAL_CLOSE:
            self.status(f"closed with code {code}" + (f": {reason}" if reason else ""))
        if self._finishing:
            self.finish(self.exitCode)

    def gaveUp(self) -> None:
        self.finish(1)

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
        """Stop for good with exit status ``code`` once standard output is flushed."""
        self.exitCode = code
        if self.factory is not None:
            self.factory.stopTrying()
        if self.input is not None and self.input.transport is not None:
            self.input.transport.loseConnection()
        else:
            self.outputClosed()


class Options(usage.Options):
    synopsis = "Usage: python -m wschat.client [--url ws://HOST:PORT/ | --port N] [options]"
    longdesc = (
        "Send each line of standard input to a wschat room and print what the room says. "
        "Room messages go to standard output, status to standard error. "
        "On a terminal it is interactive instead: the room scrolls above an input line (/help)."
    )
    optParameters: list[list[Any]] = [
        ["url", "u", None, f"WebSocket URL of the room (ws:// or wss://; default {DEFAULT_URL})."],
        ["port", "p", None, "Shortcut for --url ws://127.0.0.1:PORT.", int],
        ["max-retries", None, None, "Give up (exit 1) after this many retries in a row.", int],
        ["queue-size", None, 1000, "Lines kept while disconnected before input pauses.", int],
        ["ca-file", None, None, "PEM file of the CA that signs the server's certificate (wss)."],
    ]
    # Interactive mode (wschat.terminal).
    optFlags: list[list[Any]] = [
        ["no-tty", None, "Line mode even on a terminal (no input line, no status bar)."],
        ["no-color", None, "No sender colours in interactive mode (as NO_COLOR=1 does)."],
    ]

    def postOptions(self) -> None:
        if self["url"] is not None and self["port"] is not None:
            raise usage.UsageError("give --url or --port, not both")
        if self["port"] is not None:
            if not 1 <= self["port"] <= 65535:
                raise usage.UsageError(f"--port {self['port']} is not a TCP port (1-65535)")
            self["url"] = f"ws://127.0.0.1:{self['port']}"
        elif self["url"] is None:
            self["url"] = DEFAULT_URL
        try:
            isSecure, host, port, resource, path, params = parse_url(self["url"])
        except Exception as e:
            raise usage.UsageError(f"--url {self['url']!r}: {e}") from e
        self["secure"] = isSecure
        self["host"] = host
        if self["max-retries"] is not None and self["max-retries"] < 0:
            raise usage.UsageError("--max-retries must be 0 or more")
        if self["queue-size"] < 1:
            raise usage.UsageError("--queue-size must be 1 or more")


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

    session = ChatSession(reactor, _status, maxPending=options["queue-size"])
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
        sys.stderr.write(f"{options}\nwschat.client: error: {e}\n")
        raise SystemExit(2) from None

    from twisted.internet import task

    task.react(lambda reactor: defer.ensureDeferred(run(reactor, options)))


if __name__ == "__main__":
    main()
