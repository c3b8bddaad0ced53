"""
Test doubles and loopback helpers, shipped so that users' tests and ours share them.

- :func:`startDaemon` runs the daemon's real service tree in-process on a free port.
- :func:`connect` opens a real WebSocket client over loopback that queues what it receives.
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
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.test import iosim

from wschat.tap import ChatService, Options, makeService


class QueueClientProtocol(WebSocketClientProtocol):
    """
    A WebSocket client that queues every message it receives, and tells when it closes.
    """

    factory: QueueClientFactory

    def onConnect(self, response: Any) -> None:
        self.messages: defer.DeferredQueue[tuple[bytes, bool]] = defer.DeferredQueue()
        self.closed: defer.Deferred[tuple[int | None, str | None]] = defer.Deferred()

    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.put((payload, isBinary))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(f"handshake failed: {code} {reason}"))
        if hasattr(self, "closed") and not self.closed.called:
            self.closed.callback((code, reason))

    def sendText(self, text: str) -> None:
        self.sendMessage(text.encode("utf-8"))

    async def nextText(self) -> str:
        payload, isBinary = await self.messages.get()
        assert not isBinary, f"expected text, got binary {payload!r}"
        return payload.decode("utf-8")

    async def texts(self, count: int) -> list[str]:
        return [await self.nextText() for _ in range(count)]


class QueueClientFactory(WebSocketClientFactory):
    protocol = QueueClientProtocol  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened: defer.Deferred[QueueClientProtocol] = defer.Deferred()


def connect(
    url: str, contextFactory: Any = None, **factoryOptions: Any
) -> defer.Deferred[QueueClientProtocol]:
    """
    Open a real WebSocket connection to ``url``; fires with the open protocol.

    The greeting, if the daemon sends one, is the first message in its queue.
    """
    factory = QueueClientFactory(url, **factoryOptions)
    connectWS(factory, contextFactory)
    return factory.opened


def startDaemon(args: Sequence[str] = ()) -> tuple[ChatService, str]:
    """
    Start the daemon's service tree in-process, parsing ``args`` as ``twistd wschat`` would.

    Listens on 127.0.0.1 on a free port unless ``args`` says where. Returns the running
    service and the ``ws://`` URL of its first TCP port. Stop it with ``stopService()``.
    """
    options = Options()
    args = list(args)
    if not any(a.startswith("--listen") for a in args) and "--port" not in args:
        args += ["--port", "0"]
    options.parseOptions(args)
    service = makeService(options)
    service.startService()
    # TCP, SSL and UNIX endpoints listen synchronously: the ports are there already.
    if len(service.ports) != len(service.endpoints):
        raise RuntimeError(f"the daemon did not listen on every endpoint of {args}")
    url = ""
    for port in service.ports:
        host = port.getHost()
        if isinstance(host, IPv4Address):
            url = f"ws://{host.host}:{host.port}"
            break
    return service, url


def memoryConnection(
    serverFactory: Any,
    clientFactory: Any,
    peer: Any = None,
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
    pump = iosim.connect(server, serverTransport, client, clientTransport, greet=False)
    return server, client, pump
