"""
The WebSocket side of the daemon: one protocol per connection, one factory holding the room.

Wire protocol (see also :mod:`wschat.wire` and the README):

- The opening handshake is plain RFC 6455; no subprotocol is required.
- On open the server sends the greeting (``--welcome``) as one text message, unless it is empty.
- Each message a client sends is relayed to every open connection, sender included, in the
  daemon's ``--format``. In ``prefixed`` format a binary message is refused with close 1003.
- Messages from one sender are relayed in the order sent, and every client sees one and the
  same order, because one reactor thread relays each message to all before the next.
- Limits (:mod:`wschat.limits`, README "Limits and hostile input"): a client whose unsent
  backlog passes ``--max-queue`` is closed with 1008; one sending faster than ``--rate-limit``
  is closed with 1008; a message over ``--max-message-size`` gets 1009, invalid UTF-8 1007,
  a protocol error 1002. A handshake past ``--max-connections`` gets HTTP 503, past
  ``--max-connections-per-ip`` HTTP 429; a request that is not a WebSocket upgrade gets 426.
"""

from __future__ import annotations

from typing import Any, cast

from autobahn.exception import Disconnected
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from autobahn.websocket.protocol import PreparedMessage, WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from wschat.closing import sendCloseCode
from wschat.limits import MAX_REQUEST_HEAD, ConnectionCounter, Limits, TokenBucket, hostKey
from wschat.room import Room
from wschat.wire import Format, Message, formatAddress

DEFAULT_WELCOME = "Welcome to chat! Type a message"

#: Close code for a client refused by policy: too slow a reader, or too fast a sender.
CLOSE_POLICY_VIOLATION = WebSocketProtocol.CLOSE_STATUS_CODE_POLICY_VIOLATION  # 1008

