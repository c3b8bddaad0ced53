"""
One hostile client and 50 ordinary ones in one room, on the daemon's default limits.

The flooder sends small messages as fast as its socket takes them (``--mode send``), or empty
pings (``--mode ping``), and reads everything it gets back. Each ordinary client sends a short
message every ``--interval`` seconds and reads everything. Printed: whether any ordinary
client was dropped, whether every ordinary message reached every ordinary client, their
latency before and during the flood (p50, p99, max), what the flooder got through (messages
relayed, or pongs, per second), and the daemon's CPU and RSS.

    python benchmarks/flood.py                 # both modes, 20 s of flood each
    python benchmarks/flood.py --mode ping --seconds 30 -- --inbound-rate 0   # daemon options
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

from children import freePort, processes, waitListening

from wschat.bench.frames import clientFrame, handshakeRequest, handshakeResponse
from wschat.bench.stats import processCpuSeconds, processRssBytes

OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 1, 8, 9, 10


class Frames:
    """Splits unmasked server frames out of a byte stream."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buf += data
        out = []
        buf = self.buf
        i = 0
        while len(buf) - i >= 2:
            opcode = buf[i] & 0x0F
            n = buf[i + 1] & 0x7F
            j = i + 2
            if n == 126:
                if len(buf) - j < 2:
                    break
                n = int.from_bytes(buf[j : j + 2], "big")
                j += 2
            elif n == 127:
                if len(buf) - j < 8:
                    break
                n = int.from_bytes(buf[j : j + 8], "big")
                j += 8
            if len(buf) - j < n:
                break
            out.append((opcode, bytes(buf[j : j + n])))
            i = j + n
        del buf[:i]
        return out


@dataclass
class Ordinary:
    index: int
    sent: int = 0
    received: dict[int, int] = field(default_factory=dict)  # sender -> messages seen
    closed: bool = False
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (when sent, seconds)


