"""
One load-generating process: holds its share of the connections on an asyncio (uvloop when
installed) event loop, sends on a schedule or in a closed loop, and reports to the coordinator.

Coordinator and worker talk over a pipe with small tuples:

- coordinator → worker: ``("connect",)``, ``("start", t0, windowStart, windowEnd)`` (monotonic
  seconds), ``("finish", totalSent)``;
- worker → coordinator: ``("connected", summary)``, ``("progress", connected, sent, received,
  closed)``, ``("result", summary)``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, cast

from wschat.bench.frames import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    FrameReader,
    HandshakeError,
    MarkerCounter,
    clientFrame,
    handshakeRequest,
    handshakeResponse,
    marker,
    payload,
)
from wschat.bench.stats import histogram, processWaitSeconds
from wschat.tuning import raiseFileLimit

PROGRESS_INTERVAL = 0.25


@dataclass(frozen=True)
class Plan:
    """What one worker does."""

    index: int
    #: The servers as (numeric host, port, path): one, or several forming one room (--spread).
    targets: tuple[tuple[str, int, str], ...]
    #: Global client numbers of this worker's connections (a client's number is its sender id).
    clients: tuple[int, ...]
    #: For each of ``clients``, the index in ``targets`` of the server it connects to.
    clientTargets: tuple[int, ...]
    senders: frozenset[int]
    #: Clients besides the senders that read every frame (the rest only count).
    verifiers: frozenset[int]
    mode: str
    inflight: int
    ratePerSender: float
    #: Phase of each sender's schedule, in seconds after t0.
    phases: dict[int, float]
    size: int
    run: int
    concurrency: int
    connectTimeout: float


def sentStamp(due: float, nowMicros: int) -> int:
    """
    The send time a rate-mode message carries (µs): its scheduled time when sent late, so
    the delay counts as latency; the real time when the timer fired early.
    """
    return min(int(due * 1e6), nowMicros)


class BenchClient(asyncio.Protocol):
    """One raw WebSocket connection: handshake, then frames in and (for senders) frames out."""

    def __init__(self, worker: Worker, number: int, target: int) -> None:
        self.worker = worker
        self.number = number
        self.target = target
        self.transport: asyncio.Transport | None = None
        self.open = False
        self.closed = False
        self.opened: asyncio.Future[None] = worker.loop.create_future()
        self._pending = b""
        mark = worker.mark
        self.isSender = number in worker.plan.senders
        self.reader: FrameReader | MarkerCounter
        if self.isSender or number in worker.plan.verifiers:
            self.reader = FrameReader(mark, number, self._ownEcho, self._control)
        else:
            self.reader = MarkerCounter(mark)
        self.seq = 0
        self.inflight = 0

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.worker.requests[self.target])

    def data_received(self, data: bytes) -> None:
        if self.open:
            self.reader.feed(data, time.monotonic_ns() // 1000)
            return
        try:
            done, rest = handshakeResponse(self._pending + data)
        except HandshakeError as e:
            self._fail(e)
            return
        if not done:
            self._pending = rest
            return
        self._pending = b""
        self.open = True
        if not self.opened.done():
            self.opened.set_result(None)
        if rest:
            self.reader.feed(rest, time.monotonic_ns() // 1000)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self._fail(exc or ConnectionError("closed during the handshake"))
        if self.open and not self.closed:
            self.worker.closed += 1
        self.closed = True

    def _fail(self, e: BaseException) -> None:
        if not self.opened.done():
            self.opened.set_exception(e)
        if self.transport is not None:
            self.transport.abort()

    # -- frames

    def _control(self, opcode: int, data: bytes) -> None:
        assert self.transport is not None
        if opcode == OP_PING:
            self.transport.write(clientFrame(data, OP_PONG))
        elif opcode == OP_CLOSE and not self.closed:
            self.worker.closed += 1
            self.closed = True
            self.transport.write(clientFrame(data[:2], OP_CLOSE))
            self.transport.close()

    def send(self, sentMicros: int) -> None:
        if self.closed or self.transport is None:
            return
        w = self.worker
        self.transport.write(
            clientFrame(payload(w.mark, self.number, self.seq, sentMicros, w.plan.size))
        )
        self.seq += 1
        w.sent += 1

    def _ownEcho(self, seq: int) -> None:
        w = self.worker
        if w.closedLoop and self.inflight > 0:
            self.inflight -= 1
            if w.sending:
                self.inflight += 1
                self.send(time.monotonic_ns() // 1000)


class Worker:
    """One process's connections, schedule and counters."""

    def __init__(self, plan: Plan, pipe: Connection, loop: asyncio.AbstractEventLoop) -> None:
        self.plan = plan
        self.pipe = pipe
        self.loop = loop
        self.mark = marker(plan.run)
        self.requests = [handshakeRequest(h, p, path) for h, p, path in plan.targets]
        self.clients: list[BenchClient] = []
        self.sent = 0
        self.closed = 0
        self.sending = False
        self.closedLoop = plan.mode == "throughput"
        self.errors: list[str] = []
        self.window: dict[str, Any] = {}
        self.done: asyncio.Future[None] = loop.create_future()

    # -- control pipe

    def onPipe(self) -> None:
        while self.pipe.poll():
            try:
                message = self.pipe.recv()
            except EOFError:
                self.loop.remove_reader(self.pipe.fileno())
                if not self.done.done():
                    self.done.set_result(None)
                return
            verb = message[0]
            if verb == "connect":
                self.loop.create_task(self.connectAll())
            elif verb == "start":
                self.start(*message[1:])
            elif verb == "finish":
                self.finish(message[1])

    def received(self) -> int:
        return sum(c.reader.tally.received for c in self.clients)

    def progress(self) -> None:
        if self.done.done():
            return
        connected = sum(1 for c in self.clients if c.open and not c.closed)
        self.pipe.send(("progress", connected, self.sent, self.received(), self.closed))
        self.loop.call_later(PROGRESS_INTERVAL, self.progress)

    # -- connecting

    async def connectAll(self) -> None:
        plan = self.plan
        gate = asyncio.Semaphore(plan.concurrency)
        started = time.monotonic()

        async def one(number: int, target: int) -> None:
            async with gate:
                client = BenchClient(self, number, target)
                try:
                    await asyncio.wait_for(self._open(client), plan.connectTimeout)
                except (TimeoutError, OSError, HandshakeError) as e:
                    if len(self.errors) < 5:
                        self.errors.append(f"{type(e).__name__}: {e}")
                    if client.transport is not None:
                        client.transport.abort()
                    return
                self.clients.append(client)

        self.progress()
        pairs = zip(plan.clients, plan.clientTargets, strict=True)
        await asyncio.gather(*(one(n, t) for n, t in pairs))
        finished = time.monotonic()
        self.pipe.send(
            (
                "connected",
                {
                    "connected": len(self.clients),
                    "failed": len(plan.clients) - len(self.clients),
                    "started": started,
                    "finished": finished,
                    "errors": self.errors,
                },
            )
        )

    async def _open(self, client: BenchClient) -> None:
        host, port, _ = self.plan.targets[client.target]
        await self.loop.create_connection(lambda: client, host, port)
        await client.opened

    # -- the load

    def start(self, t0: float, windowStart: float, windowEnd: float) -> None:
        plan = self.plan
        mono = time.monotonic()
        loop = self.loop
        startUs = int(windowStart * 1e6)
        endUs = int(windowEnd * 1e6)
        for c in self.clients:
            if isinstance(c.reader, FrameReader):
                c.reader.window = (startUs, endUs)
        self.windowEnd = windowEnd
        loop.call_later(max(0.0, windowStart - mono), self._snapshot, "start")
        loop.call_later(max(0.0, windowEnd - mono), self._snapshot, "end")
        senders = [c for c in self.clients if c.isSender]
        if plan.mode == "throughput":
            loop.call_later(max(0.0, t0 - mono), self._startClosedLoop, senders)
        elif plan.mode == "rate" and plan.ratePerSender > 0:
            interval = 1.0 / plan.ratePerSender
            for c in senders:
                first = t0 + plan.phases.get(c.number, 0.0)
                loop.call_later(max(0.0, first - mono - 0.001), self._tick, c, first, interval)

    def _startClosedLoop(self, senders: list[BenchClient]) -> None:
        self.sending = True
        for c in senders:
            for _ in range(self.plan.inflight):
                c.inflight += 1
                c.send(time.monotonic_ns() // 1000)

    def _tick(self, client: BenchClient, due: float, interval: float) -> None:
        # Open loop: each message carries its scheduled time, so a late send shows as
        # latency. Timers fire up to 1 ms early; a message sent early carries its real time.
        now = time.monotonic()
        end = self.windowEnd
        while due <= now + 0.001 and due < end:
            client.send(sentStamp(due, time.monotonic_ns() // 1000))
            due += interval
        if due < end:
            self.loop.call_later(max(0.0, due - now - 0.001), self._tick, client, due, interval)

    def _snapshot(self, which: str) -> None:
        if which == "end":
            self.sending = False
        self.window[which] = {
            "cpu": time.process_time(),
            "wait": processWaitSeconds("self"),
            "sent": self.sent,
            "received": self.received(),
            "time": time.monotonic(),
        }

    def finish(self, totalSent: int) -> None:
        lost = duplicated = reordered = 0
        latencies: list[int] = []
        verified = 0
        for c in self.clients:
            t = c.reader.tally
            lost += max(0, totalSent - t.received)
            duplicated += max(0, t.received - totalSent)
            reordered += t.reordered
            if isinstance(c.reader, FrameReader):
                verified += 1
                latencies.extend(t.latencies)
        start = self.window.get("start", {})
        end = self.window.get("end", {})
        self.pipe.send(
            (
                "result",
                {
                    "connected": len(self.clients),
                    "open": sum(1 for c in self.clients if c.open and not c.closed),
                    "closed": self.closed,
                    "sent": self.sent,
                    "received": self.received(),
                    "lost": lost,
                    "duplicated": duplicated,
                    "reordered": reordered,
                    "verified": verified,
                    "histogram": dict(histogram(latencies)),
                    "window": {"start": start, "end": end},
                },
            )
        )
        for c in self.clients:
            if c.transport is not None:
                c.transport.abort()
        if not self.done.done():
            self.done.set_result(None)


def newLoop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def run(plan: Plan, pipe: Connection) -> None:
    """A worker process's main: serve the coordinator until it says finish."""
    raiseFileLimit()
    loop = newLoop()
    asyncio.set_event_loop(loop)
    worker = Worker(plan, pipe, loop)
    loop.add_reader(pipe.fileno(), worker.onPipe)
    try:
        loop.run_until_complete(worker.done)
    finally:
        loop.remove_reader(pipe.fileno())
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        pipe.close()
    os._exit(0)


def resolve(host: str, port: int) -> str:
    """A numeric address for ``host``, resolved once rather than per connection."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return str(info[0][4][0])