#: HTTP status for a handshake past ``--max-connections-per-ip``.
HTTP_TOO_MANY_REQUESTS = 429


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
    address = ""

    # The transport's write buffer is full; bytes handed to it since it filled.
    _paused = False
    _unsent = 0
    _maxQueue = Limits().maxQueue
    # Per-connection message rate limit, when there is one.
    _bucket: TokenBucket | None = None
    # Bytes received before the opening handshake completed.
    _headBytes = 0
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
        consumer = cast(IConsumer, self.transport)
        try:
            consumer.registerProducer(self, True)
        except RuntimeError:
            # A transport taken over from another protocol (an HTTP channel handing its
            # connection to a WebSocket resource) may still name that one as its producer.
            consumer.unregisterProducer()
            consumer.registerProducer(self, True)

    # -- IPushProducer: the transport's flow control

    def pauseProducing(self) -> None:
        # Called on every write while the buffer stays full, so it must not reset the count.
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._unsent = 0

    def stopProducing(self) -> None:
        pass

    def _tooSlow(self) -> None:
        self._log.info(
            "Closing {peer}: more than {limit} bytes waiting to be sent",
            peer=self.address,
            limit=self._maxQueue,
        )
        sendCloseCode(
            self,
            CLOSE_POLICY_VIOLATION,
            f"too slow: more than {self._maxQueue} bytes waiting to be sent",
        )

    # -- the WebSocket connection

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self.state == WebSocketProtocol.STATE_CONNECTING:
            # Still no complete request head: do not buffer it without bound.
            self._headBytes += len(data)
            if self._headBytes > MAX_REQUEST_HEAD:
                self.failHandshake(
                    f"Request Header Fields Too Large (over {MAX_REQUEST_HEAD} bytes)", 431
                )

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        # The dead transport still holds what it could not send (up to --max-queue and its
        # own 64 KiB). Autobahn's is_closed Deferred keeps this protocol in a reference
        # cycle that only a full garbage collection frees, so let go of the transport now.
        self.transport = None

    def onConnect(self, request: ConnectionRequest) -> None:
        assert self.transport is not None
        self.address = formatAddress(self.transport.getPeer())
        self._admit()

    def onOpen(self) -> None:
        self.factory.room.join(self)
        self._log.info("New connection from {peer}", peer=self.address)
        if self.factory.welcome:
            self.sendMessage(self.factory.welcome)

    def _admit(self) -> None:
        """
        Count this connection against ``--max-connections-per-ip``, or refuse it.
        """
        counter = self.factory.connectionsPerHost
        if not counter.limit:
            return
        assert self.transport is not None
        key = hostKey(self.transport.getPeer())
        if key is None:
            return
        if not counter.acquire(key):
            raise ConnectionDeny(
                HTTP_TOO_MANY_REQUESTS,
                f"Too Many Requests: over {counter.limit} connections from {key}",
            )
        self._hostKey = key

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.state != WebSocketProtocol.STATE_OPEN:
            # We are closing this connection (refused, too slow): relay nothing more from it.
            return
        bucket = self._bucket
        if bucket is not None and not bucket.take():
            self._log.info("Closing {peer}: rate limit exceeded", peer=self.address)
            sendCloseCode(
                self,
                CLOSE_POLICY_VIOLATION,
                f"rate limit exceeded: over {bucket.rate:g} messages/s (burst {bucket.burst})",
            )
            return
        factory = self.factory
        if isBinary and factory.room.format is Format.PREFIXED:
            sendCloseCode(
                self,
                WebSocketProtocol.CLOSE_STATUS_CODE_UNSUPPORTED_DATA,
                "binary messages are not accepted; send text",
            )
            return
        if factory.logMessages:
            self._logMessage(payload, isBinary)
        factory.room.broadcast(Message(self.address, payload, isBinary))

    def onPing(self, payload: bytes) -> None:
        # A client that sends pings but reads nothing must not grow its queue of pongs.
        if self._paused:
            self._unsent += len(payload) + 2
            if self._unsent > self._maxQueue:
                self._tooSlow()
                return
        super().onPing(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.room.leave(self)
        if self._hostKey is not None:
            self.factory.connectionsPerHost.release(self._hostKey)
            self._hostKey = None
        if self.address:
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
        if self.state == WebSocketProtocol.STATE_OPEN:
            # The hot path: one attribute test while the client keeps up.
            if self._paused:
                self._unsent += len(frame.payloadHybi)
                if self._unsent > self._maxQueue:
                    self._tooSlow()
                    return
            try:
                self.sendPreparedMessage(frame)
            except Disconnected:
                pass

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
        limits: Limits | None = None,
        compression: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("server", "wschat")
        super().__init__(**kwargs)
        self.room = Room(self.prepareMessage, fmt)
        self.welcome = welcome.encode("utf-8")
        self.logMessages = logMessages
        self.limits = limits = limits or Limits()
        self.connectionsPerHost = ConnectionCounter(limits.maxConnectionsPerIp)
        self.setProtocolOptions(
            maxFramePayloadSize=limits.maxMessageSize,
            maxMessagePayloadSize=limits.maxMessageSize,
            autoPingInterval=limits.pingInterval,
            autoPingTimeout=limits.pingTimeout,
            openHandshakeTimeout=limits.handshakeTimeout,
            maxConnections=limits.maxConnections,
            # Fail with a close frame and code (1002, 1007, 1009), not a bare TCP drop.
            failByDrop=False,
            # A plain HTTP request gets 426 Upgrade Required, not Autobahn's status page
            # (which also answers ?redirect=URL with a redirect anywhere).
            webStatus=False,
            perMessageCompressionAccept=acceptDeflate if compression else None,
            # setProtocolOptions resets this one unless given: keep what is set.
            allowNullOrigin=self.allowNullOrigin,
        )


def acceptDeflate(offers: list[Any]) -> PerMessageDeflateOfferAccept | None:
    """
    Accept the client's first permessage-deflate offer, as the client made it.
    """
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(offer)
    return None
