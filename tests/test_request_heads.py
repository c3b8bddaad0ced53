"""
Every request head on the chat port, over real loopback connections: bodies refused before
they are read (413), each head's deadline and size (431), connections counted in
--max-connections (503), and the Host names the daemon answers to (403).
"""

from __future__ import annotations

import socket

import pytest_twisted
from rawws import RawClient, handshake, rawConnect, rawExchange
from twisted.internet import reactor, task

from wschat.limits import MAX_REQUEST_HEAD, KiB

#: How long a test waits for an answer that should come at once (a deadline, not a sleep).
PROMPTLY = 5.0


def hostOf(url: str) -> str:
    return url.split("//", 1)[1].rstrip("/")


def get(path: str, host: str, *headers: str, version: str = "1.1") -> bytes:
    lines = [f"GET {path} HTTP/{version}", f"Host: {host}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def complete(data: bytes) -> bool:
    """Whether ``data`` holds a whole response (head, and a body as long as announced)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return True


async def answer(client: RawClient, after: int = 0) -> bytes:
    """The next whole response ``client`` receives past its first ``after`` bytes, promptly."""
    d = client.until(lambda data: complete(data[after:]))
    data = await d.addTimeout(PROMPTLY, reactor)
    return data[after:]


def status(response: bytes) -> bytes:
    return response.split(b"\r\n", 1)[0]


# -- request bodies


@pytest_twisted.ensureDeferred
async def test_chunked_post_refused_before_its_body(daemon):
    """A chunked POST gets 413 as soon as its head is in, without the daemon reading a body."""
    service, url = daemon()
    head = b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    client = await rawConnect(url, RawClient(head))
    response = await answer(client)
    assert status(response) == b"HTTP/1.1 413 Content Too Large", response
    assert b"Connection: close" in response
    await client.lost.addTimeout(PROMPTLY, reactor)


@pytest_twisted.ensureDeferred
async def test_announced_body_refused_whatever_the_method(daemon):
    """GET, POST or a WebSocket handshake announcing a body all get 413, before it is sent."""
    service, url = daemon()
    host = hostOf(url)
    for request in [
        get("/healthz", host, "Content-Length: 300000000"),
        get("/", host, "Content-Length: 1").replace(b"GET", b"POST", 1),
        handshake("Content-Length: 5", host=host),
    ]:
        client = await rawConnect(url, RawClient(request))
        assert status(await answer(client)).startswith(b"HTTP/1.1 413 "), request
        client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_body_refused_on_a_kept_alive_connection(daemon):
    """The second request of a kept-alive connection is checked like the first: 413."""
    service, url = daemon()
    host = hostOf(url)
    client = await rawConnect(url, RawClient(get("/healthz", host)))
    first = await answer(client)
    assert status(first) == b"HTTP/1.1 200 OK"
    client.transport.write(get("/", host, "Transfer-Encoding: chunked").replace(b"GET", b"PUT"))
    assert status(await answer(client, len(first))).startswith(b"HTTP/1.1 413 ")


@pytest_twisted.ensureDeferred
async def test_empty_body_is_no_body(daemon):
    """Content-Length: 0 announces no body: a POST gets the site's 405, not 413."""
    service, url = daemon()
    request = get("/healthz", hostOf(url), "Content-Length: 0").replace(b"GET", b"POST", 1)
    client = await rawConnect(url, RawClient(request))
    assert status(await answer(client)).startswith(b"HTTP/1.1 405 ")
    client.transport.loseConnection()


# -- head deadlines and sizes


@pytest_twisted.ensureDeferred
async def test_trickled_second_head_is_dropped(daemon):
    """
    A kept-alive connection that trickles its next head a byte at a time (each byte resets
    HTTP's idle timer) is dropped by the head deadline; the daemon still answers others.
    """
    service, url = daemon("--handshake-timeout", "1")
    host = hostOf(url)
    client = await rawConnect(url, RawClient(get("/healthz", host)))
    assert status(await answer(client)) == b"HTTP/1.1 200 OK"
    trickle = iter(get("/", host) * 100)
    sender = task.LoopingCall(lambda: client.transport.write(bytes([next(trickle)])))
    sender.start(0.1)
    try:
        await client.lost.addTimeout(PROMPTLY, reactor)
    finally:
        sender.stop()
    assert (await rawExchange(url, get("/healthz", host, "Connection: close"))).startswith(
        b"HTTP/1.1 200 "
    )


@pytest_twisted.ensureDeferred
async def test_heads_up_to_the_limit_on_both_routes(daemon):
    """A 24 KiB head is served on both routes: 200 for the site, 101 for a handshake."""
    service, url = daemon("--welcome", "")
    host = hostOf(url)
    padding = "X-Padding: " + "p" * (24 * KiB)
    client = await rawConnect(url, RawClient(get("/healthz", host, padding)))
    assert status(await answer(client)) == b"HTTP/1.1 200 OK"
    client.transport.loseConnection()
    client = await rawConnect(url, RawClient(handshake(padding, host=host)))
    assert status(await answer(client)).startswith(b"HTTP/1.1 101 ")
    client.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_oversized_second_head_gets_431(daemon):
    """A head past MAX_REQUEST_HEAD gets 431 as the second request of a connection too."""
    service, url = daemon()
    host = hostOf(url)
    client = await rawConnect(url, RawClient(get("/healthz", host)))
    first = await answer(client)
    client.transport.write(get("/healthz", host, "X-Padding: " + "p" * MAX_REQUEST_HEAD))
    assert status(await answer(client, len(first))).startswith(b"HTTP/1.1 431 ")


@pytest_twisted.ensureDeferred
async def test_waiting_and_http_connections_count(daemon):
    """
    Past --max-connections, a connection gets 503 at once even when those holding the slots
    are an unfinished head and a kept-alive HTTP connection, not WebSocket clients.
    """
    service, url = daemon("--max-connections", "2")
    host = hostOf(url)
    waiting = await rawConnect(url, RawClient(b"GET / HT"))
    keptAlive = await rawConnect(url, RawClient(get("/healthz", host)))
    assert status(await answer(keptAlive)) == b"HTTP/1.1 200 OK"
    for request in [get("/healthz", host), handshake(host=host)]:
        refused = await rawConnect(url, RawClient(request))
        assert status(await answer(refused)) == b"HTTP/1.1 503 Service Unavailable"
        await refused.lost.addTimeout(PROMPTLY, reactor)
    waiting.transport.loseConnection()
    keptAlive.transport.loseConnection()


# -- Host names (DNS rebinding)


@pytest_twisted.ensureDeferred
async def test_rebinding_handshake_refused(daemon):
    """
    A handshake for another name, from a page of that name (same-origin, as after DNS
    rebinding), gets 403 on a loopback daemon.
    """
    service, url = daemon()
    port = url.rsplit(":", 1)[1]
    request = handshake(f"Origin: http://evil.example:{port}", host=f"evil.example:{port}")
    client = await rawConnect(url, RawClient(request))
    response = await answer(client)
    assert status(response) == b"HTTP/1.1 403 Forbidden", response
    assert b"does not answer to the name 'evil.example:" in response
    assert b"--allowed-host" in response


@pytest_twisted.ensureDeferred
async def test_rebinding_page_refused(daemon):
    """The page, /healthz and /metrics requested under another name get 403 too."""
    service, url = daemon()
    port = url.rsplit(":", 1)[1]
    for path in ["/", "/healthz", "/metrics"]:
        response = await rawExchange(url, get(path, f"evil.example:{port}", "Connection: close"))
        assert status(response) == b"HTTP/1.1 403 Forbidden", (path, response)


@pytest_twisted.ensureDeferred
async def test_own_names_answered(daemon):
    """localhost, loopback addresses and the machine's name are answered; so is no Host."""
    service, url = daemon("--welcome", "")
    port = url.rsplit(":", 1)[1]
    for host in ["localhost", f"localhost:{port}", f"127.0.0.1:{port}", "[::1]", "127.0.0.2"]:
        client = await rawConnect(url, RawClient(handshake(host=host)))
        assert status(await answer(client)).startswith(b"HTTP/1.1 101 "), host
        client.transport.abortConnection()
    response = await rawExchange(url, get("/healthz", socket.gethostname(), "Connection: close"))
    assert status(response) == b"HTTP/1.1 200 OK"
    response = await rawExchange(url, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert status(response) == b"HTTP/1.0 200 OK"


@pytest_twisted.ensureDeferred
async def test_allowed_host_option(daemon):
    """--allowed-host NAME and .DOMAIN let those names in; '*' lets any in."""
    service, url = daemon("--allowed-host", "chat.example", "--allowed-host", ".corp.example")
    for host in ["chat.example", "CHAT.example:443", "corp.example", "a.b.corp.example"]:
        response = await rawExchange(url, get("/healthz", host, "Connection: close"))
        assert status(response) == b"HTTP/1.1 200 OK", host
    for host in ["evil.example", "xcorp.example", "chat.example.evil"]:
        response = await rawExchange(url, get("/healthz", host, "Connection: close"))
        assert status(response) == b"HTTP/1.1 403 Forbidden", host
    service, url = daemon("--allowed-host", "*")
    response = await rawExchange(url, get("/healthz", "evil.example", "Connection: close"))
    assert status(response) == b"HTTP/1.1 200 OK"


@pytest_twisted.ensureDeferred
async def test_bad_host_headers_get_400(daemon):
    """A Host that is not host[:port], or two Host headers, get 400."""
    service, url = daemon()
    for request in [
        get("/healthz", "a/b"),
        get("/healthz", "127.0.0.1", "Host: evil.example"),
    ]:
        response = await rawExchange(url, request)
        assert status(response) == b"HTTP/1.1 400 Bad Request", request


@pytest_twisted.ensureDeferred
async def test_all_interfaces_answers_own_names_and_warns(daemon, logged):
    """
    Listening on every interface without --allowed-host, the daemon says so at start, and
    answers its own names (here reached over loopback) but not others.
    """
    service, _ = daemon("--listen", "tcp:0:interface=0.0.0.0")
    port = service.ports[0].getHost().port
    url = f"ws://127.0.0.1:{port}"
    assert any("no --allowed-host is given" in line for line in logged), logged
    for host, expected in [
        (socket.gethostname(), b"HTTP/1.1 200 OK"),
        (f"127.0.0.1:{port}", b"HTTP/1.1 200 OK"),
        ("evil.example", b"HTTP/1.1 403 Forbidden"),
    ]:
        response = await rawExchange(url, get("/healthz", host, "Connection: close"))
        assert status(response) == expected, host


@pytest_twisted.ensureDeferred
async def test_metrics_listener_guarded_too(daemon):
    """--metrics-listen's port refuses bodies (413) and other names (403) as the chat port does."""
    service, _ = daemon("--metrics-listen", "tcp:0:interface=127.0.0.1")
    assert service.metricsEndpoint is not None and service.metricsEndpoint.port is not None
    url = f"http://127.0.0.1:{service.metricsEndpoint.port.getHost().port}"
    host = hostOf(url)
    head = b"POST /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    client = await rawConnect(url, RawClient(head))
    assert status(await answer(client)) == b"HTTP/1.1 413 Content Too Large"
    response = await rawExchange(url, get("/metrics", "evil.example", "Connection: close"))
    assert status(response) == b"HTTP/1.1 403 Forbidden"
    response = await rawExchange(url, get("/metrics", host, "Connection: close"))
    assert status(response) == b"HTTP/1.1 200 OK"
