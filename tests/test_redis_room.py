"""Several daemons, one room, through a real redis-server on a free loopback port."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest_twisted
import txredisapi
from childprocess import freePort
from redisserver import RedisServer, waitFor
from twisted.internet import reactor

from wschat.envelope import Envelope, encodeEnvelope
from wschat.redisaddress import parseRedisURL
from wschat.redisbus import (
    REFUSED_BACKLOG,
    REFUSED_DOWN,
    REFUSED_LOST,
    REFUSED_NO_ROOM,
    REFUSED_STALLED,
    STALL_TIMEOUT,
    RedisBus,
)
from wschat.room import Room
from wschat.server import DEFAULT_WELCOME, ChatServer
from wschat.testing import QueueClientProtocol, bySender, closeAll, connect
from wschat.wire import JSON_SUBPROTOCOL, Message

REFUSAL = f"wschat: {REFUSED_DOWN}"


@pytest_twisted.async_yield_fixture
async def redis() -> AsyncIterator[Callable[..., Coroutine[Any, Any, RedisServer]]]:
    """``await redis()`` starts a redis-server (no persistence); all are stopped afterwards."""
    servers: list[RedisServer] = []

    async def start(port: int | None = None, password: str | None = None) -> RedisServer:
        server = RedisServer(port, password)
        servers.append(server)
        await server.start()
        return server

    yield start
    for server in servers:
        await server.stop()
        server.cleanup()


def bus(service: ChatServer) -> RedisBus:
    b = service.bus
    assert isinstance(b, RedisBus)
    return b


async def allUp(*services: ChatServer) -> None:
    await waitFor(lambda: all(bus(s).available for s in services))


async def opened(url: str, count: int = 1) -> list[QueueClientProtocol]:
    clients = []
    for _ in range(count):
        client = await connect(url)
        assert await client.nextText() == DEFAULT_WELCOME
        clients.append(client)
    return clients


async def redisCommand(server: RedisServer, *args: str | bytes) -> Any:
    return (await redisCommands(server, args))[0]


async def redisCommands(server: RedisServer, *commands: tuple[str | bytes, ...]) -> list[Any]:
    """Send ``commands`` back to back on one connection; their replies."""
    connection = await txredisapi.Connection(
        "127.0.0.1",
        server.port,
        reconnect=False,
        charset=None,
        convertNumbers=False,
        password=server.password,
    )
    try:
        sent = [connection.execute_command(*args) for args in commands]
        return [await reply for reply in sent]
    finally:
        await connection.disconnect()


@asynccontextmanager
async def stopped(server: RedisServer) -> AsyncIterator[None]:
    """redis-server stopped (SIGSTOP) within the block, continued (SIGCONT) after it, always."""
    info = await redisCommand(server, "INFO", "server")
    [pid] = [
        int(line.split(b":")[1]) for line in info.split(b"\r\n") if line.startswith(b"process_id:")
    ]
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


class FakeOrigin:
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def refused(self, reason: str) -> None:
        self.reasons.append(reason)


def busAlone(server: RedisServer, **kwargs: Any) -> RedisBus:
    """A RedisBus on ``server`` with a room of nobody, started."""
    bus = RedisBus(
        Room(lambda payload, isBinary: payload),  # type: ignore[arg-type, return-value]
        parseRedisURL(server.url),
        **kwargs,
    )
    bus.startService()
    return bus


def test_redis_server_is_installed():
    """redis-server is on PATH: without it the Redis tests must fail, not skip."""
    import shutil

    assert shutil.which("redis-server"), "install it: apt-get install redis-server"


@pytest_twisted.ensureDeferred
async def test_three_daemons_one_room(redis, daemon):
    """Clients on three daemons all get every message, in one order, each sender's in FIFO."""
    server = await redis()
    daemons = [daemon("--redis", server.url, "--no-message-log") for _ in range(3)]
    services = [s for s, _ in daemons]
    await allUp(*services)
    clients = [c for _, url in daemons for c in await opened(url, 2)]
    perSender = 5
    for i in range(perSender):
        for n, c in enumerate(clients):
            c.sendText(f"m{n}.{i}")
    total = perSender * len(clients)
    received = [await c.texts(total) for c in clients]

    order = received[0]
    for other in received[1:]:
        assert other == order
    sent = [[f"m{n}.{i}" for i in range(perSender)] for n in range(len(clients))]
    assert bySender(order, sent) == [
        [f"{c.address}: {text}" for text in texts] for c, texts in zip(clients, sent, strict=True)
    ]
    assert len(set(order)) == total
    assert sum(bus(s).published for s in services) == total
    assert [bus(s).received for s in services] == [total] * 3
    assert [bus(s).refused for s in services] == [0] * 3
    await closeAll(clients)


