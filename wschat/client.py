"""
The command-line client: ``python -m wschat.client`` sends stdin's lines to the room and prints
what the room says. Room messages go to stdout, one per line, control characters escaped
(:func:`wschat.escaping.escapeControls`); status lines and the daemon's notices go to stderr.

It speaks the ``wschat.json`` subprotocol and prints each message as a plain client of the
room's format would, so that it can resume (:class:`ChatSession`): after a reconnect it prints
what it missed, nothing twice, and a line sent before a drop is relayed once. The protocol is
docs/protocol.md (sections 4 and 10).

Exit status: 0 every line was sent (and, over ``wschat.json``, its relayed copy came back);
1 gave up connecting (``--max-retries``); 2 usage error; 3 some lines were refused or not
delivered (too long for the room, refused by the room, the room closed the connection over
them, or lost with a connection to a room that keeps no history).
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import sys
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard, cast

from autobahn.exception import Disconnected
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    connectWS,
)
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectingRequest, ConnectionResponse
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

from wschat.escaping import escapeControls
from wschat.limits import Limits
from wschat.wire import JSON_SUBPROTOCOL, BadCommand, parseCommand, plural

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

#: How Autobahn words a handshake the server answered with another HTTP status than 101.
_REFUSED = re.compile(r"WebSocket connection upgrade failed \[(\d{3})\]: (.*)", re.DOTALL)

#: TLS record types a TLS server may answer a plain-text request with (alert, handshake).
_TLS_RECORDS = (0x15, 0x16)


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

    def onConnecting(self, transport_details: Any) -> ConnectingRequest:
        # The URL's query asks the room for what we missed (the session knows where we are).
        factory = self.factory
        resource = factory.resource
        query = factory.session.query()
        if query:
            resource += ("&" if "?" in resource else "?") + query
        return ConnectingRequest(
            host=factory.host,
            port=factory.port,
            resource=resource,
            headers=factory.headers,
            useragent=factory.useragent,
            origin=factory.origin,
            protocols=factory.protocols,
        )

    def failHandshake(self, reason: str) -> None:
        refused = _REFUSED.match(reason)
        if refused is not None:
            self.factory.session.handshakeRefused(int(refused.group(1)), refused.group(2))
        super().failHandshake(reason)

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


def isInteger(value: object) -> TypeGuard[int]:
    """Whether a JSON value is a whole number (not a boolean)."""
    return isinstance(value, int) and not isinstance(value, bool)


def plainMessage(obj: dict[str, Any], roomFormat: str) -> tuple[bytes, bool] | None:
    """
    What a plain client of a room of ``roomFormat`` (``prefixed``, ``raw``) receives for the
    JSON ``message`` object ``obj``, as ``(payload, isBinary)``; None if ``obj`` is malformed.
    """
    sender = obj.get("from")
    if not isinstance(sender, str):
        return None
    if "data" in obj:
        data = obj["data"]
        try:
            return base64.b64decode(data, validate=True), True
        except (TypeError, ValueError):
            return None
    text = obj.get("text")
    if not isinstance(text, str):
        return None
    payload = text.encode("utf-8", "replace")
    if roomFormat == "prefixed":
        payload = sender.encode("utf-8", "replace") + b": " + payload
    return payload, False


@dataclass(eq=False, slots=True)
class Line:
    """A line typed, to be sent; ``id`` is chosen at its first send and kept for resends."""

    text: str
    id: str | None = None
    #: The room answered it: its relayed copy came back, or a ``duplicate``, or a notice.
    answered: bool = False


def sendCommand(text: str, mid: str | None) -> bytes:
    """The ``wschat.json`` command that sends ``text``, with the id ``mid`` if given."""
    obj: dict[str, str] = {"type": "send", "text": text}
    if mid is not None:
        obj["id"] = mid
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def isCommand(data: bytes) -> bool:
    """Whether the room would read the text ``data`` as a ``wschat.json`` command."""
    try:
        return parseCommand(data) is not None
    except BadCommand:
        return True


class ChatSession:
    """
    What the user typed and what the room said, across connections that come and go.

    Lines typed while disconnected wait in a bounded queue and go out in order on the
    next connection. When the queue is full, input is paused (never dropped) until then.

    With the ``wschat.json`` subprotocol (docs/protocol.md, sections 4 and 10) the session
    resumes: it remembers the position (epoch and seq) of the last message shown, asks the room
    for what came after it on the next connection (``?since=``), and shows no message twice.
    Each line goes out as a ``send`` command with a random id; a line whose relayed copy has
    not come back when the connection drops is sent again, with the same id, once the missed
    messages are in (the room relays an id once, and answers ``duplicate`` to the resend).

    Everything shown to the user goes through four methods, which another front end (the
    terminal UI) overrides: :meth:`showMessage` (a room message, plain), :meth:`showObject`
    (a JSON object to show: a message, the welcome, presence), :meth:`status` (the client's
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
        history: int = 0,
    ) -> None:
        self._reactor = reactor
        self._statusWriter = status
        self.maxPending = maxPending
        self.listenOnly = listenOnly
        self.rawOutput = rawOutput
        #: How many past messages to ask for on the first connection.
        self.history = history
        self.pending: deque[Line] = deque()
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
        # The connection may send now (JSON: welcomed, and the missed messages are in).
        self._ready = False
        self._json = False
        # The room takes JSON commands (its welcome states maxMessageSize, as every daemon
        # that knows commands does); an older one would relay them as text.
        self._commands = False
        # Lines sent on this connection the room has not answered yet, oldest first; those
        # with an id, sent or waiting to be sent again, by id; those sent without one.
        self._inFlight: deque[Line] = deque()
        self._byId: dict[str, Line] = {}
        self._withoutId = 0
        # From the welcome: who we are, and the room's format (how a message is printed).
        self._you: str | None = None
        self._format = "prefixed"
        # The position of the last message shown (or skipped as before our time), if the
        # room keeps history; the seq the replay of missed messages ends at, while it runs.
        self.epoch: str | None = None
        self.seq = 0
        self._replayEnd: int | None = None
        # Whether this connection asked for history (and how many), and whether any has been
        # welcomed (--history N is for the first connection only).
        self._asked: str = ""
        self._welcomed = False

    # -- what the user sees

    def showMessage(self, payload: bytes, isBinary: bool) -> None:
        """A room message: one line on standard output, escaped unless ``rawOutput``."""
        if isBinary:
            self._write(b"<%s binary>\n" % plural(len(payload), "byte").encode())
        elif self.rawOutput:
            self._write(payload + b"\n")
        else:
            self._write(escapeControls(payload.decode("utf-8", "replace")).encode("utf-8") + b"\n")

    def showObject(self, obj: dict[str, Any], payload: bytes) -> None:
        """
        A JSON object to show (``payload`` as received): printed as the line a plain client of
        the room's format would print, the greeting for a ``welcome``; presence is not shown.
        """
        kind = obj.get("type")
        if kind == "welcome":
            text = obj.get("text")
            if isinstance(text, str) and text:
                self.showMessage(text.encode("utf-8"), False)
        elif kind == "message":
            plain = plainMessage(obj, self._format)
            if plain is None:
                self.showMessage(payload, False)
            else:
                self.showMessage(*plain)

    def status(self, text: str) -> None:
        """A status line or a notice from the daemon (standard error)."""
        self._statusWriter(text)

    def showClose(self, code: int, reason: str | None) -> None:
        """The close code (and reason) the room closed the connection with."""
        self.status(f"closed with code {code}" + (f": {escapeControls(reason)}" if reason else ""))

    # -- standard input and output

    def attachInput(self, lines: StdinLines) -> None:
        self.input = lines
        if self.listenOnly and lines.transport is not None:
            # StandardIO pauses like a push producer: stop reading standard input at all.
            cast(Any, lines.transport).pauseProducing()

    def send(self, text: str) -> None:
        line = Line(text)
        if self._ready and self.connection is not None and not self.pending:
            try:
                self._transmit(self.connection, line)
                return
            except Disconnected:
                pass
        self.pending.append(line)
        if len(self.pending) >= self.maxPending and not self._inputPaused:
            self.status(
                f"{plural(len(self.pending), 'line')} waiting for a connection; "
                "input paused until connected"
            )
            self._setInputPaused(True)

    def _transmit(self, connection: ChatClientProtocol, line: Line) -> None:
        """Send ``line``, unless it is longer than the room accepts (then say so)."""
        data = self._frame(line, connection.maxMessageSize)
        if data is None:
            return
        connection.sendMessage(data)
        self._sentOnConnection += 1
        if self._json:
            self._inFlight.append(line)
            if line.id is None:
                self._withoutId += 1
            else:
                self._byId[line.id] = line

    def _frame(self, line: Line, limit: int) -> bytes | None:
        """
        What to send for ``line``: its text (plain connection), or a ``send`` command with a
        new id, or (a line too long to carry one) its text as is; None when it does not fit.
        """
        text = line.text.encode("utf-8")
        if not self._commands or line.id is None:
            if len(text) > limit:
                self.lineRefused(
                    f"line of {len(text)} bytes not sent: the room accepts at most {limit} bytes"
                )
                return None
            if not self._commands:
                return text
            mid = str(uuid.uuid4())
            data = sendCommand(line.text, mid)
            if len(data) <= limit:
                line.id = mid
                return data
            # No room left for the command around it: the text itself, relayed as it is
            # (once, unless the connection drops before its copy comes back).
            if not isCommand(text):
                return text
            data = sendCommand(line.text, None)
        else:
            # Sent before: again with the same id, so that the room relays it once.
            data = sendCommand(line.text, line.id)
        if len(data) > limit:
            self.lineRefused(
                f"line of {len(text)} bytes not sent: as a command it takes {len(data)} "
                f"bytes; the room accepts at most {limit} bytes"
            )
            return None
        return data

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

    def query(self) -> str:
        """
        The query the next connection's URL carries: ``since=EPOCH:SEQ`` once a position is
        known, ``history=N`` on the first connection with ``--history N``, else nothing.
        """
        if self.epoch is not None:
            self._asked = f"since={self.epoch}:{self.seq}"
        elif self.history and not self._welcomed:
            self._asked = f"history={self.history}"
        else:
            self._asked = ""
        return self._asked

    def handshakeRefused(self, code: int, reason: str) -> None:
        """The room answered the opening handshake with HTTP ``code`` and ``reason``."""
        self.status(f"the room refused the connection: {code} {escapeControls(reason)}")
        if code == 400 and self._asked:
            # The room keeps no history (--history 0), or took our position for malformed:
            # connect without asking for any.
            if self.epoch is not None:
                self.status(f"some messages may have been missed ({escapeControls(reason)})")
            self.epoch = None
            self._welcomed = True

    def connected(self, connection: ChatClientProtocol) -> None:
        self.connection = connection
        self._json = getattr(connection, "websocket_protocol_in_use", None) == JSON_SUBPROTOCOL
        self._commands = False
        self.status(f"connected to {connection.factory.url}")
        if not self._json:
            # Plain: nothing to wait for.
            self._ready = True
            self._flush()

    def _flush(self) -> None:
        """Send the lines waiting (those sent before first, with their ids), then maybe close."""
        connection = self.connection
        while self.pending and self._ready and connection is not None:
            line = self.pending.popleft()
            if line.answered:
                continue
            try:
                self._transmit(connection, line)
            except Disconnected:
                self.pending.appendleft(line)
                return
        if self._inputPaused and not self.pending:
            self._setInputPaused(False)
        if self._inputEnded and self._ready:
            self._closeWhenSent()

    def received(self, payload: bytes, isBinary: bool) -> None:
        if self._json and not isBinary:
            self._receivedObject(payload)
        elif not isBinary and payload.startswith(NOTICE_PREFIX):
            # The daemon did not relay a message of ours.
            self.notDelivered += 1
            self.status(escapeControls(payload[len(NOTICE_PREFIX) :].decode("utf-8", "replace")))
        else:
            self.showMessage(payload, isBinary)

    def _receivedObject(self, payload: bytes) -> None:
        try:
            obj = json.loads(payload)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            self.showMessage(payload, False)
            return
        kind = obj.get("type")
        if kind == "message":
            self._message(obj, payload)
        elif kind == "welcome":
            self._welcome(obj, payload)
        elif kind == "duplicate":
            # A line sent again after a drop had been relayed already.
            mid = obj.get("id")
            line = self._byId.get(mid) if isinstance(mid, str) else None
            if line is not None:
                self._answered(line)
        elif kind == "notice":
            # The room did not relay the oldest line of ours it had not answered.
            if self._inFlight:
                self._answered(self._inFlight[0])
            self.notDelivered += 1
            self.status(escapeControls(str(obj.get("text", ""))))
        elif kind in ("join", "leave"):
            self.showObject(obj, payload)
        # Other types are for newer clients.
        if self._inputEnded:
            self._closeWhenSent()

    def _welcome(self, obj: dict[str, Any], payload: bytes) -> None:
        you, fmt, size = obj.get("you"), obj.get("format"), obj.get("maxMessageSize")
        self._you = you if isinstance(you, str) else None
        self._commands = "maxMessageSize" in obj
        self._format = fmt if fmt in ("prefixed", "raw") else "prefixed"
        if isInteger(size) and size > 0 and self.connection is not None:
            self.connection.maxMessageSize = size
        self.showObject(obj, payload)
        self._welcomed = True
        epoch, seq, recovered = obj.get("epoch"), obj.get("seq"), obj.get("recovered")
        if not (isinstance(epoch, str) and isInteger(seq)):
            # The room keeps no history: nothing to resume from.
            self.epoch = None
        elif recovered is False:
            why = (
                "the room's history has restarted"
                if epoch != self.epoch
                else "away longer than the room keeps history"
            )
            self.status(f"some messages may have been missed ({why})")
            if epoch != self.epoch:
                self.epoch, self.seq = epoch, 0
        elif recovered is True and epoch == self.epoch:
            if seq > self.seq:
                # The missed messages follow, up to seq: lines sent before the drop are sent
                # again once they are in, unless they are among them.
                self._replayEnd = seq
        else:
            # A first connection: live from here, or the last N messages before.
            last = self.history if self._asked.startswith("history=") else 0
            self.epoch, self.seq = epoch, max(seq - last, 0)
        if self._replayEnd is None:
            self._ready = True
            self._flush()

    def _message(self, obj: dict[str, Any], payload: bytes) -> None:
        mid = obj.get("id")
        line = self._byId.get(mid) if isinstance(mid, str) else None
        if line is not None:
            self._answered(line)
        elif mid is None and self._withoutId and obj.get("from") == self._you:
            self._answered(next(line for line in self._inFlight if line.id is None))
        epoch, seq = obj.get("epoch"), obj.get("seq")
        if not (isinstance(epoch, str) and isInteger(seq)):
            self.showObject(obj, payload)
            return
        otherEpoch = epoch != self.epoch
        if otherEpoch or seq > self.seq:
            self.showObject(obj, payload)
            self.epoch, self.seq = epoch, seq
        # else: shown before the connection dropped.
        if self._replayEnd is not None and (seq >= self._replayEnd or otherEpoch):
            self._replayEnd = None
            self._ready = True
            self._flush()

    def _answered(self, line: Line) -> None:
        """The room relayed ``line`` (or refused it): it is not to be sent again."""
        line.answered = True
        if line.id is not None:
            self._byId.pop(line.id, None)
        inFlight = self._inFlight
        # Answers come in the order the lines went out, but for lines sent without an id.
        if inFlight and inFlight[0] is line:
            inFlight.popleft()
        elif line in inFlight:
            inFlight.remove(line)
        else:
            return
        if line.id is None:
            self._withoutId -= 1

    def disconnected(
        self, connection: ChatClientProtocol, code: int | None, reason: str | None
    ) -> None:
        if self.connection is connection:
            self.connection = None
        self._ready = False
        self._replayEnd = None
        sent, self._sentOnConnection = self._sentOnConnection, 0
        inFlight, self._inFlight, self._withoutId = list(self._inFlight), deque(), 0
        closed = code is not None and code != WebSocketProtocol.CLOSE_STATUS_CODE_ABNORMAL_CLOSE
        if closed:
            assert code is not None
            self.showClose(code, reason)
        if closed and code not in _NORMAL_CLOSES:
            # The room closed over something we sent: lines sent since may be lost.
            self.notDelivered += max(len(inFlight), 1)
            self._forget(inFlight)
        elif self._json and code != WebSocketProtocol.CLOSE_STATUS_CODE_NORMAL:
            # Sent again on the next connection, with the same ids, if the room keeps history
            # (it relays an id once); otherwise their fate is unknown.
            resumable = self.epoch is not None
            again = [line for line in inFlight if line.id is not None and resumable]
            self.pending.extendleft(reversed(again))
            lost = [line for line in inFlight if line.id is None or not resumable]
            self._forget(lost)
            if lost:
                self.notDelivered += len(lost)
                self.status(
                    f"connection lost before the room confirmed {plural(len(lost), 'line')} "
                    "sent on it"
                )
        elif not closed and sent:
            # No closing handshake confirmed that the room read what we sent.
            self.notDelivered += 1
            self.status("connection lost before the room confirmed the lines sent on it")
        else:
            self._forget(inFlight)
        if self._finishing or (self._inputEnded and not self.pending):
            self.finish(self.exitCode)

    def _forget(self, lines: list[Line]) -> None:
        for line in lines:
            line.answered = True
            if line.id is not None:
                self._byId.pop(line.id, None)

    def gaveUp(self) -> None:
        self.finish(EXIT_GAVE_UP)

    def _closeWhenSent(self) -> None:
        """Close, once every line is sent and (JSON) answered by the room."""
        if self.connection is None or self._finishing or self.pending or self._inFlight:
            return
        if not self._ready:
            return
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
        unsent = sum(not line.answered for line in self.pending)
        self.pending.clear()
        if unsent:
            self.notDelivered += unsent
            self.status(f"{plural(unsent, 'line')} never sent")
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
        "After a reconnect it prints what it missed, if the room still holds it (and says so "
        "on standard error if not), never a message twice; a line sent before a drop is "
        "relayed once. "
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
        self["history"] = 0

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

    def opt_history(self, value: str) -> None:
        """On the first connection, print the last N messages of the room first [default: 0]."""
        self["history"] = _whole("history", value, 0)

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


def stderrStatus(text: str) -> None:
    """Show a status line on standard error: ``wschat: TEXT``."""
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
        stderrStatus,
        maxPending=options["queue-size"],
        listenOnly=options["listen-only"],
        rawOutput=options["raw-output"],
        history=options["history"],
    )
    factory = ChatClientFactory(
        options["url"], session, reactor=reactor, protocols=[JSON_SUBPROTOCOL]
    )
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
