"""
The WebSocket side of the daemon: one protocol per connection, one factory holding the room.

Wire protocol (see also :mod:`wschat.wire` and the README):

- The opening handshake is plain RFC 6455; no subprotocol is required.
- On open the server sends the greeting (``--welcome``) as one text message, unless it is empty.
- Each message a client sends is relayed to every open connection, sender included, in the
  daemon's ``--format``. In ``prefixed`` format a binary message is refused with close 1003.
- Messages from one sender are relayed in the order sent, and every client sees one and the
  same order, because one reactor thread relays each message to all before the next.
- With ``--redis`` the room spans daemons (:mod:`wschat.bus`); a message the bus cannot relay
  gets its sender a text notice ``wschat: <reason>`` instead, and the connection stays open.
"""

from __future__ import annotations

from typing import Any

from autobahn.exception import Disconnected
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import PreparedMessage, WebSocketProtocol
from autobahn.websocket.types import ConnectionRequest
from twisted.logger import Logger

from wschat.bus import Bus, LocalBus
from wschat.room import Room
from wschat.wire import Format, Message, formatAddress

DEFAULT_WELCOME = "Welcome to chat! Type a message"


class ChatServerProtocol(WebSocketServerProtocol):
    """One client connection: hands what it receives to the room, and delivers the room's frames."""

    _log = Logger()
    factory: ChatServerFactory
    address = ""

    def onConnect(self, request: ConnectionRequest) -> None:
        assert self.transport is not None
        self.address = formatAddress(self.transport.getPeer())

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
        factory.bus.publish(Message(self.address, payload, isBinary), self)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.room.leave(self)
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
        Tell this client the bus did not relay its message (``wschat: <reason>``, text).
        """
        if self.state == WebSocketProtocol.STATE_OPEN:
            self.sendMessage(b"wschat: " + reason.encode("utf-8"))

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
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("server", "wschat")
        super().__init__(**kwargs)
        self.room = Room(self.prepareMessage, fmt)
        # Where received messages go: this room, or (--redis) every daemon's room.
        self.bus: Bus = LocalBus(self.room)
        self.welcome = welcome.encode("utf-8")
        self.logMessages = logMessages
