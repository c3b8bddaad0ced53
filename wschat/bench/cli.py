"""
``python -m wschat.bench``: the coordinator. Parses the command line, starts the worker
processes, keeps time, prints a live progress line, and sums up the workers' reports.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any, TextIO
from urllib.parse import urlsplit

from twisted.python import usage

from wschat.bench import worker
from wschat.bench.frames import minimumSize
from wschat.bench.stats import (
    cpuShare,
    latencySummary,
    merge,
    processCpuSeconds,
    processRssBytes,
    processWaitSeconds,
)

MODES = ("throughput", "rate", "idle")

#: Above this share of its cores the load tool says it may be the bottleneck.
BUSY = 0.9


def _floatList(value: str) -> list[float]:
    try:
        rates = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{value!r} is not a comma-separated list of numbers") from None
    if not rates or any(r <= 0 for r in rates):
        raise ValueError("rates must be positive numbers")
    return rates


class Options(usage.Options):
    synopsis = "MODE [options]   (MODE: throughput | rate | idle)"
    longdesc = (
        "Load a relay-to-all WebSocket server (every message goes to every client) and "
        "report deliveries/s, latency percentiles, loss and reordering. 'throughput': each "
        "sender keeps --inflight messages in flight, each acknowledged by its own echo. "
        "'rate': senders send --rate messages/s in total on a fixed schedule; latency counts "
        "from the scheduled time. 'idle': open --clients connections, report handshakes/s "
        "and (with --pid) the server's RSS per connection, and hold them for --duration."
    )
    optParameters: list[list[Any]] = [
        [
            "url",
            "u",
            None,
            "Server URL, optionally NAME=URL; repeatable (one run per server, or one run "
            "over all of them with --spread).",
        ],
        ["clients", "c", 1000, "Connections to open.", int],
        ["senders", "s", 10, "How many of the clients send.", int],
        ["inflight", "w", 4, "throughput: messages each sender keeps in flight.", int],
        ["rate", "r", None, "rate: messages/s in total; a comma-separated list sweeps.", None],
        ["size", None, 64, "Payload bytes per message.", int],
        ["duration", "d", 10.0, "Seconds measured (idle: seconds held).", float],
        ["warmup", None, 2.0, "Seconds of load before measuring.", float],
        ["drain", None, 10.0, "Seconds to wait, after sending stops, for deliveries.", float],
        ["processes", "j", None, "Worker processes (default: one per usable core).", int],
        ["concurrency", None, 200, "Handshakes in progress at once, per process.", int],
        ["connect-timeout", None, 30.0, "Seconds allowed for one connection to open.", float],
        [
            "verify",
            None,
            "100",
            "Clients that read every frame and check order and latency, besides the senders: "
            "a number or 'all'. The others only count messages (loss stays exact for all).",
            None,
        ],
        ["pid", None, None, "Server process id: report its CPU and RSS.", int],
        ["plot", None, None, "Write a PNG of latency against offered load (rate sweeps)."],
        ["run-id", None, None, "Marker run id 0-65535 (default: random).", int],
    ]
    optFlags: list[list[str | None]] = [
        ["json", None, "Print the results as JSON on stdout."],
        ["quiet", "q", "No progress line."],
        [
            "spread",
            None,
            "The --urls are daemons of ONE room (say, sharing a Redis): one run spreads the "
            "clients, senders among them, round-robin over them; every client must receive "
            "every message.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["urls"] = []

    def opt_url(self, value: str) -> None:
        self["urls"].append(value)

    opt_u = opt_url

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        # The mode comes first (``throughput --clients 10``), and getopt stops at the
        # first word that is not an option: take the mode off before it looks.
        args = list(sys.argv[1:] if options is None else options)
        if args and not args[0].startswith("-"):
            self["mode"] = args.pop(0)
        super().parseOptions(args)

    def parseArgs(self, *extra: str) -> None:
        if extra:
            raise usage.UsageError(f"unexpected arguments: {' '.join(extra)}")
        mode = self.get("mode")
        if mode is None:
            raise usage.UsageError(f"give a mode first: {', '.join(MODES)}")
        if mode not in MODES:
            raise usage.UsageError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")

    def postOptions(self) -> None:
        if not self["urls"]:
            self["urls"] = ["ws://127.0.0.1:2000/"]
        self["servers"] = [parseServer(u) for u in self["urls"]]
        if self["spread"]:
            if len(self["servers"]) < 2:
                raise usage.UsageError("--spread needs two or more --url (daemons of one room)")
            self["groups"] = [self["servers"]]
        else:
            self["groups"] = [[server] for server in self["servers"]]
        for name in ("clients", "concurrency"):
            if self[name] < 1:
                raise usage.UsageError(f"--{name} must be 1 or more")
        if not 0 <= self["senders"] <= self["clients"]:
            raise usage.UsageError("--senders must be between 0 and --clients")
        if self["inflight"] < 1:
            raise usage.UsageError("--inflight must be 1 or more")
        if self["duration"] <= 0 or self["warmup"] < 0 or self["drain"] < 0:
            raise usage.UsageError("--duration must be positive, --warmup and --drain not negative")
        if self["processes"] is not None and self["processes"] < 1:
            raise usage.UsageError("--processes must be 1 or more")
        if self["run-id"] is None:
            self["run-id"] = int.from_bytes(os.urandom(2), "big")
        elif not 0 <= self["run-id"] <= 0xFFFF:
            raise usage.UsageError("--run-id must be in 0-65535")
        if self["size"] < minimumSize(self["run-id"]):
            raise usage.UsageError(f"--size must be at least {minimumSize(self['run-id'])}")
        if self["verify"] == "all":
            self["verify"] = None
        else:
            try:
                self["verify"] = int(self["verify"])
                if self["verify"] < 0:
                    raise ValueError
            except ValueError:
                raise usage.UsageError("--verify must be 'all' or a number of clients") from None
        mode = self["mode"]
        if mode == "rate":
            if self["rate"] is None:
                raise usage.UsageError("rate mode needs --rate (messages/s in total)")
            try:
                self["rates"] = _floatList(self["rate"])
            except ValueError as e:
                raise usage.UsageError(f"--rate: {e}") from None
        else:
            if self["rate"] is not None:
                raise usage.UsageError("--rate is for rate mode")
            self["rates"] = [None]
        if mode in ("throughput", "rate") and self["senders"] < 1:
            raise usage.UsageError(f"{mode} mode needs at least one sender")
        if self["plot"] is not None and mode != "rate":
            raise usage.UsageError("--plot draws a rate sweep: use it with rate mode")


def parseServer(value: str) -> tuple[str, str, int, str]:
    """``[NAME=]ws://host:port/path`` as (name, host, port, path)."""
    name, sep, url = value.partition("=")
    if not sep or "://" in name:
        name, url = "", value
    parts = urlsplit(url)
    if parts.scheme != "ws":
        raise usage.UsageError(f"{url!r}: only ws:// URLs are supported (no TLS)")
    if not parts.hostname:
        raise usage.UsageError(f"{url!r} has no host")
    try:
        port = parts.port or 80
    except ValueError as e:
        raise usage.UsageError(f"{url!r}: {e}") from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return name or url, parts.hostname, port, path


