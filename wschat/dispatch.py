"""
One port, two protocols: each connection goes to the room's WebSocket protocol or to the web
site (page, health, metrics), by the head of its first request.

Every byte read so far goes along with the connection, so nothing a client sends right behind
its handshake is lost, and a WebSocket handshake is parsed once: a plain one is answered from
the head parsed here (:func:`wschat.lean.openHandshake`), any other by Autobahn. (Twisted web's
``WebSocketResource`` route parses it twice, drops bytes that follow the head, and leaves an
HTTP channel behind for every WebSocket connection.)

The dispatcher also guards every request head on the port, the first one and each later one
on a kept-alive HTTP connection, before anything parses it:

- a connection past ``--max-connections`` (WebSocket, HTTP, or still sending its head) is
  answered 503 at once;
- each head must arrive within the handshake timeout, counted from its first byte (from the
  connection for the first head), else the connection is dropped;
- a head over :data:`~wschat.limits.MAX_REQUEST_HEAD` gets 431;
- a request announcing a body (``Content-Length`` above 0, or ``Transfer-Encoding``) gets 413
  before any of the body is read: nothing served here takes a body;
- a ``Host`` that does not name the daemon gets 403 (:class:`~wschat.handshake.HostPolicy`),
  a malformed or repeated one 400.

Each refusal closes the connection. Since no request has a body, an HTTP connection's next
request starts right after the head before it.

A WebSocket connection over plain TCP is handed over behind its one writer
(:class:`wschat.fastwrite.FastTransport`), so every write to it, the handshake response
included, takes the fast path.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IProtocolNegotiationFactory,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from wschat import fastwrite, lean
from wschat.handshake import HostPolicy
from wschat.limits import MAX_REQUEST_HEAD

#: Seconds a refused connection is read from, and discarded, before it is dropped.
LINGER = 2.0

#: Bytes a refused connection may still send (read and discarded) before it is dropped: a
#: client sending a body it was refused does not keep the daemon reading it.
LINGER_BYTES = 1 << 20


def httpError(status: int, phrase: str, explanation: str) -> bytes:
    """A complete HTTP/1.1 error response that closes the connection, with a text body."""
    body = f"{status} {phrase}: {explanation}\n".encode()
    return (
        b"HTTP/1.1 %d %s\r\nConnection: close\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n\r\n"
        % (status, phrase.encode("ascii"), len(body))
    ) + body


TOO_LARGE = httpError(
    431,
    "Request Header Fields Too Large",
    f"the request line and headers must fit in {MAX_REQUEST_HEAD} bytes",
)
OVERLOADED = httpError(503, "Service Unavailable", "too many connections; try again later")
HAS_BODY = httpError(413, "Content Too Large", "this server takes no request bodies")


def headerFields(head: bytes) -> dict[bytes, list[bytes]] | None:
    """
    The header fields of a request head (without its final empty line), by lower-case name,
    each with its values in order; None if a line is not a header field (no colon, or
    whitespace in or around the name). An obsolete folded line continues the value before it.
    """
    fields: dict[bytes, list[bytes]] = {}
    values: list[bytes] | None = None
    for line in head.split(b"\r\n")[1:]:
        if line[:1] in (b" ", b"\t"):
            if values is None:
                return None
            values[-1] += b" " + line.strip(b" \t")
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or b" " in name or b"\t" in name:
            return None
        values = fields.setdefault(name.lower(), [])
        values.append(value.strip(b" \t"))
    return fields


def upgradeAsked(fields: dict[bytes, list[bytes]]) -> bool:
    """Whether a request's header ``fields`` (see :func:`headerFields`) ask for WebSocket."""
    for value in fields.get(b"upgrade", ()):
        for token in value.lower().split(b","):
            if token.strip() == b"websocket":
                return True
    return False


