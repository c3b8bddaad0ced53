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
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from children import freePort, stop, waitListening
from compare import SERVERS, WSCHAT, wschatCommand

from wschat.bench.stats import processCpuSeconds

HERE = Path(__file__).resolve().parent
PY = sys.executable


def cpuSeconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid``; it must be running."""
    seconds = processCpuSeconds(pid)
    if seconds is None:
        raise RuntimeError(f"no CPU time for process {pid}: it has exited")
    return seconds


def measure(
    name: str,
    command: Callable[[int, str], list[str]],
    logdir: str,
    clients: int,
    duration: float,
) -> dict[str, Any]:
    """Start ``command`` on core 0, open ``clients`` connections to it from core 1."""
    port = freePort()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            ["taskset", "-c", "0", *command(port, logdir)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=HERE,
        )
        try:
            waitListening(port, proc, 30)
            time.sleep(0.5)  # the server's start-up work is done before the count starts
            start = cpuSeconds(proc.pid)
            samples: list[float] = []
            finished = threading.Event()

            def sample() -> None:
                while not finished.wait(0.1):
                    samples.append(cpuSeconds(proc.pid))

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
            finished.set()
            sampler.join()
            if done.returncode != 0:
                raise RuntimeError(f"{name}: bench exited with status {done.returncode}")
            run = json.loads(done.stdout)["runs"][0]
            # The samples repeat most while every connection is open and idle.
            plateau = collections.Counter(samples).most_common(1)[0][0]
            return {
                "server": name,
                "us_per_open": (plateau - start) * 1e6 / clients,
                "handshakes_per_s": run["handshakes_per_s"],
            }
        finally:
            stop(proc)


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
    servers: dict[str, Callable[[int, str], list[str]]] = {}
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
        servers[name] = wschatCommand(*WSCHAT, *extra, twistd=twistd)
    if not args.no_node:
        if shutil.which("node") is None:
            parser.error("node is needed for Node ws (or --no-node)")
        servers["node-ws"] = SERVERS["node-ws"]

    results: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    for r in range(args.repeat):
        for name, command in servers.items():
            result = measure(name, command, logdir, args.clients, args.duration)
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
        ourUs, ourHs = medians["wschat"]
        for name, (otherUs, otherHs) in medians.items():
            if name != "wschat":
                print(
                    f"  vs {name}: CPU {ourUs / otherUs:.2f}x, handshakes/s {ourHs / otherHs:.2f}x"
                )


if __name__ == "__main__":
    main()