@pytest_twisted.ensureDeferred
async def test_redis_restarted(redis, daemon, logged):
    """Redis restarted mid-conversation: senders are told meanwhile, then the room resumes."""
    server = await redis()
    (a, urlA), (b, urlB) = daemon("--redis", server.url), daemon("--redis", server.url)
    await allUp(a, b)
    ca, cb = await opened(urlA) + await opened(urlB)
    ca.sendText("before")
    assert [await ca.nextText(), await cb.nextText()] == [f"{ca.address}: before"] * 2

    await server.stop()
    await waitFor(lambda: not bus(a).available and not bus(b).available)
    assert any("Redis link lost" in line for line in logged)
    cb.sendText("during")
    assert await cb.nextText() == REFUSAL
    assert bus(b).refused == 1

    await server.start()
    await allUp(a, b)
    ups = [line for line in logged if "Redis link up" in line]
    # First connects say just where; reconnects say how long down and what was refused.
    assert [line for line in ups if "down" not in line and "refused" not in line][:2] == ups[:2]
    assert any("(down " in line and ", 1 message refused meanwhile)" in line for line in ups)
    assert any("(down " in line and ", 0 messages refused meanwhile)" in line for line in ups)
    # The same connections, still open: "during" reached nobody, "after" reaches all.
    cb.sendText("after")
    assert [await ca.nextText(), await cb.nextText()] == [f"{cb.address}: after"] * 2
    assert not ca.closed.called and not cb.closed.called
    await closeAll([ca, cb])


@pytest_twisted.ensureDeferred
async def test_redis_absent_at_start(redis, daemon, logged):
    """A daemon whose Redis is not up yet serves clients, refuses messages, then joins."""
    port = freePort()
    service, url = daemon("--redis", f"redis://127.0.0.1:{port}/0")
    [client] = await opened(url)
    client.sendText("too early")
    assert await client.nextText() == REFUSAL
    await waitFor(lambda: any("is unreachable" in line for line in logged))

    await redis(port)
    await allUp(service)
    client.sendText("now")
    assert await client.nextText() == f"{client.address}: now"
    await closeAll([client])


@pytest_twisted.ensureDeferred
async def test_garbage_on_channel(redis, daemon, logged):
    """Malformed envelopes on the channel are logged and skipped; a valid foreign one is relayed."""
    server = await redis()
    # Without history: a foreign version-1 envelope without a position is relayed as it is.
    noHistory = ("--redis", server.url, "--history", "0")
    (a, urlA), (b, urlB) = daemon(*noHistory), daemon(*noHistory)
    await allUp(a, b)
    ca, cb = await opened(urlA) + await opened(urlB)
    garbage = [b"garbage", b"", b"\x96\x02\xa1n\xa1s\xc2\xcb", b"\x81\xa1v\x01"]
    for data in garbage:
        await redisCommand(server, "PUBLISH", "wschat", data)
    foreign = Envelope(Message("192.0.2.7:4242", b"from elsewhere"), "other-node", 0.0)
    await redisCommand(server, "PUBLISH", "wschat", encodeEnvelope(foreign))
    ca.sendText("still here")
    for c in (ca, cb):
        assert await c.texts(2) == ["192.0.2.7:4242: from elsewhere", f"{ca.address}: still here"]
    assert [bus(s).malformed for s in (a, b)] == [len(garbage)] * 2
    assert sum("malformed envelope" in line for line in logged) == 2 * len(garbage)
    await closeAll([ca, cb])


