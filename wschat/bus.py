"""
How a message travels from the client that sent it to the room(s) that relay it.

A protocol hands every message it accepts to ``factory.bus.publish(message, origin)``:

:class:`LocalBus` (the default)
    Gives it straight to this daemon's room: one daemon, one room, as without a bus.

:class:`RedisBus` (``--redis``)
    Publishes it once, as an envelope, to a Redis pub/sub channel shared by several daemons,
    and gives every envelope it receives on that channel (its own included) to this daemon's
    room. Every client of every daemon sees the same messages in the same order: the order in
    which Redis received them. While the link to Redis is down a message is not sent: its
    sender gets a notice through ``origin.refused(reason)`` and :attr:`RedisBus.refused` counts
    it; the daemon reconnects with backoff and resumes on its own.

The envelope (version 1) is a MessagePack array, chosen over JSON for being ten times faster to
build and read here, half the overhead, and binary-safe without base64::

    [1, node, sender, isBinary, time, payload]

``node`` (str) names the daemon that received the message from its client, ``sender`` (str) is
that client's address as the prefix shows it, ``isBinary`` (bool) the WebSocket opcode, ``time``
(float, seconds since the epoch) when the origin daemon received it and ``payload`` (bin) the
message as sent. Readers of version 1 ignore any further elements, so fields can be added
without a new version; anything else (not MessagePack, another version, wrong types, a text
payload that is not UTF-8) is logged and skipped.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import msgpack
import txredisapi
from twisted.application import service
from twisted.internet import defer, endpoints, task
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from wschat.room import Room
from wschat.wire import Format, Message

ENVELOPE_VERSION = 1
DEFAULT_CHANNEL = "wschat"
DEFAULT_REDIS_PORT = 6379
#: Seconds Redis may take to answer a command before the connection is dropped.
REPLY_TIMEOUT = 10.0
#: Seconds between PINGs on both connections: a link that died silently (no RST: a network
#: partition, a host gone) is found within HEARTBEAT + REPLY_TIMEOUT, even on a quiet channel.
HEARTBEAT = 5.0

#: Told to a sender whose message was refused because the link to Redis is down.
REFUSED_DOWN = "message not delivered: the room is unavailable (Redis link down); try again later"
#: Told to a sender whose message Redis took but relayed to no daemon at all.
REFUSED_NO_ROOM = "message not delivered: no daemon is listening on the room's channel"
#: Told to a sender whose message was in flight when the link to Redis broke.
REFUSED_LOST = "message may not have been delivered: the Redis link broke while sending it"


# The envelope


@dataclass(frozen=True, slots=True)
class Envelope:
    """A message as it travels between daemons: what was sent, where and when it came in."""

    message: Message
    node: str
    time: float


class MalformedEnvelope(ValueError):
    """What came in on the channel is not an envelope this daemon can relay."""


def encodeEnvelope(envelope: Envelope) -> bytes:
    message = envelope.message
    data: bytes = msgpack.packb(
        [
            ENVELOPE_VERSION,
            envelope.node,
            message.sender,
            message.isBinary,
            envelope.time,
            message.payload,
        ]
    )
    return data


def decodeEnvelope(data: bytes) -> Envelope:
    """
    Read an envelope; raise :class:`MalformedEnvelope` for anything that is not one.
    """
    if not isinstance(data, bytes):
        raise MalformedEnvelope(f"not bytes but {type(data).__name__}")
    try:
        fields = msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise MalformedEnvelope(f"not MessagePack: {e}") from None
    if not isinstance(fields, list) or not fields:
        raise MalformedEnvelope("not a MessagePack array")
    if fields[0] != ENVELOPE_VERSION or type(fields[0]) is not int:
        raise MalformedEnvelope(f"unknown version {fields[0]!r}")
    if len(fields) < 6:
        raise MalformedEnvelope(f"{len(fields)} fields, version 1 has 6")
    _, node, sender, isBinary, time, payload = fields[:6]
    if not (
        isinstance(node, str)
        and isinstance(sender, str)
        and isinstance(isBinary, bool)
        and isinstance(time, int | float)
        and not isinstance(time, bool)
        and isinstance(payload, bytes)
    ):
        raise MalformedEnvelope("a field has the wrong type")
    if not isBinary:
        # A text frame that is not UTF-8 makes every client fail the connection (1007).
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedEnvelope("a text payload that is not UTF-8") from None
    return Envelope(Message(sender, payload, isBinary), node, float(time))


# Buses


class Origin(Protocol):
    """Who sent a message: told when the bus could not relay it."""

    def refused(self, reason: str) -> None:
        """
        Tell the sender its message was not (or may not have been) relayed, and why.
        """


class Bus(Protocol):
    """What a protocol hands its messages to."""

    #: Messages accepted from this daemon's clients.
    published: int
    #: Messages refused (their sender told so) instead of relayed.
    refused: int

    def publish(self, message: Message, origin: Origin) -> None:
        """
        Relay ``message`` to the room; tell ``origin`` if that cannot be done.
        """


class LocalBus:
    """The room of this daemon alone: a message goes straight to it."""

    def __init__(self, room: Room) -> None:
        self.room = room
        self.published = 0
        self.refused = 0

    def publish(self, message: Message, origin: Origin) -> None:
        self.published += 1
        self.room.broadcast(message)


@dataclass(frozen=True)
class RedisAddress:
    """Where the Redis server is, parsed from a ``redis://`` URL."""

    host: str
    port: int = DEFAULT_REDIS_PORT
    db: int = 0
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:
        # For log lines: never the password.
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.username or ''}:***@" if self.password is not None else ""
        return f"redis://{user}{host}:{self.port}/{self.db}"


