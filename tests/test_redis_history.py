"""
History, recovery, exactly-once sending and room-wide presence across daemons, through a real
redis-server on a free loopback port.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest_twisted
from redisserver import waitFor
from test_redis_room import allUp, bus, redis, redisCommand  # noqa: F401 (the fixture)
from twisted.internet import defer

from wschat.envelope import Envelope, decodeEnvelope, encodeEnvelope
from wschat.redisaddress import parseRedisURL
from wschat.redisbus import RedisBus
from wschat.server import ChatServer
from wschat.tap import Options, buildServer
from wschat.testing import QueueClientProtocol, connect
from wschat.wire import JSON_SUBPROTOCOL, Message


@pytest_twisted.async_yield_fixture
async def busDaemon() -> AsyncIterator[Callable[..., tuple[ChatServer, str]]]:
    """``busDaemon(redisURL, *args, **busOptions)``: a daemon whose RedisBus takes options."""
    started: list[ChatServer] = []

    def start(url: str, *args: str, **busOptions: Any) -> tuple[ChatServer, str]:
        options = Options()
        options.parseOptions(["--port", "0", *args])
        server = buildServer(options)
        server.useBus(
            RedisBus(server.room, parseRedisURL(url), reactor=server.reactor, **busOptions)
        )
        server.startService()
        started.append(server)
        port = server.ports[0].getHost()
        return server, f"ws://127.0.0.1:{port.port}"

    yield start
    for server in started:
        await defer.maybeDeferred(server.stopService)


async def jsonClient(url: str, query: str = "") -> tuple[QueueClientProtocol, dict[str, Any]]:
    """A JSON client of ``url`` (with ``query``), and its welcome."""
    client = await connect(f"{url}/{query}", protocols=[JSON_SUBPROTOCOL])
    welcome = json.loads(await client.nextText())
    assert welcome["type"] == "welcome"
    return client, welcome


async def nextOf(client: QueueClientProtocol, *kinds: str) -> dict[str, Any]:
    """The next object of one of ``kinds`` (messages by default) that ``client`` receives."""
    kinds = kinds or ("message",)
    while True:
        obj = json.loads(await client.nextText())
        if obj["type"] in kinds:
            return obj
        assert obj["type"] in ("join", "leave"), obj


async def messages(client: QueueClientProtocol, count: int) -> list[tuple[str, int, str]]:
    """The next ``count`` messages: (epoch, seq, text)."""
    return [(m["epoch"], m["seq"], m["text"]) for m in [await nextOf(client) for _ in range(count)]]


async def close(*clients: QueueClientProtocol) -> None:
    for c in clients:
        if c.transport is not None and not c.closed.called:
            c.sendClose(1000)
    await defer.gatherResults([c.closed for c in clients])


def cut(client: QueueClientProtocol) -> None:
    """Drop ``client``'s connection at the TCP level, without a closing handshake."""
    assert client.transport is not None
    client.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_same_position_on_every_daemon(redis, daemon):  # noqa: F811
    """Redis numbers each message once: every daemon relays it at the same epoch and seq."""
    server = await redis()
    (a, urlA), (b, urlB) = daemon("--redis", server.url), daemon("--redis", server.url)
    await allUp(a, b)
    (ca, wa), (cb, wb) = await jsonClient(urlA), await jsonClient(urlB)
    assert wa["epoch"] == wb["epoch"] and wa["seq"] == wb["seq"] == 0
    ca.sendText("a1")
    cb.sendText("b1")
    ca.sendText("a2")
    seen = [await messages(c, 3) for c in (ca, cb)]
    assert seen[0] == seen[1]
    assert [seq for _, seq, _ in seen[0]] == [1, 2, 3]
    assert {epoch for epoch, _, _ in seen[0]} == {wa["epoch"]}
    assert a.history is not None and b.history is not None
    assert (
        (a.history.epoch, a.history.head) == (b.history.epoch, b.history.head) == (wa["epoch"], 3)
    )
    assert await redisCommand(server, "XLEN", "wschat:history") == 3
    assert await redisCommand(server, "HGET", "wschat:position", "seq") == b"3"
    await close(ca, cb)