@pytest_twisted.ensureDeferred
async def test_daemon_leaves_and_rejoins(redis, daemon):
    """A daemon that stops leaves the channel; the room goes on, and a new daemon joins it."""
    server = await redis()
    (a, urlA), (b, urlB) = daemon("--redis", server.url), daemon("--redis", server.url)
    await allUp(a, b)
    assert await redisCommand(server, "PUBSUB", "NUMSUB", "wschat") == [b"wschat", 2]
    ca, cb = await opened(urlA) + await opened(urlB)
    cb.sendText("bye")
    assert await ca.nextText() == f"{cb.address}: bye"
    await closeAll([cb])

    await b.stopService()
    assert await redisCommand(server, "PUBSUB", "NUMSUB", "wschat") == [b"wschat", 1]
    # Its publishing connection is gone too: only a's two, and the one asking, remain.
    clients = await redisCommand(server, "CLIENT", "LIST")
    assert clients.count(b"\n") == 3
    ca.sendText("alone")
    assert await ca.nextText() == f"{ca.address}: alone"

    c, urlC = daemon("--redis", server.url)
    await allUp(c)
    [cc] = await opened(urlC)
    cc.sendText("back")
    assert [await ca.nextText(), await cc.nextText()] == [f"{cc.address}: back"] * 2
    await closeAll([ca, cc])


@pytest_twisted.ensureDeferred
async def test_password(redis, daemon, logged):
    """A password in the URL authenticates; a wrong one is logged and never retried blindly."""
    server = await redis(password="s3cret")
    good, url = daemon("--redis", f"redis://:s3cret@127.0.0.1:{server.port}/1")
    bad, _ = daemon("--redis", f"redis://:bad-pw-7f3@127.0.0.1:{server.port}/1")
    none, _ = daemon("--redis", f"redis://127.0.0.1:{server.port}/1")
    await allUp(good)
    [client] = await opened(url)
    client.sendText("authenticated")
    assert await client.nextText() == f"{client.address}: authenticated"
    await waitFor(lambda: sum("refused this daemon" in line for line in logged) == 2)
    assert any("WRONGPASS" in line for line in logged)
    assert any("NOAUTH" in line for line in logged)
    assert not bus(bad).available and not bus(none).available
    # Given up: neither holds a connection (only good's two and the one asking remain).
    await waitFor(lambda: bus(bad)._factories == [] and bus(none)._factories == [])
    assert not any("s3cret" in line or "bad-pw-7f3" in line for line in logged)
    clients = await redisCommand(server, "CLIENT", "LIST")
    assert clients.count(b"\n") == 3
    await closeAll([client])


@pytest_twisted.ensureDeferred
async def test_channels_are_separate_rooms(redis, daemon):
    """Daemons on different --channel values share a Redis but not a room."""
    server = await redis()
    (a, urlA) = daemon("--redis", server.url, "--channel", "one")
    (b, urlB) = daemon("--redis", server.url, "--channel", "two")
    await allUp(a, b)
    ca, cb = await opened(urlA) + await opened(urlB)
    ca.sendText("in one")
    cb.sendText("in two")
    assert await ca.nextText() == f"{ca.address}: in one"
    assert await cb.nextText() == f"{cb.address}: in two"
    assert (bus(a).received, bus(b).received) == (1, 1)
    await closeAll([ca, cb])