def usableCores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def assignServers(
    clients: int, senders: frozenset[int], verifiers: frozenset[int], servers: int
) -> tuple[int, ...]:
    """
    The server (an index below ``servers``) each client connects to: one round-robin over the
    senders first, then the other verifying clients, then the rest, so every server gets its
    share of each kind and of all.
    """

    def kind(n: int) -> int:
        return 0 if n in senders else 1 if n in verifiers else 2

    result = [0] * clients
    for position, n in enumerate(sorted(range(clients), key=kind)):
        result[n] = position % servers
    return tuple(result)


def plans(
    options: Options,
    targets: Sequence[tuple[str, int, str]],
    rate: float | None,
    processes: int,
) -> list[worker.Plan]:
    """
    Share the clients among ``processes`` workers (client ``n`` goes to worker ``n % P``) and
    among the ``targets`` (see :func:`assignServers`).
    """
    clients = options["clients"]
    nSenders = options["senders"] if options["mode"] != "idle" else 0
    # Senders are spread over the clients so every worker gets its share.
    step = clients / nSenders if nSenders else 1
    senders = frozenset(int(k * step) for k in range(nSenders))
    verify = options["verify"]
    if verify is None:
        verifiers = frozenset(range(clients))
    else:
        others = [n for n in range(clients) if n not in senders]
        stride = max(1, len(others) // verify) if verify else len(others) + 1
        verifiers = frozenset(others[::stride][:verify])
    perSender = (rate or 0.0) / nSenders if nSenders else 0.0
    # Senders' schedules are staggered evenly over one interval.
    phases = {s: (k / nSenders) / perSender for k, s in enumerate(sorted(senders))} if rate else {}
    where = assignServers(clients, senders, verifiers, len(targets))
    result = []
    for w in range(processes):
        mine = tuple(range(w, clients, processes))
        mineSet = set(mine)
        result.append(
            worker.Plan(
                index=w,
                targets=tuple(targets),
                clients=mine,
                clientTargets=tuple(where[n] for n in mine),
                senders=frozenset(senders & mineSet),
                verifiers=frozenset(verifiers & mineSet),
                mode=options["mode"],
                inflight=options["inflight"],
                ratePerSender=perSender,
                phases={s: p for s, p in phases.items() if s in mineSet},
                size=options["size"],
                run=options["run-id"],
                concurrency=options["concurrency"],
                connectTimeout=options["connect-timeout"],
            )
        )
    return result


class Progress:
    """The live line on stderr: rewritten in place on a terminal, one line a second otherwise."""

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self.tty = stream.isatty()
        self._last = 0.0
        self._width = 0

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._width = len(text)
            self.stream.flush()
        elif time.monotonic() - self._last >= 1.0:
            self._last = time.monotonic()
            self.stream.write(text + "\n")
            self.stream.flush()

    def done(self) -> None:
        if self.enabled and self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


class Run:
    """
    One measurement against one server (or, with --spread, several daemons of one room) at
    one load: start workers, drive them, sum up.
    """

    def __init__(
        self,
        options: Options,
        servers: Sequence[tuple[str, str, int, str]],
        rate: float | None,
        progress: Progress,
    ) -> None:
        self.options = options
        self.name = "+".join(name for name, _, _, _ in servers)
        self.targets = [(worker.resolve(h, port), port, path) for _, h, port, path in servers]
        self.rate = rate
        self.progress = progress
        self.processes = options["processes"] or usableCores()
        self.processes = min(self.processes, options["clients"])
        self.status: dict[int, tuple[int, int, int, int]] = {}
        self.replies: dict[int, dict[str, Any]] = {}

    def _poll(self, pipes: list[Connection], timeout: float, verb: str) -> None:
        # A worker that has answered ``verb`` may exit: its pipe's end is no news then.
        waiting = [p for i, p in enumerate(pipes) if not (verb and i in self.replies)]
        for pipe in wait(waiting, timeout):
            assert isinstance(pipe, Connection)
            index = pipes.index(pipe)
            try:
                message = pipe.recv()
            except EOFError:
                raise RuntimeError(f"bench worker {index} exited unexpectedly") from None
            if message[0] == "progress":
                self.status[index] = message[1:]
            elif message[0] == verb:
                self.replies[index] = message[1]

    def _totals(self) -> tuple[int, int, int, int]:
        c = s = r = d = 0
        for connected, sent, received, closed in self.status.values():
            c += connected
            s += sent
            r += received
            d += closed
        return c, s, r, d

    def _await(
        self, pipes: list[Connection], verb: str, deadline: float, show: Callable[[], str]
    ) -> None:
        self.replies = {}
        while len(self.replies) < len(pipes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"bench workers did not report {verb!r} in time")
            self._poll(pipes, 0.1, verb)
            self.progress.show(show())

    def execute(self) -> dict[str, Any]:
        options = self.options
        mode = options["mode"]
        pid = options["pid"]
        ctx = multiprocessing.get_context("spawn")
        pipes: list[Connection] = []
        procs = []
        for plan in plans(options, self.targets, self.rate, self.processes):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker.run, args=(plan, theirs), daemon=True)
            proc.start()
            theirs.close()
            pipes.append(mine)
            procs.append(proc)
        try:
            return self._drive(pipes, mode, pid)
        finally:
            for pipe in pipes:
                pipe.close()
            for proc in procs:
                proc.join(5)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
            self.progress.done()

    def _label(self) -> str:
        mode = self.options["mode"]
        if mode == "rate":
            return f"rate {self.rate:g}/s"
        return mode

    def _drive(self, pipes: list[Connection], mode: str, pid: int | None) -> dict[str, Any]:
        options = self.options
        clients = options["clients"]
        rssBefore = processRssBytes(pid) if pid else None
        for pipe in pipes:
            pipe.send(("connect",))
        began = time.monotonic()
        connectDeadline = began + options["connect-timeout"] + clients / 100 + 30

        def connecting() -> str:
            c = self._totals()[0]
            return f"[{self.name}] {self._label()}: connecting {c}/{clients}"

        self._await(pipes, "connected", connectDeadline, connecting)
        connects = list(self.replies.values())
        connected = sum(r["connected"] for r in connects)
        handshakeSpan = max(r["finished"] for r in connects) - min(r["started"] for r in connects)
        errors = [e for r in connects for e in r["errors"]][:5]
        result: dict[str, Any] = {
            "server": self.name,
            "url": " ".join(
                f"ws://[{h}]:{p}{path}" if ":" in h else f"ws://{h}:{p}{path}"
                for h, p, path in self.targets
            ),
            "daemons": len(self.targets),
            "mode": mode,
            "clients": clients,
            "connected": connected,
            "connect_errors": errors,
            "handshakes_per_s": round(connected / handshakeSpan, 1) if handshakeSpan > 0 else None,
            "processes": len(pipes),
            "size": options["size"],
        }
        warnings: list[str] = []
        if connected < clients:
            warnings.append(f"only {connected} of {clients} clients connected: {errors}")
        if mode == "idle":
            return self._idle(pipes, pid, rssBefore, result, warnings)
        return self._load(pipes, mode, pid, result, warnings)

    def _idle(
        self,
        pipes: list[Connection],
        pid: int | None,
        rssBefore: int | None,
        result: dict[str, Any],
        warnings: list[str],
    ) -> dict[str, Any]:
        options = self.options
        rssOpen = processRssBytes(pid) if pid else None
        end = time.monotonic() + options["duration"]
        while time.monotonic() < end:
            self._poll(pipes, min(0.1, max(0.0, end - time.monotonic())), "")
            c = self._totals()[0]
            left = end - time.monotonic()
            self.progress.show(f"[{self.name}] idle: holding {c} connections, {left:.0f} s left")
        rssEnd = processRssBytes(pid) if pid else None
        for pipe in pipes:
            pipe.send(("finish", 0))
        self._await(pipes, "result", time.monotonic() + 30, lambda: f"[{self.name}] idle: closing")
        held = sum(r["open"] for r in self.replies.values())
        closed = sum(r["closed"] for r in self.replies.values())
        result["held"] = held
        result["dropped"] = closed
        if closed:
            warnings.append(f"the server closed {closed} idle connections")
        if rssBefore is not None and rssEnd is not None and result["connected"]:
            result["server_rss_before"] = rssBefore
            result["server_rss_open"] = rssOpen
            result["server_rss_end"] = rssEnd
            result["rss_per_connection"] = round((rssEnd - rssBefore) / result["connected"], 1)
        result["warnings"] = warnings
        return result

    def _load(
        self,
        pipes: list[Connection],
        mode: str,
        pid: int | None,
        result: dict[str, Any],
        warnings: list[str],
    ) -> dict[str, Any]:
        options = self.options
        t0 = time.monotonic() + 0.5
        windowStart = t0 + options["warmup"]
        windowEnd = windowStart + options["duration"]
        for pipe in pipes:
            pipe.send(("start", t0, windowStart, windowEnd))
        serverCpu: dict[str, float | None] = {}
        last = (time.monotonic(), 0)

        def line(phase: str) -> str:
            nonlocal last
            c, s, r, d = self._totals()
            now = time.monotonic()
            rate = (r - last[1]) / (now - last[0]) if now > last[0] else 0.0
            if now - last[0] >= 1.0:
                last = (now, r)
            return (
                f"[{self.name}] {self._label()} {phase}: {c} clients, sent {s}, "
                f"delivered {r} ({rate:,.0f}/s)"
            )

        while True:
            now = time.monotonic()
            if pid and "start" not in serverCpu and now >= windowStart:
                serverCpu["start"] = processCpuSeconds(pid)
                serverCpu["startWait"] = processWaitSeconds(pid)
                serverCpu["startTime"] = now
            if pid and "end" not in serverCpu and now >= windowEnd:
                serverCpu["end"] = processCpuSeconds(pid)
                serverCpu["endWait"] = processWaitSeconds(pid)
                serverCpu["endTime"] = now
            if now >= windowEnd + 0.3:
                break
            phase = "warming up" if now < windowStart else f"{windowEnd - now:.0f} s left"
            nextEdge = windowStart if now < windowStart else windowEnd
            self._poll(pipes, max(0.0, min(0.1, nextEdge - now)), "")
            self.progress.show(line(phase))

        # Sending has stopped; wait for what is still on its way.
        drainEnd = time.monotonic() + options["drain"]
        drained = False
        while time.monotonic() < drainEnd:
            self._poll(pipes, 0.1, "")
            c, s, r, d = self._totals()
            self.progress.show(line("draining"))
            if len(self.status) == len(pipes) and r >= s * result["connected"]:
                # Progress reports lag a little: one more round so the counts are final.
                self._poll(pipes, 2 * worker.PROGRESS_INTERVAL, "")
                c, s2, r2, d = self._totals()
                if s2 == s and r2 == r:
                    drained = True
                    break
        if not drained:
            warnings.append(
                f"deliveries were still arriving when the {options['drain']:g} s drain ended: "
                "those not yet arrived count as lost (the server was overloaded)"
            )
        totalSent = self._totals()[1]
        for pipe in pipes:
            pipe.send(("finish", totalSent))
        self._await(pipes, "result", time.monotonic() + 60, lambda: line("collecting"))
        return self._summarise(list(self.replies.values()), totalSent, serverCpu, result, warnings)

    def _summarise(
        self,
        replies: list[dict[str, Any]],
        totalSent: int,
        serverCpu: dict[str, float | None],
        result: dict[str, Any],
        warnings: list[str],
    ) -> dict[str, Any]:
        options = self.options
        starts = [r["window"]["start"] for r in replies]
        ends = [r["window"]["end"] for r in replies]
        if not all(starts) or not all(ends):
            raise RuntimeError("a worker did not record the measured window")
        wall = sum(e["time"] - s["time"] for s, e in zip(starts, ends, strict=True)) / len(replies)
        sent = sum(e["sent"] - s["sent"] for s, e in zip(starts, ends, strict=True))
        delivered = sum(e["received"] - s["received"] for s, e in zip(starts, ends, strict=True))
        cpu = sum(e["cpu"] - s["cpu"] for s, e in zip(starts, ends, strict=True))
        waits = [
            e["wait"] - s["wait"]
            for s, e in zip(starts, ends, strict=True)
            if e.get("wait") is not None and s.get("wait") is not None
        ]
        hist = merge(r["histogram"] for r in replies)
        lost = sum(r["lost"] for r in replies)
        reordered = sum(r["reordered"] for r in replies)
        duplicated = sum(r["duplicated"] for r in replies)
        closed = sum(r["closed"] for r in replies)
        cores = min(usableCores(), len(replies))
        benchShare = cpuShare(cpu, wall)
        result.update(
            {
                "senders": options["senders"],
                "inflight": options["inflight"] if result["mode"] == "throughput" else None,
                "offered_rate": self.rate,
                "duration": round(wall, 3),
                "sent_total": totalSent,
                "sent_per_s": round(sent / wall, 1),
                "deliveries_per_s": round(delivered / wall, 1),
                "latency_ms": latencySummary(hist),
                "verified_clients": sum(r["verified"] for r in replies),
                "lost": lost,
                "reordered": reordered,
                "duplicated": duplicated,
                "dropped": closed,
                "bench_cpu": round(benchShare, 3),
                "bench_cores": cores,
            }
        )
        if waits:
            result["bench_cpu_wait"] = round(sum(waits) / wall / len(waits), 3)
        if serverCpu.get("start") is not None and serverCpu.get("end") is not None:
            span = float(serverCpu["endTime"] or 0) - float(serverCpu["startTime"] or 0)
            result["server_cpu"] = round(
                cpuShare(float(serverCpu["end"] or 0) - float(serverCpu["start"] or 0), span), 3
            )
            if serverCpu.get("startWait") is not None and serverCpu.get("endWait") is not None:
                waited = float(serverCpu["endWait"] or 0) - float(serverCpu["startWait"] or 0)
                result["server_cpu_wait"] = round(cpuShare(waited, span), 3)
        # Time spent runnable but not running: other processes had the CPU.
        for who in ("server", "bench"):
            share = result.get(f"{who}_cpu_wait")
            if share is not None and share > 0.1:
                warnings.append(
                    f"the {who} waited for a CPU {share:.0%} of the time: the machine is "
                    "busy with other work, so these figures are noisy"
                )
        if benchShare > BUSY * cores:
            warnings.append(
                f"the load tool used {benchShare:.0%} of its {cores} core(s): it may be the "
                "bottleneck; give it more cores (--processes) or fewer clients"
            )
        if result["mode"] == "throughput" and result.get("server_cpu") is not None:
            if result["server_cpu"] + result.get("server_cpu_wait", 0) < BUSY:
                warnings.append(
                    f"the server used only {result['server_cpu']:.0%} CPU: it was not saturated"
                )
        if lost or reordered or duplicated:
            warnings.append(
                f"{lost} deliveries lost, {reordered} reordered, {duplicated} duplicated"
            )
        if closed:
            warnings.append(f"the server closed {closed} connections during the run")
        result["warnings"] = warnings
        return result


