"""The connection log, emitted at the end of each reactor turn: every line, in order, on time."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import pytest_twisted
from childprocess import freePort, spawn
from twisted.internet import defer, error, reactor, task
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher

from wschat.testing import connect
from wschat.turnlog import TurnLog

OPENED = re.compile(r"New connection from (127\.0\.0\.1:\d+)")
CLOSED = re.compile(r"Connection from (127\.0\.0\.1:\d+) closed: code (\d+)")


def test_lines_wait_for_the_turn_end_and_keep_their_times():
    """A turn's lines reach the observer when it ends, in order, each stamped when made."""
    clock = Clock()
    seen: list[dict[str, Any]] = []
    log = Logger(namespace="wschat.protocol.ChatServerProtocol", observer=seen.append)
    times = iter([10.0, 10.25])
    lines = TurnLog(clock, now=lambda: next(times))
    lines.info(log, "New connection from {peer}", peer="a")
    lines.info(log, "Closing {peer}: {why}", peer="a", why="x")
    assert seen == []
    assert len(lines) == 2
    clock.advance(0)
    assert [(e["log_format"], e["log_time"], e["peer"]) for e in seen] == [
        ("New connection from {peer}", 10, "a"),
        ("Closing {peer}: {why}", 10.25, "a"),
    ]
    assert seen[0]["log_level"] is LogLevel.info
    assert seen[0]["log_namespace"] == "wschat.protocol.ChatServerProtocol"
    assert len(lines) == 0


def test_flush_emits_at_once_and_the_turn_end_adds_nothing():
    """flush() emits what was kept now; the turn's end then has nothing left to emit twice."""
    clock = Clock()
    seen: list[dict[str, Any]] = []
    log = Logger(observer=seen.append)
    lines = TurnLog(clock)
    lines.info(log, "one")
    lines.flush()
    assert [e["log_format"] for e in seen] == ["one"]
    clock.advance(0)
    assert [e["log_format"] for e in seen] == ["one"]


def test_lines_reach_the_log_when_the_process_dies_of_an_exception(tmp_path):
    """A process ending on an uncaught exception, its reactor never run, still logs the lines."""
    script = tmp_path / "crash.py"
    script.write_text(
        "import sys\n"
        "from twisted.internet.task import Clock\n"
        "from twisted.logger import Logger, textFileLogObserver\n"
        "from wschat.turnlog import TurnLog\n"
        "log = Logger(namespace='t', observer=textFileLogObserver(sys.stdout))\n"
        "lines = TurnLog(Clock())\n"
        "for n in range(3):\n"
        "    lines.info(log, 'line {n}', n=n)\n"
        "raise SystemExit('crashed')\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert done.returncode == 1
    assert "crashed" in done.stderr
    assert re.findall(r"\[t#info\] (line \d)", done.stdout) == ["line 0", "line 1", "line 2"]


def checkConnectionLines(text: list[str], addresses: set[str], closedBy: dict[str, str]) -> None:
    """
    Every client's opening line, then its closing line with the expected code, exactly once,
    and no other client's.
    """
    opened = [m.group(1) for line in text if (m := OPENED.search(line))]
    closed = [(m.group(1), m.group(2)) for line in text if (m := CLOSED.search(line))]
    assert sorted(opened) == sorted(addresses)
    assert sorted(a for a, _ in closed) == sorted(addresses)
    assert {a: c for a, c in closed if a in closedBy and closedBy[a]} == {
        a: c for a, c in closedBy.items() if c
    }
    where = {line: i for i, line in enumerate(text)}
    for address in addresses:
        first = next(where[line] for line in text if f"New connection from {address}" in line)
        last = next(where[line] for line in text if f"Connection from {address} closed" in line)
        assert first < last, address


class CloseCounter:
    """Counts the server's closing lines; :meth:`reach` fires once there are so many."""

    def __init__(self) -> None:
        self.count = 0
        self.waiting: tuple[int, defer.Deferred[None]] | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_format", "").startswith("Connection from {peer} closed"):
            self.count += 1
            if self.waiting is not None and self.count >= self.waiting[0]:
                d, self.waiting = self.waiting[1], None
                d.callback(None)

    def reach(self, count: int) -> defer.Deferred[None]:
        if self.count >= count:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self.waiting = (count, d)
        return d.addTimeout(30, reactor)


@pytest_twisted.ensureDeferred
async def test_a_storm_logs_every_connection_line_in_order(daemon):
    """
    Hundreds of clients connecting and closing in waves: every opening and closing line is
    logged once, each opening before its closing, in the order of their times.
    """
    events: list[dict[str, Any]] = []
    closes = CloseCounter()
    globalLogPublisher.addObserver(events.append)
    globalLogPublisher.addObserver(closes)
    try:
        _, url = daemon("--welcome", "")
        closedBy: dict[str, str] = {}
        for _wave in range(4):
            clients = await defer.gatherResults([connect(url) for _ in range(60)])
            for k, c in enumerate(clients):
                address = c.address
                if k % 2:
                    c.sendClose(1000)
                    closedBy[address] = "1000"
                else:
                    assert c.transport is not None
                    c.transport.abortConnection()
                    closedBy[address] = "1006"
            await defer.gatherResults([c.closed for c in clients])
            # The server's side of each close may come a turn after the client's.
            await closes.reach(len(closedBy))
    finally:
        globalLogPublisher.removeObserver(events.append)
        globalLogPublisher.removeObserver(closes)
    ours = [e for e in events if e.get("log_namespace") == "wschat.protocol.ChatServerProtocol"]
    times = [e["log_time"] for e in ours]
    assert times == sorted(times)
    checkConnectionLines([formatEvent(e) for e in ours], set(closedBy), closedBy)


async def connectWhenListening(url: str) -> Any:
    """Connect to a daemon that is starting: retry while the port refuses (bounded)."""
    for _ in range(300):
        try:
            return await connect(url)
        except (error.ConnectionRefusedError, error.ConnectError):
            await task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"nothing listens at {url}")


