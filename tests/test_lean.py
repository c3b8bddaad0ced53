"""Autobahn's options as class attributes: connections share them instead of copying them."""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path

import autobahn
import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket import protocol as autobahn_protocol
from autobahn.websocket.protocol import WebSocketProtocol
from browser import TIMEOUT, launchChromium
from playwright.sync_api import sync_playwright
from rawws import rawExchange
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from txaio.testutil import replace_loop

from wschat import lean
from wschat.dispatch import headerFields
from wschat.handshake import OriginPolicy
from wschat.history import Position
from wschat.protocol import ChatServerProtocol
from wschat.server import ChatServer
from wschat.testing import connect
from wschat.wire import Format


def test_factory_options_become_class_attributes():
    """The class built for a factory carries every option with the factory's value."""
    factory = ChatServer().factory
    factory.setProtocolOptions(autoPingInterval=7)
    cls = lean.protocolClass(factory)
    assert issubclass(cls, ChatServerProtocol) and cls.__name__ == "ChatServerProtocol"
    instance = cls()
    for name in WebSocketServerProtocol.CONFIG_ATTRS:
        assert getattr(instance, name) == getattr(factory, name), name
    assert cls.autoPingInterval == 7
    assert lean.protocolClass(factory) is cls


def test_nothing_left_for_autobahn_to_copy_or_log(monkeypatch):
    """Pins Autobahn: with CONFIG_ATTRS empty, a new connection pretty-prints no options."""
    # Autobahn's timers (this connection's opening handshake timeout) on a clock of the
    # test's: on the real reactor it would fire in a later test, at a protocol with no
    # transport.
    clock = MemoryReactorClock()
    with replace_loop(clock):
        factory = ChatServer(reactor=clock).factory
        cls = lean.protocolClass(factory)
        assert cls.CONFIG_ATTRS == () and ChatServerProtocol.CONFIG_ATTRS
        formatted = []
        real = autobahn_protocol.pformat
        monkeypatch.setattr(
            autobahn_protocol, "pformat", lambda obj: formatted.append(obj) or real(obj)
        )
        protocol = cls()
        protocol.factory = factory
        protocol._connectionMade()
    assert formatted == [[]]
    assert protocol.openHandshakeTimeoutCall is not None and clock.getDelayedCalls()


def test_function_options_stay_plain_functions():
    """A callable option (compression accept) is not turned into a method of the class."""
    factory = ChatServer().factory

    def accept(offers):
        return ("accepted", offers)

    factory.setProtocolOptions(perMessageCompressionAccept=accept)
    instance = lean.protocolClass(factory)()
    assert instance.perMessageCompressionAccept is accept
    assert instance.perMessageCompressionAccept(["o"]) == ("accepted", ["o"])


def test_changed_options_make_a_new_class():
    """setProtocolOptions after connections exist applies to new connections only."""
    factory = ChatServer().factory
    before = factory.maxMessagePayloadSize
    first = lean.protocolClass(factory)
    factory.setProtocolOptions(maxMessagePayloadSize=before + 1)
    second = lean.protocolClass(factory)
    assert second is not first
    assert (first.maxMessagePayloadSize, second.maxMessagePayloadSize) == (before, before + 1)


def test_factories_do_not_share_options():
    """Two factories (two daemons in one process) keep their own options."""
    a, b = ChatServer().factory, ChatServer().factory
    default = b.maxFramePayloadSize
    a.setProtocolOptions(maxFramePayloadSize=10)
    assert lean.protocolClass(a).maxFramePayloadSize == 10
    assert lean.protocolClass(b).maxFramePayloadSize == default != 10


