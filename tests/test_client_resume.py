"""
The CLI client resuming after its connection is cut at the TCP level, against a real daemon:
every message printed once and in the room's order, a line typed before the cut relayed once,
--history N, and what it says when the room cannot recover what it missed.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import pytest_twisted
from childprocess import ProcessWatcher
from twisted.internet import defer, reactor, task

from wschat.protocol import ChatServerProtocol
from wschat.server import ChatServer
from wschat.testing import QueueClientProtocol, closeAll, connect, startDaemon

QUIET = ("--welcome", "", "--no-message-log", "--no-connection-log")

#: Seconds any one wait may take before the test fails instead of hanging.
WAIT = 30


def bounded(d: Any) -> Any:
    """``d`` (a coroutine or Deferred), failing after :data:`WAIT` seconds."""
    return defer.ensureDeferred(d).addTimeout(WAIT, reactor)


def client(processes: Any, *args: str) -> ProcessWatcher:
    return processes(sys.executable, "-m", "wschat.client", *args)  # type: ignore[no-any-return]


def cliSide(service: ChatServer, *others: QueueClientProtocol) -> ChatServerProtocol:
    """The daemon's connection to the CLI client: the one member that is none of ``others``."""
    addresses = {other.address for other in others}
    (member,) = [m for m in service.room if getattr(m, "address", None) not in addresses]
    assert isinstance(member, ChatServerProtocol)
    return member


def roomLines(service: ChatServer) -> list[str]:
    """Every message of the room's window, oldest first, as a prefixed client prints it."""
    history = service.history
    assert history is not None
    lines = []
    for seq in range(history.first, history.head + 1):
        entry = history.entry(seq)
        assert entry is not None
        lines.append(f"{entry.message.sender}: {entry.message.payload.decode()}")
    return lines


class Sender:
    """Sends numbered lines every 10 ms (the room keeps talking) until stopped."""

    def __init__(self, client: QueueClientProtocol) -> None:
        self.client = client
        self.count = 0
        self.loop = task.LoopingCall(self._send)
        self.loop.start(0.01)

    def _send(self) -> None:
        self.client.sendText(f"n{self.count}")
        self.count += 1

    def stop(self) -> None:
        self.loop.stop()
        self.client.sendText("last")


@pytest.mark.parametrize("relayed", [True, False], ids=["relayed-then-cut", "lost-in-the-cut"])
@pytest_twisted.ensureDeferred
async def test_cut_connection_resumes_every_message_once(daemon, processes, relayed):
    """The daemon cuts the CLI client's TCP connection as a line it typed arrives (relaying
    the line first, or not at all) while another client keeps sending: the client reconnects,
    prints every message of the room exactly once and in order, and its line is relayed once."""
    service, url = daemon(*QUIET)
    cli = client(processes, "--url", url)
    await bounded(cli.waitFor("^wschat: connected to ", "err"))
    other = await connect(url)
    sender = Sender(other)
    await bounded(cli.waitFor(": n20$"))

    member = cliSide(service, other)
    relay = member.onMessage

    def cutOnArrival(payload: bytes, isBinary: bool) -> None:
        if relayed:
            relay(payload, isBinary)
        member.abort()

    member.onMessage = cutOnArrival  # type: ignore[method-assign]
    cli.write(b"typed before the cut\n")
    await bounded(cli.waitFor("^wschat: connected to ", "err", count=2))
    await bounded(cli.waitFor(": typed before the cut$"))
    await bounded(cli.waitFor(f": n{sender.count + 20}$"))
    sender.stop()
    await bounded(cli.waitFor(": last$"))
    cli.closeStdin()
    assert await bounded(cli.ended) == 0, cli.output

    expected = roomLines(service)
    assert service.history is not None and service.history.first == 1
    assert cli.lines["out"] == expected
    assert len(set(expected)) == len(expected)
    (mine,) = [line for line in expected if line.endswith(": typed before the cut")]
    # Relayed before the cut: that copy, not a second one; lost: sent again on the new one.
    assert mine.startswith(f"{member.address}: ") is relayed, (mine, member.address)
    # The other client saw the room's one order too, the CLI's line in it once.
    seen = [(await bounded(other.nextText())) for _ in expected]
    assert seen == expected
    assert not any("missed" in line for line in cli.lines["err"]), cli.output
    await closeAll([other])