def parseRedisURL(url: str) -> RedisAddress:
    """
    Parse ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``; raise ``ValueError`` with a reason.

    USER and PASSWORD may be percent-encoded; an IPv6 HOST goes in brackets.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{url!r} is not a valid URL: {e}") from None
    if parts.scheme != "redis":
        raise ValueError(f"{url!r}: only redis://HOST:PORT/DB URLs are supported")
    if not parts.hostname:
        raise ValueError(f"{url!r} names no host")
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r}: query strings and fragments are not supported")
    path = parts.path.lstrip("/")
    if path and (not path.isdigit() or not path.isascii()):
        raise ValueError(f"{url!r}: the database must be a number, not {path!r}")
    password = unquote(parts.password) if parts.password is not None else None
    username = unquote(parts.username) if parts.username else None
    if username is not None and password is None:
        # redis://secret@host is how redis-py spells a password alone; so do we.
        username, password = None, username
    return RedisAddress(
        host=parts.hostname,
        port=port if port is not None else DEFAULT_REDIS_PORT,
        db=int(path) if path else 0,
        username=username,
        password=password,
    )


def parseChannel(name: str) -> str:
    """Check a ``--channel`` name; raise ``ValueError`` for an empty one."""
    if not name:
        raise ValueError("the channel name must not be empty")
    return name


@implementer(IStreamClientEndpoint)
class _WatchedEndpoint:
    """A client endpoint that tells the bus when an attempt to connect fails."""

    def __init__(
        self, endpoint: IStreamClientEndpoint, failed: Callable[[Failure], None], name: str
    ) -> None:
        self._endpoint = endpoint
        self._failed = failed
        self._name = name

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        def failed(reason: Failure) -> Failure:
            self._failed(reason)
            return reason

        return self._endpoint.connect(protocolFactory).addErrback(failed)

    def __repr__(self) -> str:
        # ClientService names the endpoint in its "Scheduling retry" log lines.
        return self._name


class _PublisherProtocol(txredisapi.RedisProtocol):
    factory: _BusFactory

    def connectionMade(self) -> Any:
        # Each PUBLISH goes out at once, as redis-py and hiredis do, not held back by Nagle.
        self.transport.setTcpNoDelay(True)
        # Ready once AUTH and SELECT have been answered, not at connectionMade.
        self.whenConnected().addCallback(self.factory.bus._publisherReady)
        return super().connectionMade()

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        self.factory.bus._connectionLost(self, why)


class _SubscriberProtocol(txredisapi.SubscriberProtocol):
    factory: _BusFactory

    def connectionMade(self) -> Any:
        self.whenConnected().addCallback(self.factory.bus._subscriberReady)
        return super().connectionMade()

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        self.factory.bus._connectionLost(self, why)

    def messageReceived(self, pattern: object, channel: object, message: bytes) -> None:
        self.factory.bus.relayEnvelope(message)


class _BusFactory(txredisapi.RedisFactory):
    """One connection to Redis, kept up by txredisapi (a ClientService) with backoff."""

    # Redis restarts in well under a second: retry soon, then back off (x e) to 10 s.
    initialDelay = 0.1
    maxDelay = 10

    def __init__(self, bus: RedisBus, protocol: type[Any]) -> None:
        address = bus.address
        super().__init__(
            str(address),
            address.db or None,
            1,
            isLazy=True,
            # Bytes in, bytes out: no decoding, and no turning "42" into an int.
            charset=None,
            convertNumbers=False,
            password=address.password,
            username=address.username,
            # A Redis that stops answering is dropped and reconnected to, like a lost one.
            replyTimeout=bus.replyTimeout,
        )
        self.bus = bus
        self.protocol = protocol
        # Only failed AUTH or SELECT errback it; connectionError logs those.
        self.deferred.addErrback(lambda _: None)

    def connectionError(self, why: str) -> None:
        # Called when AUTH or SELECT was refused: txredisapi stops retrying, as it should for
        # a configuration error, and so does the bus.
        super().connectionError(why)
        self.bus._refusedByRedis(why)


class RedisBus(service.Service):
    """
    One room across every daemon that shares a Redis pub/sub channel.

    A service: it connects when started, and keeps reconnecting (with backoff) until stopped.
    Two connections, because a subscribed Redis connection may send nothing but
    (un)subscriptions: one publishes, one subscribes.

    @ivar published: messages from this daemon's clients handed to Redis.
    @ivar refused: messages from this daemon's clients refused with a notice.
    @ivar received: envelopes relayed to this daemon's room (from any daemon).
    @ivar malformed: what came in on the channel and was skipped.
    """

    _log = Logger()

    def __init__(
        self,
        room: Room,
        address: RedisAddress,
        channel: str = DEFAULT_CHANNEL,
        node: str | None = None,
        reactor: Any = None,
        heartbeat: float = HEARTBEAT,
        replyTimeout: float = REPLY_TIMEOUT,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.room = room
        self.address = address
        self.channel = channel
        self.node = node or secrets.token_hex(4)
        self.replyTimeout = replyTimeout
        self._heartbeat = task.LoopingCall(self._ping)
        self._heartbeat.clock = reactor
        self._heartbeatInterval = heartbeat
        self.published = 0
        self.refused = 0
        self.received = 0
        self.malformed = 0
        self._publisher: _PublisherProtocol | None = None
        self._subscriber: _SubscriberProtocol | None = None
        self._factories: list[_BusFactory] = []
        self._up = False
        self._downSince: float = reactor.seconds()
        self._refusedBefore = 0
        self._refusalLogged = False
        self._complained = False
        self._gaveUp = False

    @property
    def available(self) -> bool:
        """Whether a message published now reaches the room (both connections are up)."""
        return self._up

    def publish(self, message: Message, origin: Origin) -> None:
        publisher = self._publisher
        if not self._up or publisher is None:
            self._refuse(origin, REFUSED_DOWN)
            return
        data = encodeEnvelope(Envelope(message, self.node, self._reactor.seconds()))
        try:
            sent = publisher.publish(self.channel, data)
        except txredisapi.ConnectionError:
            self._refuse(origin, REFUSED_DOWN)
            return
        self.published += 1
        sent.addCallbacks(
            self._delivered, self._lost, callbackArgs=(origin,), errbackArgs=(origin,)
        )

    def _delivered(self, receivers: object, origin: Origin) -> None:
        # PUBLISH answers how many subscribers got it; none means not even this daemon.
        if receivers == 0:
            self._refuse(origin, REFUSED_NO_ROOM)

    def _lost(self, reason: Failure, origin: Origin) -> None:
        self._refuse(origin, REFUSED_LOST)

    def _refuse(self, origin: Origin, reason: str) -> None:
        self.refused += 1
        if not self._refusalLogged:
            # Once per outage: a busy room would flood the log otherwise.
            self._refusalLogged = True
            self._log.warn(
                "Refused a message ({reason}); its sender is told. Further refusals are "
                "counted, and logged when the Redis link comes back",
                reason=reason,
            )
        origin.refused(reason)

    def relayEnvelope(self, data: bytes) -> None:
        """
        Relay an envelope that came in on the channel to this daemon's room, or skip it.
        """
        try:
            envelope = decodeEnvelope(data)
        except MalformedEnvelope as e:
            self.malformed += 1
            self._log.warn(
                "Skipped a malformed envelope on channel {channel!r} ({size} bytes): {why}",
                channel=self.channel,
                size=len(data) if isinstance(data, bytes) else -1,
                why=str(e),
            )
            return
        message = envelope.message
        if message.isBinary and self.room.format is Format.PREFIXED:
            # A daemon in raw format shares the channel: its binary messages have no place in
            # a prefixed room, whose clients expect text.
            self.malformed += 1
            self._log.warn(
                "Skipped a binary message from node {node} on channel {channel!r}: this "
                "daemon relays text only (--format prefixed); give every daemon on a channel "
                "the same --format",
                node=envelope.node,
                channel=self.channel,
            )
            return
        self.received += 1
        try:
            # JSON clients on every daemon see the time the sender's daemon stamped.
            self.room.broadcast(message, envelope.time)
        except Exception:
            # Never let a bug here tear down the subscription for everyone.
            self._log.failure("Relaying a message from the channel failed")

    # The links to Redis

    def startService(self) -> None:
        super().startService()
        endpoint = _WatchedEndpoint(
            endpoints.HostnameEndpoint(self._reactor, self.address.host, self.address.port),
            self._connectFailed,
            str(self.address),
        )
        self._log.info(
            "Joining the room on channel {channel!r} of {redis} as node {node}; messages are "
            "refused until connected",
            channel=self.channel,
            redis=self.address,
            node=self.node,
        )
        self._factories = [
            _BusFactory(self, _PublisherProtocol),
            _BusFactory(self, _SubscriberProtocol),
        ]
        for factory in self._factories:
            factory.startConnecting(endpoint)
        self._heartbeat.start(self._heartbeatInterval, now=False)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return self._disconnect()

    def _publisherReady(self, protocol: _PublisherProtocol) -> None:
        if not self.running:
            return
        self._publisher = protocol
        self._linkChanged()

    def _subscriberReady(self, protocol: _SubscriberProtocol) -> None:
        def subscribed(_: object) -> None:
            if protocol.connected and self.running:
                self._subscriber = protocol
                self._linkChanged()

        def failed(reason: Failure) -> None:
            if reason.check(txredisapi.ResponseError):
                # Redis answered no (NOAUTH: it wants a password the URL lacks). Retrying
                # would loop on an open connection; like a refused AUTH, this needs an operator.
                protocol.factory.stopTrying()
                protocol.factory.connectionError(f"SUBSCRIBE: {reason.getErrorMessage()}")
                protocol.transport.loseConnection()
            # Otherwise the connection broke before Redis answered; txredisapi reconnects.

        protocol.subscribe(self.channel).addCallbacks(subscribed, failed)

    def _connectionLost(self, protocol: object, why: Failure) -> None:
        if protocol is self._publisher:
            self._publisher = None
        elif protocol is self._subscriber:
            self._subscriber = None
        else:
            return
        if self.running:
            self._linkChanged(why.getErrorMessage())

    def _refusedByRedis(self, why: str) -> None:
        if self._gaveUp or not self.running:
            return
        self._gaveUp = True
        self._log.critical(
            "Redis {redis} refused this daemon ({why}); giving up on it: fix --redis and "
            "restart. Messages are refused until then.",
            redis=self.address,
            why=why,
        )
        # Not from within txredisapi's connectionMade, which is where this is called from.
        self._reactor.callLater(0, self._disconnect)

    def _ping(self) -> None:
        # An unanswered PING times out (replyTimeout) and drops the connection; that is all.
        for protocol in (self._publisher, self._subscriber):
            if protocol is not None:
                protocol.ping().addErrback(lambda _: None)

    def _disconnect(self) -> defer.Deferred[None]:
        if self._heartbeat.running:
            self._heartbeat.stop()
        self._up = False
        self._publisher = self._subscriber = None
        factories, self._factories = self._factories, []
        return defer.gatherResults(
            [f.disconnect() for f in factories], consumeErrors=True
        ).addCallback(lambda _: None)

    def _connectFailed(self, reason: Failure) -> None:
        if self.running and not self._up and not self._complained:
            self._complained = True
            self._log.warn(
                "Redis {redis} is unreachable ({why}); retrying with backoff, and refusing "
                "messages meanwhile",
                redis=self.address,
                why=reason.getErrorMessage(),
            )

    def _linkChanged(self, why: str = "") -> None:
        up = self._publisher is not None and self._subscriber is not None
        if up == self._up:
            return
        self._up = up
        now = self._reactor.seconds()
        self._refusalLogged = False
        if up:
            self._complained = False
            self._log.info(
                "Redis link up: {redis}, channel {channel!r}, node {node} (down {down:.1f} s, "
                "{count} messages refused meanwhile)",
                redis=self.address,
                channel=self.channel,
                node=self.node,
                down=now - self._downSince,
                count=self.refused - self._refusedBefore,
            )
        else:
            self._downSince = now
            self._refusedBefore = self.refused
            self._log.warn(
                "Redis link lost ({why}); reconnecting with backoff. Clients stay connected; "
                "messages sent meanwhile are refused with a notice to their sender",
                why=why,
            )