def describe(result: dict[str, Any]) -> str:
    """A few human lines for one run."""
    lines = [f"{result['server']} ({result['url']}): {result['mode']}"]
    lines.append(
        f"  clients      {result['connected']} connected of {result['clients']}"
        f" ({result['processes']} bench process(es))"
        + (f", spread over {result['daemons']} daemons" if result["daemons"] > 1 else "")
    )
    if result.get("handshakes_per_s") is not None:
        lines.append(f"  handshakes   {result['handshakes_per_s']:,.0f}/s")
    if result["mode"] == "idle":
        if "rss_per_connection" in result:
            lines.append(f"  server RSS   {result['rss_per_connection'] / 1024:.1f} KiB/connection")
        lines.append(f"  held         {result['held']}")
    else:
        lat = result["latency_ms"]

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}"

        if result["mode"] == "rate":
            lines.append(f"  offered      {result['offered_rate']:g} msg/s")
        else:
            lines.append(f"  senders      {result['senders']} x {result['inflight']} in flight")
        lines.append(f"  sent         {result['sent_per_s']:,.1f} msg/s")
        lines.append(f"  deliveries   {result['deliveries_per_s']:,.0f}/s")
        lines.append(
            f"  latency ms   p50 {ms(lat['p50'])}  p90 {ms(lat['p90'])}  p99 {ms(lat['p99'])}"
            f"  max {ms(lat['max'])}  ({lat['samples']:,} samples)"
        )
        lines.append(
            f"  lost {result['lost']}  reordered {result['reordered']}"
            f"  duplicated {result['duplicated']}"
        )
        cpu = f"  bench CPU    {result['bench_cpu']:.0%} of {result['bench_cores']} core(s)"
        if result.get("server_cpu") is not None:
            cpu += f"; server CPU {result['server_cpu']:.0%}"
        if result.get("server_cpu_wait") is not None:
            cpu += f" (waited for a CPU {result['server_cpu_wait']:.0%})"
        lines.append(cpu)
    for w in result.get("warnings", []):
        lines.append(f"  WARNING: {w}")
    return "\n".join(lines)


