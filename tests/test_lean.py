"""Autobahn's options as class attributes: connections share them instead of copying them."""

from __future__ import annotations

import pytest_twisted
from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket import protocol as autobahn_protocol
from twisted.internet.testing import MemoryReactorClock
from txaio.testutil import replace_loop

from wschat import lean
from wschat.protocol import ChatServerProtocol
from wschat.server import ChatServer
from wschat.testing import connect


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
