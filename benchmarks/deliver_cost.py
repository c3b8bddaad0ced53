"""
The Python cost of one delivery: the room's loop, ``deliver`` and the connection's writer,
with the kernel taken out (each connection's socket is a stub whose ``send`` is ``len``).

    python benchmarks/deliver_cost.py [--members 1000] [--rounds 200] [--per-turn 40]

``--per-turn N`` broadcasts N messages per reactor turn (a saturated room carries about 40
per turn; with more than one, the turns after the first are busy).

Prints the best of five timings, in nanoseconds per delivery. The figure is a floor: in a
running daemon the same code runs with cold caches between system calls. It measures the
wschat Python imports: the installed one, or this checkout with ``PYTHONPATH=.``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import tcp
from twisted.internet.task import Clock

from wschat import fastwrite
from wschat.server import ChatServer
from wschat.wire import Format, Message


class StubSocket:
    """Takes every byte at once, without a system call."""

    send = staticmethod(len)


def stubTransport() -> Any:
    """A plain TCP transport, as the fast path sees it, with nothing queued."""
    t: Any = object.__new__(tcp.Server)
    t.dataBuffer = b""
    t._tempDataBuffer = []
    t.TLS = False
    t.disconnecting = False
    t._writeDisconnected = False
    t.connected = True
    t.socket = StubSocket()
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--per-turn", type=int, default=1)
    args = parser.parse_args()
    server = ChatServer(fmt=Format.RAW, logMessages=False)
    clock = Clock()
    turns = fastwrite.Turns(clock)
    server.room.turns = turns
    for _ in range(args.members):
        p = server.factory.buildProtocol(None)
        p.transport = fastwrite.wrap(stubTransport(), turns)
        p.state = WebSocketProtocol.STATE_OPEN
        # What onOpen decides for a connection that negotiated no compression.
        p._plainFrames = True
        server.room.join(p, Format.RAW, writer=p.transport)
    message = Message("127.0.0.1:54321", b"x" * 64, False)

    perTurn = args.per_turn

    def broadcast() -> None:
        for _ in range(perTurn):
            server.room.broadcast(message)
        # The turn's end, as the reactor runs it: the call it scheduled (calling endTurn
        # directly would leave every scheduled call on the clock, and each new one sorts them).
        clock.advance(0)

    for _ in range(50):
        broadcast()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(args.rounds):
            broadcast()
        best = min(best, (time.perf_counter() - start) / args.rounds / args.members / perTurn)
    print(
        f"{best * 1e9:.0f} ns per delivery ({args.members} members, {perTurn} per turn, best of 5)"
    )


if __name__ == "__main__":
    main()
