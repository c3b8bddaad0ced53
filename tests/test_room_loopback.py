"""The room over real loopback WebSocket connections."""

from __future__ import annotations

import pytest_twisted

from wschat.testing import connect


@pytest_twisted.ensureDeferred
async def test_every_client_receives_every_message(daemon):
    """A message from one client reaches all, the sender included, prefixed with its address."""
    service, url = daemon()
    clients = [await connect(url) for _ in range(3)]
    for c in clients:
        assert await c.nextText() == "Welcome to chat! Type a message"
    clients[1].sendText("hello")
    sender = clients[1].transport.getHost()
    for c in clients:
        assert await c.nextText() == f"127.0.0.1:{sender.port}: hello"
    for c in clients:
        c.sendClose(1000)
        await c.closed
