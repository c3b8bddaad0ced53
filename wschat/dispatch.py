"""
One port, two protocols: each connection goes to the room's WebSocket protocol or to the web
site (page, health, metrics), by the head of its first request.

Every byte read so far goes along with the connection, so nothing a client sends right behind
its handshake is lost, and a WebSocket handshake is parsed once, by Autobahn. (Twisted web's
``WebSocketResource`` route parses it twice, drops bytes that follow the head, and leaves an
HTTP channel behind for every WebSocket connection.)
"""

from __future__ import annotations

from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.python.failure import Failure

from wschat.limits import MAX_REQUEST_HEAD

#: The longest request head taken; past it, HTTP 431.
MAX_HEAD = MAX_REQUEST_HEAD

#: Seconds a refused connection is read from, and discarded, before it is dropped.
LINGER = 2.0

TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"Connection: close\r\nContent-Length: 0\r\n\r\n"
)


def isWebSocketUpgrade(head: bytes) -> bool:
    """
    Whether an HTTP request head (request line and headers) asks to upgrade to WebSocket.
    """
    for line in head.split(b"\r\n")[1:]:
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"upgrade":
            if any(token.strip() == b"websocket" for token in value.lower().split(b",")):
                return True
    return False


class Dispatcher(Protocol):
    """
    Reads a connection's first request head, then hands the connection, and every byte read,
    to the protocol that serves it. Drops a connection whose head does not arrive in time.
    """

    factory: DispatchFactory
    _inner: IProtocol | None = None
    _timer: IDelayedCall | None = None
    _refused = False

    def __init__(self, addr: IAddress) -> None:
        self._addr = addr
        self._head = b""

    def connectionMade(self) -> None:
        timeout = self.factory.headTimeout()
        if timeout:
            self._timer = self.factory.clock.callLater(timeout, self._timedOut)

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        if self._refused:
            return
        head = self._head + data
        end = head.find(b"\r\n\r\n")
        if end < 0 and len(head) < MAX_HEAD:
            self._head = head
            return
        self._head = b""
        self._cancelTimer()
        assert self.transport is not None
        if end < 0 or end > MAX_HEAD:
            self._refuse()
            return
        upgrade = isWebSocketUpgrade(head[:end])
        target = self.factory.websocket if upgrade else self.factory.site
        inner = target.buildProtocol(self._addr)
        if inner is None:
            self.transport.loseConnection()
            return
        self._inner = inner
        inner.makeConnection(self.transport)
        inner.dataReceived(head)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._cancelTimer()
        if self._inner is not None:
            self._inner.connectionLost(reason or Failure(ConnectionError()))

    def _refuse(self) -> None:
        # Answer 431, then read and discard what the client still sends until it closes (or
        # for a short while): closing with unread input would reset the connection and could
        # destroy the answer before the client reads it.
        assert self.transport is not None
        self._refused = True
        self.transport.write(TOO_LARGE)
        self.transport.loseWriteConnection()  # type: ignore[attr-defined]
        self._timer = self.factory.clock.callLater(LINGER, self._timedOut)

    def _timedOut(self) -> None:
        self._timer = None
        # Slowloris: a connection that never finishes its head is dropped, not answered.
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def _cancelTimer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None


class DispatchFactory(ServerFactory):
    """
    Listens for both: WebSocket handshakes go to ``websocket``, other requests to ``site``.

    The head must arrive within the WebSocket factory's ``openHandshakeTimeout``.
    """

    protocol = Dispatcher  # type: ignore[assignment]

    def __init__(
        self, websocket: IProtocolFactory, site: IProtocolFactory, clock: IReactorTime
    ) -> None:
        self.websocket = websocket
        self.site = site
        self.clock = clock

    def headTimeout(self) -> float:
        return float(getattr(self.websocket, "openHandshakeTimeout", 0) or 0)

    def buildProtocol(self, addr: IAddress) -> Dispatcher:  # type: ignore[override]
        dispatcher = Dispatcher(addr)
        dispatcher.factory = self
        return dispatcher

    def startFactory(self) -> None:
        self.websocket.doStart()
        self.site.doStart()

    def stopFactory(self) -> None:
        self.websocket.doStop()
        self.site.doStop()
