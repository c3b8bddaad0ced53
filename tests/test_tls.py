"""TLS end to end: ``--listen ssl:...`` with a certificate the test makes, and ``wss://``."""

from __future__ import annotations

import re
import socket
import ssl as stdssl
import sys

import pytest_twisted
from childprocess import ProcessWatcher
from rawws import RawClient
from tlsfiles import makeTLSFiles
from twisted.internet import endpoints, reactor, ssl, threads

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


@pytest_twisted.ensureDeferred
async def test_alpn_client_gets_http_1_1(daemon, tmp_path):
    """A TLS client offering ALPN h2 and http/1.1, as browsers and curl do, gets http/1.1."""
    files = makeTLSFiles(tmp_path)
    service, url = daemon("--listen", files.listen())
    port = service.ports[0].getHost().port
    options = ssl.optionsForClientTLS(
        "localhost", trustRoot=files.trustRoot(), acceptableProtocols=[b"h2", b"http/1.1"]
    )
    endpoint = endpoints.wrapClientTLS(
        options, endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    )
    request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    client = await endpoints.connectProtocol(endpoint, RawClient(request))
    response = await client.lost
    assert response.startswith(b"HTTP/1.1 200 "), response
    assert b'"status": "ok"' in response
    assert client.transport.negotiatedProtocol == b"http/1.1"


def curlLike(port: int, ca: str, request: bytes) -> bytes:
    """
    Over TLS with ALPN, as curl does: send ``request``, read the answer (to the end of its
    announced body), close TLS (close_notify) and wait for the server to close; the answer.
    """
    context = stdssl.create_default_context(cafile=ca)
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        tls = context.wrap_socket(raw, server_hostname="localhost")
        tls.sendall(request)
        answer = b""
        while True:
            head, _, body = answer.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            if length and len(body) >= int(length.group(1)):
                break
            chunk = tls.recv(65536)
            if not chunk:
                break
            answer += chunk
        try:
            tls.unwrap()
        except (stdssl.SSLError, OSError):
            pass
        while True:  # until the server has closed the TCP connection
            try:
                if not raw.recv(65536):
                    break
            except OSError:
                break
    return answer


@pytest_twisted.ensureDeferred
async def test_refusals_over_tls_close_cleanly(daemon, tmp_path, logged):
    """
    Over TLS a refused request (413, 403) gets its whole answer, and a client closing TLS
    as curl does (close_notify once the answer is in) leaves no error in the daemon's log.
    """
    files = makeTLSFiles(tmp_path)
    service, url = daemon("--listen", files.listen())
    port = service.ports[0].getHost().port
    for request, expected in [
        (
            b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"10000\r\n"
            + b"x" * 0x10000,
            b"HTTP/1.1 413 ",
        ),
        (b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n", b"HTTP/1.1 403 "),
    ]:
        response = await threads.deferToThread(curlLike, port, str(files.ca), request)
        assert response.startswith(expected), response
    assert not [line for line in logged if "Unhandled" in line], logged
