"""
What one connection whose request head arrives in small pieces costs the reactor: the
dispatcher's work to find the end of a head of ``--max`` bytes, sent ``--pieces`` bytes at a
time (a slowloris, or a link with a tiny MSS). In-memory transport; no kernel.

    python benchmarks/slow_head.py [--pieces 1,16,1460]

Prints the best of three timings per piece size, in milliseconds per connection. It measures
the wschat Python imports: the installed one, or this checkout with ``PYTHONPATH=.``.
"""

from __future__ import annotations

import argparse
import time

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from wschat.dispatch import DispatchFactory
from wschat.limits import MAX_REQUEST_HEAD


class Sink(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass


def costMs(head: bytes, piece: int) -> float:
    """Milliseconds to take ``head`` in reads of ``piece`` bytes, best of three."""
    factory = Factory.forProtocol(Sink)
    factory.openHandshakeTimeout = 10  # type: ignore[attr-defined]
    best = float("inf")
    for _ in range(3):
        dispatcher = DispatchFactory(factory, factory, Clock()).buildProtocol(
            IPv4Address("TCP", "127.0.0.1", 1)
        )
        dispatcher.makeConnection(StringTransport())
        started = time.perf_counter()
        for i in range(0, len(head), piece):
            dispatcher.dataReceived(head[i : i + piece])
        best = min(best, time.perf_counter() - started)
    return best * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pieces", default="1,16,1460", help="read sizes, comma-separated")
    args = parser.parse_args()
    # Just under the limit: the head is taken, after the longest search the limit allows.
    head = b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_REQUEST_HEAD - 40) + b"\r\n\r\n"
    for piece in (int(p) for p in args.pieces.split(",")):
        print(f"{len(head)}-byte head in {piece}-byte reads: {costMs(head, piece):.1f} ms")


if __name__ == "__main__":
    main()