@pytest_twisted.ensureDeferred
async def test_open_connection_holds_no_option_copies(daemon):
    """Pins Autobahn: an option the class already has is not copied onto the connection."""
    service, url = daemon("--format", "raw", "--welcome", "")
    client = await connect(url)
    try:
        (member,) = list(service.room)
        copied = set(WebSocketServerProtocol.CONFIG_ATTRS) & set(vars(member))
        # The one per-connection option: the dispatcher, which already timed the head,
        # turns off Autobahn's handshake timer for this connection.
        assert copied == {"openHandshakeTimeout"}
        assert member.openHandshakeTimeout == 0 < service.factory.openHandshakeTimeout
        assert type(member).CONFIG_ATTRS == ()
        client.sendText("still relays")
        assert await client.nextText() == "still relays"
    finally:
        client.sendClose(1000)
        await client.closed


@pytest_twisted.ensureDeferred
async def test_an_open_connection_lets_go_of_its_handshake(daemon):
    """
    Pins Autobahn: once open, a connection keeps no handshake text or headers and no deque
    of its own, and still relays, sends through Autobahn's queue and closes cleanly.
    """
    service, url = daemon("--welcome", "hello")
    alice = await connect(url)
    assert await alice.nextText() == "hello"
    (server,) = list(service.room)
    assert type(server.send_queue) is lean.SendQueue and not server.send_queue
    assert server.http_request_data is None and server.http_response_data is None
    assert dict(server.http_headers) == {}
    alice.sendText("one")
    assert (await alice.nextText()).endswith("one")
    # A synchronous send goes through Autobahn's send queue, now a SendQueue.
    server.sendMessage(b"queued", sync=True)
    assert await alice.nextText() == "queued"
    alice.sendText("two")
    assert (await alice.nextText()).endswith("two")
    alice.sendClose(1000)
    assert await alice.closed == (1000, None)


def test_send_queue_works_as_autobahn_uses_it():
    """A synchronous send (which queues in Autobahn) goes out whole and in order."""
    queue = lean.SendQueue()
    queue.append((b"a", True))
    queue.append((b"b", False))
    assert len(queue) == 2
    assert queue.popleft() == (b"a", True)
    assert queue.popleft() == (b"b", False)
    assert len(queue) == 0


# -- the lean opening handshake (wschat.lean.openHandshake)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def head(*lines: str, target: str = "/", key: str = KEY, version: str = "13") -> bytes:
    """A client's opening handshake head for ``target``, with extra header ``lines``."""
    return (
        "\r\n".join(
            [
                f"GET {target} HTTP/1.1",
                "Host: 127.0.0.1:2000",
                "Upgrade: websocket",
                "Connection: Upgrade",
                f"Sec-WebSocket-Key: {key}",
                f"Sec-WebSocket-Version: {version}",
                *lines,
            ]
        )
        + "\r\n\r\n"
    ).encode("latin-1")


#: The extension offers browsers send on every handshake.
CHROMIUM_OFFER = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"
FIREFOX_OFFER = "Sec-WebSocket-Extensions: permessage-deflate"
#: Several offers in one header, with parameters, quotes and an extension nobody implements.
MANY_OFFERS = (
    "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover;"
    ' client_max_window_bits="10", permessage-deflate; client_max_window_bits,'
    " x-webkit-deflate-frame, permessage-bzip2"
)
#: An offer Autobahn's parser refuses (a window size out of range): Autobahn fails that handshake.
MALFORMED_OFFER = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits=99"


def daemonOn(clock, **options):
    """A daemon's server object on ``clock`` (with history, unless ``options`` say)."""
    return ChatServer(reactor=clock, **{"history": 100, **options})


def connection(server, handshakeTimer=False):
    """A connected protocol of ``server`` and its in-memory transport."""
    protocol = server.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    if not handshakeTimer:
        # As the dispatcher does: the head is all here, Autobahn's handshake timer is unused.
        protocol.openHandshakeTimeout = 0
    transport = StringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 2000),
        peerAddress=IPv4Address("TCP", "127.0.0.1", 50000),
    )
    protocol.makeConnection(transport)
    return protocol, transport


