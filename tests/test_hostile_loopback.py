"""Limits and hostile input against the real daemon over loopback TCP."""

from __future__ import annotations

import gc
import os
import re
import weakref
from typing import Any

import pytest
import pytest_twisted
from rawws import RawClient, handshake, rawConnect
from twisted.internet import defer, reactor, task

from wschat.fastwrite import FastTransport
from wschat.protocol import ChatServerProtocol
from wschat.testing import QueueClientProtocol, closeAll, connect


def spyOnOpens(service: Any) -> defer.DeferredQueue[ChatServerProtocol]:
    """Every server-side connection the daemon opens from now on, in order."""
    opened: defer.DeferredQueue[ChatServerProtocol] = defer.DeferredQueue()

    class Spy(ChatServerProtocol):
        def onOpen(self) -> None:
            self.left: defer.Deferred[None] = defer.Deferred()
            super().onOpen()
            opened.put(self)

        def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
            super().onClose(wasClean, code, reason)
            if hasattr(self, "left"):
                self.left.callback(None)

    service.factory.protocol = Spy
    return opened


@pytest.fixture
def gcEnabled():
    """Garbage collection is on again after the test, whatever happened."""
    yield
    gc.enable()


@pytest_twisted.ensureDeferred
async def test_never_reading_client_dropped_others_lose_nothing(daemon, gcEnabled):
    """A client that never reads is closed (1008) and dropped; the room loses no message."""
    service, url = daemon(
        "--format", "raw", "--welcome", "", "--no-message-log", "--max-queue", "64K"
    )
    # Let the close handshake the never-reader cannot answer time out quickly.
    service.factory.setProtocolOptions(closeHandshakeTimeout=0.2)
    opened = spyOnOpens(service)
    slowClient = await rawConnect(url, RawClient(handshake(), read=False))
    slow = await opened.get()
    # Its writer, and the TCP transport behind it (which holds the unsent bytes).
    assert isinstance(slow.transport, FastTransport)
    transports = [weakref.ref(slow.transport), weakref.ref(slow.transport.transport)]
    gc.disable()
    readers = [await connect(url) for _ in range(3)]
    sender = readers[0]

    sent: list[bytes] = []
    filler = b"x" * 1000
    batches = 0
    # Up to 64 MB: far past any kernel buffer; the daemon must give up on the slow one first.
    while slow.localCloseCode is None and batches < 1300:
        for _ in range(50):
            payload = b"%08d" % len(sent) + filler
            sent.append(payload)
            sender.sendMessage(payload)
        for r in readers:
            for _ in range(50):
                await r.messages.get()
        batches += 1
    assert slow.localCloseCode == 1008
    assert slow.localCloseReason == b"too slow: more than 65536 bytes waiting to be sent"
    # The room carries on for everyone else.
    tail = [b"after %d" % i for i in range(100)]
    for payload in tail:
        sender.sendMessage(payload)
    for r in readers:
        got = [(await r.messages.get())[0] for _ in tail]
        assert got == tail
    await slow.left
    await task.deferLater(reactor, 0)
    # Its transport held up to --max-queue unsent bytes: freed on the spot (gc is off),
    # not whenever a full garbage collection gets round to it.
    for transport in transports:
        assert transport() is None, gc.get_referrers(transport())
    gc.enable()
    print(f"never-reader closed after {len(sent) * 1008} bytes relayed to the room")
    assert slow.wasCloseHandshakeTimeout, "the never-reader was not dropped at the TCP level"
    assert slow not in list(service.room)
    assert len(list(service.room)) == 3
    slowClient.transport.abortConnection()  # type: ignore[union-attr]
    await slowClient.lost
    await closeAll(readers)