def isWebSocketUpgrade(head: bytes) -> bool:
    """
    Whether an HTTP request head (request line and headers) asks to upgrade to WebSocket.
    """
    fields = headerFields(head)
    return fields is not None and upgradeAsked(fields)


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

    A connection handed to the web site stays behind this dispatcher, which reads each later
    head whole and checks it before the site parses it.
    """

    factory: DispatchFactory
    _inner: IProtocol | None = None
    # The web site's channel, when the connection went there: later heads go through here.
    _site: IProtocol | None = None
    _timer: IDelayedCall | None = None
    _refused = False
    _counted = False
    _discarded = 0

    def __init__(self, addr: IAddress) -> None:
        self._addr = addr
        # The head so far, when it came in several pieces.
        self._head = bytearray()

    def connectionMade(self) -> None:
        if not self.factory.admit():
            self._refuse(OVERLOADED)
            return
        self._counted = True
        self._startHead()

    def _startHead(self) -> None:
        """The next head's deadline starts now."""
        timeout = self.factory.headTimeout()
        if timeout:
            self.factory.deadlines.add(self, timeout)

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        if self._refused:
            self._discard(data)
            return
        buffered = self._head
        if not buffered and self._site is not None:
            # Empty lines between requests are ignored (RFC 9112, 2.2); the first byte of
            # the next head starts its deadline.
            data = data.lstrip(b"\r\n")
            if not data:
                return
            self._startHead()
        # Search only what is new (and the 3 bytes before it): a head sent a byte at a time
        # costs linear time, not quadratic.
        start = max(len(buffered) - 3, 0)
        buffered += data
        while True:
            end = buffered.find(b"\r\n\r\n", start)
            if end < 0 and len(buffered) < MAX_REQUEST_HEAD:
                return
            self.factory.deadlines.discard(self)
            if end < 0 or end > MAX_REQUEST_HEAD:
                self._refuse(TOO_LARGE)
                return
            if not self._dispatch(bytes(buffered[: end + 4]), bytes(buffered[end + 4 :])):
                return
            # The web site took the head; what follows starts the next one.
            rest = buffered[end + 4 :].lstrip(b"\r\n")
            self._head = buffered = bytearray(rest)
            if not rest:
                return
            self._startHead()
            start = 0

    def _dispatch(self, head: bytes, rest: bytes) -> bool:
        """
        Check the complete ``head`` and hand it on, with ``rest`` (what followed it) when it
        opens a WebSocket. True if the web site took the head, and the dispatcher reads on.
        """
        assert self.transport is not None
        fields = headerFields(head[:-4])
        # The local address only if the Host needs it: getHost is a system call.
        refusal = self.factory.check(fields, self.transport.getHost)
        if refusal is not None:
            self._refuse(refusal)
            return False
        if self._site is not None:
            self._site.dataReceived(head)
            return True
        websocket = self.factory.websocket
        upgrade = websocket is not None and fields is not None and upgradeAsked(fields)
        target = websocket if upgrade and websocket is not None else self.factory.site
        inner = target.buildProtocol(self._addr)
        if inner is None:
            self.transport.loseConnection()
            return False
        if upgrade:
            self._inner = inner
            self._head = bytearray()
            # The whole head is here, so Autobahn's handshake completes within this call:
            # its own timer for the handshake would start and stop unused.
            inner.openHandshakeTimeout = 0  # type: ignore[attr-defined]
            turns = self.factory.turns
            transport = self.transport
            if turns is not None:
                transport = fastwrite.wrap(transport, turns)
            inner.makeConnection(transport)
            assert fields is not None
            if not lean.openHandshake(inner, head, fields, rest):
                # Autobahn's own handshake, for anything but a plain request: see wschat.lean.
                inner.dataReceived(head + rest)
            return False
        self._site = inner
        inner.makeConnection(self.transport)
        inner.dataReceived(head)
        return True

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.factory.deadlines.discard(self)
        self._cancelTimer()
        if self._counted:
            self._counted = False
            self.factory.release()
        inner = self._inner or self._site
        if inner is not None:
            inner.connectionLost(reason or Failure(ConnectionError()))

    def _refuse(self, response: bytes) -> None:
        # Answer, then read and discard what the client still sends until it closes (for a
        # short while, and a bounded number of bytes): closing with unread input would reset
        # the connection and could destroy the answer before the client reads it.
        assert self.transport is not None
        self._refused = True
        self._head = bytearray()
        self.factory.deadlines.discard(self)
        self.transport.write(response)
        if ISSLTransport.providedBy(self.transport):
            # TLS closes its own way (close_notify, then the peer's); half-closing the TCP
            # connection beneath it would break Twisted's TLS shutdown when the peer answers.
            self.transport.loseConnection()
        else:
            self.transport.loseWriteConnection()  # type: ignore[attr-defined]
        self._timer = self.factory.clock.callLater(LINGER, self.timedOut)

    def _discard(self, data: bytes) -> None:
        self._discarded += len(data)
        if self._discarded > LINGER_BYTES and self._timer is not None:
            self._cancelTimer()
            self.timedOut()

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


