"""The daemon's HTTP side over real loopback: the page, /healthz, and WebSocket on the same port."""

from __future__ import annotations

import json
from importlib.resources import files

import pytest
import pytest_twisted
from tlsfiles import makeTLSFiles
from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol
from twisted.python import usage
from twisted.web.client import Agent, PartialDownloadError, readBody
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from wschat.server import ChatServer
from wschat.tap import Options
from wschat.testing import connect
from wschat.web import CONTENT_SECURITY_POLICY, HealthResource

# Twisted's readBody warns about the proxy transport its own Agent hands it.
pytestmark = pytest.mark.filterwarnings("ignore:Using readBody with a transport:DeprecationWarning")

WELCOME = "Welcome to chat! Type a message"


class Member:
    """A room member that receives nothing."""

    def deliver(self, frame) -> None:
        pass


def httpURL(wsURL: str) -> str:
    return wsURL.replace("ws://", "http://", 1)


async def request(url: str, method: bytes = b"GET", headers: dict | None = None):
    """One request; returns (code, headers, body)."""
    agent = Agent(reactor)
    hdrs = Headers({k: [v] for k, v in (headers or {}).items()})
    response = await agent.request(method, url.encode("ascii"), hdrs)
    try:
        body = await readBody(response)
    except PartialDownloadError as e:  # an error answer that ends by closing the connection
        body = e.response
    return response.code, response.headers, body


def header(headers: Headers, name: bytes) -> bytes | None:
    values = headers.getRawHeaders(name)
    return values[0] if values else None


def static(name: str) -> bytes:
    return (files("wschat") / "static" / name).read_bytes()


@pytest_twisted.ensureDeferred
async def test_get_root_serves_the_page(daemon):
    """GET / answers 200 with the page shipped as package data, locked down by its CSP."""
    service, url = daemon()
    code, headers, body = await request(httpURL(url) + "/")
    assert code == 200
    assert body == static("index.html")
    assert header(headers, b"content-type") == b"text/html; charset=utf-8"
    assert header(headers, b"content-security-policy") == CONTENT_SECURITY_POLICY
    assert header(headers, b"x-content-type-options") == b"nosniff"


@pytest_twisted.ensureDeferred
async def test_page_assets_are_served(daemon):
    """The page's script and stylesheet come from the daemon with their media types."""
    service, url = daemon()
    for name, mediaType in [
        ("chat.js", b"text/javascript; charset=utf-8"),
        ("chat.css", b"text/css; charset=utf-8"),
    ]:
        code, headers, body = await request(f"{httpURL(url)}/{name}")
        assert (code, header(headers, b"content-type"), body) == (200, mediaType, static(name))


@pytest_twisted.ensureDeferred
async def test_unknown_path_and_method_get_clear_statuses(daemon):
    """An unknown path is 404; POST to the page is 405."""
    service, url = daemon()
    assert (await request(httpURL(url) + "/nope"))[0] == 404
    code, headers, body = await request(httpURL(url) + "/", b"POST")
    assert (code, header(headers, b"allow")) == (405, b"GET, HEAD")
    assert (await request(httpURL(url) + "/healthz", b"DELETE"))[0] == 405


@pytest.mark.parametrize("path", ["/", "/chat.js", "/healthz"])
@pytest_twisted.ensureDeferred
async def test_head_is_get_without_the_body(daemon, logged, path):
    """HEAD answers as GET does, with the length of the body it leaves out; no warning logged."""
    service, url = daemon()
    code, headers, body = await request(httpURL(url) + path)
    headCode, headHeaders, headBody = await request(httpURL(url) + path, b"HEAD")
    assert (headCode, headBody) == (code, b"") == (200, b"")
    assert header(headHeaders, b"content-length") == b"%d" % len(body)
    assert header(headHeaders, b"content-type") == header(headers, b"content-type")
    assert [line for line in logged if "HEAD request" in line] == []


@pytest_twisted.ensureDeferred
async def test_websocket_and_page_share_the_port(daemon):
    """After a page load, a WebSocket handshake on the same URL still reaches the room."""
    service, url = daemon()
    assert (await request(httpURL(url) + "/"))[0] == 200
    a = await connect(url + "/")
    b = await connect(url + "/some/path")
    assert [await a.nextText(), await b.nextText()] == [WELCOME, WELCOME]
    b.sendText("same room")
    host = b.transport.getHost()
    expected = f"127.0.0.1:{host.port}: same room"
    assert [await a.nextText(), await b.nextText()] == [expected, expected]


