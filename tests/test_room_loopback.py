"""The room over real loopback WebSocket connections."""

from __future__ import annotations

import pytest_twisted

from wschat.testing import bySender, closeAll, connect

WELCOME = "Welcome to chat! Type a message"


async def join(url: str, count: int, greeted: bool = True) -> list:
    clients = [await connect(url) for _ in range(count)]
    if greeted:
        for c in clients:
            assert await c.nextText() == WELCOME
    return clients


@pytest_twisted.ensureDeferred
async def test_every_client_receives_every_message(daemon):
    """A message from one client reaches all, the sender included, prefixed with its address."""
    _, url = daemon()
    clients = await join(url, 3)
    clients[1].sendText("hello")
    for c in clients:
        assert await c.nextText() == f"{clients[1].address}: hello"
    await closeAll(clients)


@pytest_twisted.ensureDeferred
async def test_one_order_and_per_sender_fifo(daemon):
    """Concurrent senders: everyone gets every message, in one order, each sender's in order."""
    _, url = daemon("--no-message-log")
    clients = await join(url, 4)
    perSender = 50
    for i in range(perSender):
        for n, c in enumerate(clients):
            c.sendText(f"{n}-{i}")
    total = perSender * len(clients)
    seen = [await c.texts(total) for c in clients]
    assert all(s == seen[0] for s in seen), "clients saw different orders"
    sent = [[f"{n}-{i}" for i in range(perSender)] for n in range(len(clients))]
    assert bySender(seen[0], sent) == [
        [f"{c.address}: {text}" for text in texts] for c, texts in zip(clients, sent, strict=True)
    ]
    await closeAll(clients)


@pytest_twisted.ensureDeferred
async def test_ipv6_prefix(daemon):
    """A client connecting over IPv6 is named [::1]:port in the prefix."""
    service, _ = daemon("--listen", r"tcp6:0:interface=\:\:1")
    port = service.ports[0].getHost().port
    (client,) = await join(f"ws://[::1]:{port}", 1)
    client.sendText("hi")
    assert await client.nextText() == f"[::1]:{client.transport.getHost().port}: hi"
    assert client.address.startswith("[::1]:")
    await closeAll([client])


@pytest_twisted.ensureDeferred
async def test_peer_closing_mid_broadcast(daemon):
    """A peer that drops while messages fly does not stop delivery to the others."""
    _, url = daemon("--no-message-log")
    quitter, *stayers = await join(url, 4)
    sender = stayers[0]
    for i in range(20):
        sender.sendText(f"m{i}")
        if i == 10:
            quitter.transport.abortConnection()
    for c in stayers:
        texts = await c.texts(20)
        assert [t.split(": ", 1)[1] for t in texts] == [f"m{i}" for i in range(20)]
    await quitter.closed
    await closeAll(stayers)


@pytest_twisted.ensureDeferred
async def test_binary_refused_in_prefixed_format(daemon):
    """Binary in prefixed format: the sender is closed with 1003, the room carries on."""
    _, url = daemon()
    binary, other = await join(url, 2)
    binary.sendMessage(b"\x00\x01", isBinary=True)
    code, reason = await binary.closed
    assert code == 1003
    assert "binary" in reason
    other.sendText("still here")
    assert await other.nextText() == f"{other.address}: still here"
    assert binary.messages.pending == []
    await closeAll([other])


@pytest_twisted.ensureDeferred
async def test_raw_format_relays_binary_and_text(daemon):
    """In raw format binary and text are relayed unchanged to everyone."""
    _, url = daemon("--format", "raw", "--welcome", "")
    a, b = await join(url, 2, greeted=False)
    a.sendMessage(b"\x00\xffbin", isBinary=True)
    a.sendText("plain")
    for c in (a, b):
        assert await c.messages.get() == (b"\x00\xffbin", True)
        assert await c.messages.get() == (b"plain", False)
    await closeAll([a, b])