def openBoth(request: bytes, **options):
    """
    The same request to one daemon answered the lean way and by Autobahn:
    (protocol, response) each.
    """
    clock = MemoryReactorClock()
    with replace_loop(clock):
        server = daemonOn(clock, **options)
        leanProtocol, leanTransport = connection(server)
        fields = headerFields(request[:-4])
        assert fields is not None
        assert lean.openHandshake(leanProtocol, request, fields)
        assert server.factory.leanHandshakes == 1
        abProtocol, abTransport = connection(server)
        abProtocol.dataReceived(request)
        assert server.factory.leanHandshakes == 1
        clock.advance(0)
    return (leanProtocol, leanTransport.value()), (abProtocol, abTransport.value())


def same(a, b, depth=0):
    """
    Whether two attribute values of two connections are alike: equal, or per-connection
    objects (Deferreds in the same state; other objects of one type, with alike attributes).
    """
    if a is b:
        return True
    if isinstance(a, Deferred) and isinstance(b, Deferred):
        return a.called == b.called
    if type(a) is not type(b):
        return False
    try:
        if a == b:
            return True
    except RecursionError:
        pass
    if depth > 2:
        return False
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y, depth + 1) for x, y in zip(a, b, strict=True))
    slots = getattr(type(a), "__slots__", None)
    if slots is not None and not hasattr(a, "__dict__"):
        return all(same(getattr(a, k, None), getattr(b, k, None), depth + 1) for k in slots)
    if hasattr(a, "__dict__"):
        va, vb = vars(a), vars(b)
        return va.keys() == vb.keys() and all(same(va[k], vb[k], depth + 1) for k in va)
    return False


@pytest.mark.parametrize(
    "request_",
    [
        head(),
        head("Sec-WebSocket-Protocol: wschat.json"),
        head("Sec-WebSocket-Protocol: other, wschat.json"),
        head(target="/?since=abc:7"),
        head(target="/chat?history=5"),
        head("Origin: http://127.0.0.1:2000", "User-Agent: test"),
        head("X-Forwarded-For: 203.0.113.7"),
        head().replace(b"Connection: Upgrade", b"Connection: keep-alive, UPGRADE"),
        head().replace(b"Upgrade: websocket", b"Upgrade: WebSocket"),
        head(CHROMIUM_OFFER),
        head(FIREFOX_OFFER, "Sec-WebSocket-Protocol: wschat.json"),
        head(MANY_OFFERS),
        head("Sec-WebSocket-Extensions: x-unknown; a=1"),
        head("Sec-WebSocket-Extensions: "),
    ],
)
def test_lean_handshake_opens_the_connection_autobahn_would(request_):
    """
    Pins Autobahn: a plain handshake answered the lean way leaves the protocol as Autobahn's
    processHandshake and succeedHandshake do (every attribute), with the same 101 bytes.
    """
    (leanProtocol, leanResponse), (abProtocol, abResponse) = openBoth(request_)
    assert leanResponse.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    # The 101 response, byte for byte (the welcome behind it counts the members).
    assert leanResponse.partition(b"\r\n\r\n")[0] == abResponse.partition(b"\r\n\r\n")[0]
    assert leanProtocol.state == abProtocol.state == WebSocketProtocol.STATE_OPEN
    leanVars, abVars = vars(leanProtocol), vars(abProtocol)
    assert leanVars.keys() == abVars.keys()
    # Each connection has its own transport: alike in type only.
    different = {name for name in leanVars if not same(leanVars[name], abVars[name])}
    assert different == {"transport"}
    for name in different:
        assert type(leanVars[name]) is type(abVars[name])


def test_lean_handshake_negotiates_the_json_subprotocol():
    """The JSON subprotocol, when offered, is chosen and answered as Autobahn answers it."""
    (protocol, response), _ = openBoth(head("Sec-WebSocket-Protocol: other, wschat.json"))
    assert b"\r\nSec-WebSocket-Protocol: wschat.json\r\n" in response
    assert b"\r\nX-WSChat-Max-Message-Size: " in response
    assert protocol.format is Format.JSON and protocol.websocket_protocol_in_use == "wschat.json"


