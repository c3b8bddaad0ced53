"""
Deliveries per second and latency: one daemon alone, one over Redis, N sharing a Redis.

    python benchmarks/redis_fanout.py [--daemons 3] [--clients 60] [--senders 6] [--duration 5]

Starts a throwaway redis-server (no persistence) and the daemons (``python -m twisted wschat``)
as subprocesses on free loopback ports, then drives each setup from a separate load process:
``--clients`` WebSocket clients spread round-robin over the daemons, ``--senders`` of them each
keeping ``--window`` messages in flight (a closed loop: a sender sends its next message when
one of its own comes back). A delivery is one message arriving at one client. Latency is from
send to arrival, measured at the senders and at one listening client per daemon. Prints one
line per setup. Every run is bounded: about 10 s plus ``--duration`` per setup.
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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def waitListening(port: int, process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {port} after {timeout} s")


@contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for p in started:
            p.terminate()
        for p in started:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


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
    args += ["wschat", "--port", str(port), "--welcome", "", "--no-message-log", *extra]
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


def cpuSeconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far; 0 where /proc is missing."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def runQueueSeconds(pid: int | str) -> float:
    """Time a process spent runnable but waiting for a CPU (others' load); 0 if unknown."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def runLoad(
    urls: list[str], started: list[subprocess.Popen[bytes]], args: argparse.Namespace
) -> dict[str, Any]:
    command = [sys.executable, __file__, "--load", ",".join(urls)]
    command += ["--pids", ",".join(str(p.pid) for p in started)]
    for name in ("clients", "senders", "window", "size", "duration", "warmup"):
        command += [f"--{name}", str(getattr(args, name))]
    output = subprocess.run(command, check=True, capture_output=True, timeout=120).stdout
    result: dict[str, Any] = json.loads(output.splitlines()[-1])
    return result


def report(name: str, result: dict[str, Any], redis: bool) -> None:
    cpu = result["cpu"]  # share of one core, per process, in start order (redis first)
    daemons = cpu[1:] if redis else cpu
    perDelivery = 1e6 * sum(daemons) / result["deliveries_per_s"]
    print(
        f"{name:<21} {result['deliveries_per_s']:>8,.0f} deliveries/s "
        f"{result['messages_per_s']:>6,.0f} msgs/s | latency ms p50 {result['p50_ms']:5.1f} "
        f"p90 {result['p90_ms']:5.1f} p99 {result['p99_ms']:5.1f} | CPU % load "
        f"{100 * result['loadcpu']:3.0f}, daemons {'/'.join(f'{100 * c:.0f}' for c in daemons)}"
        + (f", redis {100 * cpu[0]:.0f}" if redis else "")
        + f" | daemon CPU {perDelivery:.1f} us/delivery"
        + f" | waiting for a CPU {100 * result['waited']:.0f}%",
        flush=True,
    )


def orchestrate(args: argparse.Namespace) -> None:
    print(
        f"{args.clients} clients, {args.senders} senders x {args.window} in flight, "
        f"{args.size}-byte messages, {args.duration} s per setup; load from a separate process; "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as directory:
        with processes() as started:
            url = startDaemon(started, [])
            report("1 daemon, no Redis", runLoad([url], started, args), False)
        with processes() as started:
            redis = startRedis(started, directory)
            url = startDaemon(started, ["--redis", redis])
            waitJoined(redis, 1)
            report("1 daemon over Redis", runLoad([url], started, args), True)
        with processes() as started:
            redis = startRedis(started, directory)
            urls = [startDaemon(started, ["--redis", redis]) for _ in range(args.daemons)]
            waitJoined(redis, args.daemons)
            name = f"{args.daemons} daemons over Redis"
            report(name, runLoad(urls, started, args), True)


# The load process


def load(urls: list[str], pids: list[int], args: argparse.Namespace) -> None:
    from autobahn.twisted.websocket import (
        WebSocketClientFactory,
        WebSocketClientProtocol,
        connectWS,
    )
    from twisted.internet import defer, reactor, task

    clock = time.perf_counter
    latencies: list[float] = []
    state = {"measuring": False, "deliveries": 0, "messages": 0}
    padding = "x" * max(0, args.size - 24)

    class Client(WebSocketClientProtocol):
        timed = False
        sender = -1

        def onOpen(self) -> None:
            self.factory.opened.callback(self)

        def send(self) -> None:
            self.sendMessage(f"{self.sender} {clock():.9f} {padding}".encode())

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            if state["measuring"]:
                state["deliveries"] += 1
            if not (self.timed or self.sender >= 0):
                return
            # "<ip>:<port>: <sender> <sent> <padding>"
            fields = payload.split(b" ", 3)
            if state["measuring"]:
                latencies.append(clock() - float(fields[2]))
            if int(fields[1]) == self.sender:
                if state["measuring"]:
                    state["messages"] += 1
                self.send()

    async def main() -> None:
        clients: list[Client] = []
        for i in range(args.clients):
            factory = WebSocketClientFactory(urls[i % len(urls)])
            factory.protocol = Client
            factory.opened = defer.Deferred()
            connectWS(factory)
            clients.append(await factory.opened)
        for i, client in enumerate(clients):
            if i < args.senders:
                client.sender = i
            elif i < args.senders + len(urls):
                client.timed = True  # one listener per daemon
        for client in clients[: args.senders]:
            for _ in range(args.window):
                client.send()
        await task.deferLater(reactor, args.warmup, lambda: None)
        state["measuring"] = True
        start = clock()
        cpuBefore = [cpuSeconds(pid) for pid in pids]
        ownBefore = time.process_time()
        waitBefore = sum(runQueueSeconds(pid) for pid in [*pids, "self"])
        await task.deferLater(reactor, args.duration, lambda: None)
        state["measuring"] = False
        elapsed = clock() - start
        cpu = [(cpuSeconds(pid) - b) / elapsed for pid, b in zip(pids, cpuBefore, strict=True)]
        ownCPU = (time.process_time() - ownBefore) / elapsed
        waited = (sum(runQueueSeconds(pid) for pid in [*pids, "self"]) - waitBefore) / elapsed
        for client in clients:
            client.sendClose()
        latencies.sort()

        def pct(p: float) -> float:
            return 1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))]

        print(
            json.dumps(
                {
                    "deliveries_per_s": state["deliveries"] / elapsed,
                    "messages_per_s": state["messages"] / elapsed,
                    "p50_ms": pct(0.5),
                    "p90_ms": pct(0.9),
                    "p99_ms": pct(0.99),
                    "max_ms": 1000 * latencies[-1],
                    "cpu": cpu,
                    "loadcpu": ownCPU,
                    "waited": waited,
                }
            ),
            flush=True,
        )

    task.react(lambda _: defer.ensureDeferred(main()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--daemons", type=int, default=3)
    parser.add_argument("--clients", type=int, default=60)
    parser.add_argument("--senders", type=int, default=6)
    parser.add_argument("--window", type=int, default=4, help="messages in flight per sender")
    parser.add_argument("--size", type=int, default=64, help="message size in bytes")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per setup")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--load", metavar="URLS", help=argparse.SUPPRESS)
    parser.add_argument("--pids", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        load(args.load.split(","), [int(p) for p in args.pids.split(",") if p], args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