@pytest.mark.parametrize(
    ("request_", "status"),
    [
        # A plain HTTP request without Upgrade: an HTTP answer from the web side.
        (b"GET /nowhere HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", b"404"),
        # An Upgrade request that is no valid WebSocket handshake.
        (b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\r\n", b"400"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_non_websocket_requests_get_an_http_answer(daemon, request_, status):
    """What is no WebSocket handshake gets a proper HTTP error, then the close; never a hang."""
    service, url = daemon()
    client = await rawConnect(url, RawClient(request_))
    await client.lost
    assert client.received.startswith(b"HTTP/1.1 " + status + b" "), client.received


@pytest_twisted.ensureDeferred
async def test_random_bytes_dropped_room_carries_on(daemon):
    """Random bytes get an HTTP 4xx error and are closed; the room still works."""
    service, url = daemon("--format", "raw", "--welcome", "")
    a, b = await connect(url), await connect(url)
    noise = [os.urandom(40000), os.urandom(500) + b"\r\n\r\n"]
    for data in noise:
        client = await rawConnect(url, RawClient(data))
        await client.lost
        # 400 bad request, 405 for a "method" made of noise, 431 for a head without end.
        assert re.match(rb"HTTP/1\.1 4(00|05|31) ", client.received), client.received
    a.sendText("still here")
    assert await b.nextText() == "still here"
    await closeAll([a, b])


@pytest_twisted.ensureDeferred
async def test_oversized_message_1009(daemon):
    """A message over --max-message-size closes its sender with 1009; others carry on."""
    service, url = daemon("--format", "raw", "--welcome", "", "--max-message-size", "1K")
    a, b = await connect(url), await connect(url)
    a.sendMessage(b"x" * 1025)
    assert (await a.closed)[0] == 1009
    b.sendText("fine")
    assert await b.nextText() == "fine"
    await closeAll([b])


@pytest_twisted.ensureDeferred
async def test_rate_limit_1008(daemon):
    """A client flooding past --rate-limit/--rate-burst is closed with 1008; others are not."""
    service, url = daemon(
        "--format", "raw", "--welcome", "", "--rate-limit", "1", "--rate-burst", "5"
    )
    a, b = await connect(url), await connect(url)
    for i in range(10):
        a.sendText(f"{i}")
    code, reason = await a.closed
    assert (code, reason) == (1008, "rate limit exceeded: over 1 messages/s (burst 5)")
    assert await b.texts(5) == ["0", "1", "2", "3", "4"]
    b.sendText("fine")
    assert await b.nextText() == "fine"
    await closeAll([b])


@pytest_twisted.ensureDeferred
async def test_max_connections_503(daemon):
    """Past --max-connections a WebSocket handshake is refused with HTTP 503."""
    service, url = daemon("--max-connections", "2")
    clients = [await connect(url), await connect(url)]
    third = await rawConnect(url, RawClient(handshake()))
    await third.lost
    assert third.received.startswith(b"HTTP/1.1 503 "), third.received
    with pytest.raises(ConnectionError):
        await connect(url)
    await closeAll(clients)


@pytest_twisted.ensureDeferred
async def test_max_connections_per_ip_429(daemon):
    """Past --max-connections-per-ip a handshake from that address gets HTTP 429."""
    service, url = daemon("--max-connections-per-ip", "1")
    first = await connect(url)
    second = await rawConnect(url, RawClient(handshake()))
    await second.lost
    assert second.received.startswith(b"HTTP/1.1 429 "), second.received
    await closeAll([first])
    again = await connect(url)
    await closeAll([again])


@pytest_twisted.ensureDeferred
async def test_compression_end_to_end(daemon):
    """With --compression a deflate client and a plain client share the room."""
    from autobahn.websocket.compress import (
        PerMessageDeflateOffer,
        PerMessageDeflateResponse,
        PerMessageDeflateResponseAccept,
    )

    def accept(response: Any) -> Any:
        if isinstance(response, PerMessageDeflateResponse):
            return PerMessageDeflateResponseAccept(response)
        return None

    service, url = daemon("--format", "raw", "--welcome", "", "--compression")
    zipped = await _connectCompressed(url, [PerMessageDeflateOffer()], accept)
    plain = await connect(url)
    assert [e.EXTENSION_NAME for e in zipped.websocket_extensions_in_use] == ["permessage-deflate"]
    zipped.sendText("squeeze " * 100)
    assert await plain.nextText() == "squeeze " * 100
    assert await zipped.nextText() == "squeeze " * 100
    plain.sendText("back")
    assert await zipped.nextText() == "back"
    await closeAll([zipped, plain])


async def _connectCompressed(url: str, offers: list[Any], accept: Any) -> QueueClientProtocol:
    from autobahn.twisted.websocket import connectWS

    from wschat.testing import QueueClientFactory

    factory = QueueClientFactory(url)
    factory.setProtocolOptions(
        perMessageCompressionOffers=offers, perMessageCompressionAccept=accept
    )
    connectWS(factory)
    return await factory.opened
