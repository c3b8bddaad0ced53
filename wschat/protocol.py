"""
The WebSocket side of the daemon: one protocol per connection, one factory holding the room.

Wire protocol (see also :mod:`wschat.wire` and the README):

- The opening handshake is plain RFC 6455; no subprotocol is required.
- On open the server sends the greeting (``--welcome``) as one text message, unless it is empty.
- Each message a client sends is relayed to every open connection, sender included, in the
  daemon's ``--format``. In ``prefixed`` format a binary message is refused with close 1003.
- Messages from one sender are relayed in the order sent, and every client sees one and the
  same order, because one reactor thread relays each message to all before the next.
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

from wschat.closing import closeAll, sendCloseCode
from wschat.handshake import OriginPolicy, senderAddress
from wschat.room import Room
from wschat.wire import Format, Message

DEFAULT_WELCOME = "Welcome to chat! Type a message"


class ChatServerProtocol(WebSocketServerProtocol):
    """One client connection: hands what it receives to the room, and delivers the room's frames."""

    _log = Logger()
    factory: ChatServerFactory
    address = ""
    _goneWaiters: tuple[Deferred[None], ...] = ()

    def onConnect(self, request: ConnectionRequest) -> None:
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

    def onOpen(self) -> None:
        self.factory.room.join(self)
        self._log.info("New connection from {peer}", peer=self.address)
        if self.factory.welcome:
            self.sendMessage(self.factory.welcome)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        factory = self.factory
        if isBinary and factory.room.format is Format.PREFIXED:
            self.sendClose(
                WebSocketProtocol.CLOSE_STATUS_CODE_UNSUPPORTED_DATA,
                "binary messages are not accepted; send text",
            )
            return
        if factory.logMessages:
            self._logMessage(payload, isBinary)
        factory.room.broadcast(Message(self.address, payload, isBinary))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.room.leave(self)
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

    def goAway(self) -> Deferred[None]:
        """
        Close with 1001 going away (the daemon is stopping); fires once the connection is gone.
        """
        gone: Deferred[None] = Deferred()
        self._goneWaiters += (gone,)
        sendCloseCode(self, WebSocketProtocol.CLOSE_STATUS_CODE_GOING_AWAY, "server shutting down")
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
        self.room = Room(self.prepareMessage, fmt)
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
