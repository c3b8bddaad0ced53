"""
What a full history window costs in memory: the daemon's RSS with an empty window and with a
full one, for several window sizes and message sizes, next to the window's own byte count
(``wschat_history_bytes``).

    python benchmarks/history_memory.py

Each case starts ``twistd -n wschat`` with its ``--history``/``--history-bytes``, connects a
JSON client (so the JSON frames are cached too, as with browsers) and a plain sender, measures
RSS, fills the window (and then some), and measures again once the JSON client has received
every message.
"""

from __future__ import annotations

import asyncio
import gc
import re
import subprocess
import tempfile
import urllib.request

from children import freePort, quietTwistd, stop, waitListening
from mass_reconnect import JSON_HEADER, rssKiB

from wschat.bench.frames import OP_TEXT, RawWebSocket, clientFrame

CASES = [
    # (--history, --history-bytes, payload bytes, messages sent)
    (1000, "16M", 100, 1200),
    (1000, "16M", 1024, 1200),
    (1000, "16M", 16384, 1200),
    (10000, "16M", 100, 12000),
    (100000, "64M", 100, 120000),
]


class Counter(RawWebSocket):
    """Counts the text messages it receives; fires ``done`` at ``want``."""

    def __init__(self, host: str, headers: list[str]) -> None:
        super().__init__(host, "/", headers)
        self.count = 0
        self.want = -1
        loop = asyncio.get_running_loop()
        self.ready = loop.create_future()
        self.done = loop.create_future()

    def opened(self) -> None:
        self.ready.set_result(None)

    def frameReceived(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_TEXT:
            self.count += 1
            if self.count >= self.want >= 0 and not self.done.done():
                self.done.set_result(None)


def historyGauges(port: int) -> tuple[float, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    messages = re.search(r"^wschat_history_messages (\S+)$", text, re.M)
    size = re.search(r"^wschat_history_bytes (\S+)$", text, re.M)
    assert messages and size
    return float(messages.group(1)), float(size.group(1))


async def fill(port: int, pid: int, size: int, count: int) -> tuple[int, int]:
    loop = asyncio.get_running_loop()
    host = f"127.0.0.1:{port}"
    _, reader = await loop.create_connection(
        lambda: Counter(host, [JSON_HEADER]), "127.0.0.1", port
    )
    _, sender = await loop.create_connection(lambda: Counter(host, []), "127.0.0.1", port)
    await reader.ready
    await sender.ready
    await asyncio.sleep(0.5)
    empty = rssKiB(pid)
    reader.want = count + 1  # its welcome too
    assert sender.transport is not None
    body = b"x" * size
    for n in range(count):
        sender.transport.write(clientFrame(b"%08d" % n + body[8:]))
        if n % 200 == 199:
            await asyncio.sleep(0)
    await asyncio.wait_for(reader.done, 300)
    await asyncio.sleep(0.5)
    return empty, rssKiB(pid)


def main() -> None:
    gc.disable()
    print(
        "| --history | --history-bytes | payload | sent | window: messages | window: bytes "
        "| RSS empty | RSS full | full window costs | per message |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for history, limit, size, count in CASES:
        port = freePort()
        with tempfile.TemporaryDirectory(prefix="wschat-histmem-") as logdir:
            command = quietTwistd(
                port,
                logdir,
                [
                    "--history",
                    str(history),
                    "--history-bytes",
                    limit,
                    # The window is filled as fast as the sender can: no inbound share.
                    "--inbound-rate",
                    "0",
                    "--inbound-bytes",
                    "0",
                ],
            )
            proc = subprocess.Popen(command, start_new_session=True)
            try:
                waitListening(port, proc, 30)
                empty, full = asyncio.run(fill(port, proc.pid, size, count))
                messages, held = historyGauges(port)
            finally:
                stop(proc)
        cost = full - empty
        print(
            f"| {history} | {limit} | {size} B | {count} | {messages:.0f} "
            f"| {held / 1024 / 1024:.1f} MiB | {empty / 1024:.1f} MiB | {full / 1024:.1f} MiB "
            f"| {cost / 1024:.1f} MiB | {cost * 1024 / max(messages, 1):.0f} B |"
        )


if __name__ == "__main__":
    main()