async def open_(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(handshakeRequest("127.0.0.1", port, "/"))
    buf = b""
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        done, rest = handshakeResponse(buf + chunk)
        if done:
            return reader, writer, rest
        buf += chunk


async def ordinaryClient(
    port: int, me: Ordinary, interval: float, stop: asyncio.Event, ready: asyncio.Barrier
) -> None:
    reader, writer, rest = await open_(port)
    frames = Frames()
    await ready.wait()

    async def send() -> None:
        # Spread the clients' sends over the interval.
        await asyncio.sleep(interval * me.index / 50)
        while not stop.is_set():
            payload = b"o %d %d %d" % (me.index, me.sent, time.monotonic_ns())
            writer.write(clientFrame(payload))
            me.sent += 1
            await asyncio.sleep(interval)

    sender = asyncio.create_task(send())
    data = rest
    try:
        while True:
            now = time.monotonic_ns()
            for opcode, payload in frames.feed(data):
                if opcode == OP_CLOSE:
                    me.closed = True
                    return
                if payload[:2] == b"o ":
                    _, who, _, sent = payload.split()
                    who_ = int(who)
                    me.received[who_] = me.received.get(who_, 0) + 1
                    me.latencies.append((int(sent) / 1e9, (now - int(sent)) / 1e9))
            data = await reader.read(65536)
            if not data:
                me.closed = True
                return
    except asyncio.CancelledError:
        pass
    finally:
        sender.cancel()
        writer.close()


@dataclass
class Flooder:
    sent: int = 0
    back: int = 0
    closed: str = ""


async def flooder(port: int, mode: str, me: Flooder, stop: asyncio.Event) -> None:
    reader, writer, rest = await open_(port)
    frames = Frames()
    batch = clientFrame(b"", OP_PING) * 500 if mode == "ping" else clientFrame(b"f" * 16) * 500
    want = OP_PONG if mode == "ping" else OP_TEXT

    async def send() -> None:
        while not stop.is_set():
            writer.write(batch)
            me.sent += 500
            await writer.drain()

    sender = asyncio.create_task(send())
    data = rest
    try:
        while True:
            for opcode, payload in frames.feed(data):
                if opcode == OP_CLOSE:
                    me.closed = f"closed {int.from_bytes(payload[:2], 'big')} {payload[2:]!r}"
                    return
                if opcode == want and (mode == "ping" or payload[:1] == b"f"):
                    me.back += 1
            data = await reader.read(65536)
            if not data:
                me.closed = me.closed or "dropped"
                return
    except asyncio.CancelledError:
        pass
    finally:
        sender.cancel()
        writer.close()


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


async def run(port: int, pid: int, args: argparse.Namespace, mode: str) -> None:
    stop, floodStop = asyncio.Event(), asyncio.Event()
    clients = [Ordinary(i) for i in range(args.clients)]
    ready = asyncio.Barrier(args.clients + 1)
    tasks = [
        asyncio.create_task(ordinaryClient(port, c, args.interval, stop, ready)) for c in clients
    ]
    await ready.wait()
    rss0 = processRssBytes(pid) or 0
    await asyncio.sleep(args.warmup)
    floodStart = time.monotonic()
    cpu0 = processCpuSeconds(pid) or 0.0
    bad = Flooder()
    flood = asyncio.create_task(flooder(port, mode, bad, floodStop))
    peak = rss0
    for _ in range(int(args.seconds)):
        await asyncio.sleep(1)
        peak = max(peak, processRssBytes(pid) or 0)
    floodEnd = time.monotonic()
    cpu = ((processCpuSeconds(pid) or 0.0) - cpu0) / (floodEnd - floodStart)
    back = bad.back
    floodStop.set()
    stop.set()
    # Let every ordinary message in flight arrive.
    await asyncio.sleep(args.drain)
    flood.cancel()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, flood, return_exceptions=True)

    dropped = sum(c.closed for c in clients)
    expected = {c.index: c.sent for c in clients}
    missing = sum(max(0, expected[s] - c.received.get(s, 0)) for c in clients for s in expected)
    before = [lat for c in clients for sent, lat in c.latencies if sent < floodStart]
    during = [lat for c in clients for sent, lat in c.latencies if floodStart <= sent < floodEnd]
    wall = floodEnd - floodStart
    what = "pongs" if mode == "ping" else "messages relayed"
    print(f"\n== flooder mode: {mode}; {args.clients} ordinary clients", end="")
    print(f", each sending one message every {args.interval} s")
    print(f"ordinary clients dropped: {dropped} of {args.clients}")
    print(
        f"ordinary messages: {sum(expected.values())} sent, "
        f"{sum(expected.values()) * args.clients} deliveries due, {missing} missing"
    )
    for label, lat in (("before the flood", before), ("during the flood", during)):
        print(
            f"latency {label}: p50 {pct(lat, 50) * 1e3:.1f} ms, p99 {pct(lat, 99) * 1e3:.1f} ms,"
            f" max {max(lat, default=float('nan')) * 1e3:.1f} ms ({len(lat)} deliveries)"
        )
    print(
        f"flooder: {bad.sent} frames written, {back} {what} back = {back / wall:.0f}/s"
        f"; {bad.closed or 'not closed'}"
    )
    print(
        f"daemon: CPU {cpu * 100:.0f}% of a core during the flood; RSS {rss0 / 2**20:.1f} MiB"
        f" before, peak {peak / 2**20:.1f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["send", "ping", "both"], default="both")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between messages")
    parser.add_argument("--seconds", type=float, default=20.0, help="of flood")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--drain", type=float, default=3.0)
    parser.add_argument("--twistd", default=os.path.join(os.path.dirname(sys.executable), "twistd"))
    parser.add_argument("daemonArgs", nargs="*", help="more twistd wschat options (after --)")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} (on {os.cpu_count()} cores)")
    for mode in ("send", "ping") if args.mode == "both" else (args.mode,):
        port = freePort()
        argv = [args.twistd, "-n", "--pidfile=", "wschat", "--port", str(port)]
        argv += ["--format", "raw", "--welcome", "", "--no-message-log", "--no-connection-log"]
        argv += args.daemonArgs
        with processes() as started:
            daemon = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            started.append(daemon)
            waitListening(port, daemon)
            asyncio.run(run(port, daemon.pid, args, mode))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
