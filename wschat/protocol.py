"""
The WebSocket side of the daemon: one protocol per connection, one factory holding the room.

Wire protocol (see also :mod:`wschat.wire` and the README):

- The opening handshake is plain RFC 6455; no subprotocol is required. A client that offers the
  subprotocol ``wschat.json`` gets it, and receives JSON objects instead (:mod:`wschat.wire`):
  a ``welcome``, every ``message``, and ``join``/``leave`` events for the others.
- On open the server sends the greeting (``--welcome``) as one text message, unless it is empty.
- Each message a client sends is relayed to every open connection, sender included, in the
  daemon's ``--format``. In ``prefixed`` format a binary message is refused with close 1003.
- Messages from one sender are relayed in the order sent, and every client sees one and the
  same order, because one reactor thread relays each message to all before the next.
- With ``--redis`` the room spans daemons (:mod:`wschat.bus`); a message the bus cannot relay
  gets its sender a text notice ``wschat: <reason>`` instead, and the connection stays open.
- A handshake whose ``Origin`` is neither the daemon's own nor allowed gets HTTP 403 (see
  :mod:`wschat.handshake`); one arriving while the daemon stops gets 503.
- Limits (:mod:`wschat.limits`, README "Limits and hostile input"): a client whose unsent
  backlog passes ``--max-queue`` is closed with 1008; one sending faster than ``--rate-limit``
  is closed with 1008; a message over ``--max-message-size`` gets 1009, invalid UTF-8 1007,
  a protocol error 1002. A handshake past ``--max-connections`` gets HTTP 503, past
  ``--max-connections-per-ip`` HTTP 429.
- When the daemon stops, every connection is closed with 1001 (going away).
"""

from __future__ import annotations

from typing import Any, cast

from autobahn.exception import Disconnected
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from autobahn.websocket.protocol import PreparedMessage, WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IPushProducer, IReactorTime, ISSLTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from wschat import fastwrite, lean
from wschat.bus import Bus, LocalBus
from wschat.closing import (
    GOING_AWAY,
    POLICY_VIOLATION,
    UNSUPPORTED_DATA,
    closeAll,
    closeWith,
)
from wschat.handshake import OriginPolicy, forwardedClient, senderAddress
from wschat.limits import ConnectionCounter, Limits, TokenBucket, hostKey
from wschat.metrics import REFUSED_BINARY, REFUSED_RATE_LIMIT, REFUSED_RELAY, Metrics
from wschat.room import Room
from wschat.wire import (
    JSON_SUBPROTOCOL,
    Format,
    Message,
    jsonNotice,
    jsonWelcome,
)

_OPEN = WebSocketProtocol.STATE_OPEN

DEFAULT_WELCOME = "Welcome to chat! Type a message"

#: Handshake response header naming ``--max-message-size`` in bytes.
MAX_MESSAGE_SIZE_HEADER = "X-WSChat-Max-Message-Size"

#: HTTP status for a handshake past ``--max-connections-per-ip``.
HTTP_TOO_MANY_REQUESTS = 429


