"""
The WebSocket side of the daemon: one :class:`ChatServerProtocol` per connection, built by a
thin :class:`ChatServerFactory` over the daemon's :class:`~wschat.server.ChatServer`.

The wire protocol it speaks is specified in docs/protocol.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from autobahn.exception import Disconnected
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from autobahn.websocket.protocol import PreparedMessage, WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, ISSLTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from wschat import fastwrite, lean
from wschat.closing import (
    GOING_AWAY,
    POLICY_VIOLATION,
    UNSUPPORTED_DATA,
    closeWith,
)
from wschat.escaping import escapeControls
from wschat.handshake import forwardedClient, senderAddress
from wschat.history import BadQuery, Position, parseQuery
from wschat.limits import InboundBudget, Limits, TokenBucket, hostKey
from wschat.metrics import REFUSED_BINARY, REFUSED_COMMAND, REFUSED_RATE_LIMIT, REFUSED_RELAY
from wschat.wire import (
    JSON_SUBPROTOCOL,
    BadCommand,
    Format,
    Message,
    jsonDuplicate,
    jsonNotice,
    parseCommand,
)

if TYPE_CHECKING:
    from wschat.server import ChatServer

_OPEN = WebSocketProtocol.STATE_OPEN
MESSAGE_TOO_BIG = WebSocketProtocol.CLOSE_STATUS_CODE_MESSAGE_TOO_BIG  # 1009

#: The most a history replay writes to one connection in one reactor turn.
_REPLAY_CHUNK = 64 * 1024

#: Handshake response header naming ``--max-message-size`` in bytes.
MAX_MESSAGE_SIZE_HEADER = "X-WSChat-Max-Message-Size"

#: HTTP status for a handshake past ``--max-connections-per-ip``.
HTTP_TOO_MANY_REQUESTS = 429

#: Bytes handed to Autobahn's frame parser at a time when a connection has an inbound budget.
#: A read is up to 64 KiB: ten thousand empty pings. A connection over its share stops being
#: parsed within this many bytes (at most 85 frames), and Autobahn, which copies what is left
#: of its buffer on every frame, never works on more than this at once.
READ_SLICE = 512

#: Empty data frames one message may have. A real client sends at most one (an empty
#: message, or an empty last fragment); endless empty fragments are an attack (1008).
MAX_EMPTY_FRAMES = 8

#: A connection with no ``maxMessagePayloadSize`` of its own (the factory's class attribute).
_NO_LIMIT_SET = object()


@implementer(IPushProducer)
class ChatServerProtocol(WebSocketServerProtocol):
    """
    One client connection: hands what it receives to the room, and delivers the room's frames.

    It is its transport's streaming producer: the transport pauses it when its write buffer
    is full and resumes it when the buffer has drained. While paused, deliveries still go
    to the transport but are counted; past ``--max-queue`` bytes the client is closed.
    """

    _log = Logger()
    factory: ChatServerFactory
    #: Its onConnect answers at once, never with a Deferred: a plain handshake may be
    #: answered without Autobahn's handshake machinery (wschat.lean.openHandshake).
    leanHandshake = True
    #: Its message hooks after ``onMessageFrameBegin`` do what Autobahn's do while it is open:
    #: complete frames may be read without Autobahn's frame parser (wschat.lean.receiveFrames).
    #: Its hooks then see no ``current_frame`` and no rest of the read in ``data``.
    leanFrames = True
    address = ""
    #: What this connection receives: the room's format, or JSON if it asked for it.
    format = Format.PREFIXED
    _goneWaiters: tuple[Deferred[None], ...] = ()

    # The transport's write buffer is full; bytes handed to it since it filled.
    _paused = False
    _unsent = 0
    _maxQueue = Limits().maxQueue
    # No extension (compression) negotiated: a prepared frame's bytes are what goes on the wire.
    _plainFrames = False
    # Per-connection message rate limit, when there is one.
    _bucket: TokenBucket | None = None
    # What this connection counts as in the per-address limit, once counted.
    _hostKey: str | None = None
    # What it asked for in its URL's query: recover after a position, or the last N messages.
    _since: Position | None = None
    _last: int | None = None
    # Replaying history: bytes it may still write in this reactor turn, and the next turn's
    # continuation once scheduled.
    _replayBudget = 0
    _replayNext: IDelayedCall | None = None

    # The read side, apart from the write side's _paused: this connection's share of the
    # room's inbound work, and whether its reading is held back (transport.pauseProducing)
    # because it went over it, until _resumeCall.
    _budget: InboundBudget | None = None
    _readHeld = False
    _resumeCall: IDelayedCall | None = None
    # Bytes read but not parsed yet: the rest of a read when reading was held back.
    _unread = b""
    # Closed for what it sent: nothing more it sends is read.
    _refusing = False
    # Frames (and empty ones) of the message being received.
    _messageFrames = 0
    _emptyFrames = 0
    _maxMessageFrames = Limits().maxMessageFrames

    def connectionMade(self) -> None:
        # Autobahn's connection start, without its per-connection debug formatting: see
        # wschat.lean.connectionMade.
        if not lean.connectionMade(self):
            super().connectionMade()
        server = self.factory.chatServer
        limits = server.limits
        self._maxQueue = limits.maxQueue
        if limits.rateLimit:
            self._bucket = TokenBucket(limits.rateLimit, limits.rateBurst, server.reactor.seconds)
        if limits.inboundRate or limits.inboundBytes:
            self._budget = InboundBudget(
                limits.inboundRate, limits.inboundBytes, limits.inboundBurst, server.reactor.seconds
            )
        self._maxMessageFrames = limits.maxMessageFrames
        # Every Twisted stream transport (TCP, UNIX, TLS) is also a consumer.
        cast(IConsumer, self.transport).registerProducer(self, True)

    # -- IPushProducer: the transport's flow control

    def pauseProducing(self) -> None:
        # Called on every write while the buffer stays full, so it must not reset the count.
        self._paused = True
        transport = self.transport
        if isinstance(transport, fastwrite.FastTransport):
            # Its busy turns' frames now go one by one (takesShared), counted.
            transport.memberChanged()

    def resumeProducing(self) -> None:
        self._paused = False
        self._unsent = 0
        if self._replayNext is None and self.factory.chatServer.room.replaying(self):
            self._replay()

    def stopProducing(self) -> None:
        pass

    def _overQueue(self, size: int) -> bool:
        """
        Count ``size`` more bytes handed to the full transport; past ``--max-queue``, close
        this client (1008) and say so.
        """
        self._unsent += size
        if self._unsent > self._maxQueue:
            self._tooSlow()
            return True
        return False

    def _tooSlow(self) -> None:
        self._logLine(
            "Closing {peer}: more than {limit} bytes waiting to be sent",
            peer=self.address,
            limit=self._maxQueue,
        )
        self.factory.chatServer.metrics.clientDropped()
        closeWith(
            self, POLICY_VIOLATION, f"too slow: more than {self._maxQueue} bytes waiting to be sent"
        )

    # -- the WebSocket connection

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancelResume()
        self._unread = b""
        super().connectionLost(reason)
        if self._replayNext is not None and self._replayNext.active():
            self._replayNext.cancel()
        self._replayNext = None
        # A message cut off by the close: its fragments go now, not with the protocol.
        self.message_data = []
        # The dead transport still holds what it could not send (up to --max-queue and its
        # own 64 KiB). Autobahn's is_closed Deferred keeps this protocol in a reference
        # cycle that only a full garbage collection frees, so let go of the transport now.
        self.transport = None

    def unregisterProducer(self) -> None:
        # Autobahn unregisters on every drop, also from a timer (ping timeout) that runs after
        # the connection is gone: txaio runs a bucket of over 1000 timers in chunks, and a
        # timer of a later chunk cancelled in connectionLost runs anyway. Gone, there is no
        # transport (connectionLost let go of it) and nothing to unregister.
        if self.transport is not None:
            super().unregisterProducer()

    def onConnect(self, request: ConnectionRequest) -> tuple[str | None, dict[str, str]]:
        assert self.transport is not None
        server = self.factory.chatServer
        if server.shuttingDown:
            raise ConnectionDeny(ConnectionDeny.SERVICE_UNAVAILABLE, "server shutting down")
        headers = request.headers
        secure = ISSLTransport.providedBy(self.transport)
        if not server.origins.allows(request.origin, headers.get("host"), secure):
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, f"origin {request.origin} not allowed")
        peer = self.transport.getPeer()
        client = forwardedClient(headers.get("x-forwarded-for"), server.trustedHops)
        self.address = senderAddress(peer, client)
        self._askHistory()
        self._admit(client or peer)
        # Clients learn the largest message accepted, so they can refuse longer ones themselves.
        answer = {MAX_MESSAGE_SIZE_HEADER: str(server.limits.maxMessageSize)}
        if JSON_SUBPROTOCOL in request.protocols:
            self.format = Format.JSON
            return JSON_SUBPROTOCOL, answer
        self.format = server.room.format
        return None, answer

    def _askHistory(self) -> None:
        """
        Read ``since=EPOCH:SEQ`` and ``history=N`` from the URL's query; refuse (400) a
        malformed one, or any when history is off.
        """
        query = self.http_request_uri.partition("?")[2]
        if not query:
            return
        try:
            since, last = parseQuery(query)
        except BadQuery as e:
            raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, str(e)) from None
        if (since is not None or last is not None) and self.factory.chatServer.history is None:
            raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, "history is off")
        self._since, self._last = since, last

    def _admit(self, client: Any) -> None:
        """
        Count this connection against ``--max-connections-per-ip``, or refuse it.
        """
        counter = self.factory.chatServer.connectionsPerHost
        if not counter.limit:
            return
        key = hostKey(client)
        if key is None:
            return
        if not counter.acquire(key):
            raise ConnectionDeny(
                HTTP_TOO_MANY_REQUESTS,
                f"Too Many Requests: over {counter.limit} connections from {key}",
            )
        self._hostKey = key

    def onOpen(self) -> None:
        self._plainFrames = not self.websocket_extensions_in_use
        # An idle connection holds only what it still needs: see wschat.lean.
        lean.trimOpenConnection(self)
        server = self.factory.chatServer
        since = self._since
        if since is not None and server.history is not None:
            # A shared bus may first bring in what this daemon's window lacks: the client is
            # told whether it recovered, and joins, once that is known.
            filling = server.bus.backfill(since)
            if filling is not None:
                filling.addBoth(self._backfilled)
                return
        self._enter()

    def _backfilled(self, _: object) -> None:
        if self.state != _OPEN:
            return
        if self.factory.chatServer.shuttingDown:
            closeWith(self, GOING_AWAY, "server shutting down")
            return
        self._enter()

    def _enter(self) -> None:
        """Join the room: greeting, replay (if asked for), then live messages."""
        server = self.factory.chatServer
        room = server.room
        history = room.history
        start: int | None = None
        recovered: bool | None = None
        if history is not None and (self._since is not None or self._last is not None):
            start, recovered = history.start(self._since, self._last)
            if self._since is None:
                recovered = None
            else:
                server.metrics.recovery(recovered)
        # Join, greet and start the replay in one go: no message can come in between.
        writer = self.transport if self._plainFrames else None
        if not isinstance(writer, fastwrite.FastTransport):
            writer = None
        room.join(self, self.format, start, writer)
        server.metrics.connectionOpened()
        if server.logConnections:
            self._logLine("New connection from {peer}", peer=self.address)
        greeting = server.greeting(self, recovered)
        if greeting:
            self.sendMessage(greeting)
            server.metrics.delivered(1, len(greeting))
        if room.replaying(self):
            self._replay()
        room.announce("join", self.address, exclude=self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.state != WebSocketProtocol.STATE_OPEN:
            # We are closing this connection (refused, too slow): relay nothing more from it.
            return
        server = self.factory.chatServer
        server.metrics.messageReceived()
        bucket = self._bucket
        if bucket is not None and not bucket.take():
            self._logLine("Closing {peer}: rate limit exceeded", peer=self.address)
            server.metrics.messageRefused(REFUSED_RATE_LIMIT)
            closeWith(
                self,
                POLICY_VIOLATION,
                f"rate limit exceeded: over {bucket.rate:g} messages/s (burst {bucket.burst})",
            )
            return
        if isBinary and server.room.format is Format.PREFIXED:
            server.metrics.messageRefused(REFUSED_BINARY)
            closeWith(self, UNSUPPORTED_DATA, "binary messages are not accepted; send text")
            return
        message = Message(self.address, payload, isBinary)
        if self.format is Format.JSON and not isBinary:
            try:
                command = parseCommand(payload)
            except BadCommand as e:
                server.metrics.messageRefused(REFUSED_COMMAND)
                self._notice(str(e))
                return
            if command is not None:
                message = Message(self.address, command.text.encode("utf-8"), False, command.id)
        if server.logMessages:
            self._logMessage(message.payload, isBinary)
        server.bus.publish(message, self)

    def onPing(self, payload: bytes) -> None:
        if self.state != _OPEN:
            # Closing: no pong is due, and a client already dropped is not dropped again.
            return
        self._spend(1, len(payload))
        # A client that sends pings but reads nothing must not grow its queue of pongs.
        if self._paused and self._overQueue(len(payload) + 2):
            return
        super().onPing(payload)

    def onPong(self, payload: bytes) -> None:
        self._spend(1, len(payload))
        super().onPong(payload)

    # -- the read side: each connection's share of the room's inbound work

    def dataReceived(self, data: bytes) -> None:
        if self._refusing:
            return
        if self._budget is None:
            self._receive(data)
        elif self._readHeld or self._unread:
            # A transport may deliver what it had already read (TLS) after being paused.
            self._unread += data
        elif len(data) <= READ_SLICE:
            self._receive(data)
        else:
            self._unread = data
            self._parseUnread()

    def _parseUnread(self) -> None:
        """
        Parse what was read, a slice at a time, until it is all parsed or reading is held.
        """
        data, self._unread = self._unread, b""
        for offset in range(0, len(data), READ_SLICE):
            if self._readHeld:
                self._unread = data[offset:]
                return
            if self._refusing or self.transport is None:
                return
            self._receive(data[offset : offset + READ_SLICE])

    def _receive(self, data: bytes) -> None:
        """
        Parse ``data``: complete small messages here (wschat.lean.receiveFrames), anything
        else in Autobahn's frame parser.
        """
        if not lean.receiveFrames(self, data):
            super().dataReceived(data)

    def onMessageBegin(self, isBinary: bool) -> None:
        super().onMessageBegin(isBinary)
        self._messageFrames = self._emptyFrames = 0

    def onMessageFrameBegin(self, length: int) -> None:
        super().onMessageFrameBegin(length)
        self._messageFrames += 1
        if self._messageFrames > self._maxMessageFrames:
            self._refuse(
                MESSAGE_TOO_BIG, f"message too big: more than {self._maxMessageFrames} frames"
            )
            return
        if not length:
            self._emptyFrames += 1
            if self._emptyFrames > MAX_EMPTY_FRAMES:
                self._refuse(
                    POLICY_VIOLATION, f"more than {MAX_EMPTY_FRAMES} empty frames in a message"
                )
                return
        self._spend(1, length)

    def onMessageFrameData(self, payload: bytes) -> None:
        if not self._refusing:
            super().onMessageFrameData(payload)

    def onMessageFrame(self, payload: Any) -> None:
        if not self._refusing:
            super().onMessageFrame(payload)

    def _spend(self, frames: int, size: int) -> None:
        """
        Count a frame received against this connection's inbound share; over it, stop
        reading the connection until the share allows more, and past ``--inbound-hold``
        seconds without a break close it (1008).
        """
        budget = self._budget
        if budget is None:
            return
        wait = budget.spend(frames, size)
        # Closing, it is read on only for the peer's close frame (or not at all, refused).
        if not wait or self._readHeld or self.state != _OPEN:
            return
        server = self.factory.chatServer
        hold = server.limits.inboundHold
        if budget.overSince is not None and server.reactor.seconds() - budget.overSince > hold:
            self._refuse(
                POLICY_VIOLATION, f"sending too fast: over its inbound share for {hold:g} s"
            )
            return
        self._holdReading(wait)

    def _holdReading(self, wait: float) -> None:
        """Stop reading this connection for ``wait`` seconds."""
        if self.transport is None:
            return
        self._readHeld = True
        # The transport's own producer side: this stops reading; it is not our pauseProducing,
        # which the transport calls on us when its write buffer is full.
        self.transport.pauseProducing()  # type: ignore[attr-defined]
        self._resumeCall = self.factory.chatServer.reactor.callLater(wait, self._resumeReading)

    def _resumeReading(self) -> None:
        self._resumeCall = None
        self._readHeld = False
        if self.transport is None or self._refusing or self.state == WebSocketProtocol.STATE_CLOSED:
            return
        self.transport.resumeProducing()  # type: ignore[attr-defined]
        if self._unread:
            self._parseUnread()

    def _cancelResume(self) -> None:
        call, self._resumeCall = self._resumeCall, None
        if call is not None and call.active():
            call.cancel()

    def _refuse(self, code: int, reason: str) -> None:
        """
        Close this connection (``code``, ``reason``) for what it sent, and read nothing more
        from it: what it sends next is neither parsed nor kept.
        """
        if self._refusing or self.state != _OPEN:
            return
        self._refusing = True
        self._logLine("Closing {peer}: {reason}", peer=self.address, reason=reason)
        self._cancelResume()
        self._unread = b""
        self.message_data = []
        closeWith(self, code, reason)
        if self.transport is not None and not self._readHeld:
            self._readHeld = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        server = self.factory.chatServer
        if server.room.leave(self):
            server.metrics.connectionClosed(code)
            server.room.announce("leave", self.address)
        if self._hostKey is not None:
            server.connectionsPerHost.release(self._hostKey)
            self._hostKey = None
        if self.address and server.logConnections:
            self._logLine(
                "Connection from {peer} closed: code {code} {reason}",
                peer=self.address,
                code=code,
                # The client chose it: escaped, as all client text in the log.
                reason=escapeControls(reason or ""),
                wasClean=wasClean,
            )
        # Last: the last connection gone may stop the daemon (and flush the log) right here.
        self._fireGone()

    # -- replaying history (wschat.room.Replayer)

    def _replay(self) -> None:
        """
        Send history while the transport takes it: at most half of ``--max-queue`` (and
        64 KiB) a reactor turn, and none while the transport is paused; continue in the next
        turn, or when the transport drains. A write may wait in the transport (a turn's writes
        leave together at its end), so the budget, not only the pause, bounds what a replay
        holds: the socket's buffer plus ``--max-queue``, as for a slow live client.
        """
        self._replayNext = None
        room = self.factory.chatServer.room
        self._replayBudget = max(1, min(_REPLAY_CHUNK, self._maxQueue // 2))
        room.catchUp(self)
        if room.replaying(self) and self.state == _OPEN and not self._paused:
            # Out of budget for this turn, not out of room: carry on in the next one.
            self._replayNext = self.factory.chatServer.reactor.callLater(0, self._replay)

    def writable(self) -> bool:
        return self.state == _OPEN and not self._paused and self._replayBudget > 0

    def deliverNow(self, frame: PreparedMessage) -> None:
        data = frame.payloadHybi
        self._replayBudget -= len(data)
        if self._plainFrames:
            self.transport.write(data)  # type: ignore[union-attr]
        else:
            self.sendPreparedMessage(frame)

    def fellBehind(self) -> None:
        self._logLine(
            "Closing {peer}: its history replay fell out of the window", peer=self.address
        )
        self.factory.chatServer.metrics.clientDropped()
        closeWith(
            self,
            POLICY_VIOLATION,
            "too slow: the history replay fell out of the window; reconnect to recover",
        )

    def deliver(self, frame: PreparedMessage) -> None:
        # sendPreparedMessage does not check the state itself: a frame written after our
        # close frame would break the closing handshake.
        if self.state == _OPEN:
            # The hot path: one attribute test while the client keeps up.
            if self._paused and self._overQueue(len(frame.payloadHybi)):
                return
            if self._plainFrames:
                # This line runs for every client on every message. Autobahn would write the
                # same bytes (its sendData), and queues nothing of its own in front of them:
                # wschat never asks it for a chopped or sync send.
                self.transport.write(frame.payloadHybi)  # type: ignore[union-attr]
                return
            try:
                self.sendPreparedMessage(frame)
            except Disconnected:
                pass

    def takesShared(self) -> bool:
        """
        Whether a busy turn's frames may go to this client as the shared buffer: it is open
        and its transport has not paused it (else each frame goes through :meth:`deliver`).
        """
        return self.state == _OPEN and not self._paused

    def sendMessage(
        self,
        payload: bytes,
        isBinary: bool = False,
        fragmentSize: int | None = None,
        sync: bool = False,
        doNotCompress: bool = False,
    ) -> None:
        # --max-message-size bounds what clients send. Autobahn holds what this side sends to
        # the same option, and would refuse (PayloadExceededError) the server's own messages
        # under a small limit: the greeting, a JSON welcome, a notice and, with compression,
        # every relayed message. Lifted for the send, restored before anything is read again.
        own = self.__dict__.pop("maxMessagePayloadSize", _NO_LIMIT_SET)
        self.maxMessagePayloadSize = 0
        try:
            super().sendMessage(payload, isBinary, fragmentSize, sync, doNotCompress)
        finally:
            if own is _NO_LIMIT_SET:
                # The factory's value, shared by all connections (wschat.lean), shows again.
                del self.maxMessagePayloadSize
            else:
                self.maxMessagePayloadSize = own

    def refused(self, reason: str) -> None:
        """
        Tell this client the bus did not relay its message: the text ``wschat: <reason>``,
        or a JSON ``notice`` object.
        """
        self.factory.chatServer.metrics.messageRefused(REFUSED_RELAY)
        self._notice(reason)

    def _notice(self, reason: str) -> None:
        """
        Tell this client alone something: the text ``wschat: <reason>``, or a JSON ``notice``.
        """
        if self.state == WebSocketProtocol.STATE_OPEN:
            if self.format is Format.JSON:
                notice = jsonNotice(reason, self.factory.chatServer.reactor.seconds())
            else:
                notice = b"wschat: " + reason.encode("utf-8")
            self._sendOwn(notice)

    def duplicate(self, mid: str, position: Position) -> None:
        """
        Tell this client its message ``mid`` was already relayed (at ``position``) and so
        was not relayed again: a JSON ``duplicate`` object (only JSON clients send ids).
        """
        server = self.factory.chatServer
        server.metrics.duplicateRefused()
        if self.state == WebSocketProtocol.STATE_OPEN:
            self._sendOwn(jsonDuplicate(mid, position.epoch, position.seq))

    def _sendOwn(self, payload: bytes) -> None:
        """
        Send this open client a text message of the daemon's own (a notice, an answer),
        counted against ``--max-queue`` while its transport is paused: a client that sends
        but never reads must not grow its queue of answers either.
        """
        if self._paused and self._overQueue(len(payload) + 2):
            return
        self.sendMessage(payload)

    def goAway(self) -> Deferred[None]:
        """
        Close with 1001 going away (the daemon is stopping); fires once the connection is gone.
        """
        gone: Deferred[None] = Deferred()
        self._goneWaiters += (gone,)
        closeWith(self, GOING_AWAY, "server shutting down")
        return gone

    def abort(self) -> None:
        """Drop the connection at the TCP level, without waiting for any handshake."""
        if self.transport is not None:
            # TCP, TLS and UNIX transports all abort; anything else can only be asked to close.
            abort = getattr(self.transport, "abortConnection", self.transport.loseConnection)
            abort()

    def _logLine(self, format: str, **fields: Any) -> None:
        # At the end of the reactor turn, with the connection lines of other clients:
        # see wschat.turnlog.
        # The class's Logger with this connection as the source: what ``self._log`` would
        # make (a new Logger on every access) without making it.
        self.factory.chatServer.lines.info(_LINES_LOG, format, log_source=self, **fields)

    def _fireGone(self) -> None:
        waiters, self._goneWaiters = self._goneWaiters, ()
        for gone in waiters:
            gone.callback(None)

    def _logMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self._logLine(
                "From client {peer}: <{size} bytes binary>", peer=self.address, size=len(payload)
            )
        else:
            # Escaped: one message, one log line, no terminal control codes from clients.
            self._logLine(
                "From client {peer}: {text}",
                peer=self.address,
                text=escapeControls(payload.decode("utf-8")),
            )

    def failHandshake(
        self, reason: str, code: int = 400, responseHeaders: list[tuple[str, str]] | None = None
    ) -> None:
        # Autobahn logs the reason and answers it as the HTTP status text; reasons quote what
        # the client sent (its Origin, method, request line): escaped, for both.
        super().failHandshake(escapeControls(reason), code, responseHeaders)


#: The Logger ``ChatServerProtocol._log`` is on a connection, but for its source.
_LINES_LOG = Logger(namespace=f"{ChatServerProtocol.__module__}.{ChatServerProtocol.__name__}")


class ChatServerFactory(WebSocketServerFactory):
    """
    Builds :class:`ChatServerProtocol` instances for ``chatServer``, with Autobahn's options
    set from its limits. (Autobahn's own ``server`` attribute is the Server header.)
    """

    protocol = ChatServerProtocol  # type: ignore[assignment]
    noisy = False  # no "Starting factory" line at start
    #: Handshakes answered by wschat.lean.openHandshake rather than Autobahn's.
    leanHandshakes = 0

    def __init__(self, chatServer: ChatServer, **kwargs: Any) -> None:
        kwargs.setdefault("server", "wschat")
        kwargs.setdefault("reactor", chatServer.reactor)
        super().__init__(**kwargs)
        self.chatServer = chatServer
        limits = chatServer.limits
        self.setProtocolOptions(
            maxFramePayloadSize=limits.maxMessageSize,
            maxMessagePayloadSize=limits.maxMessageSize,
            autoPingInterval=limits.pingInterval,
            autoPingTimeout=limits.pingTimeout,
            openHandshakeTimeout=limits.handshakeTimeout,
            maxConnections=limits.maxConnections,
            # Protocol errors get a close frame with their code (1002, 1007, 1009) and reason,
            # and the messages before the bad frame still go out, instead of a bare TCP drop.
            failByDrop=False,
            # No Autobahn status page for a request without Upgrade (those go to the web site
            # anyway), nor its ?redirect=URL, which redirects anywhere.
            webStatus=False,
            perMessageCompressionAccept=acceptDeflate if chatServer.compression else None,
            # Autobahn's own origin check cannot compare with the Host header and answers 400;
            # it lets every origin through and onConnect applies the server's origin policy
            # with a 403.
            allowedOrigins=["*"],
            allowNullOrigin=True,
        )

    def buildProtocol(self, addr: Any) -> Any:
        # Options as class attributes, not copied onto every connection: see wschat.lean.
        p: ChatServerProtocol = lean.protocolClass(self)()
        p.factory = self
        return p


def acceptDeflate(offers: list[Any]) -> PerMessageDeflateOfferAccept | None:
    """
    Accept the client's first permessage-deflate offer, as the client made it.
    """
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(offer)
    return None
