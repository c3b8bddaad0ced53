"""Origins and X-Forwarded-For over real loopback connections."""

from __future__ import annotations

import pytest
import pytest_twisted
from rawws import RawClient, frame, handshake, rawConnect

from wschat.bench.frames import OP_CLOSE, OP_TEXT
from wschat.testing import connect


async def handshakeStatus(url: str, **headers: str) -> bytes:
    """The status line the daemon answers a handshake carrying ``headers`` with."""
    extra = (f"{name.replace('_', '-')}: {value}" for name, value in headers.items())
    raw = await rawConnect(url, RawClient(handshake(*extra, host=url.split("//")[1])))
    head = await raw.until(lambda data: b"\r\n\r\n" in data)
    raw.transport.loseConnection()
    return head.split(b"\r\n")[0]


async def roundTrip(url: str, **options) -> str:
    """Connect with ``options``, send one text and return what the room relayed."""
    client = await connect(url, **options)
    client.sendText("hi")
    text = await client.nextText()
    client.sendClose(1000)
    await client.closed
    return text


@pytest_twisted.ensureDeferred
async def test_foreign_origin_refused(daemon):
    """A page from another site gets HTTP 403, and the room carries on for others."""
    service, url = daemon("--format", "raw", "--welcome", "")
    member = await connect(url)
    status = await handshakeStatus(url, Origin="http://evil.example")
    assert status == b"HTTP/1.1 403 origin http://evil.example not allowed"
    member.sendText("still here")
    assert await member.nextText() == "still here"
    member.sendClose(1000)
    await member.closed


@pytest_twisted.ensureDeferred
async def test_other_port_same_host_refused(daemon):
    """A page from the same host but another port is another origin: 403."""
    service, url = daemon("--welcome", "")
    port = int(url.rsplit(":", 1)[1])
    status = await handshakeStatus(url, Origin=f"http://127.0.0.1:{port + 1}")
    assert status.startswith(b"HTTP/1.1 403 ")


@pytest_twisted.ensureDeferred
async def test_null_origin_refused_by_default(daemon):
    """The opaque 'null' origin (sandboxed pages) gets 403 by default, not Autobahn's 400."""
    service, url = daemon("--welcome", "")
    assert (await handshakeStatus(url, Origin="null")).startswith(b"HTTP/1.1 403 ")


@pytest_twisted.ensureDeferred
async def test_same_origin_accepted(daemon):
    """A page served from the daemon's own host and port may connect."""
    service, url = daemon("--format", "raw", "--welcome", "")
    origin = url.replace("ws://", "http://")
    assert (await handshakeStatus(url, Origin=origin)).startswith(b"HTTP/1.1 101 ")
    assert await roundTrip(url, origin=origin) == "hi"


@pytest_twisted.ensureDeferred
async def test_no_origin_accepted(daemon):
    """A program that sends no Origin may connect."""
    service, url = daemon("--format", "raw", "--welcome", "")
    assert (await handshakeStatus(url)).startswith(b"HTTP/1.1 101 ")


@pytest.mark.parametrize(
    ("allowed", "origin"),
    [
        (["https://app.example"], "https://app.example"),
        (["https://app.example", "http://other.example:8080"], "http://other.example:8080"),
        (["null"], "null"),
        (["*"], "http://evil.example"),
        (["*"], "null"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_allowed_origin(daemon, allowed, origin):
    """An origin listed with --allowed-origin (or '*') may connect."""
    args = ["--format", "raw", "--welcome", ""]
    for value in allowed:
        args += ["--allowed-origin", value]
    service, url = daemon(*args)
    assert await roundTrip(url, origin=origin) == "hi"


@pytest_twisted.ensureDeferred
async def test_allowed_origin_is_exact(daemon):
    """Listing one origin does not let in the same host under another scheme."""
    service, url = daemon("--welcome", "", "--allowed-origin", "https://app.example")
    status = await handshakeStatus(url, Origin="http://app.example")
    assert status.startswith(b"HTTP/1.1 403 ")


@pytest.mark.parametrize(
    ("trust", "forwarded", "host"),
    [
        # Without --trust-forwarded-for, the header cannot change the sender's name.
        ((), "203.0.113.7", "127.0.0.1"),
        # With one trusted proxy, the last entry (IPv6 in brackets); the TCP port is kept.
        (("--trust-forwarded-for", "1"), "198.51.100.9, 2001:db8::7", "[2001:db8::7]"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_forwarded_for_one_hop_or_none(daemon, trust, forwarded, host):
    """The sender's name comes from X-Forwarded-For only as far as proxies are trusted."""
    service, url = daemon("--welcome", "", *trust)
    client = await connect(url, headers={"X-Forwarded-For": forwarded})
    client.sendText("hi")
    port = client.transport.getHost().port
    assert await client.nextText() == f"{host}:{port}: hi"
    client.sendClose(1000)
    await client.closed


@pytest_twisted.ensureDeferred
async def test_forwarded_for_two_hops(daemon):
    """With two trusted proxies, the second entry from the right; too short: the TCP peer."""
    service, url = daemon("--welcome", "", "--trust-forwarded-for", "2")
    client = await connect(url, headers={"X-Forwarded-For": "198.51.100.9, 10.0.0.1"})
    short = await connect(url, headers={"X-Forwarded-For": "10.0.0.1"})
    client.sendText("hi")
    port = client.transport.getHost().port
    assert await client.nextText() == f"198.51.100.9:{port}: hi"
    assert await short.nextText() == f"198.51.100.9:{port}: hi"
    short.sendText("me")
    shortPort = short.transport.getHost().port
    assert await short.nextText() == f"127.0.0.1:{shortPort}: me"
    for c in (client, short):
        c.sendClose(1000)
        await c.closed


@pytest_twisted.ensureDeferred
async def test_forwarded_for_several_headers(daemon):
    """Several X-Forwarded-For headers are one list, in order, as HTTP says."""
    service, url = daemon("--welcome", "", "--trust-forwarded-for", "2")
    request = handshake(
        "X-Forwarded-For: 198.51.100.1, 203.0.113.7", "X-Forwarded-For: 10.0.0.1", host="127.0.0.1"
    )
    text = frame(OP_TEXT, b"hi")
    close = frame(OP_CLOSE, b"\x03\xe8")
    raw = await rawConnect(url, RawClient(request + text + close))
    sourcePort = raw.transport.getHost().port
    head, _, frames = (await raw.lost).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    relay = f"203.0.113.7:{sourcePort}: hi".encode()
    assert frames[: 2 + len(relay)] == bytes([0x81, len(relay)]) + relay