@pytest_twisted.ensureDeferred
async def test_stream_trimmed_to_the_window(redis, daemon):  # noqa: F811
    """The Stream keeps exactly the last --history messages, ids for --history-ttl."""
    server = await redis()
    a, url = daemon("--redis", server.url, "--history", "3", "--history-ttl", "60")
    await allUp(a)
    c, _ = await jsonClient(url)
    for i in range(5):
        c.sendText(json.dumps({"type": "send", "text": f"m{i}", "id": f"id-{i}"}))
    await messages(c, 5)
    entries = await redisCommand(server, "XRANGE", "wschat:history", "-", "+")
    assert [e[0] for e in entries] == [b"3-1", b"4-1", b"5-1"]
    assert 0 < await redisCommand(server, "PTTL", "wschat:id:id-0") <= 60_000
    assert 0 < await redisCommand(server, "PTTL", "wschat:history") <= 60_000
    await close(c)


@pytest_twisted.ensureDeferred
async def test_recovery_through_another_daemon(redis, daemon):  # noqa: F811
    """A client cut from daemon A resumes on daemon B with since=: nothing missed or repeated."""
    server = await redis()
    (a, urlA), (b, urlB) = daemon("--redis", server.url), daemon("--redis", server.url)
    await allUp(a, b)
    (c, _), (sa, _), (sb, _) = [await jsonClient(u) for u in (urlA, urlA, urlB)]
    sa.sendText("before")
    [(epoch, seq, text)] = await messages(c, 1)
    cut(c)
    await c.closed
    await waitFor(lambda: len(a.room) == 1)
    sa.sendText("during a")
    sb.sendText("during b")
    assert b.history is not None
    await waitFor(lambda: b.history.head == seq + 2)
    c2, welcome = await jsonClient(urlB, f"?since={epoch}:{seq}")
    assert (welcome["recovered"], welcome["epoch"], welcome["seq"]) == (True, epoch, seq + 2)
    sb.sendText("after")
    assert [t for _, _, t in await messages(c2, 3)] == ["during a", "during b", "after"]
    await close(c2, sa, sb)


@pytest_twisted.ensureDeferred
async def test_recovery_ahead_of_the_daemon(redis, daemon):  # noqa: F811
    """
    A client that saw messages (through A) that B's channel has not brought yet recovers on B:
    B reads them from the Stream, and skips the channel's copies when they come.
    """
    server = await redis()
    (a, urlA), (b, urlB) = daemon("--redis", server.url), daemon("--redis", server.url)
    await allUp(a, b)
    (c, _), (sa, _) = await jsonClient(urlA), await jsonClient(urlA)
    (watcher, _) = await jsonClient(urlB)
    late: list[bytes] = []
    relay = bus(b).relayEnvelope

    def holdMessages(data: bytes) -> None:
        # Messages wait; presence goes through.
        if isinstance(decodeEnvelope(data), Envelope):
            late.append(data)
        else:
            relay(data)

    bus(b).relayEnvelope = holdMessages  # type: ignore[method-assign]
    for i in range(4):
        sa.sendText(f"m{i}")
    got = await messages(c, 4)
    epoch, seq = got[1][0], got[1][1]
    await waitFor(lambda: len(late) == 4)
    assert b.history is not None and b.history.head == 0
    # Cut after m1: it resumes on B, whose channel is 4 messages behind.
    c2, welcome = await jsonClient(urlB, f"?since={epoch}:{seq}")
    assert welcome["recovered"] is True
    assert [t for _, _, t in await messages(c2, 2)] == ["m2", "m3"]
    # B's clients got them all, read back from Redis; the channel's copies change nothing.
    bus(b).relayEnvelope = relay  # type: ignore[method-assign]
    for data in late:
        relay(data)
    sa.sendText("live")
    assert [t for _, _, t in await messages(c2, 1)] == ["live"]
    assert [t for _, _, t in await messages(watcher, 5)] == ["m0", "m1", "m2", "m3", "live"]
    assert bus(b).readBack == 4
    await close(c2, sa, watcher)


@pytest_twisted.ensureDeferred
async def test_recovery_older_than_the_replica(redis, daemon):  # noqa: F811
    """Messages the daemon's window no longer holds are read back from the Stream for recovery."""
    server = await redis()
    (a, urlA), (b, urlB) = daemon("--redis", server.url), daemon("--redis", server.url)
    await allUp(a, b)
    (c, _), (s, _) = await jsonClient(urlA), await jsonClient(urlA)
    for i in range(5):
        s.sendText(f"m{i}")
    got = await messages(c, 5)
    epoch, seq = got[0][0], got[0][1]
    assert b.history is not None
    await waitFor(lambda: b.history.head == 5)
    # B's window forgets everything (as if it had started with nothing to fill it).
    b.history.restart(epoch, 5)
    c2, welcome = await jsonClient(urlB, f"?since={epoch}:{seq}")
    assert welcome["recovered"] is True
    assert [t for _, _, t in await messages(c2, 4)] == ["m1", "m2", "m3", "m4"]
    assert (b.history.first, b.history.head) == (2, 5)
    # Older than Redis holds: not recovered, and nothing is read for it.
    await redisCommand(server, "XTRIM", "wschat:history", "MAXLEN", "1")
    b.history.restart(epoch, 5)
    c3, welcome = await jsonClient(urlB, f"?since={epoch}:2")
    assert welcome["recovered"] is False
    await close(c, s, c2, c3)


