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
- When the daemon stops, every connection is closed with 1001 (going away).
"""

from __future__ import annotations

from typing import Any

from autobahn.exception import Disconnected
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import PreparedMessage, WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, ISSLTransport
from twisted.logger import Logger

from wschat.bus import Bus, LocalBus
from wschat.closing import GOING_AWAY, UNSUPPORTED_DATA, closeAll, closeWith
from wschat.handshake import OriginPolicy, senderAddress
from wschat.metrics import Metrics
from wschat.room import Room
from wschat.wire import (
    JSON_SUBPROTOCOL,
    Format,
    Message,
    jsonNotice,
    jsonWelcome,
)

DEFAULT_WELCOME = "Welcome to chat! Type a message"


class ChatServerProtocol(WebSocketServerProtocol):
    """One client connection: hands what it receives to the room, and delivers the room's frames."""

    _log = Logger()
    factory: ChatServerFactory
    address = ""
    #: What this connection receives: the room's format, or JSON if it asked for it.
    format = Format.PREFIXED
    _goneWaiters: tuple[Deferred[None], ...] = ()

    def onConnect(self, request: ConnectionRequest) -> str | None:
        assert self.transport is not None
        factory = self.factory
        if factory.shuttingDown:
            raise ConnectionDeny(ConnectionDeny.SERVICE_UNAVAILABLE, "server shutting down")
        headers = request.headers
        secure = ISSLTransport.providedBy(self.transport)
        if not factory.origins.allows(request.origin, headers.get("host"), secure):
            raise ConnectionDeny(ConnectionDeny.FORBIDDEN, f"origin {request.origin} not allowed")
        self.address = senderAddress(
            self.transport.getPeer(), headers.get("x-forwarded-for"), factory.trustedHops
        )
        if JSON_SUBPROTOCOL in request.protocols:
            self.format = Format.JSON
            return JSON_SUBPROTOCOL
        self.format = factory.room.format
        return None

    def onOpen(self) -> None:
        factory = self.factory
        factory.room.join(self, self.format)
        factory.metrics.connectionOpened()
        self._log.info("New connection from {peer}", peer=self.address)
        greeting = factory.greeting(self)
        if greeting:
            self.sendMessage(greeting)
            factory.metrics.delivered(1, len(greeting))
        factory.room.announce("join", self.address, exclude=self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        factory = self.factory
        factory.metrics.messageReceived()
        if isBinary and factory.room.format is Format.PREFIXED:
            closeWith(self, UNSUPPORTED_DATA, "binary messages are not accepted; send text")
            return
        if factory.logMessages:
            self._logMessage(payload, isBinary)
        factory.bus.publish(Message(self.address, payload, isBinary), self)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.factory.room.leave(self):
            self.factory.metrics.connectionClosed(code)
            self.factory.room.announce("leave", self.address)
        self._fireGone()
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
            try:
                self.sendPreparedMessage(frame)
            except Disconnected:
                pass

    def refused(self, reason: str) -> None:
        """
        Tell this client the bus did not relay its message: the text ``wschat: <reason>``,
        or a JSON ``notice`` object.
        """
        factory = self.factory
        factory.metrics.messageRefused("relay unavailable")
        if self.state == WebSocketProtocol.STATE_OPEN:
            if self.format is Format.JSON:
                self.sendMessage(jsonNotice(reason, factory.reactor.seconds()))
            else:
                self.sendMessage(b"wschat: " + reason.encode("utf-8"))

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
        metrics: Metrics | None = None,
        origins: OriginPolicy | None = None,
        trustedHops: int = 0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("server", "wschat")
        super().__init__(**kwargs)
        self.setProtocolOptions(
            # Protocol errors get a close frame with their code (1002, 1007) and reason, and the
            # messages before the bad frame still go out, instead of a bare TCP drop.
            failByDrop=False,
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

    def greeting(self, connection: ChatServerProtocol) -> bytes:
        """
        What ``connection`` receives first: the ``--welcome`` text, or for a JSON client
        a ``welcome`` object (always, since it tells the client its own address).
        """
        if connection.format is Format.JSON:
            text = self.welcome.decode("utf-8")
            return jsonWelcome(connection.address, len(self.room), text, self.reactor.seconds())
        return self.welcome
