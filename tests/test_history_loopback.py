"""
History over real loopback connections: clients cut at the TCP level while senders keep
sending recover exactly what they missed; another epoch, late joiners, and a large replay to a
client that stops reading under a tiny --max-queue.
"""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
from twisted.internet import defer, reactor, task

from wschat.protocol import ChatServerProtocol
from wschat.server import ChatServer
from wschat.testing import QueueClientProtocol, closeAll, connect
from wschat.wire import JSON_SUBPROTOCOL

QUIET = ("--welcome", "", "--no-message-log", "--no-connection-log")


async def connectJSON(url: str, query: str = "") -> QueueClientProtocol:
    return await connect(url + "/" + ("?" + query if query else ""), protocols=[JSON_SUBPROTOCOL])


#: Seconds any one wait may take before the test fails instead of hanging.
WAIT = 30


def bounded(d: Any) -> Any:
    """``d`` (a coroutine or Deferred), failing after :data:`WAIT` seconds."""
    return defer.ensureDeferred(d).addTimeout(WAIT, reactor)


async def nextObject(client: QueueClientProtocol) -> dict[str, Any]:
    return json.loads(await bounded(client.nextText()))  # type: ignore[no-any-return]


def serverSide(service: ChatServer, client: QueueClientProtocol) -> ChatServerProtocol:
    """The daemon's connection for ``client``."""
    (proto,) = [m for m in service.room if getattr(m, "address", None) == client.address]
    assert isinstance(proto, ChatServerProtocol)
    return proto


class Sender:
    """Sends numbered lines, one per reactor turn, until told to stop."""

    def __init__(self, client: QueueClientProtocol) -> None:
        self.client = client
        self.count = 0
        self.running = True
        self.done = defer.ensureDeferred(self._run())

    async def _run(self) -> None:
        while self.running:
            self.client.sendText(f"n{self.count}")
            self.count += 1
            # Let the reactor turn: the daemon relays and the reader reads between sends.
            await task.deferLater(reactor, 0, lambda: None)

    async def stop(self) -> int:
        self.running = False
        await self.done
        self.client.sendText("last")
        return self.count


async def readUntil(client: QueueClientProtocol, log: list[dict[str, Any]], text: str) -> None:
    """Read objects into ``log`` until a message with ``text``."""
    while True:
        obj = await nextObject(client)
        if obj["type"] == "message":
            log.append(obj)
            if obj["text"] == text:
                return


async def readCount(client: QueueClientProtocol, log: list[dict[str, Any]], count: int) -> None:
    """Read objects into ``log`` until it holds ``count`` messages."""
    while len(log) < count:
        obj = await nextObject(client)
        if obj["type"] == "message":
            log.append(obj)


async def cutAndRecover(daemon: Any, byServer: bool) -> None:
    service, url = daemon(*QUIET)
    plain = await connect(url)
    reader = await connectJSON(url)
    welcome = await nextObject(reader)
    sender = Sender(plain)
    log: list[dict[str, Any]] = []
    await readCount(reader, log, 20)
    # The TCP connection is cut (no closing handshake) while the sender keeps sending.
    if byServer:
        serverSide(service, reader).abort()
    else:
        reader.transport.abortConnection()  # type: ignore[union-attr]
    await reader.closed
    for _ in range(10):
        await task.deferLater(reactor, 0, lambda: None)
    last = log[-1]
    back = await connectJSON(url, f"since={last['epoch']}:{last['seq']}")
    hello = await nextObject(back)
    assert hello["recovered"] is True
    assert hello["seq"] > last["seq"], "messages flowed during the reconnect"
    await sender.stop()
    await readUntil(back, log, "last")
    history = service.history
    assert history is not None
    seqs = [m["seq"] for m in log]
    assert seqs == list(range(welcome["seq"] + 1, history.head + 1))
    texts = [m["text"] for m in log]
    assert texts == [history.entry(s).message.payload.decode() for s in seqs]  # type: ignore[union-attr]
    assert texts[:-1] == [f"n{n}" for n in range(len(texts) - 1)]
    await closeAll([plain, back])


@pytest_twisted.ensureDeferred
async def test_cut_by_server_recovers_exactly_the_missed(daemon):
    """A client the daemon cuts at the TCP level, back with since=, gets exactly the missed."""
    await cutAndRecover(daemon, byServer=True)


@pytest_twisted.ensureDeferred
async def test_cut_by_client_recovers_exactly_the_missed(daemon):
    """A client whose own TCP connection aborts, back with since=, gets exactly the missed."""
    await cutAndRecover(daemon, byServer=False)


