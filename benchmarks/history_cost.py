"""
What history costs per relayed message: the room's broadcast with the window on (the default)
and off (``--history 0``), side by side, with the kernel taken out (each connection's socket is
a stub whose ``send`` is ``len``, as in ``deliver_cost.py``).

    python benchmarks/history_cost.py [--rounds 300]

Prints the best of five timings per broadcast and per delivery, for plain and JSON members, and
the ratio on/off. CPU time of this process only, so other work on the machine hardly moves it.
"""

from __future__ import annotations

import argparse
import time

from autobahn.websocket.protocol import WebSocketProtocol
from deliver_cost import stubTransport
from twisted.internet.task import Clock

from wschat import fastwrite
from wschat.server import ChatServer
from wschat.wire import Format, Message


def cost(members: int, fmt: Format, history: int, rounds: int) -> float:
    """Seconds of CPU per broadcast, best of five."""
    server = ChatServer(fmt=Format.RAW, logMessages=False, history=history)
    clock = Clock()
    turns = fastwrite.Turns(clock)
    for _ in range(members):
        p = server.factory.buildProtocol(None)
        p.transport = fastwrite.wrap(stubTransport(), turns)
        p.state = WebSocketProtocol.STATE_OPEN
        # What onOpen decides for a connection that negotiated no compression.
        p._plainFrames = True
        server.room.join(p, fmt)
    message = Message("127.0.0.1:54321", b"x" * 64, False)

    def broadcast() -> None:
        server.room.broadcast(message)
        clock.advance(0)  # the turn ends: Turns.endTurn sends what it held

    for _ in range(2000):  # a full window: trimming runs on every message
        broadcast()
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(rounds):
            broadcast()
        best = min(best, (time.process_time() - start) / rounds)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    print("| members | format | history on: µs/broadcast | off | on/off | ns/delivery on | off |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for members in (1, 10, 100, 1000):
        for fmt in (Format.RAW, Format.JSON):
            rounds = max(20, args.rounds * 100 // max(members, 100))
            on = cost(members, fmt, 1000, rounds)
            off = cost(members, fmt, 0, rounds)
            print(
                f"| {members} | {fmt.value} | {on * 1e6:.1f} | {off * 1e6:.1f} | {on / off:.2f} "
                f"| {on / members * 1e9:.0f} | {off / members * 1e9:.0f} |"
            )


if __name__ == "__main__":
    main()
