"""
Daemon memory with clients that never read, in a busy room.

Starts ``twistd -n wschat`` in a subprocess, fills the room with readers and one sender
pushing 1 KiB messages as fast as the readers take them (a closed loop: a window of messages
in flight, acked by the sender's own copy), and connects clients that complete the handshake
and then never read a byte. It samples the daemon's resident memory (VmRSS) throughout, and
prints it, together with how many messages went through and how the daemon dealt with the
never-readers.

    python benchmarks/slow_reader.py                      # default --max-queue (1 MiB)
    python benchmarks/slow_reader.py --compare            # and again with --max-queue 1G
    python benchmarks/slow_reader.py --never-reader-every 1   # a new never-reader each second
    python benchmarks/slow_reader.py --seconds 30 --never-readers 5 -- --max-queue 256K
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from children import RawClient, listeningPort, rawConnect, spawnTwistd
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime

from wschat.bench.frames import handshakeRequest
from wschat.bench.stats import processRssBytes


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes."""
    size = processRssBytes(pid)
    if size is None:
        raise RuntimeError(f"no VmRSS for process {pid}")
    return size


class Reader(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.received += 1
        if self.factory.onEcho is not None:
            self.factory.onEcho()


class ReaderFactory(WebSocketClientFactory):
    protocol = Reader

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.opened: defer.Deferred[Reader] = defer.Deferred()
        self.received = 0
        self.onEcho: Any = None


async def run(reactor: Any, args: argparse.Namespace, daemonArgs: list[str]) -> dict[str, Any]:
    argv = ["--listen", "tcp:0:interface=127.0.0.1"]
    argv += ["--format", "raw", "--welcome", "", "--no-message-log", *daemonArgs]
    daemon = spawnTwistd(argv, cwd=os.getcwd())
    port = await listeningPort(daemon)
    url = f"ws://127.0.0.1:{port}"
    pid = daemon.transport.pid
    handshake = handshakeRequest("127.0.0.1", port, "/")

    def neverReader() -> defer.Deferred[RawClient]:
        """A client that completes the opening handshake, then never reads another byte."""
        return defer.ensureDeferred(rawConnect(url, RawClient(handshake, read=False)))

    try:
        factories = []
        readers = []
        for _ in range(args.readers):
            f = ReaderFactory(url)
            connectWS(f)
            readers.append(await f.opened)
            factories.append(f)
        sender = readers[0]
        neverReaders = [await neverReader() for _ in range(args.never_readers)]
        await task.deferLater(reactor, 0.5)
        baseline = rss(pid)

        payload = b"x" * args.size
        sent = 0
        inFlight = 0
        clock = IReactorTime(reactor)
        deadline = clock.seconds() + args.seconds

        def pump() -> None:
            nonlocal sent, inFlight
            while inFlight < args.window and clock.seconds() < deadline:
                sender.sendMessage(payload, isBinary=True)
                sent += 1
                inFlight += 1

        def echoed() -> None:
            nonlocal inFlight
            inFlight -= 1
            pump()

        factories[0].onEcho = echoed
        samples = [baseline]
        sampler = task.LoopingCall(lambda: samples.append(rss(pid)))
        sampler.start(0.25)
        arrivals = None
        if args.never_reader_every:

            async def arrive() -> None:
                neverReaders.append(await neverReader())

            arrivals = task.LoopingCall(lambda: defer.ensureDeferred(arrive()))
            arrivals.start(args.never_reader_every, now=False)
        pump()
        await task.deferLater(reactor, args.seconds)
        sampler.stop()
        if arrivals is not None:
            arrivals.stop()
        await task.deferLater(reactor, 1.0)
        final = rss(pid)
        for n in neverReaders:
            n.transport.abortConnection()
        received = [f.received for f in factories]
        return {
            "baseline": baseline,
            "peak": max(samples),
            "final": final,
            "sent": sent,
            "received": received,
            "dropped": daemon.output.count("bytes waiting to be sent"),
            "neverReaders": len(neverReaders),
            "timeline": [samples[len(samples) * q // 4 - 1] for q in (1, 2, 3, 4)],
        }
    finally:
        daemon.transport.signalProcess("TERM")
        await daemon.ended


def mib(n: int) -> str:
    return f"{n / (1 << 20):7.1f} MiB"


def report(label: str, r: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"== {label}")
    print(f"   daemon RSS: before traffic {mib(r['baseline'])}, peak {mib(r['peak'])}")
    quarters = ", ".join(mib(m).strip() for m in r["timeline"])
    print(f"               at each quarter of the run: {quarters}")
    print(f"               1 s after the run: {mib(r['final']).strip()}")
    print(
        f"   messages: {r['sent']} sent ({args.size} B each), "
        f"{r['sent'] * args.readers / args.seconds:,.0f} deliveries/s to readers; "
        f"every reader got all: {all(n == r['sent'] for n in r['received'])}"
    )
    print(f"   never-readers closed for a full queue: {r['dropped']} of {r['neverReaders']}")


async def main(reactor: Any, argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--readers", type=int, default=5)
    parser.add_argument("--never-readers", type=int, default=1)
    parser.add_argument(
        "--never-reader-every",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="connect another never-reading client every SECONDS during the run",
    )
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument(
        "--compare", action="store_true", help="also run with --max-queue 1G (no real bound)"
    )
    args, daemonArgs = parser.parse_known_args(argv)
    daemonArgs = [a for a in daemonArgs if a != "--"]
    runs = [("daemon " + " ".join(daemonArgs or ["(defaults)"]), daemonArgs)]
    if args.compare:
        unbounded = [*daemonArgs, "--max-queue", "1G"]
        runs.append(("daemon --max-queue 1G (no real bound)", unbounded))
    print(
        f"{args.readers} readers (one of them sending {args.size} B messages, "
        f"window {args.window}), {args.never_readers} never-reading client(s)"
        + (f" and one more every {args.never_reader_every:g} s" if args.never_reader_every else "")
        + f", {args.seconds:g} s"
    )
    for label, extra in runs:
        report(label, await run(reactor, args, extra), args)


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, sys.argv[1:])))
