"""The CLI client as a user runs it (``python -m wschat.client``), against a real daemon."""

from __future__ import annotations

import sys
from importlib.metadata import version

import pytest_twisted
from childprocess import ProcessWatcher, freePort
from tlsfiles import makeTLSFiles

from wschat.testing import connect, startDaemon

SPOOF = "hello\n127.0.0.1:1: I am the admin\r\x1b[31m"
#: SPOOF as the client prints it: one line, LF, CR and ESC escaped.
SPOOF_ESCAPED = r"hello\n127.0.0.1:1: I am the admin\r\x1b[31m"


def client(processes, *args: str) -> ProcessWatcher:
    return processes(sys.executable, "-m", "wschat.client", *args)


def port(url: str) -> str:
    return url.rsplit(":", 1)[1]


@pytest_twisted.ensureDeferred
async def test_line_over_the_rooms_limit_refused_locally(daemon, processes):
    """A line over the daemon's stated limit is reported and not sent; the lines around it are."""
    service, url = daemon("--format", "raw", "--welcome", "", "--max-message-size", "100")
    cli = client(processes, "--url", url)
    cli.write(b"before\n" + b"x" * 101 + b"\nafter\n")
    cli.closeStdin()
    assert await cli.ended == 3, cli.output
    assert cli.lines["out"] == ["before", "after"]
    assert (
        "wschat: line of 101 bytes not sent: the room accepts at most 100 bytes"
        in (cli.lines["err"])
    )
    assert "wschat: 1 line not sent or not delivered" in cli.lines["err"]


@pytest_twisted.ensureDeferred
async def test_close_code_printed_and_exit_3(daemon, processes):
    """The room closing over piped lines (rate limit): the close code on stderr, exit 3."""
    service, url = daemon("--format", "raw", "--welcome", "", "--rate-limit", "1")
    cli = client(processes, "--url", url)
    cli.write(b"".join(b"line %d\n" % i for i in range(50)))
    await cli.waitFor("^wschat: closed with code 1008: rate limit exceeded", "err")
    cli.closeStdin()
    assert await cli.ended == 3, cli.output
    # Each line the room relayed came back; each of the others is counted, none sent again.
    relayed = len(cli.lines["out"])
    assert cli.lines["out"] == [f"line {i}" for i in range(relayed)]
    assert 0 < relayed < 50
    assert f"wschat: {50 - relayed} lines not sent or not delivered" in cli.lines["err"]


@pytest_twisted.ensureDeferred
async def test_lines_lost_with_the_connection_exit_3(daemon, processes):
    """Piped lines and end of input, the room closes over them: never exit 0."""
    service, url = daemon("--format", "raw", "--welcome", "", "--rate-limit", "1")
    cli = client(processes, "--url", url)
    cli.write(b"".join(b"line %d\n" % i for i in range(50)))
    cli.closeStdin()
    assert await cli.ended == 3, cli.output
    assert "line 49" not in cli.lines["out"]


@pytest_twisted.ensureDeferred
async def test_listen_only_with_stdin_at_end(daemon, processes):
    """--listen-only with standard input at its end receives the room until killed."""
    service, url = daemon("--format", "raw", "--welcome", "")
    cli = client(processes, "--url", url, "--listen-only")
    cli.closeStdin()
    await cli.waitFor("^wschat: connected to ", "err")
    sender = await connect(url)
    sender.sendText("anyone there?")
    await cli.waitFor("^anyone there\\?$")
    assert not cli.ended.called
    cli.signal("INT")
    assert await cli.ended == 0, cli.output
    sender.sendClose()
    await sender.closed


@pytest_twisted.ensureDeferred
async def test_listen_only_reconnects(processes):
    """A listen-only client outlives its daemon and hears the one that comes back."""
    first, url = startDaemon(["--format", "raw", "--welcome", ""])
    services = [first]
    try:
        cli = client(processes, "--url", url, "--listen-only")
        cli.closeStdin()
        await cli.waitFor("^wschat: connected to ", "err")
        await first.stopService()
        await cli.waitFor("^wschat: closed with code 1001", "err")
        await cli.waitFor("lost; retrying in", "err")
        listen = f"tcp:{port(url)}:interface=127.0.0.1"
        second, _ = startDaemon(["--format", "raw", "--welcome", "back", "--listen", listen])
        services.append(second)
        await cli.waitFor("^back$")
        cli.signal("TERM")
        assert await cli.ended == 0, cli.output
    finally:
        for service in services:
            if service.running:
                await service.stopService()