def plot(results: Sequence[dict[str, Any]], path: str) -> None:
    """Latency percentiles against offered load, one colour per server (needs matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "wschat.bench: --plot needs matplotlib: pip install 'wschat[plot]'"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, ax = plt.subplots(figsize=(8, 5))
    servers: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        if r["mode"] == "rate":
            servers.setdefault(r["server"], []).append(r)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, runs) in enumerate(servers.items()):
        runs.sort(key=lambda r: r["offered_rate"])
        x = [r["offered_rate"] * r["connected"] for r in runs]
        colour = colours[k % len(colours)]
        for point, style in (("p50", "-"), ("p99", "--")):
            y = [r["latency_ms"][point] for r in runs]
            ax.plot(x, y, style, marker="o", color=colour, label=f"{name} {point}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    loads = sorted({r["offered_rate"] * r["connected"] for r in results if r["mode"] == "rate"})
    ax.set_xticks(loads)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("offered load (deliveries/s = messages/s × clients)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Broadcast latency against offered load")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None, out: TextIO | None = None) -> list[dict[str, Any]]:
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.stderr.write(f"{options}\nwschat.bench: error: {e}\n")
        raise SystemExit(2) from None
    out = out or sys.stdout
    progress = Progress(sys.stderr, not options["quiet"])
    results = []
    for group in options["groups"]:
        for rate in options["rates"]:
            try:
                result = Run(options, group, rate, progress).execute()
            except (OSError, RuntimeError) as e:
                progress.done()
                sys.stderr.write(f"wschat.bench: {'+'.join(s[0] for s in group)}: {e}\n")
                raise SystemExit(1) from None
            results.append(result)
            if not options["json"]:
                out.write(describe(result) + "\n")
                out.flush()
    if options["json"]:
        json.dump({"runs": results}, out, indent=2)
        out.write("\n")
    if options["plot"]:
        plot(results, options["plot"])
    return results