@pytest_twisted.ensureDeferred
async def test_recovery_after_daemon_restart(redis, daemon):  # noqa: F811
    """A restarted daemon fills its window from the Stream and serves recovery from it."""
    server = await redis()
    (a, urlA), (b, urlB) = daemon("--redis", server.url), daemon("--redis", server.url)
    await allUp(a, b)
    (c, _), (s, _) = await jsonClient(urlA), await jsonClient(urlB)
    s.sendText("seen")
    [(epoch, seq, _)] = await messages(c, 1)
    cut(c)
    await a.stopService()
    s.sendText("missed 1")
    s.sendText("missed 2")
    a2, urlA2 = daemon("--redis", server.url)
    await allUp(a2)
    assert a2.history is not None
    await waitFor(lambda: a2.history.head == seq + 2)
    assert (a2.history.epoch, len(a2.history)) == (epoch, 3)
    c2, welcome = await jsonClient(urlA2, f"?since={epoch}:{seq}")
    assert welcome["recovered"] is True
    assert [t for _, _, t in await messages(c2, 2)] == ["missed 1", "missed 2"]
    # Filling the window sent nothing to anyone: s saw each message once.
    assert [t for _, _, t in await messages(s, 3)] == ["seen", "missed 1", "missed 2"]
    await close(c2, s)


@pytest_twisted.ensureDeferred
async def test_redis_lost_its_data(redis, daemon, logged):  # noqa: F811
    """A Redis restarted without its data is a new epoch: recovered false, positions from 1."""
    server = await redis()
    a, url = daemon("--redis", server.url)
    await allUp(a)
    c, _ = await jsonClient(url)
    c.sendText("old")
    [(epoch, seq, _)] = await messages(c, 1)
    cut(c)
    await server.stop()
    await server.start()
    await allUp(a)
    assert a.history is not None
    await waitFor(lambda: a.history.epoch != epoch)
    c2, welcome = await jsonClient(url, f"?since={epoch}:{seq}")
    assert welcome["recovered"] is False
    assert (welcome["epoch"], welcome["seq"]) == (a.history.epoch, 0)
    c2.sendText("new")
    assert await messages(c2, 1) == [(a.history.epoch, 1, "new")]
    assert not any("Unhandled" in line or "Traceback" in line for line in logged)
    await close(c2)


@pytest_twisted.ensureDeferred
async def test_duplicate_id_across_daemons(redis, daemon):  # noqa: F811
    """A resend of an id through another daemon is not relayed; its sender hears the original."""
    server = await redis()
    (a, urlA), (b, urlB) = daemon("--redis", server.url), daemon("--redis", server.url)
    await allUp(a, b)
    (ca, _), (cb, _) = await jsonClient(urlA), await jsonClient(urlB)
    send = json.dumps({"type": "send", "text": "once", "id": "f00-1"})
    ca.sendText(send)
    first = await nextOf(ca)
    assert (first["text"], first["id"]) == ("once", "f00-1")
    assert await nextOf(cb) == first
    cb.sendText(send)
    duplicate = await nextOf(cb, "duplicate")
    assert duplicate == {
        "type": "duplicate",
        "id": "f00-1",
        "epoch": first["epoch"],
        "seq": first["seq"],
    }
    cb.sendText("next")
    for c in (ca, cb):
        assert (await nextOf(c))["text"] == "next"
    assert await redisCommand(server, "XLEN", "wschat:history") == 2
    await close(ca, cb)


