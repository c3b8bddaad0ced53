"""The real commands, as a user runs them: `twistd -n wschat` and `python -m wschat.client`."""

from __future__ import annotations

import sys

import pytest
import pytest_twisted
from childprocess import LISTENING, ProcessWatcher, freePort
from twisted.internet import defer


def twistd(processes, *args: str) -> ProcessWatcher:
    return processes("twistd", "-n", "--pidfile=", "wschat", *args)


def client(processes, *args: str) -> ProcessWatcher:
    return processes(sys.executable, "-m", "wschat.client", *args)


@pytest_twisted.ensureDeferred
async def test_daemon_and_two_clients(processes):
    """Two CLI clients through a twistd daemon: each line reaches both, prefixed."""
    daemon = twistd(processes, "--listen", "tcp:0:interface=127.0.0.1")
    port = (await daemon.waitFor(LISTENING)).group(1)
    alice = client(processes, "--port", port)
    bob = client(processes, "--port", port)
    for c in (alice, bob):
        await c.waitFor("^Welcome to chat! Type a message$")
    alice.write(b"hello from alice\n")
    line = await bob.waitFor(r"^127\.0\.0\.1:(\d+): hello from alice$")
    await alice.waitFor(f"^{line.group(0)}$")
    await daemon.waitFor(r"New connection from 127\.0\.0\.1:\d+")
    await daemon.waitFor(r"From client 127\.0\.0\.1:\d+: hello from alice")
    alice.closeStdin()
    assert await alice.ended == 0
    await daemon.waitFor(r"closed: code 1000")
    bob.signal("INT")
    assert await bob.ended == 0
    assert any("closed with code 1000" in line for line in bob.lines["err"])
    await daemon.waitFor(r"closed: code 1000", count=2)
    daemon.signal("TERM")
    await daemon.ended


@pytest_twisted.ensureDeferred
async def test_refused_then_retry_then_connected(processes):
    """A client started before its daemon reports refusals, retries, then gets through."""
    port = str(freePort())
    alice = client(processes, "--port", port)
    await alice.waitFor(f"connection to ws://127.0.0.1:{port} refused; retrying in", "err")
    alice.write(b"typed while disconnected\n")
    daemon = twistd(processes, "--port", port)
    await daemon.waitFor(LISTENING)
    await alice.waitFor(f"connected to ws://127.0.0.1:{port}", "err")
    await alice.waitFor(r"^127\.0\.0\.1:\d+: typed while disconnected$")
    alice.closeStdin()
    assert await alice.ended == 0
    daemon.signal("TERM")
    await daemon.ended


@pytest_twisted.ensureDeferred
async def test_piped_input_is_sent_then_client_exits(processes):
    """End of input sends what is pending, closes with 1000 and exits 0."""
    daemon = twistd(processes, "--listen", "tcp:0:interface=127.0.0.1", "--welcome", "")
    port = (await daemon.waitFor(LISTENING)).group(1)
    alice = client(processes, "--port", port)
    alice.write(b"one\ntwo\nthree")
    alice.closeStdin()
    assert await alice.ended == 0
    said = [line.split(": ", 1)[1] for line in alice.lines["out"] if line]
    assert said == ["one", "two", "three"]
    await daemon.waitFor(r"closed: code 1000")
    daemon.signal("TERM")
    await daemon.ended


@pytest_twisted.ensureDeferred
async def test_max_retries_gives_up(processes):
    """--max-retries: after that many refused attempts the client exits with status 1."""
    alice = client(processes, "--port", str(freePort()), "--max-retries", "1")
    assert await alice.ended == 1
    assert any("giving up after 1 retry" in line for line in alice.lines["err"])


@pytest.mark.parametrize(
    "args",
    [["--url", "http://example.com"], ["--port", "99999"], ["--port", "1", "--url", "ws://a"]],
)
@pytest_twisted.ensureDeferred
async def test_usage_errors(processes, args):
    """A malformed URL or option gives a one-line usage error, a hint, and exit status 2."""
    bad = client(processes, *args)
    assert await bad.ended == 2
    (line,) = bad.lines["err"]
    assert line.startswith("wschat.client: error: ") and line.endswith("(try --help)"), line


@pytest_twisted.ensureDeferred
async def test_twistd_lists_the_plugin(processes):
    """`twistd --help` lists the wschat plugin, and a bad option is a usage error."""
    help = processes("twistd", "--help")
    assert await help.ended == 0
    assert any(line.split()[:1] == ["wschat"] for line in help.lines["out"])
    bad = twistd(processes, "--format", "json")
    assert await bad.ended != 0
    assert any("--format must be one of" in line for line in bad.lines["out"] + bad.lines["err"])


@pytest_twisted.ensureDeferred
async def test_daemon_refuses_a_port_in_use(processes):
    """A port already in use stops twistd with an error instead of running deaf."""
    first = twistd(processes, "--listen", "tcp:0:interface=127.0.0.1")
    port = (await first.waitFor(LISTENING)).group(1)
    second = twistd(processes, "--port", port)
    assert await second.ended != 0
    assert any(
        "address already in use" in line for line in second.lines["out"] + second.lines["err"]
    )
    first.signal("TERM")
    await defer.DeferredList([first.ended])


@pytest_twisted.ensureDeferred
async def test_full_queue_pauses_real_stdin(processes):
    """With the queue full the client pauses stdin; connecting sends every line, in order."""
    port = str(freePort())
    alice = client(processes, "--port", port, "--queue-size", "2")
    await alice.waitFor("refused; retrying", "err")
    alice.write(b"".join(b"line %d\n" % i for i in range(6)))
    await alice.waitFor("input paused until connected", "err")
    daemon = twistd(processes, "--port", port, "--welcome", "")
    await daemon.waitFor(LISTENING)
    await alice.waitFor(r": line 5$")
    said = [line.split(": ", 1)[1] for line in alice.lines["out"] if line]
    assert said == [f"line {i}" for i in range(6)]
    alice.closeStdin()
    assert await alice.ended == 0
    daemon.signal("TERM")
    await daemon.ended