@pytest_twisted.ensureDeferred
async def test_restarted_daemon_is_another_epoch(daemon):
    """A position from a daemon that restarted: recovered false, and what the window holds."""
    first, url = daemon(*QUIET)
    reader = await connectJSON(url)
    old = await nextObject(reader)
    reader.sendText("before")
    before = await nextObject(reader)
    await closeAll([reader])
    await first.stopService()
    second, url2 = daemon(*QUIET)
    writer = await connectJSON(url2)
    hello = await nextObject(writer)
    assert hello["epoch"] != old["epoch"]
    writer.sendText("after")
    await nextObject(writer)
    back = await connectJSON(url2, f"since={before['epoch']}:{before['seq']}")
    welcome = await nextObject(back)
    assert (welcome["recovered"], welcome["epoch"]) == (False, hello["epoch"])
    replayed = await nextObject(back)
    assert (replayed["text"], replayed["seq"]) == ("after", 1)
    await closeAll([writer, back])


@pytest_twisted.ensureDeferred
async def test_late_joiner_gets_last_n(daemon):
    """history=N: the last N messages, oldest first, then live ones."""
    service, url = daemon(*QUIET)
    writer = await connectJSON(url)
    await nextObject(writer)
    for n in range(5):
        writer.sendText(f"m{n}")
    for _ in range(5):
        await nextObject(writer)
    late = await connectJSON(url, "history=3")
    assert "recovered" not in await nextObject(late)
    writer.sendText("live")
    got = [await nextObject(late) for _ in range(4)]
    assert [(m["text"], m["seq"]) for m in got] == [("m2", 3), ("m3", 4), ("m4", 5), ("live", 6)]
    await closeAll([writer, late])


@pytest_twisted.ensureDeferred
async def test_duplicate_id_over_loopback(daemon):
    """A resent id is answered with duplicate to its sender alone; others see it once."""
    service, url = daemon(*QUIET)
    a, b = await connectJSON(url), await connectJSON(url)
    await nextObject(a), await nextObject(b)
    await nextObject(a)  # b joined
    send = json.dumps({"type": "send", "text": "once", "id": "0f9c2a"})
    a.sendText(send)
    first = await nextObject(a)
    assert (first["text"], first["id"]) == ("once", "0f9c2a")
    assert await nextObject(b) == first
    a.sendText(send)
    b.sendText("after")
    assert await nextObject(a) == {
        "type": "duplicate",
        "id": "0f9c2a",
        "epoch": first["epoch"],
        "seq": first["seq"],
    }
    assert (await nextObject(b))["text"] == "after"
    await closeAll([a, b])


@pytest_twisted.ensureDeferred
async def test_large_replay_to_a_stalled_reader_under_tiny_max_queue(daemon):
    """A client asking for 24 MB of history and not reading: paced, never dropped, all delivered."""
    count, size = 6000, 4096
    service, url = daemon(
        *QUIET,
        "--max-queue",
        "1K",
        "--history",
        str(count),
        "--history-bytes",
        "128M",
        # Filling the window quickly is the setup, not what is tested: no inbound share.
        "--inbound-rate",
        "0",
        "--inbound-bytes",
        "0",
    )
    writer = await connect(url)
    for n in range(count):
        writer.sendText(f"{n:06d}" + "x" * (size - 6))
    await bounded(writer.texts(count))
    reader = await connect(url + f"/?history={count}")
    reader.transport.pauseProducing()  # type: ignore[union-attr]
    proto = serverSide(service, reader)
    paused: defer.Deferred[None] = defer.Deferred()
    if proto._paused:
        paused.callback(None)
    else:
        original = proto.pauseProducing

        def pauseProducing() -> None:
            original()
            if not paused.called:
                paused.callback(None)

        proto.pauseProducing = pauseProducing  # type: ignore[method-assign]
    await bounded(paused)
    # The daemon stopped writing: the rest waits in the history, behind a cursor.
    assert service.room.replaying(proto)
    assert proto._unsent == 0
    assert service.metrics.registry.get_sample_value("wschat_clients_dropped_total") == 0
    reader.transport.resumeProducing()  # type: ignore[union-attr]
    got = await bounded(reader.texts(count))
    prefix = writer.address + ": "
    assert [t[len(prefix) : len(prefix) + 6] for t in got] == [f"{n:06d}" for n in range(count)]
    assert not service.room.replaying(proto)
    await closeAll([writer, reader])