def test_lean_handshake_reads_the_since_query():
    """A ?since= query is read as through Autobahn: the protocol recovers from there."""
    (protocol, _), _ = openBoth(head(target="/?since=abc:7"))
    assert protocol._since == Position("abc", 7)
    assert protocol.http_request_params == {"since": ["abc:7"]}


@pytest.mark.parametrize(
    "request_",
    [
        head(MALFORMED_OFFER),
        head("Sec-WebSocket-Extensions: permessage-deflate; bogus_parameter"),
        head(FIREFOX_OFFER, FIREFOX_OFFER),
        head(version="8"),
        head(version="12"),
        head(key="short=="),
        head(key="dGhlIHNhbXBsZSBub25jZQ!="),
        head("Sec-WebSocket-Protocol: a, a"),
        head("Sec-WebSocket-Key: " + KEY),
        head(target="/#fragment"),
        head(target="/path;params"),
        head(target="http://127.0.0.1:2000/"),
        head("Origin: not an origin"),
        head("X-Folded: a\r\n b"),
        head().replace(b"GET", b"POST"),
        head().replace(b"HTTP/1.1", b"HTTP/1.0"),
        head().replace(b"Host: 127.0.0.1:2000\r\n", b""),
        head().replace(b"Connection: Upgrade", b"Connection: keep-alive"),
    ],
)
def test_other_requests_go_to_autobahn(request_):
    """Anything but a plain handshake is left to Autobahn, with the protocol untouched."""
    clock = MemoryReactorClock()
    with replace_loop(clock):
        server = daemonOn(clock)
        protocol, transport = connection(server)
        before = dict(vars(protocol))
        fields = headerFields(request_[:-4])
        assert fields is not None
        assert not lean.openHandshake(protocol, request_, fields)
        assert vars(protocol) == before and transport.value() == b""
        assert server.factory.leanHandshakes == 0


def test_a_refused_lean_handshake_gets_autobahns_answer():
    """onConnect's refusal (here: history asked for with history off) answers as Autobahn."""
    request = head(target="/?since=abc:7")
    answers = []
    clock = MemoryReactorClock()
    with replace_loop(clock):
        for viaLean in (True, False):
            server = daemonOn(clock, history=0)
            protocol, transport = connection(server)
            if viaLean:
                assert lean.openHandshake(protocol, request, headerFields(request[:-4]))
            else:
                protocol.dataReceived(request)
            answers.append((transport.value(), protocol.state, len(server.room)))
    assert answers[0] == answers[1]
    assert answers[0][0].startswith(b"HTTP/1.1 400 history is off\r\n")


@pytest_twisted.ensureDeferred
async def test_a_plain_upgrade_takes_the_lean_path(daemon):
    """Over TCP, a plain handshake is answered the lean way, and the connection relays."""
    service, url = daemon("--format", "raw", "--welcome", "")
    client = await connect(url)
    try:
        assert service.factory.leanHandshakes == 1
        client.sendText("lean")
        assert await client.nextText() == "lean"
    finally:
        client.sendClose(1000)
        await client.closed


def test_browser_offers_are_declined_as_autobahn_declines_them():
    """
    With compression off, a browser's permessage-deflate offer is parsed as Autobahn parses
    it, handed to onConnect, and answered without an extension.
    """
    (protocol, response), (abProtocol, _) = openBoth(head(CHROMIUM_OFFER))
    assert protocol.websocket_extensions == [
        ("permessage-deflate", {"client_max_window_bits": [True]})
    ]
    assert protocol.websocket_extensions == abProtocol.websocket_extensions
    assert protocol.websocket_extensions_in_use == [] and protocol._perMessageCompress is None
    assert b"sec-websocket-extensions" not in response.lower()


