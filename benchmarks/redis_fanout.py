"""
Deliveries per second and latency: one daemon alone, one over Redis, N sharing a Redis.

    python benchmarks/redis_fanout.py [--daemons 3] [--clients 300] [--senders 6] [--duration 10]

Starts a throwaway redis-server (no persistence) and the daemons (``python -m twisted wschat``,
raw format, no message log, no keepalive pings) as subprocesses on free loopback ports, and
runs the same scenario against each setup with the load tool, ``python -m wschat.bench
throughput --json`` (``--spread`` over the N daemons: clients and senders round-robin, every
client must receive every message from every sender, whatever its daemon):

1. one daemon without Redis;
2. one daemon over Redis;
3. ``--daemons`` daemons over one Redis, one room.

Prints one table: deliveries/s and p50/p99 latency per setup, each with its ratio to the
single-daemon figure, and the loss and reordering the load tool counted. Bounded in time:
about 20 s per setup with the defaults, and any step that overruns is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from children import freePort, processes, waitListening


def startRedis(started: list[subprocess.Popen[bytes]], directory: str) -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed (Debian: apt-get install redis-server)")
    port = freePort()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    args += ["--appendonly", "no", "--dir", directory]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started.append(process)
    waitListening(port, process)
    return f"redis://127.0.0.1:{port}/0"


def startDaemon(started: list[subprocess.Popen[bytes]], extra: list[str]) -> str:
    port = freePort()
    args = [sys.executable, "-m", "twisted", "--log-level", "warn", "--log-file", "-"]
    args += ["wschat", "--port", str(port), "--welcome", "", "--format", "raw", "--no-message-log"]
    # No keepalive pings: the load tool's counting clients do not answer them.
    args += ["--ping-interval", "0", *extra]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    started.append(process)
    waitListening(port, process)
    return f"ws://127.0.0.1:{port}"


def waitJoined(redisURL: str, daemons: int, timeout: float = 15.0) -> None:
    """Wait until every daemon subscribes: PUBSUB NUMSUB wschat, over a raw socket."""
    host, port = redisURL.removeprefix("redis://").split("/")[0].split(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"PUBSUB NUMSUB wschat\r\n")
            reply = s.recv(100)
        if reply.endswith(f":{daemons}\r\n".encode()):
            return
        time.sleep(0.02)
    raise TimeoutError("the daemons did not all subscribe")


def runBench(urls: list[str], pid: int | None, args: argparse.Namespace) -> dict[str, Any]:
    """One ``python -m wschat.bench throughput`` run over ``urls`` (spread if several)."""
    command = [sys.executable, "-m", "wschat.bench", "throughput", "--json", "--quiet"]
    for url in urls:
        command += ["--url", url]
    if len(urls) > 1:
        command.append("--spread")
    if pid is not None:
        command += ["--pid", str(pid)]
    command += ["--clients", str(args.clients), "--senders", str(args.senders)]
    command += ["--inflight", str(args.inflight), "--size", str(args.size)]
    command += ["--duration", str(args.duration), "--warmup", str(args.warmup)]
    command += ["--drain", "5"]
    timeout = args.duration + args.warmup + 60
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, timeout=timeout)
    (result,) = json.loads(done.stdout)["runs"]
    assert isinstance(result, dict)
    return result


def table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """The setups side by side, with ratios to the first (the single daemon without Redis)."""
    base = rows[0][1]

    def ratio(value: float | None, reference: float | None) -> str:
        if not value or not reference:
            return "-"
        return f"x{value / reference:.2f}"

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = [
        f"{'setup':<24} {'deliveries/s':>12} {'ratio':>6} {'p50 ms':>7} {'ratio':>6} "
        f"{'p99 ms':>7} {'ratio':>6}  lost/reordered",
    ]
    for name, r in rows:
        # No latency figures when no message arrived inside the measured window.
        lat, baseLat = r["latency_ms"] or {}, base["latency_ms"] or {}
        p50, p99 = lat.get("p50"), lat.get("p99")
        lines.append(
            f"{name:<24} {r['deliveries_per_s']:>12,.0f} "
            f"{ratio(r['deliveries_per_s'], base['deliveries_per_s']):>6} "
            f"{ms(p50):>7} {ratio(p50, baseLat.get('p50')):>6} "
            f"{ms(p99):>7} {ratio(p99, baseLat.get('p99')):>6}  "
            f"{r['lost']}/{r['reordered']}"
        )
    return "\n".join(lines)


def orchestrate(args: argparse.Namespace) -> None:
    print(
        f"throughput: {args.clients} clients, {args.senders} senders x {args.inflight} in "
        f"flight, {args.size}-byte messages, {args.duration:g} s measured per setup; "
        f"{os.cpu_count()} CPUs shared by the daemons, redis-server and the load tool",
        flush=True,
    )
    rows: list[tuple[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as directory:
        with processes() as started:
            url = startDaemon(started, [])
            rows.append(("1 daemon, no Redis", runBench([url], started[0].pid, args)))
        with processes() as started:
            redis = startRedis(started, directory)
            url = startDaemon(started, ["--redis", redis])
            waitJoined(redis, 1)
            rows.append(("1 daemon over Redis", runBench([url], started[1].pid, args)))
        with processes() as started:
            redis = startRedis(started, directory)
            urls = [startDaemon(started, ["--redis", redis]) for _ in range(args.daemons)]
            waitJoined(redis, args.daemons)
            name = f"{args.daemons} daemons over Redis"
            rows.append((name, runBench(urls, None, args)))
    print(table(rows))
    for name, r in rows:
        for warning in r.get("warnings", []):
            print(f"{name}: {warning}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--daemons", type=int, default=3)
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--senders", type=int, default=6)
    parser.add_argument("--inflight", type=int, default=4, help="messages in flight per sender")
    parser.add_argument("--size", type=int, default=64, help="message size in bytes")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per setup")
    parser.add_argument("--warmup", type=float, default=2.0)
    args = parser.parse_args()
    if args.daemons < 2:
        parser.error("--daemons must be 2 or more")
    orchestrate(args)


if __name__ == "__main__":
    main()