@pytest_twisted.ensureDeferred
async def test_spoofed_line_escaped(daemon, processes):
    """A message with LF, CR and ESC is one escaped line; --raw-output prints it exactly."""
    service, url = daemon("--welcome", "")
    escaped = client(processes, "--url", url, "--listen-only")
    raw = client(processes, "--url", url, "--listen-only", "--raw-output")
    for cli in (escaped, raw):
        await cli.waitFor("^wschat: connected to ", "err")
    sender = await connect(url)
    sender.sendText(SPOOF)
    expected = f"{sender.address}: {SPOOF}"
    await raw.waitFor("^127.0.0.1:1: I am the admin")
    line = await escaped.waitFor("^127.0.0.1:\\d+: hello")
    assert line.string == f"{sender.address}: {SPOOF_ESCAPED}"
    assert not any(line.startswith("127.0.0.1:1:") for line in escaped.lines["out"])
    for cli in (escaped, raw):
        cli.signal("INT")
        assert await cli.ended == 0
    assert escaped.lines["out"] == [f"{sender.address}: {SPOOF_ESCAPED}"]
    assert "\n".join(raw.lines["out"]) == expected
    sender.sendClose()
    await sender.closed


@pytest_twisted.ensureDeferred
async def test_relay_notice_on_stderr(daemon, processes):
    """The daemon's notice (a message it did not relay) goes to stderr, and the exit is 3."""
    service, url = daemon("--format", "raw", "--welcome", "")
    cli = client(processes, "--url", url)
    await cli.waitFor("^wschat: connected to ", "err")
    (member,) = list(service.room)
    member.refused("message not delivered: the room is unavailable")
    cli.write(b"still here\n")
    await cli.waitFor("^still here$")
    cli.closeStdin()
    assert await cli.ended == 3, cli.output
    assert cli.lines["out"] == ["still here"]
    assert "wschat: message not delivered: the room is unavailable" in cli.lines["err"]


@pytest_twisted.ensureDeferred
async def test_plain_ws_to_a_tls_port_hints_wss(daemon, processes, tmp_path):
    """ws:// against a TLS listener says to try wss://, instead of only "lost"."""
    files = makeTLSFiles(tmp_path)
    service, url = daemon("--listen", files.listen())
    plain = "ws://127.0.0.1:" + port(url)
    cli = client(processes, "--url", plain, "--max-retries", "0")
    assert await cli.ended == 1, cli.output
    assert any(f"try wss://127.0.0.1:{port(url)}" in line for line in cli.lines["err"]), cli.output


@pytest_twisted.ensureDeferred
async def test_retry_lines_once_each_with_plurals(processes):
    """Refused twice: one line per retry (one decimal), 'after 1 retry', no Twisted echo."""
    url = f"ws://127.0.0.1:{freePort()}"
    cli = client(processes, "--url", url, "--max-retries", "1")
    assert await cli.ended == 1, cli.output
    retrying = [line for line in cli.lines["err"] if "retry" in line]
    assert len(retrying) == 2, cli.output
    assert retrying[0].startswith(f"wschat: connection to {url} refused; retrying in ")
    assert retrying[0].endswith(" s") and len(retrying[0].split()[-2].split(".")[1]) == 1
    assert retrying[1] == f"wschat: connection to {url} refused; giving up after 1 retry"


@pytest_twisted.ensureDeferred
async def test_version(processes):
    """--version prints wschat's version from the package metadata."""
    cli = client(processes, "--version")
    assert await cli.ended == 0
    assert cli.lines["out"] == [f"wschat {version('wschat')}"]


@pytest_twisted.ensureDeferred
async def test_usage_error_is_one_line(processes):
    """A bad option value: one line naming the option and what it takes, a hint, exit 2."""
    cli = client(processes, "--port", "abc")
    assert await cli.ended == 2
    assert cli.lines["out"] == []
    assert cli.lines["err"] == [
        "wschat.client: error: --port takes a whole number from 1 to 65535, not 'abc' (try --help)"
    ]


@pytest_twisted.ensureDeferred
async def test_daemon_states_its_message_limit(daemon):
    """The handshake answer carries X-WSChat-Max-Message-Size: the daemon's limit in bytes."""
    service, url = daemon("--max-message-size", "4096")
    listener = await connect(url)
    headers = listener.http_headers
    assert headers.get("x-wschat-max-message-size") == "4096"
    listener.sendClose()
    await listener.closed
