"""
One room across several daemons, through a Redis pub/sub channel (``--redis``).

:class:`RedisBus` publishes each message of this daemon's clients once, as an envelope
(:mod:`wschat.envelope`), to a channel shared by several daemons, and gives every envelope it
receives on that channel (its own included) to this daemon's room. Every client of every daemon
sees the same messages in the same order: the order in which Redis received them. While the
link to Redis is down a message is not sent: its sender gets a notice through
``origin.refused(reason)`` and :attr:`RedisBus.refused` counts it; the daemon reconnects with
backoff and resumes on its own. Malformed envelopes are logged and skipped.

This module imports the Redis client (txredisapi) and MessagePack: the ``redis`` extra.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

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

from wschat.bus import Origin
from wschat.envelope import Envelope, MalformedEnvelope, decodeEnvelope, encodeEnvelope
from wschat.redisaddress import DEFAULT_CHANNEL, RedisAddress
from wschat.room import Room
from wschat.wire import Format, Message

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