@implementer(IPushProducer)
# (mypy compares Autobahn's own base classes once there are two bases: not ours to fix.)
class ChatServerProtocol(fastwrite.FastDelivery, WebSocketServerProtocol):  # type: ignore[misc]
    """
    One client connection: hands what it receives to the room, and delivers the room's frames.

    It is its transport's streaming producer: the transport pauses it when its write buffer
    is full and resumes it when the buffer has drained. While paused, deliveries still go
    to the transport but are counted; past ``--max-queue`` bytes the client is closed.
    """

    _log = Logger()
    factory: ChatServerFactory
    address = ""
    #: What this connection receives: the room's format, or JSON if it asked for it.
    format = Format.PREFIXED
    _goneWaiters: tuple[Deferred[None], ...] = ()

    # The transport's write buffer is full; bytes handed to it since it filled.
    _paused = False
    _unsent = 0
    _maxQueue = Limits().maxQueue
    # Per-connection message rate limit, when there is one.
    _bucket: TokenBucket | None = None
    # What this connection counts as in the per-address limit, once counted.
    _hostKey: str | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        limits = self.factory.limits
        self._maxQueue = limits.maxQueue
        if limits.rateLimit:
            self._bucket = TokenBucket(
                limits.rateLimit, limits.rateBurst, self.factory.reactor.seconds
            )
        # Every Twisted stream transport (TCP, UNIX, TLS) is also a consumer.
        cast(IConsumer, self.transport).registerProducer(self, True)

    # -- IPushProducer: the transport's flow control

    def pauseProducing(self) -> None:
        # Called on every write while the buffer stays full, so it must not reset the count.
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._unsent = 0

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
        self._log.info(
            "Closing {peer}: more than {limit} bytes waiting to be sent",
            peer=self.address,
            limit=self._maxQueue,
        )
        self.factory.metrics.clientDropped()
        closeWith(
            self, POLICY_VIOLATION, f"too slow: more than {self._maxQueue} bytes waiting to be sent"
        )

    # -- the WebSocket connection

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.forgetWriter()
        # The dead transport still holds what it could not send (up to --max-queue and its
        # own 64 KiB). Autobahn's is_closed Deferred keeps this protocol in a reference
        # cycle that only a full garbage collection frees, so let go of the transport now.
        self.transport = None

    def onConnect(self, request: ConnectionRequest) -> tuple[str | None, dict[str, str]]:
        assert self.transport is not None
        factory = self.factory
        if factory.shuttingDown:
            raise ConnectionDeny(ConnectionDeny.SERVICE_UNAVAILABLE, "server shutting down")
        headers = request.headers
        secure = ISSLTransport.providedBy(self.transport)
        if not factory.origins.allows(request.origin, headers.get("host"), secure):
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, f"origin {request.origin} not allowed")
        peer = self.transport.getPeer()
        client = forwardedClient(headers.get("x-forwarded-for"), factory.trustedHops)
        self.address = senderAddress(peer, client)
        self._admit(client or peer)
        # Clients learn the largest message accepted, so they can refuse longer ones themselves.
        answer = {MAX_MESSAGE_SIZE_HEADER: str(factory.limits.maxMessageSize)}
        if JSON_SUBPROTOCOL in request.protocols:
            self.format = Format.JSON
            return JSON_SUBPROTOCOL, answer
        self.format = factory.room.format
        return None, answer

    def _admit(self, client: Any) -> None:
        """
        Count this connection against ``--max-connections-per-ip``, or refuse it.
        """
        counter = self.factory.connectionsPerHost
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
        factory = self.factory
        factory.room.join(self, self.format)
        factory.metrics.connectionOpened()
        if factory.logConnections:
            self._log.info("New connection from {peer}", peer=self.address)
        greeting = factory.greeting(self)
        if greeting:
            self.sendMessage(greeting)
            factory.metrics.delivered(1, len(greeting))
        factory.room.announce("join", self.address, exclude=self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.state != WebSocketProtocol.STATE_OPEN:
            # We are closing this connection (refused, too slow): relay nothing more from it.
            return
        factory = self.factory
        factory.metrics.messageReceived()
        bucket = self._bucket
        if bucket is not None and not bucket.take():
            self._log.info("Closing {peer}: rate limit exceeded", peer=self.address)
            factory.metrics.messageRefused(REFUSED_RATE_LIMIT)
            closeWith(
                self,
                POLICY_VIOLATION,
                f"rate limit exceeded: over {bucket.rate:g} messages/s (burst {bucket.burst})",
            )
            return
        if isBinary and factory.room.format is Format.PREFIXED:
            factory.metrics.messageRefused(REFUSED_BINARY)
            closeWith(self, UNSUPPORTED_DATA, "binary messages are not accepted; send text")
            return
        if factory.logMessages:
            self._logMessage(payload, isBinary)
        factory.bus.publish(Message(self.address, payload, isBinary), self)

    def onPing(self, payload: bytes) -> None:
        # A client that sends pings but reads nothing must not grow its queue of pongs.
        if self._paused and self._overQueue(len(payload) + 2):
            return
        super().onPing(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        factory = self.factory
        if factory.room.leave(self):
            factory.metrics.connectionClosed(code)
            factory.room.announce("leave", self.address)
        if self._hostKey is not None:
            factory.connectionsPerHost.release(self._hostKey)
            self._hostKey = None
        self._fireGone()
        if self.address and factory.logConnections:
            self._log.info(
                "Connection from {peer} closed: code {code} {reason}",
                peer=self.address,
                code=code,
                reason=reason or "",
                wasClean=wasClean,
            )

    def deliver(self, frame: PreparedMessage) -> None:
        # sendPreparedMessage does not check the state itself: a frame written after our
        # close frame would break the closing handshake.
        if self.state == _OPEN:
            # The hot path: one attribute test while the client keeps up.
            if self._paused and self._overQueue(len(frame.payloadHybi)):
                return
            w = self._writer
            if w:
                # The fast path, inlined: this line runs for every client on every message.
                w.write(frame.payloadHybi)
                return
            try:
                self.sendPreparedFast(frame)
            except Disconnected:
                pass

    def refused(self, reason: str) -> None:
        """
        Tell this client the bus did not relay its message: the text ``wschat: <reason>``,
        or a JSON ``notice`` object.
        """
        factory = self.factory
        factory.metrics.messageRefused(REFUSED_RELAY)
        if self.state == WebSocketProtocol.STATE_OPEN:
            if self.format is Format.JSON:
                notice = jsonNotice(reason, factory.reactor.seconds())
            else:
                notice = b"wschat: " + reason.encode("utf-8")
            # A client that sends but never reads must not grow its queue of notices either.
            if self._paused and self._overQueue(len(notice) + 2):
                return
            self.sendMessage(notice)

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

    def _fireGone(self) -> None:
        waiters, self._goneWaiters = self._goneWaiters, ()
        for gone in waiters:
            gone.callback(None)

    def _logMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self._log.info(
                "From client {peer}: <{size} bytes binary>", peer=self.address, size=len(payload)
            )
        else:
            self._log.info(
                "From client {peer}: {text}", peer=self.address, text=payload.decode("utf-8")
            )


class ChatServerFactory(WebSocketServerFactory):
    """
    Builds :class:`ChatServerProtocol` instances and keeps the :class:`Room` they share.
    """

    protocol = ChatServerProtocol  # type: ignore[assignment]

    def __init__(
        self,
        *,
        fmt: Format = Format.PREFIXED,
        welcome: str = DEFAULT_WELCOME,
        logMessages: bool = True,
        logConnections: bool = True,
        metrics: Metrics | None = None,
        origins: OriginPolicy | None = None,
        trustedHops: int = 0,
        limits: Limits | None = None,
        compression: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("server", "wschat")
        super().__init__(**kwargs)
        self.limits = limits = limits or Limits()
        self.connectionsPerHost = ConnectionCounter(limits.maxConnectionsPerIp)
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
            perMessageCompressionAccept=acceptDeflate if compression else None,
            # Autobahn's own origin check cannot compare with the Host header and answers 400;
            # it lets every origin through and onConnect applies ``origins`` with a 403.
            allowedOrigins=["*"],
            allowNullOrigin=True,
        )
        self.metrics = metrics if metrics is not None else Metrics()
        self.room = Room(self.prepareMessage, fmt, metrics=self.metrics, now=self.reactor.seconds)
        # Where received messages go: this room, or (--redis) every daemon's room.
        self.bus: Bus = LocalBus(self.room)
        self.welcome = welcome.encode("utf-8")
        self.logMessages = logMessages
        self.logConnections = logConnections
        self.origins = origins if origins is not None else OriginPolicy()
        self.trustedHops = trustedHops
        self.shuttingDown = False

    def shutDown(self, timeout: float, clock: IReactorTime) -> Deferred[None]:
        """
        Refuse new handshakes (503), close every open connection with 1001, and fire once all
        are gone; connections still there after ``timeout`` seconds are dropped.
        """
        self.shuttingDown = True
        members = [m for m in self.room if isinstance(m, ChatServerProtocol)]
        return closeAll(members, timeout, clock)

    def buildProtocol(self, addr: Any) -> Any:
        # Options as class attributes, not copied onto every connection: see wschat.lean.
        p: ChatServerProtocol = lean.protocolClass(self)()
        p.factory = self
        return p

    def greeting(self, connection: ChatServerProtocol) -> bytes:
        """
        What ``connection`` receives first: the ``--welcome`` text, or for a JSON client
        a ``welcome`` object (always, since it tells the client its own address).
        """
        if connection.format is Format.JSON:
            text = self.welcome.decode("utf-8")
            return jsonWelcome(connection.address, len(self.room), text, self.reactor.seconds())
        return self.welcome


def acceptDeflate(offers: list[Any]) -> PerMessageDeflateOfferAccept | None:
    """
    Accept the client's first permessage-deflate offer, as the client made it.
    """
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(offer)
    return None
