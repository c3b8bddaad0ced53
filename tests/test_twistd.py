"""
What `twistd wschat` tells a user who got something wrong: one line naming the option or the
endpoint and what is accepted, a non-zero exit status, and no traceback; and its --version.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from importlib.metadata import version

import pytest
import pytest_twisted
from childprocess import ProcessWatcher, exited
from twisted.python import usage

from wschat.tap import Options


def twistd(processes, *args: str) -> ProcessWatcher:
    return processes("twistd", "-n", "--pidfile=", "wschat", *args)


@pytest.fixture
def occupied() -> Iterator[int]:
    """A loopback TCP port another socket listens on for the whole test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "abc"], "--port: 'abc' is not a TCP port number (0-65535)"),
        (["--port", "70000"], "--port: '70000' is not a TCP port number (0-65535)"),
        (["--ping-interval", "x"], "--ping-interval: 'x' is not a number of seconds, 0 or more"),
        (["--ping-timeout", "0"], "--ping-timeout: '0' is not a number of seconds above 0"),
        (["--handshake-timeout", "nan"], "--handshake-timeout: 'nan' is not a number of seconds"),
        (["--shutdown-timeout", "-1"], "--shutdown-timeout: '-1' is not a number of seconds"),
        (["--max-queue", "1Q"], "--max-queue: '1Q' is not a size in bytes, 1 or more"),
        (["--max-message-size", "0"], "--max-message-size: '0' is not a size in bytes"),
        (["--rate-limit", "fast"], "--rate-limit: 'fast' is not a number of messages per second"),
        (["--rate-burst", "1.5"], "--rate-burst: '1.5' is not a whole number, 1 or more"),
        (["--max-connections", "-1"], "--max-connections: '-1' is not a whole number, 0 or more"),
        (["--max-connections-per-ip", "x"], "--max-connections-per-ip: 'x' is not a whole number"),
        (["--trust-forwarded-for", "x"], "--trust-forwarded-for: 'x' is not a whole number"),
        (["--redis", "http://x"], "--redis: 'http://x': only redis://HOST:PORT/DB URLs"),
        (["--channel", ""], "--channel: the channel name must not be empty"),
    ],
)
def test_bad_values_name_their_option(args, message):
    """Each validated option's bad value is refused by a usage error naming the option."""
    with pytest.raises(usage.UsageError) as raised:
        Options().parseOptions(args)
    assert str(raised.value).startswith(message)
    assert "Parameter type enforcement" not in str(raised.value)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "abc"], "--port: 'abc' is not a TCP port number (0-65535)"),
        (["--ping-interval", "x"], "--ping-interval: 'x' is not a number of seconds, 0 or more"),
    ],
)
async def test_twistd_bad_value_is_one_line(processes, args, message):
    """`twistd -n wschat --port abc`: twistd's usage text, then one line naming the option."""
    bad = twistd(processes, *args)
    assert await bad.ended == 1
    output = bad.lines["out"] + bad.lines["err"]
    assert any(line.endswith(f"twistd -n: {message}") for line in output), output
    for python in ("invalid literal", "could not convert", "Traceback"):
        assert not any(python in line for line in output), output


@pytest_twisted.ensureDeferred
async def test_port_in_use_is_one_line(processes, occupied):
    """A port in use: `twistd -n` says so on one line of stderr and exits 1, no traceback."""
    daemon = twistd(processes, "--port", str(occupied))
    assert await daemon.ended == 1
    expected = (
        f"wschat: cannot listen on tcp:{occupied}:interface=127.0.0.1: address already in use"
    )
    assert [line for line in daemon.lines["err"] if line] == [expected]
    assert any(line.endswith(expected) for line in daemon.lines["out"])
    assert not any("Traceback" in line for line in daemon.output.splitlines())


@pytest_twisted.ensureDeferred
async def test_port_in_use_daemonized(processes, occupied, tmp_path):
    """Daemonized, twistd's parent exits 1 with the whole error line; its log has that line."""
    log = tmp_path / "wschat.log"
    daemon = processes(
        "twistd",
        "--pidfile",
        str(tmp_path / "wschat.pid"),
        "--logfile",
        str(log),
        "wschat",
        "--port",
        str(occupied),
    )
    assert await daemon.ended == 1
    expected = f"cannot listen on tcp:{occupied}:interface=127.0.0.1: address already in use"
    assert any(line.endswith(f"{expected}'") for line in daemon.lines["err"]), daemon.output
    # twistd's parent exits as soon as the daemon reports its error; the daemon goes on to
    # remove its pid file, and to exit.
    try:
        pid = int((tmp_path / "wschat.pid").read_text())
    except FileNotFoundError:
        pass
    else:
        await exited(pid)
    logged = log.read_text()
    assert f"wschat: {expected}\n" in logged
    assert "Traceback" not in logged
    assert not (tmp_path / "wschat.pid").exists()


@pytest_twisted.ensureDeferred
async def test_version(processes):
    """`twistd wschat --version` prints wschat's version (from the package) and exits 0."""
    shown = processes("twistd", "wschat", "--version")
    assert await shown.ended == 0
    assert shown.lines["out"][0].startswith(f"wschat {version('wschat')} ")
