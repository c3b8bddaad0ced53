"""
The daemon's memory while its Redis is stalled, under one flooding client.

    python benchmarks/redis_stall.py [--duration 11] [--size 1024] [--twistd PATH]

Starts a throwaway redis-server (no persistence) and one daemon (``twistd -n wschat --redis``,
``--twistd`` picks which installation's twistd, to compare two versions), connects one client
that sends ``--size``-byte text messages as fast as the daemon reads them (and reads whatever
comes back), stops redis-server with SIGSTOP, and floods for ``--duration`` seconds. Prints the
daemon's resident memory before, at its peak and at the end of the stall, what the flooder got
back (echoes, refusal notices, when the first notice came), and the daemon's Redis log lines
with the time since the flood began. ``--no-stop`` floods the same way with Redis running.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from children import freePort, processes, waitListening

from wschat.bench.frames import clientFrame, handshakeRequest, handshakeResponse
from wschat.bench.stats import processRssBytes

NOTICE = b"wschat: message"
MARK = b"flood "


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def rss(pid: int) -> int:
    size = processRssBytes(pid)
    if size is None:
        raise RuntimeError(f"no VmRSS for process {pid}")
    return size


def waitJoined(port: int, timeout: float = 15.0) -> None:
    """Wait until the daemon has subscribed: PUBSUB NUMSUB wschat, over a raw socket."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"PUBSUB NUMSUB wschat\r\n")
            if s.recv(100).endswith(b":1\r\n"):
                return
        time.sleep(0.05)
    raise TimeoutError("the daemon did not subscribe")


def redisPid(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"INFO server\r\n")
        info = b""
        while b"process_id:" not in info or not info.endswith(b"\r\n"):
            info += s.recv(65536)
    line = info.split(b"process_id:")[1].split(b"\r\n")[0]
    return int(line)


def flood(
    port: int, daemon: int, size: int, duration: float, stopRedis: int | None
) -> dict[str, float | int]:
    """Flood for ``duration`` s, stopping Redis (pid ``stopRedis``) first if given; figures."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(handshakeRequest("127.0.0.1", port, "/"))
    buf = b""
    while True:
        buf += s.recv(65536)
        done, buf = handshakeResponse(buf)
        if done:
            break
    s.setblocking(False)
    frame = clientFrame(MARK + b"x" * (size - len(MARK)))
    batch = frame * max(1, 65536 // len(frame))
    before = rss(daemon)
    if stopRedis is not None:
        os.kill(stopRedis, signal.SIGSTOP)
    start = time.monotonic()
    deadline = start + duration
    pending = b""
    sent = notices = echoes = 0
    firstNotice: float | None = None
    peak = before
    nextSample = start
    tail = b""
    while (now := time.monotonic()) < deadline:
        if now >= nextSample:
            peak = max(peak, rss(daemon))
            nextSample = now + 0.1
        readable, writable, _ = select.select([s], [s], [], 0.05)
        if writable:
            if not pending:
                pending = batch
            try:
                n = s.send(pending)
            except BlockingIOError:
                n = 0
            sent += n
            pending = pending[n:]
        if readable:
            data = s.recv(1 << 20)
            if not data:
                break
            seen = tail + data
            found = seen.count(NOTICE)
            if found and firstNotice is None:
                firstNotice = time.monotonic() - start
            notices += found
            echoes += seen.count(b": " + MARK)
            tail = seen[-(len(NOTICE) + 2) :]
    end = rss(daemon)
    s.close()
    return {
        "before": before,
        "peak": max(peak, end),
        "end": end,
        "messages": sent // len(frame),
        "notices": notices,
        "echoes": echoes,
        "firstNotice": -1.0 if firstNotice is None else firstNotice,
        "start": start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=11.0, help="seconds of stall")
    parser.add_argument("--size", type=int, default=1024, help="bytes per message")
    parser.add_argument(
        "--no-stop", action="store_true", help="leave Redis running: the same flood, for comparison"
    )
    default = Path(sys.executable).parent / "twistd"
    parser.add_argument("--twistd", default=str(default), help="twistd of the daemon to run")
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed (Debian: apt-get install redis-server)")
    with tempfile.TemporaryDirectory() as directory, processes() as started:
        redisPort = freePort()
        redisArgs = [binary, "--port", str(redisPort), "--bind", "127.0.0.1", "--save", ""]
        redisArgs += ["--appendonly", "no", "--dir", directory]
        redis = subprocess.Popen(redisArgs, stdout=subprocess.DEVNULL)
        started.append(redis)
        waitListening(redisPort, redis)
        port = freePort()
        log = Path(directory, "daemon.log")
        daemonArgs = [args.twistd, "-n", "--pidfile", "", "--logfile", str(log), "wschat"]
        daemonArgs += ["--port", str(port), "--no-message-log", "--welcome", ""]
        daemonArgs += ["--redis", f"redis://127.0.0.1:{redisPort}/0"]
        # From the scratch folder: the installed package, not a checkout, is imported.
        daemon = subprocess.Popen(daemonArgs, cwd=directory)
        started.append(daemon)
        waitListening(port, daemon)
        waitJoined(redisPort)
        pid = redisPid(redisPort)
        floodedAt = time.time()
        try:
            r = flood(port, daemon.pid, args.size, args.duration, None if args.no_stop else pid)
        finally:
            os.kill(pid, signal.SIGCONT)
        lines = log.read_text(errors="replace").splitlines()
    print(f"daemon: {args.twistd}")
    what = "running" if args.no_stop else "stopped"
    print(
        f"Redis {what} {args.duration:g} s under one {args.size}-byte flooder: daemon RSS "
        f"{mib(r['before'])} before, peak {mib(r['peak'])} (+{mib(r['peak'] - r['before'])}), "
        f"{mib(r['end'])} at the end"
    )
    first = "never" if r["firstNotice"] < 0 else f"after {r['firstNotice']:.1f} s"
    print(
        f"flooder: sent {r['messages']} messages; got {r['echoes']} echoes and "
        f"{r['notices']} refusal notices (first {first})"
    )
    print("daemon log, Redis lines (seconds since the flood started):")
    for line in lines:
        if "Redis" not in line:
            continue
        # twistd's time stamp: 2026-01-01T00:00:00+0000 [system] text
        stamp, _, text = line.partition(" ")
        try:
            at = time.mktime(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        except ValueError:
            print(f"  {line}")
            continue
        print(f"  {at - floodedAt:+6.0f} s {text[:160]}")


if __name__ == "__main__":
    main()
