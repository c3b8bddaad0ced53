"""
One port, two protocols: each connection goes to the room's WebSocket protocol or to the web
site (page, health, metrics), by the head of its first request.

Every byte read so far goes along with the connection, so nothing a client sends right behind
its handshake is lost, and a WebSocket handshake is parsed once, by Autobahn. (Twisted web's
``WebSocketResource`` route parses it twice, drops bytes that follow the head, and leaves an
HTTP channel behind for every WebSocket connection.)

A WebSocket connection over plain TCP is handed over behind its one writer
(:class:`wschat.fastwrite.FastTransport`), so every write to it, the handshake response
included, takes the fast path.
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.python.failure import Failure

from wschat import fastwrite
from wschat.limits import MAX_REQUEST_HEAD

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


class Deadlines:
    """
    Drops each connection whose head is not in by its deadline, with one timer for them all.

    Every connection gets the same timeout, so deadlines come in the order connections
    arrive: an ``OrderedDict`` in that order is the queue (adding and discarding are O(1)),
    and one delayed call waits for the first deadline. A ``callLater`` per connection would
    cost a heap entry, a cancellation and a reactor object on every handshake. Should the
    timeout shrink while the daemon runs, a connection added after the change waits at most
    for those before it.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._due: OrderedDict[Dispatcher, float] = OrderedDict()
        self._call: IDelayedCall | None = None

    def __len__(self) -> int:
        return len(self._due)

    def add(self, dispatcher: Dispatcher, timeout: float) -> None:
        self._due[dispatcher] = self._clock.seconds() + timeout
        if self._call is None:
            self._call = self._clock.callLater(timeout, self._expire)

    def discard(self, dispatcher: Dispatcher) -> None:
        self._due.pop(dispatcher, None)

    def _expire(self) -> None:
        self._call = None
        now = self._clock.seconds()
        due = self._due
        while due:
            dispatcher, when = next(iter(due.items()))
            if when > now:
                self._call = self._clock.callLater(when - now, self._expire)
                return
            del due[dispatcher]
            dispatcher.timedOut()


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
        # The head so far, when it came in several pieces.
        self._head = bytearray()

    def connectionMade(self) -> None:
        timeout = self.factory.headTimeout()
        if timeout:
            self.factory.deadlines.add(self, timeout)

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        if self._refused:
            return
        buffered = self._head
        # Search only what is new (and the 3 bytes before it): a head sent a byte at a time
        # costs linear time, not quadratic.
        start = max(len(buffered) - 3, 0)
        buffered += data
        end = buffered.find(b"\r\n\r\n", start)
        if end < 0 and len(buffered) < MAX_REQUEST_HEAD:
            return
        head = bytes(buffered)
        self._head = bytearray()
        self.factory.deadlines.discard(self)
        assert self.transport is not None
        if end < 0 or end > MAX_REQUEST_HEAD:
            self._refuse()
            return
        upgrade = isWebSocketUpgrade(head[:end])
        target = self.factory.websocket if upgrade else self.factory.site
        inner = target.buildProtocol(self._addr)
        if inner is None:
            self.transport.loseConnection()
            return
        self._inner = inner
        transport = self.transport
        if upgrade:
            # The whole head is here, so Autobahn's handshake completes within this call:
            # its own timer for the handshake would start and stop unused.
            inner.openHandshakeTimeout = 0  # type: ignore[attr-defined]
            turns = self.factory.turns
            if turns is not None:
                transport = fastwrite.wrap(transport, turns)
        inner.makeConnection(transport)
        inner.dataReceived(head)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.factory.deadlines.discard(self)
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
        self._timer = self.factory.clock.callLater(LINGER, self.timedOut)

    def timedOut(self) -> None:
        """Its time is up: drop the connection."""
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

    The head must arrive within the WebSocket factory's ``openHandshakeTimeout``. With
    ``fastWrite`` (the default), WebSocket connections over plain TCP get a
    :class:`wschat.fastwrite.FastTransport`, whose turns end on ``clock``.
    """

    protocol = Dispatcher  # type: ignore[assignment]

    def __init__(
        self,
        websocket: IProtocolFactory,
        site: IProtocolFactory,
        clock: IReactorTime,
        fastWrite: bool = True,
    ) -> None:
        self.websocket = websocket
        self.site = site
        self.clock = clock
        self.deadlines = Deadlines(clock)
        self.turns = fastwrite.Turns(clock) if fastWrite else None

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
