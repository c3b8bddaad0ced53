"""
What a message that never ends costs the daemon: a text frame with FIN=0, then continuation
frames, empty or of one byte, as fast as the socket takes them.

Printed for each attack: frames written, how the daemon answered (close code, or none), and
its RSS before, at the peak, and after the connection is gone; then the CPU the daemon spent
on one message of 60,000 one-byte fragments.

    python benchmarks/fragments.py [--seconds 20] [-- twistd wschat options]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

from children import freePort, processes, waitListening

from wschat.bench.frames import clientFrame, handshakeRequest, handshakeResponse
from wschat.bench.stats import processCpuSeconds, processRssBytes

OP_CONT, OP_TEXT, OP_CLOSE, OP_PING = 0, 1, 8, 9


def fragment(data: bytes, opcode: int = OP_CONT, fin: bool = False) -> bytes:
    frame = bytearray(clientFrame(data, opcode))
    if not fin:
        frame[0] &= 0x7F
    return bytes(frame)


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(handshakeRequest("127.0.0.1", port, "/"))
    buf = b""
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        buf += chunk
        done, _ = handshakeResponse(buf)
        if done:
            return reader, writer


async def readClose(reader: asyncio.StreamReader, answer: list[str]) -> None:
    while True:
        data = await reader.read(65536)
        if not data:
            answer.append("connection dropped")
            return
        i = data.find(bytes([0x80 | OP_CLOSE]))
        if i >= 0 and len(data) >= i + 4:
            answer.append(f"closed {int.from_bytes(data[i + 2 : i + 4], 'big')}")


def mib(n: int | None) -> str:
    return f"{(n or 0) / 2**20:.1f} MiB"


async def endless(port: int, pid: int, piece: bytes, seconds: float) -> None:
    reader, writer = await connect(port)
    before = processRssBytes(pid)
    answer: list[str] = []
    watcher = asyncio.create_task(readClose(reader, answer))
    writer.write(fragment(b"x", OP_TEXT))
    batch = fragment(piece) * 10_000
    written = 0
    peak = before or 0
    end = time.monotonic() + seconds
    while time.monotonic() < end and not writer.is_closing():
        writer.write(batch)
        written += 10_000
        try:
            await asyncio.wait_for(writer.drain(), timeout=max(0.01, end - time.monotonic()))
        except (TimeoutError, ConnectionError):
            break
        peak = max(peak, processRssBytes(pid) or 0)
    peak = max(peak, processRssBytes(pid) or 0)
    writer.transport.abort()
    watcher.cancel()
    await asyncio.sleep(1)
    after = processRssBytes(pid)
    kind = "empty" if not piece else f"{len(piece)}-byte"
    print(
        f"{kind} continuation frames for {seconds:g} s: {written} written;"
        f" daemon: {', '.join(dict.fromkeys(answer)) or 'no answer'};"
        f" RSS {mib(before)} before, peak {mib(peak)}, {mib(after)} after the close"
    )


async def oneMessage(port: int, pid: int, count: int) -> None:
    reader, writer = await connect(port)
    message = fragment(b"x", OP_TEXT) + fragment(b"y") * (count - 2) + fragment(b"z", fin=True)
    cpu0 = processCpuSeconds(pid) or 0.0
    writer.write(message + clientFrame(b"", OP_PING))
    answer = "no answer"
    buf = b""
    while True:
        data = await reader.read(65536)
        if not data:
            answer = answer if answer != "no answer" else "connection dropped"
            break
        buf += data
        if bytes([0x80 | OP_CLOSE]) in buf:
            i = buf.find(bytes([0x80 | OP_CLOSE]))
            answer = f"closed {int.from_bytes(buf[i + 2 : i + 4], 'big')}"
            break
        if bytes([0x80 | 10, 0]) in buf:
            answer = "relayed and answered the ping"
            break
    cpu = (processCpuSeconds(pid) or 0.0) - cpu0
    writer.transport.abort()
    print(f"one message in {count} one-byte fragments: {answer}; daemon CPU {cpu:.2f} s")


async def run(port: int, pid: int, seconds: float) -> None:
    await endless(port, pid, b"", seconds)
    await endless(port, pid, b"y", seconds)
    await oneMessage(port, pid, 60_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--twistd", default=os.path.join(os.path.dirname(sys.executable), "twistd"))
    parser.add_argument("daemonArgs", nargs="*", help="more twistd wschat options (after --)")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} (on {os.cpu_count()} cores)")
    port = freePort()
    argv = [args.twistd, "-n", "--pidfile=", "wschat", "--port", str(port)]
    argv += ["--welcome", "", "--no-message-log", "--no-connection-log", *args.daemonArgs]
    with processes() as started:
        daemon = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(daemon)
        waitListening(port, daemon)
        asyncio.run(run(port, daemon.pid, args.seconds))


if __name__ == "__main__":
    main()