@pytest_twisted.ensureDeferred
async def test_message_kept_while_no_daemon_listens(redis, daemon):  # noqa: F811
    """
    With history, a message Redis took while no daemon was subscribed is in the history:
    relayed once the daemon has subscribed again, and its sender is not told otherwise.
    """
    server = await redis()
    service, url = daemon("--redis", server.url)
    await allUp(service)
    c, _ = await jsonClient(url)
    await redisCommand(server, "CLIENT", "PAUSE", "10000", "WRITE")
    c.sendText("orphan")
    await waitFor(lambda: bus(service).published == 1)
    await redisCommand(server, "CLIENT", "KILL", "TYPE", "pubsub")
    await redisCommand(server, "CLIENT", "UNPAUSE")
    assert [t for _, _, t in await messages(c, 1)] == ["orphan"]
    await allUp(service)
    c.sendText("again")
    assert [(s, t) for _, s, t in await messages(c, 1)] == [(2, "again")]
    assert bus(service).refused == 0
    await close(c)


@pytest_twisted.ensureDeferred
async def test_message_without_position_skipped(redis, daemon, logged):  # noqa: F811
    """A daemon with history skips (and logs) messages from one without: no position."""
    server = await redis()
    a, url = daemon("--redis", server.url)
    await allUp(a)
    c, _ = await jsonClient(url)
    foreign = Envelope(Message("192.0.2.7:4242", b"unnumbered"), "other-node", 0.0)
    await redisCommand(server, "PUBLISH", "wschat", encodeEnvelope(foreign))
    c.sendText("numbered")
    assert [t for _, _, t in await messages(c, 1)] == ["numbered"]
    assert bus(a).malformed == 1
    assert any("without a position from node other-node" in line for line in logged)
    await close(c)


@pytest_twisted.ensureDeferred
async def test_presence_across_daemons(redis, busDaemon):  # noqa: F811
    """
    online, join and leave count every daemon's connections; a daemon that stops without
    goodbye drops out when its alive key expires, one that stops cleanly at once.
    """
    server = await redis()
    ttl = 1.0
    a, urlA = busDaemon(server.url, heartbeat=0.1, presenceTTL=ttl)
    b, urlB = busDaemon(server.url, heartbeat=0.1, presenceTTL=ttl)
    c, urlC = busDaemon(server.url, heartbeat=0.1, presenceTTL=ttl)
    await allUp(a, b, c)
    ca, welcome = await jsonClient(urlA)
    assert welcome["online"] == 1
    # Reports travel through Redis: b and c learn of a's client soon, not at once.
    await waitFor(lambda: b.room.online() == c.room.online() == 1)
    cb, welcome = await jsonClient(urlB)
    assert welcome["online"] == 2
    join = await nextOf(ca, "join")
    assert (join["who"], join["online"]) == (cb.address, 2)
    await waitFor(lambda: c.room.online() == 2)
    cc, welcome = await jsonClient(urlC)
    assert welcome["online"] == 3
    for client in (ca, cb):
        join = await nextOf(client, "join")
        assert (join["who"], join["online"]) == (cc.address, 3)
    gone = cb.address
    await close(cb)
    leave = await nextOf(ca, "leave")
    assert (leave["who"], leave["online"]) == (gone, 2)

    # c dies without goodbye: its heartbeat stops, nothing is deleted.
    bus(c)._heartbeat.stop()
    stopped = bus(c)._reactor.seconds()
    await waitFor(lambda: a.room.online() == 1, timeout=ttl + 2)
    assert bus(a)._reactor.seconds() - stopped <= ttl + 0.5
    # Its count leaves Redis too, at a census after its key expired.
    version = bus(a)._version
    await waitFor(lambda: bus(a)._version >= version + 2 and not bus(a)._reporting)
    assert a.room.online() == 1
    assert await redisCommand(server, "HEXISTS", "wschat:presence", bus(c).node) == 0
    await close(ca)


@pytest_twisted.ensureDeferred
async def test_presence_goodbye(redis, busDaemon):  # noqa: F811
    """A daemon that stops says goodbye: the others stop counting its clients at once."""
    server = await redis()
    a, urlA = busDaemon(server.url, heartbeat=0.1, presenceTTL=30.0)
    b, urlB = busDaemon(server.url, heartbeat=0.1, presenceTTL=30.0)
    await allUp(a, b)
    ca, _ = await jsonClient(urlA)
    await waitFor(lambda: b.room.online() == 1)
    _cb, welcome = await jsonClient(urlB)
    assert welcome["online"] == 2
    await waitFor(lambda: a.room.online() == 2)
    await b.stopService()
    # Far sooner than the 30 s its alive key would take.
    await waitFor(lambda: a.room.online() == 1, timeout=5)
    assert await redisCommand(server, "HEXISTS", "wschat:presence", bus(b).node) == 0
    await close(ca)