@implementer(IProtocolNegotiationFactory)
class DispatchFactory(ServerFactory):
    """
    Listens for both: WebSocket handshakes go to ``websocket``, other requests to ``site``
    (every request, when ``websocket`` is None).

    The head must arrive within the WebSocket factory's ``openHandshakeTimeout``.

    Behind TLS it names HTTP/1.1 as its one application protocol (ALPN): browsers and curl
    always offer ALPN, and a TLS server whose factory names no protocol fails their handshake.
    WebSocket (RFC 6455) runs over HTTP/1.1, so ``http/1.1`` covers both.


    With ``fastWrite`` (the default), WebSocket connections over plain TCP get a
    :class:`wschat.fastwrite.FastTransport`, whose turns end on ``clock``.
    """

    protocol = Dispatcher  # type: ignore[assignment]
    noisy = False  # the server logs where it listens; no "Starting factory" lines

    def __init__(
        self,
        websocket: IProtocolFactory | None,
        site: IProtocolFactory,
        clock: IReactorTime,
        hosts: HostPolicy | None = None,
        timeout: float | None = None,
        fastWrite: bool = True,
    ) -> None:
        self.websocket = websocket
        #: Seconds each request head has to arrive, when not the WebSocket factory's
        #: ``openHandshakeTimeout`` (as with no WebSocket factory).
        self.timeout = timeout
        self.site = site
        self.clock = clock
        self.deadlines = Deadlines(clock)
        self.turns = fastwrite.Turns(clock) if fastWrite else None
        #: Which Host values name the daemon (default: its own names only).
        self.hosts = hosts if hosts is not None else HostPolicy.fromList([])
        #: Connections open on this factory's ports, refused ones aside.
        self.connections = 0

    def maxConnections(self) -> int:
        """The WebSocket factory's ``maxConnections`` (0: no limit), for every connection."""
        return int(getattr(self.websocket, "maxConnections", 0) or 0)

    def admit(self) -> bool:
        """Count one more connection, unless that would pass ``maxConnections``."""
        limit = self.maxConnections()
        if limit and self.connections >= limit:
            return False
        self.connections += 1
        return True

    def release(self) -> None:
        """A counted connection has closed."""
        self.connections -= 1

    def check(
        self, fields: dict[bytes, list[bytes]] | None, local: IAddress | Callable[[], IAddress]
    ) -> bytes | None:
        """
        The error response for a request whose head has the header ``fields`` (its
        :func:`headerFields`; None: a line is not a header field) that may not be served on a
        connection that arrived at ``local`` (or at the address a call of ``local`` gives,
        made only if needed); None if it may.
        """
        if fields is None:
            return httpError(400, "Bad Request", "a header line is not a header field")
        if b"transfer-encoding" in fields:
            return HAS_BODY
        lengths = fields.get(b"content-length")
        if lengths is not None and lengths.count(b"0") != len(lengths):
            return HAS_BODY
        hosts = fields.get(b"host", [])
        if len(hosts) > 1:
            return httpError(400, "Bad Request", "more than one Host header")
        host = hosts[0].decode("latin-1") if hosts else None
        try:
            allowed = self.hosts.allows(host, local)
        except ValueError:
            return httpError(400, "Bad Request", f"Host {host!r} is not a host[:port]")
        if not allowed:
            return httpError(
                403,
                "Forbidden",
                f"this server does not answer to the name {host!r} "
                "(its operator can allow it with --allowed-host)",
            )
        return None

    def acceptableProtocols(self) -> list[bytes]:
        """The ALPN protocols spoken here: HTTP/1.1 (and WebSocket, which starts as it)."""
        return [b"http/1.1"]

    def headTimeout(self) -> float:
        if self.timeout is not None:
            return self.timeout
        return float(getattr(self.websocket, "openHandshakeTimeout", 0) or 0)

    def buildProtocol(self, addr: IAddress) -> Dispatcher:  # type: ignore[override]
        dispatcher = Dispatcher(addr)
        dispatcher.factory = self
        return dispatcher

    def startFactory(self) -> None:
        if self.websocket is not None:
            self.websocket.doStart()
        self.site.doStart()

    def stopFactory(self) -> None:
        if self.websocket is not None:
            self.websocket.doStop()
        self.site.doStop()
