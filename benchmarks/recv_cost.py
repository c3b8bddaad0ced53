"""
The Python cost of one received message: parsing its frame, ``onMessage`` and the broadcast
to one member (the sender), in memory, on a fake clock.

    python benchmarks/recv_cost.py [--size 64] [--per-read 4] [--reads 20000]

Each read (``dataReceived``) carries ``--per-read`` masked text frames of ``--size`` bytes.
Prints, side by side, the best of five timings in microseconds per received frame: through
Autobahn's frame parser, through wschat's lean receive path (wschat.lean.receiveFrames), and
the broadcast alone; then what unmasking and UTF-8 validation cost per frame each way. It
measures the wschat Python imports: the installed one, or this checkout with ``PYTHONPATH=.``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

from autobahn.websocket.utf8validator import Utf8Validator
from autobahn.websocket.xormasker import create_xor_masker

from wschat.bench import frames
from wschat.limits import Limits
from wschat.protocol import ChatServerProtocol
from wschat.testing import MemoryRoom
from wschat.wire import Format, Message


class AutobahnFrames(ChatServerProtocol):
    """A connection whose frames are all parsed by Autobahn."""

    leanFrames = False


def best(run: Callable[[], None], count: int) -> float:
    """Microseconds per unit of ``run`` (which does ``count`` units), best of five."""
    run()
    fastest = min(_timed(run) for _ in range(5))
    return fastest / count * 1e6


def _timed(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def receiveCost(lean: bool, size: int, perRead: int, reads: int) -> tuple[float, float]:
    """(received frame + broadcast, broadcast only), in microseconds per frame."""
    room = MemoryRoom(
        fmt=Format.RAW,
        welcome="",
        logMessages=False,
        logConnections=False,
        limits=Limits(inboundRate=0, inboundBytes=0, maxMessageSize=max(size, 1024)),
    )
    if not lean:
        factory: Any = room.factory
        factory.protocol = AutobahnFrames
    server, _ = room.connect()
    room.flush()
    transport: Any = server.transport
    payload = b"x" * size
    chunk = frames.frame(frames.OP_TEXT, payload, mask=os.urandom(4)) * perRead

    def receive() -> None:
        for _ in range(reads):
            server.dataReceived(chunk)
            room.clock.advance(0)
            transport.stream.clear()

    message = Message("127.0.0.1:50000", payload, False)
    broadcast = room.server.room.broadcast

    def broadcastOnly() -> None:
        for _ in range(reads):
            for _ in range(perRead):
                broadcast(message)
            room.clock.advance(0)
            transport.stream.clear()

    both = best(receive, reads * perRead)
    alone = best(broadcastOnly, reads * perRead)
    # Every frame was read and relayed: the figures are of work done.
    assert server.trafficStats.incomingWebSocketMessages >= reads * perRead
    return both, alone


def pieceCosts(size: int, count: int = 20000) -> dict[str, float]:
    """Microseconds per frame of unmasking and UTF-8 validation, each way."""
    mask = os.urandom(4)
    data = os.urandom(size)
    text = b"x" * size
    masks = (mask * ((size >> 2) + 1))[:size]
    validator = Utf8Validator()

    def intXor() -> None:
        for _ in range(count):
            (int.from_bytes(data, "little") ^ int.from_bytes(masks, "little")).to_bytes(
                size, "little"
            )

    def native() -> None:
        for _ in range(count):
            create_xor_masker(mask, size).process(data)

    def autobahnUtf8() -> None:
        for _ in range(count):
            validator.reset()
            validator.validate(text)

    def strictUtf8() -> None:
        for _ in range(count):
            if not text.isascii():
                text.decode("utf-8")

    return {
        "unmask, integer XOR": best(intXor, count),
        "unmask, Autobahn's masker": best(native, count),
        "UTF-8, Autobahn's validator": best(autobahnUtf8, count),
        "UTF-8, isascii/strict decode": best(strictUtf8, count),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="payload bytes per frame")
    parser.add_argument("--per-read", type=int, default=4, help="frames per dataReceived")
    parser.add_argument("--reads", type=int, default=20000, help="reads per timing")
    args = parser.parse_args()
    autobahn, alone = receiveCost(False, args.size, args.per_read, args.reads)
    lean, alone2 = receiveCost(True, args.size, args.per_read, args.reads)
    print(f"{args.size}-byte text frames, {args.per_read} per read, us per received frame:")
    print(f"  Autobahn's frame parser + onMessage + broadcast to 1: {autobahn:6.2f}")
    print(f"  lean receive path       + onMessage + broadcast to 1: {lean:6.2f}")
    print(f"  broadcast to 1 alone:                                 {min(alone, alone2):6.2f}")
    print(f"  lean / Autobahn: {lean / autobahn:.2f}")
    for size in sorted({64, 4096, args.size}):
        for name, cost in pieceCosts(size).items():
            print(f"  {size:5d} B  {name:30s} {cost:6.2f}")


if __name__ == "__main__":
    main()
