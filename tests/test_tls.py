"""TLS end to end: ``--listen ssl:...`` with a certificate the test makes, and ``wss://``."""

from __future__ import annotations

import sys

import pytest_twisted
from childprocess import ProcessWatcher
from tlsfiles import makeTLSFiles
from twisted.internet import ssl

from wschat.testing import connect


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


def client(processes, *args: str) -> ProcessWatcher:
    return processes(sys.executable, "-m", "wschat.client", *args)


@pytest_twisted.ensureDeferred
async def test_cli_client_over_wss(daemon, processes, tmp_path):
    """The CLI client with --url wss://localhost:P --ca-file chats, and exits 0 at end of input."""
    files = makeTLSFiles(tmp_path)
    service, url = daemon("--listen", files.listen(), "--format", "raw")
    port = url.rsplit(":", 1)[1]
    cli = client(processes, "--url", f"wss://localhost:{port}", "--ca-file", str(files.ca))
    await cli.waitFor("^Welcome to chat! Type a message$")
    cli.write(b"hello over tls\n")
    await cli.waitFor("^hello over tls$")
    cli.closeStdin()
    assert await cli.ended == 0, cli.output
    assert any("connected to wss://localhost:" in line for line in cli.lines["err"])


@pytest_twisted.ensureDeferred
async def test_cli_client_refuses_unknown_ca(daemon, processes, tmp_path):
    """Without the CA file, the CLI client does not trust the test certificate."""
    files = makeTLSFiles(tmp_path)
    service, url = daemon("--listen", files.listen())
    port = url.rsplit(":", 1)[1]
    cli = client(processes, "--url", f"wss://localhost:{port}", "--max-retries", "0")
    assert await cli.ended == 1, cli.output
    assert "connected to" not in cli.output
    assert "certificate verify failed" in cli.output