@pytest_twisted.ensureDeferred
async def test_publish_lost_in_flight(redis, daemon):
    """A message whose PUBLISH was cut off by a broken link: its sender hears it may be lost."""
    server = await redis()
    service, url = daemon("--redis", server.url)
    await allUp(service)
    [client] = await opened(url)
    await redisCommand(server, "CLIENT", "PAUSE", "10000", "WRITE")
    client.sendText("held")
    await waitFor(lambda: bus(service).published == 1)
    # The daemon's publishing connection, with the PUBLISH Redis holds, is killed.
    await redisCommands(
        server, ("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"), ("CLIENT", "UNPAUSE")
    )
    assert await client.nextText() == f"wschat: {REFUSED_LOST}"
    await allUp(service)
    client.sendText("again")
    assert await client.nextText() == f"{client.address}: again"
    assert bus(service).refused == 1
    await closeAll([client])


@pytest_twisted.ensureDeferred
async def test_publish_reaches_no_daemon(redis, daemon):
    """
    Without history, a message Redis relayed to no subscriber at all: its sender is told it was
    not delivered. (With history it is kept: see test_redis_history.)
    """
    server = await redis()
    service, url = daemon("--redis", server.url, "--history", "0")
    await allUp(service)
    [client] = await opened(url)
    await redisCommand(server, "CLIENT", "PAUSE", "10000", "WRITE")
    client.sendText("orphan")
    await waitFor(lambda: bus(service).published == 1)
    # The subscription goes; then Redis runs the held PUBLISH, for nobody.
    await redisCommands(server, ("CLIENT", "KILL", "TYPE", "pubsub"), ("CLIENT", "UNPAUSE"))
    assert await client.nextText() == f"wschat: {REFUSED_NO_ROOM}"
    await allUp(service)
    client.sendText("again")
    assert await client.nextText() == f"{client.address}: again"
    await closeAll([client])


@pytest_twisted.ensureDeferred
async def test_silent_redis_dropped(redis, logged):
    """A Redis that stops answering (no RST) is found by the heartbeat, dropped, and rejoined."""
    server = await redis()
    bus = RedisBus(
        Room(lambda payload, isBinary: payload),  # type: ignore[arg-type, return-value]
        parseRedisURL(server.url),
        heartbeat=0.1,
        replyTimeout=0.2,
    )
    bus.startService()
    try:
        await waitFor(lambda: bus.available)
        # Every client, ours included, goes unanswered for 2 s; no connection is closed.
        await redisCommand(server, "CLIENT", "PAUSE", "2000", "ALL")
        await waitFor(lambda: not bus.available, timeout=1.8)
        await waitFor(lambda: bus.available)
        assert any("Redis link lost" in line for line in logged)
    finally:
        await bus.stopService()


@pytest_twisted.ensureDeferred
async def test_stalled_redis_sender_told_soon(redis, daemon, logged):
    """A stopped Redis: new messages are refused with a notice within STALL_TIMEOUT s."""
    server = await redis()
    service, url = daemon("--redis", server.url, "--no-message-log")
    await allUp(service)
    [client] = await opened(url)
    async with stopped(server):
        start = reactor.seconds()
        client.sendText("held")
        await waitFor(lambda: not bus(service).available, timeout=STALL_TIMEOUT + 1)
        client.sendText("refused")
        assert await client.nextText() == f"wschat: {REFUSED_STALLED}"
        assert reactor.seconds() - start < STALL_TIMEOUT + 1
        assert (bus(service).backlog, bus(service).refused) == (1, 1)
        assert any("has not answered for over 2 s" in line for line in logged)
    # Redis answers again: the held message is relayed, and new ones are.
    assert await client.nextText() == f"{client.address}: held"
    await waitFor(lambda: bus(service).available)
    client.sendText("after")
    assert await client.nextText() == f"{client.address}: after"
    assert any("answers again" in line and "1 message refused" in line for line in logged)
    assert bus(service).backlog == 0
    await closeAll([client])


