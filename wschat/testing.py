"""
Test doubles and loopback helpers, shipped so that users' tests and ours share them.

- :func:`startDaemon` runs the daemon's real service tree in-process on a free port.
- :func:`connect` opens a real WebSocket client over loopback that queues what it receives.
- :func:`spawn` runs a real command (`twistd`, the client) whose output a test waits on.
- :class:`MemoryRoom` is a server factory on a fake clock with in-memory clients.
- :func:`memoryConnection` joins a server and a client protocol through in-memory transports,
  for protocol logic driven by a :class:`~twisted.internet.testing.MemoryReactorClock`.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
from collections.abc import Sequence
from typing import Any

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    connectWS,
)
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim

from wschat.protocol import ChatServerFactory, ChatServerProtocol
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


class ProcessWatcher(ProcessProtocol):
    """
    A child process whose output tests wait on, line by line, without sleeping.

    ``waitFor(pattern, stream)`` fires with the first line (past or future) matching the
    regular expression; ``ended`` fires with the exit code.
    """

    def __init__(self) -> None:
        self.lines: dict[str, list[str]] = {"out": [], "err": []}
        self._partial = {"out": b"", "err": b""}
        self._waiters: list[tuple[re.Pattern[str], str, int, defer.Deferred[re.Match[str]]]] = []
        self.ended: defer.Deferred[int | None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self._received("out", data)

    def errReceived(self, data: bytes) -> None:
        self._received("err", data)

    def _received(self, stream: str, data: bytes) -> None:
        *complete, self._partial[stream] = (self._partial[stream] + data).split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            self.lines[stream].append(line)
            for waiter in list(self._waiters):
                pattern, wanted, remaining, d = waiter
                match = pattern.search(line)
                if wanted == stream and match:
                    self._waiters.remove(waiter)
                    if remaining > 1:
                        self._waiters.append((pattern, wanted, remaining - 1, d))
                    else:
                        d.callback(match)

    def waitFor(
        self, pattern: str, stream: str = "out", count: int = 1
    ) -> defer.Deferred[re.Match[str]]:
        """Fire with the ``count``-th line of ``stream`` that matches ``pattern``."""
        compiled = re.compile(pattern)
        for line in self.lines[stream]:
            match = compiled.search(line)
            if match:
                count -= 1
                if count == 0:
                    return defer.succeed(match)
        d: defer.Deferred[re.Match[str]] = defer.Deferred()
        if self.ended.called:
            d.errback(AssertionError(f"process ended before printing {pattern!r}"))
        else:
            self._waiters.append((compiled, stream, count, d))
        return d

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def closeStdin(self) -> None:
        assert self.transport is not None
        self.transport.closeStdin()

    def signal(self, name: str) -> None:
        assert self.transport is not None
        self.transport.signalProcess(name)

    def processEnded(self, reason: Failure) -> None:
        for stream, rest in self._partial.items():
            if rest:
                self._received(stream, b"\n")
        waiters, self._waiters = self._waiters, []
        for pattern, _, _, d in waiters:
            d.errback(AssertionError(f"process ended before printing {pattern.pattern!r}"))
        self.ended.callback(getattr(reason.value, "exitCode", None))


def spawn(
    args: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None
) -> ProcessWatcher:
    """
    Run ``args`` (``args[0]`` found on the venv's or the system's PATH) with piped stdio.
    """
    from twisted.internet import reactor

    executable = shutil.which(args[0], path=_binPath()) or args[0]
    watcher = ProcessWatcher()
    environment = dict(os.environ if env is None else env)
    environment.setdefault("PYTHONUNBUFFERED", "1")
    reactor.spawnProcess(  # type: ignore[attr-defined]
        watcher, executable, list(args), env=environment, path=cwd
    )
    return watcher


def _binPath() -> str:
    # The venv's bin folder first, so `twistd` is the one beside this Python.
    return os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])


def freePort(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on at this moment (for a server started later)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class MemoryRoom:
    """
    A server factory on a fake clock, with in-memory clients connected to it.

    ``connect()`` returns ``(server, client)`` protocols with the handshake done;
    ``flush()`` moves every pending byte both ways; ``clock`` drives all timers.
    """

    def __init__(self, **factoryOptions: Any) -> None:
        self.clock = MemoryReactorClock()
        self.factory = ChatServerFactory(reactor=self.clock, **factoryOptions)
        self.pumps: list[iosim.IOPump] = []

    def connect(
        self, port: int = 50000, peer: Any = None
    ) -> tuple[ChatServerProtocol, QueueClientProtocol]:
        clientFactory = QueueClientFactory("ws://127.0.0.1:2000", reactor=self.clock)
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
        while any(pump.pump() for pump in self.pumps):
            pass


def received(client: QueueClientProtocol) -> list[tuple[bytes, bool]]:
    """Take everything a QueueClientProtocol has queued so far."""
    items = list(client.messages.pending)
    client.messages.pending.clear()
    return items