@pytest_twisted.ensureDeferred
async def test_history_prints_the_last_messages_first(daemon, processes):
    """--history N prints the room's last N messages on connecting, then live ones; without
    it, none."""
    service, url = daemon(*QUIET)
    other = await connect(url)
    for n in range(5):
        other.sendText(f"old {n}")
    for n in range(5):
        assert await bounded(other.nextText()) == f"{other.address}: old {n}"
    late = client(processes, "--url", url, "--listen-only", "--history", "3")
    plain = client(processes, "--url", url, "--listen-only")
    for cli in (late, plain):
        await bounded(cli.waitFor("^wschat: connected to ", "err"))
    await bounded(late.waitFor(": old 4$"))
    other.sendText("new")
    for cli in (late, plain):
        await bounded(cli.waitFor(": new$"))
        cli.signal("INT")
        assert await bounded(cli.ended) == 0, cli.output
    prefix = f"{other.address}: "
    assert late.lines["out"] == [prefix + t for t in ("old 2", "old 3", "old 4", "new")]
    assert plain.lines["out"] == [prefix + "new"]
    await closeAll([other])


@pytest_twisted.ensureDeferred
async def test_restarted_daemon_recovered_false_said_on_stderr(processes):
    """After the daemon restarts (a new epoch) the client says messages may have been missed,
    and prints what the new daemon relayed before it was back, once."""
    first, url = startDaemon(QUIET)
    services = [first]
    try:
        cli = client(processes, "--url", url, "--listen-only")
        await bounded(cli.waitFor("^wschat: connected to ", "err"))
        other = await connect(url)
        other.sendText("before")
        await bounded(cli.waitFor(": before$"))
        port = url.rsplit(":", 1)[1]
        await first.stopService()
        await bounded(cli.waitFor("lost; retrying in", "err"))
        second, _ = startDaemon([*QUIET, "--listen", f"tcp:{port}:interface=127.0.0.1"])
        services.append(second)
        other = await connect(url)
        other.sendText("while away")
        await bounded(other.nextText())
        await bounded(
            cli.waitFor(
                "^wschat: some messages may have been missed "
                r"\(the room's history has restarted\)$",
                "err",
            )
        )
        await bounded(cli.waitFor(": while away$"))
        other.sendText("after")
        await bounded(cli.waitFor(": after$"))
        cli.signal("INT")
        assert await bounded(cli.ended) == 0, cli.output
        texts = [line.split(": ", 1)[1] for line in cli.lines["out"]]
        assert texts == ["before", "while away", "after"]
        await closeAll([other])
    finally:
        for service in services:
            if service.running:
                await service.stopService()


@pytest_twisted.ensureDeferred
async def test_daemon_without_history_as_before(daemon, processes):
    """Against --history 0 the client asks for nothing after a cut (the room would refuse it)
    and works as before; --history N there is refused once, said, and dropped."""
    service, url = daemon(*QUIET, "--history", "0")
    cli = client(processes, "--url", url, "--history", "5")
    refused = "^wschat: the room refused the connection: 400 history is off$"
    await bounded(cli.waitFor(refused, "err"))
    await bounded(cli.waitFor("^wschat: connected to ", "err"))
    other = await connect(url)
    cliSide(service, other).abort()
    await bounded(cli.waitFor("^wschat: connected to ", "err", count=2))
    cli.write(b"hello again\n")
    line = await bounded(other.nextText())
    assert line.endswith(": hello again")
    await bounded(cli.waitFor(": hello again$"))
    cli.closeStdin()
    assert await bounded(cli.ended) == 0, cli.output
    assert cli.lines["out"] == [line]
    assert sum("refused" in line for line in cli.lines["err"]) == 1, cli.output
    await closeAll([other])
