"""TLS end to end: ``--listen ssl:...`` with a certificate the test makes, and ``wss://``."""

from __future__ import annotations

import os
import sys

import pytest_twisted
from twisted.internet import defer, protocol, reactor, ssl

from wschat.testing import connect, makeTLSFiles


def clientTLS(files, host="127.0.0.1"):
    """Client TLS options trusting only the test's CA."""
    return ssl.optionsForClientTLS(host, trustRoot=ssl.Certificate.loadPEM(files.ca.read_bytes()))


@pytest_twisted.ensureDeferred
async def test_wss_round_trip(daemon, tmp_path):
    """A wss:// client verifying the daemon's certificate chats like a ws:// one."""
    files = makeTLSFiles(tmp_path)
    service, url = daemon("--listen", files.listen())
    assert url.startswith("wss://127.0.0.1:")
    client = await connect(url, contextFactory=clientTLS(files))
    assert await client.nextText() == "Welcome to chat! Type a message"
    client.sendText("secret")
    port = client.transport.getHost().port
    assert await client.nextText() == f"127.0.0.1:{port}: secret"
    client.sendClose(1000)
    assert await client.closed == (1000, None)


@pytest_twisted.ensureDeferred
async def test_wss_same_origin_is_https(daemon, tmp_path):
    """Over TLS the daemon's own origin is https://host:port; http:// on that port is not."""
    files = makeTLSFiles(tmp_path)
    service, url = daemon("--listen", files.listen(), "--welcome", "", "--format", "raw")
    origin = url.replace("wss://", "https://")
    client = await connect(url, contextFactory=clientTLS(files), origin=origin)
    client.sendText("mine")
    assert await client.nextText() == "mine"
    client.sendClose(1000)
    await client.closed
    refused = connect(url, contextFactory=clientTLS(files), origin=url.replace("wss", "http"))
    try:
        await refused
    except ConnectionError as e:
        assert "403" in str(e)
    else:
        raise AssertionError("an http:// origin was let in over TLS")


class CLIClient(protocol.ProcessProtocol):
    """``python -m wschat.client`` as a child process: stdout lines queued, stderr kept."""

    def __init__(self) -> None:
        self.lines: defer.DeferredQueue[str] = defer.DeferredQueue()
        self.stderr = b""
        self._partial = b""
        self.ended: defer.Deferred[int] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self._partial += data
        *lines, self._partial = self._partial.split(b"\n")
        for line in lines:
            self.lines.put(line.decode("utf-8"))

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value.exitCode)


def spawnClient(args: list[str], cwd) -> CLIClient:
    """Run the installed CLI client (from ``cwd``, so the checkout is not imported)."""
    client = CLIClient()
    reactor.spawnProcess(
        client,
        sys.executable,
        [sys.executable, "-m", "wschat.client", *args],
        env=os.environ.copy(),
        path=str(cwd),
    )
    return client


@pytest_twisted.ensureDeferred
async def test_cli_client_over_wss(daemon, tmp_path):
    """The CLI client with --url wss://localhost:P --ca-file chats, and exits 0 at end of input."""
    files = makeTLSFiles(tmp_path)
    service, url = daemon("--listen", files.listen(), "--format", "raw")
    port = url.rsplit(":", 1)[1]
    cli = spawnClient(["--url", f"wss://localhost:{port}", "--ca-file", str(files.ca)], tmp_path)
    try:
        assert await cli.lines.get() == "Welcome to chat! Type a message"
        cli.transport.write(b"hello over tls\n")
        assert await cli.lines.get() == "hello over tls"
        cli.transport.closeStdin()
        assert await cli.ended.addTimeout(10, reactor) == 0, cli.stderr
    finally:
        if not cli.ended.called:
            cli.transport.signalProcess("KILL")
            await cli.ended
    assert b"connected to wss://localhost:" in cli.stderr


@pytest_twisted.ensureDeferred
async def test_cli_client_refuses_unknown_ca(daemon, tmp_path):
    """Without the CA file, the CLI client does not trust the test certificate."""
    files = makeTLSFiles(tmp_path)
    service, url = daemon("--listen", files.listen())
    port = url.rsplit(":", 1)[1]
    cli = spawnClient(["--url", f"wss://localhost:{port}", "--max-retries", "0"], tmp_path)
    try:
        assert await cli.ended.addTimeout(10, reactor) == 1
    finally:
        if not cli.ended.called:
            cli.transport.signalProcess("KILL")
            await cli.ended
    assert b"connected to" not in cli.stderr
    assert b"certificate verify failed" in cli.stderr
