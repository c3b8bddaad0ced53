"""
Test doubles shipped with the package, so that users' tests and ours share them (as
``treq.testing`` does).

- :func:`startDaemon` runs the daemon's real service tree in-process on a free port.
- :func:`connect` opens a real WebSocket client over loopback that queues what it receives
  (:class:`QueueClientProtocol`); :func:`received` takes what it queued, :func:`closeAll`
  closes several, :func:`bySender` splits what one saw by sender.
- :class:`MemoryRoom` is a server factory on a fake clock with in-memory clients.
- :func:`memoryConnection` joins a server and a client protocol through in-memory transports,
  for protocol logic driven by a :class:`~twisted.internet.testing.MemoryReactorClock`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    connectWS,
)
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateResponseAccept
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim

from wschat.protocol import ChatServerProtocol
from wschat.server import ChatServer
from wschat.tap import Options, buildServer
from wschat.wire import formatAddress


class QueueClientProtocol(WebSocketClientProtocol):
    """
    A WebSocket client that queues every message it receives, and tells when it closes.
    """

    factory: QueueClientFactory

    def connectionMade(self) -> None:
        self.messages: defer.DeferredQueue[tuple[bytes, bool]] = defer.DeferredQueue()
        self.closed: defer.Deferred[tuple[int | None, str | None]] = defer.Deferred()
        super().connectionMade()

    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.put((payload, isBinary))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(f"handshake failed: {code} {reason}"))
        if not self.closed.called:
            self.closed.callback((code, reason))

    def sendText(self, text: str) -> None:
        self.sendMessage(text.encode("utf-8"))

    async def nextText(self) -> str:
        payload, isBinary = await self.messages.get()
        assert not isBinary, f"expected text, got binary {payload!r}"
        return payload.decode("utf-8")

    async def texts(self, count: int) -> list[str]:
        return [await self.nextText() for _ in range(count)]

    @property
    def address(self) -> str:
        """This client as the daemon names it in the prefix: ``ip:port`` or ``[ipv6]:port``."""
        assert self.transport is not None
        return formatAddress(self.transport.getHost())


class QueueClientFactory(WebSocketClientFactory):
    protocol = QueueClientProtocol  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened: defer.Deferred[QueueClientProtocol] = defer.Deferred()

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        # Refused or unreachable: fail the caller's await rather than leave it hanging.
        if not self.opened.called:
            self.opened.errback(reason)


def connect(
    url: str, contextFactory: Any = None, offerDeflate: bool = False, **factoryOptions: Any
) -> defer.Deferred[QueueClientProtocol]:
    """
    Open a real WebSocket connection to ``url``; fires with the open protocol.

    The greeting, if the daemon sends one, is the first message in its queue. With
    ``offerDeflate`` the client offers permessage-deflate, as browsers do, and takes it if the
    daemon agrees (``--compression``).
    """
    factory = QueueClientFactory(url, **factoryOptions)
    if offerDeflate:
        factory.setProtocolOptions(
            perMessageCompressionOffers=[PerMessageDeflateOffer()],
            perMessageCompressionAccept=PerMessageDeflateResponseAccept,
        )
    connectWS(factory, contextFactory)
    return factory.opened


def startDaemon(args: Sequence[str] = ()) -> tuple[ChatServer, str]:
    """
    Start the daemon's server in-process, parsing ``args`` as ``twistd wschat`` would (but
    without tuning the process as ``twistd wschat`` does).

    Listens on 127.0.0.1 on a free port unless ``args`` says where. Returns the running
    service and the ``ws://`` (or ``wss://``) URL of its first IPv4 TCP port, or "" if it has
    none. Stop it with ``stopService()``.
    """
    options = Options()
    args = list(args)
    if not any(a in ("--port", "-p") or a.startswith(("--port=", "--listen")) for a in args):
        args += ["--port", "0"]
    options.parseOptions(args)
    service = buildServer(options)
    service.startService()
    # TCP, SSL and UNIX endpoints listen synchronously: the ports are there already.
    if len(service.ports) != len(service.endpoints):
        raise RuntimeError(f"the daemon did not listen on every endpoint of {args}")
    url = ""
    for endpoint in service.endpoints:
        host = endpoint.port.getHost() if endpoint.port is not None else None
        if isinstance(host, IPv4Address):
            scheme = "wss" if endpoint.description.startswith("ssl:") else "ws"
            url = f"{scheme}://{host.host}:{host.port}"
            break
    return service, url


def memoryConnection(
    serverFactory: Any,
    clientFactory: Any,
    peer: Any = None,
    clock: Any = None,
) -> tuple[Any, Any, iosim.IOPump]:
    """
    Connect a protocol from ``serverFactory`` to one from ``clientFactory`` in memory.

    Returns ``(server, client, pump)``; call ``pump.flush()`` to move bytes both ways.
    ``peer`` is the client address the server sees (default ``127.0.0.1:50000``).
    """
    clientAddress = peer or IPv4Address("TCP", "127.0.0.1", 50000)
    serverAddress = IPv4Address("TCP", "127.0.0.1", 2000)
    server = serverFactory.buildProtocol(clientAddress)
    client = clientFactory.buildProtocol(serverAddress)
    serverTransport = iosim.FakeTransport(
        server, isServer=True, hostAddress=serverAddress, peerAddress=clientAddress
    )
    clientTransport = iosim.FakeTransport(
        client, isServer=False, hostAddress=clientAddress, peerAddress=serverAddress
    )
    pump = iosim.connect(server, serverTransport, client, clientTransport, greet=False, clock=clock)
    return server, client, pump


class MemoryRoom:
    """
    A chat server on a fake clock, with in-memory clients connected to it.

    ``connect()`` returns ``(server, client)`` protocols with the handshake done;
    ``flush()`` moves every pending byte both ways; ``clock`` drives all timers.
    ``server`` is the :class:`~wschat.server.ChatServer`, built with ``serverOptions``.
    """

    def __init__(self, **serverOptions: Any) -> None:
        self.clock = MemoryReactorClock()
        self.server = ChatServer(reactor=self.clock, **serverOptions)
        self.factory = self.server.factory
        self.pumps: list[iosim.IOPump] = []

    def connect(
        self, port: int = 50000, peer: Any = None, path: str = "/", **factoryOptions: Any
    ) -> tuple[ChatServerProtocol, QueueClientProtocol]:
        """
        Connect a client from ``port`` (or ``peer``) to ``path`` (which may carry a query);
        ``factoryOptions`` go to its factory (``protocols=["wschat.json"]``).
        """
        clientFactory = QueueClientFactory(
            f"ws://127.0.0.1:2000{path}", reactor=self.clock, **factoryOptions
        )
        server, client, pump = memoryConnection(
            self.factory,
            clientFactory,
            peer=peer or IPv4Address("TCP", "127.0.0.1", port),
            clock=self.clock,
        )
        self.pumps.append(pump)
        self.flush()
        return server, client

    def flush(self) -> None:
        # A frame received can cause frames sent (a broadcast, a close reply): pump until quiet.
        # Then end the turn: what waits for it (the connections' log lines) happens.
        while any(pump.pump() for pump in self.pumps):
            pass
        self.clock.advance(0)


async def closeAll(clients: Sequence[QueueClientProtocol]) -> None:
    """Close every client cleanly (1000) and wait until each is closed."""
    for c in clients:
        c.sendClose(1000)
    await defer.gatherResults([c.closed for c in clients])


def bySender(order: Sequence[str], sent: Sequence[Sequence[str]]) -> list[list[str]]:
    """
    Split the prefixed lines one client saw into each sender's, in the order seen.

    Senders are told apart by what they sent (``sent[n]`` is sender n's texts, all distinct),
    not by their prefix: clients of different daemons may share a source port.
    """
    senderOf = {text: n for n, texts in enumerate(sent) for text in texts}
    lines: list[list[str]] = [[] for _ in sent]
    for line in order:
        lines[senderOf[line.split(": ", 1)[1]]].append(line)
    return lines


def received(client: QueueClientProtocol) -> list[tuple[bytes, bool]]:
    """Take everything a QueueClientProtocol has queued so far."""
    items = list(client.messages.pending)
    client.messages.pending.clear()
    return items