@pytest_twisted.ensureDeferred
async def test_backlog_bounded(redis, logged):
    """While Redis is stopped, unanswered PUBLISHes stay within the count and byte bounds."""
    server = await redis()
    bus = busAlone(server, stallTimeout=600, maxBacklog=5, maxBacklogBytes=10_000)
    try:
        await waitFor(lambda: bus.available)
        origins = [FakeOrigin() for _ in range(12)]
        async with stopped(server):
            payloads = [b"x" * 4000] * 3 + [b"small"] * 9
            for payload, origin in zip(payloads, origins, strict=True):
                bus.publish(Message("127.0.0.1:1", payload), origin)
                assert bus.backlog <= 5 and bus.backlogBytes <= 10_000
            # Two big ones fit in the bytes, the third does not; three small ones fill the count.
            full = [[REFUSED_BACKLOG]]
            assert [o.reasons for o in origins] == [[]] * 2 + full + [[]] * 3 + full * 6
            assert (bus.backlog, bus.published, bus.refused) == (5, 5, 7)
            assert sum("Redis backlog is full" in line for line in logged) == 1
        await waitFor(lambda: bus.backlog == 0)
        assert bus.backlogBytes == 0
        assert [o.reasons for o in origins[:2]] == [[]] * 2
        # Drained: accepted again, and the drain is logged.
        late = FakeOrigin()
        bus.publish(Message("127.0.0.1:1", b"again"), late)
        await waitFor(lambda: bus.backlog == 0)
        assert late.reasons == [] and bus.published == 6
        assert any("backlog has drained (7 messages refused meanwhile)" in line for line in logged)
    finally:
        await bus.stopService()


@pytest_twisted.ensureDeferred
async def test_no_link_up_while_stopped(redis, logged):
    """A reconnection the kernel accepts for a stopped Redis is not logged or used as link up."""
    server = await redis()
    # No heartbeat: the subscribing connection stays, as it does between heartbeats.
    bus = busAlone(server, heartbeat=600, replyTimeout=0.3)
    try:
        await waitFor(lambda: bus.available)
        async with stopped(server):
            # An unanswered PUBLISH times out: the publishing connection is dropped...
            bus.publish(Message("127.0.0.1:1", b"held"), FakeOrigin())
            lost = "Redis link lost (Redis did not answer within 0.3 s)"
            await waitFor(lambda: any(lost in line for line in logged))
            # ... and made again, to a Redis that cannot answer.
            await waitFor(lambda: bus._publisher is not None)
            first = bus._publisher
            assert not bus.available
            # Its PING goes unanswered too: dropped, and made again.
            await waitFor(lambda: bus._publisher not in (None, first))
            assert not bus.available
            assert not any("Redis link up" in line and "down" in line for line in logged)
        await waitFor(lambda: bus.available)
        assert any("Redis link up" in line and "(down " in line for line in logged)
    finally:
        await bus.stopService()


@pytest_twisted.ensureDeferred
async def test_send_id_crosses_daemons(redis, daemon):
    """A JSON send's id comes back on its relayed copy, on its own daemon and on the others."""
    server = await redis()
    (a, urlA), (b, urlB) = (daemon("--redis", server.url, "--no-message-log") for _ in range(2))
    await allUp(a, b)
    sender = await connect(urlA, protocols=[JSON_SUBPROTOCOL])
    other = await connect(urlB, protocols=[JSON_SUBPROTOCOL])
    for c in (sender, other):
        assert json.loads(await c.nextText())["type"] == "welcome"
    sender.sendText(json.dumps({"type": "send", "text": "once", "id": "k-1"}))
    for c in (sender, other):
        got = json.loads(await c.nextText())
        while got["type"] == "join":
            # Presence is room-wide: the other daemon's client's join may come first.
            got = json.loads(await c.nextText())
        assert (got["type"], got["text"], got["id"]) == ("message", "once", "k-1")
    await closeAll([sender, other])