def chromiumsHead() -> bytes:
    """The opening handshake head real Chromium sends for ``new WebSocket(...)``."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        port = listener.getsockname()[1]
        with sync_playwright() as playwright:
            browser = launchChromium(playwright)
            try:
                page = browser.new_page()
                page.set_content(f"<script>new WebSocket('ws://127.0.0.1:{port}/')</script>")
                peer, _ = listener.accept()
                with peer:
                    peer.settimeout(TIMEOUT)
                    data = b""
                    while b"\r\n\r\n" not in data:
                        chunk = peer.recv(4096)
                        assert chunk, data
                        data += chunk
            finally:
                browser.close()
    return data


def test_chromiums_handshake_takes_the_lean_path():
    """
    Real Chromium's handshake (its permessage-deflate offer included) is answered the lean
    way, leaving the state and 101 bytes Autobahn's handshake would.
    """
    request = chromiumsHead()
    assert b"\r\nSec-WebSocket-Extensions: permessage-deflate" in request
    # The page (set by content, no URL) has the null origin: allowed here.
    (leanProtocol, leanResponse), (abProtocol, abResponse) = openBoth(
        request, origins=OriginPolicy.fromList(["null"])
    )
    assert leanResponse.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert leanResponse.partition(b"\r\n\r\n")[0] == abResponse.partition(b"\r\n\r\n")[0]
    assert leanProtocol.websocket_extensions and not leanProtocol.websocket_extensions_in_use
    leanVars, abVars = vars(leanProtocol), vars(abProtocol)
    assert leanVars.keys() == abVars.keys()
    assert {name for name in leanVars if not same(leanVars[name], abVars[name])} == {"transport"}


def test_a_malformed_offer_gets_autobahns_answer():
    """
    With compression off, an offer Autobahn's parser refuses is left to Autobahn, which fails
    the handshake with its own 400.
    """
    request = head(MALFORMED_OFFER)
    clock = MemoryReactorClock()
    with replace_loop(clock):
        server = daemonOn(clock)
        protocol, transport = connection(server)
        assert not lean.openHandshake(protocol, request, headerFields(request[:-4]))
        protocol.dataReceived(request)
    assert transport.value().startswith(b"HTTP/1.1 400 ")
    assert b"client_max_window_bits" in transport.value()
    assert protocol.state != WebSocketProtocol.STATE_OPEN
    assert server.factory.leanHandshakes == 0


@pytest.mark.parametrize("offer", [FIREFOX_OFFER, CHROMIUM_OFFER, MANY_OFFERS])
def test_with_compression_on_offers_go_to_autobahn(offer):
    """With compression on, every offer is negotiated by Autobahn: deflate is agreed."""
    request = head(offer)
    clock = MemoryReactorClock()
    with replace_loop(clock):
        server = daemonOn(clock, compression=True)
        protocol, transport = connection(server)
        before = dict(vars(protocol))
        assert not lean.openHandshake(protocol, request, headerFields(request[:-4]))
        assert vars(protocol) == before and transport.value() == b""
        protocol.dataReceived(request)
        clock.advance(0)
    assert protocol.state == WebSocketProtocol.STATE_OPEN
    assert protocol._perMessageCompress is not None
    assert b"\r\nSec-WebSocket-Extensions: permessage-deflate" in transport.value()
    assert server.factory.leanHandshakes == 0


@pytest_twisted.ensureDeferred
async def test_a_deflate_offer_takes_the_lean_path_with_compression_off(daemon):
    """
    Over TCP, a client offering permessage-deflate to a daemon with compression off is
    answered the lean way, without compression, and relays.
    """
    service, url = daemon("--format", "raw", "--welcome", "")
    client = await connect(url, offerDeflate=True)
    try:
        (member,) = list(service.room)
        assert service.factory.leanHandshakes == 1
        assert member.websocket_extensions and not member.websocket_extensions_in_use
        assert not client.websocket_extensions_in_use
        client.sendText("plain")
        assert await client.nextText() == "plain"
    finally:
        client.sendClose(1000)
        await client.closed


@pytest.mark.parametrize(
    "request_", [head(version="12"), head(key="short=="), head(MALFORMED_OFFER)]
)
@pytest_twisted.ensureDeferred
async def test_fallbacks_get_autobahns_exact_answer(daemon, request_):
    """
    Over TCP, a bad version, key or extension offer goes through Autobahn's handshake: the
    daemon's answer is Autobahn's error response, byte for byte.
    """
    service, url = daemon("--welcome", "")
    answer = await rawExchange(url, request_)
    clock = MemoryReactorClock()
    with replace_loop(clock):
        protocol, transport = connection(daemonOn(clock))
        protocol.dataReceived(request_)
    assert answer == transport.value() and answer.startswith(b"HTTP/1.1 400 ")
    assert service.factory.leanHandshakes == 0


@pytest_twisted.ensureDeferred
async def test_a_compression_offer_goes_through_autobahn(daemon):
    """With compression on, a client offering permessage-deflate gets it, from Autobahn."""
    service, url = daemon("--compression", "--format", "raw", "--welcome", "")
    client = await connect(url, offerDeflate=True)
    try:
        (member,) = list(service.room)
        assert member.websocket_extensions_in_use and client.websocket_extensions_in_use
        assert service.factory.leanHandshakes == 0
        client.sendText("squeezed")
        assert await client.nextText() == "squeezed"
    finally:
        client.sendClose(1000)
        await client.closed


def test_lean_connection_start_is_autobahns(monkeypatch):
    """
    Pins Autobahn: a connection started the lean way has every attribute Autobahn's
    connectionMade gives it, but for the UTF-8 validator, made on first use.
    """
    clock = MemoryReactorClock()
    with replace_loop(clock):
        server = daemonOn(clock)
        leanProtocol, _ = connection(server, handshakeTimer=True)
        monkeypatch.setattr(lean, "ENABLED", False)
        abProtocol, _ = connection(server, handshakeTimer=True)
    leanVars, abVars = vars(leanProtocol), vars(abProtocol)
    assert abVars.keys() - leanVars.keys() == {"utf8validator"}
    assert leanVars.keys() <= abVars.keys()
    # Each connection has its own transport: alike in type only.
    different = {name for name in leanVars if not same(leanVars[name], abVars[name])}
    assert different == {"transport"}
    assert leanProtocol.openHandshakeTimeoutCall is not None
    assert server.factory.countConnections == 2
    # Asked for, the validator is made (and kept), as Autobahn's would be.
    validator = leanProtocol.utf8validator
    assert type(validator) is type(abProtocol.utf8validator)
    assert leanProtocol.utf8validator is validator


@pytest_twisted.ensureDeferred
async def test_text_is_still_validated(daemon):
    """A connection with a validator made on first use still refuses bad UTF-8 (1007)."""
    service, url = daemon("--format", "raw", "--welcome", "")
    client = await connect(url)
    (member,) = list(service.room)
    assert "utf8validator" not in vars(member)
    client.sendText("fine")
    assert await client.nextText() == "fine"
    assert "utf8validator" in vars(member)
    client.sendMessage(b"\xff\xfe", isBinary=False)
    code, _ = await client.closed
    assert code == 1007


@pytest_twisted.ensureDeferred
async def test_an_unpinned_autobahn_gets_autobahns_handshake(daemon, monkeypatch):
    """On an Autobahn the lean paths were not checked against, Autobahn does it all."""
    monkeypatch.setattr(lean, "ENABLED", False)
    service, url = daemon("--format", "raw", "--welcome", "")
    client = await connect(url)
    try:
        (member,) = list(service.room)
        assert service.factory.leanHandshakes == 0 and "utf8validator" in vars(member)
        client.sendText("still")
        assert await client.nextText() == "still"
    finally:
        client.sendClose(1000)
        await client.closed


def test_the_tests_run_on_the_autobahn_lean_was_checked_against():
    """
    The test extra pins the Autobahn version the lean paths were checked against, and that is
    the one installed: a new Autobahn is taken up by changing both, not by a fresh install.
    """
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    pins = [
        d.split("==", 1)[1]
        for d in project["project"]["optional-dependencies"]["test"]
        if d.startswith("autobahn==")
    ]
    assert pins and set(pins) <= lean.PINNED
    assert autobahn.__version__ in lean.PINNED
