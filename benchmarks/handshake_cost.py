"""
What opening a WebSocket costs the server: CPU time of the server process per opened
connection, and handshakes per second, for wschat (this checkout), optionally an older wschat
(``--before TWISTD``, ``--also TWISTD``) and Node ``ws``, side by side.

    python benchmarks/handshake_cost.py [--clients 5000] [--repeat 2] [--before TWISTD]

Each server runs pinned to core 0 (``taskset -c 0``); ``python -m wschat.bench idle`` opens
``--clients`` connections from core 1 and holds them. The server's CPU time (user + system,
from ``/proc/PID/stat``) is read before the load starts and, sampled every 0.1 s, once it stops
rising (the value the samples repeat most: the connections are open and idle); their
difference over the connections opened is the cost of one open, accept and log line included.
Servers alternate within each repetition. wschat runs with its default connection log (one
line per connection, to a log file), ``--format raw``, no message log, no pings.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
NODE_WS = HERE / "peers" / "node-ws" / "server.js"
PY = sys.executable
TICK = os.sysconf("SC_CLK_TCK")


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def waitListening(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout} s")


def cpuTicks(pid: int) -> int:
    """User + system CPU time of process ``pid``, in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # utime and stime are fields 14 and 15; fields[0] here is field 3 (the state).
    return int(fields[11]) + int(fields[12])


def wschatCommand(twistd: str, logfile: str, extra: list[str]) -> list[str]:
    return [
        twistd,
        "-n",
        "--pidfile=",
        f"--logfile={logfile}",
        "wschat",
        "--port",
        "PORT",
        "--welcome=",
        "--ping-interval",
        "0",
        "--format",
        "raw",
        "--no-message-log",
        *extra,
    ]


def measure(name: str, command: list[str], clients: int, duration: float) -> dict[str, Any]:
    """Start ``command`` on core 0, open ``clients`` connections to it from core 1."""
    port = freePort()
    argv = [str(port) if a == "PORT" else a for a in command]
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            ["taskset", "-c", "0", *argv], stdout=out, stderr=subprocess.STDOUT, cwd=HERE
        )
        try:
            waitListening(port, proc, 30)
            time.sleep(0.5)  # the server's start-up work is done before the count starts
            start = cpuTicks(proc.pid)
            samples: list[int] = []
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(0.1):
                    samples.append(cpuTicks(proc.pid))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            bench = [
                "taskset",
                "-c",
                "1",
                PY,
                "-m",
                "wschat.bench",
                "idle",
                "--clients",
                str(clients),
                "--duration",
                str(duration),
                "--url",
                f"s=ws://127.0.0.1:{port}/",
                "--quiet",
                "--json",
            ]
            done = subprocess.run(bench, stdout=subprocess.PIPE, check=False, timeout=300)
            stop.set()
            sampler.join()
            if done.returncode != 0:
                raise RuntimeError(f"{name}: bench exited with status {done.returncode}")
            run = json.loads(done.stdout)["runs"][0]
            # The samples repeat most while every connection is open and idle.
            plateau = collections.Counter(samples).most_common(1)[0][0]
            return {
                "server": name,
                "us_per_open": (plateau - start) / TICK * 1e6 / clients,
                "handshakes_per_s": run["handshakes_per_s"],
            }
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=2, help="repetitions (default 2)")
    parser.add_argument("--duration", type=float, default=3, help="seconds held open")
    parser.add_argument(
        "--twistd",
        default=str(Path(PY).with_name("twistd")),
        help="the twistd of this checkout's wschat (default: next to this Python)",
    )
    parser.add_argument("--before", metavar="TWISTD", help="also run wschat-before: this twistd")
    parser.add_argument(
        "--also",
        metavar="NAME=TWISTD",
        action="append",
        default=[],
        help="also run wschat with this twistd under this name (repeatable)",
    )
    parser.add_argument("--no-node", action="store_true", help="leave out Node ws")
    parser.add_argument(
        "--no-connection-log",
        action="store_true",
        help="run every wschat with --no-connection-log (default: the log on)",
    )
    args = parser.parse_args()
    if shutil.which("taskset") is None:
        parser.error("taskset (util-linux) is needed to pin server and load to cores")
    extra = ["--no-connection-log"] if args.no_connection_log else []
    logdir = tempfile.mkdtemp(prefix="handshake-cost-")
    servers: dict[str, list[str]] = {}
    twistds = {"wschat": args.twistd}
    if args.before:
        twistds["wschat-before"] = args.before
    for also in args.also:
        name, eq, twistd = also.partition("=")
        if not eq:
            parser.error(f"--also {also!r}: NAME=TWISTD")
        twistds[name] = twistd
    for name, twistd in twistds.items():
        if shutil.which(twistd) is None:
            parser.error(f"{name}: no such executable {twistd!r}")
        servers[name] = wschatCommand(twistd, os.path.join(logdir, f"{name}.log"), extra)
    if not args.no_node:
        if shutil.which("node") is None:
            parser.error("node is needed for Node ws (or --no-node)")
        servers["node-ws"] = ["node", str(NODE_WS), "PORT"]

    results: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    for r in range(args.repeat):
        for name, command in servers.items():
            result = measure(name, command, args.clients, args.duration)
            results[name].append(result)
            print(
                f"run {r + 1} {name}: {result['us_per_open']:.1f} us/open, "
                f"{result['handshakes_per_s']:,.0f} handshakes/s",
                flush=True,
            )
    print()
    print(f"{args.clients} connections, server on core 0, load on core 1; log dir {logdir}")
    print("| server | server CPU µs/open (each run) | median | handshakes/s (each run) | median |")
    print("|---|---|---:|---|---:|")
    medians: dict[str, tuple[float, float]] = {}
    for name, runs in results.items():
        us = [r["us_per_open"] for r in runs]
        hs = [r["handshakes_per_s"] for r in runs]
        medians[name] = (statistics.median(us), statistics.median(hs))
        print(
            f"| {name} | {', '.join(f'{u:.1f}' for u in us)} | {medians[name][0]:.1f} "
            f"| {', '.join(f'{h:,.0f}' for h in hs)} | {medians[name][1]:,.0f} |"
        )
    if "wschat" in medians:
        print()
        print("Ratios of wschat (medians): CPU per open (lower is better), handshakes/s")
        us, hs = medians["wschat"]
        for name, (otherUs, otherHs) in medians.items():
            if name != "wschat":
                print(f"  vs {name}: CPU {us / otherUs:.2f}x, handshakes/s {hs / otherHs:.2f}x")


if __name__ == "__main__":
    main()
