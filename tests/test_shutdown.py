"""Shutdown: clients get 1001 going away, the daemon waits for them (within a bound), then stops."""

from __future__ import annotations

import signal
import time

import pytest
import pytest_twisted
from childprocess import listeningPort, spawnTwistd
from rawws import RawClient, handshake, rawConnect
from twisted.internet import defer, error, reactor
from twisted.internet.task import Clock

from wschat.bench.frames import OP_CLOSE, serverFrame
from wschat.client import ChatClientFactory, ChatSession
from wschat.testing import connect

GOING_AWAY = (1001, "server shutting down")

#: The close frame a client gets at shutdown: 1001 and the reason, unmasked.
GOING_AWAY_FRAME = serverFrame(b"\x03\xe9server shutting down", OP_CLOSE)


def handshakeFor(url: str) -> bytes:
    return handshake(host=url.split("//")[1])


@pytest_twisted.ensureDeferred
async def test_stop_closes_clients_with_1001(daemon):
    """stopService sends every client 1001 and fires once they are all gone."""
    service, url = daemon("--welcome", "")
    clients = [await connect(url) for _ in range(3)]
    stopped = service.stopService()
    closes = await defer.gatherResults([c.closed for c in clients])
    assert closes == [GOING_AWAY] * 3
    await stopped
    assert len(service.room) == 0
    assert service.ports[0].connected is False


@pytest_twisted.ensureDeferred
async def test_stop_listens_no_more(daemon):
    """Once stopped, the port refuses new connections."""
    service, url = daemon()
    await service.stopService()
    with pytest.raises(error.ConnectionRefusedError):
        await rawConnect(url, RawClient())


@pytest_twisted.ensureDeferred
async def test_late_handshake_gets_503(daemon):
    """A connection made before the stop whose handshake comes after it gets HTTP 503."""
    service, url = daemon("--welcome", "")
    raw = await rawConnect(url, RawClient())
    await service.stopService()
    raw.transport.write(handshakeFor(url))
    assert (await raw.lost).startswith(b"HTTP/1.1 503 server shutting down\r\n")


@pytest_twisted.ensureDeferred
async def test_silent_client_dropped_at_timeout(daemon):
    """A client that never answers the close is dropped at --shutdown-timeout, then it fires."""
    service, url = daemon("--welcome", "", "--shutdown-timeout", "7")
    service.clock = clock = Clock()
    # Autobahn's own close-handshake timeout must not be what drops it.
    service.factory.setProtocolOptions(closeHandshakeTimeout=0, allowNullOrigin=True)
    raw = await rawConnect(url, RawClient(handshakeFor(url)))
    assert (await raw.until(lambda data: b"\r\n\r\n" in data)).startswith(b"HTTP/1.1 101 ")
    polite = await connect(url)
    stopped = []
    service.stopService().addCallback(stopped.append)
    await raw.until(lambda data: data.endswith(b"\r\n\r\n" + GOING_AWAY_FRAME))
    assert await polite.closed == GOING_AWAY
    clock.advance(6.9)
    assert not stopped and not raw.lost.called
    clock.advance(0.1)
    await raw.lost
    assert stopped
    assert len(service.room) == 0


class RecordingSession(ChatSession):
    """The CLI client's session, telling the test what it says and when it connects."""

    def __init__(self) -> None:
        self.statuses: defer.DeferredQueue[str] = defer.DeferredQueue()
        super().__init__(reactor, self.statuses.put)
        self.opened: defer.DeferredQueue[object] = defer.DeferredQueue()

    def connected(self, connection) -> None:
        super().connected(connection)
        self.opened.put(connection)

    async def nextStatus(self, startingWith: str) -> str:
        """The next status line that starts with ``startingWith`` (earlier ones skipped)."""
        while not (line := await self.statuses.get()).startswith(startingWith):
            pass
        return line


@pytest_twisted.ensureDeferred
async def test_cli_client_reconnects_after_going_away(daemon):
    """The CLI client, told 1001, reconnects on its own to the daemon that comes back."""
    first, url = daemon("--format", "raw", "--welcome", "")
    port = first.ports[0].getHost().port
    session = RecordingSession()
    factory = ChatClientFactory(url, session)
    factory.clock = retryClock = Clock()
    connector = reactor.connectTCP("127.0.0.1", port, factory)
    try:
        await session.opened.get()
        await first.stopService()
        assert await session.nextStatus("closed") == "closed with code 1001: server shutting down"
        assert (await session.nextStatus("connection")).startswith(
            f"connection to {url} lost; retry"
        )
        assert len(retryClock.getDelayedCalls()) == 1
        second, _ = daemon(
            "--format", "raw", "--welcome", "", "--listen", f"tcp:{port}:interface=127.0.0.1"
        )
        listener = await connect(url)
        retryClock.advance(factory.maxDelay)
        await session.opened.get()
        session.send("back again")
        assert await listener.nextText() == "back again"
    finally:
        factory.stopTrying()
        connector.disconnect()


@pytest.mark.parametrize("signame", ["TERM", "INT"])
@pytest_twisted.ensureDeferred
async def test_twistd_signal_closes_clients_and_exits(tmp_path, signame):
    """twistd -n wschat, sent SIGTERM or SIGINT, closes its clients with 1001 and exits promptly."""
    args = ["--port", "0", "--shutdown-timeout", "60"]
    child = spawnTwistd(args, str(tmp_path))
    try:
        port = await listeningPort(child)
        clients = [await connect(f"ws://127.0.0.1:{port}") for _ in range(2)]
        started = time.monotonic()
        child.signal(signame)
        assert await defer.gatherResults([c.closed for c in clients]) == [GOING_AWAY] * 2
        # Well inside the 60 s bound: it waited for the closes, not for the timeout.
        await child.ended.addTimeout(20, reactor)
    finally:
        await child.kill()
    # twistd re-raises the signal that stopped it, so its exit status names that signal.
    ended = child.endReason
    assert isinstance(ended, error.ProcessTerminated)
    assert ended.signal == getattr(signal, f"SIG{signame}"), child.output
    log = child.output
    assert "closing 2 connections (1001 going away)" in log
    assert "Server Shut Down." in log
    assert log.index("(TCP Port") < log.index("closing 2 connections")
    print(f"twistd stopped {time.monotonic() - started:.2f} s after SIG{signame}")
