"""
Properties: nothing lost or reordered under concurrent senders (real loopback), and no
malformed input raises out of the server or stops the room (in memory).
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawws import RawPeer, frame, handshake
from twisted.internet import defer, reactor, task
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from txaio.testutil import replace_loop
from zope.interface import provider

from wschat.bench.frames import OP_TEXT
from wschat.limits import Limits
from wschat.server import ChatServer
from wschat.testing import connect, startDaemon
from wschat.wire import Format


@st.composite
def schedules(draw: st.DrawFn) -> tuple[int, int, list[int], list[bool]]:
    """K clients, M messages each, the order they are sent in, and where the reactor runs."""
    k = draw(st.integers(2, 4))
    m = draw(st.integers(1, 15))
    order = draw(st.permutations([i for i in range(k) for _ in range(m)]))
    yields = draw(st.lists(st.booleans(), min_size=len(order), max_size=len(order)))
    return k, m, order, yields


async def exchange(k: int, m: int, order: list[int], yields: list[bool], text: str) -> None:
    service, url = startDaemon(["--format", "raw", "--welcome", "", "--no-message-log"])
    try:
        clients = [await connect(url) for _ in range(k)]
        sent = [0] * k
        for sender, pause in zip(order, yields, strict=True):
            clients[sender].sendText(f"{sender}:{sent[sender]}:{text}")
            sent[sender] += 1
            if pause:
                await task.deferLater(reactor, 0)
        # A bound only to turn a lost message into a failure instead of a hang.
        received = [
            await defer.ensureDeferred(c.texts(k * m)).addTimeout(10, reactor) for c in clients
        ]
        expected = {f"{s}:{j}:{text}" for s in range(k) for j in range(m)}
        for got in received:
            assert set(got) == expected and len(got) == k * m
            for s in range(k):
                mine = [t for t in got if t.startswith(f"{s}:")]
                assert mine == [f"{s}:{j}:{text}" for j in range(m)], "per-sender order"
        assert all(got == received[0] for got in received), "one order for all"
        for c in clients:
            c.sendClose(1000)
        for c in clients:
            await c.closed
    finally:
        await service.stopService()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedules(), st.text(max_size=30))
def test_concurrent_senders_nothing_lost_one_order(schedule, text):
    """K clients send M messages each, interleaved: all get K*M, one order, FIFO per sender."""
    # pytest-twisted runs each hypothesis example in the reactor and waits for this Deferred.
    return defer.ensureDeferred(exchange(*schedule, text))


frames = st.builds(
    lambda opcode, payload, fin, rsv, masked: frame(
        opcode, payload, fin=fin, rsv=rsv, mask=b"\x01\x02\x03\x04" if masked else None
    ),
    st.sampled_from([0, 1, 2, 3, 8, 9, 10, 11, 15]),
    st.binary(max_size=300),
    st.booleans(),
    st.sampled_from([0, 0, 0, 4, 1, 7]),
    st.sampled_from([True, True, True, False]),
)
chunks = st.lists(frames | st.binary(min_size=1, max_size=200), max_size=8)


@provider(ILogObserver)
class FailureLog:
    def __init__(self) -> None:
        self.failures: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        if "log_failure" in event:
            self.failures.append(event)


@settings(max_examples=150, deadline=None)
@given(
    before=st.booleans(),
    data=chunks,
    fmt=st.sampled_from([Format.PREFIXED, Format.RAW]),  # a daemon's formats; JSON is per client
    compression=st.booleans(),
    paused=st.booleans(),
)
def test_malformed_input_never_raises_never_stops_the_room(
    before: bool, data: list[bytes], fmt: Format, compression: bool, paused: bool
) -> None:
    """Any bytes, before or after the handshake, never raise and never stop the others."""
    clock = MemoryReactorClock()
    failures = FailureLog()
    globalLogPublisher.addObserver(failures)
    try:
        with replace_loop(clock):
            server = ChatServer(
                fmt=fmt,
                welcome="",
                logMessages=False,
                limits=Limits(maxQueue=2000, maxMessageSize=1000, rateLimit=50, rateBurst=5),
                compression=compression,
                reactor=clock,
            )
            factory = server.factory
            a = RawPeer(factory, port=1).open()
            fuzz = RawPeer(factory, port=2)
            if not before:
                offer: Any = ("Sec-WebSocket-Extensions: permessage-deflate",) * compression
                fuzz.send(handshake(*offer))
            if paused:
                fuzz.protocol.pauseProducing()
            for chunk in data:
                fuzz.send(chunk)
            b = RawPeer(factory, port=3).open()
            clock.advance(15)
            if fuzz.dropped:
                fuzz.lose()
                assert fuzz.protocol not in list(server.room)
            a.sendText("still here")
            relayed = b"127.0.0.1:1: still here" if fmt is Format.PREFIXED else b"still here"
            assert b.texts()[-1:] == [relayed]
            assert a.texts()[-1:] == [relayed]
            clock.advance(30)
    finally:
        globalLogPublisher.removeObserver(failures)
    assert failures.failures == []


def test_fuzz_helpers_reach_the_room() -> None:
    """The fuzz test's own setup relays a well-formed message (the property is not vacuous)."""
    clock = MemoryReactorClock()
    with replace_loop(clock):
        factory = ChatServer(fmt=Format.RAW, welcome="", reactor=clock).factory
        a, b = RawPeer(factory, port=1).open(), RawPeer(factory, port=2).open()
        fuzz = RawPeer(factory, port=3).open()
        fuzz.send(frame(OP_TEXT, b"from fuzz"))
        assert b.texts() == a.texts() == [b"from fuzz"]