@pytest_twisted.ensureDeferred
async def test_broken_handshake_gets_400(daemon):
    """An Upgrade: websocket request without the handshake's keys is refused with 400."""
    service, url = daemon()
    response = await Agent(reactor).request(
        b"GET",
        (httpURL(url) + "/").encode("ascii"),
        Headers({b"Upgrade": [b"websocket"], b"Connection": [b"Upgrade"]}),
    )
    assert response.code == 400
    assert response.phrase.startswith(b"WebSocket connection denied")
    response.deliverBody(Protocol())  # and let the server close the connection


@pytest_twisted.ensureDeferred
async def test_websocket_connection_is_its_transports_producer(daemon):
    """On the shared port the WebSocket protocol gets its transport's flow control."""
    service, url = daemon()
    client = await connect(url)
    await client.nextText()
    [server] = list(service.room)
    assert server.transport.producer is server
    assert server.transport.streamingProducer


@pytest_twisted.ensureDeferred
async def test_healthz_reports_ok_and_connections(daemon):
    """GET /healthz answers 200 JSON with the number of open connections."""
    service, url = daemon()
    client = await connect(url)
    await client.nextText()
    code, headers, body = await request(httpURL(url) + "/healthz")
    assert code == 200
    assert header(headers, b"content-type") == b"application/json"
    assert json.loads(body) == {"status": "ok", "connections": 1}


@pytest_twisted.ensureDeferred
async def test_healthz_503_when_not_accepting():
    """/healthz answers 503 "stopping" once the daemon no longer accepts connections."""
    server = ChatServer()  # never started: not accepting
    for _ in range(4):
        server.room.join(Member())
    port = reactor.listenTCP(0, Site(HealthResource(server)), interface="127.0.0.1")
    try:
        code, headers, body = await request(f"http://127.0.0.1:{port.getHost().port}/")
    finally:
        await defer.maybeDeferred(port.stopListening)
    assert (code, json.loads(body)) == (503, {"status": "stopping", "connections": 4})


@pytest_twisted.ensureDeferred
async def test_healthz_follows_service_state(daemon):
    """The chat port's health check asks the service whether it is running."""
    service, url = daemon()
    assert service.accepting()
    service.running = False
    try:
        code, _, body = await request(httpURL(url) + "/healthz")
    finally:
        service.running = True
    assert (code, json.loads(body)["status"]) == (503, "stopping")


def test_format_json_is_not_a_daemon_format():
    """--format json is refused: JSON is what a client asks for, not the daemon's format."""
    with pytest.raises(usage.UsageError, match="one of prefixed, raw, not 'json'"):
        Options().parseOptions(["--format", "json"])


def test_metrics_options():
    """--metrics-listen takes an endpoint; --no-metrics turns metrics off; not both."""
    options = Options()
    options.parseOptions([])
    assert (options["metrics-listen"], options["no-metrics"]) == (None, False)
    options = Options()
    options.parseOptions(["--metrics-listen", "tcp:9100:interface=127.0.0.1"])
    assert options["metrics-listen"] == "tcp:9100:interface=127.0.0.1"
    with pytest.raises(usage.UsageError, match="--metrics-listen 'bogus:1'"):
        Options().parseOptions(["--metrics-listen", "bogus:1"])
    with pytest.raises(usage.UsageError, match="contradict"):
        Options().parseOptions(["--no-metrics", "--metrics-listen", "tcp:9100"])


@pytest.mark.filterwarnings(
    "ignore:Passing pyOpenSSL:DeprecationWarning"
)  # Twisted's ssl: endpoint
@pytest_twisted.ensureDeferred
async def test_tls_serves_page_and_websocket(daemon, tmp_path):
    """On an ssl: endpoint the page comes over HTTPS and the room over WSS, on one port."""
    from twisted.internet import ssl
    from twisted.web.client import BrowserLikePolicyForHTTPS

    files = makeTLSFiles(tmp_path)
    service, _ = daemon("--listen", files.listen())
    port = service.ports[0].getHost().port
    trust = files.trustRoot()
    agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust))
    response = await agent.request(b"GET", f"https://localhost:{port}/".encode())
    assert (response.code, await readBody(response)) == (200, static("index.html"))

    client = await connect(
        f"wss://localhost:{port}/", ssl.optionsForClientTLS("localhost", trustRoot=trust)
    )
    assert await client.nextText() == WELCOME
    client.sendText("secure")
    assert (await client.nextText()).endswith(": secure")
    client.sendClose(1000)
    await client.closed