@pytest_twisted.ensureDeferred
async def test_sigterm_leaves_every_connection_line_in_the_log_file(tmp_path):
    """
    twistd -n wschat with a log file, stopped with SIGTERM during a storm of connections:
    the file holds every client's opening and closing lines, in order, then the shutdown.
    """
    port = freePort()
    logFile = tmp_path / "wschat.log"
    child = spawn(
        [
            "twistd",
            "-n",
            "--pidfile=",
            f"--logfile={logFile}",
            "wschat",
            "--port",
            str(port),
            "--welcome",
            "",
        ],
        cwd=str(tmp_path),
    )
    url = f"ws://127.0.0.1:{port}"
    try:
        first = await connectWhenListening(url)
        early = [first, *await defer.gatherResults([connect(url) for _ in range(99)])]
        # Known while connected.
        addresses = {id(c): c.address for c in early}

        def remember(c: Any) -> Any:
            addresses[id(c)] = c.address
            return c

        for c in early[:50]:
            c.sendClose(1000)
        await defer.gatherResults([c.closed for c in early[:50]])
        late = await defer.gatherResults([connect(url).addCallback(remember) for _ in range(100)])
        # Some handshakes are still on their way when the signal arrives.
        opening = [connect(url).addCallback(remember) for _ in range(20)]
        child.signal("TERM")
        opened = await defer.gatherResults(
            [d.addErrback(lambda _: None) for d in opening], consumeErrors=True
        )
        stillOpen = [*early[50:], *late, *(c for c in opened if c is not None)]
        await defer.gatherResults([c.closed for c in stillOpen])
        await child.ended.addTimeout(30, reactor)
    finally:
        await child.kill()
    text = logFile.read_text().splitlines()
    closedBy = {addresses[id(c)]: "1000" for c in early[:50]}
    # Closed at shutdown: 1001 from the server, the code the client answered with in the log.
    closedBy.update({addresses[id(c)]: "" for c in stillOpen})
    checkConnectionLines(text, set(closedBy), closedBy)
    shutdown = next(i for i, line in enumerate(text) if "Stopped listening; closing" in line)
    early50 = {addresses[id(c)] for c in early[:50]}
    lastEarly = max(
        i for i, line in enumerate(text) if (m := CLOSED.search(line)) and m.group(1) in early50
    )
    assert lastEarly < shutdown
    assert f"closing {len(stillOpen)} connections" in text[shutdown]
    assert "Server Shut Down." in text[-1]
