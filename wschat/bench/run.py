"""
Driving one measurement: share the clients among worker processes, start them, keep time,
show a live progress line, and collect their reports.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any, TextIO

from wschat.bench import worker
from wschat.bench.options import Options
from wschat.bench.stats import (
    processCpuSeconds,
    processRssBytes,
    processWaitSeconds,
    usableCores,
)
from wschat.bench.summary import summarise
from wschat.wire import hostPort


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
            "url": " ".join(f"ws://{hostPort(h, p)}{path}" for h, p, path in self.targets),
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
        replies = list(self.replies.values())
        return summarise(options, self.rate, replies, totalSent, serverCpu, result, warnings)
